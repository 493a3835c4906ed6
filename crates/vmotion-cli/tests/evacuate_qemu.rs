//! `vmotion-evacuate` of real QEMU VMs (the Linux test guest, TCG) found by a glob of
//! their QMP sockets: each goes through `vmotion-send --qemu` to one of two destination
//! daemons that ready their waiting QEMU themselves (`--qemu-qmp`). Every VM ends up
//! running at exactly the destination reported, its heartbeat unbroken.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use vmotion_qemu::linux::{self, LinuxGuest};
use vmotion_qemu::{Qemu, QemuConfig};

const EVACUATE: &str = env!("CARGO_BIN_EXE_vmotion-evacuate");
const VMS: [&str; 2] = ["lin0", "lin1"];
const DESTINATIONS: [&str; 2] = ["dst", "plain"];

/// QEMU `vm` in `run`, with a second QMP socket for vmotion (`RUN/VM.vmotion.qmp`).
fn config(guest: &LinuxGuest, run: &Path, mem: &Path, vm: &str) -> QemuConfig {
    let mut c = guest.config(vm, run, 256, &mem.join(format!("{vm}.mem")), (0, 0));
    c.extra_args.extend([
        "-qmp".into(),
        format!("unix:{}/{vm}.vmotion.qmp,server=on,wait=off", run.display()),
    ]);
    c
}

#[test]
fn qemu_vms_found_by_their_qmp_sockets_leave_and_run_at_one_destination() {
    if vmotion_qemu::qemu_binary().is_none() {
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed");
        return;
    }
    let guest = match LinuxGuest::in_dir(&linux::default_dir()) {
        Ok(g) => g,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let w = World::new();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let dir = |name: &str| -> PathBuf {
        let d = w.p(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    // Each destination: a daemon readying its own waiting QEMUs, one per VM.
    let mut waiting = Vec::new();
    let mut daemons = Vec::new();
    for d in DESTINATIONS {
        let run = dir(d);
        let mem = dir(&format!("mem-{d}"));
        for vm in VMS {
            let mut c = config(&guest, &run, &mem, vm);
            c.incoming = Some("defer".into());
            waiting.push((d, vm, Qemu::spawn(c).unwrap()));
        }
        let tunnel = format!("unix:{}/{{vm}}.incoming", run.display());
        let qmp = format!("unix:{}/{{vm}}.vmotion.qmp", run.display());
        daemons.push(w.recv(Some(d), &["--tunnel", &tunnel, "--qemu-qmp", &qmp]));
    }
    // The source host's VMs.
    let src_run = dir("src");
    let src_mem = dir("mem-src");
    let mut sources = Vec::new();
    for vm in VMS {
        w.policy(vm, "encryption = \"required\"\n");
        sources.push(Qemu::spawn(config(&guest, &src_run, &src_mem, vm)).unwrap());
        let log = src_run.join(format!("{vm}.serial"));
        assert!(
            eventually(Duration::from_secs(90), || !linux::heartbeats(&log)
                .unwrap()
                .is_empty()),
            "{vm} does not beat"
        );
    }
    let mut cmd = Command::new(EVACUATE);
    cmd.args(["--host", "src", "--json", "--policy-dir"])
        .arg(w.p("policy"))
        .args(w.identity("src"))
        .args(["--qemu", &format!("{}/*.vmotion.qmp", src_run.display())]);
    for (d, (_, addr)) in DESTINATIONS.iter().zip(&daemons) {
        cmd.args(["--to", &format!("{d}={addr}")]);
    }
    let o = cmd.output().unwrap();
    let report: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("no JSON ({e}): {}", text(&o)));
    assert_eq!(o.status.code(), Some(0), "{report}\n{}", text(&o));
    assert_eq!(report["host_empty"], true, "{report}");
    for v in report["vms"].as_array().unwrap() {
        let vm = v["vm"].as_str().unwrap();
        let to = v["destination"].as_str().unwrap();
        assert_eq!(v["mode"], "encrypted", "{v}");
        for (d, name, q) in &mut waiting {
            if *name != vm {
                continue;
            }
            let want = if *d == to { "running" } else { "inmigrate" };
            q.qmp()
                .wait_status(want, Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("{vm} at {d}: {e}"));
        }
        let logs = [
            src_run.join(format!("{vm}.serial")),
            w.p(to).join(format!("{vm}.serial")),
        ];
        let before = linux::heartbeats(&logs[1]).unwrap().len();
        assert!(eventually(Duration::from_secs(20), || linux::heartbeats(
            &logs[1]
        )
        .unwrap()
        .len()
            > before + 3));
        linux::unbroken(&logs)
            .unwrap()
            .unwrap_or_else(|e| panic!("{vm}'s heartbeat broke: {e}"));
    }
    for (i, q) in sources.iter_mut().enumerate() {
        assert_eq!(q.qmp().query_status().unwrap(), "postmigrate", "{}", VMS[i]);
    }
    drop(shm);
}
