//! Migrations across an emulated long-distance link: two hosts in network namespaces
//! (`vmotion_testbed::WanBed`), 150 ms round trip, 1 Gbit/s, 0.1 % loss, the real
//! binaries on each side and a key service both reach over their management links.
//! Skips, saying why, where namespaces or TUN devices cannot be made (not root).

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use vmotion_testbed::{WanBed, WanLink};

const MIB: u64 = 64;

fn wan_bin() -> PathBuf {
    keyservice_bin().with_file_name("vmotion-wan")
}

struct Bed {
    wan: WanBed,
    w: World,
    _recv: Proc,
    addr: String,
}

impl Bed {
    fn new() -> Option<Self> {
        if let Err(why) = vmotion_testbed::wan_available() {
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let wan = WanBed::new(WanLink::long_distance(), &wan_bin()).unwrap();
        let w = World::at(&wan.management_ip());
        let sinks = w.p("sinks");
        let mut recv = wan.command('b', RECV);
        recv.args(["--listen", &format!("{}:0", wan.wan_ip('b'))])
            .args(["--sink", "memfile", "--sink-dir"])
            .arg(&sinks)
            .args(w.identity("dst"));
        let (recv, addr) = spawn_listening(&mut recv);
        Some(Self {
            wan,
            w,
            _recv: recv,
            addr,
        })
    }

    /// `vmotion-send` in host A: a 64 MiB synthetic guest to host B, encrypted.
    fn send(&self, vm: &str) -> Command {
        let mut cmd = self.wan.command('a', SEND);
        cmd.args(["--vm", vm, "--to", &self.addr, "--policy-dir"])
            .arg(self.w.p("policy"))
            .args(self.w.identity("src"))
            .args(["--destination", "dst", "--json"])
            .args(["--synthetic-mib", &MIB.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn sinks(&self) -> PathBuf {
        self.w.p("sinks")
    }

    /// The guest arrived whole: its memory at B equals the source's.
    fn assert_arrived(&self, vm: &str) {
        use vmotion_mover::synthetic::{SyntheticConfig, SyntheticGuest};
        let memory = SyntheticGuest::start(SyntheticConfig {
            pages: MIB * 256,
            writers: 2,
            ..SyntheticConfig::default()
        })
        .snapshot();
        let path = self.sinks().join(format!("{vm}.mem"));
        wait_for_file(&path);
        let got = std::fs::read(&path).unwrap();
        assert!(
            got == memory,
            "{vm}: the memory at B differs from the source's"
        );
    }
}

fn report(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("no JSON ({e}): {}", text(o)))
}

/// Across 150 ms of round trip, at 0.1 % loss: encrypted, whole, and the round trips
/// really taken (the handshake, the key fetch and the claim each cross the link).
#[test]
fn an_encrypted_migration_crosses_a_lossy_long_distance_link() {
    let Some(bed) = Bed::new() else { return };
    bed.w.policy("far", "encryption = \"required\"\n");
    let o = bed.send("far").output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r = report(&o);
    assert_eq!(r["mode"], "encrypted", "{r}");
    let total = r["total_ms"].as_f64().unwrap();
    assert!(
        total > 450.0,
        "{total} ms: fewer than 3 round trips of 150 ms?"
    );
    bed.assert_arrived("far");
}

/// A 3 s cut of the link during pre-copy: the connections ride it out (TCP retransmits;
/// nothing times out that soon) and the guest arrives whole.
#[test]
fn a_three_second_cut_in_pre_copy_is_ridden_out() {
    let Some(bed) = Bed::new() else { return };
    // About 4 s of pre-copy, so the cut falls in it.
    bed.w.policy(
        "cut",
        "encryption = \"required\"\nmax_bandwidth = \"16MiB/s\"\n",
    );
    let child = bed.send("cut").spawn().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || bed
            .sinks()
            .join("cut.receiving")
            .exists()),
        "the guest never started arriving"
    );
    std::thread::sleep(Duration::from_millis(500));
    bed.wan.set_link('a', false).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    bed.wan.set_link('a', true).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    bed.assert_arrived("cut");
}

/// A cut longer than the connections' patience (`TCP_USER_TIMEOUT`, 30 s): the source
/// aborts with the guest still its own (exit 4), and the destination keeps nothing.
#[test]
fn a_cut_past_the_connections_patience_aborts_with_the_vm_at_the_source() {
    let Some(bed) = Bed::new() else { return };
    bed.w.policy(
        "gone",
        "encryption = \"required\"\nmax_bandwidth = \"8MiB/s\"\n",
    );
    let child = bed.send("gone").spawn().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || bed
            .sinks()
            .join("gone.receiving")
            .exists()),
        "the guest never started arriving"
    );
    bed.wan.set_link('a', false).unwrap();
    let cut = Instant::now();
    let o = child.wait_with_output().unwrap();
    let waited = cut.elapsed();
    bed.wan.set_link('a', true).unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        waited < Duration::from_secs(90),
        "{waited:?}: a cut must end the migration within its timeouts"
    );
    assert!(
        eventually(Duration::from_secs(120), || !bed
            .sinks()
            .join("gone.receiving")
            .exists()),
        "the destination kept the half-received guest"
    );
    assert!(!bed.sinks().join("gone.mem").exists());
}
