//! Page-aligned byte buffers, in safe code.
//!
//! glibc's `memcpy` runs at a tenth of its speed when source and destination differ by a
//! small non-zero amount modulo 4096 (DESIGN.md §7), and a large `Vec<u8>` from malloc
//! starts 16 bytes past a page boundary. Guest pages are page-aligned, so every buffer that
//! holds page data starts its payload on a page boundary: [`AlignedBuf`] over-allocates by
//! one alignment unit and starts at the first aligned byte. It never reallocates, so the
//! alignment holds for its whole life.

/// A fixed-capacity byte buffer whose first byte is aligned to `align`.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
    capacity: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Contents may be guest memory: show the shape only.
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl AlignedBuf {
    /// The alignment of buffers that hold page data.
    pub const PAGE_ALIGN: usize = 4096;

    /// A zeroed buffer of `capacity` bytes (length 0) starting on an `align` boundary.
    /// `align` must be a power of two.
    pub fn new(capacity: usize, align: usize) -> Self {
        assert!(align.is_power_of_two(), "alignment must be a power of two");
        let storage = vec![0u8; capacity + align];
        // Only the address is used, to find the first aligned byte; no pointer is formed.
        let addr = storage.as_ptr() as usize;
        let start = addr.wrapping_neg() & (align - 1);
        Self {
            storage,
            start,
            len: 0,
            capacity,
        }
    }

    /// A page-aligned buffer.
    pub fn page_aligned(capacity: usize) -> Self {
        Self::new(capacity, Self::PAGE_ALIGN)
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The bytes in use, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    /// Current length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fixed capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets the length (new bytes keep whatever they held) and returns the bytes in use.
    /// Panics if `len` exceeds the capacity: that is a caller bug, never peer input
    /// (callers check peer lengths against the capacity first).
    pub fn resize(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.capacity, "AlignedBuf::resize past capacity");
        self.len = len;
        self.as_mut_slice()
    }

    /// Appends bytes; returns `false` (and appends nothing) if they do not fit.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) -> bool {
        let Some(end) = self
            .len
            .checked_add(bytes.len())
            .filter(|e| *e <= self.capacity)
        else {
            return false;
        };
        let at = self.start + self.len;
        self.storage[at..at + bytes.len()].copy_from_slice(bytes);
        self.len = end;
        true
    }

    /// Empties the buffer (capacity and alignment stay).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_is_aligned_and_capacity_holds() {
        for cap in [0usize, 1, 4096, 300_000] {
            let mut b = AlignedBuf::page_aligned(cap);
            assert_eq!(b.as_slice().as_ptr() as usize % 4096, 0);
            assert!(b.extend_from_slice(&vec![1; cap]));
            assert!(!b.extend_from_slice(&[1]));
            assert_eq!(b.len(), cap);
            b.clear();
            assert!(b.is_empty());
            assert_eq!(b.resize(cap).len(), cap);
        }
    }
}
