//! `vmotion-evacuate` with the real binaries: a key service (admission limit of 2
//! migrations per source host), three destination daemons, and eight guests to move.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const EVACUATE: &str = env!("CARGO_BIN_EXE_vmotion-evacuate");
/// The destinations: the World's PKI names them.
const DESTINATIONS: [&str; 3] = ["dst", "plain", "weak"];
const VMS: usize = 8;

struct Bed {
    w: World,
    daemons: Vec<Option<Proc>>,
    addrs: Vec<String>,
}

impl Bed {
    fn new(policy: &str) -> Self {
        let w = World::new();
        let mut daemons = Vec::new();
        let mut addrs = Vec::new();
        for d in DESTINATIONS {
            let sinks = w.p(&format!("sinks-{d}"));
            let args = ["--sink", "memfile", "--sink-dir", sinks.to_str().unwrap()];
            let (p, a) = w.recv(Some(d), &args);
            daemons.push(Some(p));
            addrs.push(a);
        }
        for i in 0..VMS {
            w.policy(&format!("vm{i}"), policy);
        }
        Self { w, daemons, addrs }
    }

    fn evacuate(&self, extra: &[&str]) -> Child {
        self.evacuate_command(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn evacuate_command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(EVACUATE);
        cmd.args(["--host", "src", "--json", "--policy-dir"])
            .arg(self.w.p("policy"))
            .args(self.w.identity("src"));
        for (d, a) in DESTINATIONS.iter().zip(&self.addrs) {
            cmd.args(["--to", &format!("{d}={a}")]);
        }
        if !extra.contains(&"--inventory") {
            for i in 0..VMS {
                cmd.args(["--synthetic", &format!("vm{i}:8")]);
            }
        }
        cmd.args(extra);
        cmd
    }

    /// The eight VMs in an inventory file.
    fn inventory(&self) -> String {
        let path = self.w.p("inventory");
        let lines: String = (0..VMS).map(|i| format!("vm{i} synthetic:8\n")).collect();
        std::fs::write(&path, format!("# the source host's VMs\n{lines}")).unwrap();
        path.to_str().unwrap().to_owned()
    }

    fn sinks(&self, d: &str) -> PathBuf {
        self.w.p(&format!("sinks-{d}"))
    }

    /// The destinations holding `vm`'s claimed guest.
    fn holders(&self, vm: &str) -> Vec<&'static str> {
        DESTINATIONS
            .into_iter()
            .filter(|d| self.sinks(d).join(format!("{vm}.mem")).exists())
            .collect()
    }

    /// The most migrations from `src` in flight at any admission, from the key
    /// service's own audit records.
    fn most_in_flight_from_src(&self) -> u64 {
        std::fs::read_to_string(self.w.p("state/audit.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"create_migration\"") && l.contains("\"result\":\"ok\""))
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["in_flight"]["source"].as_u64().unwrap()
            })
            .max()
            .unwrap_or(0)
    }
}

fn finish(child: Child) -> (Option<i32>, Value, String) {
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): {}\n{err}",
            String::from_utf8_lossy(&o.stdout)
        )
    });
    (o.status.code(), v, err)
}

/// The memory of the idle 8 MiB synthetic guests the evacuations move (seeded, so every
/// run and every VM starts from the same bytes).
fn source_memory() -> Vec<u8> {
    use vmotion_mover::synthetic::{SyntheticConfig, SyntheticGuest};
    SyntheticGuest::start(SyntheticConfig {
        pages: 8 * 256,
        writers: 2,
        ..SyntheticConfig::default()
    })
    .snapshot()
}

/// Each VM is at exactly the destination the evacuation reports, and nowhere else, with
/// its memory byte for byte.
fn assert_each_vm_in_one_place(bed: &Bed, report: &Value) {
    let memory = source_memory();
    for vm in report["vms"].as_array().unwrap() {
        let name = vm["vm"].as_str().unwrap();
        assert_eq!(vm["outcome"], "moved", "{vm}");
        let holders = bed.holders(name);
        let at = vm["destination"].as_str().unwrap();
        assert_eq!(holders, [at], "{name} is held by {holders:?}");
        let got = std::fs::read(bed.sinks(at).join(format!("{name}.mem"))).unwrap();
        assert!(
            got == memory,
            "{name} at {at}: its memory differs from the source's"
        );
    }
}

fn host_status(w: &World, host: &str) -> String {
    let o = Command::new(keyservice_bin())
        .args(["host", "status", host])
        .args(w.identity("src"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Eight VMs to three destinations under a limit of 2 per source host: never more than
/// 2 in flight (the key service's records), every VM at exactly one destination, the
/// host drained and reported empty.
#[test]
fn eight_vms_leave_for_three_destinations_two_at_a_time() {
    let bed = Bed::new("encryption = \"required\"\n");
    // More at once than the limit allows: the key service queues the rest.
    let (code, report, err) = finish(bed.evacuate(&["--parallel", "4"]));
    assert_eq!(code, Some(0), "{report}\n{err}");
    assert_eq!(report["host_empty"], true, "{report}");
    assert_eq!(report["vms"].as_array().unwrap().len(), VMS);
    assert_each_vm_in_one_place(&bed, &report);
    for vm in report["vms"].as_array().unwrap() {
        assert_eq!(vm["mode"], "encrypted", "{vm}");
    }
    let most = bed.most_in_flight_from_src();
    assert!((1..=2).contains(&most), "{most} in flight at once from src");
    // Spread over the destinations, first fit by free room (no capacities: all equal).
    let used: Vec<&str> = DESTINATIONS
        .into_iter()
        .filter(|d| {
            report["vms"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["destination"] == *d)
        })
        .collect();
    assert!(used.len() >= 2, "{report}");
    assert_eq!(host_status(&bed.w, "src"), "src: draining (in maintenance)");
}

/// A destination killed mid-evacuation: its VMs that had not arrived are moved elsewhere;
/// none is lost or held twice.
#[test]
fn a_destination_killed_mid_evacuation_loses_nothing() {
    // Slow enough that migrations are caught in flight.
    let mut bed = Bed::new("encryption = \"required\"\nmax_bandwidth = \"16MiB/s\"\n");
    let evacuating = bed.evacuate(&["--parallel", "2", "--retries", "2"]);
    let victim = 1; // "plain"
    let sinks = bed.sinks(DESTINATIONS[victim]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_dir(&sinks)
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().ends_with(".receiving"))
        })
        .unwrap_or(false)
    {
        assert!(
            Instant::now() < deadline,
            "nothing arrived at {}",
            DESTINATIONS[victim]
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(bed.daemons[victim].take()); // SIGKILL
    let (code, report, err) = finish(evacuating);
    assert_eq!(code, Some(0), "{report}\n{err}");
    assert_eq!(report["host_empty"], true, "{report}");
    assert_each_vm_in_one_place(&bed, &report);
    let retried = report["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["attempts"].as_u64().unwrap() > 1)
        .count();
    assert!(
        retried >= 1,
        "a VM cut at the dead destination was retried: {report}"
    );
    assert!(bed.most_in_flight_from_src() <= 2);
}

/// SIGINT mid-evacuation (with `--cancel-in-flight` when `cancel`): no new migration
/// starts; those in flight finish (or are cancelled, their VMs staying here). Every VM
/// is where the report says: at its destination when moved, nowhere else otherwise.
fn interrupted(cancel: bool) -> Vec<Value> {
    let bed = Bed::new("encryption = \"required\"\nmax_bandwidth = \"16MiB/s\"\n");
    let mut extra = vec!["--parallel", "2"];
    if cancel {
        extra.push("--cancel-in-flight");
    }
    let evacuating = bed.evacuate(&extra);
    // Once the first guests are arriving somewhere.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !DESTINATIONS.iter().any(|d| {
        std::fs::read_dir(bed.sinks(d))
            .map(|e| {
                e.filter_map(Result::ok)
                    .any(|e| e.file_name().to_string_lossy().ends_with(".receiving"))
            })
            .unwrap_or(false)
    }) {
        assert!(Instant::now() < deadline, "nothing started");
        std::thread::sleep(Duration::from_millis(5));
    }
    Command::new("kill")
        .args(["-INT", &evacuating.id().to_string()])
        .status()
        .unwrap();
    let (code, report, err) = finish(evacuating);
    assert_eq!(code, Some(1), "{report}\n{err}");
    assert_eq!(report["host_empty"], false, "{report}");
    let vms = report["vms"].as_array().unwrap().clone();
    let moved = vms.iter().filter(|v| v["outcome"] == "moved").count();
    assert!(moved < VMS, "new ones did not start: {report}");
    for v in &vms {
        let name = v["vm"].as_str().unwrap();
        let holders = bed.holders(name);
        if v["outcome"] == "moved" {
            assert_eq!(holders, [v["destination"].as_str().unwrap()], "{v}");
        } else {
            assert!(
                holders.is_empty(),
                "{name} not moved, yet held by {holders:?}"
            );
        }
    }
    vms
}

#[test]
fn sigint_stops_new_migrations_and_lets_those_in_flight_finish() {
    let vms = interrupted(false);
    assert!(
        vms.iter().any(|v| v["outcome"] == "moved"),
        "those in flight finished: {vms:?}"
    );
    for v in vms.iter().filter(|v| v["outcome"] != "moved") {
        let outcome = v["outcome"].as_str().unwrap();
        assert!(outcome.contains("stopped by a signal"), "{v}");
    }
}

#[test]
fn sigint_with_cancel_in_flight_cancels_them_and_their_vms_stay() {
    let vms = interrupted(true);
    // The migrations in flight were passed the signal and ended without moving their
    // VM (a synthetic guest's vmotion-send ends at SIGINT); none was tried again.
    let cancelled: Vec<&Value> = vms
        .iter()
        .filter(|v| v["attempts"] == 1 && v["outcome"].as_str().unwrap().starts_with("failed"))
        .collect();
    assert!(
        !cancelled.is_empty(),
        "a migration in flight was cancelled: {vms:?}"
    );
}

/// On a terminal (a pseudo-terminal from `script`) the evacuation draws one line per VM
/// in flight, with vmotion-send's own progress, under a totals line; the final JSON is
/// unchanged. The VMs come from an inventory file.
#[test]
fn a_terminal_shows_one_line_per_vm_in_flight_and_the_totals() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIPPED: script (util-linux) not found");
        return;
    }
    let bed = Bed::new("encryption = \"required\"\nmax_bandwidth = \"8MiB/s\"\n");
    let inventory = bed.inventory();
    let cmd = bed.evacuate_command(&["--parallel", "2", "--inventory", &inventory]);
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_str().unwrap()))
        .collect::<Vec<_>>()
        .join(" ");
    let typescript = bed.w.p("typescript");
    let o = Command::new("script")
        .args(["-qefc", &line])
        .arg(&typescript)
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{screen}");
    // The live lines: a VM on its way with vmotion-send's progress, and the totals.
    assert!(screen.contains("vm0 → "), "{screen}");
    assert!(screen.contains("pre-copy"), "{screen}");
    assert!(screen.contains("in flight"), "{screen}");
    assert!(screen.contains("8 of 8 moved"), "{screen}");
    // Redrawn in place: cursor movements, not one line per update.
    assert!(screen.contains("\x1b["), "{screen}");
    let json_at = screen.find("{\"host_empty\"").expect("the JSON report");
    let report: Value =
        serde_json::from_str(screen[json_at..].lines().next().unwrap().trim()).unwrap();
    assert_eq!(report["host_empty"], true, "{report}");
    assert_each_vm_in_one_place(&bed, &report);
}
