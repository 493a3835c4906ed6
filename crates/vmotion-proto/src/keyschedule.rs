//! The key schedule: every key, IV and MAC key of a migration, from one HKDF-SHA256.
//!
//! ```text
//! PRK = HKDF-Extract(salt = migration nonce (8 bytes), IKM = migration key (32 bytes))
//! secret(label, th, dir, stream, epoch, L) = HKDF-Expand(PRK, info, L)
//! info = "vmotion/1" || u8 len(label) || label || migration id (16)
//!        || transcript hash (32) || u8 direction || u16 stream || u32 epoch
//! ```
//!
//! | label | length | used for |
//! |---|---|---|
//! | `key` | 32 | AES-256-GCM key of (direction, stream, epoch) |
//! | `iv` | 12 | per-key IV of (direction, stream, epoch); nonce = IV XOR sequence |
//! | `confirm` | 32 | HMAC key of the key confirmation in `direction` (stream 0, epoch 0) |
//! | `bind` | 32 | HMAC key of the stream bind of `stream` (sender→receiver, epoch 0) |
//!
//! Every (key, nonce) pair is therefore unique: the migration id and transcript separate
//! migrations, direction/stream/epoch separate keys within one, and the sequence separates
//! frames under one key. The schedule holds only the PRK, in a zeroizing type.

use ring::{hkdf, hmac};

use crate::secret::{KeyMaterial, MigrationId, Secret};

/// Length of a transcript hash (SHA-256).
pub const TRANSCRIPT_HASH_LEN: usize = 32;
/// The prefix of every HKDF info string.
pub(crate) const INFO_PREFIX: &[u8] = b"vmotion/1";

/// Which way a key protects traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Direction {
    /// From the source host to the destination host.
    SenderToReceiver = 1,
    /// From the destination host back to the source host.
    ReceiverToSender = 2,
}

/// Key derivation for one migration.
pub(crate) struct KeySchedule {
    prk: Secret<32>,
    migration_id: MigrationId,
}

impl std::fmt::Debug for KeySchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySchedule")
            .field("prk", &self.prk)
            .field("migration_id", &self.migration_id)
            .finish()
    }
}

/// Output length for ring's HKDF API.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The coordinates of one derived secret.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot<'a> {
    pub(crate) label: &'static str,
    pub(crate) transcript_hash: &'a [u8; TRANSCRIPT_HASH_LEN],
    pub(crate) direction: Direction,
    pub(crate) stream: u16,
    pub(crate) epoch: u32,
}

impl KeySchedule {
    /// HKDF-Extract with the migration nonce as salt.
    pub(crate) fn new(material: &KeyMaterial, migration_id: MigrationId) -> Self {
        let salt = hmac::Key::new(hmac::HMAC_SHA256, &material.nonce.0);
        let tag = hmac::sign(&salt, material.key.expose_secret());
        let mut prk = Secret::<32>::zero();
        prk.expose_mut().copy_from_slice(tag.as_ref());
        Self { prk, migration_id }
    }

    /// HKDF-Expand into `out` for the given slot.
    pub(crate) fn expand(&self, slot: Slot<'_>, out: &mut [u8]) {
        let label = slot.label.as_bytes();
        let label_len = [u8::try_from(label.len()).expect("labels are short constants")];
        let stream = slot.stream.to_be_bytes();
        let epoch = slot.epoch.to_be_bytes();
        let direction = [slot.direction as u8];
        let info: [&[u8]; 8] = [
            INFO_PREFIX,
            &label_len,
            label,
            &self.migration_id.0,
            slot.transcript_hash,
            &direction,
            &stream,
            &epoch,
        ];
        let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, self.prk.expose());
        // `expand` only fails when the output exceeds 255 * 32 bytes; ours are <= 32.
        prk.expand(&info, Len(out.len()))
            .and_then(|okm| okm.fill(out))
            .expect("HKDF output lengths here are at most 32 bytes");
    }

    pub(crate) fn secret<const N: usize>(&self, slot: Slot<'_>) -> Secret<N> {
        let mut s = Secret::<N>::zero();
        self.expand(slot, s.expose_mut());
        s
    }

    /// HMAC key of the key confirmation sent in `direction`.
    pub(crate) fn confirm_key(
        &self,
        transcript_hash: &[u8; TRANSCRIPT_HASH_LEN],
        direction: Direction,
    ) -> Secret<32> {
        self.secret(Slot {
            label: "confirm",
            transcript_hash,
            direction,
            stream: 0,
            epoch: 0,
        })
    }

    /// HMAC key of the bind frame of data stream `stream`.
    pub(crate) fn bind_key(
        &self,
        transcript_hash: &[u8; TRANSCRIPT_HASH_LEN],
        stream: u16,
    ) -> Secret<32> {
        self.secret(Slot {
            label: "bind",
            transcript_hash,
            direction: Direction::SenderToReceiver,
            stream,
            epoch: 0,
        })
    }
}

/// HMAC-SHA256 of `msg` under a derived key.
pub(crate) fn mac(key: &Secret<32>, msg: &[&[u8]]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key.expose());
    let mut ctx = hmac::Context::with_key(&key);
    for part in msg {
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// Constant-time equality for MACs.
pub(crate) fn mac_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{MigrationKey, MigrationNonce};

    /// RFC 5869 appendix A, test cases 1 and 3 (SHA-256), through the same ring calls the
    /// schedule uses: HMAC for Extract, `Prk::new_less_safe` + `expand` for Expand.
    #[test]
    fn hkdf_sha256_rfc5869_vectors() {
        struct Case {
            ikm: Vec<u8>,
            salt: Vec<u8>,
            info: Vec<u8>,
            prk: &'static str,
            okm: &'static str,
        }
        let cases = [
            Case {
                ikm: vec![0x0b; 22],
                salt: (0x00..=0x0c).collect(),
                info: (0xf0..=0xf9).collect(),
                prk: "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
                okm: "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
            },
            Case {
                ikm: vec![0x0b; 22],
                salt: vec![],
                info: vec![],
                prk: "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
                okm: "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
            },
        ];
        for c in cases {
            let prk = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &c.salt), &c.ikm);
            assert_eq!(hex::encode(prk.as_ref()), c.prk);
            let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, prk.as_ref());
            let mut okm = vec![0u8; 42];
            prk.expand(&[&c.info], Len(42))
                .unwrap()
                .fill(&mut okm)
                .unwrap();
            assert_eq!(hex::encode(okm), c.okm);
        }
    }

    /// Vectors computed by an independent implementation (Python's hmac/hashlib, see
    /// `testdata/gen_vectors.py`) from the spec in docs/protocol.md.
    #[test]
    fn schedule_matches_independent_vectors() {
        let vectors = include_str!("../testdata/keyschedule.txt");
        let mut checked = 0;
        for line in vectors
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [key, nonce, id, th, label, dir, stream, epoch, len, expected] = f[..] else {
                panic!("bad vector line: {line}");
            };
            let material = KeyMaterial {
                key: MigrationKey::from_slice(&hex::decode(key).unwrap()).unwrap(),
                nonce: MigrationNonce(hex::decode(nonce).unwrap().try_into().unwrap()),
            };
            let schedule = KeySchedule::new(
                &material,
                MigrationId(hex::decode(id).unwrap().try_into().unwrap()),
            );
            let th: [u8; 32] = hex::decode(th).unwrap().try_into().unwrap();
            let label: &'static str = match label {
                "key" => "key",
                "iv" => "iv",
                "confirm" => "confirm",
                "bind" => "bind",
                other => panic!("unknown label {other}"),
            };
            let direction = match dir {
                "1" => Direction::SenderToReceiver,
                "2" => Direction::ReceiverToSender,
                other => panic!("unknown direction {other}"),
            };
            let mut out = vec![0u8; len.parse().unwrap()];
            schedule.expand(
                Slot {
                    label,
                    transcript_hash: &th,
                    direction,
                    stream: stream.parse().unwrap(),
                    epoch: epoch.parse().unwrap(),
                },
                &mut out,
            );
            assert_eq!(hex::encode(&out), expected, "{line}");
            checked += 1;
        }
        assert!(checked >= 8, "only {checked} vectors");
    }

    #[test]
    fn every_coordinate_changes_the_output() {
        let material = KeyMaterial {
            key: MigrationKey::from_bytes([1; 32]),
            nonce: MigrationNonce([2; 8]),
        };
        let s = KeySchedule::new(&material, MigrationId([3; 16]));
        let th = [4u8; 32];
        let base = Slot {
            label: "key",
            transcript_hash: &th,
            direction: Direction::SenderToReceiver,
            stream: 0,
            epoch: 0,
        };
        let other_th = [5u8; 32];
        let variants = [
            base,
            Slot {
                label: "iv",
                ..base
            },
            Slot {
                transcript_hash: &other_th,
                ..base
            },
            Slot {
                direction: Direction::ReceiverToSender,
                ..base
            },
            Slot { stream: 1, ..base },
            Slot { epoch: 1, ..base },
        ];
        let outs: Vec<[u8; 32]> = variants
            .iter()
            .map(|slot| *s.secret::<32>(*slot).expose())
            .collect();
        for i in 0..outs.len() {
            for j in i + 1..outs.len() {
                assert_ne!(outs[i], outs[j], "slots {i} and {j} collide");
            }
        }
        // Another migration id or nonce with the same key gives other keys too.
        let s2 = KeySchedule::new(&material, MigrationId([9; 16]));
        assert_ne!(*s2.secret::<32>(base).expose(), outs[0]);
        let material2 = KeyMaterial {
            key: MigrationKey::from_bytes([1; 32]),
            nonce: MigrationNonce([7; 8]),
        };
        let s3 = KeySchedule::new(&material2, MigrationId([3; 16]));
        assert_ne!(*s3.secret::<32>(base).expose(), outs[0]);
    }
}
