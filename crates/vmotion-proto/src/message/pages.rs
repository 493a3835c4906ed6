//! The `Pages` payload: a batch of guest pages, zero pages as flags.
//!
//! ```text
//! +-----------------------------+------------------------+------------+------------+----------+
//! | data: d × page_size bytes   | entries: n × u64       | u32 n      | u8 shift   | 3 × 0    |
//! +-----------------------------+------------------------+------------+------------+----------+
//! entry = bit 63: zero page (no data) | bits 0..=62: page index
//! data holds the non-zero pages, in entry order; d = number of entries without the flag
//! ```
//!
//! Page data comes first so that, in a buffer whose payload starts on a page boundary,
//! every page sits on a page boundary too; the index list trails it.

use crate::buf::AlignedBuf;
use crate::codec::Reader;
use crate::error::PeerMisbehaved;
use crate::frame::FrameType;

/// Smallest page size the protocol carries.
pub const MIN_PAGE_SHIFT: u8 = 12;
/// Largest page size the protocol carries (64 KiB).
pub const MAX_PAGE_SHIFT: u8 = 16;
/// Flag bit of an entry: the page is all zeros and has no data.
pub const ZERO_PAGE_FLAG: u64 = 1 << 63;
/// Length of the fixed trailer of a `Pages` payload.
pub const PAGES_TRAILER_LEN: usize = 8;

/// One page of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry<'a> {
    /// Page index within guest memory.
    pub index: u64,
    /// The page's bytes, or `None` for a zero page.
    pub data: Option<&'a [u8]>,
}

/// A validated, zero-copy view of a `Pages` payload.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PagesView<'a> {
    data: &'a [u8],
    entries: &'a [u8],
    page_size: usize,
}

impl std::fmt::Debug for PagesView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagesView")
            .field("pages", &self.len())
            .field("page_size", &self.page_size)
            .finish()
    }
}

impl<'a> PagesView<'a> {
    /// Validates a payload. Only reads; allocates nothing.
    pub fn decode(payload: &'a [u8]) -> Result<Self, PeerMisbehaved> {
        let malformed = |reason| PeerMisbehaved::MalformedPayload {
            frame_type: FrameType::Pages,
            reason,
        };
        let body_len = payload
            .len()
            .checked_sub(PAGES_TRAILER_LEN)
            .ok_or(malformed("payload too short"))?;
        let (body, trailer) = payload.split_at(body_len);
        let mut r = Reader::new(trailer, FrameType::Pages);
        let n = usize::try_from(r.u32()?).map_err(|_| malformed("entry count too large"))?;
        let shift = r.u8()?;
        r.zeros(3)?;
        if !(MIN_PAGE_SHIFT..=MAX_PAGE_SHIFT).contains(&shift) {
            return Err(malformed("page size out of range"));
        }
        let page_size = 1usize << shift;
        let entries_len = n
            .checked_mul(8)
            .filter(|l| *l <= body_len)
            .ok_or(malformed("entry count exceeds the payload"))?;
        let (data, entries) = body.split_at(body_len - entries_len);
        let view = Self {
            data,
            entries,
            page_size,
        };
        let data_pages = view
            .raw_entries()
            .filter(|e| e & ZERO_PAGE_FLAG == 0)
            .count();
        if data_pages.checked_mul(page_size) != Some(data.len()) {
            return Err(malformed("data length does not match the non-zero entries"));
        }
        Ok(view)
    }

    fn raw_entries(&self) -> impl Iterator<Item = u64> + 'a {
        self.entries
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("chunks of 8")))
    }

    /// Number of pages (zero pages included).
    pub fn len(&self) -> usize {
        self.entries.len() / 8
    }

    /// Whether the batch holds no page.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Page size of the batch.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Number of pages carried with data (non-zero pages).
    pub fn data_pages(&self) -> usize {
        self.data.len() / self.page_size
    }

    /// The pages in order.
    pub fn iter(&self) -> impl Iterator<Item = PageEntry<'a>> + 'a {
        let mut data = self.data.chunks_exact(self.page_size);
        self.raw_entries().map(move |e| PageEntry {
            index: e & !ZERO_PAGE_FLAG,
            data: if e & ZERO_PAGE_FLAG != 0 {
                None
            } else {
                // decode() checked there is exactly one chunk per non-zero entry.
                data.next()
            },
        })
    }
}

/// Builds `Pages` payloads in a reusable page-aligned buffer.
///
/// ```
/// use vmotion_proto::message::pages::{PagesBuilder, PagesView};
/// let mut b = PagesBuilder::new(4096, 64 * 1024);
/// assert!(b.push(7, &[1u8; 4096]));
/// assert!(b.push(8, &[0u8; 4096])); // travels as a flag, not 4 KiB of zeros
/// let payload = b.finish();
/// assert_eq!(payload.len(), 4096 + 2 * 8 + 8);
/// let view = PagesView::decode(payload).unwrap();
/// assert_eq!(view.len(), 2);
/// assert_eq!(view.data_pages(), 1);
/// ```
pub struct PagesBuilder {
    buf: AlignedBuf,
    entries: Vec<u64>,
    page_size: usize,
    shift: u8,
    data_pages: usize,
    /// `finish` left the last payload in `buf`; the next push starts a new batch.
    finished: bool,
}

impl std::fmt::Debug for PagesBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagesBuilder")
            .field("pages", &self.entries.len())
            .field("data_pages", &self.data_pages)
            .finish_non_exhaustive()
    }
}

impl PagesBuilder {
    /// A builder for payloads of at most `max_payload` bytes of `page_size` pages.
    /// Panics if `page_size` is not a power of two between 4 KiB and 64 KiB, or if not
    /// even one page fits: both are configuration bugs, checked by the handshake first.
    pub fn new(page_size: usize, max_payload: usize) -> Self {
        assert!(
            page_size.is_power_of_two(),
            "page size must be a power of two"
        );
        let shift = u8::try_from(page_size.trailing_zeros()).expect("small");
        assert!(
            (MIN_PAGE_SHIFT..=MAX_PAGE_SHIFT).contains(&shift),
            "page size out of range"
        );
        assert!(
            max_payload >= page_size + 8 + PAGES_TRAILER_LEN,
            "max payload below one page"
        );
        Self {
            buf: AlignedBuf::page_aligned(max_payload),
            entries: Vec::with_capacity(max_payload / page_size * 2),
            page_size,
            shift,
            data_pages: 0,
            finished: false,
        }
    }

    fn size_with(&self, data_pages: usize, entries: usize) -> usize {
        data_pages * self.page_size + entries * 8 + PAGES_TRAILER_LEN
    }

    /// Adds a page; an all-zero page becomes a flag. Returns `false` (adding nothing) if
    /// the batch is full. Panics if `page` is not exactly one page long or `index` uses
    /// the flag bit (caller bugs).
    pub fn push(&mut self, index: u64, page: &[u8]) -> bool {
        if is_zero(page) {
            assert_eq!(page.len(), self.page_size, "push takes exactly one page");
            return self.push_zero(index);
        }
        self.push_data(index, page)
    }

    /// Adds a page with its data, without checking for zeros. Returns `false` if the batch
    /// is full. Panics on a wrong page length or an index using the flag bit.
    pub fn push_data(&mut self, index: u64, page: &[u8]) -> bool {
        assert_eq!(page.len(), self.page_size, "push takes exactly one page");
        assert_eq!(index & ZERO_PAGE_FLAG, 0, "page index too large");
        self.start_batch();
        if self.size_with(self.data_pages + 1, self.entries.len() + 1) > self.buf.capacity() {
            return false;
        }
        let ok = self.buf.extend_from_slice(page);
        debug_assert!(ok);
        self.data_pages += 1;
        self.entries.push(index);
        true
    }

    /// Adds a page by letting `fill` write it straight into the batch (no intermediate
    /// copy); an all-zero result becomes a flag. Returns `Ok(false)` (calling nothing) if
    /// the batch is full, and `fill`'s error (adding nothing) if it fails.
    pub fn push_with<E>(
        &mut self,
        index: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<bool, E> {
        assert_eq!(index & ZERO_PAGE_FLAG, 0, "page index too large");
        self.start_batch();
        if self.size_with(self.data_pages + 1, self.entries.len() + 1) > self.buf.capacity() {
            return Ok(false);
        }
        let at = self.buf.len();
        let page = &mut self.buf.resize(at + self.page_size)[at..];
        if let Err(e) = fill(page) {
            self.buf.resize(at);
            return Err(e);
        }
        if is_zero(page) {
            self.buf.resize(at);
            self.entries.push(index | ZERO_PAGE_FLAG);
        } else {
            self.data_pages += 1;
            self.entries.push(index);
        }
        Ok(true)
    }

    /// Adds a zero page (no data). Returns `false` if the batch is full.
    pub fn push_zero(&mut self, index: u64) -> bool {
        assert_eq!(index & ZERO_PAGE_FLAG, 0, "page index too large");
        self.start_batch();
        if self.size_with(self.data_pages, self.entries.len() + 1) > self.buf.capacity() {
            return false;
        }
        self.entries.push(index | ZERO_PAGE_FLAG);
        true
    }

    fn start_batch(&mut self) {
        if self.finished {
            self.buf.clear();
            self.finished = false;
        }
    }

    /// Number of pages in the batch.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends the index list and trailer and returns the payload, ready to be sealed in
    /// place. The builder is then cleared for the next batch.
    pub fn finish(&mut self) -> &mut [u8] {
        self.start_batch();
        let n = u32::try_from(self.entries.len()).expect("bounded by max payload");
        for e in &self.entries {
            self.buf.extend_from_slice(&e.to_be_bytes());
        }
        self.buf.extend_from_slice(&n.to_be_bytes());
        self.buf.extend_from_slice(&[self.shift, 0, 0, 0]);
        self.entries.clear();
        self.data_pages = 0;
        self.finished = true;
        self.buf.as_mut_slice()
    }

    /// Drops the pages pushed so far.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.data_pages = 0;
        self.finished = false;
        self.buf.clear();
    }
}

/// Whether a page is all zeros, a machine word at a time.
pub fn is_zero(page: &[u8]) -> bool {
    let (chunks, rest) = page.as_chunks::<8>();
    chunks.iter().all(|c| u64::from_ne_bytes(*c) == 0) && rest.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_with_fills_in_place_and_flags_zero_pages() {
        let mut b = PagesBuilder::new(4096, 3 * 4096 + 3 * 8 + PAGES_TRAILER_LEN);
        assert_eq!(
            b.push_with(1, |p| {
                p.fill(7);
                Ok::<_, ()>(())
            }),
            Ok(true)
        );
        assert_eq!(
            b.push_with(2, |p| {
                p.fill(0);
                Ok::<_, ()>(())
            }),
            Ok(true)
        );
        assert_eq!(b.push_with(3, |_| Err("read failed")), Err("read failed"));
        assert_eq!(
            b.push_with(4, |p| {
                p.fill(9);
                Ok::<_, ()>(())
            }),
            Ok(true)
        );
        let v = PagesView::decode(b.finish()).unwrap();
        let got: Vec<_> = v.iter().map(|e| (e.index, e.data.map(|d| d[0]))).collect();
        assert_eq!(got, [(1, Some(7)), (2, None), (4, Some(9))]);
    }
}
