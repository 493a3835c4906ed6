//! Announcements on a real (virtual) link: a veth pair inside a network namespace made
//! for the test, the sender on one end and a capture on the other, both the
//! `vmotion-announce` binary run with `ip netns exec`. Needs root and iproute2 (CI has
//! both); elsewhere the test says why it skips.

use std::process::Stdio;

use std::time::Duration;
use vmotion_announce::netns::TestNetns;

use vmotion_announce::{Schedule, garp_frame, rarp_frame};

const BIN: &str = env!("CARGO_BIN_EXE_vmotion-announce");

#[test]
fn announcements_arrive_on_the_link_in_rounds() {
    let ns = match TestNetns::create("ann") {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!(
                "SKIPPED: cannot make a test network namespace (needs root and iproute2): {e}"
            );
            return;
        }
    };
    let mut capture = ns
        .exec(BIN)
        .args([
            "capture",
            "--interface",
            "vb",
            "--count",
            "10",
            "--timeout-secs",
            "10",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the capture socket is open.
    let mut stdout = std::io::BufReader::new(capture.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "capturing");
    let sent = ns
        .exec(BIN)
        .args([
            "send",
            "--interface",
            "va",
            "--mac",
            "52:54:00:12:34:56",
            "--ip",
            "192.0.2.10",
        ])
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(capture.wait().unwrap().success(), "{rest}");

    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let rarp: String = rarp_frame(mac).iter().map(|b| format!("{b:02x}")).collect();
    let garp: String = garp_frame(mac, "192.0.2.10".parse().unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let frames: Vec<(String, f64, String)> = rest
        .lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            (
                f.next().unwrap().to_owned(),
                f.next().unwrap().parse().unwrap(),
                f.next().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(frames.len(), 10, "{rest}");
    for (i, (kind, _, hex)) in frames.iter().enumerate() {
        let (want_kind, want) = if i % 2 == 0 {
            ("rarp", &rarp)
        } else {
            ("arp", &garp)
        };
        assert_eq!(kind, want_kind);
        assert_eq!(
            hex, want,
            "frame {i} differs from the one the library builds"
        );
    }
    // Rounds are spaced by at least the schedule's gaps (lower bounds only: a busy machine
    // can only make them longer).
    let starts: Vec<f64> = frames.iter().step_by(2).map(|f| f.1).collect();
    for (w, gap) in starts.windows(2).zip(Schedule::default().gaps()) {
        let seen = Duration::from_secs_f64(w[1] - w[0]);
        assert!(
            seen + Duration::from_millis(5) >= gap,
            "gap {seen:?} shorter than {gap:?}"
        );
    }
}
