//! The crate's error type.

use std::fmt;
use std::io;
use std::process::ExitStatus;

/// What went wrong while driving QEMU.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// No `qemu-system-x86_64` was found (neither `VMOTION_QEMU` nor `PATH`).
    QemuNotFound,
    /// An I/O operation failed.
    Io {
        /// What was being done, e.g. "connecting to /run/src.qmp".
        what: String,
        /// The error.
        source: io::Error,
    },
    /// QEMU exited before it was ready or while a command was running.
    Exited {
        /// What was being waited for.
        what: String,
        /// How it exited.
        status: ExitStatus,
        /// The last lines of its log.
        log_tail: String,
    },
    /// Something did not happen in time.
    Timeout {
        /// What was being waited for, with the last state seen.
        what: String,
        /// The last lines of QEMU's log, when there is one.
        log_tail: String,
    },
    /// A QMP command returned an error.
    Command {
        /// The command.
        command: String,
        /// QMP's error class, e.g. `GenericError`.
        class: String,
        /// QMP's description.
        desc: String,
    },
    /// The QMP peer sent something that is not the QMP we expect.
    Protocol {
        /// What was wrong.
        what: String,
    },
    /// An external tool (e.g. `openssl`) failed.
    Tool {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] saying what was being done.
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// `text`, or `text` followed by QEMU's log tail when there is one.
fn with_log(f: &mut fmt::Formatter<'_>, log_tail: &str) -> fmt::Result {
    if log_tail.is_empty() {
        Ok(())
    } else {
        write!(f, "; QEMU's log ends with:\n{log_tail}")
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::QemuNotFound => f.write_str(
                "qemu-system-x86_64 not found: install QEMU or set VMOTION_QEMU to its path",
            ),
            Self::Io { what, source } => write!(f, "{what}: {source}"),
            Self::Exited {
                what,
                status,
                log_tail,
            } => {
                write!(f, "QEMU exited ({status}) {what}")?;
                with_log(f, log_tail)
            }
            Self::Timeout { what, log_tail } => {
                write!(f, "timed out {what}")?;
                with_log(f, log_tail)
            }
            Self::Command {
                command,
                class,
                desc,
            } => write!(f, "QMP command {command} failed: {desc} ({class})"),
            Self::Protocol { what } => write!(f, "QMP protocol error: {what}"),
            Self::Tool {
                command,
                status,
                stderr,
            } => write!(f, "{command} failed ({status}): {}", stderr.trim()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { what, source } => Self::new(source.kind(), format!("{what}: {source}")),
            Error::Timeout { .. } => Self::new(io::ErrorKind::TimedOut, e.to_string()),
            other => Self::other(other.to_string()),
        }
    }
}
