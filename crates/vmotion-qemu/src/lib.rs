//! # vmotion-qemu: real QEMU for vmotion's tunnel tests and benchmarks
//!
//! Synchronous helpers (std only, no async runtime) that start `qemu-system-x86_64`,
//! talk QMP to it, boot tiny guests and inspect guest memory from the host:
//!
//! - [`Qemu`] spawns one QEMU from a [`QemuConfig`]: a `pc` machine whose RAM is a
//!   `memory-backend-file` with `share=on`, so the host reads guest memory by reading the
//!   file (file offset = guest-physical address below 4 GiB). Stderr goes to
//!   `<run_dir>/<name>.log`; errors quote its tail. Dropping a [`Qemu`] kills and reaps it.
//! - [`Qmp`] is a blocking QMP client with timeouts and the migration commands.
//! - [`guest`] holds two Multiboot images QEMU boots with `-kernel`: [`idle_guest`]
//!   (halts; memory never changes after boot) and [`dirty_guest`] (rewrites a region at a
//!   pace set in bytes per second, timed with the PIT).
//! - [`linux`] boots a real Linux guest (Debian's cloud kernel and busybox, from
//!   `scripts/linux-guest.sh`) whose serial heartbeat shows it running on across
//!   migrations; it runs under TCG here (see the module).
//! - [`memfile`] fills, creates and compares memory files.
//! - [`write_tls_creds`] writes a `tls-creds-x509` directory for TLS migrations.
//!
//! A QEMU-to-QEMU migration, the way the integration tests drive it:
//!
//! ```text
//! test                      source QEMU                     destination QEMU (-incoming defer)
//!  |-- spawn, wait_started -->|                                |
//!  |-- migrate-incoming uri ------------------------------------>| listens on uri
//!  |-- migrate uri ---------->|=== RAM, then device state =====>|
//!  |-- query-migrate (poll) ->| completed, postmigrate           | running
//!  |-- stop ------------------------------------------------------>| paused
//!  |-- memfile::first_difference(src mem, dst mem) == None
//! ```
//!
//! ```no_run
//! use std::time::Duration;
//! use vmotion_qemu::{Qemu, QemuConfig, idle_guest, memfile};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let run = std::path::Path::new("/tmp/run");
//! std::fs::create_dir_all(run)?;
//! std::fs::write(run.join("idle.bin"), idle_guest())?;
//! memfile::fill_random(&run.join("src.mem"), 256 << 20, 1)?;
//! memfile::create_zeroed(&run.join("dst.mem"), 256 << 20)?;
//!
//! let mut src = Qemu::spawn(QemuConfig::new("src", run, 256, run.join("src.mem"), run.join("idle.bin")))?;
//! let mut dst_config = QemuConfig::new("dst", run, 256, run.join("dst.mem"), run.join("idle.bin"));
//! dst_config.incoming = Some("defer".into());
//! let mut dst = Qemu::spawn(dst_config)?;
//! src.wait_started(Duration::from_secs(30))?;
//!
//! dst.qmp().migrate_incoming("unix:/tmp/run/migration.sock")?;
//! src.qmp().migrate("unix:/tmp/run/migration.sock")?;
//! let done = src.qmp().wait_migration(Duration::from_secs(60))?;
//! assert_eq!(done["status"], "completed");
//! dst.qmp().wait_status("running", Duration::from_secs(10))?;
//! dst.qmp().stop()?;
//! assert_eq!(memfile::first_difference(&run.join("src.mem"), &run.join("dst.mem"))?, None);
//! # Ok(())
//! # }
//! ```
//!
//! Integration tests skip, saying why, where [`qemu_binary`] finds nothing. [`Accel`]
//! picks KVM when `/dev/kvm` opens read-write, TCG otherwise (`VMOTION_QEMU_ACCEL`
//! overrides).
//!
//! ## QEMU 10 behaviour these helpers account for
//!
//! - On the nested hypervisor of the development machines KVM *emulates* a guest that
//!   runs without paging (SeaBIOS, and these guests): booting takes about 3 s under KVM
//!   against 0.06 s under TCG, and an unpaced [`dirty_guest`] writes about 260,000
//!   pages/s under KVM against 2.5 million under TCG. `-cpu host` crashes there; the CPU
//!   is `qemu64` (QEMU warns under KVM that the host lacks `pni`: harmless).
//! - SeaBIOS turns kvmclock on and never off, and KVM then rewrites a pvclock structure
//!   in guest RAM: after a migration the destination's memory would differ from the
//!   source's. [`QemuConfig::args`] turns kvmclock off.
//! - SeaBIOS zeroes about 200 pages while booting (most of `0x7000..0x90000` and
//!   `0xc3000..0xe8000`, and the top 116 KiB of RAM), whatever the memory file held.
//! - Migration is capped at 128 MiB/s unless `max-bandwidth` is raised
//!   ([`Qmp::set_parameters`]); `MIGRATION` events need the `events` capability.
//! - A destination whose incoming migration fails exits ("load of migration failed").
//! - TLS: see [`write_tls_creds`] for the host names QEMU checks.

#![forbid(unsafe_code)]

mod error;
pub mod guest;
pub mod linux;
pub mod memfile;
mod process;
mod qmp;
mod tls;

pub use error::{Error, Result};
pub use guest::{dirty_guest, idle_guest};
pub use linux::LinuxGuest;
pub use memfile::{create_zeroed, fill_random, first_difference, zero_pages};
pub use process::{Accel, DEFAULT_CPU, Qemu, QemuConfig, kvm_usable, qemu_binary};
pub use qmp::Qmp;
pub use tls::write_tls_creds;
