//! The replicated control plane with the real binaries: a 3-member etcd cluster on
//! loopback (Debian's `etcd-server`), two `vmotion-keyservice` replicas on it, and real
//! `vmotion-send` / `vmotion-recv` given both replicas' URLs. Replicas and etcd members
//! are SIGKILLed mid-migration; each test checks where the VM ended up against the record,
//! read on every replica. Skips, saying why, where no `etcd` is installed.

mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmotion_testbed::EtcdCluster;

/// Encrypted at 4 MB/s: 8 MiB take about 2 s, a window for each kill.
const SLOW: &str = "encryption = \"required\"\nclaim_timeout = \"5s\"\nprogress_timeout = \"5s\"\nmax_bandwidth = \"4MB/s\"\n";
/// Encrypted at 16 MB/s: half a second per 8 MiB, so ten of them overlap.
const PACED: &str = "encryption = \"required\"\nmax_bandwidth = \"16MB/s\"\n";

/// The cluster: PKI, KEK, etcd, two replicas on fixed ports (so a restart comes back on
/// the same URL).
struct Ha {
    dir: tempfile::TempDir,
    etcd: EtcdCluster,
    replicas: Vec<Option<Proc>>,
    addrs: Vec<String>,
}

impl Ha {
    fn start() -> Option<Self> {
        if let Err(why) = vmotion_testbed::etcd_available() {
            eprintln!("skipped: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        vmotion_testbed::keyservice_pki(&keyservice_bin(), dir.path(), "src,dst,third").unwrap();
        fs::create_dir(dir.path().join("policy")).unwrap();
        let etcd = EtcdCluster::start(3).unwrap();
        let mut ha = Self {
            dir,
            etcd,
            replicas: vec![None, None],
            addrs: vec!["127.0.0.1:0".into(), "127.0.0.1:0".into()],
        };
        for i in 0..2 {
            ha.start_replica(i);
        }
        Some(ha)
    }

    fn p(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn write_config(&self, i: usize) -> PathBuf {
        let endpoints = self
            .etcd
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let path = self.p(&format!("ks{i}.toml"));
        fs::write(
            &path,
            format!(
                "listen = \"{}\"\nca = \"ca.pem\"\ncert = \"keyservice.pem\"\n\
                 key = \"keyservice-key.pem\"\naudit_log = \"ks{i}/audit.jsonl\"\n\
                 [store]\nkind = \"etcd\"\nendpoints = [{endpoints}]\nkek_file = \"kek\"\n\
                 request_timeout = \"2s\"\n",
                self.addrs[i]
            ),
        )
        .unwrap();
        path
    }

    /// Starts replica `i` (again on its port, once it has one).
    fn start_replica(&mut self, i: usize) {
        let config = self.write_config(i);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.p(&format!("ks{i}.log")))
                .unwrap();
            let mut cmd = Command::new(keyservice_bin());
            cmd.args(["serve", "--config"]).arg(&config);
            match vmotion_testbed::spawn_listening(&mut cmd, log.into()) {
                Ok((child, addr)) => {
                    self.addrs[i] = addr;
                    self.replicas[i] = Some(Proc(child));
                    return;
                }
                Err(why) => eprintln!("replica {i}: {why}; again"), // the port may not be free yet
            }
            assert!(Instant::now() < deadline, "replica {i} did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill_replica(&mut self, i: usize) {
        if let Some(mut p) = self.replicas[i].take() {
            let _ = p.0.kill();
            let _ = p.0.wait();
        }
    }

    /// `--keyservice A,B` (replica 0 first) and this host's certificate.
    fn identity(&self, host: &str, first: usize) -> Vec<String> {
        let urls = [first, 1 - first]
            .iter()
            .map(|&i| format!("https://{}", self.addrs[i]))
            .collect::<Vec<_>>()
            .join(",");
        let p = |f: String| self.p(&f).display().to_string();
        vec![
            "--keyservice".into(),
            urls,
            "--ca".into(),
            p("ca.pem".into()),
            "--cert".into(),
            p(format!("hosts/{host}.pem")),
            "--key".into(),
            p(format!("hosts/{host}-key.pem")),
        ]
    }

    fn policy(&self, vm: &str, text: &str) {
        fs::write(self.p(&format!("policy/{vm}.toml")), text).unwrap();
    }

    /// vmotion-recv as "dst" with a memfile sink, replica 0 first.
    fn daemon(&self, sinks: &Path) -> (Proc, String) {
        let mut cmd = Command::new(RECV);
        cmd.args(["--listen", "127.0.0.1:0", "--sink", "memfile", "--sink-dir"])
            .arg(sinks)
            .args(["--progress-timeout", "5"])
            .args(self.identity("dst", 0))
            .env("RUST_LOG", "info");
        let log = fs::File::create(self.p("recv.log")).unwrap();
        spawn_listening_logged(&mut cmd, log.into())
    }

    /// Starts vmotion-send of `vm` (8 MiB) from `host` to the daemon at `to`.
    fn send(&self, vm: &str, host: &str, first: usize, to: &str, extra: &[&str]) -> Child {
        Command::new(SEND)
            .args(["--vm", vm, "--to", to, "--policy-dir"])
            .arg(self.p("policy"))
            .args(["--synthetic-mib", "8", "--dirty-rate", "2000", "--json"])
            .args(self.identity(host, first))
            .args(["--destination", "dst"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The id of the migration the service created for `vm` (from either replica's
    /// audit log: a report that ends in an error may not name it).
    fn created_for(&self, vm: &str) -> String {
        let needle = format!("\"vm\":\"{vm}\"");
        self.audit(0)
            .lines()
            .chain(self.audit(1).lines())
            .filter(|l| l.contains("\"create_migration\"") && l.contains("\"result\":\"ok\""))
            .find(|l| l.contains(&needle))
            .and_then(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                Some(v["migration_id"].as_str()?.to_owned())
            })
            .unwrap_or_else(|| panic!("no migration of {vm} was created"))
    }

    /// The record of migration `id` as replica `i` answers it (read as the destination).
    fn outcome_at(&self, i: usize, id: &str) -> Option<String> {
        let bytes: Vec<u8> = (0..16)
            .map(|k| u8::from_str_radix(&id[2 * k..2 * k + 2], 16).unwrap())
            .collect();
        let mid = vmotion_proto::MigrationId(bytes.try_into().unwrap());
        let client = vmotion_keyservice_client::KeyServiceClient::new(
            &format!("https://{}", self.addrs[i]),
            &vmotion_keyservice_client::ClientIdentity {
                ca: self.p("ca.pem"),
                cert: self.p("hosts/dst.pem"),
                key: self.p("hosts/dst-key.pem"),
            },
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(client.outcome(mid));
        r.unwrap_or_else(|e| panic!("replica {i}: the outcome of {id}: {e}"))
            .outcome
            .map(|o| o.as_str().to_owned())
    }

    fn audit(&self, i: usize) -> String {
        fs::read_to_string(self.p(&format!("ks{i}/audit.jsonl"))).unwrap_or_default()
    }
}

impl Drop for Ha {
    fn drop(&mut self) {
        for i in 0..self.replicas.len() {
            self.kill_replica(i);
        }
    }
}

fn wait_output(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vmotion-send did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn migration_id(o: &Output) -> String {
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("no JSON report:\n{}", text(o)));
    v["migration_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no migration id:\n{}", text(o)))
        .to_owned()
}

/// Where a kill lands.
#[derive(Debug, Clone, Copy)]
enum When {
    /// Replica 0 answered the create.
    AfterCreate,
    /// Replica 0 handed out the key; the outcome is still to come.
    AfterFetch,
    /// The guest is persisted at the destination (`Ready` and the commit follow within
    /// milliseconds), plus this many microseconds.
    AroundTheOutcome(u64),
}

/// Replica 0 (the first URL of every host) SIGKILLed at each step of a migration: the
/// migration commits exactly once (exit 0, `claimed`) or ends with the VM at the source
/// (exit 4, `aborted`/`reverted`); the record reads the same on both replicas; the
/// destination keeps the guest exactly when the record says `claimed`.
#[test]
fn a_replica_killed_at_each_step_commits_once_or_leaves_the_vm_at_the_source() {
    let Some(mut ha) = Ha::start() else { return };
    let sinks = ha.p("sinks");
    let steps = [
        When::AfterCreate,
        When::AfterFetch,
        When::AroundTheOutcome(0),
        When::AroundTheOutcome(1_000),
        When::AroundTheOutcome(5_000),
    ];
    for (round, when) in steps.into_iter().enumerate() {
        let vm = format!("r{round}");
        ha.policy(&vm, SLOW);
        // A daemon of its own per round: a client keeps to the replica that last answered,
        // and the last round's kill moved the previous daemon to replica 1.
        let (daemon, addr) = ha.daemon(&sinks);
        let fetches = |ha: &Ha| ha.audit(0).matches("\"fetch_key\"").count();
        let fetched_before = fetches(&ha);
        let sending = ha.send(&vm, "src", 0, &addr, &[]);
        // Every 2 ms: the guest is unsettled for only milliseconds before the claim.
        let hit = poll_until(
            Duration::from_secs(20),
            Duration::from_millis(2),
            || match when {
                When::AfterCreate => ha.audit(0).lines().any(|l| {
                    l.contains("\"create_migration\"") && l.contains(&format!("\"vm\":\"{vm}\""))
                }),
                When::AfterFetch => fetches(&ha) > fetched_before,
                When::AroundTheOutcome(_) => sinks.join(format!("{vm}.unsettled")).exists(),
            },
        );
        assert!(hit, "round {round}: {when:?} never happened");
        if let When::AroundTheOutcome(us) = when {
            std::thread::sleep(Duration::from_micros(us));
        }
        ha.kill_replica(0);
        let o = wait_output(sending, Duration::from_secs(60));
        let id = ha.created_for(&vm);
        let on_b = ha.outcome_at(1, &id);
        ha.start_replica(0);
        assert_eq!(
            ha.outcome_at(0, &id),
            on_b,
            "round {round}: the replicas disagree"
        );
        let t = text(&o);
        match o.status.code() {
            Some(0) => assert_eq!(on_b.as_deref(), Some("claimed"), "{when:?}: {t}"),
            Some(4) => assert!(
                matches!(on_b.as_deref(), Some("aborted" | "reverted")),
                "{when:?}: exit 4 with record {on_b:?}: {t}"
            ),
            _ => panic!("{when:?}: unexpected exit, record {on_b:?}: {t}"),
        }
        let claimed = on_b.as_deref() == Some("claimed");
        assert!(
            eventually(Duration::from_secs(10), || {
                let settled = !sinks.join(format!("{vm}.receiving")).exists()
                    && !sinks.join(format!("{vm}.unsettled")).exists();
                settled && sinks.join(format!("{vm}.mem")).exists() == claimed
            }),
            "{when:?}: the destination's folder does not match {on_b:?}"
        );
        eprintln!("{when:?}: exit {:?}, record {on_b:?}", o.status.code());
        drop(daemon);
    }
}

/// Ten migrations from one host against its limit of two, through both replicas: each
/// sender waits its turn (`busy`, then admitted), all ten complete, and every create the
/// service admitted counted at most two in flight from the host.
#[test]
fn ten_senders_queue_behind_a_limit_of_two() {
    let Some(ha) = Ha::start() else { return };
    let sinks = ha.p("sinks");
    let (_daemon, addr) = ha.daemon(&sinks);
    let senders: Vec<(String, Child)> = (0..10)
        .map(|i| {
            let vm = format!("q{i}");
            ha.policy(&vm, PACED);
            let child = ha.send(&vm, "src", i % 2, &addr, &["--queue-timeout", "2m"]);
            (vm, child)
        })
        .collect();
    let mut ids = Vec::new();
    for (vm, child) in senders {
        let o = wait_output(child, Duration::from_secs(150));
        expect(&o, 0, &[]);
        ids.push((vm, migration_id(&o)));
    }
    for (vm, id) in &ids {
        assert_eq!(ha.outcome_at(0, id).as_deref(), Some("claimed"), "{vm}");
        assert!(sinks.join(format!("{vm}.mem")).exists(), "{vm}");
    }
    let (mut admitted, mut busy) = (0, 0);
    for line in ha.audit(0).lines().chain(ha.audit(1).lines()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["action"] != "create_migration" {
            continue;
        }
        match v["result"].as_str() {
            Some("ok") => {
                admitted += 1;
                let n = v["in_flight"]["source"].as_u64().unwrap();
                assert!(n <= 2, "admitted with {n} in flight from src: {line}");
            }
            Some("busy") => busy += 1,
            other => panic!("unexpected create result {other:?}: {line}"),
        }
    }
    assert_eq!(admitted, 10);
    assert!(
        busy > 0,
        "ten at once against a limit of two must have queued"
    );
}

/// The same VM from two hosts at once, each through another replica: one migrates, the
/// other is refused before anything is sent, naming the migration in flight.
#[test]
fn the_same_vm_from_two_hosts_at_once() {
    let Some(ha) = Ha::start() else { return };
    let sinks = ha.p("sinks");
    let (_daemon, addr) = ha.daemon(&sinks);
    ha.policy("twin", SLOW);
    let one = ha.send("twin", "src", 0, &addr, &[]);
    let two = ha.send("twin", "third", 1, &addr, &[]);
    let (one, two) = (
        wait_output(one, Duration::from_secs(60)),
        wait_output(two, Duration::from_secs(60)),
    );
    let (won, lost) = match (one.status.code(), two.status.code()) {
        (Some(0), Some(3)) => (one, two),
        (Some(3), Some(0)) => (two, one),
        _ => panic!("expected one 0 and one 3:\n{}\n{}", text(&one), text(&two)),
    };
    let id = migration_id(&won);
    expect(&lost, 3, &["already has migration", &id]);
    assert_eq!(ha.outcome_at(1, &id).as_deref(), Some("claimed"));
}

/// One etcd member SIGKILLed mid-migration (then a second replica's member): nothing
/// lost, nothing refused.
#[test]
fn an_etcd_member_killed_mid_migration_changes_nothing() {
    let Some(mut ha) = Ha::start() else { return };
    let sinks = ha.p("sinks");
    let (_daemon, addr) = ha.daemon(&sinks);
    ha.policy("steady", SLOW);
    let sending = ha.send("steady", "src", 0, &addr, &[]);
    assert!(eventually(Duration::from_secs(20), || sinks
        .join("steady.receiving")
        .exists()));
    ha.etcd.kill(0);
    let o = wait_output(sending, Duration::from_secs(60));
    expect(&o, 0, &[]);
    let id = migration_id(&o);
    assert_eq!(ha.outcome_at(0, &id).as_deref(), Some("claimed"));
    assert_eq!(ha.outcome_at(1, &id).as_deref(), Some("claimed"));
}

/// Quorum lost mid-migration (2 of 3 etcd members SIGKILLed during pre-copy): the
/// service fails closed, so the sender finds the arbiter silent before the pause and
/// aborts with the VM never paused (exit 4), and the destination keeps nothing. Quorum
/// back: the same replicas serve again by themselves, and the source retries its own
/// stale migration with `--abort-stale`.
#[test]
fn quorum_lost_mid_migration_leaves_the_vm_at_the_source() {
    let Some(mut ha) = Ha::start() else { return };
    let sinks = ha.p("sinks");
    let (_daemon, addr) = ha.daemon(&sinks);
    ha.policy("q", SLOW);
    let sending = ha.send("q", "src", 0, &addr, &[]);
    assert!(eventually(Duration::from_secs(20), || sinks
        .join("q.receiving")
        .exists()));
    ha.etcd.kill(1);
    ha.etcd.kill(2);
    let o = wait_output(sending, Duration::from_secs(60));
    expect(&o, 4, &["aborted, the VM keeps running at the source"]);
    assert!(
        eventually(Duration::from_secs(15), || !sinks
            .join("q.receiving")
            .exists()
            && !sinks.join("q.unsettled").exists()
            && !sinks.join("q.mem").exists()),
        "the destination kept something of a migration that never committed"
    );
    ha.etcd.restart(1).unwrap();
    ha.etcd.restart(2).unwrap();
    ha.etcd.wait_healthy(Duration::from_secs(30)).unwrap();
    let back = Instant::now();
    let id = ha.created_for("q");
    // The replicas' etcd connections come back by themselves, within seconds: until
    // then a sender is refused before it starts (exit 1, `unavailable`).
    let mut last = None;
    let served = eventually(Duration::from_secs(30), || {
        let o = wait_output(
            ha.send("q", "src", 1, &addr, &["--abort-stale"]),
            Duration::from_secs(60),
        );
        let code = o.status.code();
        // Not yet: the key service still unavailable (exit 1), or the daemon still
        // finishing the migration the outage cut (it records that one's abort, with its
        // own deadlines, before it takes the VM again: exit 3, "already in flight").
        let daemon_busy = code == Some(3) && text(&o).contains("is already in flight");
        assert!(matches!(code, Some(0 | 1)) || daemon_busy, "{}", text(&o));
        let done = code == Some(0);
        last = Some(o);
        done
    });
    let o = last.unwrap();
    assert!(
        served,
        "not served again after quorum returned:\n{}",
        text(&o)
    );
    eprintln!("served again {:?} after quorum returned", back.elapsed());
    let again = migration_id(&o);
    assert_eq!(ha.outcome_at(0, &again).as_deref(), Some("claimed"));
    // Nothing was recorded while etcd had no quorum; the retry aborted it.
    assert_eq!(ha.outcome_at(1, &id).as_deref(), Some("aborted"));
}
