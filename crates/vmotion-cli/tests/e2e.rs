//! End to end with the real binaries on loopback: a real key service process, vmotion-recv
//! daemons, vmotion-send runs — the policy matrix of the design brief (§3), a downgrade
//! attempt by a proxy that rewrites the handshake, and bad policy files and flags, each
//! with its documented exit code and message.
//!
//! The key service binary must be built (`scripts/test.sh` builds every workspace binary).

mod common;

use common::*;
use std::process::Command;

/// The policy matrix: disabled / opportunistic / required against a destination that
/// encrypts, one that is not registered, and a receiver that requires encryption.
#[test]
fn policy_matrix_with_the_real_binaries() {
    let w = World::new();
    let (_enc, enc_addr) = w.recv(Some("dst"), &[]);
    let (_unreg, unreg_addr) = w.recv(None, &[]);
    let (_strict, strict_addr) = w.recv(Some("dst"), &["--require-encryption"]);
    w.policy("req", "encryption = \"required\"\n");
    w.policy("opp", "encryption = \"opportunistic\"\n");
    w.policy("off", "encryption = \"disabled\"\n");
    w.policy("vault", "encryption = \"disabled\"\nencrypted = true\n");

    // Destination registered and able to encrypt.
    expect(
        &w.send("req", &enc_addr, true, &[]),
        0,
        &["committed, encrypted (AES-256-GCM)"],
    );
    expect(
        &w.send("opp", &enc_addr, true, &[]),
        0,
        &["committed, encrypted"],
    );
    expect(
        &w.send("off", &enc_addr, true, &[]),
        0,
        &["PLAINTEXT: the VM's policy disables encryption"],
    );
    expect(
        &w.send("vault", &enc_addr, true, &[]),
        0,
        &["committed, encrypted"],
    );

    // Destination not registered with the key service ("dst" is registered, but the
    // migration names "plain", which never registered).
    let plain = |vm: &str| {
        let mut cmd = Command::new(SEND);
        cmd.args(["--vm", vm, "--to", &unreg_addr, "--policy-dir"])
            .arg(w.p("policy"))
            .args(["--synthetic-mib", "8"])
            .args(w.identity("src"))
            .args(["--destination", "plain"]);
        cmd.output().unwrap()
    };
    expect(
        &plain("req"),
        3,
        &[
            "refused",
            "requires encryption",
            "destination cannot encrypt",
        ],
    );
    expect(&plain("vault"), 3, &["refused"]);
    let o = plain("opp");
    expect(&o, 0, &["PLAINTEXT", "not registered", "warning"]);
    expect(
        &plain("off"),
        0,
        &["PLAINTEXT: the VM's policy disables encryption"],
    );

    // A destination registered as unable to encrypt.
    let (_weak, weak_addr) = w.recv(Some("weak"), &["--no-encryption"]);
    let weak = |vm: &str| {
        let mut cmd = Command::new(SEND);
        cmd.args(["--vm", vm, "--to", &weak_addr, "--policy-dir"])
            .arg(w.p("policy"))
            .args(["--synthetic-mib", "8"])
            .args(w.identity("src"))
            .args(["--destination", "weak"]);
        cmd.output().unwrap()
    };
    expect(
        &weak("opp"),
        0,
        &["PLAINTEXT", "the destination cannot encrypt", "warning"],
    );
    expect(&weak("req"), 3, &["refused", "requires encryption"]);
    expect(
        &weak("off"),
        0,
        &["PLAINTEXT: the VM's policy disables encryption"],
    );

    // A receiver that requires encryption refuses plaintext, whatever the VM allows.
    expect(
        &w.send("off", &strict_addr, true, &[]),
        3,
        &["refused", "receiving host requires encryption"],
    );
    expect(&w.send("req", &strict_addr, true, &[]), 0, &["encrypted"]);

    // --json for machines.
    let o = w.send("req", &enc_addr, true, &["--json"]);
    expect(&o, 0, &[]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["outcome"], "committed");
    assert_eq!(v["mode"], "encrypted");
    assert!(v["downtime_ms"]["total"].as_f64().unwrap() > 0.0);
    assert!(!v["iterations"].as_array().unwrap().is_empty());
}

/// A proxy between sender and receiver rewrites the HelloAck to say the destination
/// cannot encrypt; the key service's registry says it can: refused as a downgrade.
#[test]
fn a_rewritten_handshake_is_refused_as_a_downgrade() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use vmotion_proto::message::HelloAck;
    use vmotion_proto::testing::{checksum_frame, header_of};
    use vmotion_proto::{Decision, FrameSplitter, PlaintextReason};

    let w = World::new();
    let (_enc, enc_addr) = w.recv(Some("dst"), &[]);
    w.policy("opp", "encryption = \"opportunistic\"\n");
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap().to_string();
    let upstream = enc_addr;
    std::thread::spawn(move || {
        // Only the control connection matters: the sender refuses before opening others.
        let (mut client, _) = proxy.accept().unwrap();
        let mut server = TcpStream::connect(&upstream).unwrap();
        let mut c2 = client.try_clone().unwrap();
        let mut s2 = server.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut c2, &mut s2);
        });
        // Receiver → sender: rewrite the first frame (the HelloAck), pass the rest.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = server.read(&mut chunk).unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Ok(Some((frame, used))) = FrameSplitter::new(4096).split(&buf) {
                let h = header_of(&frame);
                let mut ack = HelloAck::decode(&frame.payload).unwrap();
                ack.can_encrypt = false;
                ack.cipher = None;
                ack.decision = Decision::Plaintext(PlaintextReason::DestinationCannotEncrypt);
                let forged =
                    checksum_frame(h.version, h.stream, h.sequence, h.frame_type, ack.encode())
                        .unwrap();
                let _ = client.write_all(&forged.to_bytes());
                let _ = client.write_all(&buf[used..]);
                break;
            }
        }
        let _ = std::io::copy(&mut server, &mut client);
    });
    expect(
        &w.send("opp", &proxy_addr, true, &[]),
        3,
        &["refused", "downgrade detected"],
    );
}

#[test]
fn bad_policy_files_and_flags_are_refused_with_their_message() {
    let w = World::new();
    let (_r, addr) = w.recv(None, &[]);
    w.policy("typo", "encryption = \"disabled\"\nstreamz = 2\n");
    expect(
        &w.send("typo", &addr, false, &[]),
        2,
        &["typo.toml:2", "streamz", "nothing was sent"],
    );
    w.policy("bad", "encryption = \"sometimes\"\n");
    expect(
        &w.send("bad", &addr, false, &[]),
        2,
        &["bad.toml:1", "sometimes"],
    );
    expect(
        &w.send("ghost", &addr, false, &[]),
        2,
        &["no policy file for VM `ghost`"],
    );
    w.policy("ok", "encryption = \"disabled\"\n");
    expect(
        &w.send("ok", &addr, false, &["--max-bandwidth", "fast"]),
        2,
        &["--max-bandwidth", "fast"],
    );
    expect(
        &w.send("ok", &addr, false, &["--pattern", "zigzag"]),
        2,
        &["zigzag"],
    );
    expect(
        &w.send("ok", &addr, false, &["--streams", "0"]),
        2,
        &["streams"],
    );
    expect(
        &w.send("ok", &addr, false, &["--no-such-flag"]),
        2,
        &["--no-such-flag"],
    );
    let o = Command::new(SEND)
        .args(["--vm", "ok", "--to", &addr, "--policy-dir"])
        .arg(w.p("policy"))
        .output()
        .unwrap();
    expect(
        &o,
        2,
        &["--synthetic-mib N, --kvm-mib N, --memfile PATH, or --tunnel LISTEN"],
    );
    expect(
        &w.send("ok", &addr, false, &["--dscp", "64"]),
        2,
        &["--dscp"],
    );
    // And after all that, a good run still works against the same receiver, here from a
    // dedicated local address with EF-marked packets.
    expect(
        &w.send("ok", &addr, false, &["--bind", "127.0.0.2", "--dscp", "46"]),
        0,
        &["committed"],
    );
}

/// SIGTERM in the middle of a migration: the daemon exits cleanly, the sender aborts with
/// its VM running at the source, and the half-received guest is not marked done (only
/// a committed guest becomes VM.mem).
#[test]
fn sigterm_mid_migration_leaves_nothing_marked_done() {
    let w = World::new();
    let sinks = w.p("sinks");
    let mut cmd = Command::new(RECV);
    cmd.args(["--listen", "127.0.0.1:0", "--sink", "memfile", "--sink-dir"])
        .arg(&sinks);
    let (mut recv, addr) = spawn_listening(&mut cmd);
    w.policy(
        "slow",
        "encryption = \"disabled\"\nmax_bandwidth = \"4MB/s\"\n",
    );
    w.policy("fast", "encryption = \"disabled\"\n");

    // A committed guest is VM.mem, and nothing is left incoming.
    expect(&w.send("fast", &addr, false, &[]), 0, &["committed"]);
    wait_for_file(&sinks.join("fast.mem"));
    assert!(
        !std::fs::read(sinks.join("fast.state")).unwrap().is_empty(),
        "the device state is kept beside it"
    );
    assert!(!sinks.join("fast.mem.incoming").exists());

    let pid = recv.0.id().to_string();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1000));
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    });
    // 8 MiB at 4 MB/s: about 2 s, so the daemon stops halfway.
    let o = w.send("slow", &addr, false, &[]);
    killer.join().unwrap();
    expect(&o, 4, &["aborted, the VM keeps running at the source"]);
    assert!(
        recv.0.wait().unwrap().success(),
        "the daemon exits cleanly on SIGTERM"
    );
    assert!(
        !sinks.join("slow.mem").exists(),
        "a half-received guest is never marked done"
    );
    assert!(
        !sinks.join("slow.receiving").exists(),
        "and nothing of it is left behind"
    );
}

/// A migration on one host over a Unix socket: encrypted with the key service's keys like
/// any other, the socket file gone when the daemon stops, and TCP-only flags refused.
#[test]
fn a_unix_socket_carries_an_encrypted_migration() {
    let w = World::new();
    let sock = w.p("recv.sock");
    let sinks = w.p("sinks");
    let mut cmd = Command::new(RECV);
    cmd.arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .args(["--sink", "memfile", "--sink-dir"])
        .arg(&sinks)
        .args(w.identity("dst"));
    let (mut recv, addr) = spawn_listening(&mut cmd);
    assert_eq!(addr, format!("unix:{}", sock.display()));
    w.policy("local", "encryption = \"required\"\n");

    expect(
        &w.send("local", &addr, true, &["--streams", "2"]),
        0,
        &["committed, encrypted (AES-256-GCM)"],
    );
    wait_for_file(&sinks.join("local.mem"));
    assert_eq!(
        std::fs::metadata(sinks.join("local.mem")).unwrap().len(),
        8 << 20
    );

    // --bind and --dscp mean nothing on a Unix socket: a usage error, nothing sent.
    expect(
        &w.send("local", &addr, true, &["--dscp", "10"]),
        2,
        &["--bind and --dscp apply to TCP"],
    );

    // A second daemon cannot take over a live socket.
    let second = Command::new(RECV)
        .arg("--listen")
        .arg(&addr)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("in use"),
        "{}",
        text(&second)
    );

    Command::new("kill")
        .args(["-TERM", &recv.0.id().to_string()])
        .status()
        .unwrap();
    assert!(recv.0.wait().unwrap().success());
    assert!(!sock.exists(), "the socket file is removed at exit");
}

/// A running KVM micro-VM moves between the real binaries, encrypted, and runs at the
/// destination daemon (skips, saying why, without /dev/kvm).
#[test]
fn a_kvm_micro_vm_migrates_between_the_binaries() {
    if let Err(why) = vmotion_vmm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let w = World::new();
    let log = w.p("recv.log");
    let mut cmd = Command::new(RECV);
    cmd.args(["--listen", "127.0.0.1:0", "--sink", "kvm"])
        .args(w.identity("dst"))
        .env("RUST_LOG", "info");
    let (recv, addr) =
        spawn_listening_logged(&mut cmd, std::fs::File::create(&log).unwrap().into());
    w.policy("micro", "encryption = \"required\"\n");
    let mut send = Command::new(SEND);
    send.args(["--vm", "micro", "--to", &addr, "--policy-dir"])
        .arg(w.p("policy"))
        .args(["--kvm-mib", "128", "--dirty-rate", "20000"])
        .args(w.identity("src"))
        .args(["--destination", "dst"]);
    expect(
        &send.output().unwrap(),
        0,
        &["committed, encrypted (AES-256-GCM)"],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("micro-VM running here") {
            assert!(text.contains("alive=true"), "{text}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(recv);
}

/// A synthetic guest sent to a daemon that runs micro-VMs is refused in pre-flight (exit 3,
/// nothing sent, the source never paused), with the reason, not at the device state.
#[test]
fn a_guest_the_kvm_sink_cannot_run_is_refused_before_any_page() {
    if let Err(why) = vmotion_vmm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let w = World::new();
    let mut cmd = Command::new(RECV);
    cmd.args(["--listen", "127.0.0.1:0", "--sink", "kvm"])
        .args(w.identity("dst"));
    let (_recv, addr) = spawn_listening(&mut cmd);
    w.policy("synthetic", "encryption = \"required\"\n");
    let o = w.send("synthetic", &addr, true, &["--json"]);
    expect(
        &o,
        3,
        &[
            "kvm sink runs vmotion-vmm micro-VMs",
            "synthetic test guest",
        ],
    );
    assert!(
        !text(&o).contains("paused"),
        "refused before the pause: {}",
        text(&o)
    );
}

/// A sender without a key service has no key: it says so, instead of blaming a destination
/// that may well encrypt (this one is registered and able to).
#[test]
fn a_sender_without_a_key_service_names_the_missing_key_service() {
    let w = World::new();
    let (_enc, addr) = w.recv(Some("dst"), &[]);
    w.policy("opp", "encryption = \"opportunistic\"\n");
    w.policy("req", "encryption = \"required\"\n");
    let o = w.send("opp", &addr, false, &[]);
    expect(&o, 0, &["PLAINTEXT", "no key service"]);
    assert!(
        !text(&o).contains("destination cannot encrypt"),
        "{}",
        text(&o)
    );
    expect(
        &w.send("req", &addr, false, &[]),
        3,
        &["refused", "no key service"],
    );
}

/// Maintenance mode with the real binaries: the destination drains itself with
/// `vmotion-keyservice host drain`; a migration to it is refused before anything is sent
/// (exit 3, the message names the maintenance) and goes through once it is undrained.
#[test]
fn a_draining_destination_is_refused_until_undrained() {
    let w = World::new();
    w.policy("vm-m", "encryption = \"required\"\n");
    let (_recv, addr) = w.recv(Some("dst"), &[]);
    let host = |action: &str| {
        let o = Command::new(keyservice_bin())
            .args(["host", action, "dst"])
            .args(w.identity("dst"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    assert_eq!(host("drain"), "dst: draining (in maintenance)");
    let o = w.send("vm-m", &addr, true, &[]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("in maintenance (draining)"),
        "{}",
        text(&o)
    );
    assert_eq!(host("status"), "dst: draining (in maintenance)");
    assert_eq!(host("undrain"), "dst: in service");
    let o = w.send("vm-m", &addr, true, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}
