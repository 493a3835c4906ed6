//! A deterministic in-memory harness for protocol tests (feature `testing`).
//!
//! [`run_handshake`] drives a sender and a receiver through the handshake frame by frame,
//! passing every frame through a tamper hook (like rustls' `transfer_altered`) that may
//! rewrite it in flight. [`Link`] carries sealed frames of one data stream through a
//! queue that tests may drop from, duplicate, reorder or rewrite. No sockets, no clocks,
//! no randomness: every run is the same.

use std::collections::VecDeque;

use crate::error::{Error, Result};
use crate::frame::{FrameType, Header, MAX_PAYLOAD, WireFrame};
use crate::handshake::{
    Channel, HandshakeFailure, ReceiverConfig, ReceiverHandshake, ReceiverNext, ReceiverSession,
    SenderConfig, SenderHandshake, SenderNext, SenderSession,
};
use crate::message::Hello;
use crate::policy::{DestinationCapability, EncryptionPolicy};
use crate::record::{EpochLimits, Opener, Sealer};
use crate::secret::{KeyMaterial, MigrationId, MigrationKey, MigrationNonce};

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flight {
    /// Sender to receiver.
    ToReceiver,
    /// Receiver to sender.
    ToSender,
}

/// Deterministic key material: every byte of the key is `seed`.
pub fn key(seed: u8) -> KeyMaterial {
    KeyMaterial {
        key: MigrationKey::from_bytes([seed; 32]),
        nonce: MigrationNonce([seed.wrapping_add(1); 8]),
    }
}

/// The migration id tests use unless they need another.
pub const TEST_ID: MigrationId = MigrationId([0x42; 16]);

/// A sender configuration: opportunistic policy, destination registered as encrypting,
/// 4 KiB pages, 1024 pages, two data streams, default budgets, key `seed` 1.
pub fn sender_config() -> SenderConfig {
    SenderConfig {
        migration_id: TEST_ID,
        vm_name: "vm-test".into(),
        policy: EncryptionPolicy::Opportunistic,
        destination: DestinationCapability::Encrypts,
        key: Some(key(1)),
        versions: 1..=1,
        page_size: 4096,
        guest_pages: 1024,
        streams: 2,
        kind: crate::MigrationKind::Memory,
        device: Default::default(),
        limits: EpochLimits::default(),
        random: [0x11; 32],
    }
}

/// The receiver's handshake random in [`run_handshake`].
pub const RECEIVER_RANDOM: [u8; 32] = [0x22; 32];

/// What a handshake run produced on each side. A side that never finished (because the
/// other failed first) is `None`. The `Abort` a failing side sends is the last entry of
/// `wire`.
#[derive(Debug)]
pub struct Outcome {
    /// The sender's result.
    pub sender: Option<Result<SenderSession>>,
    /// The receiver's result; a refusal the receiver itself computed is
    /// `Err(Error::Refused(..))`.
    pub receiver: Option<Result<ReceiverSession>>,
    /// Every frame that crossed the wire, after tampering, in order.
    pub wire: Vec<(Flight, WireFrame)>,
}

impl Outcome {
    /// Both sessions, or a panic naming what failed (for tests that expect success).
    pub fn established(self) -> (SenderSession, ReceiverSession) {
        match (self.sender, self.receiver) {
            (Some(Ok(s)), Some(Ok(r))) => (s, r),
            (s, r) => panic!("handshake failed: sender {s:?}, receiver {r:?}"),
        }
    }

    /// The sender's error (panics if the sender did not fail).
    pub fn sender_error(&self) -> &Error {
        match &self.sender {
            Some(Err(e)) => e,
            other => panic!("the sender did not fail: {other:?}"),
        }
    }

    /// The receiver's error (panics if the receiver did not fail).
    pub fn receiver_error(&self) -> &Error {
        match &self.receiver {
            Some(Err(e)) => e,
            other => panic!("the receiver did not fail: {other:?}"),
        }
    }
}

/// Runs a whole handshake in memory. `receiver_key` is asked for the key when the
/// receiver's decision is encrypted (it sees the untrusted `Hello`, as a key-service fetch
/// by migration id would); `tamper` sees every frame before delivery.
pub fn run_handshake(
    sender: SenderConfig,
    receiver: ReceiverConfig,
    receiver_key: impl FnOnce(&Hello) -> Option<KeyMaterial>,
    mut tamper: impl FnMut(Flight, &mut WireFrame),
) -> Outcome {
    let mut wire = Vec::new();
    let mut send = |flight, mut f: WireFrame, wire: &mut Vec<(Flight, WireFrame)>| {
        tamper(flight, &mut f);
        wire.push((flight, f.clone()));
        f
    };
    let fail_sender = |e, wire| Outcome {
        sender: Some(Err(e)),
        receiver: None,
        wire,
    };
    let fail_receiver = |e, wire| Outcome {
        sender: None,
        receiver: Some(Err(e)),
        wire,
    };
    let record_abort = |flight, f: &HandshakeFailure, wire: &mut Vec<(Flight, WireFrame)>| {
        if let Some(abort) = &f.abort {
            wire.push((flight, abort.clone()));
        }
    };

    let (expect_ack, hello) = match SenderHandshake::start(sender) {
        Ok(x) => x,
        Err(e) => return fail_sender(e, wire),
    };
    let hello = send(Flight::ToReceiver, hello, &mut wire);
    let received = match ReceiverHandshake::start(receiver, RECEIVER_RANDOM).handle(hello) {
        Ok(r) => r,
        Err(f) => {
            record_abort(Flight::ToSender, &f, &mut wire);
            return fail_receiver(f.error, wire);
        }
    };
    let key = if received.needs_key() {
        receiver_key(received.hello())
    } else {
        None
    };
    let (next, frames) = match received.accept(key) {
        Ok(x) => x,
        Err(e) => return fail_receiver(e, wire),
    };
    let mut to_sender: VecDeque<WireFrame> = frames
        .into_iter()
        .map(|f| send(Flight::ToSender, f, &mut wire))
        .collect();
    let receiver_refusal = match &next {
        ReceiverNext::Refused(r) => Some(*r),
        _ => None,
    };
    let Some(ack) = to_sender.pop_front() else {
        panic!("harness: the receiver answered nothing");
    };
    let sender_result = expect_ack.handle(ack).and_then(|n| match n {
        SenderNext::Established(s) => Ok((s, None)),
        SenderNext::ExpectKeyConfirm(state) => match to_sender.pop_front() {
            Some(kc) => state.handle(kc).map(|(s, kc)| (s, Some(kc))),
            None => panic!("harness: the receiver sent no KeyConfirm"),
        },
    });
    let (session, kc) = match sender_result {
        Ok(x) => x,
        Err(f) => {
            record_abort(Flight::ToReceiver, &f, &mut wire);
            return Outcome {
                sender: Some(Err(f.error)),
                receiver: receiver_refusal.map(|r| Err(r.into())),
                wire,
            };
        }
    };
    let receiver_result = match (next, kc) {
        (ReceiverNext::Established(r), None) => Ok(r),
        (ReceiverNext::ExpectKeyConfirm(state), Some(kc)) => {
            let kc = send(Flight::ToReceiver, kc, &mut wire);
            state.handle(kc).map_err(|f| {
                record_abort(Flight::ToSender, &f, &mut wire);
                f.error
            })
        }
        (ReceiverNext::Refused(r), _) => Err(r.into()),
        (next, kc) => panic!("harness: mismatched states {next:?} / {kc:?}"),
    };
    Outcome {
        sender: Some(Ok(session)),
        receiver: Some(receiver_result),
        wire,
    }
}

/// An encrypted pair with the default test configuration, established.
pub fn encrypted_pair(limits: EpochLimits) -> (SenderSession, ReceiverSession) {
    let config = SenderConfig {
        limits,
        ..sender_config()
    };
    let receiver = ReceiverConfig {
        limits,
        ..ReceiverConfig::default()
    };
    run_handshake(config, receiver, |_| Some(key(1)), |_, _| {}).established()
}

/// One data stream, both ends, with an in-memory queue between them.
#[derive(Debug)]
pub struct Link {
    /// The sender's side of the stream.
    pub sender: Channel,
    /// The receiver's side of the stream.
    pub receiver: Channel,
    /// Frames sealed by the sender and not yet delivered.
    pub in_flight: VecDeque<WireFrame>,
}

impl Link {
    /// Opens data stream `stream` on both sessions (bind frame checked).
    pub fn open(sender: &mut SenderSession, receiver: &mut ReceiverSession, stream: u16) -> Self {
        let (bind, s) = sender.open_data_stream(stream).expect("open data stream");
        let (n, r) = receiver
            .accept_data_stream(bind)
            .expect("accept data stream");
        assert_eq!(n, stream);
        Self {
            sender: s,
            receiver: r,
            in_flight: VecDeque::new(),
        }
    }

    /// Seals a frame into the queue.
    pub fn send(&mut self, frame_type: FrameType, payload: &[u8]) -> Result<()> {
        let f = self.sender.sealer.seal(frame_type, payload.to_vec())?;
        self.in_flight.push_back(f);
        Ok(())
    }

    /// Delivers the next queued frame; returns its header and plaintext.
    pub fn deliver(&mut self) -> Option<Result<(Header, Vec<u8>)>> {
        let mut f = self.in_flight.pop_front()?;
        Some(self.receiver.opener.open(&mut f).map(|h| (h, f.payload)))
    }
}

/// Seals `payload` with `sealer` and opens it with `opener`, through `tamper`.
pub fn transfer_altered(
    sealer: &mut Sealer,
    opener: &mut Opener,
    frame_type: FrameType,
    payload: &[u8],
    tamper: impl FnOnce(&mut WireFrame),
) -> Result<Vec<u8>> {
    let mut f = sealer.seal(frame_type, payload.to_vec())?;
    tamper(&mut f);
    opener.open(&mut f)?;
    Ok(f.payload)
}

/// Decodes a frame's header (for tamper hooks that look before they alter).
pub fn header_of(frame: &WireFrame) -> Header {
    Header::decode(&frame.header, MAX_PAYLOAD).expect("a valid header")
}

/// A frame with a valid checksum trailer, as the handshake and stream binds send them:
/// lets fuzzers and tamper tests forge well-formed handshake frames with any payload.
pub fn checksum_frame(
    version: u8,
    stream: u16,
    sequence: u64,
    frame_type: FrameType,
    payload: Vec<u8>,
) -> Result<WireFrame> {
    let mut sealer = Sealer::new(&crate::record::RecordConfig {
        protection: crate::record::Protection::Checksum,
        stream,
        version,
        first_sequence: sequence,
        limits: EpochLimits::default(),
        first_epoch_frames: u64::MAX,
        max_payload: MAX_PAYLOAD,
    });
    sealer.seal(frame_type, payload)
}

/// The AES-256-GCM key and IV of one (direction, stream, epoch), derived exactly as the
/// record layer derives them — so tests can open our frames with another AES-GCM
/// implementation. Test-only: production code never sees raw traffic keys.
pub fn traffic_key_iv(
    material: &KeyMaterial,
    migration_id: MigrationId,
    transcript_hash: &[u8; 32],
    direction: crate::Direction,
    stream: u16,
    epoch: u32,
) -> ([u8; 32], [u8; 12]) {
    let schedule = crate::keyschedule::KeySchedule::new(material, migration_id);
    let slot = |label| crate::keyschedule::Slot {
        label,
        transcript_hash,
        direction,
        stream,
        epoch,
    };
    (
        *schedule.secret::<32>(slot("key")).expose(),
        *schedule.secret::<12>(slot("iv")).expose(),
    )
}
