//! What the QEMU integration tests share: skipping without QEMU, scratch directories
//! and spawning this crate's guests.

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vmotion_qemu::{Accel, Qemu, QemuConfig, kvm_usable, qemu_binary};

/// How long a guest may take to boot: about 3 s under KVM on the nested development
/// machines, with room for a loaded machine.
pub(crate) const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Returns from the test, saying why, when QEMU is missing.
#[macro_export]
macro_rules! require_qemu {
    () => {
        if vmotion_qemu::qemu_binary().is_none() {
            eprintln!("skipped: qemu-system-x86_64 not found (install QEMU or set VMOTION_QEMU)");
            return;
        }
    };
}

/// The accelerators to try: KVM when /dev/kvm opens, and TCG.
pub(crate) fn accels() -> Vec<Accel> {
    let mut accels = vec![Accel::Tcg];
    if kvm_usable() {
        accels.insert(0, Accel::Kvm);
    }
    accels
}

/// A scratch directory, removed on drop: in /dev/shm when it has `need_bytes` free
/// (memory files live there), else in the temporary directory.
pub(crate) struct Scratch {
    pub(crate) dir: PathBuf,
}

impl Scratch {
    pub(crate) fn new(tag: &str, need_bytes: u64) -> Self {
        let base = if shm_free_bytes().is_some_and(|free| free >= need_bytes + (64 << 20)) {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("vmotion-qemu-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Free bytes in /dev/shm, from `df`.
fn shm_free_bytes() -> Option<u64> {
    let out = Command::new("df").args(["-Pk", "/dev/shm"]).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let kib: u64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A configuration for guest `name` in `scratch`: its image written to `<name>.bin`, its
/// memory in `<name>.mem`.
pub(crate) fn config(scratch: &Scratch, name: &str, memory_mib: u64, image: &[u8]) -> QemuConfig {
    let kernel = scratch.path(&format!("{name}.bin"));
    fs::write(&kernel, image).unwrap();
    QemuConfig::new(
        name,
        &scratch.dir,
        memory_mib,
        scratch.path(&format!("{name}.mem")),
        kernel,
    )
}

/// Spawns `config`, panicking with QEMU's error (its log tail included).
pub(crate) fn spawn(config: QemuConfig) -> Qemu {
    assert!(qemu_binary().is_some());
    Qemu::spawn(config).unwrap_or_else(|e| panic!("{e}"))
}

/// Reads the little-endian word at `addr` of `mem`.
pub(crate) fn word(mem: &Path, addr: u64) -> u32 {
    vmotion_qemu::guest::read_u32(mem, addr).unwrap()
}
