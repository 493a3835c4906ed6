//! The movers in this repo, and the engine driving a real synthetic guest (writer threads
//! running) into a blank destination in memory.

use std::time::{Duration, Instant};

use vmotion_engine::{Action, ConvergencePolicy, EngineConfig, Outcome, SenderEngine};
use vmotion_mover::memfile::MemoryFile;
use vmotion_mover::synthetic::{Pattern, SyntheticConfig, SyntheticGuest};
use vmotion_mover::{DirtyLog, DirtyTracking, GuestMemory, MoverError, Source, VmControl};

fn busy(pages: u64, rate: f64, pattern: Pattern) -> SyntheticGuest {
    SyntheticGuest::start(SyntheticConfig {
        pages,
        dirty_rate: rate,
        pattern,
        writers: 2,
        ..SyntheticConfig::default()
    })
}

fn differing_pages(a: &[u8], b: &[u8], page: usize) -> Vec<u64> {
    a.chunks(page)
        .zip(b.chunks(page))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

/// Every page that changed while the log ran is in the log: nothing is lost.
#[test]
fn synthetic_dirty_log_misses_no_write() {
    for pattern in [
        Pattern::Uniform,
        Pattern::HotSet { pages: 64 },
        Pattern::Sequential,
    ] {
        let mut g = busy(2048, 20_000.0, pattern);
        g.start().unwrap();
        let before = g.snapshot();
        std::thread::sleep(Duration::from_millis(60));
        g.pause().unwrap();
        let after = g.snapshot();
        let log = g.fetch_and_clear().unwrap();
        let changed = differing_pages(&before, &after, 4096);
        assert!(!changed.is_empty(), "{pattern:?}: the writers wrote");
        for p in &changed {
            assert!(
                log.is_set(*p),
                "{pattern:?}: page {p} changed but is not in the log"
            );
        }
        if let Pattern::HotSet { pages } = pattern {
            assert!(changed.iter().all(|p| *p < pages), "hot set only");
        }
        // Cleared: nothing new while paused.
        assert_eq!(g.fetch_and_clear().unwrap().count(), 0);
        g.resume().unwrap();
    }
}

#[test]
fn pause_stops_every_writer_until_resume() {
    let mut g = busy(1024, 50_000.0, Pattern::Uniform);
    std::thread::sleep(Duration::from_millis(20));
    g.pause().unwrap();
    let (w, snap) = (g.writes(), g.snapshot());
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.writes(), w, "no write while paused");
    assert_eq!(g.snapshot(), snap);
    assert!(
        matches!(g.pause(), Err(MoverError::State(_))),
        "pausing twice is refused"
    );
    g.resume().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(g.writes() > w, "writing again after resume");
}

#[test]
fn throttle_takes_its_share_of_the_writes() {
    let free = busy(1024, 20_000.0, Pattern::Uniform);
    let mut slow = busy(1024, 20_000.0, Pattern::Uniform);
    slow.throttle(80).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (f, s) = (free.writes(), slow.writes());
    assert!(f > 2_000, "the unthrottled guest wrote {f} pages");
    assert!(s * 2 < f, "80 % throttle: {s} vs {f}");
}

#[test]
fn device_state_round_trips_into_a_matching_sink() {
    let mut src = busy(256, 0.0, Pattern::Uniform);
    let state = src.save_device_state().unwrap();
    let mut sink = SyntheticGuest::blank(256, 4096);
    sink.load_device_state(&state).unwrap();
    assert_eq!(sink.loaded_device_state(), Some(&state[..]));
    let mut other = SyntheticGuest::blank(512, 4096);
    assert!(matches!(
        other.load_device_state(&state),
        Err(MoverError::DeviceState(_))
    ));
    assert!(sink.load_device_state(b"garbage").is_err());
}

#[test]
fn out_of_range_requests_are_refused() {
    let g = SyntheticGuest::blank(16, 4096);
    let mut buf = vec![0; 4096 * 2];
    assert!(g.read_pages(15, &mut buf).is_err(), "past the end");
    assert!(g.read_pages(0, &mut buf[..100]).is_err(), "not whole pages");
    assert!(g.read_pages(u64::MAX, &mut buf).is_err(), "overflow");
    assert!(g.write_pages(14, &buf).is_ok());
}

#[test]
fn memory_file_reads_writes_and_migrates_cold() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guest.mem");
    let mut f = MemoryFile::create(&path, 8, 4096).unwrap();
    assert_eq!((f.page_count(), f.page_size()), (8, 4096));
    let page: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    f.write_pages(3, &page).unwrap();
    let mut back = vec![0; 4096];
    f.read_pages(3, &mut back).unwrap();
    assert_eq!(back, page);
    assert!(f.read_pages(8, &mut back).is_err());
    assert!(matches!(
        f.dirty_tracking(),
        DirtyTracking::Unsupported { .. }
    ));
    f.control().load_device_state(b"vcpu").unwrap();
    assert_eq!(
        f.device_state(),
        b"vcpu",
        "kept for the VMM that will run it"
    );
    drop(f);
    let reopened = MemoryFile::open(&path, 4096).unwrap();
    assert_eq!(reopened.page_count(), 8);
    std::fs::write(dir.path().join("odd"), [0u8; 5000]).unwrap();
    assert!(MemoryFile::open(&dir.path().join("odd"), 4096).is_err());
}

/// The engine moves a running synthetic guest (two writers, 40k pages/s) into a blank
/// sink through memory: after the commit the sink holds exactly the source's memory at
/// pause time, and the device state arrived.
#[test]
fn engine_migrates_a_running_synthetic_guest() {
    let pages = 8192;
    let mut src = busy(pages, 40_000.0, Pattern::Uniform);
    let mut dst = SyntheticGuest::blank(pages, 4096);
    let t0 = Instant::now();
    let config = EngineConfig {
        guest_pages: pages,
        page_size: 4096,
        policy: ConvergencePolicy {
            max_downtime: Duration::from_millis(50),
            ..ConvergencePolicy::default()
        },
        dirty_tracking: true,
        switchover_timeout: Duration::from_secs(10),
        device_state_estimate: 64,
    };
    let mut engine = SenderEngine::new(config, t0.elapsed());
    let mut at_pause = None;
    let mut buf = vec![0u8; 4096 * 64];
    while let Some(action) = engine.poll_action() {
        let now = || t0.elapsed();
        match action {
            Action::StartDirtyLog => src.start().unwrap(),
            Action::StopDirtyLog => src.stop().unwrap(),
            Action::SendPages { ranges, .. } => {
                let mut n = 0;
                for r in ranges {
                    let mut p = r.start;
                    while p < r.end() {
                        let k = (r.end() - p).min(64);
                        let b = &mut buf[..(k * 4096) as usize];
                        src.read_pages(p, b).unwrap();
                        dst.write_pages(p, b).unwrap();
                        p += k;
                        n += k;
                    }
                }
                engine.handle_pages_sent(now(), n, n * 4096).unwrap();
            }
            Action::FetchDirtyLog => {
                let d = src.fetch_and_clear().unwrap();
                engine.handle_dirty_log(now(), &d).unwrap();
            }
            Action::SetThrottle(p) => src.throttle(p).unwrap(),
            Action::Pause => {
                src.pause().unwrap();
                at_pause = Some(src.snapshot());
                engine.handle_paused(now()).unwrap();
            }
            Action::SendDeviceState => {
                let s = src.save_device_state().unwrap();
                dst.load_device_state(&s).unwrap();
                engine
                    .handle_device_state_sent(now(), s.len() as u64)
                    .unwrap();
            }
            Action::SendComplete => engine.handle_ready(now()).unwrap(),
            Action::RecordOutcome(Outcome::Committed) => {
                engine.handle_outcome_recorded(now(), true).unwrap()
            }
            Action::RecordOutcome(Outcome::Aborted) | Action::SendAbort(_) => {}
            Action::SendCommit => {}
            Action::Resume => src.resume().unwrap(),
        }
    }
    assert_eq!(
        engine.outcome(),
        Some(Outcome::Committed),
        "{:?}",
        engine.report()
    );
    let at_pause = at_pause.expect("paused");
    assert_eq!(src.snapshot(), at_pause, "the source stayed paused");
    let diff = differing_pages(&at_pause, &dst.snapshot(), 4096);
    assert!(
        diff.is_empty(),
        "{} pages differ, first {:?}",
        diff.len(),
        diff.first()
    );
    assert!(dst.loaded_device_state().is_some());
}
