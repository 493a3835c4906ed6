//! Tunnel mode: another hypervisor's own migration stream (QEMU's), carried opaque.
//!
//! The source hypervisor connects to a local listener ([`TunnelSender`]); each of its
//! connections (QEMU's main migration channel, then one per multifd channel) becomes one
//! data stream of a vmotion migration, sealed with that migration's keys in both
//! directions (QEMU's return path runs backwards on the main channel). At the destination
//! [`Receiver`](crate::Receiver) connects each stream to the destination hypervisor's
//! incoming address, in the order the streams bind. Policy, key service, negotiation and
//! downgrade rules are those of any migration: the `Hello` only says the migration is a
//! tunnel ([`MigrationKind::Tunnel`](vmotion_proto::MigrationKind::Tunnel)).
//!
//! Both ends run the same pump per connection: bytes read from the local hypervisor go
//! out in `TunnelData` frames; a local end of file (or reset) goes out as
//! `TunnelShutdown` + `EndOfStream`, and the peer half-closes its own local connection.
//! The tunnel ends when every connection has closed in both directions: the sender then
//! sends `Complete` with the totals of every stream, the receiver checks them against what
//! it delivered and answers `Ready`, and each end ends its direction of the control
//! stream with `EndOfStream` (`crate::control`, which also sends either end's `Abort`,
//! and reads what the peer sends). Any failure
//! of the tunnel itself (the network, the peer, a forged or missing frame) drops every
//! local connection on both hosts, so neither hypervisor waits forever (TCP keepalive
//! notices a peer host that vanished; the receiver waits a bounded time for the first
//! stream). A hypervisor that closes its sending side is passed on as a close, and its
//! peer decides whether the stream was complete; one that stops taking bytes its peer
//! still sends fails the tunnel, as its peer's writes would fail on a direct connection.
//! Whether the hypervisor's migration succeeded is its own business (QEMU:
//! `query-migrate`); the tunnel reports what it carried.
//!
//! - `mod.rs`: the limits and the [`TunnelReport`];
//! - `sender.rs`: [`TunnelSender`] (key, policy, negotiation) and
//!   [`NegotiatedTunnel::run`], which carries the source hypervisor's connections;
//! - `receiver.rs`: the destination's half, after [`Receiver`](crate::Receiver)'s
//!   handshake: binds, delivery to the hypervisor, the check of `Complete`'s totals;
//! - `pump.rs`: the pump both ends run per connection.

mod pump;
mod receiver;
mod sender;

use std::time::Duration;

use vmotion_proto::{Channel, MigrationId, Mode, Negotiated};

use crate::control::{ControlEvent, ControlReader, ControlWriter};
use crate::transport::Conn;

pub(crate) use receiver::receive_tunnel;
pub use sender::{NegotiatedTunnel, TunnelSender, TunnelSenderBuilder, TunnelVerdict};

use pump::PumpStats;

/// How long a receiver waits for a tunnel's first connection after the handshake; a
/// sender's accept timeout may not be longer.
pub const MAX_ACCEPT_TIMEOUT: Duration = Duration::from_secs(600);

/// Most connections a tunnel carries unless told otherwise: QEMU's main channel plus up
/// to 15 multifd channels.
pub const DEFAULT_MAX_CONNECTIONS: u16 = 16;

/// What a tunnel carried, as either end saw it.
#[derive(Debug, Clone)]
pub struct TunnelReport {
    /// The migration.
    pub migration_id: MigrationId,
    /// The VM.
    pub vm_name: String,
    /// Encrypted, or plaintext with the reason.
    pub mode: Mode,
    /// Connections carried (QEMU: 1 + multifd channels).
    pub connections: u16,
    /// Hypervisor bytes carried from the source to the destination.
    pub bytes_to_destination: u64,
    /// Hypervisor bytes carried back (QEMU's return path).
    pub bytes_from_destination: u64,
    /// Most key epochs used on any stream direction (1 = no key update).
    pub epochs: u32,
    /// Key issuance and handshake (sender), or handshake (receiver).
    pub setup: Duration,
    /// From the first connection to the last close: how long the hypervisor streamed.
    pub carried: Duration,
}

impl TunnelReport {
    /// The report of a tunnel whose pumps ended with `done`, seen from the sender (or
    /// the receiver).
    fn new(
        negotiated: &Negotiated,
        done: &[(u16, PumpStats)],
        setup: Duration,
        carried: Duration,
        sender: bool,
    ) -> Self {
        let sent: u64 = done.iter().map(|(_, s)| s.sent_bytes).sum();
        let received: u64 = done.iter().map(|(_, s)| s.received_bytes).sum();
        let (to, from) = if sender {
            (sent, received)
        } else {
            (received, sent)
        };
        Self {
            migration_id: negotiated.migration_id,
            vm_name: negotiated.vm_name.clone(),
            mode: negotiated.mode,
            connections: u16::try_from(done.len()).unwrap_or(u16::MAX),
            bytes_to_destination: to,
            bytes_from_destination: from,
            epochs: done.iter().map(|(_, s)| s.epochs).max().unwrap_or(1),
            setup,
            carried,
        }
    }

    /// Source-to-destination throughput while the hypervisor streamed, in bytes/s.
    pub fn throughput(&self) -> f64 {
        self.bytes_to_destination as f64 / self.carried.as_secs_f64().max(1e-9)
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        let mode = match self.mode {
            Mode::Encrypted(_) => "encrypted".to_owned(),
            Mode::Plaintext(r) => format!("PLAINTEXT ({r:?})"),
        };
        format!(
            "tunnel for {} closed: {mode}, {} connection(s), {:.1} MiB to the destination and \
             {:.1} KiB back in {:.2} s ({:.2} GB/s), {} key epoch(s)",
            self.vm_name,
            self.connections,
            self.bytes_to_destination as f64 / (1 << 20) as f64,
            self.bytes_from_destination as f64 / 1024.0,
            self.carried.as_secs_f64(),
            self.throughput() / 1e9,
            self.epochs,
        )
    }
}

/// The control connection of a tunnel after the handshake, tuned as the streams' peer side is: the
/// reader of what the peer sends, and this end's writer (each write within
/// `write_timeout`).
fn control(conn: Conn, keys: Channel, write_timeout: Duration) -> (ControlReader, ControlWriter) {
    pump::remote_tune(&conn);
    let (r, w) = conn.into_split();
    let reader = ControlReader::spawn(r, keys.opener);
    (reader, ControlWriter::new(w, keys.sealer, write_timeout))
}

/// After `Ready` the peer ends its direction of the control stream with `EndOfStream`:
/// anything else, or nothing within `within`, is logged, not an error — every byte was
/// delivered and confirmed by then.
async fn await_peer_end(reader: &mut ControlReader, within: Duration, state: &'static str) {
    match tokio::time::timeout(within, reader.next()).await {
        Ok(ControlEvent::Closed) => {}
        Ok(other) => tracing::warn!(
            error = %other.into_error(state),
            "the peer's control stream did not end cleanly after Ready"
        ),
        Err(_) => tracing::warn!(
            ?within,
            "the peer did not end its control stream after Ready"
        ),
    }
}
