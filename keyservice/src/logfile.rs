//! Append-only JSON-lines files written by a dedicated thread: the outcome journal (fsynced
//! before a durable append is acknowledged) and the audit log.
//!
//! Writes are batched: the thread takes every line queued since its last write, writes
//! them, syncs once if any of them asked for durability, then acknowledges them all (group
//! commit). Callers on the async side never block on the disk.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tokio::sync::oneshot;

type Ack = oneshot::Sender<io::Result<()>>;

enum Entry {
    Line { line: String, ack: Option<Ack> },
    Flush(Ack),
}

/// Handle to a log file's writer thread. Dropping every handle ends the thread after it
/// has written what was queued.
#[derive(Clone)]
pub(crate) struct LogFile {
    tx: mpsc::Sender<Entry>,
    path: PathBuf,
}

impl std::fmt::Debug for LogFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogFile").field("path", &self.path).finish()
    }
}

impl LogFile {
    /// Opens (creating folders and the file) `path` for appending. `sync` makes durable
    /// appends wait for `fdatasync`.
    pub(crate) fn open(path: &Path, sync: bool) -> io::Result<Self> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        if sync {
            // The file's directory entry must be durable too, or the first fsynced line
            // can vanish with the file after a power loss.
            File::open(dir.unwrap_or(Path::new(".")))?.sync_all()?;
        }
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!(
                "log:{}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ))
            .spawn(move || writer(file, &rx, sync))?;
        Ok(Self {
            tx,
            path: path.to_owned(),
        })
    }

    /// Queues a line (a newline is added); returns at once.
    pub(crate) fn append(&self, line: String) {
        // A send error means the writer died on an I/O error it already reported to the
        // durable appends; plain appends are best effort.
        let _ = self.tx.send(Entry::Line { line, ack: None });
    }

    /// Queues a line and waits until it is written and (for a synced log) on disk.
    pub(crate) async fn append_durable(&self, line: String) -> io::Result<()> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Entry::Line {
                line,
                ack: Some(ack),
            })
            .map_err(|_| io::Error::other("the log writer has stopped"))?;
        done.await
            .map_err(|_| io::Error::other("the log writer has stopped"))?
    }

    /// Waits until everything queued so far is written.
    pub(crate) async fn flush(&self) -> io::Result<()> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Entry::Flush(ack))
            .map_err(|_| io::Error::other("the log writer has stopped"))?;
        done.await
            .map_err(|_| io::Error::other("the log writer has stopped"))?
    }
}

fn writer(file: File, rx: &mpsc::Receiver<Entry>, sync: bool) {
    let mut out = BufWriter::with_capacity(64 * 1024, file);
    while let Ok(first) = rx.recv() {
        let mut acks = Vec::new();
        let mut durable = false;
        let mut result = Ok(());
        for entry in std::iter::once(first).chain(rx.try_iter()) {
            match entry {
                Entry::Line { line, ack } => {
                    if result.is_ok() {
                        result = out
                            .write_all(line.as_bytes())
                            .and_then(|()| out.write_all(b"\n"));
                    }
                    if let Some(a) = ack {
                        durable = true;
                        acks.push(a);
                    }
                }
                Entry::Flush(a) => acks.push(a),
            }
        }
        result = result.and_then(|()| out.flush());
        if sync && durable {
            result = result.and_then(|()| out.get_ref().sync_data());
        }
        for a in acks {
            let _ = a.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
        if let Err(e) = result {
            tracing::error!(error = %e, "log write failed; the writer stops");
            return;
        }
    }
}

/// Reads a JSON-lines file and repairs a torn tail: if the last line has no newline (a
/// crash or a full disk mid-write), the file is cut back to the last complete line and
/// synced, so the next append starts on a line of its own. Returns the complete lines.
pub(crate) fn read_repairing(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        tracing::warn!(path = %path.display(), dropped = bytes.len() - complete, "cutting a torn last line");
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(complete as u64)?;
        f.sync_all()?;
    }
    Ok(bytes[..complete]
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}
