//! Guest-memory files: filling, creating and comparing them.
//!
//! A QEMU started by [`crate::Qemu`] keeps guest RAM in a `memory-backend-file` with
//! `share=on`, so these functions see what the guest sees (file offset = guest-physical
//! address). Errors name the file.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

/// The page size pages are counted in.
pub const PAGE_SIZE: usize = 4096;
/// How much is read or written at once.
const CHUNK: usize = 4 << 20;

/// `e` with what was being done to which file.
fn context(e: &io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// SplitMix64 (Steele, Lea, Flood 2014): fast, not cryptographic, every seed works.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Writes `bytes` pseudo-random bytes (SplitMix64 from `seed`) to `path`, replacing it.
/// The first word of every 4 KiB page is non-zero, so no page is all zero (QEMU sends
/// zero pages as a flag, not their bytes). The same seed gives the same file.
pub fn fill_random(path: &Path, bytes: u64, seed: u64) -> io::Result<()> {
    let mut file = File::create(path).map_err(|e| context(&e, "creating", path))?;
    let mut state = seed;
    let mut buf = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(CHUNK, |left| left.min(CHUNK));
        // CHUNK is a multiple of the page size: words at multiples of 4096 in the buffer
        // are first words of pages.
        for (i, word) in buf[..n].chunks_mut(8).enumerate() {
            let mut value = splitmix64(&mut state);
            if i % (PAGE_SIZE / 8) == 0 {
                value = value.max(1);
            }
            word.copy_from_slice(&value.to_le_bytes()[..word.len()]);
        }
        file.write_all(&buf[..n])
            .map_err(|e| context(&e, "writing", path))?;
        left -= n as u64;
    }
    Ok(())
}

/// Creates (or truncates) `path` as `bytes` of zeros, sparse.
pub fn create_zeroed(path: &Path, bytes: u64) -> io::Result<()> {
    let file = File::create(path).map_err(|e| context(&e, "creating", path))?;
    file.set_len(bytes).map_err(|e| context(&e, "sizing", path))
}

/// Reads until `buf` is full or the file ends; returns how much was read.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The offset of the first byte where the files at `a` and `b` differ, `None` if they
/// are equal. Files of different lengths differ at the shorter length if not before.
pub fn first_difference(a: &Path, b: &Path) -> io::Result<Option<u64>> {
    let mut fa = File::open(a).map_err(|e| context(&e, "opening", a))?;
    let mut fb = File::open(b).map_err(|e| context(&e, "opening", b))?;
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(|e| context(&e, "reading", a))?;
        let nb = read_full(&mut fb, &mut bb).map_err(|e| context(&e, "reading", b))?;
        let n = na.min(nb);
        // Slice equality is a memcmp: fast even in debug builds.
        if ba[..n] != bb[..n] {
            let at = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .expect("the slices differ");
            return Ok(Some(offset + at as u64));
        }
        offset += n as u64;
        if na != nb {
            return Ok(Some(offset));
        }
        if na == 0 {
            return Ok(None);
        }
    }
}

/// How many 4 KiB pages of the file at `path` are all zero (a partial last page counts
/// as a page, its missing bytes as zeros).
pub fn zero_pages(path: &Path) -> io::Result<u64> {
    static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    let mut file = File::open(path).map_err(|e| context(&e, "opening", path))?;
    let mut buf = vec![0u8; CHUNK];
    let mut count = 0;
    loop {
        let n = read_full(&mut file, &mut buf).map_err(|e| context(&e, "reading", path))?;
        count += buf[..n]
            .chunks(PAGE_SIZE)
            .filter(|page| **page == ZERO[..page.len()])
            .count() as u64;
        if n < CHUNK {
            return Ok(count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A scratch directory removed on drop.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("vmotion-qemu-memfile-{tag}-{}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn random_files_are_reproducible_and_have_no_zero_page() {
        let dir = Scratch::new("random");
        let (a, b, c) = (dir.0.join("a"), dir.0.join("b"), dir.0.join("c"));
        let size = CHUNK as u64 + 3 * PAGE_SIZE as u64 + 100;
        fill_random(&a, size, 7).unwrap();
        fill_random(&b, size, 7).unwrap();
        fill_random(&c, size, 8).unwrap();
        assert_eq!(fs::metadata(&a).unwrap().len(), size);
        assert_eq!(first_difference(&a, &b).unwrap(), None);
        assert!(first_difference(&a, &c).unwrap().unwrap() < 8);
        assert_eq!(zero_pages(&a).unwrap(), 0);

        // A file of seed 0 starts with SplitMix64's first output for state 0.
        fill_random(&c, 8, 0).unwrap();
        assert_eq!(
            fs::read(&c).unwrap(),
            0xE220_A839_7B1D_CDAFu64.to_le_bytes()
        );
    }

    #[test]
    fn the_first_difference_is_exact_and_lengths_count() {
        let dir = Scratch::new("diff");
        let (a, b) = (dir.0.join("a"), dir.0.join("b"));
        let size = 2 * CHUNK as u64 + 5;
        fill_random(&a, size, 1).unwrap();
        let mut bytes = fs::read(&a).unwrap();
        let at = CHUNK + 12345;
        bytes[at] ^= 0x40;
        fs::write(&b, &bytes).unwrap();
        assert_eq!(first_difference(&a, &b).unwrap(), Some(at as u64));

        bytes[at] ^= 0x40;
        bytes.truncate(CHUNK + 1);
        fs::write(&b, &bytes).unwrap();
        assert_eq!(first_difference(&a, &b).unwrap(), Some(CHUNK as u64 + 1));
        assert_eq!(first_difference(&b, &a).unwrap(), Some(CHUNK as u64 + 1));

        let err = first_difference(&a, &dir.0.join("missing")).unwrap_err();
        assert!(err.to_string().contains("opening"), "{err}");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn zero_pages_are_counted() {
        let dir = Scratch::new("zero");
        let path = dir.0.join("z");
        create_zeroed(&path, 10 * PAGE_SIZE as u64 + 1).unwrap();
        assert_eq!(zero_pages(&path).unwrap(), 11);
        let mut bytes = fs::read(&path).unwrap();
        bytes[3 * PAGE_SIZE + 4095] = 1;
        bytes[10 * PAGE_SIZE] = 1;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(zero_pages(&path).unwrap(), 9);
    }
}
