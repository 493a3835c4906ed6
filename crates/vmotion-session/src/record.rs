//! The arbiter's record of a migration and the compare-and-set steps on it.

/// Where a migration's record at the arbiter is (DESIGN §9).
///
/// ```text
/// Open ──commit──▶ Committed ──claim──▶ Claimed
///   │                  └──────revert──▶ Reverted
///   └──abort──▶ Aborted
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Record {
    /// Created, no outcome yet: the source has not committed.
    Open,
    /// The source committed: the destination may claim the VM, or the source revert it.
    Committed,
    /// The destination won the VM: it runs there; the source stops for good.
    Claimed,
    /// The source took the VM back after committing: it runs at the source; the
    /// destination discards its copy.
    Reverted,
    /// Aborted before any commit: the VM runs at the source.
    Aborted,
}

impl Record {
    /// Whether `t` is a legal step from this record, and where it leads.
    pub fn step(self, t: Transition) -> Option<Self> {
        match (self, t) {
            (Self::Open, Transition::Commit) => Some(Self::Committed),
            (Self::Open, Transition::Abort) => Some(Self::Aborted),
            (Self::Committed, Transition::Claim) => Some(Self::Claimed),
            (Self::Committed, Transition::Revert) => Some(Self::Reverted),
            _ => None,
        }
    }

    /// The VM may run at the destination (and never again at the source).
    pub fn destination_won(self) -> bool {
        self == Self::Claimed
    }

    /// The VM runs at the source; a destination copy must be discarded.
    pub fn source_keeps(self) -> bool {
        matches!(self, Self::Reverted | Self::Aborted)
    }

    /// The name the key service's API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Committed => "committed",
            Self::Claimed => "claimed",
            Self::Reverted => "reverted",
            Self::Aborted => "aborted",
        }
    }
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A compare-and-set the driver asks the arbiter for. Each succeeds only from the one
/// record [`Record::step`] names; either way the arbiter answers with the record as it
/// now stands ([`Answer::Record`]), so a lost race and a retry after a lost answer look
/// the same and need no special case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// Source: `Open → Committed`, after `Ready`.
    Commit,
    /// Destination: `Committed → Claimed`, before it resumes.
    Claim,
    /// Source: `Committed → Reverted`, when no claim came within its deadline.
    Revert,
    /// Source or destination: `Open → Aborted`.
    Abort,
}

impl std::fmt::Display for Transition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Commit => "commit",
            Self::Claim => "claim",
            Self::Revert => "revert",
            Self::Abort => "abort",
        })
    }
}

/// The arbiter's answer to a read or a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The record as it stands after the request (whether the request won or not).
    Record(Record),
    /// No answer (unreachable, timed out, an error that says nothing of the record):
    /// nothing is known; the machine retries within its deadline.
    Unreachable(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exactly the arrows of DESIGN §9, and no other.
    #[test]
    fn only_the_designed_arrows_exist() {
        let all = [
            Record::Open,
            Record::Committed,
            Record::Claimed,
            Record::Reverted,
            Record::Aborted,
        ];
        let ts = [
            Transition::Commit,
            Transition::Claim,
            Transition::Revert,
            Transition::Abort,
        ];
        let mut legal = Vec::new();
        for r in all {
            for t in ts {
                if let Some(to) = r.step(t) {
                    legal.push((r, t, to));
                }
            }
        }
        assert_eq!(
            legal,
            vec![
                (Record::Open, Transition::Commit, Record::Committed),
                (Record::Open, Transition::Abort, Record::Aborted),
                (Record::Committed, Transition::Claim, Record::Claimed),
                (Record::Committed, Transition::Revert, Record::Reverted),
            ]
        );
        // Claimed and Reverted are final: no step leaves either.
        for t in ts {
            assert_eq!(Record::Claimed.step(t), None);
            assert_eq!(Record::Reverted.step(t), None);
        }
    }
}
