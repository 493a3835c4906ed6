//! Guest memory in a file (for example one under `/dev/shm` that a VMM maps), read and
//! written with positioned I/O. A file has no dirty log, so it migrates cold: the
//! engine pauses first (the file must not change from then on) and copies it once.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{DirtyTracking, GuestMemory, MoverError, Sink, Source, VmControl, check_range};

/// A memory file. Clones share the open file.
#[derive(Debug, Clone)]
pub struct MemoryFile {
    file: Arc<File>,
    path: PathBuf,
    page_size: u64,
    pages: u64,
    /// A device state loaded into this file as a sink (kept for whoever runs the VM).
    device_state: Vec<u8>,
}

impl MemoryFile {
    /// Opens an existing file as guest memory; its length must be a whole number of pages.
    pub fn open(path: &Path, page_size: u64) -> Result<Self, MoverError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let len = file.metadata()?.len();
        if !page_size.is_power_of_two() || !len.is_multiple_of(page_size) {
            return Err(MoverError::State(
                "the memory file's length is not a whole number of pages",
            ));
        }
        Ok(Self {
            file: Arc::new(file),
            path: path.to_owned(),
            page_size,
            pages: len / page_size,
            device_state: Vec::new(),
        })
    }

    /// Creates (or truncates) a file of `pages` zero pages: a destination sink. The file is
    /// sized at once, so the destination has room for the whole guest before a page
    /// arrives.
    pub fn create(path: &Path, pages: u64, page_size: u64) -> Result<Self, MoverError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let len = pages
            .checked_mul(page_size)
            .ok_or(MoverError::State("the guest's size overflows"))?;
        file.set_len(len)?;
        Ok(Self {
            file: Arc::new(file),
            path: path.to_owned(),
            page_size,
            pages,
            device_state: Vec::new(),
        })
    }
}

impl MemoryFile {
    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device state loaded into this file as a sink (empty if none).
    pub fn device_state(&self) -> &[u8] {
        &self.device_state
    }
}

impl GuestMemory for MemoryFile {
    fn page_size(&self) -> u64 {
        self.page_size
    }

    fn page_count(&self) -> u64 {
        self.pages
    }

    fn read_pages(&self, first: u64, out: &mut [u8]) -> Result<(), MoverError> {
        check_range(first, out.len(), self.page_size, self.pages)?;
        Ok(self.file.read_exact_at(out, first * self.page_size)?)
    }

    fn write_pages(&self, first: u64, data: &[u8]) -> Result<(), MoverError> {
        check_range(first, data.len(), self.page_size, self.pages)?;
        Ok(self.file.write_all_at(data, first * self.page_size)?)
    }
}

impl VmControl for MemoryFile {
    // A file runs nothing: pausing, resuming and throttling have nothing to stop, and its
    // own device state is empty. These are real answers, not defaults.
    fn pause(&mut self) -> Result<(), MoverError> {
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MoverError> {
        Ok(())
    }

    fn throttle(&mut self, _percent: u8) -> Result<(), MoverError> {
        Ok(())
    }

    fn save_device_state(&mut self) -> Result<Vec<u8>, MoverError> {
        Ok(Vec::new())
    }

    fn load_device_state(&mut self, state: &[u8]) -> Result<(), MoverError> {
        // A file cannot run a VM: it keeps the state for the VMM that will
        // ([`MemoryFile::device_state`]).
        self.device_state = state.to_vec();
        Ok(())
    }
}

impl Source for MemoryFile {
    fn memory(&self) -> Arc<dyn GuestMemory> {
        Arc::new(self.clone())
    }

    fn dirty_tracking(&mut self) -> DirtyTracking<'_> {
        DirtyTracking::Unsupported {
            reason: "a memory file has no dirty log; it migrates cold (paused, one pass)",
        }
    }

    fn control(&mut self) -> &mut dyn VmControl {
        self
    }
}

impl Sink for MemoryFile {
    fn memory(&self) -> Arc<dyn GuestMemory> {
        Source::memory(self)
    }

    fn control(&mut self) -> &mut dyn VmControl {
        self
    }

    /// The memory reaches the disk; the device state stays in this value (a caller that
    /// must survive a restart writes it beside the file: `vmotion-recv` does).
    fn persist(&mut self) -> Result<(), MoverError> {
        self.file.sync_all()?;
        Ok(())
    }

    fn discard(&mut self) -> Result<(), MoverError> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}
