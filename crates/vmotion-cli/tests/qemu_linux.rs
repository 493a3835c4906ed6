//! A real Linux guest (Debian's cloud kernel and busybox, `scripts/linux-guest.sh`)
//! migrated live by one command, `vmotion-send --qemu QMP_SOCKET`, through a real
//! `vmotion-recv --tunnel` with keys from a live key service. The guest prints a numbered
//! heartbeat on its serial console every 100 ms: the source's log followed by the
//! destination's must count on without a gap, so the guest ran on where it arrived.
//!
//! The guest runs under TCG: on the nested hypervisor of the development machines this
//! kernel does not boot under KVM in useful time (`vmotion_qemu::linux`). Each test skips,
//! saying why, without QEMU or without the guest (`scripts/test.sh` builds it).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use vmotion_qemu::linux::{self, LinuxGuest};
use vmotion_qemu::{Qemu, QemuConfig};

const MIB: u64 = 256;

/// The guest, or `None` (the reason printed) where it cannot run.
fn guest() -> Option<LinuxGuest> {
    if vmotion_qemu::qemu_binary().is_none() {
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed (.ci/run installs it)");
        return None;
    }
    match LinuxGuest::in_dir(&linux::default_dir()) {
        Ok(g) => {
            eprintln!("Linux guest under {:?}", linux::linux_accel());
            Some(g)
        }
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// The key service, a `vmotion-recv --tunnel` (with `extra` flags) delivering to
/// `RUN/{vm}.incoming`, the guest, and guest memory in /dev/shm.
struct Bed {
    w: World,
    run: PathBuf,
    addr: String,
    _recv: Proc,
    guest: LinuxGuest,
    mem: tempfile::TempDir,
}

impl Bed {
    fn new(extra: &[&str]) -> Option<Self> {
        let guest = guest()?;
        let w = World::new();
        let run = w.p("run");
        std::fs::create_dir(&run).unwrap();
        let incoming = format!("unix:{}", run.join("{vm}.incoming").display());
        let qmp = format!("unix:{}", run.join("{vm}.vmotion.qmp").display());
        let mut args = extra.to_vec();
        args.extend(["--tunnel", &incoming]);
        if args.contains(&"--qemu-qmp") {
            // The daemon reaches each VM's destination QEMU at RUN/{vm}.vmotion.qmp.
            let at = args.iter().position(|a| *a == "--qemu-qmp").unwrap();
            args.insert(at + 1, &qmp);
        }
        let log = std::fs::File::create(run.join("recv.log")).unwrap();
        let mut cmd = Command::new(RECV);
        cmd.args(["--listen", "127.0.0.1:0"])
            .args(&args)
            .args(w.identity("dst"))
            .env("RUST_LOG", "info");
        let (recv, addr) = spawn_listening_logged(&mut cmd, log.into());
        let mem = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        Some(Self {
            w,
            run,
            addr,
            _recv: recv,
            guest,
            mem,
        })
    }

    /// QEMU `name`, with a second QMP socket for vmotion-send ([`Bed::vmotion_qmp`]):
    /// QEMU serves one client per QMP socket, and the test holds the first.
    fn config(&self, name: &str, dirty: (u64, u64)) -> QemuConfig {
        let mem = self.mem.path().join(format!("{name}.mem"));
        let mut c = self.guest.config(name, &self.run, MIB, &mem, dirty);
        c.extra_args.extend([
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                self.vmotion_qmp(name).display()
            ),
        ]);
        c
    }

    fn vmotion_qmp(&self, name: &str) -> PathBuf {
        self.run.join(format!("{name}.vmotion.qmp"))
    }

    /// Boots the guest as `name` and waits for its first heartbeat.
    fn boot(&self, name: &str, dirty: (u64, u64)) -> Qemu {
        let q = Qemu::spawn(self.config(name, dirty)).unwrap();
        let log = self.serial(name);
        assert!(
            eventually(Duration::from_secs(90), || !linux::heartbeats(&log)
                .unwrap()
                .is_empty()),
            "no heartbeat from the guest: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        q
    }

    /// A destination QEMU `name`, waiting (`-incoming defer`) for someone to say where.
    fn waiting(&self, name: &str) -> Qemu {
        let mut c = self.config(name, (0, 0));
        c.incoming = Some("defer".into());
        Qemu::spawn(c).unwrap()
    }

    /// A destination QEMU `name` for VM `vm`, listening where the daemon delivers it.
    fn destination(&self, name: &str, vm: &str, multifd: Option<u16>) -> Qemu {
        let mut q = self.waiting(name);
        if let Some(n) = multifd {
            q.qmp().set_capabilities(&[("multifd", true)]).unwrap();
            q.qmp()
                .set_parameters(json!({ "multifd-channels": n }))
                .unwrap();
        }
        let uri = format!("unix:{}", self.run.join(format!("{vm}.incoming")).display());
        q.qmp().migrate_incoming(&uri).unwrap();
        q
    }

    fn serial(&self, name: &str) -> PathBuf {
        self.run.join(format!("{name}.serial"))
    }

    /// `vmotion-send --qemu` of `vm` from QEMU `src`, with `extra` flags.
    fn send(&self, vm: &str, src: &Qemu, extra: &[&str]) -> Child {
        Command::new(SEND)
            .args(["--vm", vm, "--to", &self.addr, "--policy-dir"])
            .arg(self.w.p("policy"))
            .args(self.w.identity("src"))
            .args(["--destination", "dst", "--json", "--qemu"])
            .arg(self.vmotion_qmp(&src.config().name))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

/// Waits (bounded) for `child` and returns its exit code, stdout and stderr.
fn finish(mut child: Child, limit: Duration) -> (Option<i32>, String, String) {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vmotion-send did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stdout = String::new();
    out.read_to_string(&mut stdout).unwrap();
    let code = child.wait().unwrap().code();
    (code, stdout, reader.join().unwrap())
}

/// One hop: `vm` from QEMU `src` to a new destination QEMU `dst_name`; checks the
/// report and both QEMUs' states, and returns the destination and the report.
fn hop(bed: &Bed, vm: &str, src: &mut Qemu, dst_name: &str, multifd: Option<u16>) -> (Qemu, Value) {
    let dst = bed.destination(dst_name, vm, multifd);
    hop_to(bed, vm, src, dst, multifd)
}

/// [`hop`] to a destination QEMU made ready by someone else.
fn hop_to(
    bed: &Bed,
    vm: &str,
    src: &mut Qemu,
    mut dst: Qemu,
    multifd: Option<u16>,
) -> (Qemu, Value) {
    let streams = multifd.unwrap_or(1).to_string();
    let send = bed.send(vm, src, &["--streams", &streams]);
    let (code, out, err) = finish(send, Duration::from_secs(300));
    assert_eq!(code, Some(0), "vmotion-send --qemu: {out}\n{err}");
    let report: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("not a JSON report ({e}): {out}\n{err}"));
    assert_eq!(report["outcome"], "completed", "{report}");
    assert_eq!(report["qemu"]["status"], "completed", "{report}");
    assert!(report["qemu"]["downtime_ms"].as_u64().is_some(), "{report}");
    assert!(
        report["qemu"]["total_time_ms"].as_u64().is_some(),
        "{report}"
    );
    let tunnel = &report["tunnel"];
    assert_eq!(tunnel["mode"], "encrypted", "{report}");
    let connections = 1 + u64::from(multifd.unwrap_or(0));
    assert_eq!(tunnel["connections"], connections, "{report}");
    assert!(
        tunnel["bytes_from_destination"].as_u64().unwrap() > 0,
        "the return path crossed back: {report}"
    );
    // QEMU's verdict is recorded: the VM is free for its next migration.
    let id = tunnel["migration_id"].as_str().unwrap();
    assert_eq!(bed.w.outcome(id).as_deref(), Some("committed"), "{report}");
    assert_eq!(src.qmp().query_status().unwrap(), "postmigrate");
    dst.qmp()
        .wait_status("running", Duration::from_secs(20))
        .unwrap();
    (dst, report)
}

/// The guest's heartbeat, read across `logs` in the order it ran, counts on without a
/// break, and the last host keeps counting.
fn assert_heartbeat_unbroken(logs: &[PathBuf]) {
    let last_log = logs.last().unwrap();
    let before = linux::heartbeats(last_log).unwrap().len();
    assert!(
        eventually(Duration::from_secs(30), || linux::heartbeats(last_log)
            .unwrap()
            .len()
            >= before + 5),
        "the guest does not beat on at the destination"
    );
    let last = linux::unbroken(logs)
        .unwrap()
        .unwrap_or_else(|e| panic!("the heartbeat broke across the migration: {e}"));
    eprintln!(
        "heartbeat unbroken up to {last} over {} host(s)",
        logs.len()
    );
}

fn migrate_once(multifd: Option<u16>, dirty: (u64, u64)) {
    let Some(bed) = Bed::new(&[]) else { return };
    bed.w.policy("linux-vm", "encryption = \"required\"\n");
    let mut src = bed.boot("src", dirty);
    let (_dst, report) = hop(&bed, "linux-vm", &mut src, "dst", multifd);
    eprintln!("{report}");
    if dirty.0 > 0 {
        let iterations = report["qemu"]["iterations"].as_u64().unwrap();
        assert!(
            iterations >= 3,
            "a guest that rewrites its memory takes QEMU several iterations: {report}"
        );
    }
    assert_heartbeat_unbroken(&[bed.serial("src"), bed.serial("dst")]);
}

#[test]
fn a_linux_guest_migrates_live_with_one_command() {
    migrate_once(None, (0, 0));
}

#[test]
fn a_linux_guest_migrates_live_over_multifd() {
    migrate_once(Some(2), (0, 0));
}

#[test]
fn a_linux_guest_rewriting_its_memory_migrates_live() {
    migrate_once(Some(2), (64, 0));
}

/// `vmotion-recv --qemu-qmp`: the daemon sets the destination QEMU's multifd and issues
/// `migrate-incoming` itself; the test only starts QEMU with `-incoming defer`.
#[test]
fn the_daemon_readies_the_destination_qemu_itself() {
    let Some(bed) = Bed::new(&["--qemu-qmp"]) else {
        return;
    };
    bed.w.policy("auto", "encryption = \"required\"\n");
    let mut src = bed.boot("src", (0, 0));
    // Named after the VM: its QMP socket is where the daemon's template points.
    let dst = bed.waiting("auto");
    let (_dst, _) = hop_to(&bed, "auto", &mut src, dst, Some(2));
    assert_heartbeat_unbroken(&[bed.serial("src"), bed.serial("auto")]);
    // The daemon saw QEMU run the guest.
    let log = bed.run.join("recv.log");
    assert!(
        eventually(Duration::from_secs(10), || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("guest running here (QEMU)")),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// `--qemu-qmp` with no destination QEMU for the VM: the daemon's preparation fails, the
/// tunnel is aborted with that reason, QEMU's migration fails at the source (exit 6) and
/// the guest runs on there.
#[test]
fn a_missing_destination_qemu_fails_the_migration_with_the_reason() {
    let Some(bed) = Bed::new(&["--qemu-qmp"]) else {
        return;
    };
    bed.w.policy("nowhere", "encryption = \"required\"\n");
    let mut src = bed.boot("src", (0, 0));
    let (code, out, err) = finish(bed.send("nowhere", &src, &[]), Duration::from_secs(120));
    assert_eq!(code, Some(6), "{out}\n{err}");
    assert!(
        err.contains("preparing the destination hypervisor"),
        "{err}"
    );
    assert!(
        err.contains("nowhere.vmotion.qmp"),
        "the socket is named: {err}"
    );
    assert_eq!(
        src.qmp().migration_status().unwrap().as_deref(),
        Some("failed")
    );
    assert_eq!(src.qmp().query_status().unwrap(), "running");
    assert_beats_on(&bed, "src");
}

/// A stand-in for `virsh migrate`: migrates the QEMU at QMP socket argv[1] to
/// `$VMOTION_MIGRATE_URI` and exits 0 only when QEMU says `completed`.
const MIGRATE_COMMAND: &str = r#"
import json, os, socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
def cmd(c, a=None):
    m = {"execute": c}
    if a is not None: m["arguments"] = a
    f.write(json.dumps(m) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r: return r
f.readline(); cmd("qmp_capabilities")
cmd("migrate-set-parameters", {"max-bandwidth": 1 << 40})
cmd("migrate", {"uri": os.environ["VMOTION_MIGRATE_URI"]})
while True:
    r = cmd("query-migrate")["return"]; st = r.get("status")
    if st in ("completed", "failed", "cancelled"):
        if st != "completed": print(json.dumps(r), file=sys.stderr)
        sys.exit(0 if st == "completed" else 1)
    time.sleep(0.05)
"#;

/// `vmotion-send --tunnel ... -- COMMAND`: the command drives the hypervisor; its exit
/// status is the verdict, recorded at the key service. A command that succeeds: exit 0,
/// `committed`, the guest beating on at the destination. One that fails: exit 6,
/// `aborted`, the guest at the source.
#[test]
fn a_command_drives_the_migration_and_its_status_is_the_verdict() {
    let Some(bed) = Bed::new(&[]) else { return };
    bed.w.policy("cmd-vm", "encryption = \"required\"\n");
    let mut src = bed.boot("src", (0, 0));
    let run = |vm: &str, command: &[&str]| {
        let listen = format!("unix:{}", bed.run.join(format!("{vm}.out")).display());
        let child = Command::new(SEND)
            .args(["--vm", vm, "--to", &bed.addr, "--policy-dir"])
            .arg(bed.w.p("policy"))
            .args(bed.w.identity("src"))
            .args(["--destination", "dst", "--json", "--max-connections", "1"])
            .args(["--tunnel", &listen, "--"])
            .args(command)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        finish(child, Duration::from_secs(120))
    };
    // A command that fails: the hypervisor's verdict is "failed", the VM never left.
    let (code, out, err) = run("cmd-vm", &["false"]);
    assert_eq!(code, Some(6), "{out}\n{err}");
    assert_eq!(
        bed.w.outcome(&migration_of(&err)).as_deref(),
        Some("aborted")
    );
    assert_eq!(src.qmp().query_status().unwrap(), "running");
    // The VM is free again: the next migration of it goes ahead.
    let _dst = bed.destination("dst", "cmd-vm", None);
    let qmp = bed.vmotion_qmp("src").display().to_string();
    let (code, out, err) = run("cmd-vm", &["python3", "-c", MIGRATE_COMMAND, &qmp]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["outcome"], "completed", "{report}");
    assert_eq!(report["tunnel"]["mode"], "encrypted", "{report}");
    let id = report["tunnel"]["migration_id"].as_str().unwrap();
    assert_eq!(bed.w.outcome(id).as_deref(), Some("committed"));
    assert_eq!(src.qmp().query_status().unwrap(), "postmigrate");
    assert_heartbeat_unbroken(&[bed.serial("src"), bed.serial("dst")]);
}

/// Ten hops in a row, back and forth between two "hosts" (a new QEMU each time): the
/// heartbeat never breaks.
#[test]
fn ten_hops_back_and_forth_keep_the_heartbeat() {
    let Some(bed) = Bed::new(&[]) else { return };
    bed.w.policy("hopper", "encryption = \"required\"\n");
    let mut current = bed.boot("hop0", (16, 50));
    let mut logs = vec![bed.serial("hop0")];
    for i in 1..=10 {
        let name = format!("hop{i}");
        let multifd = (i % 2 == 0).then_some(2);
        let (next, _) = hop(&bed, "hopper", &mut current, &name, multifd);
        current.quit().unwrap();
        current = next;
        logs.push(bed.serial(&name));
    }
    assert_heartbeat_unbroken(&logs);
}

/// A `required` VM whose destination cannot encrypt: refused before QEMU sends a byte;
/// QEMU never started a migration and the guest runs on.
#[test]
fn a_required_vm_to_a_destination_that_cannot_encrypt_never_leaves() {
    let Some(bed) = Bed::new(&["--no-encryption"]) else {
        return;
    };
    bed.w.policy("secret", "encryption = \"required\"\n");
    let mut src = bed.boot("src", (0, 0));
    let _dst = bed.destination("dst", "secret", None);
    let (code, out, err) = finish(bed.send("secret", &src, &[]), Duration::from_secs(60));
    assert_eq!(code, Some(3), "refused: {out}\n{err}");
    assert!(err.contains("requires encryption"), "{err}");
    assert_eq!(
        src.qmp().migration_status().unwrap(),
        None,
        "QEMU never migrated"
    );
    assert_eq!(src.qmp().query_status().unwrap(), "running");
    assert_beats_on(&bed, "src");
}

/// Starts `vmotion-send --qemu` slowed down to 16 MiB/s and waits until QEMU has sent
/// 8 MiB: a migration caught in the middle. Returns the process and what it will have
/// said on stderr.
fn slow_migration(bed: &Bed, vm: &str, src: &mut Qemu) -> (Child, std::thread::JoinHandle<String>) {
    bed.w.policy(
        vm,
        "encryption = \"required\"\nmax_bandwidth = \"16MiB/s\"\n",
    );
    let mut send = bed.send(vm, src, &[]);
    // Wait for "tunnel ready", then for QEMU's bytes.
    let mut err = BufReader::new(send.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("tunnel ready") {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "no tunnel: {seen}");
        seen.push_str(&line);
    }
    let said = std::thread::spawn(move || {
        let _ = err.read_to_string(&mut seen);
        seen
    });
    assert!(
        eventually(Duration::from_secs(60), || {
            let r = src.qmp().query_migrate().unwrap();
            r["ram"]["transferred"].as_u64().unwrap_or(0) > 8 << 20
        }),
        "the migration does not progress"
    );
    (send, said)
}

/// The migration id in vmotion-send's "tunnel ready (..., migration ID)" line.
fn migration_of(said: &str) -> String {
    let at = said.find("migration ").expect("a migration id") + "migration ".len();
    said[at..at + 32].to_owned()
}

fn wait_code(mut child: Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        assert!(Instant::now() < deadline, "vmotion-send did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What interrupts a migration in the middle.
#[derive(Clone, Copy)]
enum Interruption {
    /// SIGINT to vmotion-send.
    Sigint,
    /// SIGKILL to the destination QEMU.
    DestinationKilled,
}

/// A migration interrupted in the middle ends with `code`, QEMU's migration status one
/// of `statuses`, the record `aborted`, and the guest beating on at the source.
fn interrupted(how: Interruption, code: i32, statuses: &[&str], says: &str) {
    let Some(bed) = Bed::new(&[]) else { return };
    let mut src = bed.boot("src", (0, 0));
    let dst = bed.destination("dst", "interrupted", None);
    let (send, said) = slow_migration(&bed, "interrupted", &mut src);
    let (signal, pid) = match how {
        Interruption::Sigint => ("-INT", send.id()),
        Interruption::DestinationKilled => ("-KILL", dst.pid()),
    };
    Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    let got = wait_code(send, Duration::from_secs(120));
    let said = said.join().unwrap();
    assert_eq!(got, Some(code), "{said}");
    assert!(said.contains(says), "{said}");
    let id = migration_of(&said);
    assert_eq!(bed.w.outcome(&id).as_deref(), Some("aborted"));
    let status = src.qmp().migration_status().unwrap();
    assert!(
        statuses.contains(&status.as_deref().unwrap_or("none")),
        "QEMU's migration ended {status:?}, not one of {statuses:?}"
    );
    assert_eq!(src.qmp().query_status().unwrap(), "running");
    assert_beats_on(&bed, "src");
}

/// The guest `name` keeps printing heartbeats.
fn assert_beats_on(bed: &Bed, name: &str) {
    let log = bed.serial(name);
    let beats = linux::heartbeats(&log).unwrap().len();
    assert!(
        eventually(Duration::from_secs(10), || linux::heartbeats(&log)
            .unwrap()
            .len()
            > beats),
        "the guest {name} stopped beating"
    );
}

/// SIGINT to `vmotion-send --qemu` mid-migration cancels QEMU's migration: exit 7, the
/// guest runs on at the source.
#[test]
fn sigint_cancels_the_migration_and_the_guest_runs_on() {
    // QEMU 10 now and then ends a cancelled migration `failed`: the return path's I/O
    // error from the cancel can win over the cancel itself.
    interrupted(
        Interruption::Sigint,
        7,
        &["cancelled", "failed"],
        "cancelled",
    );
}

/// The destination QEMU killed mid-migration: QEMU's migration fails at the source, the
/// guest runs on there, and vmotion-send says so with exit 6.
#[test]
fn a_destination_qemu_killed_mid_migration_leaves_the_guest_at_the_source() {
    interrupted(
        Interruption::DestinationKilled,
        6,
        &["failed"],
        "QEMU's migration failed",
    );
}
