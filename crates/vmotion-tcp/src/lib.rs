//! # vmotion-tcp: the TCP socket option std, tokio and socket2 lack
//!
//! `TCP_NOTSENT_LOWAT` bounds how much written but not yet sent data a TCP socket
//! queues. Without it a sender with autotuned send buffers (up to `tcp_wmem`'s maximum,
//! 4 MiB by default and 64 MiB on a tuned WAN host) can queue hundreds of megabytes that
//! it believes sent: the pre-copy engine then measures the speed of its writes, not of the
//! link, and at the pause the last pages wait behind everything queued before them. On
//! an emulated 150 ms link with 8 streams that was 2.9-4.2 s of downtime instead of
//! 0.5-1.0 s (docs/performance.md). The window in flight is untouched: only the unsent
//! tail is bounded.
//!
//! The one `unsafe` call of this crate is the `setsockopt(2)` / `getsockopt(2)` pair,
//! on a descriptor borrowed for the call.

#![deny(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// How much unsent data vmotion lets each of its TCP sockets queue: enough to keep a
/// 1 Gbit/s × 150 ms path busy between two wake-ups of the writer, small next to the
/// megabytes per second a migration moves.
pub const NOTSENT_LOWAT: u32 = 4 << 20;

/// Sets `TCP_NOTSENT_LOWAT` on a TCP socket.
pub fn set_notsent_lowat(socket: &impl AsFd, bytes: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let fd = socket.as_fd().as_raw_fd();
    #[allow(unsafe_code)]
    // SAFETY: `fd` is an open descriptor borrowed from `socket` for the whole call; the
    // option value points to a `c_int` that outlives the call, and its length is given.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            std::ptr::from_ref(&value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads `TCP_NOTSENT_LOWAT` back (the kernel's default is `u32::MAX`: no bound).
pub fn notsent_lowat(socket: &impl AsFd) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    let fd = socket.as_fd().as_raw_fd();
    #[allow(unsafe_code)]
    // SAFETY: as for `set_notsent_lowat`; `value` and `len` are live, writable and sized
    // as `len` says.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    if r == 0 {
        // The kernel stores an unsigned value; -1 reads back as "no bound".
        Ok(value as u32)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn the_bound_is_set_and_reads_back() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        set_notsent_lowat(&s, NOTSENT_LOWAT).unwrap();
        assert_eq!(notsent_lowat(&s).unwrap(), NOTSENT_LOWAT);
        set_notsent_lowat(&s, 128 << 10).unwrap();
        assert_eq!(notsent_lowat(&s).unwrap(), 128 << 10);
        // The socket still carries bytes.
        let (mut peer, _) = l.accept().unwrap();
        (&s).write_all(b"page").unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"page");
    }

    #[test]
    fn a_descriptor_that_is_no_tcp_socket_is_an_error_not_a_crash() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(set_notsent_lowat(&f, NOTSENT_LOWAT).is_err());
        assert!(notsent_lowat(&f).is_err());
    }
}
