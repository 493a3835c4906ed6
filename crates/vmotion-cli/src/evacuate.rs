//! Placement for `vmotion-evacuate`: which destination each VM goes to.
//!
//! First fit by free capacity: a VM goes to the destination with the most free room
//! (its capacity, in VMs, minus what is placed there or on its way), never to one that
//! cannot encrypt when the VM requires encryption, and never back to one where it
//! already failed. On a tie (destinations without a capacity always tie) the one with
//! the fewest VMs placed wins, then the one named first.
//!
//! [`board`] shows an evacuation's progress.

pub mod board;

use std::fmt;

/// A destination host, as the operator named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Its identity at the key service.
    pub name: String,
    /// Its `vmotion-recv` address.
    pub addr: String,
    /// How many VMs it may take; `None`: no limit.
    pub capacity: Option<usize>,
    /// Whether it can encrypt (from the key service's registry).
    pub can_encrypt: bool,
}

impl Destination {
    /// Parses `NAME=ADDR` or `NAME=ADDR/CAPACITY` (e.g. `dst1=10.0.0.2:7700/4`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: a destination is NAME=ADDR[/CAPACITY]"))?;
        let (addr, capacity) = match rest.rsplit_once('/') {
            Some((addr, cap)) if !addr.starts_with("unix:") || cap.parse::<usize>().is_ok() => {
                let cap = cap
                    .parse()
                    .map_err(|_| format!("`{s}`: the capacity `{cap}` is not a number"))?;
                (addr, Some(cap))
            }
            _ => (rest, None),
        };
        if name.is_empty() || addr.is_empty() {
            return Err(format!("`{s}`: a destination is NAME=ADDR[/CAPACITY]"));
        }
        Ok(Self {
            name: name.to_owned(),
            addr: addr.to_owned(),
            capacity,
            can_encrypt: false,
        })
    }
}

/// Why a VM has nowhere to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoom {
    /// Every destination that could take it is full.
    Full,
    /// It requires encryption and no destination left for it can encrypt.
    NoEncryptingDestination,
    /// It failed on every destination it could go to.
    TriedAll,
}

impl fmt::Display for NoRoom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full => "every destination that could take it is full",
            Self::NoEncryptingDestination => {
                "it requires encryption and no destination left for it can encrypt"
            }
            Self::TriedAll => "it failed on every destination it could go to",
        })
    }
}

/// The destinations and what is placed on each.
#[derive(Debug, Clone)]
pub struct Placement {
    destinations: Vec<Destination>,
    placed: Vec<usize>,
}

impl Placement {
    /// Nothing placed yet.
    pub fn new(destinations: Vec<Destination>) -> Self {
        let placed = vec![0; destinations.len()];
        Self {
            destinations,
            placed,
        }
    }

    /// The destinations.
    pub fn destinations(&self) -> &[Destination] {
        &self.destinations
    }

    fn free(&self, i: usize) -> usize {
        self.destinations[i]
            .capacity
            .map_or(usize::MAX, |c| c.saturating_sub(self.placed[i]))
    }

    /// Chooses (and counts) a destination for a VM that `requires_encryption`, avoiding
    /// the destinations in `failed` (by index).
    pub fn place(&mut self, requires_encryption: bool, failed: &[usize]) -> Result<usize, NoRoom> {
        let candidates: Vec<usize> = (0..self.destinations.len())
            .filter(|i| !failed.contains(i))
            .collect();
        if candidates.is_empty() {
            return Err(NoRoom::TriedAll);
        }
        let able: Vec<usize> = candidates
            .into_iter()
            .filter(|&i| !requires_encryption || self.destinations[i].can_encrypt)
            .collect();
        if able.is_empty() {
            return Err(if failed.is_empty() {
                NoRoom::NoEncryptingDestination
            } else {
                NoRoom::TriedAll
            });
        }
        // Most free room first, then the fewest placed (destinations without a capacity
        // share the VMs), then the first named (max_by_key keeps the last: reversed).
        let best = able
            .iter()
            .rev()
            .copied()
            .max_by_key(|&i| (self.free(i), std::cmp::Reverse(self.placed[i])))
            .filter(|&i| self.free(i) > 0)
            .ok_or(NoRoom::Full)?;
        self.placed[best] += 1;
        Ok(best)
    }

    /// Gives back the room a VM took on `i` (its migration there failed).
    pub fn release(&mut self, i: usize) {
        self.placed[i] = self.placed[i].saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(name: &str, capacity: Option<usize>, can_encrypt: bool) -> Destination {
        Destination {
            name: name.into(),
            addr: format!("{name}:7700"),
            capacity,
            can_encrypt,
        }
    }

    #[test]
    fn destinations_parse_with_and_without_capacity() {
        let d = Destination::parse("dst1=10.0.0.2:7700/4").unwrap();
        assert_eq!(
            (d.name.as_str(), d.addr.as_str(), d.capacity),
            ("dst1", "10.0.0.2:7700", Some(4))
        );
        let d = Destination::parse("dst2=127.0.0.1:7701").unwrap();
        assert_eq!((d.addr.as_str(), d.capacity), ("127.0.0.1:7701", None));
        let d = Destination::parse("local=unix:/run/vmotion/recv.sock").unwrap();
        assert_eq!(
            (d.addr.as_str(), d.capacity),
            ("unix:/run/vmotion/recv.sock", None)
        );
        assert!(Destination::parse("nameless").is_err());
        assert!(Destination::parse("d=127.0.0.1:7700/many").is_err());
    }

    #[test]
    fn the_most_free_room_wins_and_full_hosts_are_skipped() {
        let mut p = Placement::new(vec![
            dest("a", Some(1), true),
            dest("b", Some(2), true),
            dest("c", Some(2), true),
        ]);
        // b and c tie at 2: b, named first; then c (2 free) over b (1) and a (1).
        assert_eq!(p.place(false, &[]), Ok(1));
        assert_eq!(p.place(false, &[]), Ok(2));
        assert_eq!(p.place(false, &[]), Ok(0));
        assert_eq!(p.place(false, &[]), Ok(1));
        assert_eq!(p.place(false, &[]), Ok(2));
        assert_eq!(p.place(false, &[]), Err(NoRoom::Full));
        p.release(0);
        assert_eq!(p.place(false, &[]), Ok(0));
    }

    #[test]
    fn a_required_vm_never_goes_where_it_cannot_be_encrypted_nor_back_where_it_failed() {
        let mut p = Placement::new(vec![dest("plain", None, false), dest("enc", Some(1), true)]);
        assert_eq!(p.place(true, &[]), Ok(1));
        assert_eq!(p.place(true, &[]), Err(NoRoom::Full));
        assert_eq!(p.place(false, &[]), Ok(0));
        assert_eq!(p.place(true, &[1]), Err(NoRoom::TriedAll));
        assert_eq!(p.place(false, &[0, 1]), Err(NoRoom::TriedAll));
        let mut only_plain = Placement::new(vec![dest("plain", None, false)]);
        assert_eq!(
            only_plain.place(true, &[]),
            Err(NoRoom::NoEncryptingDestination)
        );
    }

    #[test]
    fn destinations_without_a_capacity_share_the_vms() {
        let mut p = Placement::new(vec![dest("a", None, true), dest("b", None, true)]);
        let placed: Vec<usize> = (0..4).map(|_| p.place(false, &[]).unwrap()).collect();
        assert_eq!(placed, [0, 1, 0, 1]);
    }
}
