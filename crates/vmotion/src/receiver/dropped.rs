//! Connections [`Receiver::serve`](super::Receiver::serve) dropped before any migration
//! began, counted by reason (for metrics: probes, scanners and broken peers show here).

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a connection was dropped before any migration began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Dropped {
    /// It closed, or sent nothing valid, before its first frame.
    NoFirstFrame,
    /// Its `Hello` did not decode.
    MalformedHello,
    /// Its `Hello` named a migration already in progress here.
    DuplicateMigration,
    /// Its stream bind did not decode.
    MalformedStreamBind,
    /// Its stream bind named no migration in progress here.
    UnknownStreamBind,
    /// It began with neither `Hello` nor a stream bind.
    NotAMigration,
}

impl Dropped {
    /// Every reason, in a fixed order.
    pub const ALL: [Self; 6] = [
        Self::NoFirstFrame,
        Self::MalformedHello,
        Self::DuplicateMigration,
        Self::MalformedStreamBind,
        Self::UnknownStreamBind,
        Self::NotAMigration,
    ];

    /// A short snake_case name (a metrics label).
    pub fn name(self) -> &'static str {
        match self {
            Self::NoFirstFrame => "no_first_frame",
            Self::MalformedHello => "malformed_hello",
            Self::DuplicateMigration => "duplicate_migration",
            Self::MalformedStreamBind => "malformed_stream_bind",
            Self::UnknownStreamBind => "unknown_stream_bind",
            Self::NotAMigration => "not_a_migration",
        }
    }
}

/// One counter per [`Dropped`] reason.
#[derive(Debug, Default)]
pub(crate) struct DroppedCounts([AtomicU64; Dropped::ALL.len()]);

impl DroppedCounts {
    pub(crate) fn count(&self, why: Dropped) {
        let i = Dropped::ALL.iter().position(|d| *d == why).unwrap_or(0);
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Vec<(Dropped, u64)> {
        Dropped::ALL
            .iter()
            .zip(&self.0)
            .map(|(d, n)| (*d, n.load(Ordering::Relaxed)))
            .collect()
    }
}
