//! Real QEMU through the real binaries: a running guest whose 512 MiB of memory hold
//! random data migrates QEMU-to-QEMU through `vmotion-send --tunnel` and
//! `vmotion-recv --tunnel`, encrypted with keys from a live key service — with one
//! channel and with multifd (2 channels) — and the destination's memory is byte for byte
//! the source's. A `required` VM against a destination that cannot encrypt is refused
//! before QEMU can send anything, and QEMU's migration fails with the source running.
//!
//! Needs `qemu-system-x86_64` (`.ci/run` installs it); KVM where /dev/kvm is usable,
//! TCG otherwise. Each test skips, saying why, without QEMU.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use vmotion_qemu::{Qemu, QemuConfig, idle_guest, memfile};

const MIB: u64 = 512;

macro_rules! require_qemu {
    () => {
        if vmotion_qemu::qemu_binary().is_none() {
            eprintln!(
                "SKIPPED: qemu-system-x86_64 is not installed (.ci/run installs it from \
                 bookworm-backports)"
            );
            return;
        }
    };
}

/// Guest memory files live in /dev/shm (fast, no disk), in a folder of their own.
fn shm_dir() -> tempfile::TempDir {
    let base = Path::new("/dev/shm");
    if base.is_dir() {
        tempfile::tempdir_in(base).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

struct Vms {
    mem: tempfile::TempDir,
    src: Qemu,
    dst: Qemu,
}

impl Vms {
    fn src_mem(&self) -> PathBuf {
        self.mem.path().join("src.mem")
    }
    fn dst_mem(&self) -> PathBuf {
        self.mem.path().join("dst.mem")
    }
}

/// A running source guest with random memory, and a destination QEMU waiting
/// (`-incoming defer`) with the same configuration; both with `multifd` channels if
/// asked, and the bandwidth cap lifted.
fn qemus(run: &Path, multifd: Option<u32>) -> Vms {
    qemus_with(run, multifd, &[])
}

/// [`qemus`] with more migration capabilities on both sides.
fn qemus_with(run: &Path, multifd: Option<u32>, capabilities: &[(&str, bool)]) -> Vms {
    let mem = shm_dir();
    let kernel = run.join("idle.bin");
    std::fs::write(&kernel, idle_guest()).unwrap();
    let (src_mem, dst_mem) = (mem.path().join("src.mem"), mem.path().join("dst.mem"));
    memfile::fill_random(&src_mem, MIB << 20, 7).unwrap();
    memfile::create_zeroed(&dst_mem, MIB << 20).unwrap();
    let mut src = Qemu::spawn(QemuConfig::new("src", run, MIB, &src_mem, &kernel)).unwrap();
    let mut dst_cfg = QemuConfig::new("dst", run, MIB, &dst_mem, &kernel);
    dst_cfg.incoming = Some("defer".into());
    dst_cfg.prealloc = true;
    let mut dst = Qemu::spawn(dst_cfg).unwrap();
    for q in [&mut src, &mut dst] {
        if let Some(n) = multifd {
            q.qmp().set_capabilities(&[("multifd", true)]).unwrap();
            q.qmp()
                .set_parameters(json!({ "multifd-channels": n }))
                .unwrap();
        }
        if !capabilities.is_empty() {
            q.qmp().set_capabilities(capabilities).unwrap();
        }
        q.qmp()
            .set_parameters(json!({ "max-bandwidth": 8u64 << 30 }))
            .unwrap();
    }
    src.wait_started(Duration::from_secs(60)).unwrap();
    assert_eq!(src.qmp().query_status().unwrap(), "running");
    Vms { mem, src, dst }
}

/// A key service, and a `vmotion-recv --tunnel` delivering to `RUN/{vm}.incoming` (with
/// `extra` flags): the world, its run folder, the daemon and its address.
fn daemon(extra: &[&str]) -> (World, PathBuf, Proc, String) {
    let w = World::new();
    let run = w.p("run");
    std::fs::create_dir(&run).unwrap();
    let incoming = format!("unix:{}", run.join("{vm}.incoming").display());
    let mut args = extra.to_vec();
    args.extend(["--tunnel", &incoming]);
    let (recv, addr) = w.recv(Some("dst"), &args);
    (w, run, recv, addr)
}

/// Starts `vmotion-send --tunnel` and waits for "tunnel ready" on its stderr; returns
/// the process and its stderr so far.
fn tunnel(w: &World, vm: &str, to: &str, listen: &Path) -> (Child, String) {
    let mut child = Command::new(SEND)
        .args(["--vm", vm, "--to", to, "--policy-dir"])
        .arg(w.p("policy"))
        .args(w.identity("src"))
        .args(["--destination", "dst", "--json", "--tunnel"])
        .arg(format!("unix:{}", listen.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            // It ended without getting ready (a refusal): hand back what it said.
            return (child, seen);
        }
        seen.push_str(&line);
        if line.contains("tunnel ready") {
            break;
        }
    }
    // Keep draining its stderr so it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = err.read_to_string(&mut rest);
    });
    (child, seen)
}

/// `return_path`: QEMU's return path on (the destination answers on the main channel, so
/// bytes flow back through the tunnel, and the source completes only when the destination
/// says so).
fn migrate_through_the_tunnel(multifd: Option<u32>, return_path: bool) {
    let (w, run, _recv, addr) = daemon(&[]);
    w.policy("qemu-vm", "encryption = \"required\"\n");
    let mut vms = qemus_with(&run, multifd, &[("return-path", return_path)]);
    let dst_uri = format!("unix:{}", run.join("qemu-vm.incoming").display());
    vms.dst.qmp().migrate_incoming(&dst_uri).unwrap();

    let listen = run.join("out.sock");
    let (mut send, said) = tunnel(&w, "qemu-vm", &addr, &listen);
    assert!(said.contains("tunnel ready (encrypted"), "{said}");
    let t0 = Instant::now();
    vms.src
        .qmp()
        .migrate(&format!("unix:{}", listen.display()))
        .unwrap();
    let done = vms
        .src
        .qmp()
        .wait_migration(Duration::from_secs(120))
        .unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    eprintln!(
        "QEMU migration through the tunnel: {:?}, {} MB transferred, downtime {} ms",
        t0.elapsed(),
        done["ram"]["transferred"].as_u64().unwrap_or_default() / 1_000_000,
        done["downtime"]
    );
    assert_eq!(vms.src.qmp().query_status().unwrap(), "postmigrate");

    // vmotion-send ends when QEMU has closed every connection, with its report.
    let out = wait_output(send.stdout.take().unwrap(), &mut send);
    let report: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("not a JSON report ({e}): {out}"));
    assert_eq!(report["outcome"], "tunnel closed", "{report}");
    assert_eq!(report["mode"], "encrypted", "{report}");
    let connections = 1 + u64::from(multifd.unwrap_or(0));
    assert_eq!(report["connections"], connections, "{report}");
    assert!(
        report["bytes_to_destination"].as_u64().unwrap() >= MIB << 20,
        "all of memory crossed: {report}"
    );
    assert!(report["key_epochs"].as_u64().unwrap() >= 1, "{report}");
    let back = report["bytes_from_destination"].as_u64().unwrap();
    if return_path {
        assert!(back > 0, "the return path crossed back: {report}");
    } else {
        assert_eq!(back, 0, "{report}");
    }

    // The destination runs the guest, and its memory is the source's, byte for byte
    // (the source is stopped for good; stop the destination to compare).
    vms.dst
        .qmp()
        .wait_status("running", Duration::from_secs(10))
        .unwrap();
    vms.dst.qmp().stop().unwrap();
    let zero = memfile::zero_pages(&vms.src_mem()).unwrap();
    assert!(
        zero < (MIB << 20) / 4096 / 100,
        "the source memory is non-zero data ({zero} zero pages)"
    );
    assert_eq!(
        memfile::first_difference(&vms.src_mem(), &vms.dst_mem()).unwrap(),
        None,
        "the destination's memory equals the source's"
    );
}

/// Waits for `child` to exit 0 and returns its stdout.
fn wait_output(mut stdout: impl Read, child: &mut Child) -> String {
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "vmotion-send exited {status}: {out}");
    out
}

#[test]
fn qemu_migrates_encrypted_through_the_tunnel() {
    require_qemu!();
    migrate_through_the_tunnel(None, true);
}

#[test]
fn qemu_multifd_migrates_encrypted_through_the_tunnel() {
    require_qemu!();
    migrate_through_the_tunnel(Some(2), false);
}

#[test]
fn a_required_vm_is_refused_before_qemu_sends_anything() {
    require_qemu!();
    // This destination registers as unable to encrypt.
    let (w, run, _recv, addr) = daemon(&["--no-encryption"]);
    w.policy("secret-vm", "encryption = \"required\"\n");
    let mut vms = qemus(&run, None);
    let dst_uri = format!("unix:{}", run.join("secret-vm.incoming").display());
    vms.dst.qmp().migrate_incoming(&dst_uri).unwrap();

    let listen = run.join("out.sock");
    let (mut send, said) = tunnel(&w, "secret-vm", &addr, &listen);
    let status = send.wait().unwrap();
    assert_eq!(status.code(), Some(3), "refused: {said}");
    assert!(
        said.contains("requires encryption"),
        "the reason is given: {said}"
    );
    assert!(
        !listen.exists(),
        "nothing ever listened for QEMU's migration"
    );

    // QEMU's migration to the tunnel fails; the VM keeps running at the source, and the
    // destination QEMU was never contacted.
    let err = vms
        .src
        .qmp()
        .migrate(&format!("unix:{}", listen.display()))
        .err();
    let status = match err {
        // QEMU may refuse at once (the socket does not exist)...
        Some(e) => {
            eprintln!("QEMU refused the migrate command: {e}");
            vms.src.qmp().migration_status().unwrap()
        }
        // ...or start the migration and fail it when connecting.
        None => vms
            .src
            .qmp()
            .wait_migration(Duration::from_secs(30))
            .unwrap()["status"]
            .as_str()
            .map(str::to_owned),
    };
    assert!(
        status.as_deref() == Some("failed"),
        "the migration failed: {status:?}"
    );
    assert_eq!(vms.src.qmp().query_status().unwrap(), "running");
    assert_eq!(vms.dst.qmp().query_status().unwrap(), "inmigrate");
    assert!(
        vms.dst.try_wait().unwrap().is_none(),
        "the destination waits on"
    );
    // Not a page reached the destination's memory.
    assert_eq!(
        memfile::zero_pages(&vms.dst_mem()).unwrap(),
        (MIB << 20) / 4096
    );
}

#[test]
fn a_destination_qemu_that_dies_fails_the_source_migration_and_the_vm_runs_on() {
    require_qemu!();
    let (w, run, _recv, addr) = daemon(&[]);
    w.policy("qemu-vm", "encryption = \"required\"\n");
    // Without QEMU's return path the source learns of the destination's end only from
    // its writes failing: the tunnel must make them fail, not swallow them.
    let mut vms = qemus(&run, None);
    // Slow enough to be caught in the middle.
    vms.src
        .qmp()
        .set_parameters(json!({ "max-bandwidth": 32u64 << 20 }))
        .unwrap();
    let dst_uri = format!("unix:{}", run.join("qemu-vm.incoming").display());
    vms.dst.qmp().migrate_incoming(&dst_uri).unwrap();
    let listen = run.join("out.sock");
    let (mut send, said) = tunnel(&w, "qemu-vm", &addr, &listen);
    assert!(said.contains("tunnel ready"), "{said}");
    vms.src
        .qmp()
        .migrate(&format!("unix:{}", listen.display()))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = vms.src.qmp().query_migrate().unwrap();
        if r["ram"]["transferred"].as_u64().unwrap_or(0) > 32 << 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the migration does not progress: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The destination QEMU dies mid-stream.
    Command::new("kill")
        .args(["-KILL", &vms.dst.pid().to_string()])
        .status()
        .unwrap();
    let done = vms
        .src
        .qmp()
        .wait_migration(Duration::from_secs(60))
        .unwrap();
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(vms.src.qmp().query_status().unwrap(), "running");
    let status = send.wait().unwrap();
    assert_eq!(status.code(), Some(4), "the tunnel failed");
}
