//! Bounds-checked big-endian reading and writing of payload fields.

use crate::error::PeerMisbehaved;
use crate::frame::FrameType;

/// Reads fields off a payload; every read checks the remaining length first.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    frame_type: FrameType,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], frame_type: FrameType) -> Self {
        Self { buf, frame_type }
    }

    pub(crate) fn malformed(&self, reason: &'static str) -> PeerMisbehaved {
        PeerMisbehaved::MalformedPayload {
            frame_type: self.frame_type,
            reason,
        }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], PeerMisbehaved> {
        if self.buf.len() < n {
            return Err(self.malformed("payload too short"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], PeerMisbehaved> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, PeerMisbehaved> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, PeerMisbehaved> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, PeerMisbehaved> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, PeerMisbehaved> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn bool(&mut self) -> Result<bool, PeerMisbehaved> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.malformed("boolean is neither 0 nor 1")),
        }
    }

    pub(crate) fn zeros(&mut self, n: usize) -> Result<(), PeerMisbehaved> {
        if self.bytes(n)?.iter().any(|b| *b != 0) {
            return Err(self.malformed("reserved bytes are not zero"));
        }
        Ok(())
    }

    /// A UTF-8 string prefixed by a u16 length, at most `max` bytes.
    pub(crate) fn string(&mut self, max: usize) -> Result<&'a str, PeerMisbehaved> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(self.malformed("string longer than allowed"));
        }
        std::str::from_utf8(self.bytes(len)?).map_err(|_| self.malformed("string is not UTF-8"))
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn finish(self) -> Result<(), PeerMisbehaved> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes after payload"))
        }
    }
}

/// Appends big-endian fields to a payload buffer.
pub(crate) struct Writer<'a>(pub(crate) &'a mut Vec<u8>);

impl Writer<'_> {
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.bytes(&v.to_be_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.bytes(&v.to_be_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.bytes(&v.to_be_bytes());
    }
    pub(crate) fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    pub(crate) fn zeros(&mut self, n: usize) {
        self.0.resize(self.0.len() + n, 0);
    }
    /// Writes a u16-length-prefixed string; the caller has checked its length.
    pub(crate) fn string(&mut self, s: &str) {
        let len = u16::try_from(s.len()).expect("caller checked the string length");
        self.u16(len);
        self.bytes(s.as_bytes());
    }
}
