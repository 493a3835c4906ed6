//! # vmotion-vmm: a KVM micro-VM that vmotion migrates for real
//!
//! One vCPU started directly in 32-bit protected mode (flat segments, paging off, no
//! firmware, no kernel) runs a built-in guest program (`guest/heartbeat.S`) that writes
//! over its memory at a configurable rate and pattern and keeps a heartbeat: a write
//! counter it reports on an I/O port after every batch, and on request a checksum of its
//! memory computed by the guest itself.
//!
//! As a migration **source** ([`vmotion_mover::Source`]) it offers its memory, the KVM
//! dirty log (`KVM_MEM_LOG_DIRTY_PAGES`, `KVM_GET_DIRTY_LOG`: the bitmap, not the dirty
//! ring, which stalls guests on the nested hypervisor of these machines), pause and resume
//! by parking the vCPU thread, throttling by making the vCPU sleep a share of its time, and
//! the vCPU registers and special registers as device state. As a **sink**
//! ([`MicroVm::incoming`]) it builds the same VM, paused, takes memory from the stream,
//! loads the vCPU state, and runs only when resumed (on `Commit`).
//!
//! The only crate of vmotion with `unsafe`: mapping guest memory, registering it with
//! KVM, and copying pages in and out while the guest runs. Each block says why it holds.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod guest;
mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmotion_engine::DirtyBitmap;
use vmotion_mover::{DirtyLog, DirtyTracking, GuestMemory, MoverError, Source, VmControl};

use crate::guest::{CODE_ADDR, FIRST_DATA_PAGE, PORT_CHECKSUM, PORT_HEARTBEAT, param};
use crate::state::VcpuState;

/// Page size of the micro-VM (and of KVM's dirty log on x86).
pub const PAGE_SIZE: u64 = 4096;
/// Largest guest: the program runs with 32-bit addresses and paging off.
pub const MAX_MEMORY_MIB: u64 = 3072;

/// What went wrong with the micro-VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` is missing or cannot be opened.
    #[error("KVM is not available here ({0}): /dev/kvm is needed for the micro-VM")]
    NoKvm(kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// A bad configuration.
    #[error("micro-VM configuration: {0}")]
    Config(String),
    /// Guest memory could not be mapped.
    #[error("mapping guest memory: {0}")]
    Memory(std::io::Error),
    /// The vCPU state from the stream is not one this VM can load.
    #[error("vCPU state: {0}")]
    DeviceState(String),
    /// The vCPU stopped (an unexpected exit or a failed KVM call).
    #[error("the vCPU stopped: {0}")]
    Vcpu(String),
}

impl From<VmmError> for MoverError {
    fn from(e: VmmError) -> Self {
        match e {
            VmmError::DeviceState(s) => Self::DeviceState(s),
            other => Self::Io(std::io::Error::other(other.to_string())),
        }
    }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// Which pages the guest writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Pseudo-random pages over the whole data region.
    Random,
    /// Page after page, wrapping at the end.
    Sequential,
    /// Pseudo-random pages among the first `pages` of the data region.
    HotSet {
        /// Size of the hot set, in pages.
        pages: u64,
    },
}

/// How to build a running micro-VM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroVmConfig {
    /// Guest memory in MiB (1 to [`MAX_MEMORY_MIB`]).
    pub memory_mib: u64,
    /// Page writes per second (0 = as fast as the vCPU goes).
    pub rate: f64,
    /// Which pages.
    pub pattern: Pattern,
    /// Writes between heartbeats (1 to 65536).
    pub batch: u32,
    /// Seed of the page generator.
    pub seed: u32,
    /// Fill the data region with pseudo-random bytes before boot (a guest whose memory
    /// is in use, not mostly zero pages).
    pub prefill: bool,
}

impl Default for MicroVmConfig {
    fn default() -> Self {
        Self {
            memory_mib: 256,
            rate: 10_000.0,
            pattern: Pattern::Random,
            batch: 64,
            seed: 1,
            prefill: false,
        }
    }
}

/// Guest memory: an anonymous private mapping registered with KVM as slot 0.
struct GuestRam {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this struct for its whole life; access
// goes through raw-pointer copies (never references), so sharing it between threads
// adds no aliasing beyond what the running guest does anyway.
unsafe impl Send for GuestRam {}
// SAFETY: as for Send: no `&`/`&mut` to the memory is ever handed out.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    fn new(len: usize) -> Result<Self, VmmError> {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks; the arguments
        // are valid and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VmmError::Memory(std::io::Error::last_os_error()));
        }
        // Transparent huge pages where the host allows them (as QEMU asks for its guest
        // RAM): a first touch then faults in 2 MiB, not 4 KiB. A destination's memory is
        // first written as the pages arrive, and each 4 KiB fault costs microseconds on a
        // nested host; with huge pages the faults of a 1 GiB guest drop from 262,144 to
        // 512. Advice only: where THP is off it is ignored, and so is a failure.
        // SAFETY: the range is the mapping just made; MADV_HUGEPAGE changes no content and
        // no access rights.
        let _ = unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Copies `out.len()` bytes from guest-physical `addr`.
    fn read(&self, addr: usize, out: &mut [u8]) {
        assert!(addr.checked_add(out.len()).is_some_and(|e| e <= self.len));
        // SAFETY: the range is inside the mapping (checked above) and `out` is a distinct
        // host buffer. The guest may write the same bytes concurrently; a torn page is
        // what the dirty log exists for (it is sent again), as in every VMM.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(addr), out.as_mut_ptr(), out.len()) }
    }

    /// Copies `data` to guest-physical `addr`.
    fn write(&self, addr: usize, data: &[u8]) {
        assert!(addr.checked_add(data.len()).is_some_and(|e| e <= self.len));
        // SAFETY: the range is inside the mapping (checked above); `data` is a distinct
        // host buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(addr), data.len()) }
    }

    fn write_u32(&self, addr: usize, v: u32) {
        self.write(addr, &v.to_le_bytes());
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`. Only dropped once every
        // holder is gone; the VM (and its vCPU thread) hold an `Arc` to it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A handle on the micro-VM's memory for the migration driver.
#[derive(Clone)]
pub struct MicroVmMemory(Arc<GuestRam>);

impl MicroVmMemory {
    fn check(&self, first: u64, len: usize) -> Result<usize, MoverError> {
        let pages = self.0.len as u64 / PAGE_SIZE;
        let bad = || MoverError::OutOfRange {
            first,
            end: first.saturating_add(len as u64 / PAGE_SIZE),
            len,
            pages,
        };
        if !(len as u64).is_multiple_of(PAGE_SIZE) {
            return Err(bad());
        }
        let end = first.checked_add(len as u64 / PAGE_SIZE).ok_or_else(bad)?;
        if end > pages {
            return Err(bad());
        }
        Ok((first * PAGE_SIZE) as usize)
    }
}

impl GuestMemory for MicroVmMemory {
    fn page_size(&self) -> u64 {
        PAGE_SIZE
    }

    fn page_count(&self) -> u64 {
        self.0.len as u64 / PAGE_SIZE
    }

    fn read_pages(&self, first: u64, out: &mut [u8]) -> Result<(), MoverError> {
        let addr = self.check(first, out.len())?;
        self.0.read(addr, out);
        Ok(())
    }

    fn write_pages(&self, first: u64, data: &[u8]) -> Result<(), MoverError> {
        let addr = self.check(first, data.len())?;
        self.0.write(addr, data);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct Ctl {
    want: Want,
    paused: bool,
    throttle: u8,
    rate: f64,
    batch: u32,
    /// State to load before the vCPU next runs (the destination's).
    load: Option<VcpuState>,
    /// State saved at the last pause (the source's).
    saved: Option<VcpuState>,
    failed: Option<String>,
    /// Ask the guest for its checksum first thing when it next resumes from loaded state.
    checksum_on_resume: bool,
}

struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    heartbeat: AtomicU64,
    beats: AtomicU64,
    first_beat: Mutex<Option<u32>>,
    checksums: Mutex<Vec<u32>>,
    /// [`digest`] of all memory when the vCPU resumed from loaded state (with
    /// `checksum_on_resume`): what the guest woke up with, every byte.
    digest_at_resume: Mutex<Option<u64>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A KVM micro-VM with one vCPU running the built-in guest program.
pub struct MicroVm {
    // Field order is drop order: the vCPU thread is joined in `Drop::drop`, then the VM
    // goes before its memory is unmapped.
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    vm: VmFd,
    ram: Arc<GuestRam>,
    _kvm: Kvm,
}

impl std::fmt::Debug for MicroVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVm")
            .field("memory_bytes", &self.ram.len)
            .field("heartbeat", &self.heartbeat())
            .finish_non_exhaustive()
    }
}

/// A flat 4 GiB segment (base 0, granularity 4 KiB, 32-bit) of `type_` at `selector`.
pub(crate) fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The signal that kicks the vCPU thread out of `KVM_RUN` (KVM returns EINTR).
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the do-nothing handler for [`kick_signal`] once per process.
fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed `sigaction` is a valid value to fill in; the handler does
        // nothing, so it is async-signal-safe; no SA_RESTART, so KVM_RUN returns EINTR.
        // The signal is a real-time one this crate uses for nothing else.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// Interrupts the vCPU thread if it is inside `KVM_RUN`.
fn kick(thread: &JoinHandle<()>) {
    use std::os::unix::thread::JoinHandleExt;
    if thread.is_finished() {
        return;
    }
    // SAFETY: the thread has not been joined (we hold its handle), so its pthread_t is
    // valid; the signal's handler is installed before the thread starts.
    unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
}

/// A workload rate the pacing arithmetic handles: 0 (unpaced) or 10^-3 to 10^12.
pub(crate) fn valid_rate(rate: f64) -> bool {
    rate == 0.0 || (1e-3..=1e12).contains(&rate)
}

/// Whether this machine can run the micro-VM; the reason when it cannot.
pub fn kvm_available() -> Result<(), String> {
    Kvm::new()
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm cannot be opened: {e}"))
}

impl MicroVm {
    /// Boots a running micro-VM: the program and its parameters in memory, the vCPU in
    /// protected mode at the program's first instruction.
    pub fn start(config: MicroVmConfig) -> Result<Self, VmmError> {
        let (vm, vcpu) = Self::build(config.memory_mib)?;
        let pages = vm.ram.len as u64 / PAGE_SIZE;
        if !(1..=65536).contains(&config.batch) {
            return Err(VmmError::Config("batch must be 1 to 65536".into()));
        }
        if !valid_rate(config.rate) {
            return Err(VmmError::Config(
                "rate must be 0 (unpaced) or 0.001 to 10^12 writes per second".into(),
            ));
        }
        let data_pages = pages - FIRST_DATA_PAGE;
        let (written_pages, sequential) = match config.pattern {
            Pattern::Random => (data_pages, false),
            Pattern::Sequential => (data_pages, true),
            Pattern::HotSet { pages: 0 } => {
                return Err(VmmError::Config("a hot set needs at least one page".into()));
            }
            Pattern::HotSet { pages } => (pages.min(data_pages), false),
        };
        let ram = &vm.ram;
        ram.write(CODE_ADDR as usize, &guest::PROGRAM);
        ram.write_u32(param::FIRST_DATA_PAGE, FIRST_DATA_PAGE as u32);
        ram.write_u32(param::DATA_PAGES, written_pages as u32);
        ram.write_u32(param::BATCH, config.batch);
        ram.write_u32(param::PATTERN, u32::from(sequential));
        ram.write_u32(param::COMMAND, 0);
        if config.prefill {
            let mut x = u64::from(config.seed) | 1 << 32;
            let mut chunk = vec![0u8; 1 << 20];
            let start = (FIRST_DATA_PAGE * PAGE_SIZE) as usize;
            for at in (start..ram.len).step_by(chunk.len()) {
                for w in chunk.chunks_exact_mut(8) {
                    // xorshift64: fast, and no page comes out all zero.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
                let n = chunk.len().min(ram.len - at);
                ram.write(at, &chunk[..n]);
            }
        }

        let mut sregs = vcpu.get_sregs().map_err(kvm("get_sregs"))?;
        sregs.cs = flat_segment(0x8, 0xb);
        let data = flat_segment(0x10, 0x3);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.cr0 |= 1; // protected mode, paging off
        let regs = kvm_regs {
            rip: CODE_ADDR,
            rflags: 0x2,
            rbx: u64::from(config.seed),
            ..Default::default()
        };
        {
            let mut c = vm.shared.lock();
            c.rate = config.rate;
            c.batch = config.batch;
            c.load = Some(VcpuState {
                regs,
                sregs,
                rate: config.rate,
            });
        }
        let mut vm = vm;
        vm.spawn(vcpu)?;
        vm.resume_vcpu()?;
        Ok(vm)
    }

    /// A destination micro-VM for a guest of `memory_bytes`: memory blank, the vCPU
    /// paused until device state is loaded and the VM resumed.
    pub fn incoming(memory_bytes: u64) -> Result<Self, VmmError> {
        if !memory_bytes.is_multiple_of(1 << 20) {
            return Err(VmmError::Config(
                "guest memory must be a whole number of MiB".into(),
            ));
        }
        let (mut vm, vcpu) = Self::build(memory_bytes >> 20)?;
        vm.spawn(vcpu)?;
        Ok(vm)
    }

    fn build(memory_mib: u64) -> Result<(Self, VcpuFd), VmmError> {
        if !(1..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(VmmError::Config(format!(
                "memory must be 1 to {MAX_MEMORY_MIB} MiB, not {memory_mib}"
            )));
        }
        let kvm_ = Kvm::new().map_err(VmmError::NoKvm)?;
        // Mapped before the VM exists, so on an early return it is unmapped after the VM.
        let len = (memory_mib << 20) as usize;
        let ram = Arc::new(GuestRam::new(len)?);
        let vm = kvm_.create_vm().map_err(kvm("create_vm"))?;
        // Needed on Intel before the first vCPU runs; above the guest's memory.
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm("set_tss_address"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: len as u64,
            userspace_addr: ram.ptr as u64,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
        };
        // SAFETY: the region is our live mapping of exactly `len` bytes, and it outlives
        // the VM: `MicroVm` drops `vm` before `ram` (field order), the vCPU thread, which
        // holds its own `Arc`, is joined in `Drop` before either goes, and memory handles
        // given out hold further `Arc`s, so the mapping is never unmapped under KVM.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm("set_user_memory_region"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm("create_vcpu"))?;
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                want: Want::Pause,
                paused: true,
                throttle: 0,
                rate: 0.0,
                batch: 64,
                load: None,
                saved: None,
                failed: None,
                checksum_on_resume: false,
            }),
            cv: Condvar::new(),
            heartbeat: AtomicU64::new(0),
            beats: AtomicU64::new(0),
            first_beat: Mutex::new(None),
            digest_at_resume: Mutex::new(None),
            checksums: Mutex::new(Vec::new()),
        });
        Ok((
            Self {
                thread: None,
                shared,
                vm,
                ram,
                _kvm: kvm_,
            },
            vcpu,
        ))
    }

    fn spawn(&mut self, vcpu: VcpuFd) -> Result<(), VmmError> {
        install_kick_handler();
        let (shared, ram) = (self.shared.clone(), self.ram.clone());
        let t = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || vcpu_thread(vcpu, &shared, &ram))
            .map_err(|e| VmmError::Vcpu(e.to_string()))?;
        self.thread = Some(t);
        Ok(())
    }

    fn resume_vcpu(&self) -> Result<(), VmmError> {
        let mut c = self.shared.lock();
        if let Some(f) = &c.failed {
            return Err(VmmError::Vcpu(f.clone()));
        }
        // A paused vCPU runs on from its saved state or a loaded one; a running one
        // simply keeps running.
        if c.paused && c.saved.is_none() && c.load.is_none() {
            return Err(VmmError::Vcpu(
                "no vCPU state to run from (load the device state first)".into(),
            ));
        }
        c.want = Want::Run;
        self.shared.cv.notify_all();
        Ok(())
    }

    /// The guest's write counter at its last heartbeat.
    pub fn heartbeat(&self) -> u32 {
        self.shared.heartbeat.load(Ordering::Acquire) as u32
    }

    /// The first heartbeat this VMM received (on a destination: the guest's first batch
    /// after the migration).
    pub fn first_heartbeat(&self) -> Option<u32> {
        *self
            .shared
            .first_beat
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// On a destination: have the guest checksum its memory, as received, before it
    /// writes anything after the resume (see [`MicroVm::wait_checksum`]).
    pub fn checksum_on_resume(&self) {
        self.shared.lock().checksum_on_resume = true;
    }

    /// Heartbeats received by this VMM.
    pub fn beats(&self) -> u64 {
        self.shared.beats.load(Ordering::Acquire)
    }

    /// Whether the vCPU is parked.
    pub fn is_paused(&self) -> bool {
        self.shared.lock().paused
    }

    /// Waits until `n` heartbeats arrived here, or `timeout`; `false` on timeout.
    pub fn wait_beats(&self, n: u64, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while self.beats() < n {
            if Instant::now() > end || self.shared.lock().failed.is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Asks the guest to checksum its data region the next time it checks its command
    /// word: right after the current batch, or, on a paused VM, first thing on resume.
    pub fn request_checksum(&self) {
        self.ram.write_u32(param::COMMAND, 1);
    }

    /// Waits for the guest's checksum report.
    pub fn wait_checksum(&self, timeout: Duration) -> Option<u32> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(c) = self
                .shared
                .checksums
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop()
            {
                return Some(c);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A digest of every byte of guest memory now (on a paused VM: its memory at the
    /// pause).
    pub fn memory_digest(&self) -> u64 {
        digest(&self.ram)
    }

    /// On a destination with [`MicroVm::checksum_on_resume`]: the digest of every byte of
    /// memory the guest resumed with.
    pub fn memory_digest_at_resume(&self) -> Option<u64> {
        *self
            .shared
            .digest_at_resume
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The checksum the guest would compute of its data region now, computed here.
    pub fn host_checksum(&self) -> u32 {
        let mut memory = vec![0u8; self.ram.len];
        self.ram.read(0, &mut memory);
        // The region comes from the guest's own parameters: clamped to its memory.
        guest::checksum_of_guest(&memory)
    }

    /// The memory, for the migration driver.
    pub fn memory_handle(&self) -> MicroVmMemory {
        MicroVmMemory(self.ram.clone())
    }

    /// Why the vCPU stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().failed.clone()
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.shared.lock().want = Want::Stop;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            // A guest that never exits on its own would keep the thread in KVM_RUN.
            while !t.is_finished() {
                kick(&t);
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = t.join();
        }
    }
}

/// A digest of all of guest memory (FNV-style over 64-bit words, with the position mixed
/// in): equal memories give equal digests, and a moved, lost or changed word changes it.
fn digest(ram: &GuestRam) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut chunk = vec![0u8; 1 << 20];
    for at in (0..ram.len).step_by(chunk.len()) {
        let n = chunk.len().min(ram.len - at);
        ram.read(at, &mut chunk[..n]);
        for w in chunk[..n].chunks_exact(8) {
            let v = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(5);
        }
    }
    h
}

/// Sleeps `d` in short slices, returning early when the vCPU is asked to pause or stop.
fn sleep_unless_called(shared: &Shared, d: Duration) {
    let end = Instant::now() + d;
    loop {
        let now = Instant::now();
        if now >= end || shared.lock().want != Want::Run {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(2)));
    }
}

/// Completes any port I/O KVM is waiting to finish, then reads the vCPU's state.
fn save_state(vcpu: &mut VcpuFd, rate: f64) -> Result<VcpuState, VmmError> {
    // An `out` exit is finished by the next KVM_RUN; with immediate_exit set KVM finishes
    // it and returns at once (EINTR), so the registers read next are consistent.
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Err(e) if e.errno() == libc::EINTR => {}
        // Any exit here means an instruction ran: the state would be mid-flight.
        Ok(()) => {
            return Err(VmmError::Vcpu(
                "the vCPU exited while finishing its port I/O".into(),
            ));
        }
        Err(e) => return Err(kvm("run (immediate exit)")(e)),
    }
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(kvm("get_regs"))?,
        sregs: vcpu.get_sregs().map_err(kvm("get_sregs"))?,
        rate,
    })
}

fn load_state(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), VmmError> {
    vcpu.set_sregs(&s.sregs).map_err(kvm("set_sregs"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("set_regs"))
}

fn vcpu_thread(mut vcpu: VcpuFd, shared: &Shared, ram: &GuestRam) {
    let fail = |msg: String| {
        let mut c = shared.lock();
        c.failed = Some(msg);
        c.paused = true;
        shared.cv.notify_all();
    };
    let mut writes = 0u64;
    let mut pace_from = Instant::now();
    loop {
        let (rate, throttle, batch) = {
            let mut c = shared.lock();
            loop {
                match c.want {
                    Want::Stop => return,
                    Want::Pause => {
                        if !c.paused {
                            let rate = c.rate;
                            match save_state(&mut vcpu, rate) {
                                Ok(s) => c.saved = Some(s),
                                Err(e) => {
                                    drop(c);
                                    return fail(e.to_string());
                                }
                            }
                            c.paused = true;
                            shared.cv.notify_all();
                        }
                        c = shared.cv.wait(c).unwrap_or_else(|e| e.into_inner());
                    }
                    Want::Run => {
                        if c.paused {
                            if let Some(s) = c.load.take() {
                                if let Err(e) = load_state(&vcpu, &s) {
                                    drop(c);
                                    return fail(e.to_string());
                                }
                                c.rate = s.rate;
                                // The batch is the guest's own parameter, in its memory.
                                let mut b = [0u8; 4];
                                ram.read(param::BATCH, &mut b);
                                c.batch = u32::from_le_bytes(b).max(1);
                                if c.checksum_on_resume {
                                    *shared
                                        .digest_at_resume
                                        .lock()
                                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                                        Some(digest(ram));
                                    // The guest checks this word right after the heartbeat
                                    // it was paused at: before any write of its own.
                                    ram.write_u32(param::COMMAND, 1);
                                }
                            }
                            c.paused = false;
                            // A later save must come from a later pause.
                            c.saved = None;
                            writes = 0;
                            pace_from = Instant::now();
                        }
                        break;
                    }
                }
            }
            (c.rate, c.throttle, c.batch)
        };
        let ran_from = Instant::now();
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PORT_HEARTBEAT, d)) if d.len() == 4 => {
                let v = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                shared.heartbeat.store(u64::from(v), Ordering::Release);
                shared
                    .first_beat
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_or_insert(v);
                shared.beats.fetch_add(1, Ordering::AcqRel);
                writes += u64::from(batch);
            }
            Ok(VcpuExit::IoOut(PORT_CHECKSUM, d)) if d.len() == 4 => {
                shared
                    .checksums
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(u32::from_le_bytes([d[0], d[1], d[2], d[3]]));
            }
            Ok(other) => return fail(format!("unexpected exit: {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return fail(format!("KVM_RUN failed: {e}")),
        }
        // Throttle: sleep the given share of the time; the guest ran the rest.
        if throttle > 0 {
            let p = f64::from(throttle.min(99));
            sleep_unless_called(shared, ran_from.elapsed().mul_f64(p / (100.0 - p)));
        }
        // Pacing: no more writes than `rate` per second since the last resume.
        if rate > 0.0 {
            let now = Instant::now();
            let due = Duration::try_from_secs_f64(writes as f64 / rate)
                .ok()
                .and_then(|d| pace_from.checked_add(d))
                .unwrap_or(now);
            if due > now {
                sleep_unless_called(shared, due - now);
            } else if now - due > Duration::from_millis(100) {
                // Fell behind (throttled, or a slow host): do not catch up in a burst.
                pace_from = now;
                writes = 0;
            }
        }
    }
}

impl VmControl for MicroVm {
    fn pause(&mut self) -> Result<(), MoverError> {
        let mut c = self.shared.lock();
        c.want = Want::Pause;
        self.shared.cv.notify_all();
        let asked = Instant::now();
        let end = asked + Duration::from_secs(10);
        while !c.paused {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MoverError::State("the vCPU did not stop within 10 s"));
            }
            // The guest exits on every heartbeat; one that has not within 50 ms is
            // interrupted (KVM_RUN returns EINTR at an instruction boundary).
            if asked.elapsed() > Duration::from_millis(50)
                && let Some(t) = &self.thread
            {
                kick(t);
            }
            c = self
                .shared
                .cv
                .wait_timeout(c, left.min(Duration::from_millis(10)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        match &c.failed {
            Some(f) => Err(VmmError::Vcpu(f.clone()).into()),
            None => Ok(()),
        }
    }

    fn resume(&mut self) -> Result<(), MoverError> {
        self.resume_vcpu().map_err(Into::into)
    }

    fn throttle(&mut self, percent: u8) -> Result<(), MoverError> {
        self.shared.lock().throttle = percent.min(99);
        Ok(())
    }

    fn save_device_state(&mut self) -> Result<Vec<u8>, MoverError> {
        let c = self.shared.lock();
        if let Some(f) = &c.failed {
            return Err(VmmError::Vcpu(f.clone()).into());
        }
        if !c.paused {
            return Err(MoverError::State(
                "the vCPU must be paused to save its state",
            ));
        }
        c.saved
            .as_ref()
            .map(VcpuState::encode)
            .ok_or(MoverError::State(
                "the vCPU has never run: no state to save",
            ))
    }

    fn load_device_state(&mut self, state: &[u8]) -> Result<(), MoverError> {
        let s = VcpuState::decode(state)?;
        let mut c = self.shared.lock();
        if !c.paused {
            return Err(MoverError::State(
                "cannot load vCPU state into a running VM",
            ));
        }
        c.load = Some(s);
        Ok(())
    }
}

impl DirtyLog for MicroVm {
    fn start(&mut self) -> Result<(), MoverError> {
        // Logging is on from the start (the slot is registered with LOG_DIRTY_PAGES);
        // starting means forgetting what was logged so far.
        self.fetch_and_clear().map(|_| ())
    }

    fn fetch_and_clear(&mut self) -> Result<DirtyBitmap, MoverError> {
        let words = self
            .vm
            .get_dirty_log(0, self.ram.len)
            .map_err(kvm("get_dirty_log"))
            .map_err(MoverError::from)?;
        DirtyBitmap::from_words(words, self.ram.len as u64 / PAGE_SIZE)
            .map_err(|_| MoverError::State("KVM returned a dirty log of the wrong size"))
    }

    fn stop(&mut self) -> Result<(), MoverError> {
        Ok(())
    }
}

impl Source for MicroVm {
    fn memory(&self) -> Arc<dyn GuestMemory> {
        Arc::new(self.memory_handle())
    }

    fn dirty_tracking(&mut self) -> DirtyTracking<'_> {
        DirtyTracking::Supported(self)
    }

    fn control(&mut self) -> &mut dyn VmControl {
        self
    }

    fn device_model(&self) -> vmotion_proto::DeviceModel {
        vmotion_proto::DeviceModel::MicroVm
    }
}
