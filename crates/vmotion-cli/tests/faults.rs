//! Faults with the real binaries on loopback: kill -9 of each process at each phase of a
//! migration, a proxy that black-holes the path, a sink folder that runs out of space.
//! Each test checks where the VM ended up against the key service's record (the arbiter
//! of every switchover): exactly one place, and the sink folder settled as the record says.
//!
//! The key service binary must be built (`scripts/test.sh` builds every workspace binary).
//! The full-disk test needs root (to mount a small tmpfs) and skips, saying why, without.

mod common;

use common::*;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Encrypted, with short deadlines: a claim that does not come within 2 s is reverted, a
/// path that takes nothing for 3 s ends the migration.
const QUICK: &str =
    "encryption = \"required\"\nclaim_timeout = \"2s\"\nprogress_timeout = \"3s\"\n";
/// The same at 4 MB/s: 8 MiB take about 2 s, a window to hit pre-copy.
const SLOW: &str = "encryption = \"required\"\nclaim_timeout = \"2s\"\nprogress_timeout = \"3s\"\nmax_bandwidth = \"4MB/s\"\n";
/// The destination's `--progress-timeout`, seconds.
const RECV_PROGRESS_SECS: u64 = 3;

// ---------------------------------------------------------------------------------------
// Helpers

/// A vmotion-recv with a memfile sink in `sinks`, registered as "dst", logging at info
/// into `log`.
struct Daemon {
    proc_: Proc,
    addr: String,
    log: PathBuf,
}

fn daemon(w: &World, sinks: &Path, log: &Path, extra: &[&str]) -> Daemon {
    let mut cmd = Command::new(RECV);
    cmd.args(["--listen", "127.0.0.1:0", "--sink", "memfile", "--sink-dir"])
        .arg(sinks)
        .args(["--progress-timeout", &RECV_PROGRESS_SECS.to_string()])
        .args(w.identity("dst"))
        .args(extra)
        .env("RUST_LOG", "info");
    let (proc_, addr) = spawn_listening_logged(&mut cmd, fs::File::create(log).unwrap().into());
    Daemon {
        proc_,
        addr,
        log: log.to_owned(),
    }
}

impl Daemon {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        self.proc_.0.kill().unwrap();
        self.proc_.0.wait().unwrap();
    }
}

/// A vmotion-send running in the background, its output going to files.
struct Sending {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

/// Starts vmotion-send of a synthetic guest of `mib` MiB (idle unless `extra` says
/// otherwise), encrypted with the key service, `--json`, logging at info (every log line
/// of a migration carries its id).
fn start_send(w: &World, vm: &str, to: &str, mib: u64, extra: &[&str]) -> Sending {
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let (out, err) = (w.p(&format!("send-{n}.out")), w.p(&format!("send-{n}.err")));
    let child = w
        .send_command(vm, to, true)
        .args(["--synthetic-mib", &mib.to_string(), "--json"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    Sending { child, out, err }
}

impl Sending {
    fn output(&mut self) -> Option<Output> {
        let status = self.child.try_wait().unwrap()?;
        Some(Output {
            status,
            stdout: fs::read(&self.out).unwrap(),
            stderr: fs::read(&self.err).unwrap(),
        })
    }

    /// Waits for the exit, at most `limit` (then kills it and fails).
    fn wait(mut self, limit: Duration) -> Output {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(o) = self.output() {
                return o;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "vmotion-send still running after {limit:?}:\n{}",
                    text(&self.output().unwrap())
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill9(mut self) -> Output {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.output().unwrap()
    }
}

/// A synchronous run of vmotion-send, as `start_send`.
fn send(w: &World, vm: &str, to: &str, mib: u64, extra: &[&str]) -> Output {
    start_send(w, vm, to, mib, extra).wait(Duration::from_secs(30))
}

/// Every migration id in `text`: 32 hex digits after `id=`, `migration=`, a
/// `"migration_id":"` or `migration `.
fn ids(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for tag in ["id=", "migration=", "\"migration_id\":\"", "migration "] {
        for (at, _) in text.match_indices(tag) {
            let rest = &text[at + tag.len()..];
            if let Some(id) = rest.get(..32)
                && id.bytes().all(|b| b.is_ascii_hexdigit())
                && !found.iter().any(|f| f == id)
            {
                found.push(id.to_owned());
            }
        }
    }
    found
}

/// The one migration a sender's output names.
fn migration_id(o: &Output) -> String {
    let t = text(o);
    let found = ids(&t);
    assert_eq!(found.len(), 1, "one migration id expected:\n{t}");
    found[0].clone()
}

/// The names in a folder, sorted (none if it is missing).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The migration id a sink folder entry holds (`VM.receiving/migration` or
/// `VM.unsettled/migration`).
fn id_in(entry: &Path) -> Option<String> {
    fs::read_to_string(entry.join("migration"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Nothing half-done of `vm` is left in the folder.
fn settled(sinks: &Path, vm: &str) -> bool {
    !sinks.join(format!("{vm}.receiving")).exists()
        && !sinks.join(format!("{vm}.unsettled")).exists()
}

/// Waits (bounded) for the path to `p` to exist, every 200 µs, failing if `sending`
/// ends first.
fn wait_for_path(p: &Path, sending: &mut Sending, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !p.exists() {
        if let Some(o) = sending.output() {
            panic!(
                "the migration ended before {} existed:\n{}",
                p.display(),
                text(&o)
            );
        }
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The exit code agrees with the key service's record: 0 only if `claimed`; 4 only if
/// `reverted` or `aborted`; 5 only if `committed`.
/// Waits until `vm` is arriving at the daemon and half a second into its pre-copy; its
/// folder and its migration id.
fn mid_precopy(sinks: &Path, vm: &str, sending: &mut Sending) -> (PathBuf, String) {
    let receiving = sinks.join(format!("{vm}.receiving"));
    wait_for_path(&receiving, sending, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    let id = id_in(&receiving).expect("the arriving guest names its migration");
    (receiving, id)
}

fn check_exit_against_record(o: &Output, record: Option<&str>) {
    let t = text(o);
    match o.status.code() {
        Some(0) => assert_eq!(record, Some("claimed"), "exit 0:\n{t}"),
        Some(4) => assert!(
            matches!(record, Some("reverted" | "aborted")),
            "exit 4 with record {record:?}:\n{t}"
        ),
        Some(5) => assert_eq!(record, Some("committed"), "exit 5:\n{t}"),
        _ => panic!("unexpected exit (record {record:?}):\n{t}"),
    }
}

/// An encrypted migration that ended with the VM claimed at the destination (exit 0,
/// `--json`): its id, after checking the key service's record says `claimed`.
fn expect_claimed(w: &World, o: &Output) -> String {
    expect(o, 0, &[]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["outcome"], "committed", "{}", text(o));
    assert_eq!(v["mode"], "encrypted", "{}", text(o));
    let id = v["migration_id"].as_str().unwrap().to_owned();
    assert_eq!(w.outcome(&id).as_deref(), Some("claimed"), "{}", text(o));
    id
}

/// A retry of `vm` to `to` works: exit 0, the record `claimed`, the guest filed.
fn retry_works(w: &World, vm: &str, to: &str, sinks: &Path) {
    let o = send(w, vm, to, 8, &["--max-bandwidth", "unlimited"]);
    expect_claimed(w, &o);
    // The sender is done once the claim is known; the daemon files the guest right after.
    assert!(
        eventually(Duration::from_secs(5), || {
            sinks.join(format!("{vm}.mem")).exists() && settled(sinks, vm)
        }),
        "{:?}",
        names(sinks)
    );
    assert_eq!(
        fs::metadata(sinks.join(format!("{vm}.mem"))).unwrap().len(),
        8 << 20
    );
}

// ---------------------------------------------------------------------------------------
// A proxy that black-holes

/// When the proxy acts.
#[derive(Clone, Copy)]
enum Trigger {
    /// Once this many bytes went from the sender to the receiver (all connections).
    Bytes(u64),
    /// At the first frame of this type, sender → receiver (`from_sender`) or back.
    Frame { from_sender: bool, frame_type: u8 },
}

/// Follows the frames of one direction of one connection (their headers are in clear).
#[derive(Default)]
struct FrameParser {
    header: Vec<u8>,
    skip: u64,
}

impl FrameParser {
    /// Feeds `chunk`; the offset in it of the first frame of type `t` (0 if its header
    /// began in an earlier chunk).
    fn find(&mut self, chunk: &[u8], t: u8) -> Option<usize> {
        let mut i = 0;
        while i < chunk.len() {
            if self.skip > 0 {
                let k = (self.skip as usize).min(chunk.len() - i);
                self.skip -= k as u64;
                i += k;
                continue;
            }
            let start = if self.header.is_empty() { i } else { 0 };
            let k = (24 - self.header.len()).min(chunk.len() - i);
            self.header.extend_from_slice(&chunk[i..i + k]);
            i += k;
            if self.header.len() == 24 {
                assert_eq!(&self.header[..2], b"VM", "the proxy lost the frames");
                let ty = self.header[3];
                let len = u32::from_be_bytes(self.header[12..16].try_into().unwrap());
                self.skip = u64::from(len) + 16;
                self.header.clear();
                if ty == t {
                    return Some(start);
                }
            }
        }
        None
    }
}

struct ProxyState {
    trigger: Trigger,
    black_hole: bool,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    armed: AtomicBool,
    holed: AtomicBool,
    stop: AtomicBool,
    from_sender: AtomicU64,
    fired_at: Mutex<Option<Instant>>,
}

impl ProxyState {
    /// The trigger fired: the hook runs while the triggering bytes wait; then, for a
    /// black hole, nothing moves any more, either way, on any connection.
    fn fire(&self) {
        let mut at = self.fired_at.lock().unwrap();
        if !self.armed.swap(false, Ordering::SeqCst) {
            return;
        }
        if self.black_hole {
            self.holed.store(true, Ordering::SeqCst);
        }
        *at = Some(Instant::now());
        if let Some(hook) = self.hook.lock().unwrap().take() {
            hook();
        }
    }
}

/// A TCP proxy in front of a receiver that forwards both ways until its trigger; then
/// it runs its hook and (a black hole) stops forwarding in both directions on every
/// connection, closing nothing, until it is dropped.
struct Proxy {
    addr: String,
    state: Arc<ProxyState>,
}

impl Proxy {
    fn start(
        upstream: &str,
        trigger: Trigger,
        black_hole: bool,
        hook: Option<Box<dyn FnOnce() + Send>>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(ProxyState {
            trigger,
            black_hole,
            hook: Mutex::new(hook),
            armed: AtomicBool::new(true),
            holed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            from_sender: AtomicU64::new(0),
            fired_at: Mutex::new(None),
        });
        let (st, upstream) = (state.clone(), upstream.to_owned());
        std::thread::spawn(move || {
            while !st.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(&upstream) else {
                            continue;
                        };
                        for (from, to, from_sender) in [
                            (
                                client.try_clone().unwrap(),
                                server.try_clone().unwrap(),
                                true,
                            ),
                            (server, client, false),
                        ] {
                            let st = st.clone();
                            std::thread::spawn(move || pump(from, to, from_sender, &st));
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self { addr, state }
    }

    /// When the trigger fired.
    fn fired_at(&self) -> Option<Instant> {
        *self.state.fired_at.lock().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, from_sender: bool, st: &ProxyState) {
    from.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut parser = FrameParser::default();
    let mut buf = vec![0u8; 64 * 1024];
    while !st.stop.load(Ordering::SeqCst) {
        if st.holed.load(Ordering::SeqCst) {
            // Not a byte read or written: the peers' buffers fill up, nothing closes.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        };
        let chunk = &buf[..n];
        let cut = if !st.armed.load(Ordering::SeqCst) {
            None
        } else {
            match st.trigger {
                Trigger::Bytes(limit) if from_sender => {
                    let before = st.from_sender.fetch_add(n as u64, Ordering::SeqCst);
                    (before + n as u64 >= limit).then(|| limit.saturating_sub(before) as usize)
                }
                Trigger::Bytes(_) => None,
                Trigger::Frame {
                    from_sender: dir,
                    frame_type,
                } if dir == from_sender => parser.find(chunk, frame_type),
                Trigger::Frame { .. } => None,
            }
        };
        let sent = match cut {
            None if st.holed.load(Ordering::SeqCst) => Ok(()),
            None => to.write_all(chunk),
            Some(at) => {
                let r = to.write_all(&chunk[..at]);
                st.fire();
                if st.black_hole {
                    r
                } else {
                    r.and_then(|()| to.write_all(&chunk[at..]))
                }
            }
        };
        if sent.is_err() {
            let _ = from.shutdown(Shutdown::Both);
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// 1. The destination dies after Ready

/// kill -9 of vmotion-recv the moment its guest is persisted (`VM.unsettled/`, just
/// before `Ready`), and a few milliseconds later, to land in different windows (before
/// `Ready` reached the source, between the commit and the claim, after the claim but
/// before the guest was filed, while filing it, after). Whatever the race gave,
/// the sender's exit code agrees with the record, the restarted daemon settles the sink
/// folder as the record says (`VM.mem` iff `claimed`), and a retry of the VM works.
#[test]
fn kill_9_of_the_daemon_after_ready_is_settled_by_its_restart() {
    let w = World::new();
    w.policy("k", QUICK);
    for (round, delay_us) in [0u64, 2500, 4000, 6000].into_iter().enumerate() {
        let sinks = w.p(&format!("sinks-{round}"));
        let mut d1 = daemon(&w, &sinks, &w.p(&format!("recv-{round}a.log")), &[]);
        let mut sending = start_send(&w, "k", &d1.addr, 8, &[]);
        let unsettled = sinks.join("k.unsettled");
        wait_for_path(&unsettled, &mut sending, Duration::from_secs(20));
        if delay_us > 0 {
            std::thread::sleep(Duration::from_micros(delay_us));
        }
        d1.kill9();
        let o = sending.wait(Duration::from_secs(30));
        let id = migration_id(&o);
        let record = w.outcome(&id);
        check_exit_against_record(&o, record.as_deref());
        let left = names(&sinks);
        let left_guest = unsettled.join("memory").exists();

        let d2 = daemon(&w, &sinks, &w.p(&format!("recv-{round}b.log")), &[]);
        assert!(
            eventually(Duration::from_secs(15), || settled(&sinks, "k")),
            "not settled: {:?}\n{}",
            names(&sinks),
            d2.log()
        );
        // The restarted daemon may have claimed a `committed` record itself.
        let record = w.outcome(&id);
        assert_eq!(
            sinks.join("k.mem").exists(),
            record.as_deref() == Some("claimed"),
            "record {record:?}, folder {:?}\n{}",
            names(&sinks),
            d2.log()
        );
        assert_eq!(sinks.join("k.state").exists(), sinks.join("k.mem").exists());
        let log = d2.log();
        if left_guest {
            let said = if record.as_deref() == Some("claimed") {
                "claimed at the arbiter: the guest is complete here"
            } else {
                "discarded: the source keeps the VM"
            };
            assert!(log.contains(said) && log.contains(&id), "{said:?}:\n{log}");
        } else if left.contains(&"k.unsettled".to_owned()) {
            // Killed while filing the claimed guest: its memory was already VM.mem.
            assert_eq!(record.as_deref(), Some("claimed"));
            assert!(
                log.contains("removed an unsettled folder whose guest was already filed"),
                "{log}"
            );
        }
        eprintln!(
            "round {round} (kill {delay_us} µs after VM.unsettled appeared): vmotion-send exit \
             {:?}, folder after the kill {left:?}, record {record:?}",
            o.status.code()
        );

        retry_works(&w, "k", &d2.addr, &sinks);
    }
}

// ---------------------------------------------------------------------------------------
// 2. The destination dies during pre-copy

/// kill -9 of vmotion-recv halfway through pre-copy: the sender aborts (exit 4, the VM
/// never paused, the record `aborted`); the restarted daemon removes the partial guest;
/// a retry works.
#[test]
fn kill_9_of_the_daemon_mid_precopy_leaves_a_partial_guest_the_restart_removes() {
    let w = World::new();
    w.policy("slow", SLOW);
    let sinks = w.p("sinks");
    let mut d1 = daemon(&w, &sinks, &w.p("recv-a.log"), &[]);
    let mut sending = start_send(&w, "slow", &d1.addr, 8, &[]);
    let (receiving, id) = mid_precopy(&sinks, "slow", &mut sending);
    d1.kill9();
    let o = sending.wait(Duration::from_secs(20));
    expect(&o, 4, &["aborted, the VM keeps running at the source"]);
    assert!(!text(&o).contains("stop-and-copy"), "{}", text(&o));
    assert_eq!(migration_id(&o), id);
    assert_eq!(w.outcome(&id).as_deref(), Some("aborted"));
    assert!(receiving.exists(), "the dead daemon left its partial guest");

    let d2 = daemon(&w, &sinks, &w.p("recv-b.log"), &[]);
    assert!(
        eventually(Duration::from_secs(10), || !receiving.exists()
            && d2.log().contains("removed a partly received guest")),
        "{:?}\n{}",
        names(&sinks),
        d2.log()
    );
    assert!(names(&sinks).is_empty(), "{:?}", names(&sinks));
    retry_works(&w, "slow", &d2.addr, &sinks);
}

// ---------------------------------------------------------------------------------------
// 3. The source dies

/// kill -9 of vmotion-send during pre-copy, then (two rounds) the moment the destination
/// persisted its guest: the destination never files a guest the record does not say
/// `claimed`, ends within its progress timeout with nothing half-received, and a later
/// migration of the VM works. Last, both processes die at once after the persist: the
/// restarted daemon finds the record open, records `aborted` and deletes its copy.
#[test]
fn kill_9_of_the_sender_leaves_the_destination_clean() {
    let w = World::new();
    w.policy("slow", SLOW);
    let sinks = w.p("sinks");
    let mut d = daemon(&w, &sinks, &w.p("recv.log"), &[]);

    // During pre-copy.
    let mut sending = start_send(&w, "slow", &d.addr, 8, &[]);
    let (_, id) = mid_precopy(&sinks, "slow", &mut sending);
    sending.kill9();
    let killed = Instant::now();
    let limit = Duration::from_secs(RECV_PROGRESS_SECS + 5);
    assert!(
        eventually(limit, || names(&sinks).is_empty()
            && d.log().lines().any(
                |l| l.contains("migration not received") && l.contains(&id)
            )),
        "{:?}\n{}",
        names(&sinks),
        d.log()
    );
    eprintln!(
        "pre-copy: the destination gave up {:?} after the kill",
        killed.elapsed()
    );
    let record = w.outcome(&id);
    assert!(
        matches!(record.as_deref(), None | Some("aborted")),
        "{record:?}"
    );
    retry_works(&w, "slow", &d.addr, &sinks);

    // After the destination persisted the guest (around Ready).
    for (round, delay_us) in [0u64, 3000].into_iter().enumerate() {
        let vm = format!("after-{round}");
        w.policy(&vm, QUICK);
        let mut sending = start_send(&w, &vm, &d.addr, 8, &[]);
        let unsettled = sinks.join(format!("{vm}.unsettled"));
        wait_for_path(&unsettled, &mut sending, Duration::from_secs(20));
        let id = id_in(&unsettled).unwrap();
        if delay_us > 0 {
            std::thread::sleep(Duration::from_micros(delay_us));
        }
        sending.kill9();
        let mut restarted = false;
        if !eventually(limit, || settled(&sinks, &vm)) {
            // Only an arbiter that does not answer leaves it unsettled; then the record
            // is open or committed, and a restart settles it.
            let record = w.outcome(&id);
            assert!(
                matches!(record.as_deref(), None | Some("committed")),
                "{record:?}"
            );
            eprintln!("{vm} still unsettled, record {record:?}:\n{}", d.log());
            d = daemon(&w, &sinks, &w.p(&format!("recv-{round}.log")), &[]);
            assert!(eventually(Duration::from_secs(10), || settled(&sinks, &vm)));
            restarted = true;
        }
        let record = w.outcome(&id);
        assert!(
            matches!(record.as_deref(), Some("aborted" | "claimed")),
            "the destination settles what it holds: {record:?}"
        );
        assert_eq!(
            sinks.join(format!("{vm}.mem")).exists(),
            record.as_deref() == Some("claimed"),
            "record {record:?}, folder {:?}\n{}",
            names(&sinks),
            d.log()
        );
        eprintln!(
            "round {round} (kill {delay_us} µs after {vm}.unsettled appeared): record {record:?}"
        );
        assert!(!restarted, "the daemon should have settled it itself");
        retry_works(&w, &vm, &d.addr, &sinks);
    }

    // Both die at once, the moment the guest is persisted: nobody settled the record (it
    // stays open), and the restarted daemon records `aborted` and deletes its copy.
    w.policy("both", QUICK);
    let mut sending = start_send(&w, "both", &d.addr, 8, &[]);
    let unsettled = sinks.join("both.unsettled");
    wait_for_path(&unsettled, &mut sending, Duration::from_secs(20));
    let id = id_in(&unsettled).unwrap();
    d.kill9();
    sending.kill9();
    let before = w.outcome(&id);
    assert!(unsettled.exists());
    let d2 = daemon(&w, &sinks, &w.p("recv-both.log"), &[]);
    assert!(
        eventually(Duration::from_secs(10), || settled(&sinks, "both")),
        "{:?}\n{}",
        names(&sinks),
        d2.log()
    );
    let record = w.outcome(&id);
    assert!(
        matches!(record.as_deref(), Some("aborted" | "claimed")),
        "{record:?}"
    );
    assert_eq!(
        sinks.join("both.mem").exists(),
        record.as_deref() == Some("claimed")
    );
    if before.is_none() {
        assert_eq!(record.as_deref(), Some("aborted"));
        let log = d2.log();
        assert!(
            log.lines()
                .any(|l| l.contains("discarded: the source keeps the VM") && l.contains(&id)),
            "{log}"
        );
    }
    eprintln!("both killed: the record said {before:?}, after the restart {record:?}");
    retry_works(&w, "both", &d2.addr, &sinks);
}

// ---------------------------------------------------------------------------------------
// 4. The key service dies

/// kill -9 of the key service during pre-copy: the sender finds the arbiter gone before
/// the pause and aborts (exit 4) with the VM never paused; the destination discards.
/// Once the key service is back the VM is still held by that migration (no one could
/// record its abort); a retry with `--abort-stale` works.
#[test]
fn kill_9_of_the_keyservice_during_precopy_never_pauses_the_vm() {
    let mut w = World::new();
    w.policy("slow", SLOW);
    let sinks = w.p("sinks");
    let d = daemon(&w, &sinks, &w.p("recv.log"), &["--refresh-secs", "1"]);
    let mut sending = start_send(&w, "slow", &d.addr, 8, &[]);
    wait_for_path(
        &sinks.join("slow.receiving"),
        &mut sending,
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(300));
    w.kill_keyservice();
    let o = sending.wait(Duration::from_secs(30));
    expect(
        &o,
        4,
        &[
            "aborted, the VM keeps running at the source",
            "the arbiter does not answer, so the VM was not paused",
        ],
    );
    assert!(!text(&o).contains("stop-and-copy"), "{}", text(&o));
    assert!(
        eventually(Duration::from_secs(5), || names(&sinks).is_empty()),
        "{:?}",
        names(&sinks)
    );

    w.start_keyservice();
    // Neither side could record `aborted` (the key service was down), so the replayed
    // journal still has the first migration at `null`, holding the VM: a plain retry is
    // refused naming it, and the source takes over its own stale migration explicitly.
    let first = migration_id(&o);
    let refused = send(&w, "slow", &d.addr, 8, &["--max-bandwidth", "unlimited"]);
    expect(
        &refused,
        3,
        &["already has migration", &first, "--abort-stale"],
    );
    // The daemon registers again within its refresh period.
    let mut last = None;
    let worked = eventually(Duration::from_secs(10), || {
        let o = send(
            &w,
            "slow",
            &d.addr,
            8,
            &["--max-bandwidth", "unlimited", "--abort-stale"],
        );
        let ok = o.status.code() == Some(0);
        if !ok {
            assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        }
        last = Some(o);
        ok
    });
    assert!(worked, "{}", text(last.as_ref().unwrap()));
    expect_claimed(&w, last.as_ref().unwrap());
}

/// kill -9 of the key service between the commit and the claim (a proxy holds `Commit`
/// until the key service is dead): neither side can settle, so both keep paused copies —
/// the sender exits 5, the daemon keeps `VM.unsettled/` and refuses a new migration of
/// the VM. After the key service restarts on its journal (the record says `committed`)
/// the restarted daemon claims the guest and files it.
#[test]
fn kill_9_of_the_keyservice_between_commit_and_claim_leaves_both_paused_until_settled() {
    let mut w = World::new();
    w.policy("held", QUICK);
    let sinks = w.p("sinks");
    let mut d1 = daemon(&w, &sinks, &w.p("recv-a.log"), &["--refresh-secs", "1"]);
    let pid = w.keyservice_pid().unwrap().to_string();
    let proxy = Proxy::start(
        &d1.addr,
        Trigger::Frame {
            from_sender: true,
            frame_type: 11, // Commit
        },
        false,
        Some(Box::new(move || {
            assert!(
                Command::new("kill")
                    .args(["-KILL", &pid])
                    .status()
                    .unwrap()
                    .success()
            );
        })),
    );
    let started = Instant::now();
    let o = start_send(&w, "held", &proxy.addr, 8, &[]).wait(Duration::from_secs(60));
    w.kill_keyservice(); // reaps it
    eprintln!(
        "vmotion-send ended {:?} after it started",
        started.elapsed()
    );
    assert!(proxy.fired_at().is_some(), "no Commit seen:\n{}", text(&o));
    expect(&o, 5, &["OUTCOME UNKNOWN, the VM is PAUSED at the source"]);
    let id = migration_id(&o);
    let unsettled = sinks.join("held.unsettled");
    assert!(
        eventually(Duration::from_secs(10), || d1
            .log()
            .contains("kept with its device state: the claim is not settled")),
        "{}",
        d1.log()
    );
    assert_eq!(names(&sinks), ["held.unsettled"]);
    assert_eq!(id_in(&unsettled).as_deref(), Some(id.as_str()));
    let status = Command::new(RECV)
        .args(["--status", "--sink-dir"])
        .arg(&sinks)
        .output()
        .unwrap();
    let line = format!("unsettled held migration {id}");
    expect(&status, 0, &[line.as_str()]);

    w.start_keyservice();
    assert_eq!(
        w.outcome(&id).as_deref(),
        Some("committed"),
        "the journal kept the commit"
    );
    // While the copy is unsettled, the VM cannot come here again (once the daemon has
    // registered with the restarted key service, the refusal is its pre-flight's).
    let mut last = None;
    let refused = eventually(Duration::from_secs(10), || {
        let o = send(&w, "held", &d1.addr, 8, &[]);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        let named = text(&o).contains(&id);
        last = Some(o);
        named
    });
    assert!(refused, "{}", text(last.as_ref().unwrap()));
    expect(
        last.as_ref().unwrap(),
        3,
        &[
            "the destination refused the guest before any page was sent",
            "unsettled",
        ],
    );

    d1.kill9();
    let d2 = daemon(&w, &sinks, &w.p("recv-b.log"), &[]);
    assert!(
        eventually(Duration::from_secs(10), || settled(&sinks, "held")
            && sinks.join("held.mem").exists()),
        "{:?}\n{}",
        names(&sinks),
        d2.log()
    );
    assert!(
        d2.log()
            .contains("claimed at the arbiter: the guest is complete here"),
        "{}",
        d2.log()
    );
    assert_eq!(w.outcome(&id).as_deref(), Some("claimed"));
    assert_eq!(names(&sinks), ["held.mem", "held.state"]);
    retry_works(&w, "held", &d2.addr, &sinks);
}

// ---------------------------------------------------------------------------------------
// 5. A path that stops forwarding

/// A black hole 2 MiB into pre-copy (both directions, nothing closed) of a guest larger
/// than what the socket buffers on the way can hold (so the sender's writes stall): both
/// sides give up within the progress timeout (plus a margin), the sender with exit 4 and
/// the VM never paused, the daemon discarding the guest; a retry of the VM straight to
/// the daemon works (its in-flight slot was freed).
#[test]
fn a_black_hole_during_precopy_ends_both_sides_within_the_progress_timeout() {
    let w = World::new();
    w.policy("bh", QUICK);
    let sinks = w.p("sinks");
    let d = daemon(&w, &sinks, &w.p("recv.log"), &[]);
    let proxy = Proxy::start(&d.addr, Trigger::Bytes(2 << 20), true, None);
    let o = start_send(&w, "bh", &proxy.addr, 32, &[]).wait(Duration::from_secs(30));
    let holed = proxy.fired_at().expect("the black hole never opened");
    let margin = Duration::from_secs(4);
    let sender_took = holed.elapsed();
    expect(&o, 4, &["aborted, the VM keeps running at the source"]);
    assert!(!text(&o).contains("stop-and-copy"), "{}", text(&o));
    assert!(
        sender_took < Duration::from_secs(3) + margin,
        "the sender took {sender_took:?}"
    );
    let id = migration_id(&o);
    let until = Duration::from_secs(RECV_PROGRESS_SECS) + margin;
    assert!(
        eventually(until.saturating_sub(holed.elapsed()), || d
            .log()
            .lines()
            .any(|l| l.contains("migration not received") && l.contains(&id))),
        "{}",
        d.log()
    );
    eprintln!(
        "black hole in pre-copy: the sender gave up after {sender_took:?}, the daemon by {:?}",
        holed.elapsed()
    );
    assert!(names(&sinks).is_empty(), "{:?}", names(&sinks));
    assert_eq!(w.outcome(&id).as_deref(), Some("aborted"));
    retry_works(&w, "bh", &d.addr, &sinks);
    drop(proxy);
}

/// A black hole right after the pause (at the first device-state frame): the sender gets
/// no `Ready` within its switchover timeout and resumes the VM (exit 4, record
/// `aborted`), the daemon hears nothing for its progress timeout and discards.
#[test]
fn a_black_hole_after_the_pause_resumes_the_vm_at_the_source() {
    let w = World::new();
    w.policy("bh", &format!("{QUICK}switchover_timeout = \"2s\"\n"));
    let sinks = w.p("sinks");
    let d = daemon(&w, &sinks, &w.p("recv.log"), &[]);
    let proxy = Proxy::start(
        &d.addr,
        Trigger::Frame {
            from_sender: true,
            frame_type: 7, // DeviceState: sent once the VM is paused
        },
        true,
        None,
    );
    let o = start_send(&w, "bh", &proxy.addr, 8, &[]).wait(Duration::from_secs(30));
    let holed = proxy.fired_at().expect("no device state seen");
    let sender_took = holed.elapsed();
    let id = migration_id(&o);
    let record = w.outcome(&id);
    check_exit_against_record(&o, record.as_deref());
    expect(&o, 4, &["aborted, the VM keeps running at the source"]);
    assert!(
        text(&o).contains("stop-and-copy"),
        "it was paused: {}",
        text(&o)
    );
    assert!(sender_took < Duration::from_secs(2 + 4), "{sender_took:?}");
    let until = Duration::from_secs(RECV_PROGRESS_SECS + 4);
    assert!(
        eventually(until.saturating_sub(holed.elapsed()), || d
            .log()
            .lines()
            .any(|l| l.contains("migration not received") && l.contains(&id))),
        "{}",
        d.log()
    );
    assert!(names(&sinks).is_empty(), "{:?}", names(&sinks));
    retry_works(&w, "bh", &d.addr, &sinks);
    drop(proxy);
}

/// A black hole for the destination's `Claimed` (after it won the claim): the sender
/// hears nothing within its claim timeout, tries to revert, loses to the claim at the
/// key service and reports it (exit 0): the VM runs at the destination only.
#[test]
fn a_black_holed_claimed_is_read_from_the_record() {
    let w = World::new();
    w.policy("bh", QUICK);
    let sinks = w.p("sinks");
    let d = daemon(&w, &sinks, &w.p("recv.log"), &[]);
    let proxy = Proxy::start(
        &d.addr,
        Trigger::Frame {
            from_sender: false,
            frame_type: 15, // Claimed
        },
        true,
        None,
    );
    let o = start_send(&w, "bh", &proxy.addr, 8, &[]).wait(Duration::from_secs(30));
    assert!(proxy.fired_at().is_some(), "no Claimed seen:\n{}", text(&o));
    expect_claimed(&w, &o);
    assert!(
        eventually(Duration::from_secs(5), || names(&sinks)
            == ["bh.mem", "bh.state"]),
        "{:?}",
        names(&sinks)
    );
    retry_works(&w, "bh", &d.addr, &sinks);
    drop(proxy);
}

// ---------------------------------------------------------------------------------------
// 6. A full sink folder

/// Unmounts when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A 16 MiB guest into a 6 MiB tmpfs: the writes fail (ENOSPC), the sender aborts
/// (exit 4), nothing is left in the folder, and a 2 MiB guest then fits.
#[test]
fn a_full_sink_folder_aborts_and_leaves_room() {
    let w = World::new();
    let sinks = w.p("sinks");
    fs::create_dir(&sinks).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&sinks)
        .output()
        .unwrap();
    if !mounted.status.success() {
        eprintln!(
            "skipped: cannot mount a tmpfs (needs root): {}",
            String::from_utf8_lossy(&mounted.stderr).trim()
        );
        return;
    }
    let _mount = Mount(sinks.clone());
    w.policy("big", QUICK);
    let d = daemon(&w, &sinks, &w.p("recv.log"), &[]);
    let o = send(&w, "big", &d.addr, 16, &[]);
    expect(&o, 4, &["aborted, the VM keeps running at the source"]);
    let id = migration_id(&o);
    // Both ends record the abort, each as soon as it knows (the destination after its
    // `Abort` went out, the sender as it ends); whichever lands first, the record says
    // `aborted` — it need not be there the instant the sender exits.
    let mut recorded = None;
    let aborted = eventually(Duration::from_secs(5), || {
        recorded = w.outcome(&id);
        recorded.as_deref() == Some("aborted")
    });
    assert!(
        aborted,
        "record {recorded:?}; vmotion-send said:\n{}",
        text(&o)
    );
    assert!(
        eventually(Duration::from_secs(5), || names(&sinks).is_empty()),
        "{:?}",
        names(&sinks)
    );
    expect_claimed(&w, &send(&w, "big", &d.addr, 2, &[]));
    assert!(
        eventually(Duration::from_secs(5), || names(&sinks)
            == ["big.mem", "big.state"]),
        "{:?}",
        names(&sinks)
    );
    assert_eq!(fs::metadata(sinks.join("big.mem")).unwrap().len(), 2 << 20);
    drop(d);
}
