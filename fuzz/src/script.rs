//! The byte format of the `handshake` target's input: which end the fuzzer attacks, then
//! the frames it sends, in order. Parsing never fails; an input that runs out simply ends
//! the script (a short payload takes whatever bytes are left).
//!
//! ```text
//! input   = role:u8 frame*
//! frame   = tag:u8 [flip:u16] body             flip is present iff tag & 0x04
//! tag     = kind (bits 0-1) | 0x04 if flip | channel << 4 (bits 4-7)
//! kind 0  auto:    type:u8 len:u16 payload     at the stream, sequence and key epoch the
//!                                              receiving opener expects next, protected
//! kind 1  header:  header:[u8; 24] len:u16 payload
//!                                              the header's length field is set to the
//!                                              payload's length, then protected
//! kind 2  raw:     len:u16 bytes               header ‖ payload ‖ trailer exactly as given
//! kind 3  header, with the header's length field kept as given
//! flip    bit index (modulo the frame's length in bits) flipped after the frame is built
//! channel 0 = the control connection (and the handshake); n = data connection n
//! ```
//!
//! "Protected" is what the peer the fuzzer plays would do ([`Protection`]): an XXH3-128
//! checksum trailer for handshake frames, stream binds and plaintext sessions (an `auto`
//! frame of key epoch 0 is exactly `testing::checksum_frame`), AES-256-GCM under the
//! session's traffic keys in an encrypted session — the fuzzer holds the migration key
//! (`testing::key(1)`), so it plays a keyed but malicious peer and its frames get past
//! authentication to everything behind it.
//!
//! All integers are big-endian. [`Script`] writes the same format, for the seed generator.

use ring::aead;
use vmotion_proto::frame::{FrameType, HEADER_LEN, Header, TRAILER_LEN, WireFrame};
use vmotion_proto::handshake::{ReceiverConfig, SenderConfig};
use vmotion_proto::policy::{DestinationCapability, EncryptionPolicy};
use vmotion_proto::testing;
use vmotion_proto::{Direction, MigrationId};

const KIND_AUTO: u8 = 0;
const KIND_HEADER: u8 = 1;
const KIND_RAW: u8 = 2;
const KIND_HEADER_KEEP_LEN: u8 = 3;
const FLIP: u8 = 0x04;

/// Which end of the handshake the target runs (the fuzzer plays the other one), with the
/// configuration it runs with. Decoded from the input's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Attack a receiver: `ReceiverConfig::default()` with these two settings changed.
    /// Byte: bit 0 clear, bit 1 = cannot encrypt, bit 2 = requires encryption.
    Receiver {
        /// [`ReceiverConfig::can_encrypt`].
        can_encrypt: bool,
        /// [`ReceiverConfig::require_encryption`].
        require_encryption: bool,
    },
    /// Attack a sender: `testing::sender_config()` with these settings changed.
    /// Byte: bit 0 set, bits 1-2 policy (Opportunistic, Disabled, Required, Opportunistic),
    /// bits 3-4 destination (Encrypts, DoesNotEncrypt, Unregistered, Encrypts), bit 5 = no
    /// key.
    Sender {
        /// [`SenderConfig::policy`].
        policy: EncryptionPolicy,
        /// [`SenderConfig::destination`].
        destination: DestinationCapability,
        /// Whether the sender holds `testing::key(1)`.
        with_key: bool,
    },
}

const POLICIES: [EncryptionPolicy; 4] = [
    EncryptionPolicy::Opportunistic,
    EncryptionPolicy::Disabled,
    EncryptionPolicy::Required,
    EncryptionPolicy::Opportunistic,
];
const DESTINATIONS: [DestinationCapability; 4] = [
    DestinationCapability::Encrypts,
    DestinationCapability::DoesNotEncrypt,
    DestinationCapability::Unregistered,
    DestinationCapability::Encrypts,
];

impl Role {
    /// The receiver the brief asks for: `ReceiverConfig::default()`.
    pub const DEFAULT_RECEIVER: Self = Self::Receiver {
        can_encrypt: true,
        require_encryption: false,
    };
    /// The sender the brief asks for: `testing::sender_config()`.
    pub const DEFAULT_SENDER: Self = Self::Sender {
        policy: EncryptionPolicy::Opportunistic,
        destination: DestinationCapability::Encrypts,
        with_key: true,
    };

    /// Decodes the role byte (every byte is some role).
    pub fn from_byte(b: u8) -> Self {
        if b & 1 == 0 {
            Self::Receiver {
                can_encrypt: b & 0x02 == 0,
                require_encryption: b & 0x04 != 0,
            }
        } else {
            Self::Sender {
                policy: POLICIES[usize::from((b >> 1) & 3)],
                destination: DESTINATIONS[usize::from((b >> 3) & 3)],
                with_key: b & 0x20 == 0,
            }
        }
    }

    /// The canonical byte for this role (`from_byte(r.to_byte()) == r`).
    pub fn to_byte(self) -> u8 {
        fn index<T: PartialEq>(table: &[T; 4], v: T) -> u8 {
            let i = table
                .iter()
                .position(|x| *x == v)
                .expect("every value is in its table");
            u8::try_from(i).expect("tables have four entries")
        }
        match self {
            Self::Receiver {
                can_encrypt,
                require_encryption,
            } => (u8::from(!can_encrypt) << 1) | (u8::from(require_encryption) << 2),
            Self::Sender {
                policy,
                destination,
                with_key,
            } => {
                1 | (index(&POLICIES, policy) << 1)
                    | (index(&DESTINATIONS, destination) << 3)
                    | (u8::from(!with_key) << 5)
            }
        }
    }

    /// The receiver's configuration (for [`Role::Receiver`]).
    pub fn receiver_config(can_encrypt: bool, require_encryption: bool) -> ReceiverConfig {
        ReceiverConfig {
            can_encrypt,
            require_encryption,
            ..ReceiverConfig::default()
        }
    }

    /// The sender's configuration (for [`Role::Sender`]).
    pub fn sender_config(
        policy: EncryptionPolicy,
        destination: DestinationCapability,
        with_key: bool,
    ) -> SenderConfig {
        SenderConfig {
            policy,
            destination,
            key: with_key.then(|| testing::key(1)),
            ..testing::sender_config()
        }
    }
}

/// How a frame of the script is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameKind<'a> {
    /// Version 1, at the stream, sequence and key epoch the receiving opener expects
    /// next, so the fuzzer need not guess them.
    Auto {
        /// The frame type (an unknown byte maps onto the known types).
        frame_type: FrameType,
        /// The payload.
        payload: &'a [u8],
    },
    /// Any header (magic, reserved bytes and key epoch included), validly protected.
    Header {
        /// The header bytes.
        header: [u8; HEADER_LEN],
        /// Keep the length field as given instead of setting it to the payload's length.
        keep_len: bool,
        /// The payload.
        payload: &'a [u8],
    },
    /// A whole frame as given; inputs shorter than header and trailer make no frame.
    Raw(&'a [u8]),
}

/// One frame of the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameSpec<'a> {
    /// 0 = control connection, n = data connection n (1..=15).
    pub channel: u8,
    /// How the frame is made.
    pub kind: FrameKind<'a>,
    /// A bit to flip once the frame is built (index modulo the frame's bit length).
    pub flip: Option<u16>,
}

/// The record layer's plaintext trailer: XXH3-128 over header and payload, big-endian.
pub fn checksum(header: &[u8; HEADER_LEN], payload: &[u8]) -> [u8; TRAILER_LEN] {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(header);
    h.update(payload);
    h.digest128().to_be_bytes()
}

/// How the peer the fuzzer plays protects the frames it builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protection {
    /// XXH3-128 checksum: handshake frames, stream binds, plaintext sessions.
    Checksum,
    /// AES-256-GCM under the traffic keys of `testing::key(1)`, derived by
    /// `testing::traffic_key_iv` for the header's stream and key epoch; nonce = IV XOR
    /// (0⁴ ‖ sequence), the header as associated data (as the record layer does).
    Aead {
        /// The session's migration id.
        migration_id: MigrationId,
        /// The session's transcript hash.
        transcript_hash: [u8; 32],
        /// The direction the fuzzer's frames travel.
        direction: Direction,
    },
}

impl Protection {
    /// The frame `header ‖ payload` with its trailer, sealed as the header says.
    pub fn seal(&self, header: [u8; HEADER_LEN], mut payload: Vec<u8>) -> WireFrame {
        let trailer = match self {
            Self::Checksum => checksum(&header, &payload),
            Self::Aead {
                migration_id,
                transcript_hash,
                direction,
            } => {
                let field = |r: std::ops::Range<usize>| {
                    header[r].iter().fold(0u64, |v, b| v << 8 | u64::from(*b))
                };
                let stream = u16::try_from(field(4..6)).expect("two bytes");
                let epoch = u32::try_from(field(8..12)).expect("four bytes");
                let sequence = field(16..24);
                let (key, iv) = testing::traffic_key_iv(
                    &testing::key(1),
                    *migration_id,
                    transcript_hash,
                    *direction,
                    stream,
                    epoch,
                );
                let key = aead::LessSafeKey::new(
                    aead::UnboundKey::new(&aead::AES_256_GCM, &key).expect("a 32-byte key"),
                );
                let mut nonce = iv;
                for (n, s) in nonce[4..].iter_mut().zip(sequence.to_be_bytes()) {
                    *n ^= s;
                }
                let tag = key
                    .seal_in_place_separate_tag(
                        aead::Nonce::assume_unique_for_key(nonce),
                        aead::Aad::from(&header),
                        &mut payload,
                    )
                    .expect("payloads are u16-sized");
                tag.as_ref().try_into().expect("a 16-byte tag")
            }
        };
        WireFrame {
            header,
            payload,
            trailer,
        }
    }
}

/// Where the receiving opener stands: the position an [`FrameKind::Auto`] frame takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The opener's stream.
    pub stream: u16,
    /// The sequence number it expects next.
    pub sequence: u64,
    /// Its current key epoch.
    pub epoch: u32,
}

impl FrameSpec<'_> {
    /// Builds the frame, protected with `protection`. `None`: the bytes make no frame.
    pub fn build(&self, at: Position, protection: &Protection) -> Option<WireFrame> {
        let len = |payload: &[u8]| u32::try_from(payload.len()).expect("payloads are u16-sized");
        let mut frame = match &self.kind {
            FrameKind::Auto {
                frame_type,
                payload,
            } if at.epoch == 0 && *protection == Protection::Checksum => {
                testing::checksum_frame(1, at.stream, at.sequence, *frame_type, payload.to_vec())
                    .ok()?
            }
            FrameKind::Auto {
                frame_type,
                payload,
            } => {
                let header = Header {
                    version: 1,
                    frame_type: *frame_type,
                    stream: at.stream,
                    epoch: at.epoch,
                    payload_len: len(payload),
                    sequence: at.sequence,
                };
                protection.seal(header.encode(), payload.to_vec())
            }
            FrameKind::Header {
                header,
                keep_len,
                payload,
            } => {
                let mut header = *header;
                if !keep_len {
                    header[12..16].copy_from_slice(&len(payload).to_be_bytes());
                }
                protection.seal(header, payload.to_vec())
            }
            FrameKind::Raw(bytes) => {
                let payload_len = bytes.len().checked_sub(HEADER_LEN + TRAILER_LEN)?;
                let (header, rest) = bytes.split_first_chunk::<HEADER_LEN>()?;
                let (payload, trailer) = rest.split_at(payload_len);
                WireFrame {
                    header: *header,
                    payload: payload.to_vec(),
                    trailer: trailer.try_into().expect("the rest is the trailer"),
                }
            }
        };
        if let Some(flip) = self.flip {
            let bits = 8 * (HEADER_LEN + frame.payload.len() + TRAILER_LEN);
            let bit = usize::from(flip) % bits;
            let (byte, mask) = (bit / 8, 1u8 << (bit % 8));
            let payload_end = HEADER_LEN + frame.payload.len();
            match byte {
                b if b < HEADER_LEN => frame.header[b] ^= mask,
                b if b < payload_end => frame.payload[b - HEADER_LEN] ^= mask,
                b => frame.trailer[b - payload_end] ^= mask,
            }
        }
        Some(frame)
    }
}

/// Reads a script: `Parser::new(data)` gives the role, then iterate for the frames.
#[derive(Debug, Clone)]
pub struct Parser<'a> {
    rest: &'a [u8],
}

impl<'a> Parser<'a> {
    /// The role and the frames of an input.
    pub fn new(data: &'a [u8]) -> (Role, Self) {
        match data.split_first() {
            Some((role, rest)) => (Role::from_byte(*role), Self { rest }),
            None => (Role::DEFAULT_RECEIVER, Self { rest: &[] }),
        }
    }

    fn u8(&mut self) -> Option<u8> {
        let (b, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(*b)
    }

    fn u16(&mut self) -> Option<u16> {
        let (b, rest) = self.rest.split_first_chunk::<2>()?;
        self.rest = rest;
        Some(u16::from_be_bytes(*b))
    }

    /// `len:u16` then up to `len` bytes (fewer if the input ends first).
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(self.u16()?).min(self.rest.len());
        let (b, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(b)
    }
}

impl<'a> Iterator for Parser<'a> {
    type Item = FrameSpec<'a>;

    fn next(&mut self) -> Option<FrameSpec<'a>> {
        let tag = self.u8()?;
        let flip = if tag & FLIP != 0 {
            Some(self.u16()?)
        } else {
            None
        };
        let kind = match tag & 3 {
            KIND_AUTO => {
                let t = self.u8()?;
                let frame_type = FrameType::from_u8(t)
                    .unwrap_or(FrameType::ALL[usize::from(t) % FrameType::ALL.len()]);
                FrameKind::Auto {
                    frame_type,
                    payload: self.bytes()?,
                }
            }
            KIND_HEADER | KIND_HEADER_KEEP_LEN => {
                let (header, rest) = self.rest.split_first_chunk::<HEADER_LEN>()?;
                self.rest = rest;
                FrameKind::Header {
                    header: *header,
                    keep_len: tag & 3 == KIND_HEADER_KEEP_LEN,
                    payload: self.bytes()?,
                }
            }
            _ => FrameKind::Raw(self.bytes()?),
        };
        Some(FrameSpec {
            channel: tag >> 4,
            kind,
            flip,
        })
    }
}

/// Writes a script (the inverse of [`Parser`]), for seeds.
#[derive(Debug, Clone)]
pub struct Script(Vec<u8>);

impl Script {
    /// A script attacking `role`.
    pub fn new(role: Role) -> Self {
        Self(vec![role.to_byte()])
    }

    fn tag(&mut self, kind: u8, channel: u8) {
        assert!(channel < 16, "channels are 0..=15");
        self.0.push(kind | (channel << 4));
    }

    fn bytes(&mut self, b: &[u8]) {
        let len = u16::try_from(b.len()).expect("script payloads are at most 64 KiB");
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(b);
    }

    /// An [`FrameKind::Auto`] frame.
    pub fn auto(mut self, channel: u8, frame_type: FrameType, payload: &[u8]) -> Self {
        self.tag(KIND_AUTO, channel);
        self.0.push(frame_type as u8);
        self.bytes(payload);
        self
    }

    /// A [`FrameKind::Header`] frame whose length field is set from the payload.
    pub fn header(mut self, channel: u8, header: &[u8; HEADER_LEN], payload: &[u8]) -> Self {
        self.tag(KIND_HEADER, channel);
        self.0.extend_from_slice(header);
        self.bytes(payload);
        self
    }

    /// A [`FrameKind::Raw`] frame.
    pub fn raw(mut self, channel: u8, frame: &WireFrame) -> Self {
        self.tag(KIND_RAW, channel);
        self.bytes(&frame.to_bytes());
        self
    }

    /// The input bytes.
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_bytes_round_trip() {
        for b in 0..=u8::MAX {
            let role = Role::from_byte(b);
            assert_eq!(Role::from_byte(role.to_byte()), role);
        }
        assert_eq!(Role::DEFAULT_RECEIVER.to_byte(), 0);
        assert_eq!(Role::DEFAULT_SENDER.to_byte(), 1);
    }

    #[test]
    fn checksum_matches_the_record_layer() {
        let frame = testing::checksum_frame(1, 3, 9, FrameType::Pages, vec![7; 100]).unwrap();
        assert_eq!(checksum(&frame.header, &frame.payload), frame.trailer);
    }

    #[test]
    fn scripts_parse_back() {
        let frame = testing::checksum_frame(1, 0, 0, FrameType::Commit, vec![1]).unwrap();
        let data = Script::new(Role::DEFAULT_SENDER)
            .auto(0, FrameType::Ready, &[1, 2])
            .header(2, &frame.header, b"xy")
            .raw(15, &frame)
            .finish();
        let (role, frames) = Parser::new(&data);
        assert_eq!(role, Role::DEFAULT_SENDER);
        let frames: Vec<_> = frames.collect();
        assert_eq!(frames.len(), 3);
        let at = Position {
            stream: 0,
            sequence: 0,
            epoch: 0,
        };
        assert_eq!(frames[2].build(at, &Protection::Checksum), Some(frame));
        assert_eq!(frames[1].channel, 2);
        let built = frames[1].build(at, &Protection::Checksum).unwrap();
        assert_eq!(built.header[12..16], [0, 0, 0, 2]);
        assert_eq!(built.trailer, checksum(&built.header, b"xy"));
    }

    #[test]
    fn auto_frames_of_later_epochs_are_checksummed_too() {
        let data = Script::new(Role::DEFAULT_SENDER)
            .auto(0, FrameType::Ready, &[1, 2])
            .finish();
        let spec = Parser::new(&data).1.next().unwrap();
        let at = Position {
            stream: 3,
            sequence: 9,
            epoch: 4,
        };
        let frame = spec.build(at, &Protection::Checksum).unwrap();
        let h = testing::header_of(&frame);
        assert_eq!((h.stream, h.sequence, h.epoch), (3, 9, 4));
        assert_eq!(frame.trailer, checksum(&frame.header, &[1, 2]));
    }
}
