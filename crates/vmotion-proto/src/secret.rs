//! Migration identity and key material.
//!
//! Secrets are fixed-size, zeroized on drop, print as `[redacted]` and are not `Clone`.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// A fixed-size secret: zeroized on drop, never printed.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(crate) struct Secret<const N: usize>([u8; N]);

impl<const N: usize> Secret<N> {
    pub(crate) fn zero() -> Self {
        Self([0; N])
    }
    pub(crate) fn expose(&self) -> &[u8; N] {
        &self.0
    }
    pub(crate) fn expose_mut(&mut self) -> &mut [u8; N] {
        &mut self.0
    }
}

impl<const N: usize> fmt::Debug for Secret<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The random id the key service gives a migration. Not secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MigrationId(pub [u8; 16]);

impl fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationId({self})")
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Parses the form [`Display`](fmt::Display) prints: 32 lowercase hex digits, nothing else.
impl std::str::FromStr for MigrationId {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const BAD: &str = "a migration id is 32 lowercase hex digits";
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(BAD);
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| BAD)?;
        }
        Ok(Self(id))
    }
}

/// The 256-bit migration key. Zeroized on drop; `Debug` prints `[redacted]`.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct MigrationKey([u8; 32]);

impl MigrationKey {
    /// Takes ownership of key bytes. The caller should zeroize its own copy (or pass a
    /// temporary).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Copies a key from a slice of exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut k = Self([0; 32]);
        if bytes.len() != 32 {
            return None;
        }
        k.0.copy_from_slice(bytes);
        Some(k)
    }

    /// Draws a fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, ring::error::Unspecified> {
        let mut k = Self([0; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k.0)?;
        Ok(k)
    }

    /// The key bytes, for handing to the key-service protocol. Keep the borrow short.
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for MigrationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MigrationKey([redacted])")
    }
}

/// 32 fresh bytes from the operating system's CSPRNG, for the `random` of a handshake.
pub fn handshake_random() -> Result<[u8; 32], ring::error::Unspecified> {
    let mut r = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r)?;
    Ok(r)
}

/// The 64-bit migration nonce, used as the HKDF salt. Issued together with the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MigrationNonce(pub [u8; 8]);

/// Everything the key service issues for one migration and both ends need.
#[derive(Debug)]
pub struct KeyMaterial {
    /// The 256-bit key.
    pub key: MigrationKey,
    /// The 64-bit nonce.
    pub nonce: MigrationNonce,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_ids_parse_back_only_in_their_printed_form() {
        let id = MigrationId([0xab, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0xff]);
        assert_eq!(id.to_string().parse::<MigrationId>(), Ok(id));
        for bad in [
            "",
            "ab",
            "AB0102030405060708090a0b0c0d0eff",
            "ab0102030405060708090a0b0c0d0eff0",
            "+b0102030405060708090a0b0c0d0eff",
            "ab0102030405060708090a0b0c0d0éf",
        ] {
            assert!(bad.parse::<MigrationId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_never_prints_key_bytes() {
        let key = MigrationKey::from_bytes([0xab; 32]);
        let material = KeyMaterial {
            key,
            nonce: MigrationNonce([1; 8]),
        };
        let printed = format!("{material:?} {:#?}", material);
        assert!(!printed.to_lowercase().contains("abab"), "{printed}");
        assert!(!printed.contains("171"), "{printed}");
        assert!(printed.contains("redacted"));
        assert_eq!(format!("{:?}", Secret::<4>([9, 9, 9, 9])), "[redacted]");
    }

    #[test]
    fn key_from_slice_checks_length() {
        assert!(MigrationKey::from_slice(&[0; 31]).is_none());
        assert!(MigrationKey::from_slice(&[0; 33]).is_none());
        assert_eq!(
            MigrationKey::from_slice(&[7; 32]).unwrap().expose_secret(),
            &[7; 32]
        );
    }

    #[test]
    fn generated_keys_differ() {
        let a = MigrationKey::generate().unwrap();
        let b = MigrationKey::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
    }
}
