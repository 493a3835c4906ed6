//! The built-in guest program (`guest/heartbeat.S`, assembled) and its memory layout.

/// Guest-physical address the program is loaded at.
pub(crate) const CODE_ADDR: u64 = 0x1000;
/// The first page of the region the guest writes over (pages below hold the parameters
/// and the program).
pub(crate) const FIRST_DATA_PAGE: u64 = 16;
/// Port the guest reports its write counter on after each batch.
pub(crate) const PORT_HEARTBEAT: u16 = 0x10;
/// Port the guest reports its checksum of the data region on.
pub(crate) const PORT_CHECKSUM: u16 = 0x11;

/// Offsets of the parameter words in page 0.
pub(crate) mod param {
    pub(crate) const FIRST_DATA_PAGE: usize = 0x00;
    pub(crate) const DATA_PAGES: usize = 0x04;
    pub(crate) const BATCH: usize = 0x08;
    pub(crate) const PATTERN: usize = 0x0C;
    pub(crate) const COMMAND: usize = 0x10;
}

/// `guest/heartbeat.S`, assembled (`as --32`, `objcopy -O binary -j .text`).
pub(crate) const PROGRAM: [u8; 123] = [
    0x8b, 0x0d, 0x08, 0x00, 0x00, 0x00, 0x83, 0x3d, 0x0c, 0x00, 0x00, 0x00, 0x01, 0x74, 0x13, 0x69,
    0xdb, 0x0d, 0x66, 0x19, 0x00, 0x81, 0xc3, 0x5f, 0xf3, 0x6e, 0x3c, 0x89, 0xd8, 0xc1, 0xe8, 0x08,
    0xeb, 0x03, 0x43, 0x89, 0xd8, 0x31, 0xd2, 0xf7, 0x35, 0x04, 0x00, 0x00, 0x00, 0x03, 0x15, 0x00,
    0x00, 0x00, 0x00, 0xc1, 0xe2, 0x0c, 0x46, 0x89, 0x32, 0x89, 0x5a, 0x04, 0xe2, 0xc8, 0x89, 0xf0,
    0xe7, 0x10, 0x83, 0x3d, 0x10, 0x00, 0x00, 0x00, 0x01, 0x75, 0xb5, 0xc7, 0x05, 0x10, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x8b, 0x3d, 0x00, 0x00, 0x00, 0x00, 0xc1, 0xe7, 0x0c, 0x8b, 0x0d,
    0x04, 0x00, 0x00, 0x00, 0x31, 0xc0, 0xd1, 0xc0, 0x03, 0x07, 0xd1, 0xc0, 0x03, 0x47, 0x04, 0x81,
    0xc7, 0x00, 0x10, 0x00, 0x00, 0xe2, 0xef, 0xe7, 0x11, 0xeb, 0x85,
];

/// The guest's checksum of its data region, computed on the host the way the program
/// does: `acc = rotl(acc, 1) + word` over the first two little-endian 32-bit words of
/// every page (the words the program writes).
pub fn checksum(data_region: &[u8]) -> u32 {
    data_region
        .chunks_exact(4096)
        .flat_map(|page| [&page[0..4], &page[4..8]])
        .fold(0u32, |acc, w| {
            acc.rotate_left(1)
                .wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        })
}

/// [`checksum`] of a whole guest's memory (from page 0), over the data region the
/// program's parameters name.
pub fn checksum_of_guest(memory: &[u8]) -> u32 {
    let word = |at: usize| {
        memory
            .get(at..at + 4)
            .map_or(0, |w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
    };
    let (first, pages) = (word(param::FIRST_DATA_PAGE), word(param::DATA_PAGES));
    let start = first * 4096;
    let end = (start + pages * 4096).min(memory.len());
    checksum(memory.get(start..end).unwrap_or(&[]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes are the assembled source: rebuilt here when binutils are present.
    #[test]
    fn the_program_is_the_assembled_source() {
        let dir = std::env::temp_dir().join(format!("vmotion-guest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/guest/heartbeat.S");
        let obj = dir.join("h.o");
        let bin = dir.join("h.bin");
        let assembled = std::process::Command::new("as")
            .args(["--32", "-o"])
            .arg(&obj)
            .arg(src)
            .status();
        match assembled {
            Ok(s) if s.success() => {}
            _ => {
                eprintln!("skipped: GNU as (binutils) is not installed, cannot reassemble");
                return;
            }
        }
        let ok = std::process::Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&obj)
            .arg(&bin)
            .status()
            .unwrap();
        assert!(ok.success());
        assert_eq!(std::fs::read(&bin).unwrap(), PROGRAM);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn checksum_is_order_sensitive_and_covers_the_written_words() {
        let mut a = vec![0u8; 8192];
        a[0] = 1;
        a[4] = 2;
        assert_eq!(
            checksum(&a),
            4 << 2,
            "rotl(rotl(1) + 2) twice more for page 2"
        );
        let mut b = a.clone();
        b.swap(0, 4);
        assert_ne!(checksum(&a), checksum(&b));
        let mut c = a.clone();
        c[4096 + 4] = 1;
        assert_ne!(checksum(&a), checksum(&c), "the second page counts");
    }
}
