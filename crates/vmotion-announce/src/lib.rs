//! # vmotion-announce: telling the network where a VM went
//!
//! The last step of a live migration: once the destination runs the VM, switches still
//! send its traffic to the source's port. Like QEMU's announce, the destination sends,
//! for each of the VM's MAC addresses, a RARP request (which updates switches' MAC tables),
//! and for each known IPv4 address a gratuitous ARP (which updates neighbours' ARP caches),
//! in several rounds with growing gaps: by default 5 rounds, 50 ms before the second and
//! 100 ms more before each next one (50, 150, 250, 350 ms — QEMU's announce-initial 50 ms,
//! -step 100 ms, -max 550 ms, -rounds 5).
//!
//! Frames are built by pure functions ([`rarp_frame`], [`garp_frame`]) and sent on a named
//! interface through an AF_PACKET socket ([`announce`]).

#![forbid(unsafe_code)]

pub mod netns;

use std::net::Ipv4Addr;
use std::time::Duration;

/// Length of every announcement frame (the Ethernet minimum, padding included, no FCS).
pub const FRAME_LEN: usize = 60;
/// EtherType of RARP.
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;

const BROADCAST: [u8; 6] = [0xff; 6];

fn frame(
    src: [u8; 6],
    ethertype: u16,
    op: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    // ARP/RARP body: Ethernet (1), IPv4 (0x0800), 6-byte and 4-byte addresses.
    f[14..16].copy_from_slice(&1u16.to_be_bytes());
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&op.to_be_bytes());
    f[22..28].copy_from_slice(&sha);
    f[28..32].copy_from_slice(&spa);
    f[32..38].copy_from_slice(&tha);
    f[38..42].copy_from_slice(&tpa);
    f
}

/// A RARP "request reverse" (operation 3) for `mac`, broadcast from `mac`: what QEMU
/// sends after a migration.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; FRAME_LEN] {
    frame(mac, ETHERTYPE_RARP, 3, mac, [0; 4], mac, [0; 4])
}

/// A gratuitous ARP request (operation 1) announcing that `ip` is at `mac`.
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; FRAME_LEN] {
    let ip = ip.octets();
    frame(mac, ETHERTYPE_ARP, 1, mac, ip, [0; 6], ip)
}

/// When to send the rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Number of rounds.
    pub rounds: u32,
    /// Gap before the second round.
    pub initial: Duration,
    /// Added to the gap before each further round.
    pub step: Duration,
    /// The gap never exceeds this.
    pub max: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            rounds: 5,
            initial: Duration::from_millis(50),
            step: Duration::from_millis(100),
            max: Duration::from_millis(550),
        }
    }
}

impl Schedule {
    /// The gaps between consecutive rounds (`rounds - 1` of them).
    pub fn gaps(&self) -> Vec<Duration> {
        (0..self.rounds.saturating_sub(1))
            .map(|i| (self.initial + self.step * i).min(self.max))
            .collect()
    }
}

/// What to announce.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Announcement {
    /// MAC addresses (one RARP each, per round).
    pub macs: Vec<[u8; 6]>,
    /// IPv4 addresses with the MAC that now answers for them (one gratuitous ARP each).
    pub ips: Vec<([u8; 6], Ipv4Addr)>,
}

impl Announcement {
    /// The frames of one round.
    pub fn frames(&self) -> Vec<[u8; FRAME_LEN]> {
        self.macs
            .iter()
            .map(|m| rarp_frame(*m))
            .chain(self.ips.iter().map(|(m, ip)| garp_frame(*m, *ip)))
            .collect()
    }
}

/// Why an announcement could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// No interface of that name.
    #[error("no network interface named `{0}`")]
    NoInterface(String),
    /// The packet socket could not be opened (needs CAP_NET_RAW) or the send failed.
    #[error("sending on `{interface}` failed: {source}")]
    Io {
        /// The interface.
        interface: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Sends `what` on `interface` in the rounds of `schedule` (blocking: run it on a thread).
/// Returns the number of frames sent.
pub fn announce(
    interface: &str,
    what: &Announcement,
    schedule: Schedule,
) -> Result<usize, AnnounceError> {
    let iface = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == interface)
        .ok_or_else(|| AnnounceError::NoInterface(interface.to_owned()))?;
    let io = |source| AnnounceError::Io {
        interface: interface.to_owned(),
        source,
    };
    let mut tx =
        match pnet_datalink::channel(&iface, pnet_datalink::Config::default()).map_err(io)? {
            pnet_datalink::Channel::Ethernet(tx, _rx) => tx,
            _ => return Err(io(std::io::Error::other("not an Ethernet channel"))),
        };
    let frames = what.frames();
    let gaps = schedule.gaps();
    let mut sent = 0;
    for round in 0..schedule.rounds {
        for f in &frames {
            match tx.send_to(f, None) {
                Some(r) => r.map_err(io)?,
                None => return Err(io(std::io::Error::other("the channel refused the frame"))),
            }
            sent += 1;
        }
        if let Some(gap) = gaps.get(round as usize) {
            std::thread::sleep(*gap);
        }
    }
    Ok(sent)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn rarp_frame_is_byte_exact() {
        let f = rarp_frame(MAC);
        let expected_head: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // broadcast
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // from the VM's MAC
            0x80, 0x35, // RARP
            0x00, 0x01, 0x08, 0x00, 6, 4, // Ethernet / IPv4
            0x00, 0x03, // request reverse
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, // sender
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, // target
        ];
        assert_eq!(f[..42], expected_head);
        assert!(f[42..].iter().all(|b| *b == 0), "padded with zeros");
        assert_eq!(f.len(), 60);
    }

    #[test]
    fn garp_frame_is_byte_exact() {
        let f = garp_frame(MAC, Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(f[12..14], [0x08, 0x06]);
        assert_eq!(f[20..22], [0, 1], "request");
        assert_eq!(f[22..28], MAC);
        assert_eq!(f[28..32], [192, 0, 2, 10]);
        assert_eq!(f[32..38], [0; 6]);
        assert_eq!(f[38..42], [192, 0, 2, 10], "target = sender: gratuitous");
    }

    #[test]
    fn default_schedule_is_qemus() {
        let ms: Vec<u128> = Schedule::default()
            .gaps()
            .iter()
            .map(Duration::as_millis)
            .collect();
        assert_eq!(ms, [50, 150, 250, 350]);
        let capped = Schedule {
            rounds: 8,
            ..Schedule::default()
        };
        assert_eq!(capped.gaps().last(), Some(&Duration::from_millis(550)));
    }

    #[test]
    fn macs_parse() {
        assert_eq!(parse_mac("52:54:00:12:34:56"), Some(MAC));
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("zz:54:00:12:34:56"), None);
    }
}
