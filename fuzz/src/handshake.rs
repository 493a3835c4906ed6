//! The `handshake` target: a real receiver or sender state machine against a fuzzer that
//! plays the other end, through the handshake and on into the established session.
//!
//! The input is a [`script`](crate::script): the first byte picks the end under attack
//! and its configuration, the rest is the frames the fuzzer sends, in order.
//!
//! - Receiver: `ReceiverHandshake::start` (with `testing::RECEIVER_RANDOM`) →
//!   `handle(frame 0)` → `accept` (with `testing::key(1)` when `needs_key()`, else
//!   `None`) → `handle(frame 1)` if a key confirmation is expected.
//! - Sender: `SenderHandshake::start` → `ExpectHelloAck::handle(frame 0)` →
//!   `SenderExpectKeyConfirm::handle(frame 1)` when encrypted.
//! - Then, on an established session, every further frame goes to the connection its
//!   channel names: 0 is the control channel's opener; on the receiver the first frame
//!   of data connection n goes to `peek_stream_bind` and `accept_data_stream`, the next
//!   ones to the bound stream's opener along the driver's data path (`decode_header`,
//!   page-aligned buffer, `open_in_place`); the sender opens data stream n and feeds its
//!   opener. Every opened payload is decoded and round-tripped like in `frame_decoder`.
//!
//! Every `Err` is an acceptable outcome; a panic is a finding, and so is a failed
//! assertion. The assertions check the promises the protocol makes to its users:
//! frames this crate produces are well-formed (a failed step's `Abort` included), a
//! receiver that requires encryption never goes plaintext, a receiver that cannot encrypt
//! never agrees to, a sender ends up in exactly the mode its own policy and authority
//! call for (a receiver can refuse, never downgrade), nothing is negotiated outside the
//! bounds, a data stream binds at most once, an opened frame is exactly the next one in
//! sequence and epoch, a failed open leaves the stream where it was, and nothing opens
//! after `EndOfStream` or after a forged frame.

use std::collections::BTreeSet;

use vmotion_proto::frame::{FrameSplitter, FrameType, Header, MAX_PAYLOAD, SUPPORTED_VERSIONS};
use vmotion_proto::handshake::{MIN_NEGOTIATED_PAYLOAD, ReceiverConfig, SenderConfig};
use vmotion_proto::message::pages::{MAX_PAGE_SHIFT, MIN_PAGE_SHIFT};
use vmotion_proto::message::{Abort, MAX_STREAMS, MAX_VM_NAME};
use vmotion_proto::policy::{DestinationCapability, EncryptionPolicy, preflight};
use vmotion_proto::testing;
use vmotion_proto::{
    AlignedBuf, CipherSuite, Decision, DecisionInputs, Direction, Error, HandshakeFailure, Mode,
    Negotiated, Opener, PeerMisbehaved, ReceiverHandshake, ReceiverNext, ReceiverSession,
    SenderHandshake, SenderNext, WireFrame, decide,
};

use crate::frames;
use crate::script::{self, FrameSpec, Parser, Position, Protection, Role};

/// Data connections a script can name (channels 1..=15).
const CONNECTIONS: usize = 16;

/// How far one input got (the seed generator checks that its seeds get deep).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// The mode of the session the handshake established, if it did.
    pub established: Option<Mode>,
    /// The receiver under attack refused the migration itself.
    pub refused: bool,
    /// Data streams bound (receiver) or opened (sender).
    pub data_streams: usize,
    /// Frames opened after the handshake, on control and data connections.
    pub frames_opened: usize,
    /// Streams whose `EndOfStream` was opened.
    pub streams_ended: usize,
    /// What decoding the opened payloads exercised.
    pub payloads: frames::Report,
}

/// Runs one input.
pub fn run(data: &[u8]) -> Report {
    let (role, frames) = Parser::new(data);
    match role {
        Role::Receiver {
            can_encrypt,
            require_encryption,
        } => attack_receiver(
            Role::receiver_config(can_encrypt, require_encryption),
            frames,
        ),
        Role::Sender {
            policy,
            destination,
            with_key,
        } => attack_sender(Role::sender_config(policy, destination, with_key), frames),
    }
}

/// The next handshake frame, on the control connection at `sequence` (checksummed, key
/// epoch 0). `None` when the script has ended (or its bytes make no frame): the
/// connection closed.
fn next_frame(frames: &mut Parser<'_>, sequence: u64) -> Option<WireFrame> {
    let at = Position {
        stream: 0,
        sequence,
        epoch: 0,
    };
    frames.next()?.build(at, &Protection::Checksum)
}

/// How the fuzzer protects its frames once the session is established: it holds the
/// migration key, so in an encrypted session it seals them like the real peer would.
fn session_protection(
    negotiated: &Negotiated,
    transcript_hash: &[u8; 32],
    direction: Direction,
) -> Protection {
    match negotiated.mode {
        Mode::Encrypted(_) => Protection::Aead {
            migration_id: negotiated.migration_id,
            transcript_hash: *transcript_hash,
            direction,
        },
        Mode::Plaintext(_) => Protection::Checksum,
    }
}

fn attack_receiver(config: ReceiverConfig, mut frames: Parser<'_>) -> Report {
    let mut report = Report::default();
    let (can_encrypt, require_encryption) = (config.can_encrypt, config.require_encryption);
    let Some(hello) = next_frame(&mut frames, 0) else {
        return report;
    };
    // The random `testing::run_handshake` gives its receiver, so real sessions replay.
    let received = match ReceiverHandshake::start(config, testing::RECEIVER_RANDOM).handle(hello) {
        Ok(received) => received,
        Err(failure) => return check_failure(&failure, 0, report),
    };
    let decision = received.decision();
    assert_eq!(received.needs_key(), decision == Decision::Encrypted);
    if require_encryption {
        assert!(
            !matches!(decision, Decision::Plaintext(_)),
            "a receiver that requires encryption decided {decision}"
        );
    }
    if !can_encrypt {
        assert_ne!(
            decision,
            Decision::Encrypted,
            "a receiver without keys chose to encrypt"
        );
    }
    let key = received.needs_key().then(|| testing::key(1));
    let (next, answer) = received
        .accept(key)
        .expect("accept() failed although it got the key it asked for");
    for frame in &answer {
        check_own_frame(frame);
    }
    let mut session = match next {
        ReceiverNext::Refused(_) => {
            assert!(matches!(decision, Decision::Refused(_)));
            assert_eq!(
                answer.len(),
                1,
                "a refusal is answered with the HelloAck alone"
            );
            report.refused = true;
            return report;
        }
        ReceiverNext::Established(session) => {
            assert!(matches!(decision, Decision::Plaintext(_)));
            assert_eq!(
                answer.len(),
                1,
                "plaintext is answered with the HelloAck alone"
            );
            session
        }
        ReceiverNext::ExpectKeyConfirm(state) => {
            assert_eq!(decision, Decision::Encrypted);
            assert_eq!(
                answer.len(),
                2,
                "encrypted is answered with HelloAck and KeyConfirm"
            );
            let Some(confirm) = next_frame(&mut frames, 1) else {
                return report;
            };
            match state.handle(confirm) {
                Ok(session) => session,
                // HelloAck 0 and KeyConfirm 1 were sent: the abort is sequence 2.
                Err(failure) => return check_failure(&failure, 2, report),
            }
        }
    };

    let negotiated = session.negotiated().clone();
    check_negotiated(&negotiated);
    let expected_mode = match decision {
        Decision::Encrypted => Mode::Encrypted(CipherSuite::Aes256Gcm),
        Decision::Plaintext(reason) => Mode::Plaintext(reason),
        Decision::Refused(r) => unreachable!("checked above: refused ({r})"),
    };
    assert_eq!(
        negotiated.mode, expected_mode,
        "the session's mode is not the decision"
    );
    let encrypted = matches!(negotiated.mode, Mode::Encrypted(_));
    report.established = Some(negotiated.mode);
    let protection = session_protection(
        &negotiated,
        session.transcript_hash(),
        Direction::SenderToReceiver,
    );

    // Sender→receiver control sequence numbers: Hello 0, KeyConfirm 1, then sealed frames.
    let control = session
        .take_control()
        .expect("the control channel is there once");
    assert!(
        session.take_control().is_err(),
        "the control channel was handed out twice"
    );
    assert_eq!(control.sealer.is_encrypted(), encrypted);
    let first = if encrypted { 2 } else { 1 };
    let mut control = Inbound::new(control.opener, first, false, protection.clone());

    let mut connections: [Option<Inbound>; CONNECTIONS] = std::array::from_fn(|_| None);
    let mut bound = BTreeSet::new();
    for spec in frames {
        let channel = usize::from(spec.channel);
        if channel == 0 {
            control.deliver(&spec, &mut report);
            continue;
        }
        if let Some(inbound) = &mut connections[channel] {
            inbound.deliver(&spec, &mut report);
            continue;
        }
        // A new data connection: its first frame must be the StreamBind (sequence 0).
        let at = Position {
            stream: u16::from(spec.channel),
            sequence: 0,
            epoch: 0,
        };
        let Some(frame) = spec.build(at, &Protection::Checksum) else {
            continue;
        };
        let peeked = ReceiverSession::peek_stream_bind(&frame);
        let Ok((stream, channel_pair)) = session.accept_data_stream(frame) else {
            continue;
        };
        let bind = peeked.expect("peek_stream_bind rejected a bind that was accepted");
        assert_eq!(bind.stream, stream);
        assert_eq!(bind.migration_id, negotiated.migration_id);
        assert!(
            (1..=negotiated.streams).contains(&stream),
            "bound stream {stream}"
        );
        assert!(bound.insert(stream), "data stream {stream} was bound twice");
        assert_eq!(channel_pair.opener.stream(), stream);
        assert_eq!(channel_pair.sealer.stream(), stream);
        assert_eq!(channel_pair.sealer.is_encrypted(), encrypted);
        report.data_streams += 1;
        // Sender→receiver data sequence numbers: StreamBind 0, then sealed frames.
        connections[channel] = Some(Inbound::new(
            channel_pair.opener,
            1,
            true,
            protection.clone(),
        ));
    }
    control.close();
    connections.iter().flatten().for_each(Inbound::close);
    report
}

fn attack_sender(config: SenderConfig, mut frames: Parser<'_>) -> Report {
    let mut report = Report::default();
    let (policy, destination) = (config.policy, config.destination);
    let (proposed_limits, page_size, streams) = (config.limits, config.page_size, config.streams);
    let has_key = config.key.is_some();
    let Ok((expect_ack, hello)) = SenderHandshake::start(config) else {
        let needs_key =
            destination == DestinationCapability::Encrypts && policy != EncryptionPolicy::Disabled;
        assert!(
            (needs_key && !has_key) || preflight(policy, destination).is_some(),
            "only a sender refused by preflight or without the key it needs fails to start"
        );
        return report;
    };
    check_own_frame(&hello);
    let Some(ack) = next_frame(&mut frames, 0) else {
        return report;
    };
    // Hello was sequence 0: an abort in either state is sequence 1.
    let mut session = match expect_ack.handle(ack) {
        Err(failure) => return check_failure(&failure, 1, report),
        Ok(SenderNext::Established(session)) => session,
        Ok(SenderNext::ExpectKeyConfirm(state)) => {
            let Some(confirm) = next_frame(&mut frames, 1) else {
                return report;
            };
            match state.handle(confirm) {
                Ok((session, ours)) => {
                    check_own_frame(&ours);
                    assert_eq!(
                        Header::decode(&ours.header, MAX_PAYLOAD).unwrap().sequence,
                        1
                    );
                    session
                }
                Err(failure) => return check_failure(&failure, 1, report),
            }
        }
    };

    let negotiated = session.negotiated().clone();
    check_negotiated(&negotiated);
    // Whatever the receiver answered, the mode is the one the sender's own policy and
    // authority call for: the receiver can make it refuse, never downgrade it.
    let expected_mode = match decide(DecisionInputs {
        policy,
        authority: destination,
        wire_can_encrypt: true,
        receiver_requires_encryption: false,
    }) {
        Decision::Encrypted => Mode::Encrypted(CipherSuite::Aes256Gcm),
        Decision::Plaintext(reason) => Mode::Plaintext(reason),
        Decision::Refused(r) => panic!("the sender established a session its policy refuses: {r}"),
    };
    assert_eq!(
        negotiated.mode, expected_mode,
        "the receiver changed the sender's mode"
    );
    assert_eq!(negotiated.migration_id, testing::TEST_ID);
    assert_eq!(
        (negotiated.page_size, negotiated.streams),
        (page_size, streams)
    );
    assert!(
        negotiated.limits.within(proposed_limits),
        "budgets above the proposal"
    );
    let encrypted = matches!(negotiated.mode, Mode::Encrypted(_));
    report.established = Some(negotiated.mode);
    let protection = session_protection(
        &negotiated,
        session.transcript_hash(),
        Direction::ReceiverToSender,
    );

    // Receiver→sender control sequence numbers: HelloAck 0, KeyConfirm 1, then sealed.
    let control = session
        .take_control()
        .expect("the control channel is there once");
    assert_eq!(control.sealer.is_encrypted(), encrypted);
    let first = if encrypted { 2 } else { 1 };
    let mut control = Inbound::new(control.opener, first, false, protection.clone());

    // `None`: not opened yet; `Some(None)`: no such stream.
    let mut connections: [Option<Option<Inbound>>; CONNECTIONS] = std::array::from_fn(|_| None);
    for spec in frames {
        let channel = usize::from(spec.channel);
        if channel == 0 {
            control.deliver(&spec, &mut report);
            continue;
        }
        let inbound = connections[channel].get_or_insert_with(|| {
            let stream = u16::from(spec.channel);
            let (bind, pair) = session.open_data_stream(stream).ok()?;
            check_own_frame(&bind);
            assert_eq!(pair.opener.stream(), stream);
            assert_eq!(pair.sealer.is_encrypted(), encrypted);
            report.data_streams += 1;
            // Receiver→sender data sequence numbers start at 0.
            Some(Inbound::new(pair.opener, 0, true, protection.clone()))
        });
        if let Some(inbound) = inbound {
            inbound.deliver(&spec, &mut report);
        }
    }
    control.close();
    connections
        .iter()
        .flatten()
        .flatten()
        .for_each(Inbound::close);
    report
}

/// A failed handshake step hands back the `Abort` to send, unless the peer aborted
/// first: a well-formed checksummed frame on stream 0, at this end's next handshake
/// `sequence`, with the error's code.
fn check_failure(failure: &HandshakeFailure, sequence: u64, report: Report) -> Report {
    match (&failure.error, &failure.abort) {
        (Error::PeerAborted { .. }, abort) => {
            assert!(abort.is_none(), "an abort answered the peer's abort");
        }
        (error, None) => panic!("no Abort frame to send after {error}"),
        (error, Some(abort)) => {
            check_own_frame(abort);
            let h = Header::decode(&abort.header, MAX_PAYLOAD).expect("checked");
            assert_eq!(h.frame_type, FrameType::Abort);
            assert_eq!((h.stream, h.sequence, h.epoch), (0, sequence, 0));
            let sent = Abort::decode(&abort.payload).expect("checked");
            assert_eq!(
                sent.code,
                error.abort_code(),
                "the abort's code is not the error's"
            );
        }
    }
    report
}

/// What every negotiated session must stay within, whoever sent what.
fn check_negotiated(n: &Negotiated) {
    assert!(
        SUPPORTED_VERSIONS.contains(&n.version),
        "version {}",
        n.version
    );
    assert!(n.page_size.is_power_of_two(), "page size {}", n.page_size);
    assert!(
        (1 << MIN_PAGE_SHIFT..=1 << MAX_PAGE_SHIFT).contains(&n.page_size),
        "page size {}",
        n.page_size
    );
    assert!(n.streams <= MAX_STREAMS, "{} streams", n.streams);
    assert!((MIN_NEGOTIATED_PAYLOAD..=MAX_PAYLOAD).contains(&n.max_payload));
    assert!((1..=MAX_VM_NAME).contains(&n.vm_name.len()));
}

/// A frame the end under attack produced: it must split, decode and carry a valid
/// checksum (handshake frames and binds are checksummed, never sealed).
fn check_own_frame(frame: &WireFrame) {
    let bytes = frame.to_bytes();
    let (split, used) = FrameSplitter::new(MAX_PAYLOAD)
        .split(&bytes)
        .expect("an own frame does not split")
        .expect("an own frame is incomplete");
    assert_eq!((&split, used), (frame, bytes.len()));
    assert_eq!(
        frame.trailer,
        script::checksum(&frame.header, &frame.payload)
    );
    let h = Header::decode(&frame.header, MAX_PAYLOAD).expect("an own header does not decode");
    assert!(
        frames::check_payload(h.frame_type, &frame.payload, &mut frames::Report::default())
            .is_some(),
        "an own {:?} payload does not decode",
        h.frame_type
    );
}

/// Where an opener stands; a failed open must leave it unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    frames: u64,
    epoch: u32,
    ended: bool,
}

impl Progress {
    fn of(opener: &Opener) -> Self {
        Self {
            frames: opener.frames(),
            epoch: opener.epoch(),
            ended: opener.is_ended(),
        }
    }
}

/// The receiving direction of one connection, fed the way a driver feeds it.
struct Inbound {
    opener: Opener,
    /// The sequence number of the first frame this opener opens.
    first_sequence: u64,
    /// Use the data path (`decode_header`, aligned buffer, `open_in_place`) instead of
    /// `open` on an owned frame.
    data_path: bool,
    /// How the fuzzer's frames to this connection are protected.
    protection: Protection,
    /// A frame failed its checksum or authentication: the opener must refuse everything
    /// from then on (one forgery attempt per stream).
    forged: bool,
}

impl Inbound {
    fn new(opener: Opener, first_sequence: u64, data_path: bool, protection: Protection) -> Self {
        Self {
            opener,
            first_sequence,
            data_path,
            protection,
            forged: false,
        }
    }

    fn deliver(&mut self, spec: &FrameSpec<'_>, report: &mut Report) {
        let next_sequence = self.first_sequence + self.opener.frames();
        let at = Position {
            stream: self.opener.stream(),
            sequence: next_sequence,
            epoch: self.opener.epoch(),
        };
        let Some(mut frame) = spec.build(at, &self.protection) else {
            return;
        };
        let before = Progress::of(&self.opener);
        let payloads = &mut report.payloads;
        let opened = if self.data_path {
            // The header is decoded (and its length bounded) before the payload is read.
            self.opener.decode_header(&frame.header).and_then(|_| {
                let mut buf = AlignedBuf::page_aligned(frame.payload.len());
                assert!(buf.extend_from_slice(&frame.payload));
                let h =
                    self.opener
                        .open_in_place(&frame.header, buf.as_mut_slice(), &frame.trailer)?;
                frames::check_payload(h.frame_type, buf.as_slice(), payloads);
                Ok(h)
            })
        } else {
            self.opener
                .open(&mut frame)
                .inspect(|h| _ = frames::check_payload(h.frame_type, &frame.payload, payloads))
        };
        let h = match opened {
            Ok(h) => h,
            Err(e) => {
                assert_eq!(
                    Progress::of(&self.opener),
                    before,
                    "a failed open moved the stream"
                );
                self.forged |= matches!(
                    e,
                    Error::PeerMisbehaved(
                        PeerMisbehaved::ChecksumMismatch { .. }
                            | PeerMisbehaved::AuthenticationFailed { .. }
                    )
                );
                return;
            }
        };
        assert!(!self.forged, "a frame opened after a forged one");
        assert!(!before.ended, "a frame opened after EndOfStream");
        assert_eq!(h.stream, self.opener.stream());
        assert_eq!(h.sequence, next_sequence, "a frame opened out of sequence");
        assert_eq!(self.opener.frames(), before.frames + 1);
        assert_eq!(self.opener.epoch(), h.epoch);
        assert!(h.epoch >= before.epoch, "the key epoch went backwards");
        let ended = h.frame_type == FrameType::EndOfStream;
        assert_eq!(self.opener.is_ended(), ended);
        report.frames_opened += 1;
        report.streams_ended += usize::from(ended);
    }

    /// The connection closed: `finish` succeeds exactly when `EndOfStream` was opened.
    fn close(&self) {
        assert_eq!(self.opener.finish().is_ok(), self.opener.is_ended());
    }
}
