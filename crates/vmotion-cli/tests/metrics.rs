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
            "--require-encryption",
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
    eprintln!("scraped after the migration:\n{after}");
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
    check_switchover_figures(&after, &report);
    check_refusals_and_dropped(&w, &addr, &metrics);
}

/// The destination's downtime, iterations and key epochs against the sender's report.
fn check_switchover_figures(after: &str, report: &Value) {
    // The report lists the pre-copy iterations; the stop-and-copy pass is apart.
    let iterations = report["iterations"].as_array().unwrap().len() as f64 + 1.0;
    assert_eq!(
        sample(after, "vmotion_migration_iterations_count"),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        sample(after, "vmotion_migration_iterations_sum"),
        Some(iterations),
        "{after}\n{report}"
    );
    let epochs = report["key_epochs"].as_f64().unwrap();
    assert_eq!(
        sample(after, "vmotion_migration_key_epochs_sum{kind=\"memory\"}"),
        Some(epochs),
        "{after}\n{report}"
    );
    // Seen from either end the pause is the same stretch, give or take a network delay
    // and the resume: on loopback, within a second of the source's figure, never zero.
    assert_eq!(
        sample(after, "vmotion_migration_downtime_seconds_count"),
        Some(1.0),
        "{after}"
    );
    let here = sample(after, "vmotion_migration_downtime_seconds_sum").unwrap();
    let source = report["downtime_ms"]["total"].as_f64().unwrap() / 1e3;
    eprintln!("downtime: {here} s here, {source} s at the source");
    assert!(
        here > 0.0 && (here - source).abs() < 1.0,
        "{here} s here, {source} s at the source"
    );
    let total = report["total_ms"].as_f64().unwrap() / 1e3;
    assert!(
        here < total,
        "{here} s of downtime in a {total} s migration"
    );
}

/// A plaintext migration to this `--require-encryption` daemon is refused and counted by
/// its reason; a connection that is no migration at all is counted as dropped.
fn check_refusals_and_dropped(w: &World, addr: &str, metrics: &str) {
    w.policy("vm-p", "encryption = \"disabled\"\n");
    let o = w.send("vm-p", addr, false, &[]);
    expect(&o, 3, &["refused"]);
    {
        use std::io::Write as _;
        let mut probe = std::net::TcpStream::connect(addr).unwrap();
        probe.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    }
    let reason = "vmotion_migration_refusals_total{reason=\"receiver_requires_encryption\"}";
    let dropped = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("vmotion_connections_dropped{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let mut last = String::new();
    let counted = eventually(Duration::from_secs(10), || {
        last = scrape(metrics, "/metrics").unwrap().1;
        sample(&last, reason) == Some(1.0) && dropped(&last) == 1.0
    });
    assert!(counted, "{last}");
    // An HTTP request is no frame header at all.
    assert!(
        last.contains("vmotion_connections_dropped{kind=\"no_first_frame\"} 1\n"),
        "{last}"
    );
}
