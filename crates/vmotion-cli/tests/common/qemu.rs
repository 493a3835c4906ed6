//! QEMU for the tunnel tests: a source guest of random memory and a destination QEMU
//! waiting for it, and `vmotion-send --tunnel` started and ready.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use vmotion_qemu::{Qemu, QemuConfig, idle_guest, memfile};

/// Guest memory files live in /dev/shm (fast, no disk), in a folder of their own.
pub fn shm_dir() -> tempfile::TempDir {
    let base = Path::new("/dev/shm");
    if base.is_dir() {
        tempfile::tempdir_in(base).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

pub struct Vms {
    pub mem: tempfile::TempDir,
    pub src: Qemu,
    pub dst: Qemu,
}

impl Vms {
    pub fn src_mem(&self) -> PathBuf {
        self.mem.path().join("src.mem")
    }
    pub fn dst_mem(&self) -> PathBuf {
        self.mem.path().join("dst.mem")
    }

    /// The destination runs the guest, and its memory is the source's byte for byte (the
    /// source is stopped for good; the destination is stopped to compare).
    pub fn assert_arrived(&mut self) {
        self.dst
            .qmp()
            .wait_status("running", Duration::from_secs(10))
            .unwrap();
        self.dst.qmp().stop().unwrap();
        assert_eq!(
            memfile::first_difference(&self.src_mem(), &self.dst_mem()).unwrap(),
            None,
            "the destination's memory equals the source's"
        );
    }
}

/// A running source guest of `mib` MiB of random memory, and a destination QEMU waiting
/// (`-incoming defer`) with the same configuration; both with `multifd` channels if
/// asked, `capabilities` on, and the bandwidth cap lifted.
pub fn qemus_with(
    run: &Path,
    mib: u64,
    multifd: Option<u32>,
    capabilities: &[(&str, bool)],
) -> Vms {
    let mem = shm_dir();
    let kernel = run.join("idle.bin");
    std::fs::write(&kernel, idle_guest()).unwrap();
    let (src_mem, dst_mem) = (mem.path().join("src.mem"), mem.path().join("dst.mem"));
    memfile::fill_random(&src_mem, mib << 20, 7).unwrap();
    memfile::create_zeroed(&dst_mem, mib << 20).unwrap();
    let mut src = Qemu::spawn(QemuConfig::new("src", run, mib, &src_mem, &kernel)).unwrap();
    let mut dst_cfg = QemuConfig::new("dst", run, mib, &dst_mem, &kernel);
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

/// Starts `cmd` (a `vmotion-send --tunnel`) and waits for "tunnel ready" on its
/// stderr; returns the process and its stderr so far.
pub fn start_tunnel(mut cmd: Command) -> (Child, String) {
    let mut child = cmd
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
