//! The handshake, as explicit state machines for both roles.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as Sender (source)
//!     participant R as Receiver (destination)
//!     Note over S: SenderHandshake::start
//!     S->>R: Hello (versions, policy, authority's view, ciphers, id, page size, streams, budgets)
//!     Note over R: ExpectHello::handle → HelloReceived (decision computed)
//!     Note over R: driver fetches the key by id if the decision is Encrypted
//!     R->>S: HelloAck (version, decision, cipher, can/requires encryption, budgets)
//!     R->>S: KeyConfirm(HMAC(confirm_r2s, TH))   [encrypted only]
//!     Note over S: ExpectHelloAck::handle: recompute decision, compare
//!     Note over S: SenderExpectKeyConfirm::handle: verify receiver's MAC
//!     S->>R: KeyConfirm(HMAC(confirm_s2r, TH))   [encrypted only]
//!     Note over R: ReceiverExpectKeyConfirm::handle: verify sender's MAC
//!     S->>R: sealed control frames; StreamBind + sealed pages on data connections
//! ```
//!
//! `TH` is SHA-256 over the `Hello` and `HelloAck` frames (headers and payloads). Handshake
//! frames travel on stream 0 with checksum trailers; the MACs authenticate them after the
//! fact, so nothing sealed flows — and the receiver accepts no page — until both
//! confirmations verified. Each transition consumes its state; a frame a state does not
//! expect is an error naming the state and the frame.
//!
//! Sequence numbers on the control connection: sender→receiver `Hello` = 0, `KeyConfirm`
//! = 1; receiver→sender `HelloAck` = 0, `KeyConfirm` = 1. Sealed control frames continue
//! from there. On a data connection `StreamBind` is sender→receiver sequence 0.

use std::ops::RangeInclusive;
use std::sync::Arc;

use ring::digest;

use crate::error::{AbortCode, ApiMisuse, Error, PeerMisbehaved, Refusal, Result};
use crate::frame::{FrameType, HANDSHAKE_VERSION, Header, SUPPORTED_VERSIONS, WireFrame};
use crate::keyschedule::{Direction, KeySchedule, TRANSCRIPT_HASH_LEN, mac, mac_eq};
use crate::message::pages::{MAX_PAGE_SHIFT, MIN_PAGE_SHIFT};
use crate::message::{
    Abort, CipherSet, Hello, HelloAck, KeyConfirm, MAX_STREAMS, MAX_VM_NAME, Message,
    MigrationKind, StreamBind,
};
use crate::policy::{
    Decision, DecisionInputs, DestinationCapability, EncryptionPolicy, PlaintextReason, decide,
};
use crate::record::{CipherSuite, EpochLimits, Opener, Protection, RecordConfig, Sealer};
use crate::secret::{KeyMaterial, MigrationId};

/// Handshake frames are small (a `Hello` is at most 345 bytes, an `Abort` 1028); anything
/// larger is refused from its header.
const HANDSHAKE_MAX_PAYLOAD: u32 = 1536;
/// The smallest per-frame maximum a receiver may ask for (one 64 KiB page plus its index).
pub const MIN_NEGOTIATED_PAYLOAD: u32 = 64 * 1024 + 64;

/// What the sender brings to the handshake.
#[derive(Debug)]
pub struct SenderConfig {
    /// The migration id from the key service (or the orchestrator).
    pub migration_id: MigrationId,
    /// The VM's name.
    pub vm_name: String,
    /// The VM's effective policy ([`crate::VmPolicy::effective`]).
    pub policy: EncryptionPolicy,
    /// What the key service's registry (or the orchestrator) says about the destination.
    pub destination: DestinationCapability,
    /// The migration key; required when the destination encrypts and the policy allows
    /// encryption.
    pub key: Option<KeyMaterial>,
    /// Protocol versions to offer.
    pub versions: RangeInclusive<u8>,
    /// Guest page size.
    pub page_size: u32,
    /// Guest memory size in pages.
    pub guest_pages: u64,
    /// Number of data connections (for a tunnel: the most it may open; each opens when
    /// the tunnelled connection it carries arrives).
    pub streams: u16,
    /// Guest memory or a tunnel (whose guest size must be 0).
    pub kind: MigrationKind,
    /// What the device state describes ([`DeviceModel::Unspecified`] for a tunnel).
    pub device: crate::DeviceModel,
    /// Key-update budgets to propose.
    pub limits: EpochLimits,
    /// 32 fresh random bytes for this handshake ([`crate::handshake_random`]). They make
    /// every transcript, and so every key, unique even if the same key material were
    /// used twice.
    pub random: [u8; 32],
}

/// What the receiver brings to the handshake.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Protocol versions accepted.
    pub versions: RangeInclusive<u8>,
    /// This receiver can obtain migration keys and encrypt.
    pub can_encrypt: bool,
    /// Refuse every migration that would be plaintext.
    pub require_encryption: bool,
    /// Largest guest page size accepted.
    pub max_page_size: u32,
    /// Most data streams accepted.
    pub max_streams: u16,
    /// Largest key-update budgets accepted (the sender's proposal is lowered to these).
    pub limits: EpochLimits,
    /// Largest frame payload accepted (bounds the receive buffers).
    pub max_payload: u32,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            versions: SUPPORTED_VERSIONS,
            can_encrypt: true,
            require_encryption: false,
            max_page_size: 1 << MAX_PAGE_SHIFT,
            max_streams: MAX_STREAMS,
            limits: EpochLimits::default(),
            max_payload: crate::frame::MAX_PAYLOAD,
        }
    }
}

/// The encryption mode a migration runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sealed with the given suite.
    Encrypted(CipherSuite),
    /// Checksummed only, for the given reason.
    Plaintext(PlaintextReason),
}

/// Everything both ends agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The protocol version.
    pub version: u8,
    /// Encrypted or plaintext (with the reason, for the report).
    pub mode: Mode,
    /// The migration id.
    pub migration_id: MigrationId,
    /// The VM's name.
    pub vm_name: String,
    /// The VM's effective policy.
    pub policy: EncryptionPolicy,
    /// Guest page size.
    pub page_size: u32,
    /// Guest memory size in pages.
    pub guest_pages: u64,
    /// Number of data streams (for a tunnel: the most connections it may carry).
    pub streams: u16,
    /// Guest memory or a tunnel.
    pub kind: MigrationKind,
    /// Key-update budgets.
    pub limits: EpochLimits,
    /// Largest frame payload on any stream.
    pub max_payload: u32,
}

/// One direction pair of one connection: what a driver seals with and opens with.
#[derive(Debug)]
pub struct Channel {
    /// Seals what this end sends.
    pub sealer: Sealer,
    /// Opens what this end receives.
    pub opener: Opener,
}

fn handshake_record(stream: u16, version: u8) -> RecordConfig {
    RecordConfig {
        protection: Protection::Checksum,
        stream,
        version,
        first_sequence: 0,
        limits: EpochLimits::default(),
        first_epoch_frames: u64::MAX,
        max_payload: HANDSHAKE_MAX_PAYLOAD,
    }
}

fn transcript_add(t: &mut digest::Context, frame: &WireFrame) {
    t.update(&frame.header);
    t.update(&frame.payload);
}

fn transcript_hash(t: digest::Context) -> [u8; TRANSCRIPT_HASH_LEN] {
    let mut th = [0u8; TRANSCRIPT_HASH_LEN];
    th.copy_from_slice(t.finish().as_ref());
    th
}

/// Opens a handshake frame and turns `Abort` into [`Error::PeerAborted`] and anything but
/// `expected` into [`PeerMisbehaved::UnexpectedFrame`].
fn open_expected(
    opener: &mut Opener,
    frame: &mut WireFrame,
    expected: FrameType,
    state: &'static str,
) -> Result<Header> {
    let h = opener.open(frame)?;
    if h.frame_type == FrameType::Abort {
        let abort = Abort::decode(&frame.payload)?;
        return Err(Error::PeerAborted {
            code: abort.code,
            message: abort.message,
        });
    }
    if h.frame_type != expected {
        return Err(PeerMisbehaved::UnexpectedFrame {
            state,
            frame_type: h.frame_type,
        }
        .into());
    }
    Ok(h)
}

fn confirm_mac(schedule: &KeySchedule, th: &[u8; 32], direction: Direction) -> [u8; 32] {
    mac(&schedule.confirm_key(th, direction), &[th])
}

/// Opens the peer's `KeyConfirm` and checks its MAC (the peer's direction's confirm key
/// over the transcript hash), in constant time.
fn verify_confirm(
    opener: &mut Opener,
    mut frame: WireFrame,
    (schedule, th, direction): (&KeySchedule, &[u8; 32], Direction),
    state: &'static str,
) -> Result<()> {
    open_expected(opener, &mut frame, FrameType::KeyConfirm, state)?;
    let theirs = KeyConfirm::decode(&frame.payload)?;
    if !mac_eq(&theirs.mac, &confirm_mac(schedule, th, direction)) {
        return Err(PeerMisbehaved::KeyConfirmationFailed.into());
    }
    Ok(())
}

/// Encodes an `Abort` frame for the handshake phase (checksum trailer on stream 0), for a
/// driver that must refuse before a session exists (e.g. the key fetch failed).
fn handshake_abort(sealer: &mut Sealer, code: AbortCode, message: &str) -> Result<WireFrame> {
    sealer.seal(
        FrameType::Abort,
        Abort {
            code,
            message: message.to_owned(),
        }
        .encode(),
    )
}

/// A handshake step failed: the error, and the `Abort` frame to send before closing so
/// the peer learns why.
#[derive(Debug)]
pub struct HandshakeFailure {
    /// What went wrong.
    pub error: Error,
    /// The `Abort` to send (checksummed, on stream 0, at this end's next handshake
    /// sequence). `None` when the peer aborted first.
    pub abort: Option<WireFrame>,
}

impl std::fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for HandshakeFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl PartialEq<Error> for HandshakeFailure {
    fn eq(&self, other: &Error) -> bool {
        self.error == *other
    }
}

impl PartialEq<Error> for Box<HandshakeFailure> {
    fn eq(&self, other: &Error) -> bool {
        self.error == *other
    }
}

impl From<Box<HandshakeFailure>> for Error {
    fn from(f: Box<HandshakeFailure>) -> Self {
        f.error
    }
}

/// The result of a handshake step.
pub type StepResult<T> = std::result::Result<T, Box<HandshakeFailure>>;

fn fail(sealer: &mut Sealer, error: Error) -> Box<HandshakeFailure> {
    let abort = match &error {
        Error::PeerAborted { .. } => None,
        e => handshake_abort(sealer, e.abort_code(), &e.to_string()).ok(),
    };
    Box::new(HandshakeFailure { error, abort })
}

// ---------------------------------------------------------------------------------------
// Sender
// ---------------------------------------------------------------------------------------

/// Entry point of the sender's handshake.
#[derive(Debug)]
pub struct SenderHandshake;

impl SenderHandshake {
    /// Checks the configuration and produces the `Hello` frame to send on the control
    /// connection. A `Required` VM whose destination the authority says cannot encrypt is
    /// refused here ([`crate::policy::preflight`]), before a byte is sent.
    pub fn start(config: SenderConfig) -> Result<(ExpectHelloAck, WireFrame)> {
        if let Some(refusal) = crate::policy::preflight(config.policy, config.destination) {
            return Err(refusal.into());
        }
        let invalid = |m| Error::ApiMisuse(ApiMisuse::InvalidConfig(m));
        if config.versions.is_empty() || *config.versions.start() == 0 {
            return Err(invalid("the version range is empty"));
        }
        let shift = config.page_size.trailing_zeros();
        if !config.page_size.is_power_of_two()
            || !(u32::from(MIN_PAGE_SHIFT)..=u32::from(MAX_PAGE_SHIFT)).contains(&shift)
        {
            return Err(invalid(
                "page size must be a power of two from 4 KiB to 64 KiB",
            ));
        }
        if config.streams > MAX_STREAMS {
            return Err(invalid("at most 256 data streams"));
        }
        if config.kind == MigrationKind::Tunnel && config.guest_pages != 0 {
            return Err(invalid(
                "a tunnel has no guest memory: guest_pages must be 0",
            ));
        }
        if config.vm_name.is_empty() || config.vm_name.len() > MAX_VM_NAME {
            return Err(invalid("the VM name must be 1 to 255 bytes"));
        }
        let may_encrypt = config.destination == DestinationCapability::Encrypts
            && config.policy != EncryptionPolicy::Disabled;
        if may_encrypt && config.key.is_none() {
            return Err(invalid(
                "the destination encrypts and the policy allows it: a migration key is required",
            ));
        }
        let hello = Hello {
            versions: config.versions.clone(),
            policy: config.policy,
            authority: config.destination,
            ciphers: if config.key.is_some() {
                CipherSet::SUPPORTED
            } else {
                CipherSet::NONE
            },
            migration_id: config.migration_id,
            random: config.random,
            page_size: config.page_size,
            streams: config.streams,
            guest_pages: config.guest_pages,
            limits: config.limits,
            vm_name: config.vm_name.clone(),
            kind: config.kind,
            device: config.device,
        };
        let mut sealer = Sealer::new(&handshake_record(0, HANDSHAKE_VERSION));
        let frame = sealer.seal(FrameType::Hello, hello.encode()?)?;
        let mut transcript = digest::Context::new(&digest::SHA256);
        transcript_add(&mut transcript, &frame);
        Ok((
            ExpectHelloAck {
                config,
                hello,
                sealer,
                opener: Opener::new(&handshake_record(0, HANDSHAKE_VERSION)),
                transcript,
            },
            frame,
        ))
    }
}

/// Sender state: `Hello` sent, waiting for the receiver's `HelloAck`.
pub struct ExpectHelloAck {
    config: SenderConfig,
    hello: Hello,
    sealer: Sealer,
    opener: Opener,
    transcript: digest::Context,
}

impl std::fmt::Debug for ExpectHelloAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpectHelloAck")
            .field("hello", &self.hello)
            .finish_non_exhaustive()
    }
}

/// Where the sender goes after the `HelloAck`.
#[derive(Debug)]
pub enum SenderNext {
    /// Encrypted: wait for the receiver's key confirmation.
    ExpectKeyConfirm(Box<SenderExpectKeyConfirm>),
    /// Plaintext: the session is established.
    Established(SenderSession),
}

impl ExpectHelloAck {
    const STATE: &'static str = "expecting HelloAck";

    /// The `Hello` that was sent.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Handles the receiver's answer. A refusal (computed by both ends) comes back as
    /// [`Error::Refused`]; a receiver that disagrees with the sender's own evaluation of
    /// the decision table, or chose outside the offer, is [`PeerMisbehaved`].
    pub fn handle(mut self, frame: WireFrame) -> StepResult<SenderNext> {
        match self.evaluate(frame) {
            Ok((negotiated, th)) => Ok(self.advance(negotiated, th)),
            Err(e) => Err(fail(&mut self.sealer, e)),
        }
    }

    fn evaluate(
        &mut self,
        mut frame: WireFrame,
    ) -> Result<(Negotiated, [u8; TRANSCRIPT_HASH_LEN])> {
        open_expected(
            &mut self.opener,
            &mut frame,
            FrameType::HelloAck,
            Self::STATE,
        )?;
        let ack = HelloAck::decode(&frame.payload)?;
        transcript_add(&mut self.transcript, &frame);

        // Refusals only the receiver can judge: pass them on, the outcome is "refused".
        if let Decision::Refused(
            r @ (Refusal::NoCommonVersion
            | Refusal::PageSizeUnsupported
            | Refusal::TooManyStreams
            | Refusal::NoCommonCipher),
        ) = ack.decision
        {
            return Err(r.into());
        }
        if !self.config.versions.contains(&ack.version)
            || !SUPPORTED_VERSIONS.contains(&ack.version)
        {
            return Err(PeerMisbehaved::IllegalChoice { what: "version" }.into());
        }
        let ours = decide(DecisionInputs {
            policy: self.config.policy,
            authority: self.config.destination,
            wire_can_encrypt: ack.can_encrypt,
            receiver_requires_encryption: ack.requires_encryption,
        });
        // Our own refusal wins over whatever the receiver says: a downgrade is reported
        // as a downgrade, not as a disagreement.
        if let Decision::Refused(r) = ours {
            return Err(r.into());
        }
        if ours != ack.decision {
            return Err(PeerMisbehaved::DecisionMismatch {
                ours: ours.to_string(),
                theirs: ack.decision.to_string(),
            }
            .into());
        }
        let mode = match (ours, ack.cipher) {
            (Decision::Encrypted, Some(c)) if self.hello.ciphers.contains(c) => Mode::Encrypted(c),
            (Decision::Plaintext(reason), None) => Mode::Plaintext(reason),
            _ => {
                return Err(PeerMisbehaved::IllegalChoice {
                    what: "cipher suite",
                }
                .into());
            }
        };
        if !ack.limits.within(self.hello.limits) {
            return Err(PeerMisbehaved::IllegalChoice {
                what: "key-update budgets",
            }
            .into());
        }
        if !(MIN_NEGOTIATED_PAYLOAD..=crate::frame::MAX_PAYLOAD).contains(&ack.max_payload) {
            return Err(PeerMisbehaved::IllegalChoice {
                what: "maximum payload",
            }
            .into());
        }
        let th = transcript_hash(self.transcript.clone());
        let negotiated = Negotiated {
            version: ack.version,
            mode,
            migration_id: self.hello.migration_id,
            vm_name: self.hello.vm_name.clone(),
            policy: self.hello.policy,
            page_size: self.hello.page_size,
            guest_pages: self.hello.guest_pages,
            streams: self.hello.streams,
            kind: self.hello.kind,
            limits: ack.limits,
            max_payload: ack.max_payload,
        };
        Ok((negotiated, th))
    }

    fn advance(self, negotiated: Negotiated, th: [u8; TRANSCRIPT_HASH_LEN]) -> SenderNext {
        match negotiated.mode {
            Mode::Plaintext(_) => {
                SenderNext::Established(SenderSession(SessionCore::new(negotiated, th, None, 1)))
            }
            Mode::Encrypted(_) => {
                let material = self
                    .config
                    .key
                    .as_ref()
                    .expect("ciphers are offered only with a key");
                let schedule = KeySchedule::new(material, negotiated.migration_id);
                SenderNext::ExpectKeyConfirm(Box::new(SenderExpectKeyConfirm {
                    negotiated,
                    th,
                    schedule,
                    sealer: self.sealer,
                    opener: self.opener,
                }))
            }
        }
    }

    /// An `Abort` frame to send instead of waiting (e.g. the operator cancelled).
    pub fn abort(mut self, code: AbortCode, message: &str) -> Result<WireFrame> {
        handshake_abort(&mut self.sealer, code, message)
    }
}

/// Sender state: waiting for the receiver's key confirmation.
pub struct SenderExpectKeyConfirm {
    negotiated: Negotiated,
    th: [u8; TRANSCRIPT_HASH_LEN],
    schedule: KeySchedule,
    sealer: Sealer,
    opener: Opener,
}

impl std::fmt::Debug for SenderExpectKeyConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderExpectKeyConfirm")
            .field("negotiated", &self.negotiated)
            .finish_non_exhaustive()
    }
}

impl SenderExpectKeyConfirm {
    const STATE: &'static str = "expecting the receiver's KeyConfirm";

    /// What was negotiated (not yet authenticated).
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// Verifies the receiver's confirmation; returns the session and the sender's own
    /// confirmation, which must be sent before any sealed frame.
    pub fn handle(mut self, frame: WireFrame) -> StepResult<(SenderSession, WireFrame)> {
        if let Err(e) = self.verify(frame) {
            return Err(fail(&mut self.sealer, e));
        }
        let ours = KeyConfirm {
            mac: confirm_mac(&self.schedule, &self.th, Direction::SenderToReceiver),
        };
        let kc = match self.sealer.seal(FrameType::KeyConfirm, ours.encode()) {
            Ok(kc) => kc,
            Err(e) => return Err(fail(&mut self.sealer, e)),
        };
        let core = SessionCore::new(self.negotiated, self.th, Some(Arc::new(self.schedule)), 2);
        Ok((SenderSession(core), kc))
    }

    fn verify(&mut self, frame: WireFrame) -> Result<()> {
        let peer = (&self.schedule, &self.th, Direction::ReceiverToSender);
        verify_confirm(&mut self.opener, frame, peer, Self::STATE)
    }
}

// ---------------------------------------------------------------------------------------
// Receiver
// ---------------------------------------------------------------------------------------

/// Entry point of the receiver's handshake.
#[derive(Debug)]
pub struct ReceiverHandshake;

impl ReceiverHandshake {
    /// A receiver waiting for a `Hello` on a new control connection. `random` must be 32
    /// fresh random bytes ([`crate::handshake_random`]), new for every connection.
    pub fn start(config: ReceiverConfig, random: [u8; 32]) -> ExpectHello {
        ExpectHello {
            config,
            random,
            sealer: Sealer::new(&handshake_record(0, HANDSHAKE_VERSION)),
            opener: Opener::new(&handshake_record(0, HANDSHAKE_VERSION)),
            transcript: digest::Context::new(&digest::SHA256),
        }
    }
}

/// Receiver state: waiting for the sender's `Hello`.
pub struct ExpectHello {
    config: ReceiverConfig,
    random: [u8; 32],
    sealer: Sealer,
    opener: Opener,
    transcript: digest::Context,
}

impl std::fmt::Debug for ExpectHello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpectHello")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ExpectHello {
    const STATE: &'static str = "expecting Hello";

    /// Handles the `Hello` and computes the decision.
    pub fn handle(mut self, frame: WireFrame) -> StepResult<HelloReceived> {
        match self.evaluate(frame) {
            Ok((hello, decision, version, cipher)) => Ok(HelloReceived {
                version,
                cipher,
                decision,
                hello,
                random: self.random,
                config: self.config,
                sealer: self.sealer,
                opener: self.opener,
                transcript: self.transcript,
            }),
            Err(e) => Err(fail(&mut self.sealer, e)),
        }
    }

    fn evaluate(
        &mut self,
        mut frame: WireFrame,
    ) -> Result<(Hello, Decision, u8, Option<CipherSuite>)> {
        open_expected(&mut self.opener, &mut frame, FrameType::Hello, Self::STATE)?;
        let hello = Hello::decode(&frame.payload)?;
        transcript_add(&mut self.transcript, &frame);
        let c = &self.config;
        let version = hello
            .versions
            .clone()
            .rev()
            .find(|v| c.versions.contains(v) && SUPPORTED_VERSIONS.contains(v));
        let policy_decision = decide(DecisionInputs {
            policy: hello.policy,
            authority: hello.authority,
            wire_can_encrypt: c.can_encrypt,
            receiver_requires_encryption: c.require_encryption,
        });
        let cipher = hello.ciphers.best_common(CipherSet::SUPPORTED);
        let decision = if version.is_none() {
            Decision::Refused(Refusal::NoCommonVersion)
        } else if let Decision::Refused(_) = policy_decision {
            policy_decision
        } else if hello.page_size < (1 << MIN_PAGE_SHIFT)
            || hello.page_size > c.max_page_size.min(1 << MAX_PAGE_SHIFT)
        {
            Decision::Refused(Refusal::PageSizeUnsupported)
        } else if hello.streams > c.max_streams {
            Decision::Refused(Refusal::TooManyStreams)
        } else if policy_decision == Decision::Encrypted && cipher.is_none() {
            Decision::Refused(Refusal::NoCommonCipher)
        } else {
            policy_decision
        };
        let cipher = (decision == Decision::Encrypted)
            .then_some(cipher)
            .flatten();
        Ok((hello, decision, version.unwrap_or(0), cipher))
    }
}

/// Receiver state: `Hello` handled, decision made; the driver now supplies the key (if
/// the decision is encrypted) and sends the answer.
pub struct HelloReceived {
    hello: Hello,
    random: [u8; 32],
    decision: Decision,
    version: u8,
    cipher: Option<CipherSuite>,
    config: ReceiverConfig,
    sealer: Sealer,
    opener: Opener,
    transcript: digest::Context,
}

impl std::fmt::Debug for HelloReceived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HelloReceived")
            .field("hello", &self.hello)
            .field("decision", &self.decision)
            .finish_non_exhaustive()
    }
}

/// Where the receiver goes after answering.
#[derive(Debug)]
pub enum ReceiverNext {
    /// Encrypted: wait for the sender's key confirmation.
    ExpectKeyConfirm(Box<ReceiverExpectKeyConfirm>),
    /// Plaintext: the session is established.
    Established(ReceiverSession),
    /// Refused: send the answer and close.
    Refused(Refusal),
}

impl HelloReceived {
    /// The sender's `Hello` (untrusted until key confirmation).
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The receiver's decision.
    pub fn decision(&self) -> Decision {
        self.decision
    }

    /// Whether [`accept`](Self::accept) needs the migration key.
    pub fn needs_key(&self) -> bool {
        self.decision == Decision::Encrypted
    }

    /// Answers the `Hello`. Returns the next state and the frames to send, in order.
    /// `key` must be given when [`needs_key`](Self::needs_key) is true.
    pub fn accept(mut self, key: Option<KeyMaterial>) -> Result<(ReceiverNext, Vec<WireFrame>)> {
        if self.needs_key() && key.is_none() {
            return Err(ApiMisuse::InvalidConfig(
                "the decision is encrypted: pass the migration key",
            )
            .into());
        }
        let limits = self.hello.limits.min(self.config.limits);
        let max_payload = self
            .config
            .max_payload
            .clamp(MIN_NEGOTIATED_PAYLOAD, crate::frame::MAX_PAYLOAD);
        let ack = HelloAck {
            version: self.version,
            decision: self.decision,
            cipher: self.cipher,
            can_encrypt: self.config.can_encrypt,
            requires_encryption: self.config.require_encryption,
            max_payload,
            limits,
            random: self.random,
        };
        let ack_frame = self.sealer.seal(FrameType::HelloAck, ack.encode())?;
        transcript_add(&mut self.transcript, &ack_frame);
        let th = transcript_hash(self.transcript);
        let negotiated = |mode| Negotiated {
            version: self.version,
            mode,
            migration_id: self.hello.migration_id,
            vm_name: self.hello.vm_name.clone(),
            policy: self.hello.policy,
            page_size: self.hello.page_size,
            guest_pages: self.hello.guest_pages,
            streams: self.hello.streams,
            kind: self.hello.kind,
            limits,
            max_payload,
        };
        match (self.decision, self.cipher, key) {
            (Decision::Refused(r), _, _) => Ok((ReceiverNext::Refused(r), vec![ack_frame])),
            (Decision::Plaintext(reason), _, _) => {
                let core = SessionCore::new(negotiated(Mode::Plaintext(reason)), th, None, 1);
                Ok((
                    ReceiverNext::Established(ReceiverSession(core)),
                    vec![ack_frame],
                ))
            }
            (Decision::Encrypted, Some(cipher), Some(material)) => {
                let schedule = KeySchedule::new(&material, self.hello.migration_id);
                let kc = KeyConfirm {
                    mac: confirm_mac(&schedule, &th, Direction::ReceiverToSender),
                };
                let kc_frame = self.sealer.seal(FrameType::KeyConfirm, kc.encode())?;
                Ok((
                    ReceiverNext::ExpectKeyConfirm(Box::new(ReceiverExpectKeyConfirm {
                        negotiated: negotiated(Mode::Encrypted(cipher)),
                        th,
                        schedule,
                        sealer: self.sealer,
                        opener: self.opener,
                    })),
                    vec![ack_frame, kc_frame],
                ))
            }
            (Decision::Encrypted, _, _) => unreachable!("checked above: cipher and key exist"),
        }
    }

    /// Refuses with an `Abort` instead of answering (e.g. the key service would not hand
    /// out the key).
    pub fn reject(mut self, code: AbortCode, message: &str) -> Result<WireFrame> {
        handshake_abort(&mut self.sealer, code, message)
    }
}

/// Receiver state: waiting for the sender's key confirmation.
pub struct ReceiverExpectKeyConfirm {
    negotiated: Negotiated,
    th: [u8; TRANSCRIPT_HASH_LEN],
    schedule: KeySchedule,
    sealer: Sealer,
    opener: Opener,
}

impl std::fmt::Debug for ReceiverExpectKeyConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverExpectKeyConfirm")
            .field("negotiated", &self.negotiated)
            .finish_non_exhaustive()
    }
}

impl ReceiverExpectKeyConfirm {
    const STATE: &'static str = "expecting the sender's KeyConfirm";

    /// Verifies the sender's confirmation and establishes the session. On failure the
    /// abort frame is checksummed, not sealed: the sender, already expecting sealed frames,
    /// fails to authenticate it, which ends its side as surely.
    pub fn handle(mut self, frame: WireFrame) -> StepResult<ReceiverSession> {
        if let Err(e) = self.verify(frame) {
            return Err(fail(&mut self.sealer, e));
        }
        Ok(ReceiverSession(SessionCore::new(
            self.negotiated,
            self.th,
            Some(Arc::new(self.schedule)),
            2,
        )))
    }

    fn verify(&mut self, frame: WireFrame) -> Result<()> {
        let peer = (&self.schedule, &self.th, Direction::SenderToReceiver);
        verify_confirm(&mut self.opener, frame, peer, Self::STATE)
    }
}

// ---------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct SessionCore {
    negotiated: Negotiated,
    th: [u8; TRANSCRIPT_HASH_LEN],
    schedule: Option<Arc<KeySchedule>>,
    control_first_sequence: u64,
    control_taken: bool,
    /// Data streams whose channel exists (index 0 = stream 1). Each (direction, stream)
    /// gets exactly one sealer, so no nonce can be used twice.
    streams_taken: Vec<bool>,
}

impl SessionCore {
    fn new(
        negotiated: Negotiated,
        th: [u8; TRANSCRIPT_HASH_LEN],
        schedule: Option<Arc<KeySchedule>>,
        control_first_sequence: u64,
    ) -> Self {
        let streams_taken = vec![false; usize::from(negotiated.streams)];
        Self {
            negotiated,
            th,
            schedule,
            control_first_sequence,
            control_taken: false,
            streams_taken,
        }
    }

    fn record(&self, stream: u16, direction: Direction, first_sequence: u64) -> RecordConfig {
        RecordConfig {
            protection: match &self.schedule {
                Some(schedule) => Protection::Aead {
                    schedule: schedule.clone(),
                    transcript_hash: self.th,
                    direction,
                },
                None => Protection::Checksum,
            },
            stream,
            version: self.negotiated.version,
            first_sequence,
            limits: self.negotiated.limits,
            first_epoch_frames: first_epoch_frames(&self.th),
            max_payload: self.negotiated.max_payload,
        }
    }

    fn control(&mut self, send: Direction, recv: Direction) -> Result<Channel> {
        if std::mem::replace(&mut self.control_taken, true) {
            return Err(ApiMisuse::InvalidConfig("the control channel was already taken").into());
        }
        let first = self.control_first_sequence;
        Ok(Channel {
            sealer: Sealer::new(&self.record(0, send, first)),
            opener: Opener::new(&self.record(0, recv, first)),
        })
    }

    fn take_stream(&mut self, stream: u16) -> Result<(), ApiMisuse> {
        let streams = self.negotiated.streams;
        let slot = usize::from(stream)
            .checked_sub(1)
            .and_then(|i| self.streams_taken.get_mut(i))
            .ok_or(ApiMisuse::NoSuchStream { stream, streams })?;
        if std::mem::replace(slot, true) {
            return Err(ApiMisuse::InvalidConfig(
                "that data stream was already opened",
            ));
        }
        Ok(())
    }

    fn bind_mac(&self, stream: u16) -> [u8; 32] {
        match &self.schedule {
            Some(s) => mac(
                &s.bind_key(&self.th, stream),
                &[&self.negotiated.migration_id.0, &stream.to_be_bytes()],
            ),
            // Plaintext: no key, so the transcript hash only guards against cross-wiring.
            None => self.th,
        }
    }
}

/// The frame budget of epoch 0: 1024 + (the first two bytes of the transcript hash mod
/// 1024). Both ends know the transcript hash, so they agree; it differs per migration.
pub(crate) fn first_epoch_frames(th: &[u8; TRANSCRIPT_HASH_LEN]) -> u64 {
    1024 + u64::from(u16::from_be_bytes([th[0], th[1]]) % 1024)
}

/// The sender's established session: hands out the control channel and data streams.
#[derive(Debug)]
pub struct SenderSession(SessionCore);

impl SenderSession {
    /// What was negotiated (authenticated by the key confirmations when encrypted).
    pub fn negotiated(&self) -> &Negotiated {
        &self.0.negotiated
    }

    /// The transcript hash (public; identifies this handshake in logs).
    pub fn transcript_hash(&self) -> &[u8; TRANSCRIPT_HASH_LEN] {
        &self.0.th
    }

    /// The control connection's channel. Can be taken once.
    pub fn take_control(&mut self) -> Result<Channel> {
        self.0
            .control(Direction::SenderToReceiver, Direction::ReceiverToSender)
    }

    /// Opens data stream `stream` (1..=streams): the `StreamBind` frame to send first on
    /// the new connection, and its channel. Each stream can be opened once.
    pub fn open_data_stream(&mut self, stream: u16) -> Result<(WireFrame, Channel)> {
        self.0.take_stream(stream)?;
        let bind = StreamBind {
            migration_id: self.0.negotiated.migration_id,
            stream,
            mac: self.0.bind_mac(stream),
        };
        let mut bind_sealer = Sealer::new(&RecordConfig {
            protection: Protection::Checksum,
            ..self.0.record(stream, Direction::SenderToReceiver, 0)
        });
        let frame = bind_sealer.seal(FrameType::StreamBind, bind.encode())?;
        Ok((
            frame,
            Channel {
                sealer: Sealer::new(&self.0.record(stream, Direction::SenderToReceiver, 1)),
                opener: Opener::new(&self.0.record(stream, Direction::ReceiverToSender, 0)),
            },
        ))
    }
}

/// The receiver's established session.
#[derive(Debug)]
pub struct ReceiverSession(SessionCore);

impl ReceiverSession {
    /// What was negotiated (authenticated by the key confirmations when encrypted).
    pub fn negotiated(&self) -> &Negotiated {
        &self.0.negotiated
    }

    /// The transcript hash.
    pub fn transcript_hash(&self) -> &[u8; TRANSCRIPT_HASH_LEN] {
        &self.0.th
    }

    /// The control connection's channel. Can be taken once.
    pub fn take_control(&mut self) -> Result<Channel> {
        self.0
            .control(Direction::ReceiverToSender, Direction::SenderToReceiver)
    }

    /// Reads the migration id and stream of a data connection's first frame without
    /// checking it, so a receiver serving several migrations can find the session.
    pub fn peek_stream_bind(frame: &WireFrame) -> Result<StreamBind> {
        Header::decode(&frame.header, HANDSHAKE_MAX_PAYLOAD)?;
        match Message::decode(
            FrameType::from_u8(frame.header[3])
                .ok_or(PeerMisbehaved::UnknownFrameType(frame.header[3]))?,
            &frame.payload,
        )? {
            Message::StreamBind(b) => Ok(b),
            other => Err(PeerMisbehaved::UnexpectedFrame {
                state: "expecting StreamBind",
                frame_type: other.frame_type(),
            }
            .into()),
        }
    }

    /// Verifies a data connection's `StreamBind` and returns its stream and channel.
    pub fn accept_data_stream(&mut self, mut frame: WireFrame) -> Result<(u16, Channel)> {
        let h = Header::decode(&frame.header, HANDSHAKE_MAX_PAYLOAD)?;
        let stream = h.stream;
        let mut bind_opener = Opener::new(&RecordConfig {
            protection: Protection::Checksum,
            max_payload: HANDSHAKE_MAX_PAYLOAD,
            ..self.0.record(stream, Direction::SenderToReceiver, 0)
        });
        let h = bind_opener.open(&mut frame)?;
        if h.frame_type != FrameType::StreamBind {
            return Err(PeerMisbehaved::UnexpectedFrame {
                state: "expecting StreamBind",
                frame_type: h.frame_type,
            }
            .into());
        }
        let bind = StreamBind::decode(&frame.payload)?;
        let failed = PeerMisbehaved::StreamBindFailed { stream };
        if bind.stream != stream
            || bind.migration_id != self.0.negotiated.migration_id
            || !mac_eq(&bind.mac, &self.0.bind_mac(stream))
        {
            return Err(failed.into());
        }
        self.0.take_stream(stream).map_err(|_| failed)?;
        Ok((
            stream,
            Channel {
                sealer: Sealer::new(&self.0.record(stream, Direction::ReceiverToSender, 0)),
                opener: Opener::new(&self.0.record(stream, Direction::SenderToReceiver, 1)),
            },
        ))
    }
}
