//! Guest images QEMU boots with `-kernel`, and what the host reads back of them.
//!
//! Both are Multiboot v1 images (`guest/idle.S`, `guest/dirty.S`, assembled): flat
//! binaries whose header sets flag bit 16 (the "a.out kludge"), so its address fields
//! tell the loader where they go and no ELF is needed. QEMU's `pc` machine loads them at
//! [`LOAD_ADDR`] through its Multiboot option ROM after SeaBIOS and enters them in 32-bit
//! protected mode, paging off, interrupts disabled (Multiboot spec, section 3.2).
//!
//! Memory layout (guest-physical = offset in the memory file):
//!
//! | where | what |
//! |---|---|
//! | `0x100000` | the image: Multiboot header (32 bytes) |
//! | `0x100020` ([`STARTED_ADDR`]) | 1 once the program runs (0 before) |
//! | `0x100024` ([`PROGRESS_ADDR`]) | dirty guest: pages written so far |
//! | `0x100028..0x100040` | dirty guest: its parameters |
//! | region | dirty guest: the pages it rewrites, at or above [`DIRTY_REGION_MIN`] |

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Where QEMU's Multiboot loader puts the images (1 MiB).
pub const LOAD_ADDR: u32 = 0x10_0000;
/// The word both guests set to 1 when their program starts.
pub const STARTED_ADDR: u64 = 0x10_0020;
/// The dirty guest's counter: how many page writes it has done (wrapping at 2^32).
pub const PROGRESS_ADDR: u64 = 0x10_0024;
/// The lowest address the dirty guest's region may start at (above the image).
pub const DIRTY_REGION_MIN: u32 = 0x20_0000;
/// The i8254 PIT's input clock, in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// The guest page size: the dirty guest stores one word per page.
pub const PAGE_SIZE: u32 = 4096;

/// Offsets of the dirty guest's parameters in its image.
mod param {
    pub(super) const REGION_START: usize = 0x28;
    pub(super) const REGION_PAGES: usize = 0x2C;
    pub(super) const RATE: usize = 0x30;
    pub(super) const CAP: usize = 0x34;
}

/// `guest/idle.S`, assembled (`as --32`, `objcopy -O binary -j .text`).
const IDLE: [u8; 50] = [
    0x02, 0xb0, 0xad, 0x1b, 0x00, 0x00, 0x01, 0x00, 0xfe, 0x4f, 0x51, 0xe4, 0x00, 0x00, 0x10, 0x00,
    0x00, 0x00, 0x10, 0x00, 0x32, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x24, 0x00, 0x10, 0x00,
    0x00, 0x00, 0x00, 0x00, 0xfa, 0xc7, 0x05, 0x20, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00, 0x00, 0xf4,
    0xeb, 0xfd,
];

/// `guest/dirty.S`, assembled, with a zero parameter block.
const DIRTY: [u8; 238] = [
    0x02, 0xb0, 0xad, 0x1b, 0x00, 0x00, 0x01, 0x00, 0xfe, 0x4f, 0x51, 0xe4, 0x00, 0x00, 0x10, 0x00,
    0x00, 0x00, 0x10, 0x00, 0xee, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x10, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xfa, 0xc7, 0x05, 0x20, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00, 0x00, 0x31, 0xf6, 0x8b, 0x3d, 0x28,
    0x00, 0x10, 0x00, 0x8b, 0x1d, 0x2c, 0x00, 0x10, 0x00, 0xc1, 0xe3, 0x0c, 0x01, 0xfb, 0x83, 0x3d,
    0x30, 0x00, 0x10, 0x00, 0x00, 0x74, 0x6c, 0xb0, 0x34, 0xe6, 0x43, 0x31, 0xc0, 0xe6, 0x40, 0xe6,
    0x40, 0x31, 0xed, 0x31, 0xc9, 0x31, 0xc0, 0xe6, 0x43, 0xe4, 0x40, 0x88, 0xc2, 0xe4, 0x40, 0x88,
    0xc6, 0x0f, 0xb7, 0xd2, 0x89, 0xc8, 0x29, 0xd0, 0x0f, 0xb7, 0xc0, 0x89, 0xd1, 0xf7, 0x25, 0x30,
    0x00, 0x10, 0x00, 0x01, 0x05, 0x38, 0x00, 0x10, 0x00, 0x11, 0xd5, 0x3b, 0x2d, 0x34, 0x00, 0x10,
    0x00, 0x76, 0x06, 0x8b, 0x2d, 0x34, 0x00, 0x10, 0x00, 0x85, 0xed, 0x74, 0xc8, 0xb8, 0x00, 0x01,
    0x00, 0x00, 0x46, 0x89, 0x37, 0x89, 0x35, 0x24, 0x00, 0x10, 0x00, 0x81, 0xc7, 0x00, 0x10, 0x00,
    0x00, 0x39, 0xdf, 0x72, 0x06, 0x8b, 0x3d, 0x28, 0x00, 0x10, 0x00, 0x4d, 0x74, 0xa7, 0x48, 0x75,
    0xe1, 0xeb, 0xa2, 0x46, 0x89, 0x37, 0x89, 0x35, 0x24, 0x00, 0x10, 0x00, 0x81, 0xc7, 0x00, 0x10,
    0x00, 0x00, 0x39, 0xdf, 0x72, 0xed, 0x8b, 0x3d, 0x28, 0x00, 0x10, 0x00, 0xeb, 0xe5,
];

/// A guest that sets its started word, then halts for ever with interrupts disabled
/// (`cli; 1: hlt; jmp 1b`): once [`started`], its memory never changes.
pub fn idle_guest() -> Vec<u8> {
    IDLE.to_vec()
}

/// The dirty guest's parameters, as patched into its image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DirtyParams {
    region_start: u32,
    region_pages: u32,
    /// Credit per PIT tick, in 2^-32 pages; 0 = unpaced.
    rate: u32,
    /// The most pages of credit the guest may hold.
    cap: u32,
}

impl DirtyParams {
    fn new(region_start: u32, region_bytes: u32, bytes_per_second: u32) -> Self {
        assert!(
            region_start >= DIRTY_REGION_MIN && region_start.is_multiple_of(PAGE_SIZE),
            "the dirty region must start 4 KiB aligned at or above {DIRTY_REGION_MIN:#x}, not {region_start:#x}"
        );
        let region_pages = region_bytes / PAGE_SIZE;
        assert!(region_pages > 0, "the dirty region needs at least one page");
        assert!(
            region_start.checked_add(region_pages * PAGE_SIZE).is_some(),
            "the dirty region must end below 4 GiB"
        );
        // pages per tick = bytes_per_second / (4096 * PIT_HZ) < 1 for any u32 rate, so
        // it fits 32 fraction bits; rounding a tiny rate down to 0 would unpace it.
        let rate = match bytes_per_second {
            0 => 0,
            bps => ((u64::from(bps) << 32) / (u64::from(PAGE_SIZE) * PIT_HZ)).max(1),
        };
        // The credit one whole PIT period (65,536 ticks, 55 ms) earns: a guest that fell
        // behind (descheduled, paused) catches up by at most that much.
        let cap = ((rate << 16) >> 32) + 1;
        Self {
            region_start,
            region_pages,
            rate: u32::try_from(rate).expect("pages per PIT tick < 1"),
            cap: u32::try_from(cap).expect("cap < 2^16"),
        }
    }

    fn patch(self, image: &mut [u8]) {
        for (at, value) in [
            (param::REGION_START, self.region_start),
            (param::REGION_PAGES, self.region_pages),
            (param::RATE, self.rate),
            (param::CAP, self.cap),
        ] {
            image[at..at + 4].copy_from_slice(&value.to_le_bytes());
        }
    }
}

/// A guest that keeps rewriting the `region_bytes` (rounded down to whole pages) from
/// `region_start`, at about `bytes_per_second` (0 = as fast as it can).
///
/// It walks the region page by page, wrapping at its end, storing an incrementing
/// counter (1, 2, ...) into the first word of each page, and keeps the last value at
/// [`PROGRESS_ADDR`] ([`progress`]). It paces itself with PIT channel 0: credit accrues
/// with the ticks elapsed between reads of the counter, and it writes while it has
/// credit; after a stall it catches up by at most one PIT period's worth (55 ms).
/// Unpaced, it writes about 260,000 pages/s under KVM on the nested development
/// machines (emulated: no paging) and about 2.5 million under TCG.
///
/// The region must lie in guest RAM; writes beyond it are lost.
///
/// # Panics
///
/// If `region_start` is not 4 KiB aligned or below [`DIRTY_REGION_MIN`], if the region
/// holds no whole page or if it ends above 4 GiB.
pub fn dirty_guest(region_start: u32, region_bytes: u32, bytes_per_second: u32) -> Vec<u8> {
    let mut image = DIRTY.to_vec();
    DirtyParams::new(region_start, region_bytes, bytes_per_second).patch(&mut image);
    image
}

/// Reads the little-endian word at guest-physical `addr` from the memory file at
/// `mem_path` (unbuffered: each call sees what the guest wrote by then).
pub fn read_u32(mem_path: &Path, addr: u64) -> io::Result<u32> {
    let mut word = [0; 4];
    File::open(mem_path)?.read_exact_at(&mut word, addr)?;
    Ok(u32::from_le_bytes(word))
}

/// Whether the guest program in the memory file at `mem_path` has started.
pub fn started(mem_path: &Path) -> io::Result<bool> {
    Ok(read_u32(mem_path, STARTED_ADDR)? == 1)
}

/// How many page writes the dirty guest in `mem_path` has done (wrapping at 2^32).
pub fn progress(mem_path: &Path) -> io::Result<u32> {
    read_u32(mem_path, PROGRESS_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Assembles `guest/<name>.S` the way its header says; `None` without binutils.
    fn assemble(name: &str) -> Option<Vec<u8>> {
        let dir = std::env::temp_dir().join(format!("vmotion-qemu-as-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = format!("{}/guest/{name}.S", env!("CARGO_MANIFEST_DIR"));
        let (obj, bin) = (
            dir.join(format!("{name}.o")),
            dir.join(format!("{name}.bin")),
        );
        match Command::new("as")
            .args(["--32", "-o"])
            .arg(&obj)
            .arg(&src)
            .status()
        {
            Ok(status) => assert!(status.success(), "as failed on {src}"),
            Err(_) => return None,
        }
        let status = Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&obj)
            .arg(&bin)
            .status()
            .expect("objcopy (binutils, like as)");
        assert!(status.success(), "objcopy failed on {src}");
        let bytes = std::fs::read(&bin).unwrap();
        let _ = std::fs::remove_file(obj);
        let _ = std::fs::remove_file(bin);
        let _ = std::fs::remove_dir(dir);
        Some(bytes)
    }

    /// The bytes are the assembled sources: rebuilt here when binutils are present.
    #[test]
    fn the_images_are_the_assembled_sources() {
        for (name, bytes) in [("idle", &IDLE[..]), ("dirty", &DIRTY[..])] {
            match assemble(name) {
                Some(assembled) => assert_eq!(assembled, bytes, "guest/{name}.S"),
                None => {
                    eprintln!("skipped: GNU as (binutils) is not installed, cannot reassemble");
                    return;
                }
            }
        }
    }

    #[test]
    fn the_images_are_valid_multiboot_headers_loaded_at_1_mib() {
        for image in [idle_guest(), dirty_guest(DIRTY_REGION_MIN, 4096, 0)] {
            let word = |i: usize| u32::from_le_bytes(image[i * 4..i * 4 + 4].try_into().unwrap());
            assert_eq!(word(0), 0x1BAD_B002);
            assert_eq!(word(1), 1 << 16, "only the a.out kludge flag");
            assert_eq!(word(0).wrapping_add(word(1)).wrapping_add(word(2)), 0);
            assert_eq!((word(3), word(4)), (LOAD_ADDR, LOAD_ADDR));
            assert_eq!(word(5), LOAD_ADDR + image.len() as u32, "load_end_addr");
            assert_eq!(word(6), 0, "no bss");
            let entry = (word(7) - LOAD_ADDR) as usize;
            assert_eq!(image[entry], 0xFA, "the entry point is the cli");
            assert!(entry >= (PROGRESS_ADDR - u64::from(LOAD_ADDR)) as usize);
        }
    }

    #[test]
    fn the_pace_becomes_credit_per_pit_tick() {
        let p = DirtyParams::new(0x20_0000, 256 << 20, 64 << 20);
        assert_eq!(p.region_pages, 65536);
        // 64 MiB/s = 16,384 pages/s = 16,384 / 1,193,182 pages per tick.
        let pages_per_second = f64::from(p.rate) / 2f64.powi(32) * PIT_HZ as f64;
        assert!(
            (pages_per_second - 16384.0).abs() < 0.01,
            "{pages_per_second}"
        );
        // One PIT period earns 65,536 * 16,384 / 1,193,182 = 899.9 pages.
        assert_eq!(p.cap, 900);

        assert_eq!(DirtyParams::new(0x20_0000, 8192, 0).rate, 0, "0 = unpaced");
        assert_eq!(
            DirtyParams::new(0x20_0000, 8192, 1).rate,
            1,
            "slow, not unpaced"
        );
        let fastest = DirtyParams::new(0x20_0000, 8192, u32::MAX);
        assert!(fastest.rate > 3_700_000_000 && fastest.cap < 65536);

        let mut image = DIRTY.to_vec();
        p.patch(&mut image);
        assert_eq!(image, dirty_guest(0x20_0000, 256 << 20, 64 << 20));
        assert_eq!(
            &image[param::REGION_START..][..4],
            &0x20_0000u32.to_le_bytes()
        );
    }

    #[test]
    #[should_panic(expected = "at or above")]
    fn a_region_over_the_image_is_refused() {
        dirty_guest(LOAD_ADDR, 4096, 0);
    }
}
