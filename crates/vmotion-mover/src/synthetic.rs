//! A synthetic guest: memory plus writer threads that dirty it at a set rate and pattern,
//! with exact dirty tracking. For tests and benchmarks; it also serves as a destination
//! sink (`SyntheticGuest::blank`).
//!
//! Memory is an array of `AtomicU64` words, so writers and the migration read and write
//! concurrently without `unsafe` and without data races; relaxed atomic loads and stores
//! compile to plain moves on x86-64. A writer marks a page dirty *after* writing it, so a
//! fetch-and-clear never loses a write: either the sender reads the new data after the
//! clear, or the bit survives into the next fetch.

use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmotion_engine::DirtyBitmap;

use crate::{
    DirtyLog, DirtyTracking, GuestMemory, MoverError, Sink, Source, VmControl, check_range,
};

/// Which pages the writers hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Any page, uniformly.
    Uniform,
    /// Only the first `pages` pages (a hot working set).
    HotSet {
        /// Size of the hot set.
        pages: u64,
    },
    /// Page after page, wrapping around.
    Sequential,
}

/// How to build a synthetic guest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticConfig {
    /// Pages of memory.
    pub pages: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Pages written per second, all writers together, unthrottled (0 = an idle guest).
    pub dirty_rate: f64,
    /// Which pages.
    pub pattern: Pattern,
    /// Writer threads.
    pub writers: usize,
    /// Seed for the page choice, and for the initial contents.
    pub seed: u64,
    /// Share of pages left all-zero at start (exercises zero-page flags), 0.0 to 1.0.
    pub zero_fraction: f64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            pages: 4096,
            page_size: 4096,
            dirty_rate: 0.0,
            pattern: Pattern::Uniform,
            writers: 1,
            seed: 1,
            zero_fraction: 0.25,
        }
    }
}

struct Shared {
    words: Vec<AtomicU64>,
    words_per_page: usize,
    pages: u64,
    page_size: u64,
    dirty: Vec<AtomicU64>,
    logging: AtomicBool,
    throttle: AtomicU8,
    stop: AtomicBool,
    writes: AtomicU64,
    /// Pause handshake: `paused` asks, writers count themselves in `parked`.
    pause: Mutex<PauseState>,
    pause_cv: Condvar,
}

#[derive(Default)]
struct PauseState {
    paused: bool,
    parked: usize,
}

/// Seeds the page contents: most pages get a non-zero marker, `zero_fraction` stay zero.
fn mix(mut x: u64) -> u64 {
    // splitmix64 finalizer.
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A synthetic guest; its writer threads stop when it is dropped.
pub struct SyntheticGuest {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    device_state: Option<Vec<u8>>,
    writers: usize,
}

impl std::fmt::Debug for SyntheticGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyntheticGuest")
            .field("pages", &self.shared.pages)
            .field("writers", &self.writers)
            .finish_non_exhaustive()
    }
}

impl SyntheticGuest {
    fn build(config: &SyntheticConfig, fill: bool) -> Arc<Shared> {
        assert!(
            config.page_size.is_power_of_two() && config.page_size >= 8,
            "page size must be a power of two"
        );
        let words_per_page = (config.page_size / 8) as usize;
        let total = usize::try_from(config.pages)
            .ok()
            .and_then(|p| p.checked_mul(words_per_page))
            .expect("the guest's size fits in memory");
        // Zeroed by the allocator: a large guest is mapped lazily, its pages faulted in
        // as they are first written (a blank destination's as its pages arrive), as a
        // real VM's RAM is.
        let words: Vec<AtomicU64> = bytemuck::zeroed_vec(total);
        if fill {
            for (page, words) in (0..config.pages).zip(words.chunks_exact(words_per_page)) {
                let h = mix(config.seed ^ page);
                if (h % 10_000) as f64 / 10_000.0 < config.zero_fraction {
                    continue;
                }
                for (w, word) in words.iter().enumerate() {
                    word.store(mix(h ^ w as u64) | 1, Relaxed);
                }
            }
        }
        Arc::new(Shared {
            words,
            words_per_page,
            pages: config.pages,
            page_size: config.page_size,
            dirty: (0..config.pages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            logging: AtomicBool::new(false),
            throttle: AtomicU8::new(0),
            stop: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            pause: Mutex::new(PauseState::default()),
            pause_cv: Condvar::new(),
        })
    }

    /// A running guest: seeded memory and `writers` threads dirtying it.
    pub fn start(config: SyntheticConfig) -> Self {
        let shared = Self::build(&config, true);
        // No page, no writer (a writer would have nothing to write).
        let writers = if config.dirty_rate > 0.0 && config.pages > 0 {
            config.writers.max(1)
        } else {
            0
        };
        let threads = (0..writers)
            .map(|i| {
                let shared = shared.clone();
                let rate = config.dirty_rate / writers as f64;
                let pattern = config.pattern;
                let seed = mix(config.seed ^ (i as u64 + 1));
                std::thread::Builder::new()
                    .name(format!("synthetic-writer-{i}"))
                    .spawn(move || writer(&shared, rate, pattern, seed))
                    .expect("spawning a writer thread")
            })
            .collect();
        Self {
            shared,
            threads,
            device_state: None,
            writers,
        }
    }

    /// An all-zero, paused guest with no writers: a destination sink, resumed on commit.
    pub fn blank(pages: u64, page_size: u64) -> Self {
        let config = SyntheticConfig {
            pages,
            page_size,
            ..SyntheticConfig::default()
        };
        let shared = Self::build(&config, false);
        shared
            .pause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .paused = true;
        Self {
            shared,
            threads: Vec::new(),
            device_state: None,
            writers: 0,
        }
    }

    /// A copy of the whole memory (tests compare source and destination with it).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; (self.shared.pages * self.shared.page_size) as usize];
        self.read_pages(0, &mut out).expect("whole memory fits");
        out
    }

    /// Pages written so far.
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Relaxed)
    }

    /// The device state loaded into this guest (as a sink), if any.
    pub fn loaded_device_state(&self) -> Option<&[u8]> {
        self.device_state.as_deref()
    }
}

impl Drop for SyntheticGuest {
    fn drop(&mut self) {
        self.shared.stop.store(true, Relaxed);
        {
            let mut p = self.shared.pause.lock().unwrap_or_else(|e| e.into_inner());
            p.paused = false;
        }
        self.shared.pause_cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One writer: writes pages at `rate` per second, marks them dirty after writing, parks
/// while paused, and gives up `throttle` percent of its time.
fn writer(shared: &Shared, rate: f64, pattern: Pattern, mut rng: u64) {
    // Pacing is a token bucket: writes accrue at the (throttled) rate as time passes, up
    // to 10 ms worth, so a throttle change or a pause acts from then on, never backwards
    // (no catch-up burst after a pause, no retroactive silence after a throttle step).
    let mut last = Instant::now();
    let mut budget = 0.0f64;
    let mut seq = 0u64;
    while !shared.stop.load(Relaxed) {
        // Park while paused; the pauser waits until every writer is parked.
        {
            let mut p = shared.pause.lock().unwrap_or_else(|e| e.into_inner());
            if p.paused {
                p.parked += 1;
                shared.pause_cv.notify_all();
                while p.paused && !shared.stop.load(Relaxed) {
                    p = shared.pause_cv.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                p.parked -= 1;
                last = Instant::now();
            }
        }
        let throttle = f64::from(shared.throttle.load(Relaxed).min(99)) / 100.0;
        let now = Instant::now();
        let rate_now = rate * (1.0 - throttle);
        budget =
            (budget + now.duration_since(last).as_secs_f64() * rate_now).min(rate_now * 0.01 + 1.0);
        last = now;
        if budget < 1.0 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let writes = (budget as u64).min(256);
        budget -= writes as f64;
        for _ in 0..writes {
            rng = mix(rng);
            let page = match pattern {
                Pattern::Uniform => rng % shared.pages,
                Pattern::HotSet { pages } => rng % pages.clamp(1, shared.pages),
                Pattern::Sequential => seq % shared.pages,
            };
            seq += 1;
            let base = page as usize * shared.words_per_page;
            // A write changes the first word and one more: enough to make the page differ.
            shared.words[base].store(rng | 1, Relaxed);
            shared.words[base + (rng as usize % shared.words_per_page)].store(seq, Relaxed);
            // Release: whoever sees the bit (Acquire, in fetch_and_clear) sees the write.
            // Always set, logging or not (start() clears the bits), so there is no window
            // between a check and the write.
            shared.dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Release);
            shared.writes.fetch_add(1, Relaxed);
        }
    }
}

/// A handle on a synthetic guest's memory, shareable with other threads.
#[derive(Clone)]
pub struct SyntheticMemory(Arc<Shared>);

impl std::fmt::Debug for SyntheticMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyntheticMemory")
            .field("pages", &self.0.pages)
            .finish()
    }
}

impl GuestMemory for SyntheticMemory {
    fn page_size(&self) -> u64 {
        self.0.page_size
    }

    fn page_count(&self) -> u64 {
        self.0.pages
    }

    fn read_pages(&self, first: u64, out: &mut [u8]) -> Result<(), MoverError> {
        let s = &self.0;
        check_range(first, out.len(), s.page_size, s.pages)?;
        let start = first as usize * s.words_per_page;
        for (chunk, word) in out.chunks_exact_mut(8).zip(&s.words[start..]) {
            chunk.copy_from_slice(&word.load(Relaxed).to_le_bytes());
        }
        Ok(())
    }

    fn write_pages(&self, first: u64, data: &[u8]) -> Result<(), MoverError> {
        let s = &self.0;
        check_range(first, data.len(), s.page_size, s.pages)?;
        let start = first as usize * s.words_per_page;
        for (chunk, word) in data.chunks_exact(8).zip(&s.words[start..]) {
            word.store(
                u64::from_le_bytes(chunk.try_into().expect("8 bytes")),
                Relaxed,
            );
        }
        Ok(())
    }
}

impl SyntheticGuest {
    /// A shareable handle on the memory.
    pub fn memory_handle(&self) -> SyntheticMemory {
        SyntheticMemory(self.shared.clone())
    }
}

/// A synthetic guest as a destination: held in memory, so nothing to persist, and
/// nothing left behind once it is dropped.
impl Sink for SyntheticGuest {
    fn memory(&self) -> Arc<dyn GuestMemory> {
        Arc::new(self.memory_handle())
    }

    fn control(&mut self) -> &mut dyn VmControl {
        self
    }

    fn persist(&mut self) -> Result<(), MoverError> {
        Ok(())
    }

    fn discard(&mut self) -> Result<(), MoverError> {
        Ok(())
    }
}

impl GuestMemory for SyntheticGuest {
    fn page_size(&self) -> u64 {
        self.shared.page_size
    }

    fn page_count(&self) -> u64 {
        self.shared.pages
    }

    fn read_pages(&self, first: u64, out: &mut [u8]) -> Result<(), MoverError> {
        self.memory_handle().read_pages(first, out)
    }

    fn write_pages(&self, first: u64, data: &[u8]) -> Result<(), MoverError> {
        self.memory_handle().write_pages(first, data)
    }
}

impl DirtyLog for SyntheticGuest {
    fn start(&mut self) -> Result<(), MoverError> {
        for w in &self.shared.dirty {
            w.store(0, Relaxed);
        }
        self.shared.logging.store(true, Relaxed);
        Ok(())
    }

    fn fetch_and_clear(&mut self) -> Result<DirtyBitmap, MoverError> {
        let words = self
            .shared
            .dirty
            .iter()
            .map(|w| w.swap(0, Acquire))
            .collect();
        // Writers only mark pages below `pages`, so the words always fit.
        DirtyBitmap::from_words(words, self.shared.pages)
            .map_err(|_| MoverError::State("the dirty log is corrupt"))
    }

    fn stop(&mut self) -> Result<(), MoverError> {
        self.shared.logging.store(false, Relaxed);
        Ok(())
    }
}

/// The device state of a synthetic guest: a tag, the geometry and the write count.
const STATE_TAG: &[u8; 16] = b"synthetic-vm-v1\0";

impl VmControl for SyntheticGuest {
    fn pause(&mut self) -> Result<(), MoverError> {
        let mut p = self.shared.pause.lock().unwrap_or_else(|e| e.into_inner());
        if p.paused {
            return Err(MoverError::State("the guest is already paused"));
        }
        p.paused = true;
        while p.parked < self.writers {
            p = self
                .shared
                .pause_cv
                .wait(p)
                .unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MoverError> {
        let mut p = self.shared.pause.lock().unwrap_or_else(|e| e.into_inner());
        if !p.paused {
            return Err(MoverError::State("the guest is not paused"));
        }
        p.paused = false;
        self.shared.pause_cv.notify_all();
        Ok(())
    }

    fn throttle(&mut self, percent: u8) -> Result<(), MoverError> {
        self.shared.throttle.store(percent.min(99), Relaxed);
        Ok(())
    }

    fn save_device_state(&mut self) -> Result<Vec<u8>, MoverError> {
        let mut s = STATE_TAG.to_vec();
        s.extend_from_slice(&self.shared.pages.to_le_bytes());
        s.extend_from_slice(&self.shared.page_size.to_le_bytes());
        s.extend_from_slice(&self.writes().to_le_bytes());
        Ok(s)
    }

    fn load_device_state(&mut self, state: &[u8]) -> Result<(), MoverError> {
        let geometry = [
            self.shared.pages.to_le_bytes(),
            self.shared.page_size.to_le_bytes(),
        ]
        .concat();
        if state.len() != 40 || &state[..16] != STATE_TAG || state[16..32] != geometry[..] {
            return Err(MoverError::DeviceState(
                "not a synthetic guest of this size".into(),
            ));
        }
        self.device_state = Some(state.to_vec());
        Ok(())
    }
}

impl Source for SyntheticGuest {
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
        vmotion_proto::DeviceModel::Synthetic
    }
}
