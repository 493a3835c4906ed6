//! The frame header and frame-level decoding.
//!
//! Every frame on every connection is `header (24 bytes) || payload || trailer (16 bytes)`.
//! The trailer is the AES-GCM tag in encrypted mode and an XXH3-128 checksum in plaintext
//! mode and during the handshake. The header is the AEAD's associated data.
//!
//! ```text
//!  0      2      3      4         6         8              12             16                     24
//!  +------+------+------+---------+---------+--------------+--------------+----------------------+
//!  | 'VM' | ver  | type | stream  | reserved| key epoch    | payload len  | sequence             |
//!  +------+------+------+---------+---------+--------------+--------------+----------------------+
//!  all integers big-endian
//! ```
//!
//! The header is deliberately kept apart from the payload in every API: a driver reads the
//! 24 header bytes into a small array and the payload into a buffer of its own whose first
//! byte it can place on a page boundary. Page data sits at the start of a `Pages` payload
//! (see [`crate::message::pages`]), so it stays page-aligned from socket to guest memory.

use crate::error::{PeerMisbehaved, Result};

/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 24;
/// Length of the trailer (AEAD tag or checksum) that follows every payload.
pub const TRAILER_LEN: usize = 16;
/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = *b"VM";
/// Hard maximum payload length, checked against the header before anything is allocated.
/// 2 MiB fits a 256 KiB page batch eight times over and bounds a receiver's per-frame
/// buffer; a connection may negotiate a smaller maximum.
pub const MAX_PAYLOAD: u32 = 2 * 1024 * 1024;

/// Protocol versions this crate speaks. The `Hello` frame's header and payload layout are
/// frozen across versions so any version can read it and negotiate.
pub const SUPPORTED_VERSIONS: std::ops::RangeInclusive<u8> = 1..=1;
/// The version whose framing the `Hello` and the `HelloAck` always use.
pub const HANDSHAKE_VERSION: u8 = 1;

/// Frame types. Value 0 is reserved as invalid so a zeroed header never parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum FrameType {
    /// Sender → receiver: opens the handshake on the control connection.
    Hello = 1,
    /// Receiver → sender: the receiver's choices and its negotiation result.
    HelloAck = 2,
    /// Either direction: key confirmation MAC over the transcript.
    KeyConfirm = 3,
    /// Sender → receiver, first frame on a data connection: binds it to the migration.
    StreamBind = 4,
    /// Sender → receiver: a batch of guest pages (zero pages as flags).
    Pages = 5,
    /// Sender → receiver: start or end of a pre-copy iteration.
    IterationMarker = 6,
    /// Sender → receiver: a chunk of device state.
    DeviceState = 7,
    /// Last frame of a stream, with its totals.
    EndOfStream = 8,
    /// Sender → receiver on control: everything is sent; totals for all streams.
    Complete = 9,
    /// Receiver → sender: verified, ready to resume.
    Ready = 10,
    /// Sender → receiver: the outcome is recorded; resume.
    Commit = 11,
    /// Either direction: the migration ends, with a reason code.
    Abort = 12,
    /// Either direction: opaque bytes of a tunnelled stream (QEMU's migration stream).
    TunnelData = 13,
    /// Either direction: the tunnelled stream's writer closed its half.
    TunnelShutdown = 14,
    /// Receiver → sender on control, after `Commit`: the destination won the VM at the
    /// arbiter (its claim) and resumes it.
    Claimed = 15,
}

impl FrameType {
    /// Every frame type, in wire order.
    pub const ALL: [Self; 15] = [
        Self::Hello,
        Self::HelloAck,
        Self::KeyConfirm,
        Self::StreamBind,
        Self::Pages,
        Self::IterationMarker,
        Self::DeviceState,
        Self::EndOfStream,
        Self::Complete,
        Self::Ready,
        Self::Commit,
        Self::Abort,
        Self::TunnelData,
        Self::TunnelShutdown,
        Self::Claimed,
    ];

    /// Decodes a wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as u8 == v)
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version the frame is framed with.
    pub version: u8,
    /// What the payload is.
    pub frame_type: FrameType,
    /// Stream id: 0 is the control connection, 1..=n the data connections.
    pub stream: u16,
    /// Key epoch the frame is sealed under (0 for handshake frames and plaintext mode).
    pub epoch: u32,
    /// Payload length in bytes, excluding header and trailer.
    pub payload_len: u32,
    /// Per-stream, per-direction sequence number, strictly increasing from 0.
    pub sequence: u64,
}

impl Header {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = self.version;
        b[3] = self.frame_type as u8;
        b[4..6].copy_from_slice(&self.stream.to_be_bytes());
        // b[6..8] reserved, zero.
        b[8..12].copy_from_slice(&self.epoch.to_be_bytes());
        b[12..16].copy_from_slice(&self.payload_len.to_be_bytes());
        b[16..24].copy_from_slice(&self.sequence.to_be_bytes());
        b
    }

    /// Decodes and checks a header: magic, reserved bits, frame type and the payload length
    /// against `max_payload` (itself at most [`MAX_PAYLOAD`]). Version, stream, epoch and
    /// sequence are checked by whoever knows what to expect (the record layer).
    pub fn decode(b: &[u8; HEADER_LEN], max_payload: u32) -> Result<Self> {
        if b[0..2] != MAGIC {
            return Err(PeerMisbehaved::BadMagic {
                found: [b[0], b[1]],
            }
            .into());
        }
        if b[6..8] != [0, 0] {
            return Err(PeerMisbehaved::ReservedBitsSet.into());
        }
        let frame_type = FrameType::from_u8(b[3]).ok_or(PeerMisbehaved::UnknownFrameType(b[3]))?;
        let payload_len = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
        let max = max_payload.min(MAX_PAYLOAD);
        if payload_len > max {
            return Err(PeerMisbehaved::PayloadTooLarge {
                len: payload_len,
                max,
            }
            .into());
        }
        Ok(Self {
            version: b[2],
            frame_type,
            stream: u16::from_be_bytes([b[4], b[5]]),
            epoch: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            payload_len,
            sequence: u64::from_be_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
        })
    }

    /// Total length of the frame on the wire.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize + TRAILER_LEN
    }
}

/// One whole frame as it travels: header, payload and trailer, owned. Used for control
/// frames and by tests; the data path keeps header and payload in separate buffers.
#[derive(Clone, PartialEq, Eq)]
pub struct WireFrame {
    /// The encoded header (the AEAD's associated data).
    pub header: [u8; HEADER_LEN],
    /// The payload, sealed or not.
    pub payload: Vec<u8>,
    /// The tag or checksum.
    pub trailer: [u8; TRAILER_LEN],
}

impl std::fmt::Debug for WireFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Payloads may be plaintext guest memory: print their size, not their bytes.
        f.debug_struct("WireFrame")
            .field("header", &Header::decode(&self.header, MAX_PAYLOAD))
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

impl WireFrame {
    /// The frame as one contiguous byte string.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + self.payload.len() + TRAILER_LEN);
        v.extend_from_slice(&self.header);
        v.extend_from_slice(&self.payload);
        v.extend_from_slice(&self.trailer);
        v
    }
}

/// Splits complete frames off the front of a byte buffer, for drivers and tests that
/// receive a byte stream. The payload length is checked against the maximum before the
/// caller has to buffer a single payload byte.
#[derive(Debug, Clone, Copy)]
pub struct FrameSplitter {
    max_payload: u32,
}

impl FrameSplitter {
    /// A splitter accepting payloads up to `max_payload` (capped at [`MAX_PAYLOAD`]).
    pub fn new(max_payload: u32) -> Self {
        Self {
            max_payload: max_payload.min(MAX_PAYLOAD),
        }
    }

    /// Returns the first complete frame in `buf` and the number of bytes it used, `None`
    /// if more bytes are needed, or an error if the header is invalid. Never allocates
    /// more than the checked payload length.
    pub fn split(&self, buf: &[u8]) -> Result<Option<(WireFrame, usize)>> {
        let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let h = Header::decode(header, self.max_payload)?;
        let total = h.frame_len();
        if buf.len() < total {
            return Ok(None);
        }
        let payload_end = HEADER_LEN + h.payload_len as usize;
        let mut trailer = [0u8; TRAILER_LEN];
        trailer.copy_from_slice(&buf[payload_end..total]);
        Ok(Some((
            WireFrame {
                header: *header,
                payload: buf[HEADER_LEN..payload_end].to_vec(),
                trailer,
            },
            total,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use proptest::prelude::*;

    fn header(frame_type: FrameType) -> Header {
        Header {
            version: 1,
            frame_type,
            stream: 3,
            epoch: 7,
            payload_len: 100,
            sequence: 0x0102_0304_0506_0708,
        }
    }

    #[test]
    fn header_layout_is_byte_exact() {
        let b = header(FrameType::Pages).encode();
        assert_eq!(
            b,
            [
                b'V', b'M', 1, 5, 0, 3, 0, 0, 0, 0, 0, 7, 0, 0, 0, 100, 1, 2, 3, 4, 5, 6, 7, 8
            ]
        );
    }

    #[test]
    fn zero_header_never_parses() {
        assert!(Header::decode(&[0; HEADER_LEN], MAX_PAYLOAD).is_err());
        let mut b = header(FrameType::Hello).encode();
        b[3] = 0;
        assert_eq!(
            Header::decode(&b, MAX_PAYLOAD),
            Err(Error::PeerMisbehaved(PeerMisbehaved::UnknownFrameType(0)))
        );
    }

    #[test]
    fn oversized_payload_is_rejected_from_the_header_alone() {
        let mut h = header(FrameType::Pages);
        h.payload_len = MAX_PAYLOAD + 1;
        let err = Header::decode(&h.encode(), u32::MAX).unwrap_err();
        assert_eq!(
            err,
            Error::PeerMisbehaved(PeerMisbehaved::PayloadTooLarge {
                len: MAX_PAYLOAD + 1,
                max: MAX_PAYLOAD
            })
        );
        // A smaller per-connection maximum is honoured too.
        h.payload_len = 4097;
        assert!(Header::decode(&h.encode(), 4096).is_err());
        // The splitter refuses before the payload bytes are even present.
        let splitter = FrameSplitter::new(4096);
        assert!(splitter.split(&h.encode()).is_err());
    }

    #[test]
    fn reserved_and_magic_are_checked() {
        let mut b = header(FrameType::Pages).encode();
        b[7] = 1;
        assert_eq!(
            Header::decode(&b, MAX_PAYLOAD),
            Err(PeerMisbehaved::ReservedBitsSet.into())
        );
        let mut b = header(FrameType::Pages).encode();
        b[0] = b'X';
        assert_eq!(
            Header::decode(&b, MAX_PAYLOAD),
            Err(PeerMisbehaved::BadMagic { found: *b"XM" }.into())
        );
    }

    proptest! {
        #[test]
        fn header_round_trips(
            version: u8, t in 0usize..FrameType::ALL.len(), stream: u16, epoch: u32,
            payload_len in 0..=MAX_PAYLOAD, sequence: u64,
        ) {
            let h = Header { version, frame_type: FrameType::ALL[t], stream, epoch, payload_len, sequence };
            prop_assert_eq!(Header::decode(&h.encode(), MAX_PAYLOAD), Ok(h));
        }

        #[test]
        fn splitter_never_panics_and_never_overreads(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let s = FrameSplitter::new(256);
            if let Ok(Some((frame, used))) = s.split(&bytes) {
                prop_assert!(used <= bytes.len());
                prop_assert!(frame.payload.len() <= 256);
                prop_assert_eq!(frame.to_bytes(), bytes[..used].to_vec());
            }
        }
    }
}
