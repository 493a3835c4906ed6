//! Dirty bitmaps and the page ranges they become.
//!
//! A mover's dirty log hands back one bit per guest page (KVM's `KVM_GET_DIRTY_LOG`
//! layout: 64-bit words, page `i` is bit `i % 64` of word `i / 64`). The engine turns set
//! bits into maximal runs ([`PageRange`]) and cuts the runs at chunk boundaries, because a
//! chunk is pinned to one stream: a page's later copy can then never overtake its earlier
//! copy on another connection.

/// A run of consecutive pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageRange {
    /// First page.
    pub start: u64,
    /// Number of pages (at least 1).
    pub len: u64,
}

impl PageRange {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Errors building a bitmap from a mover's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// The word count does not match the page count.
    #[error("a dirty log for {pages} pages needs {expected} words, got {got}")]
    WrongLength {
        /// Pages of guest memory.
        pages: u64,
        /// Words needed.
        expected: usize,
        /// Words given.
        got: usize,
    },
    /// Bits are set past the last page.
    #[error("the dirty log marks pages past the end of guest memory ({pages} pages)")]
    BitsPastEnd {
        /// Pages of guest memory.
        pages: u64,
    },
}

/// One bit per guest page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

fn words_for(pages: u64) -> usize {
    usize::try_from(pages.div_ceil(64)).expect("guest page counts fit in memory")
}

impl DirtyBitmap {
    /// An all-clean bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; words_for(pages)],
            pages,
        }
    }

    /// An all-dirty bitmap: iteration 0 sends everything.
    pub fn all(pages: u64) -> Self {
        let mut b = Self {
            words: vec![u64::MAX; words_for(pages)],
            pages,
        };
        b.clear_tail();
        b
    }

    /// Takes a mover's words, checking their length and that no bit lies past the end.
    pub fn from_words(words: Vec<u64>, pages: u64) -> Result<Self, BitmapError> {
        let expected = words_for(pages);
        if words.len() != expected {
            return Err(BitmapError::WrongLength {
                pages,
                expected,
                got: words.len(),
            });
        }
        let b = Self { words, pages };
        let mut clean = b.clone();
        clean.clear_tail();
        if clean != b {
            return Err(BitmapError::BitsPastEnd { pages });
        }
        Ok(b)
    }

    fn clear_tail(&mut self) {
        let used = self.pages % 64;
        if used != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << used) - 1;
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks a page dirty (ignored past the end).
    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Whether a page is dirty.
    pub fn is_set(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Adds every page dirty in `other` (same size).
    pub fn union_with(&mut self, other: &Self) {
        debug_assert_eq!(self.pages, other.pages);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// The dirty pages as maximal runs, in ascending order. Skips clean words whole, so a
    /// mostly clean bitmap of a large guest costs a word scan, not a bit scan.
    pub fn ranges(&self) -> impl Iterator<Item = PageRange> + '_ {
        let mut page = 0u64;
        std::iter::from_fn(move || {
            let start = self.next_with(page, true)?;
            let end = self.next_with(start, false).unwrap_or(self.pages);
            page = end;
            Some(PageRange {
                start,
                len: end - start,
            })
        })
    }

    /// The first page at or after `from` whose bit equals `dirty`.
    fn next_with(&self, from: u64, dirty: bool) -> Option<u64> {
        if from >= self.pages {
            return None;
        }
        let mut w = (from / 64) as usize;
        let word = |i: usize| if dirty { self.words[i] } else { !self.words[i] };
        let mut bits = word(w) & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                return (page < self.pages).then_some(page);
            }
            w += 1;
            if w == self.words.len() {
                return None;
            }
            bits = word(w);
        }
    }
}

/// Cuts a range at every multiple of `chunk_pages`, so each piece lies in one chunk.
pub fn split_at_chunks(range: PageRange, chunk_pages: u64) -> impl Iterator<Item = PageRange> {
    assert!(chunk_pages > 0, "chunks hold at least one page");
    let mut start = range.start;
    let end = range.end();
    std::iter::from_fn(move || {
        if start >= end {
            return None;
        }
        let chunk_end = (start / chunk_pages + 1) * chunk_pages;
        let piece_end = chunk_end.min(end);
        let piece = PageRange {
            start,
            len: piece_end - start,
        };
        start = piece_end;
        Some(piece)
    })
}

/// The data stream (1..=streams) a page travels on: its chunk's, for the whole migration.
pub fn stream_for(page: u64, chunk_pages: u64, streams: u16) -> u16 {
    assert!(streams > 0 && chunk_pages > 0);
    let s = (page / chunk_pages) % u64::from(streams);
    u16::try_from(s).expect("below a u16 stream count") + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_of_a_small_bitmap() {
        let mut b = DirtyBitmap::new(200);
        for p in [0, 1, 2, 63, 64, 65, 130, 199] {
            b.set(p);
        }
        let r: Vec<_> = b.ranges().map(|r| (r.start, r.len)).collect();
        assert_eq!(r, [(0, 3), (63, 3), (130, 1), (199, 1)]);
        assert_eq!(b.count(), 8);
        assert_eq!(
            DirtyBitmap::all(130).ranges().collect::<Vec<_>>(),
            [PageRange { start: 0, len: 130 }]
        );
        assert_eq!(DirtyBitmap::all(130).count(), 130);
        assert_eq!(DirtyBitmap::new(130).ranges().count(), 0);
    }

    #[test]
    fn mover_words_are_checked() {
        assert!(DirtyBitmap::from_words(vec![0; 2], 129).is_err());
        assert_eq!(
            DirtyBitmap::from_words(vec![0, 0, 1 << 1], 129),
            Err(BitmapError::BitsPastEnd { pages: 129 })
        );
        assert!(
            DirtyBitmap::from_words(vec![0, 0, 1], 129)
                .unwrap()
                .is_set(128)
        );
    }

    #[test]
    fn chunks_pin_pages_to_streams() {
        let pieces: Vec<_> = split_at_chunks(PageRange { start: 5, len: 20 }, 8)
            .map(|r| (r.start, r.len))
            .collect();
        assert_eq!(pieces, [(5, 3), (8, 8), (16, 8), (24, 1)]);
        assert_eq!(stream_for(0, 8, 4), 1);
        assert_eq!(stream_for(8, 8, 4), 2);
        assert_eq!(stream_for(33, 8, 4), 1);
    }

    fn bitmap() -> impl Strategy<Value = DirtyBitmap> {
        (1u64..700).prop_flat_map(|pages| {
            proptest::collection::vec(0..pages, 0..200).prop_map(move |set| {
                let mut b = DirtyBitmap::new(pages);
                for p in set {
                    b.set(p);
                }
                b
            })
        })
    }

    proptest! {
        /// Ranges cover exactly the set bits, in order, maximal (never adjacent).
        #[test]
        fn ranges_are_exact_and_maximal(b in bitmap()) {
            let ranges: Vec<_> = b.ranges().collect();
            let mut covered = DirtyBitmap::new(b.pages());
            for w in ranges.windows(2) {
                prop_assert!(w[0].end() < w[1].start, "sorted and not adjacent");
            }
            for r in &ranges {
                prop_assert!(r.len > 0 && r.end() <= b.pages());
                for p in r.start..r.end() {
                    covered.set(p);
                }
            }
            prop_assert_eq!(&covered, &b);
            prop_assert_eq!(ranges.iter().map(|r| r.len).sum::<u64>(), b.count());
        }

        /// Chunk splitting keeps every page, each piece in one chunk on one stream.
        #[test]
        fn chunk_pieces_partition_the_range(start in 0u64..10_000, len in 1u64..5_000, chunk in 1u64..600, streams in 1u16..9) {
            let pieces: Vec<_> = split_at_chunks(PageRange { start, len }, chunk).collect();
            prop_assert_eq!(pieces.first().unwrap().start, start);
            prop_assert_eq!(pieces.last().unwrap().end(), start + len);
            for w in pieces.windows(2) {
                prop_assert_eq!(w[0].end(), w[1].start);
            }
            for p in &pieces {
                prop_assert_eq!(p.start / chunk, (p.end() - 1) / chunk);
                prop_assert_eq!(stream_for(p.start, chunk, streams), stream_for(p.end() - 1, chunk, streams));
            }
        }
    }
}
