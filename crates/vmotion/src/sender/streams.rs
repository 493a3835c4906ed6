//! The data streams at the source: each reads pages from guest memory straight into
//! batches, seals and writes them, paced to its share of the bandwidth cap.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use vmotion_engine::PageRange;
use vmotion_mover::GuestMemory;
use vmotion_proto::message::{PagesBuilder, StreamTotals};
use vmotion_proto::{FrameType, Sealer};

use crate::error::MigrateError;
use crate::transport::WriteHalf;
use crate::wire::{write_frame, write_parts};

/// A write that must finish within `limit`.
async fn bounded(
    limit: Duration,
    write: impl Future<Output = std::io::Result<()>>,
) -> Result<(), MigrateError> {
    match tokio::time::timeout(limit, write).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(MigrateError::Timeout {
            waiting_for: "the receiver to take data (a data stream made no progress)",
            after: limit,
        }),
    }
}

/// Aborts the stream tasks when the migration ends, whichever way: none keeps a socket
/// or the guest memory after `migrate` returns.
pub(super) struct Tasks(pub(super) Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Work for one data stream.
pub(super) enum Job {
    Pages {
        ranges: Vec<PageRange>,
        done: oneshot::Sender<Result<(u64, u64), MigrateError>>,
    },
    End {
        done: oneshot::Sender<Result<(StreamTotals, u32), MigrateError>>,
    },
}

pub(super) struct StreamConfig {
    pub(super) page_size: usize,
    pub(super) max_payload: usize,
    pub(super) bytes_per_second: Option<f64>,
    /// A write that makes no progress for this long fails the stream (a peer that stopped
    /// reading, a path that black-holes).
    pub(super) write_timeout: Duration,
    /// Touched after every write: the session's progress deadline reads it.
    pub(super) activity: Arc<crate::activity::Activity>,
}

/// One data stream: reads pages from guest memory straight into batches, seals them and
/// writes them, in the order the jobs come (so a page's later copy follows its earlier
/// one on the same connection).
pub(super) async fn stream_task(
    mut w: WriteHalf,
    mut sealer: Sealer,
    memory: Arc<dyn GuestMemory>,
    mut jobs: mpsc::Receiver<Job>,
    cfg: StreamConfig,
) {
    let mut builder = PagesBuilder::new(cfg.page_size, cfg.max_payload);
    let mut pacer = Pacer {
        origin: Instant::now(),
        sent: 0,
    };
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Pages { ranges, done } => {
                let r = send_pages(
                    &mut w,
                    &mut sealer,
                    &*memory,
                    &mut builder,
                    &ranges,
                    &cfg,
                    &mut pacer,
                )
                .await;
                let _ = done.send(r);
            }
            Job::End { done } => {
                let totals = StreamTotals {
                    frames: sealer.frames_sealed(),
                    bytes: sealer.bytes_sealed(),
                };
                let epoch = sealer.epoch();
                let r = async {
                    let eos = sealer.seal_end_of_stream()?;
                    bounded(cfg.write_timeout, write_frame(&mut w, &eos)).await?;
                    bounded(cfg.write_timeout, w.shutdown()).await?;
                    Ok((totals, epoch))
                }
                .await;
                let _ = done.send(r);
                return;
            }
        }
    }
}

/// Paces a stream to its share of the bandwidth cap.
pub(super) struct Pacer {
    /// Where the schedule starts.
    origin: Instant,
    /// Bytes sent since `origin`.
    sent: u64,
}

/// Idle time earns at most this much credit: a stream that waited (between iterations,
/// or while zero pages cost nothing) may burst this long above the cap, no longer — else
/// one fast pass would make the engine believe the link is faster than the cap.
const PACING_BURST: Duration = Duration::from_millis(20);

impl Pacer {
    /// Counts `n` bytes sent and returns how long to wait to stay under `rate`.
    fn after(&mut self, n: u64, rate: f64) -> Option<Duration> {
        let schedule = |p: &Self| Duration::from_secs_f64(p.sent as f64 / rate);
        let elapsed = self.origin.elapsed();
        if elapsed.saturating_sub(schedule(self)) > PACING_BURST {
            let now = Instant::now();
            self.origin = now.checked_sub(PACING_BURST).unwrap_or(now);
            self.sent = 0;
        }
        self.sent += n;
        schedule(self).checked_sub(self.origin.elapsed())
    }
}

#[allow(clippy::too_many_arguments)]
async fn send_pages(
    w: &mut WriteHalf,
    sealer: &mut Sealer,
    memory: &dyn GuestMemory,
    builder: &mut PagesBuilder,
    ranges: &[PageRange],
    cfg: &StreamConfig,
    pacer: &mut Pacer,
) -> Result<(u64, u64), MigrateError> {
    let mut pages = 0u64;
    let mut bytes = 0u64;
    async fn flush(
        w: &mut WriteHalf,
        sealer: &mut Sealer,
        builder: &mut PagesBuilder,
        cfg: &StreamConfig,
        pacer: &mut Pacer,
    ) -> Result<u64, MigrateError> {
        if builder.is_empty() {
            return Ok(0);
        }
        let payload = builder.finish();
        let (h, t) = sealer.seal_in_place(FrameType::Pages, payload)?;
        bounded(cfg.write_timeout, write_parts(w, &h, payload, &t)).await?;
        cfg.activity.touch();
        let n = (payload.len() + 40) as u64;
        if let Some(wait) = cfg.bytes_per_second.and_then(|rate| pacer.after(n, rate)) {
            tokio::time::sleep(wait).await;
        }
        Ok(n)
    }
    for r in ranges {
        for page in r.start..r.end() {
            loop {
                let added = builder.push_with(page, |dst| memory.read_pages(page, dst))?;
                if added {
                    break;
                }
                bytes += flush(w, sealer, builder, cfg, pacer).await?;
            }
            pages += 1;
        }
    }
    bytes += flush(w, sealer, builder, cfg, pacer).await?;
    Ok((pages, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that sat idle gets a short burst, not the whole idle time as credit:
    /// otherwise a pass after a quiet one runs far above the cap and the engine believes
    /// the link is faster than it is.
    #[test]
    fn idle_time_earns_only_a_short_burst() {
        let rate = 1_000_000.0; // 1 MB/s
        let mut p = Pacer {
            origin: Instant::now(),
            sent: 0,
        };
        std::thread::sleep(Duration::from_millis(200));
        // 100 ms worth at once after 200 ms idle: only PACING_BURST of it is free.
        let wait = p.after(100_000, rate).expect("must wait");
        assert!(
            wait >= Duration::from_millis(60) && wait <= Duration::from_millis(81),
            "{wait:?}"
        );
        // Ahead of the schedule nothing is reset: the next bytes wait too.
        assert!(p.after(10_000, rate).is_some());
    }
}
