//! The last step of a vMotion with the real binaries: after the switchover, vmotion-recv
//! announces the VM's MAC (RARP) and IP (gratuitous ARP) from its policy file on the
//! configured interface. Everything runs in a network namespace made for the test (a
//! veth pair `va`/`vb`: the receiver announces on `va`, a capture listens on `vb`). Needs
//! root and iproute2 (CI has both); elsewhere the test says why it skips.

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;

use vmotion_announce::netns::TestNetns;

const SEND: &str = env!("CARGO_BIN_EXE_vmotion-send");
const RECV: &str = env!("CARGO_BIN_EXE_vmotion-recv");

fn sibling(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        bin.exists(),
        "{} missing: scripts/test.sh builds every workspace binary",
        bin.display()
    );
    bin
}

#[test]
fn the_receiver_announces_the_vm_after_the_switchover() {
    let ns = match TestNetns::create("cli") {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!(
                "SKIPPED: cannot make a test network namespace (needs root and iproute2): {e}"
            );
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("web.toml"),
        "encryption = \"disabled\"\nmacs = [\"52:54:00:ab:cd:ef\"]\nips = [\"192.0.2.77\"]\n",
    )
    .unwrap();

    let mut capture = ns
        .exec(sibling("vmotion-announce"))
        .args([
            "capture",
            "--interface",
            "vb",
            "--count",
            "10",
            "--timeout-secs",
            "20",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cap_out = BufReader::new(capture.stdout.take().unwrap());
    let mut line = String::new();
    cap_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "capturing");

    let mut recv = ns
        .exec(RECV)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--announce-interface",
            "va",
            "--policy-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut l = String::new();
    BufReader::new(recv.stdout.take().unwrap())
        .read_line(&mut l)
        .unwrap();
    let addr = l.trim().strip_prefix("listening on ").unwrap().to_owned();

    let sent = ns
        .exec(SEND)
        .args(["--vm", "web", "--to", &addr, "--policy-dir"])
        .arg(dir.path())
        .args(["--synthetic-mib", "4"])
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );

    let mut frames = String::new();
    cap_out.read_to_string(&mut frames).unwrap();
    let ok = capture.wait().unwrap().success();
    let _ = recv.kill();
    let _ = recv.wait();
    assert!(ok, "captured:\n{frames}");
    let kinds: Vec<&str> = frames
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(kinds, ["rarp", "arp"].repeat(5), "{frames}");
    assert!(
        frames.contains("525400abcdef"),
        "the VM's MAC is announced:\n{frames}"
    );
    assert!(
        frames.contains("c000024d"),
        "its IP 192.0.2.77 too:\n{frames}"
    );
}
