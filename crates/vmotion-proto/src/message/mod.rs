//! Frame payloads: one type per frame type, each with `encode` and `decode`.
//!
//! Decoders take untrusted bytes and return a value or a [`PeerMisbehaved`] error; they
//! never panic and never allocate more than the (already bounded) payload length.
//! Byte layouts are in docs/protocol.md; all integers are big-endian and every reserved
//! byte must be zero.

pub mod pages;

use std::ops::RangeInclusive;

use crate::codec::{Reader, Writer};
use crate::error::{AbortCode, ApiMisuse, PeerMisbehaved, Refusal};
use crate::frame::FrameType;
use crate::policy::{Decision, DestinationCapability, EncryptionPolicy, PlaintextReason};
use crate::record::{CipherSuite, EpochLimits};
use crate::secret::MigrationId;

pub use pages::{PageEntry, PagesBuilder, PagesView};

/// Most data streams (connections besides the control one) a migration may use.
pub const MAX_STREAMS: u16 = 256;
/// Longest VM name, in bytes of UTF-8.
pub const MAX_VM_NAME: usize = 255;
/// Longest abort message, in bytes of UTF-8.
pub const MAX_ABORT_MESSAGE: usize = 1024;
/// Largest device state a migration may carry (sent in chunks of at most a payload).
pub const MAX_DEVICE_STATE: u64 = 1 << 30;

/// Bitmask of cipher suites (bit `n-1` for suite value `n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CipherSet(pub u8);

impl CipherSet {
    /// All suites this crate implements.
    pub const SUPPORTED: Self = Self(1 << (CipherSuite::Aes256Gcm as u8 - 1));
    /// No suite.
    pub const NONE: Self = Self(0);

    /// Whether the set holds `suite`.
    pub fn contains(self, suite: CipherSuite) -> bool {
        self.0 & (1 << (suite as u8 - 1)) != 0
    }

    /// The preferred suite in both sets.
    pub fn best_common(self, other: Self) -> Option<CipherSuite> {
        [CipherSuite::Aes256Gcm]
            .into_iter()
            .find(|s| self.contains(*s) && other.contains(*s))
    }
}

/// What a migration carries: decided by the sender, in the `Hello` (byte 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MigrationKind {
    /// Guest memory in `Pages` frames, device state, switchover (value 0: the byte was
    /// reserved before tunnels existed, so every earlier `Hello` reads as this).
    #[default]
    Memory = 0,
    /// Opaque byte streams in `TunnelData` frames, both directions, one data stream per
    /// tunnelled connection (QEMU's own migration stream and its multifd channels). The
    /// guest size is 0.
    Tunnel = 1,
}

impl MigrationKind {
    /// The kind with this wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Memory),
            1 => Some(Self::Tunnel),
            _ => None,
        }
    }
}

/// What kind of VM the device state describes: decided by the sender's mover, in the
/// `Hello` (byte 6), so that a destination whose sink cannot run it refuses in pre-flight,
/// before the source pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceModel {
    /// Not said (value 0: the byte was reserved before, so every earlier `Hello` reads as
    /// this): only loading the device state tells.
    #[default]
    Unspecified = 0,
    /// A synthetic test guest (`vmotion_mover::synthetic`).
    Synthetic = 1,
    /// A `vmotion-vmm` KVM micro-VM.
    MicroVm = 2,
}

impl DeviceModel {
    /// The model with this wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Unspecified),
            1 => Some(Self::Synthetic),
            2 => Some(Self::MicroVm),
            _ => None,
        }
    }

    /// A name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unspecified => "an unspecified device model",
            Self::Synthetic => "a synthetic test guest",
            Self::MicroVm => "a vmotion-vmm micro-VM",
        }
    }
}

/// `Hello`: the sender's offer. Its layout is frozen across protocol versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol versions the sender speaks.
    pub versions: RangeInclusive<u8>,
    /// The VM's effective encryption policy.
    pub policy: EncryptionPolicy,
    /// What the key service (or the orchestrator) says about the destination.
    pub authority: DestinationCapability,
    /// Cipher suites the sender offers (empty when it holds no key).
    pub ciphers: CipherSet,
    /// The migration id (names the key at the key service).
    pub migration_id: MigrationId,
    /// The sender's 32 fresh random bytes: every transcript is unique.
    pub random: [u8; 32],
    /// Guest page size in bytes.
    pub page_size: u32,
    /// Number of data connections the sender will open.
    pub streams: u16,
    /// Guest memory size in pages.
    pub guest_pages: u64,
    /// The key-update budgets the sender proposes (the receiver may lower them).
    pub limits: EpochLimits,
    /// The VM's name.
    pub vm_name: String,
    /// Guest memory or a tunnel.
    pub kind: MigrationKind,
    /// What the device state describes.
    pub device: DeviceModel,
}

impl Hello {
    /// Encodes the payload.
    pub fn encode(&self) -> Result<Vec<u8>, ApiMisuse> {
        if self.vm_name.is_empty() || self.vm_name.len() > MAX_VM_NAME {
            return Err(ApiMisuse::Unencodable("VM name must be 1 to 255 bytes"));
        }
        let mut v = Vec::with_capacity(64 + self.vm_name.len());
        let mut w = Writer(&mut v);
        w.u8(*self.versions.start());
        w.u8(*self.versions.end());
        w.u8(self.policy as u8);
        w.u8(self.authority as u8);
        w.u8(self.ciphers.0);
        w.u8(self.kind as u8);
        w.u8(self.device as u8);
        w.zeros(1);
        w.bytes(&self.migration_id.0);
        w.bytes(&self.random);
        w.u32(self.page_size);
        w.u16(self.streams);
        w.zeros(2);
        w.u64(self.guest_pages);
        w.u64(self.limits.max_frames.get());
        w.u64(self.limits.max_bytes.get());
        w.string(&self.vm_name);
        Ok(v)
    }

    /// Decodes and validates the payload.
    pub fn decode(payload: &[u8]) -> Result<Self, PeerMisbehaved> {
        let mut r = Reader::new(payload, FrameType::Hello);
        let (min, max) = (r.u8()?, r.u8()?);
        if min == 0 || min > max {
            return Err(r.malformed("empty or invalid version range"));
        }
        let policy = EncryptionPolicy::from_u8(r.u8()?).ok_or(r.malformed("unknown policy"))?;
        let authority =
            DestinationCapability::from_u8(r.u8()?).ok_or(r.malformed("unknown capability"))?;
        let ciphers = CipherSet(r.u8()?);
        let kind = MigrationKind::from_u8(r.u8()?).ok_or(r.malformed("unknown migration kind"))?;
        let device = DeviceModel::from_u8(r.u8()?).ok_or(r.malformed("unknown device model"))?;
        r.zeros(1)?;
        let migration_id = MigrationId(r.array()?);
        let random = r.array()?;
        let page_size = r.u32()?;
        if !page_size.is_power_of_two() {
            return Err(r.malformed("page size is not a power of two"));
        }
        let streams = r.u16()?;
        if streams > MAX_STREAMS {
            return Err(r.malformed("too many streams"));
        }
        r.zeros(2)?;
        let guest_pages = r.u64()?;
        if kind == MigrationKind::Tunnel && guest_pages != 0 {
            return Err(r.malformed("a tunnel has no guest memory"));
        }
        let limits =
            EpochLimits::new(r.u64()?, r.u64()?).ok_or(r.malformed("zero key-update budget"))?;
        let vm_name = r.string(MAX_VM_NAME)?.to_owned();
        if vm_name.is_empty() {
            return Err(r.malformed("empty VM name"));
        }
        r.finish()?;
        Ok(Self {
            versions: min..=max,
            policy,
            authority,
            ciphers,
            migration_id,
            random,
            page_size,
            streams,
            guest_pages,
            limits,
            vm_name,
            kind,
            device,
        })
    }
}

/// `HelloAck`: the receiver's choices and its own evaluation of the decision table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    /// The chosen protocol version (0 when there is none in common).
    pub version: u8,
    /// The receiver's decision.
    pub decision: Decision,
    /// The chosen cipher suite, when encrypted.
    pub cipher: Option<CipherSuite>,
    /// The receiver holds crypto capability (it will fetch and use the key).
    pub can_encrypt: bool,
    /// The receiving host requires encryption for everything it accepts.
    pub requires_encryption: bool,
    /// Largest payload the receiver accepts on any stream.
    pub max_payload: u32,
    /// The key-update budgets both ends use (at most the sender's proposal).
    pub limits: EpochLimits,
    /// The receiver's 32 fresh random bytes.
    pub random: [u8; 32],
}

impl HelloAck {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, detail, refusal) = match self.decision {
            Decision::Encrypted => (1, 0, 0),
            Decision::Plaintext(r) => (2, r as u8, 0),
            Decision::Refused(r) => (3, 0, r.abort_code() as u16),
        };
        let mut v = Vec::with_capacity(40);
        let mut w = Writer(&mut v);
        w.u8(self.version);
        w.u8(kind);
        w.u8(detail);
        w.u8(self.cipher.map_or(0, |c| c as u8));
        w.u16(refusal);
        w.bool(self.can_encrypt);
        w.bool(self.requires_encryption);
        w.u32(self.max_payload);
        w.zeros(4);
        w.u64(self.limits.max_frames.get());
        w.u64(self.limits.max_bytes.get());
        w.bytes(&self.random);
        v
    }

    /// Decodes and validates the payload.
    pub fn decode(payload: &[u8]) -> Result<Self, PeerMisbehaved> {
        let mut r = Reader::new(payload, FrameType::HelloAck);
        let version = r.u8()?;
        let (kind, detail, cipher, refusal) = (r.u8()?, r.u8()?, r.u8()?, r.u16()?);
        let decision = match (kind, detail, refusal) {
            (1, 0, 0) => Decision::Encrypted,
            (2, d, 0) => Decision::Plaintext(
                PlaintextReason::from_u8(d).ok_or(r.malformed("unknown plaintext reason"))?,
            ),
            (3, 0, code) => Decision::Refused(
                AbortCode::from_u16(code)
                    .and_then(Refusal::from_abort_code)
                    .ok_or(r.malformed("unknown refusal code"))?,
            ),
            _ => return Err(r.malformed("invalid decision")),
        };
        let cipher = match cipher {
            0 => None,
            c => Some(CipherSuite::from_u8(c).ok_or(r.malformed("unknown cipher suite"))?),
        };
        let can_encrypt = r.bool()?;
        let requires_encryption = r.bool()?;
        let max_payload = r.u32()?;
        r.zeros(4)?;
        let limits =
            EpochLimits::new(r.u64()?, r.u64()?).ok_or(r.malformed("zero key-update budget"))?;
        let random = r.array()?;
        r.finish()?;
        Ok(Self {
            version,
            decision,
            cipher,
            can_encrypt,
            requires_encryption,
            max_payload,
            limits,
            random,
        })
    }
}

/// `KeyConfirm`: HMAC-SHA256 over the transcript hash under the direction's confirm key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyConfirm {
    /// The MAC.
    pub mac: [u8; 32],
}

impl KeyConfirm {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        self.mac.to_vec()
    }
    /// Decodes the payload.
    pub fn decode(payload: &[u8]) -> Result<Self, PeerMisbehaved> {
        let mut r = Reader::new(payload, FrameType::KeyConfirm);
        let mac = r.array()?;
        r.finish()?;
        Ok(Self { mac })
    }
}

/// `StreamBind`: first frame of a data connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamBind {
    /// The migration the connection belongs to (lets a receiver route it).
    pub migration_id: MigrationId,
    /// The data stream, 1..=streams.
    pub stream: u16,
    /// HMAC proving the sender holds the migration's keys (the transcript hash in
    /// plaintext mode, which only guards against cross-wiring).
    pub mac: [u8; 32],
}

impl StreamBind {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(52);
        let mut w = Writer(&mut v);
        w.bytes(&self.migration_id.0);
        w.u16(self.stream);
        w.zeros(2);
        w.bytes(&self.mac);
        v
    }
    /// Decodes the payload.
    pub fn decode(payload: &[u8]) -> Result<Self, PeerMisbehaved> {
        let mut r = Reader::new(payload, FrameType::StreamBind);
        let migration_id = MigrationId(r.array()?);
        let stream = r.u16()?;
        if stream == 0 {
            return Err(r.malformed("stream 0 is the control connection"));
        }
        r.zeros(2)?;
        let mac = r.array()?;
        r.finish()?;
        Ok(Self {
            migration_id,
            stream,
            mac,
        })
    }
}

/// Whether an `IterationMarker` opens or closes an iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MarkerKind {
    /// The iteration starts.
    Start = 1,
    /// The iteration's pages have all been sent.
    End = 2,
}

/// `IterationMarker`: start or end of a pre-copy iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IterationMarker {
    /// Iteration number (0 = the full copy).
    pub iteration: u32,
    /// Start or end.
    pub kind: MarkerKind,
    /// Pages in the iteration (at the end; 0 at the start).
    pub pages: u64,
}

impl IterationMarker {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        let mut w = Writer(&mut v);
        w.u32(self.iteration);
        w.u8(self.kind as u8);
        w.zeros(3);
        w.u64(self.pages);
        v
    }
    /// Decodes the payload.
    pub fn decode(payload: &[u8]) -> Result<Self, PeerMisbehaved> {
        let mut r = Reader::new(payload, FrameType::IterationMarker);
        let iteration = r.u32()?;
        let kind = match r.u8()? {
            1 => MarkerKind::Start,
            2 => MarkerKind::End,
            _ => return Err(r.malformed("unknown marker kind")),
        };
        r.zeros(3)?;
        let pages = r.u64()?;
        r.finish()?;
        Ok(Self {
            iteration,
            kind,
            pages,
        })
    }
}

/// `DeviceState`: one chunk of the device state blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStateChunk<'a> {
    /// Offset of this chunk in the blob.
    pub offset: u64,
    /// Length of the whole blob.
    pub total_len: u64,
    /// The chunk's bytes.
    pub data: &'a [u8],
}

impl<'a> DeviceStateChunk<'a> {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.data.len());
        let mut w = Writer(&mut v);
        w.u64(self.offset);
        w.u64(self.total_len);
        w.bytes(self.data);
        v
    }
    /// Decodes the payload.
    pub fn decode(payload: &'a [u8]) -> Result<Self, PeerMisbehaved> {
        let mut r = Reader::new(payload, FrameType::DeviceState);
        let offset = r.u64()?;
        let total_len = r.u64()?;
        if total_len > MAX_DEVICE_STATE {
            return Err(r.malformed("device state larger than the maximum"));
        }
        let data = r.rest();
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > total_len)
        {
            return Err(r.malformed("chunk extends past the device state length"));
        }
        Ok(Self {
            offset,
            total_len,
            data,
        })
    }
}

/// `EndOfStream`: totals of the stream direction it ends (frames and payload bytes sealed
/// before it). Checked by the record layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndOfStream {
    /// Frames before this one.
    pub frames: u64,
    /// Payload bytes before this one.
    pub bytes: u64,
}

impl EndOfStream {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        let mut w = Writer(&mut v);
        w.u64(self.frames);
        w.u64(self.bytes);
        v
    }
    /// Decodes the payload.
    pub fn decode(payload: &[u8]) -> Result<Self, PeerMisbehaved> {
        let mut r = Reader::new(payload, FrameType::EndOfStream);
        let frames = r.u64()?;
        let bytes = r.u64()?;
        r.finish()?;
        Ok(Self { frames, bytes })
    }
}

/// Totals of one data stream in `Complete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTotals {
    /// Frames sealed on the stream, `EndOfStream` excluded.
    pub frames: u64,
    /// Payload bytes of those frames.
    pub bytes: u64,
}

/// `Complete`: the source has paused the VM and sent everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Complete {
    /// Pre-copy iterations run (the stop-and-copy pass included).
    pub iterations: u32,
    /// Pages sent in all (zero pages included), counting resends.
    pub pages: u64,
    /// Length of the device state sent.
    pub device_state_len: u64,
    /// Per data stream (index 0 = stream 1).
    pub streams: Vec<StreamTotals>,
}

impl Complete {
    /// Encodes the payload.
    pub fn encode(&self) -> Result<Vec<u8>, ApiMisuse> {
        let n = u16::try_from(self.streams.len())
            .ok()
            .filter(|n| *n <= MAX_STREAMS)
            .ok_or(ApiMisuse::Unencodable("too many streams"))?;
        if self.device_state_len > MAX_DEVICE_STATE {
            return Err(ApiMisuse::Unencodable(
                "device state larger than the maximum",
            ));
        }
        let mut v = Vec::with_capacity(24 + 16 * self.streams.len());
        let mut w = Writer(&mut v);
        w.u32(self.iterations);
        w.u16(n);
        w.zeros(2);
        w.u64(self.pages);
        w.u64(self.device_state_len);
        for s in &self.streams {
            w.u64(s.frames);
            w.u64(s.bytes);
        }
        Ok(v)
    }
    /// Decodes the payload.
    pub fn decode(payload: &[u8]) -> Result<Self, PeerMisbehaved> {
        let mut r = Reader::new(payload, FrameType::Complete);
        let iterations = r.u32()?;
        let n = r.u16()?;
        if n > MAX_STREAMS {
            return Err(r.malformed("too many streams"));
        }
        r.zeros(2)?;
        let pages = r.u64()?;
        let device_state_len = r.u64()?;
        if device_state_len > MAX_DEVICE_STATE {
            return Err(r.malformed("device state larger than the maximum"));
        }
        // n is bounded by MAX_STREAMS, so this allocation is at most 4 KiB.
        let mut streams = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            streams.push(StreamTotals {
                frames: r.u64()?,
                bytes: r.u64()?,
            });
        }
        r.finish()?;
        Ok(Self {
            iterations,
            pages,
            device_state_len,
            streams,
        })
    }
}

/// `Ready`: the destination verified everything and waits for `Commit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// Pages received in all (echoes `Complete`).
    pub pages: u64,
    /// Device state bytes received (echoes `Complete`).
    pub device_state_len: u64,
}

impl Ready {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        let mut w = Writer(&mut v);
        w.u64(self.pages);
        w.u64(self.device_state_len);
        v
    }
    /// Decodes the payload.
    pub fn decode(payload: &[u8]) -> Result<Self, PeerMisbehaved> {
        let mut r = Reader::new(payload, FrameType::Ready);
        let pages = r.u64()?;
        let device_state_len = r.u64()?;
        r.finish()?;
        Ok(Self {
            pages,
            device_state_len,
        })
    }
}

/// `Commit`: the source recorded the commit and stopped for good; the destination may
/// resume — after its claim wins at the arbiter when [`claim_at_arbiter`] says so.
///
/// [`claim_at_arbiter`]: Commit::claim_at_arbiter
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// The source committed at an arbiter: the destination resumes only once its claim
    /// (`committed → claimed`) is recorded there. When false, the source has no arbiter
    /// and this `Commit` is the only decision: the destination resumes on it.
    pub claim_at_arbiter: bool,
}

impl Commit {
    /// Encodes the payload: one byte of flags, bit 0 = claim at the arbiter.
    pub fn encode(&self) -> Vec<u8> {
        vec![u8::from(self.claim_at_arbiter)]
    }
    /// Decodes the payload; unknown flags are refused.
    pub fn decode(payload: &[u8]) -> Result<Self, PeerMisbehaved> {
        let mut r = Reader::new(payload, FrameType::Commit);
        let flags = r.u8()?;
        if flags > 1 {
            return Err(r.malformed("unknown Commit flags"));
        }
        r.finish()?;
        Ok(Self {
            claim_at_arbiter: flags == 1,
        })
    }
}

/// `Abort`: the migration ends; the reason code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    /// Why.
    pub code: AbortCode,
    /// Explanation (at most 1024 bytes; longer messages are cut at a char boundary).
    pub message: String,
}

impl Abort {
    /// Encodes the payload, shortening an over-long message.
    pub fn encode(&self) -> Vec<u8> {
        let mut end = self.message.len().min(MAX_ABORT_MESSAGE);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        let mut v = Vec::with_capacity(4 + end);
        let mut w = Writer(&mut v);
        w.u16(self.code as u16);
        w.string(&self.message[..end]);
        v
    }
    /// Decodes the payload.
    pub fn decode(payload: &[u8]) -> Result<Self, PeerMisbehaved> {
        let mut r = Reader::new(payload, FrameType::Abort);
        let code = AbortCode::from_u16(r.u16()?).ok_or(r.malformed("unknown abort code"))?;
        let message = r.string(MAX_ABORT_MESSAGE)?.to_owned();
        r.finish()?;
        Ok(Self { code, message })
    }
}

/// Any decoded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloAck`].
    HelloAck(HelloAck),
    /// See [`KeyConfirm`].
    KeyConfirm(KeyConfirm),
    /// See [`StreamBind`].
    StreamBind(StreamBind),
    /// See [`PagesView`].
    Pages(PagesView<'a>),
    /// See [`IterationMarker`].
    IterationMarker(IterationMarker),
    /// See [`DeviceStateChunk`].
    DeviceState(DeviceStateChunk<'a>),
    /// See [`EndOfStream`].
    EndOfStream(EndOfStream),
    /// See [`Complete`].
    Complete(Complete),
    /// See [`Ready`].
    Ready(Ready),
    /// See [`Commit`].
    Commit(Commit),
    /// See [`Abort`].
    Abort(Abort),
    /// Opaque bytes of a tunnelled stream.
    TunnelData(&'a [u8]),
    /// The tunnelled stream's writer closed its half. Empty payload.
    TunnelShutdown,
    /// `Claimed`: the destination won the VM at the arbiter and resumes it. Empty payload.
    Claimed,
}

impl<'a> Message<'a> {
    /// Decodes the payload of a frame of type `frame_type`.
    pub fn decode(frame_type: FrameType, payload: &'a [u8]) -> Result<Self, PeerMisbehaved> {
        let empty = |t| {
            if payload.is_empty() {
                Ok(())
            } else {
                Err(PeerMisbehaved::MalformedPayload {
                    frame_type: t,
                    reason: "payload must be empty",
                })
            }
        };
        Ok(match frame_type {
            FrameType::Hello => Self::Hello(Hello::decode(payload)?),
            FrameType::HelloAck => Self::HelloAck(HelloAck::decode(payload)?),
            FrameType::KeyConfirm => Self::KeyConfirm(KeyConfirm::decode(payload)?),
            FrameType::StreamBind => Self::StreamBind(StreamBind::decode(payload)?),
            FrameType::Pages => Self::Pages(PagesView::decode(payload)?),
            FrameType::IterationMarker => Self::IterationMarker(IterationMarker::decode(payload)?),
            FrameType::DeviceState => Self::DeviceState(DeviceStateChunk::decode(payload)?),
            FrameType::EndOfStream => Self::EndOfStream(EndOfStream::decode(payload)?),
            FrameType::Complete => Self::Complete(Complete::decode(payload)?),
            FrameType::Ready => Self::Ready(Ready::decode(payload)?),
            FrameType::Commit => Self::Commit(Commit::decode(payload)?),
            FrameType::Abort => Self::Abort(Abort::decode(payload)?),
            FrameType::TunnelData => Self::TunnelData(payload),
            FrameType::TunnelShutdown => {
                empty(frame_type)?;
                Self::TunnelShutdown
            }
            FrameType::Claimed => {
                empty(frame_type)?;
                Self::Claimed
            }
        })
    }

    /// The frame type that carries this message.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Hello(_) => FrameType::Hello,
            Self::HelloAck(_) => FrameType::HelloAck,
            Self::KeyConfirm(_) => FrameType::KeyConfirm,
            Self::StreamBind(_) => FrameType::StreamBind,
            Self::Pages(_) => FrameType::Pages,
            Self::IterationMarker(_) => FrameType::IterationMarker,
            Self::DeviceState(_) => FrameType::DeviceState,
            Self::EndOfStream(_) => FrameType::EndOfStream,
            Self::Complete(_) => FrameType::Complete,
            Self::Ready(_) => FrameType::Ready,
            Self::Commit(_) => FrameType::Commit,
            Self::Abort(_) => FrameType::Abort,
            Self::TunnelData(_) => FrameType::TunnelData,
            Self::TunnelShutdown => FrameType::TunnelShutdown,
            Self::Claimed => FrameType::Claimed,
        }
    }

    /// Encodes the payload. `Pages` re-encodes the view's pages (tests and tools; the data
    /// path builds batches with [`PagesBuilder`]).
    pub fn encode(&self) -> Result<Vec<u8>, ApiMisuse> {
        Ok(match self {
            Self::Hello(m) => m.encode()?,
            Self::HelloAck(m) => m.encode(),
            Self::KeyConfirm(m) => m.encode(),
            Self::StreamBind(m) => m.encode(),
            Self::Pages(view) => {
                // Exactly the payload's length: reserving a page per entry would turn a
                // 2 MiB batch of zero-page flags into a 17 GB allocation.
                let len = view.data_pages() * view.page_size()
                    + view.len() * 8
                    + pages::PAGES_TRAILER_LEN;
                let mut b = PagesBuilder::new(view.page_size(), len.max(view.page_size() + 16));
                for e in view.iter() {
                    match e.data {
                        Some(d) => {
                            // Keep the sender's choice: a zero page sent with data stays
                            // data, so the round trip is exact.
                            b.push_data(e.index, d)
                        }
                        None => b.push_zero(e.index),
                    };
                }
                b.finish().to_vec()
            }
            Self::IterationMarker(m) => m.encode(),
            Self::DeviceState(m) => m.encode(),
            Self::EndOfStream(m) => m.encode(),
            Self::Complete(m) => m.encode()?,
            Self::Ready(m) => m.encode(),
            Self::Commit(m) => m.encode(),
            Self::TunnelShutdown | Self::Claimed => Vec::new(),
            Self::Abort(m) => m.encode(),
            Self::TunnelData(d) => d.to_vec(),
        })
    }
}
