//! Key-encryption keys: what seals a migration's key and nonce before they reach etcd.
//!
//! A KEK file holds 64 hex digits (256 bits) and must not be readable by group or others
//! (mode 0600 or stricter). A KEK's id is the first 4 bytes of its SHA-256, in hex: it is
//! stored beside every sealed blob, so a replica knows which KEK opens it, and it names no
//! secret. During a rotation the new KEK seals and the old ones (`previous_kek_files`)
//! still open what they sealed; once every key sealed under an old KEK has expired (the
//! key TTL), it can be removed.
//!
//! Sealing is AES-256-GCM with a random 96-bit nonce and the migration id as associated
//! data, so a blob moved to another migration's key does not open.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use vmotion_proto::{KeyMaterial, MigrationId, MigrationKey, MigrationNonce};
use zeroize::Zeroizing;

/// What every associated data starts with, so a blob is never taken for anything else.
const AAD_LABEL: &[u8] = b"vmotion-kek-v1";

/// One KEK. The cipher zeroizes its key schedule on drop.
struct Kek {
    id: String,
    cipher: Aes256Gcm,
}

/// The KEK that seals and those that may still open.
pub(crate) struct Keks {
    current: Kek,
    previous: Vec<Kek>,
}

impl std::fmt::Debug for Keks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keks")
            .field("current", &self.current.id)
            .field(
                "previous",
                &self.previous.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A sealed key and nonce, as etcd stores it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Sealed {
    /// The id of the KEK that sealed it.
    pub(crate) kek: String,
    /// Base64 of nonce (12 bytes) ‖ ciphertext of key ‖ nonce (40 bytes) ‖ tag (16).
    pub(crate) blob: String,
    /// When the key expires (Unix ms).
    pub(crate) expires_ms: u64,
}

fn load(path: &Path) -> Result<Kek, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{}: a KEK file must be readable by its owner only (chmod 600)",
            path.display()
        ));
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    let digits = text.trim();
    let mut key = Zeroizing::new([0u8; 32]);
    if digits.len() != 64 || hex::decode_to_slice(digits, &mut *key).is_err() {
        return Err(format!(
            "{}: a KEK file holds 64 hex digits (`vmotion-keyservice kek generate FILE` writes one)",
            path.display()
        ));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &*key);
    Ok(Kek {
        id: hex::encode(&digest.as_ref()[..4]),
        cipher: Aes256Gcm::new_from_slice(&*key).expect("32 bytes"),
    })
}

impl Keks {
    /// Loads the sealing KEK and the older ones.
    pub(crate) fn load(current: &Path, previous: &[impl AsRef<Path>]) -> Result<Self, String> {
        Ok(Self {
            current: load(current)?,
            previous: previous
                .iter()
                .map(|p| load(p.as_ref()))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The sealing KEK's id.
    pub(crate) fn current_id(&self) -> &str {
        &self.current.id
    }

    /// Seals `material` for migration `id`.
    pub(crate) fn seal(
        &self,
        id: MigrationId,
        key: &[u8; 32],
        nonce: &[u8; 8],
        expires_ms: u64,
        rng: &ring::rand::SystemRandom,
    ) -> Result<Sealed, String> {
        let mut iv = [0u8; 12];
        ring::rand::SecureRandom::fill(rng, &mut iv)
            .map_err(|_| "the OS random generator failed")?;
        let mut plain = Zeroizing::new([0u8; 40]);
        plain[..32].copy_from_slice(key);
        plain[32..].copy_from_slice(nonce);
        let aad = aad(id);
        let sealed = self
            .current
            .cipher
            .encrypt(
                Nonce::from_slice(&iv),
                Payload {
                    msg: &*plain,
                    aad: &aad,
                },
            )
            .map_err(|_| "sealing failed")?;
        let mut out = iv.to_vec();
        out.extend_from_slice(&sealed);
        Ok(Sealed {
            kek: self.current.id.clone(),
            blob: base64::engine::general_purpose::STANDARD.encode(out),
            expires_ms,
        })
    }

    /// Opens a blob sealed for migration `id`.
    pub(crate) fn open(&self, id: MigrationId, sealed: &Sealed) -> Result<KeyMaterial, String> {
        let kek = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == sealed.kek)
            .ok_or_else(|| {
                format!(
                    "the key of migration {id} is sealed under KEK {}, which this replica does not hold",
                    sealed.kek
                )
            })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&sealed.blob)
            .map_err(|_| "a sealed key is not base64")?;
        if bytes.len() != 12 + 40 + 16 {
            return Err("a sealed key has the wrong length".into());
        }
        let aad = aad(id);
        let plain = Zeroizing::new(
            kek.cipher
                .decrypt(
                    Nonce::from_slice(&bytes[..12]),
                    Payload {
                        msg: &bytes[12..],
                        aad: &aad,
                    },
                )
                .map_err(|_| format!("the sealed key of migration {id} does not open"))?,
        );
        let key = MigrationKey::from_slice(&plain[..32]).expect("32 bytes");
        let mut nonce = [0u8; 8];
        nonce.copy_from_slice(&plain[32..40]);
        Ok(KeyMaterial {
            key,
            nonce: MigrationNonce(nonce),
        })
    }
}

fn aad(id: MigrationId) -> Vec<u8> {
    let mut aad = AAD_LABEL.to_vec();
    aad.extend_from_slice(&id.0);
    aad
}

/// Writes a fresh KEK into `path` (which must not exist), mode 0600.
pub fn generate(path: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut key = Zeroizing::new([0u8; 32]);
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut *key)
        .map_err(|_| std::io::Error::other("the OS random generator failed"))?;
    let text = Zeroizing::new(hex::encode(*key) + "\n");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek_in(dir: &Path, name: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        generate(&p).unwrap();
        p
    }

    #[test]
    fn seals_and_opens_bound_to_the_migration() {
        let d = tempfile::tempdir().unwrap();
        let keks = Keks::load(&kek_in(d.path(), "k"), &[] as &[&Path]).unwrap();
        let rng = ring::rand::SystemRandom::new();
        let id = MigrationId([3; 16]);
        let sealed = keks.seal(id, &[7; 32], &[9; 8], 5, &rng).unwrap();
        assert_eq!(sealed.kek, keks.current_id());
        assert!(
            !sealed
                .blob
                .contains(&base64::engine::general_purpose::STANDARD.encode([7u8; 32]))
        );
        let m = keks.open(id, &sealed).unwrap();
        assert_eq!((m.key.expose_secret(), m.nonce.0), (&[7; 32], [9; 8]));
        assert!(
            keks.open(MigrationId([4; 16]), &sealed).is_err(),
            "another migration"
        );
        let mut bad = sealed;
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(&bad.blob)
            .unwrap();
        bytes[20] ^= 1;
        bad.blob = base64::engine::general_purpose::STANDARD.encode(bytes);
        assert!(keks.open(id, &bad).is_err(), "altered");
    }

    #[test]
    fn a_rotation_keeps_old_blobs_readable() {
        let d = tempfile::tempdir().unwrap();
        let (old, new) = (kek_in(d.path(), "old"), kek_in(d.path(), "new"));
        let rng = ring::rand::SystemRandom::new();
        let id = MigrationId([1; 16]);
        let before = Keks::load(&old, &[] as &[&Path]).unwrap();
        let sealed = before.seal(id, &[1; 32], &[2; 8], 0, &rng).unwrap();
        let during = Keks::load(&new, &[&old]).unwrap();
        assert_ne!(during.current_id(), before.current_id());
        assert!(during.open(id, &sealed).is_ok());
        let after = Keks::load(&new, &[] as &[&Path]).unwrap();
        let e = after.open(id, &sealed).unwrap_err();
        assert!(e.contains(before.current_id()), "{e}");
    }

    #[test]
    fn a_kek_file_must_be_private_and_well_formed() {
        let d = tempfile::tempdir().unwrap();
        let p = kek_in(d.path(), "k");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(
            Keks::load(&p, &[] as &[&Path])
                .unwrap_err()
                .contains("chmod 600")
        );
        let short = d.path().join("short");
        std::fs::write(&short, "abcd").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(
            Keks::load(&short, &[] as &[&Path])
                .unwrap_err()
                .contains("64 hex digits")
        );
        assert!(generate(&p).is_err(), "never overwrites");
    }
}
