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

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::qemu::*;
use common::*;
use serde_json::json;
use vmotion_qemu::memfile;

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

/// A running source guest with random memory, and a destination QEMU waiting.
fn qemus(run: &Path, multifd: Option<u32>) -> Vms {
    qemus_with(run, MIB, multifd, &[])
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
    let mut cmd = Command::new(SEND);
    cmd.args(["--vm", vm, "--to", to, "--policy-dir"])
        .arg(w.p("policy"))
        .args(w.identity("src"))
        .args(["--destination", "dst", "--json", "--tunnel"])
        .arg(format!("unix:{}", listen.display()));
    start_tunnel(cmd)
}

/// `return_path`: QEMU's return path on (the destination answers on the main channel, so
/// bytes flow back through the tunnel, and the source completes only when the destination
/// says so).
fn migrate_through_the_tunnel(multifd: Option<u32>, return_path: bool) {
    let (w, run, _recv, addr) = daemon(&[]);
    w.policy("qemu-vm", "encryption = \"required\"\n");
    let mut vms = qemus_with(&run, MIB, multifd, &[("return-path", return_path)]);
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

    let zero = memfile::zero_pages(&vms.src_mem()).unwrap();
    assert!(
        zero < (MIB << 20) / 4096 / 100,
        "the source memory is non-zero data ({zero} zero pages)"
    );
    vms.assert_arrived();
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
