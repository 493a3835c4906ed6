//! # vmotion-mover: what a VM mover implements, and the movers in this repo
//!
//! A mover — a Rust VMM, a QEMU wrapper, a CRIU-like tool — gives vmotion three things:
//!
//! - [`GuestMemory`]: page size, page count, read and write whole pages;
//! - [`DirtyLog`]: start, fetch-and-clear, stop — or, explicitly, none
//!   ([`DirtyTracking::Unsupported`]), which gets a single-pass cold migration;
//! - [`VmControl`]: pause, resume, throttle, save and load the device state.
//!
//! No method has a default no-op body: a mover states what it can do.
//!
//! Movers here: [`synthetic::SyntheticGuest`] (memory plus writer threads with a set
//! dirty rate and pattern, exact dirty tracking; for tests and benchmarks) and
//! [`memfile::MemoryFile`] (guest memory in a file such as one under `/dev/shm`, read and
//! written with positioned I/O; no dirty log, so cold migration).

#![forbid(unsafe_code)]

pub mod memfile;
pub mod synthetic;

use vmotion_engine::DirtyBitmap;

/// A mover failed.
#[derive(Debug, thiserror::Error)]
pub enum MoverError {
    /// A page range outside guest memory, or a buffer of the wrong length (a caller bug).
    #[error(
        "pages {first}..{end} with a {len}-byte buffer do not fit guest memory of {pages} pages"
    )]
    OutOfRange {
        /// First page.
        first: u64,
        /// One past the last page.
        end: u64,
        /// Buffer length.
        len: usize,
        /// Pages of guest memory.
        pages: u64,
    },
    /// The mover's backing store failed.
    #[error("guest memory I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The device state does not belong to this VM or is malformed.
    #[error("device state rejected: {0}")]
    DeviceState(String),
    /// The VM is not in a state that allows this (e.g. resume while running).
    #[error("{0}")]
    State(&'static str),
}

/// Guest memory, page-granular.
pub trait GuestMemory: Send + Sync {
    /// Page size in bytes (a power of two, 4 KiB to 64 KiB).
    fn page_size(&self) -> u64;
    /// Number of pages.
    fn page_count(&self) -> u64;
    /// Copies the pages starting at `first` into `out`, whose length is a whole number of
    /// pages.
    fn read_pages(&self, first: u64, out: &mut [u8]) -> Result<(), MoverError>;
    /// Writes `data` (a whole number of pages) starting at page `first`.
    fn write_pages(&self, first: u64, data: &[u8]) -> Result<(), MoverError>;
}

/// A mover's dirty-page tracking.
pub trait DirtyLog: Send {
    /// Starts tracking: from now on every written page is reported.
    fn start(&mut self) -> Result<(), MoverError>;
    /// The pages written since the last call (or since `start`), and clears them. Exact
    /// or conservative: a page written before this returns is either in this bitmap or in
    /// the next one, never lost.
    fn fetch_and_clear(&mut self) -> Result<DirtyBitmap, MoverError>;
    /// Stops tracking.
    fn stop(&mut self) -> Result<(), MoverError>;
}

/// Whether a mover tracks dirty pages.
pub enum DirtyTracking<'a> {
    /// It does: live migration.
    Supported(&'a mut dyn DirtyLog),
    /// It cannot: a single-pass cold migration, for this reason (shown to the operator).
    Unsupported {
        /// Why.
        reason: &'static str,
    },
}

/// Running, pausing and describing the VM.
pub trait VmControl: Send {
    /// Stops the guest; when this returns no vCPU (or writer) runs or will write memory.
    fn pause(&mut self) -> Result<(), MoverError>;
    /// Runs the guest again.
    fn resume(&mut self) -> Result<(), MoverError>;
    /// Takes this share of the guest's CPU time away (0 = none, at most 99).
    fn throttle(&mut self, percent: u8) -> Result<(), MoverError>;
    /// The device state (vCPU registers and whatever else the guest needs), while paused.
    fn save_device_state(&mut self) -> Result<Vec<u8>, MoverError>;
    /// Loads a device state saved by the source's mover.
    fn load_device_state(&mut self, state: &[u8]) -> Result<(), MoverError>;
}

/// Everything the source side needs from a mover.
pub trait Source: Send {
    /// Guest memory, shared with the driver's stream tasks (which read pages while the
    /// control loop drives the VM).
    fn memory(&self) -> std::sync::Arc<dyn GuestMemory>;
    /// Dirty tracking, or why there is none.
    fn dirty_tracking(&mut self) -> DirtyTracking<'_>;
    /// VM control.
    fn control(&mut self) -> &mut dyn VmControl;
    /// What its device state describes, announced in the `Hello` so that a destination
    /// that cannot run it refuses before the pause.
    fn device_model(&self) -> vmotion_proto::DeviceModel {
        vmotion_proto::DeviceModel::Unspecified
    }
}

/// Everything the destination side needs from a mover: where an incoming guest goes.
///
/// The receiver writes pages into [`memory`](Self::memory) as they arrive, loads the
/// device state through [`control`](Self::control), calls [`persist`](Self::persist)
/// before it answers `Ready`, and then exactly one of `control().resume()` (its claim on
/// the VM won) or [`discard`](Self::discard) (the source keeps the VM) — or neither,
/// when nothing could be settled: then the sink is handed back paused, and it may be
/// the only copy allowed to run.
pub trait Sink: Send {
    /// Guest memory, shared with the driver's stream tasks.
    fn memory(&self) -> std::sync::Arc<dyn GuestMemory>;
    /// Loads the device state and resumes the VM once its claim won.
    fn control(&mut self) -> &mut dyn VmControl;
    /// Makes the verified guest (memory and device state) survive a crash of this
    /// process, where the sink can (files: written and fsynced); a sink held only in
    /// memory has nothing to do. Called before `Ready`: a failure aborts the migration.
    fn persist(&mut self) -> Result<(), MoverError>;
    /// The source keeps the VM: remove what was received (files deleted), so nothing is
    /// left to be mistaken for a guest.
    fn discard(&mut self) -> Result<(), MoverError>;
}

/// Checks a page-range request against guest memory.
pub(crate) fn check_range(
    first: u64,
    len: usize,
    page_size: u64,
    pages: u64,
) -> Result<(), MoverError> {
    let bad = || MoverError::OutOfRange {
        first,
        end: first.saturating_add(len as u64 / page_size.max(1)),
        len,
        pages,
    };
    if page_size == 0 || !(len as u64).is_multiple_of(page_size) {
        return Err(bad());
    }
    let end = first.checked_add(len as u64 / page_size).ok_or_else(bad)?;
    if end > pages {
        return Err(bad());
    }
    Ok(())
}
