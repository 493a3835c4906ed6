//! A real Linux guest: Debian's cloud kernel and busybox, built by
//! `scripts/linux-guest.sh` from Debian's packages (nothing installed on the host).
//!
//! Its init prints `vmotion-heartbeat <counter> <uptime>` on the serial console every
//! 100 ms, and rewrites `vmotion.dirty_mib` MiB of tmpfs over and over. The counter lives
//! in guest memory, so across a live migration it goes on from the source's last value:
//! the source's serial log followed by the destination's is one unbroken count
//! ([`heartbeats`], [`unbroken`]).
//!
//! **TCG, not KVM.** On the nested hypervisor of the development machines this kernel
//! does not boot in useful time under KVM: with every CPU model tried (`qemu64`,
//! `kvm64`, `Nehalem`, `EPYC`, `EPYC-Rome`) the compressed kernel's decompressor prints
//! nothing for 60 s; the uncompressed kernel booted through PVH takes 25 s to reach
//! "Memory:" early in boot, and has not reached init after 100 s (`-mem-prealloc` changes
//! nothing). Under TCG it prints its first heartbeat 2.6 s after QEMU starts. So
//! [`linux_accel`] is TCG unless `VMOTION_LINUX_ACCEL=kvm`.

use std::env;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::process::{Accel, QemuConfig};

/// The kernel and initramfs `scripts/linux-guest.sh` writes.
#[derive(Clone, Debug)]
pub struct LinuxGuest {
    /// The kernel (`vmlinuz`, a bzImage).
    pub kernel: PathBuf,
    /// The initramfs (`initramfs.cpio.gz`).
    pub initrd: PathBuf,
}

/// The folder the workspace's tests use: `VMOTION_LINUX_GUEST` when set, else
/// `target/linux-guest` in the workspace (where `scripts/test.sh` builds it).
pub fn default_dir() -> PathBuf {
    match env::var_os("VMOTION_LINUX_GUEST").filter(|p| !p.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/linux-guest"),
    }
}

/// The accelerator for the Linux guest: TCG (see the module's notes), or KVM with
/// `VMOTION_LINUX_ACCEL=kvm`.
pub fn linux_accel() -> Accel {
    match env::var("VMOTION_LINUX_ACCEL").as_deref() {
        Ok("kvm") => Accel::Kvm,
        _ => Accel::Tcg,
    }
}

impl LinuxGuest {
    /// The guest in `dir`, or why there is none (a test skips with that reason).
    pub fn in_dir(dir: &Path) -> Result<Self, String> {
        let guest = Self {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.cpio.gz"),
        };
        for f in [&guest.kernel, &guest.initrd] {
            if !f.is_file() {
                return Err(format!(
                    "no Linux guest: {} is missing (scripts/linux-guest.sh builds it; \
                     scripts/test.sh runs it)",
                    f.display()
                ));
            }
        }
        Ok(guest)
    }

    /// A QEMU configuration that boots this guest with `memory_mib` of RAM in
    /// `mem_path`, its serial console in `<run_dir>/<name>.serial`, rewriting
    /// `dirty_mib` MiB with `pause_ms` between passes. The same configuration with
    /// `incoming` set is its migration destination.
    pub fn config(
        &self,
        name: &str,
        run_dir: &Path,
        memory_mib: u64,
        mem_path: &Path,
        dirty: (u64, u64),
    ) -> QemuConfig {
        let (dirty_mib, pause_ms) = dirty;
        let mut c = QemuConfig::new(name, run_dir, memory_mib, mem_path, &self.kernel);
        c.initrd = Some(self.initrd.clone());
        c.append = Some(format!(
            "console=ttyS0 quiet panic=-1 vmotion.dirty_mib={dirty_mib} \
             vmotion.dirty_pause_ms={pause_ms}"
        ));
        c.serial_log = Some(run_dir.join(format!("{name}.serial")));
        c.accel = linux_accel();
        c
    }
}

/// A serial log's bytes; a log not written yet is empty.
fn read_log(serial_log: &Path) -> io::Result<String> {
    match fs::read(serial_log) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e),
    }
}

/// The heartbeat counters in a serial log, in order (a line cut by a migration is
/// skipped: it carries no whole counter).
pub fn heartbeats(serial_log: &Path) -> io::Result<Vec<u64>> {
    Ok(counters(&read_log(serial_log)?))
}

fn counters(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("vmotion-heartbeat "))
        .filter_map(|rest| {
            let mut parts = rest.split(' ');
            let n = parts.next()?.parse().ok()?;
            parts.next()?.parse::<f64>().ok()?;
            Some(n)
        })
        .collect()
}

/// Whether the guest's serial logs, read in the order it ran on their hosts, count on
/// without a gap or a step back; `Ok` holds the last counter, `Err` names the first
/// break. A line cut in two by a migration (its start in one log, its end in the next)
/// is joined, as the guest wrote it.
pub fn unbroken(logs: &[PathBuf]) -> io::Result<Result<u64, String>> {
    let mut all = String::new();
    for log in logs {
        all.push_str(&read_log(log)?);
    }
    let counts = counters(&all);
    let Some(&last) = counts.last() else {
        return Ok(Err("no heartbeat at all".into()));
    };
    for pair in counts.windows(2) {
        if pair[1] != pair[0] + 1 {
            return Ok(Err(format!(
                "heartbeat {} followed by {}",
                pair[0], pair[1]
            )));
        }
    }
    Ok(Ok(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_cut_by_a_migration_is_joined_and_a_gap_is_named() {
        let dir = tempfile_dir();
        let (a, b) = (dir.join("a.serial"), dir.join("b.serial"));
        fs::write(&a, "boot\nvmotion-heartbeat 7 1.00\nvmotion-heartbeat 8 1.").unwrap();
        fs::write(&b, "10\nvmotion-heartbeat 9 1.20\n").unwrap();
        assert_eq!(unbroken(&[a.clone(), b.clone()]).unwrap(), Ok(9));
        fs::write(&b, "10\nvmotion-heartbeat 10 1.20\n").unwrap();
        assert_eq!(
            unbroken(&[a, b]).unwrap(),
            Err("heartbeat 8 followed by 10".into())
        );
        fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = env::temp_dir().join(format!("vmotion-linux-test-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }
}
