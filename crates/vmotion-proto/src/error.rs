//! The crate's error type.
//!
//! Errors fall into three families, kept apart as rustls keeps `PeerMisbehaved` apart from
//! `ApiMisuse`:
//!
//! - [`PeerMisbehaved`]: what the peer (or someone on the path) sent is wrong. Every
//!   variant names exactly what was wrong, so a tamper test can assert *which* defence
//!   fired.
//! - [`Refusal`]: negotiation decided this migration must not happen (policy, versions,
//!   a detected downgrade). Both ends compute the same refusal.
//! - [`ApiMisuse`]: the caller drove the crate wrongly. Never caused by peer input.
//!
//! Every error maps to an on-wire [`AbortCode`] so the peer learns why the migration ended.

use std::fmt;

use crate::frame::FrameType;

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The peer sent something the protocol does not allow.
    #[error("the peer misbehaved: {0}")]
    PeerMisbehaved(#[from] PeerMisbehaved),
    /// Negotiation refused the migration; no page has been or will be sent.
    #[error("the migration was refused: {0}")]
    Refused(#[from] Refusal),
    /// The peer ended the migration with an `Abort` frame.
    #[error("the peer aborted the migration with code {code}: {message}")]
    PeerAborted {
        /// The code the peer sent.
        code: AbortCode,
        /// The peer's explanation (untrusted text, already checked to be UTF-8).
        message: String,
    },
    /// The caller used the API in a way it does not allow.
    #[error("API misuse: {0}")]
    ApiMisuse(#[from] ApiMisuse),
    /// The local record layer would have to reuse or wrap a sequence number or epoch; it
    /// fails closed instead.
    #[error("the sequence or epoch space of stream {stream} is exhausted; refusing to seal")]
    SequenceExhausted {
        /// The stream whose counter ran out.
        stream: u16,
    },
}

impl Error {
    /// The code to send to the peer in an `Abort` frame when this error ends a migration.
    pub fn abort_code(&self) -> AbortCode {
        match self {
            Self::PeerMisbehaved(p) => p.abort_code(),
            Self::Refused(r) => r.abort_code(),
            // Echoing a peer's own abort back is pointless; if a driver does, say so.
            Self::PeerAborted { .. } => AbortCode::PeerAborted,
            Self::ApiMisuse(_) => AbortCode::InternalError,
            Self::SequenceExhausted { .. } => AbortCode::LimitExceeded,
        }
    }
}

/// What exactly the peer got wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerMisbehaved {
    /// The first two bytes of a frame were not the protocol magic.
    #[error("frame does not start with the vmotion magic (found {found:02x?})")]
    BadMagic {
        /// The two bytes found.
        found: [u8; 2],
    },
    /// The frame's version byte is not the negotiated version.
    #[error("frame version {found} where version {expected} was negotiated")]
    WrongFrameVersion {
        /// Negotiated version.
        expected: u8,
        /// Version in the frame.
        found: u8,
    },
    /// The frame type byte is not one this crate knows.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// A reserved header field was not zero.
    #[error("reserved header bits are set")]
    ReservedBitsSet,
    /// The header announces a payload larger than allowed; nothing was allocated for it.
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// Announced length.
        len: u32,
        /// Maximum allowed on this connection.
        max: u32,
    },
    /// The frame carries another stream's id than the connection it arrived on.
    #[error("frame for stream {found} arrived on stream {expected}")]
    WrongStream {
        /// The stream this connection is bound to.
        expected: u16,
        /// The stream named in the frame.
        found: u16,
    },
    /// The sequence number was already used: a replayed (or duplicated) frame.
    #[error("replayed frame on stream {stream}: sequence {found}, expected {expected}")]
    ReplayedFrame {
        /// Stream.
        stream: u16,
        /// The next sequence number the receiver accepts.
        expected: u64,
        /// The (already seen) sequence number in the frame.
        found: u64,
    },
    /// The sequence number skips ahead: a frame was dropped or frames were reordered.
    #[error("frame out of order on stream {stream}: sequence {found}, expected {expected}")]
    FrameOutOfOrder {
        /// Stream.
        stream: u16,
        /// The next sequence number the receiver accepts.
        expected: u64,
        /// The sequence number in the frame.
        found: u64,
    },
    /// The frame was sealed under an epoch the receiver has already retired.
    #[error(
        "frame on stream {stream} sealed under retired epoch {found}; current epoch is {expected}"
    )]
    StaleEpoch {
        /// Stream.
        stream: u16,
        /// The epoch the key schedule demands for this frame.
        expected: u32,
        /// The epoch in the frame.
        found: u32,
    },
    /// The frame claims an epoch the budgets have not reached yet.
    #[error(
        "frame on stream {stream} claims epoch {found} before its budget allows; expected {expected}"
    )]
    EpochAhead {
        /// Stream.
        stream: u16,
        /// The epoch the key schedule demands for this frame.
        expected: u32,
        /// The epoch in the frame.
        found: u32,
    },
    /// AEAD authentication failed: header, payload or tag was altered, or the frame was
    /// sealed with other keys (another migration, stream, direction, or the wrong key).
    #[error("authentication failed for frame {sequence} on stream {stream}, epoch {epoch}")]
    AuthenticationFailed {
        /// Stream.
        stream: u16,
        /// Epoch the frame was opened under.
        epoch: u32,
        /// Sequence number.
        sequence: u64,
    },
    /// The plaintext-mode checksum did not match: the frame was corrupted.
    #[error("checksum mismatch for frame {sequence} on stream {stream}")]
    ChecksumMismatch {
        /// Stream.
        stream: u16,
        /// Sequence number.
        sequence: u64,
    },
    /// A payload did not parse as its frame type requires.
    #[error("malformed {frame_type:?} payload: {reason}")]
    MalformedPayload {
        /// The frame type whose payload is malformed.
        frame_type: FrameType,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A frame arrived that the current protocol state does not expect.
    #[error("unexpected {frame_type:?} frame while {state}")]
    UnexpectedFrame {
        /// The state the machine was in.
        state: &'static str,
        /// The frame type received.
        frame_type: FrameType,
    },
    /// The peer's key confirmation MAC did not verify: it holds another key, or the
    /// handshake transcript was altered in flight.
    #[error("the peer's key confirmation did not verify (wrong key or altered handshake)")]
    KeyConfirmationFailed,
    /// A data connection's bind MAC did not verify, or named another migration.
    #[error("stream bind for stream {stream} did not verify")]
    StreamBindFailed {
        /// The stream the bind named.
        stream: u16,
    },
    /// A stream ended (the connection closed) before its authenticated end-of-stream.
    #[error("stream {stream} was truncated after {frames} frames, before its end-of-stream frame")]
    Truncated {
        /// Stream.
        stream: u16,
        /// Frames received and authenticated before the end.
        frames: u64,
    },
    /// The authenticated totals do not match what was received.
    #[error("stream {stream} totals disagree: peer says {claimed} {what}, received {received}")]
    TotalsMismatch {
        /// Stream.
        stream: u16,
        /// Which total ("frames", "bytes", "pages").
        what: &'static str,
        /// What the peer's end-of-stream or complete frame claims.
        claimed: u64,
        /// What the receiver counted.
        received: u64,
    },
    /// The peer computed another negotiation result than we did from the same inputs.
    #[error("negotiation mismatch: we decided {ours}, the peer decided {theirs}")]
    DecisionMismatch {
        /// Our result.
        ours: String,
        /// The peer's result.
        theirs: String,
    },
    /// The peer chose a parameter outside what was offered (version, cipher, budgets).
    #[error("the peer chose {what} outside of what was offered")]
    IllegalChoice {
        /// Which parameter.
        what: &'static str,
    },
    /// A frame arrived after the stream's end-of-stream frame.
    #[error("frame after end of stream {stream}")]
    FrameAfterEnd {
        /// Stream.
        stream: u16,
    },
    /// The sender claimed the migration complete, yet pages of the guest never arrived.
    #[error("{missing} pages of the guest never arrived")]
    PagesMissing {
        /// How many.
        missing: u64,
    },
}

impl PeerMisbehaved {
    /// The abort code that reports this failure to the peer.
    pub fn abort_code(&self) -> AbortCode {
        match self {
            Self::BadMagic { .. }
            | Self::WrongFrameVersion { .. }
            | Self::UnknownFrameType(_)
            | Self::ReservedBitsSet
            | Self::PayloadTooLarge { .. }
            | Self::MalformedPayload { .. } => AbortCode::DecodeError,
            Self::UnexpectedFrame { .. } | Self::FrameAfterEnd { .. } => AbortCode::UnexpectedFrame,
            Self::WrongStream { .. }
            | Self::ReplayedFrame { .. }
            | Self::FrameOutOfOrder { .. }
            | Self::StaleEpoch { .. }
            | Self::EpochAhead { .. } => AbortCode::SequenceError,
            Self::AuthenticationFailed { .. } => AbortCode::BadRecordMac,
            Self::ChecksumMismatch { .. } => AbortCode::ChecksumMismatch,
            Self::KeyConfirmationFailed => AbortCode::KeyConfirmationFailed,
            Self::StreamBindFailed { .. } => AbortCode::StreamBindFailed,
            Self::Truncated { .. } | Self::TotalsMismatch { .. } | Self::PagesMissing { .. } => {
                AbortCode::Truncated
            }
            Self::DecisionMismatch { .. } | Self::IllegalChoice { .. } => {
                AbortCode::NegotiationMismatch
            }
        }
    }
}

/// Why negotiation refused a migration. Both ends compute the same value from the same
/// inputs; it travels in the `HelloAck` so the sender can check the receiver agrees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The VM's policy requires encryption and the destination cannot encrypt.
    #[error("the VM's policy requires encryption and the destination cannot encrypt")]
    PolicyRequiresEncryption,
    /// The receiving host requires encryption for everything it accepts, and this
    /// migration would be plaintext.
    #[error("the receiving host requires encryption and this migration would be plaintext")]
    ReceiverRequiresEncryption,
    /// The key service's registry says the destination encrypts but the handshake says it
    /// does not: someone rewrote the handshake, or the destination lies.
    #[error(
        "downgrade detected: the key service says the destination encrypts, the handshake says it does not"
    )]
    DowngradeDetected,
    /// The two ends share no protocol version.
    #[error("no protocol version is supported by both ends")]
    NoCommonVersion,
    /// Encryption was decided but the two ends share no cipher suite.
    #[error("no cipher suite is supported by both ends")]
    NoCommonCipher,
    /// The receiver does not accept the guest's page size.
    #[error("the receiver does not accept the guest's page size")]
    PageSizeUnsupported,
    /// The receiver does not accept as many data streams as the sender asked for.
    #[error("the receiver does not accept that many data streams")]
    TooManyStreams,
}

impl Refusal {
    /// The abort code that reports this refusal.
    pub fn abort_code(self) -> AbortCode {
        match self {
            Self::PolicyRequiresEncryption => AbortCode::PolicyRequiresEncryption,
            Self::ReceiverRequiresEncryption => AbortCode::ReceiverRequiresEncryption,
            Self::DowngradeDetected => AbortCode::DowngradeDetected,
            Self::NoCommonVersion => AbortCode::NoCommonVersion,
            Self::NoCommonCipher => AbortCode::NoCommonCipher,
            Self::PageSizeUnsupported => AbortCode::PageSizeUnsupported,
            Self::TooManyStreams => AbortCode::TooManyStreams,
        }
    }

    /// The refusal an abort code stands for, if it stands for one.
    pub fn from_abort_code(code: AbortCode) -> Option<Self> {
        Some(match code {
            AbortCode::PolicyRequiresEncryption => Self::PolicyRequiresEncryption,
            AbortCode::ReceiverRequiresEncryption => Self::ReceiverRequiresEncryption,
            AbortCode::DowngradeDetected => Self::DowngradeDetected,
            AbortCode::NoCommonVersion => Self::NoCommonVersion,
            AbortCode::NoCommonCipher => Self::NoCommonCipher,
            AbortCode::PageSizeUnsupported => Self::PageSizeUnsupported,
            AbortCode::TooManyStreams => Self::TooManyStreams,
            _ => return None,
        })
    }
}

/// The caller drove the crate wrongly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiMisuse {
    /// A payload passed for sealing is larger than the negotiated maximum.
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    PayloadTooLarge {
        /// Length passed.
        len: usize,
        /// Maximum.
        max: u32,
    },
    /// A frame was sealed after the stream's end-of-stream frame.
    #[error("stream {stream} already ended")]
    StreamEnded {
        /// Stream.
        stream: u16,
    },
    /// A stream id outside the negotiated range.
    #[error("stream {stream} is not one of the {streams} negotiated data streams")]
    NoSuchStream {
        /// Stream asked for.
        stream: u16,
        /// Number of data streams negotiated.
        streams: u16,
    },
    /// The opener already rejected a forged or corrupted frame; the stream is dead.
    #[error("stream {stream} already failed authentication; it opens nothing more")]
    StreamFailed {
        /// Stream.
        stream: u16,
    },
    /// A configuration value is out of its allowed range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(&'static str),
    /// A message could not be encoded (a field exceeds its wire width).
    #[error("cannot encode message: {0}")]
    Unencodable(&'static str),
}

/// On-wire reason codes carried by `Abort` frames. Value 0 is reserved as invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u16)]
pub enum AbortCode {
    /// The operator or the mover cancelled the migration.
    Cancelled = 1,
    /// A frame or payload did not decode.
    DecodeError = 2,
    /// A frame arrived in a state that does not expect it.
    UnexpectedFrame = 3,
    /// Sequence, epoch or stream check failed (replay, reorder, splice).
    SequenceError = 4,
    /// AEAD authentication failed.
    BadRecordMac = 5,
    /// Plaintext checksum failed.
    ChecksumMismatch = 6,
    /// Key confirmation failed.
    KeyConfirmationFailed = 7,
    /// Stream bind failed.
    StreamBindFailed = 8,
    /// A stream or the migration ended before its authenticated totals.
    Truncated = 9,
    /// The two ends computed different negotiation results.
    NegotiationMismatch = 10,
    /// Refused: the VM's policy requires encryption.
    PolicyRequiresEncryption = 11,
    /// Refused: the receiver requires encryption.
    ReceiverRequiresEncryption = 12,
    /// Refused: downgrade detected.
    DowngradeDetected = 13,
    /// Refused: no common version.
    NoCommonVersion = 14,
    /// Refused: no common cipher.
    NoCommonCipher = 15,
    /// Refused: page size not supported.
    PageSizeUnsupported = 16,
    /// Refused: too many streams.
    TooManyStreams = 17,
    /// The receiver could not obtain the migration key.
    KeyUnavailable = 18,
    /// A sequence, epoch or size limit was reached.
    LimitExceeded = 19,
    /// The destination could not take the guest (pre-flight or sink failure).
    DestinationFailed = 20,
    /// The source failed (mover error, lost VM control).
    SourceFailed = 21,
    /// A switchover step timed out.
    Timeout = 22,
    /// The peer reported an abort we are passing on.
    PeerAborted = 23,
    /// A bug or an unexpected local failure.
    InternalError = 24,
    /// The destination's pre-flight refused the guest before any page (no room, a sink
    /// that cannot take it, the same VM already arriving or unsettled there).
    PreflightRefused = 25,
}

impl AbortCode {
    /// Decodes a wire value; 0 and unknown values are rejected.
    pub fn from_u16(v: u16) -> Option<Self> {
        use AbortCode::*;
        const ALL: [AbortCode; 25] = [
            Cancelled,
            DecodeError,
            UnexpectedFrame,
            SequenceError,
            BadRecordMac,
            ChecksumMismatch,
            KeyConfirmationFailed,
            StreamBindFailed,
            Truncated,
            NegotiationMismatch,
            PolicyRequiresEncryption,
            ReceiverRequiresEncryption,
            DowngradeDetected,
            NoCommonVersion,
            NoCommonCipher,
            PageSizeUnsupported,
            TooManyStreams,
            KeyUnavailable,
            LimitExceeded,
            DestinationFailed,
            SourceFailed,
            Timeout,
            PeerAborted,
            InternalError,
            PreflightRefused,
        ];
        ALL.into_iter().find(|c| *c as u16 == v)
    }
}

impl fmt::Display for AbortCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?} ({})", *self as u16)
    }
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
