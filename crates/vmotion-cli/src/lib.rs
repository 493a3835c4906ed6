//! Shared pieces of vmotion's command-line tools: the key-service flags, the progress
//! display, the KVM micro-VM as a receiver's sink, the memory-file sink folder
//! ([`sink_dir`]), the source QEMU of `vmotion-send --qemu` ([`qemu_source`]) and the
//! destination QEMU of `vmotion-recv --qemu-qmp` ([`qemu_destination`]).

#![forbid(unsafe_code)]

pub mod evacuate;
pub mod metrics;
pub mod qemu_destination;
pub mod qemu_source;
pub mod sink_dir;

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmotion::{Progress, Stage};

/// Renders [`Progress`] reports: one line rewritten in place on a terminal, a plain log
/// line per stage change or every two seconds otherwise; or, for a program that runs
/// `vmotion-send` ([`ProgressDisplay::json`]), one JSON object per line.
#[derive(Debug)]
pub struct ProgressDisplay {
    tty: bool,
    json: bool,
    last: Mutex<(Option<Stage>, u32, Instant)>,
}

/// How often a JSON progress line is written, at most (a new stage always is).
const JSON_PROGRESS_EVERY: Duration = Duration::from_millis(250);

impl Default for ProgressDisplay {
    fn default() -> Self {
        Self::new()
    }
}

fn mb(bytes: impl Into<f64>) -> f64 {
    bytes.into() / 1e6
}

impl ProgressDisplay {
    /// A display on standard error.
    pub fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            json: false,
            last: Mutex::new((None, u32::MAX, Instant::now())),
        }
    }

    /// A display for programs (`--progress json`): on standard error, one object per
    /// line, `{"progress": {...}, "line": "…"}`, at a new stage and at most every 250 ms.
    pub fn json() -> Self {
        Self {
            json: true,
            ..Self::new()
        }
    }

    /// One JSON progress line: the figures, and the human line.
    pub fn json_line(p: &Progress) -> String {
        let stage = match p.stage {
            Stage::Queued => "queued",
            Stage::PreCopy => "pre-copy",
            Stage::StopAndCopy => "stop-and-copy",
            Stage::Switchover => "switchover",
            Stage::Done => "done",
        };
        serde_json::json!({
            "progress": {
                "stage": stage,
                "iteration": p.iteration,
                "bytes_sent": p.bytes_sent,
                "guest_bytes": p.guest_bytes,
                "remaining_bytes": p.remaining_bytes,
                "throughput_bytes_per_sec": p.throughput,
                "throttle_percent": p.throttle_percent,
                "elapsed_ms": p.elapsed.as_secs_f64() * 1e3,
            },
            "line": Self::line(p),
        })
        .to_string()
    }

    /// One line describing `p`.
    pub fn line(p: &Progress) -> String {
        let stage = match p.stage {
            Stage::Queued => return Self::queued_line(p.elapsed),
            Stage::PreCopy => "pre-copy",
            Stage::StopAndCopy => "stop-and-copy",
            Stage::Switchover => "switchover",
            Stage::Done => "done",
        };
        let eta = p
            .eta
            .map_or_else(|| "-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()));
        format!(
            "{stage:<13} iter {:>2}  sent {:>8.1} MB  remaining {:>7.1} MB  dirty {:>7.0} pages/s  {:>7.1} MB/s  throttle {:>2}%  eta {eta}  [{:.1}s]",
            p.iteration,
            mb(p.bytes_sent as f64),
            mb(p.remaining_bytes as f64),
            p.dirty_rate_pages,
            mb(p.throughput),
            p.throttle_percent,
            p.elapsed.as_secs_f64(),
        )
    }

    /// The line shown while the key service has no admission slot for the migration yet,
    /// `waited` so far.
    pub fn queued_line(waited: Duration) -> String {
        format!(
            "queued: waiting for an admission slot at the key service ({} s)",
            waited.as_secs()
        )
    }

    /// Shows a report.
    pub fn show(&self, p: &Progress) {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut err = std::io::stderr().lock();
        if self.json {
            let since = Instant::now().saturating_duration_since(last.2);
            if last.0 != Some(p.stage) || since >= JSON_PROGRESS_EVERY {
                let _ = writeln!(err, "{}", Self::json_line(p));
                last.2 = Instant::now();
            }
        } else if self.tty {
            let _ = write!(err, "\r\x1b[2K{}", Self::line(p));
            if p.stage == Stage::Done {
                let _ = writeln!(err);
            }
        } else if log_line_due(&last, p, Instant::now()) {
            let _ = writeln!(err, "{}", Self::line(p));
            last.2 = Instant::now();
        }
        let _ = err.flush();
        last.0 = Some(p.stage);
        last.1 = p.iteration;
    }
}

/// Off a terminal: whether `p` gets a log line, given the last one shown (stage,
/// iteration, when). A new stage always does; a new iteration after 2 s; a queue, which
/// has no iterations, every 10 s, so a log shows the wait going on.
fn log_line_due(last: &(Option<Stage>, u32, Instant), p: &Progress, now: Instant) -> bool {
    let since = now.saturating_duration_since(last.2);
    if last.0 != Some(p.stage) {
        return true;
    }
    if p.stage == Stage::Queued {
        return since >= Duration::from_secs(10);
    }
    last.1 != p.iteration && since >= Duration::from_secs(2)
}

/// A KVM micro-VM as a receiver's sink: built paused, resumed on `Commit`.
#[derive(Debug)]
pub struct KvmSink(pub vmotion_vmm::MicroVm);

impl vmotion::Sink for KvmSink {
    fn memory(&self) -> std::sync::Arc<dyn vmotion_mover::GuestMemory> {
        std::sync::Arc::new(self.0.memory_handle())
    }

    fn control(&mut self) -> &mut dyn vmotion_mover::VmControl {
        &mut self.0
    }

    /// The micro-VM lives in this process: nothing of it can outlive a crash.
    fn persist(&mut self) -> Result<(), vmotion_mover::MoverError> {
        Ok(())
    }

    /// Dropping the micro-VM frees it.
    fn discard(&mut self) -> Result<(), vmotion_mover::MoverError> {
        Ok(())
    }
}

/// A micro-VM's write pattern from the CLI's `--pattern` (uniform, sequential, hot:N).
pub fn kvm_pattern(s: &str) -> Result<vmotion_vmm::Pattern, String> {
    use vmotion_vmm::Pattern;
    match s {
        "uniform" => Ok(Pattern::Random),
        "sequential" => Ok(Pattern::Sequential),
        other => match other.strip_prefix("hot:").map(str::parse::<u64>) {
            Some(Ok(pages)) if pages > 0 => Ok(Pattern::HotSet { pages }),
            _ => Err(format!(
                "--pattern: `{other}` is not uniform, sequential or hot:N (N pages above 0)"
            )),
        },
    }
}

/// Logs to stderr at `RUST_LOG`, or `default` (e.g. "warn"), coloured on a terminal.
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Completes at SIGINT or SIGTERM (never, where SIGTERM cannot be watched).
pub async fn shutdown_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// How reports and metrics name a migration's mode: `encrypted` or `plaintext`, and for
/// plaintext, why.
pub fn mode_fields(mode: vmotion_proto::Mode) -> (&'static str, Option<String>) {
    match mode {
        vmotion_proto::Mode::Encrypted(_) => ("encrypted", None),
        vmotion_proto::Mode::Plaintext(reason) => ("plaintext", Some(reason.to_string())),
    }
}

/// Sends SIGINT to process `pid` (a child this program started); a process already gone
/// is not an error.
pub fn interrupt(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
    }
}

/// The key-service flags `vmotion-send` and `vmotion-recv` share.
#[derive(Debug, clap::Args)]
pub struct KeyServiceArgs {
    /// Key service: one or more comma-separated URLs (https://HOST:PORT), the replicas
    /// of one service (e.g. https://ks1:7443,https://ks2:7443); a call that fails on one
    /// moves to the next. Without it there are no keys: this host's migrations can only
    /// be plaintext.
    #[arg(long, requires_all = ["ca", "cert", "key"])]
    pub keyservice: Option<String>,
    /// CA certificate that signed the key service's certificate.
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// This host's client certificate (its identity is the certificate's DNS name).
    #[arg(long)]
    pub cert: Option<std::path::PathBuf>,
    /// This host's private key.
    #[arg(long)]
    pub key: Option<std::path::PathBuf>,
}

impl KeyServiceArgs {
    /// A client for the key service, or `None` without `--keyservice`.
    pub fn client(
        &self,
    ) -> Result<
        Option<vmotion_keyservice_client::KeyServiceClient>,
        vmotion_keyservice_client::ClientError,
    > {
        match (&self.keyservice, &self.ca, &self.cert, &self.key) {
            (Some(url), Some(ca), Some(cert), Some(key)) => {
                vmotion_keyservice_client::KeyServiceClient::new(
                    url,
                    &vmotion_keyservice_client::ClientIdentity {
                        ca: ca.clone(),
                        cert: cert.clone(),
                        key: key.clone(),
                    },
                )
                .map(Some)
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_migration_says_so_with_the_time_waited() {
        let p = Progress {
            stage: Stage::Queued,
            iteration: 0,
            bytes_sent: 0,
            guest_bytes: 1 << 30,
            remaining_bytes: 1 << 30,
            dirty_rate_pages: 0.0,
            throughput: 0.0,
            throttle_percent: 0,
            elapsed: Duration::from_millis(12_700),
            eta: None,
        };
        assert_eq!(
            ProgressDisplay::line(&p),
            "queued: waiting for an admission slot at the key service (12 s)"
        );
        let running = Progress {
            stage: Stage::PreCopy,
            ..p
        };
        assert!(ProgressDisplay::line(&running).starts_with("pre-copy"));
    }

    #[test]
    fn off_a_terminal_a_queue_is_logged_every_ten_seconds() {
        let t0 = Instant::now();
        let queued = Progress {
            stage: Stage::Queued,
            iteration: 0,
            bytes_sent: 0,
            guest_bytes: 0,
            remaining_bytes: 0,
            dirty_rate_pages: 0.0,
            throughput: 0.0,
            throttle_percent: 0,
            elapsed: Duration::ZERO,
            eta: None,
        };
        let s = Duration::from_secs;
        assert!(
            log_line_due(&(None, u32::MAX, t0), &queued, t0),
            "first line"
        );
        let shown = (Some(Stage::Queued), 0, t0);
        assert!(!log_line_due(&shown, &queued, t0 + s(9)));
        assert!(log_line_due(&shown, &queued, t0 + s(10)));
        // Pre-copy as before: a stage change at once, a new iteration after 2 s.
        let precopy = Progress {
            stage: Stage::PreCopy,
            ..queued
        };
        assert!(log_line_due(&shown, &precopy, t0 + s(1)));
        let shown = (Some(Stage::PreCopy), 0, t0);
        assert!(
            !log_line_due(&shown, &precopy, t0 + s(30)),
            "same iteration"
        );
        let next = Progress {
            iteration: 1,
            ..precopy
        };
        assert!(!log_line_due(&shown, &next, t0 + s(1)));
        assert!(log_line_due(&shown, &next, t0 + s(2)));
    }
}
