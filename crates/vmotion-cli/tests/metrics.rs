//! `vmotion-recv --metrics`: scraped with a real HTTP client (curl) before, during and
//! after a migration with the real binaries, the values checked against the migration's
//! own report.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `curl` of the daemon's /metrics; `None` where curl is missing.
fn scrape(addr: &str, path: &str) -> Option<(String, String)> {
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    Some((code.to_owned(), body.to_owned()))
}

/// The value of the sample `name` (with its labels, as written) in `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn metrics_follow_a_migration_and_match_its_report() {
    if scrape("127.0.0.1:1", "/").is_none() {
        eprintln!("SKIPPED: curl not found");
        return;
    }
    let w = World::new();
    w.policy(
        "vm-x",
        "encryption = \"required\"\nmax_bandwidth = \"16MiB/s\"\n",
    );
    let metrics = format!("127.0.0.1:{}", free_port());
    let sinks = w.p("sinks");
    let (_recv, addr) = w.recv(
        Some("dst"),
        &[
            "--metrics",
            &metrics,
            "--sink",
            "memfile",
            "--sink-dir",
            sinks.to_str().unwrap(),
        ],
    );
    let (code, before) = scrape(&metrics, "/metrics").unwrap();
    assert_eq!(code, "200", "{before}");
    assert_eq!(
        sample(&before, "vmotion_migrations_in_flight"),
        Some(0.0),
        "{before}"
    );
    assert!(before.trim_end().ends_with("# EOF"), "{before}");
    assert_eq!(scrape(&metrics, "/other").unwrap().0, "404");

    let mut send = w.send_command("vm-x", &addr, true);
    let sending = send
        .args(["--synthetic-mib", "32", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || sinks
            .join("vm-x.receiving")
            .exists()),
        "the guest never started arriving"
    );
    let (_, during) = scrape(&metrics, "/metrics").unwrap();
    assert_eq!(
        sample(&during, "vmotion_migrations_in_flight"),
        Some(1.0),
        "{during}"
    );
    let out = sending.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();

    let (_, after) = scrape(&metrics, "/metrics").unwrap();
    let succeeded =
        "vmotion_migrations_total{kind=\"memory\",result=\"succeeded\",mode=\"encrypted\"}";
    assert_eq!(sample(&after, succeeded), Some(1.0), "{after}");
    assert_eq!(
        sample(&after, "vmotion_migrations_in_flight"),
        Some(0.0),
        "{after}"
    );
    let pages: u64 = report["iterations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pages"].as_u64().unwrap())
        .sum();
    let got = sample(&after, "vmotion_migration_pages_total").unwrap();
    eprintln!("report pages {pages}, metrics pages {got}, report {report}");
    assert_eq!(got, pages as f64, "{after}\n{report}");
    // Payload received: what the sender put on the wire less frame headers and tags
    // (zero pages travel as flags, so both are below the guest's 32 MiB).
    let bytes = sample(&after, "vmotion_migration_data_processed_bytes_total").unwrap();
    let wire = report["bytes_sent"].as_f64().unwrap();
    assert!(
        bytes > 0.9 * wire && bytes <= wire,
        "{bytes} payload, {wire} on the wire"
    );
}
