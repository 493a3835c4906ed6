//! Frames over async byte streams: the header first (24 bytes, its length checked before
//! anything is allocated), then payload and trailer into a page-aligned buffer.

use std::io::IoSlice;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use vmotion_proto::{AlignedBuf, HEADER_LEN, Header, Opener, TRAILER_LEN, WireFrame};

use crate::error::MigrateError;

/// Writes header, payload and trailer with as few system calls as the socket allows.
pub(crate) async fn write_parts<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &[u8; HEADER_LEN],
    payload: &[u8],
    trailer: &[u8; TRAILER_LEN],
) -> std::io::Result<()> {
    let mut bufs = [
        IoSlice::new(header),
        IoSlice::new(payload),
        IoSlice::new(trailer),
    ];
    let mut slices: &mut [IoSlice<'_>] = &mut bufs;
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// Writes a whole frame.
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    f: &WireFrame,
) -> std::io::Result<()> {
    write_parts(w, &f.header, &f.payload, &f.trailer).await
}

/// Reads a header. `false` on a clean end of stream (no byte of a header read); an end in
/// the middle of a header is an error, not a clean end.
async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    header: &mut [u8; HEADER_LEN],
) -> Result<bool, MigrateError> {
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(MigrateError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        got += n;
    }
    Ok(true)
}

/// Reads one frame's bytes (unopened), its payload bounded by `max_payload`. `Ok(None)`
/// on a clean end of stream before a header.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_payload: u32,
) -> Result<Option<WireFrame>, MigrateError> {
    let mut header = [0u8; HEADER_LEN];
    if !read_header(r, &mut header).await? {
        return Ok(None);
    }
    let h = Header::decode(&header, max_payload)?;
    let mut payload = vec![0u8; h.payload_len as usize];
    r.read_exact(&mut payload).await?;
    let mut trailer = [0u8; TRAILER_LEN];
    r.read_exact(&mut trailer).await?;
    Ok(Some(WireFrame {
        header,
        payload,
        trailer,
    }))
}

/// Reads and opens one data-path frame into `buf` (page-aligned, reused). Returns the
/// header, or `None` on a clean end of stream before a header.
pub(crate) async fn read_open<R: AsyncRead + Unpin>(
    r: &mut R,
    opener: &mut Opener,
    buf: &mut AlignedBuf,
) -> Result<Option<Header>, MigrateError> {
    let mut header = [0u8; HEADER_LEN];
    if !read_header(r, &mut header).await? {
        return Ok(None);
    }
    let h = opener.decode_header(&header)?;
    let payload = buf.resize(h.payload_len as usize);
    r.read_exact(payload).await?;
    let mut trailer = [0u8; TRAILER_LEN];
    r.read_exact(&mut trailer).await?;
    let h = opener.open_in_place(&header, buf.as_mut_slice(), &trailer)?;
    Ok(Some(h))
}
