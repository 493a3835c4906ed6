//! Where migration connections go: TCP between hosts, or a Unix socket for migrations on
//! one host (no TCP stack, file permissions decide who may connect). Frames and
//! protocol are the same on both.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream, tcp, unix};

/// A destination: `HOST:PORT` (or QEMU's `tcp:HOST:PORT`) for TCP, or `unix:PATH` for a
/// Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix stream socket's path.
    Unix(PathBuf),
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Self::Tcp(a)
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    /// `unix:/run/vmotion.sock` or `10.0.0.2:8000` / `[::1]:8000`; a `tcp:` prefix (as in
    /// QEMU's migration URIs) is accepted.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.strip_prefix("tcp:").unwrap_or(s);
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a socket path after it".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse().map(Self::Tcp).map_err(|_| {
            format!("`{s}` is neither HOST:PORT (an IP address and port) nor unix:PATH")
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Who connected, for log lines: a TCP peer's address, or the Unix socket's path.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A local peer on a Unix socket (they have no address of their own).
    Unix,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix => f.write_str("unix peer"),
        }
    }
}

/// One migration connection.
#[derive(Debug)]
pub enum Conn {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
}

impl Conn {
    /// The two halves, each owned (no lock between them, as with `TcpStream`).
    pub(crate) fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Self::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Self::Unix(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Unix(r), WriteHalf::Unix(w))
            }
        }
    }
}

/// Listens for migrations: implemented by `TcpListener`, `UnixListener` and [`Listener`].
pub trait Accept: Send + Sync {
    /// The next connection.
    fn accept_conn(&self) -> impl Future<Output = io::Result<(Conn, Peer)>> + Send;
}

/// Data sent and not acknowledged for this long fails the connection (`TCP_USER_TIMEOUT`).
pub(crate) const TCP_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Keepalive probes on a migration's TCP connection (10 s idle, then 3 probes 5 s
/// apart), `TCP_USER_TIMEOUT` (30 s) and at most 4 MiB queued unsent
/// (`TCP_NOTSENT_LOWAT`). A peer host that vanishes without a word, or a path that
/// black-holes, ends the migration within about half a minute on both ends — the sender's
/// unacknowledged writes and the receiver's unanswered probes both time out — instead of
/// leaving either end waiting for ever.
pub(crate) fn keepalive(s: &TcpStream) {
    let probes = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(10))
        .with_interval(std::time::Duration::from_secs(5))
        .with_retries(3);
    let sock = socket2::SockRef::from(s);
    let _ = sock.set_tcp_keepalive(&probes);
    let _ = sock.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
    // A bounded unsent tail: what the engine counts as sent is on its way, and at the
    // pause the last pages do not wait behind megabytes queued in the kernel
    // (`vmotion_tcp`).
    let _ = vmotion_tcp::set_notsent_lowat(s, vmotion_tcp::NOTSENT_LOWAT);
}

impl Accept for TcpListener {
    async fn accept_conn(&self) -> io::Result<(Conn, Peer)> {
        let (s, peer) = self.accept().await?;
        // Frames are written whole; small control frames must not wait for Nagle.
        let _ = s.set_nodelay(true);
        keepalive(&s);
        Ok((Conn::Tcp(s), Peer::Tcp(peer)))
    }
}

impl Accept for UnixListener {
    async fn accept_conn(&self) -> io::Result<(Conn, Peer)> {
        let (s, _) = self.accept().await?;
        Ok((Conn::Unix(s), Peer::Unix))
    }
}

/// A TCP or Unix listener, chosen at run time (from an [`Endpoint`]).
#[derive(Debug)]
pub enum Listener {
    /// Listening on TCP.
    Tcp(TcpListener),
    /// Listening on a Unix socket; the path is removed again when this is dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `endpoint`. For a Unix socket, a stale socket file left by an earlier
    /// process is replaced, but any other file at the path is an error (never deleted).
    pub async fn bind(endpoint: &Endpoint) -> io::Result<Self> {
        match endpoint {
            Endpoint::Tcp(a) => Ok(Self::Tcp(TcpListener::bind(a).await?)),
            Endpoint::Unix(path) => {
                remove_stale_socket(path)?;
                Ok(Self::Unix(UnixListener::bind(path)?, path.clone()))
            }
        }
    }

    /// Where this listens (with the port the system chose, for TCP port 0).
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        match self {
            Self::Tcp(l) => Ok(Endpoint::Tcp(l.local_addr()?)),
            Self::Unix(_, p) => Ok(Endpoint::Unix(p.clone())),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Accept for Listener {
    async fn accept_conn(&self) -> io::Result<(Conn, Peer)> {
        match self {
            Self::Tcp(l) => l.accept_conn().await,
            Self::Unix(l, _) => l.accept_conn().await,
        }
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A live listener answers; only a dead one's file is removed.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by another receiver", path.display()),
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The read half of a [`Conn`].
#[derive(Debug)]
pub(crate) enum ReadHalf {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
}

/// The write half of a [`Conn`].
#[derive(Debug)]
pub(crate) enum WriteHalf {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
}

macro_rules! delegate_read {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

macro_rules! delegate_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    Self::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    Self::Tcp(s) => s.is_write_vectored(),
                    Self::Unix(s) => s.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_flush(cx),
                    Self::Unix(s) => Pin::new(s).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

delegate_read!(Conn);
delegate_read!(ReadHalf);
delegate_write!(Conn);
delegate_write!(WriteHalf);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print_back() {
        for s in ["127.0.0.1:8000", "[::1]:9", "unix:/run/vmotion/recv.sock"] {
            let e: Endpoint = s.parse().unwrap();
            assert_eq!(e.to_string(), s);
        }
        assert!(matches!("unix:/x".parse(), Ok(Endpoint::Unix(_))));
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Endpoint>().unwrap(),
            "127.0.0.1:4444".parse::<Endpoint>().unwrap()
        );
        for bad in ["unix:", "localhost:80", "10.0.0.1", "/run/x.sock", ""] {
            let e = bad.parse::<Endpoint>().unwrap_err();
            assert!(e.contains("unix:") || e.contains("path"), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn a_regular_file_is_never_replaced_by_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, b"precious").unwrap();
        let err = Listener::bind(&Endpoint::Unix(path.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[tokio::test]
    async fn a_live_socket_is_not_stolen_but_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recv.sock");
        let ep = Endpoint::Unix(path.clone());
        let first = Listener::bind(&ep).await.unwrap();
        let err = Listener::bind(&ep).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(first);
        // A crashed receiver leaves its socket file behind, with nobody listening.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a closed listener leaves its file");
        let second = Listener::bind(&ep).await.unwrap();
        assert_eq!(second.local_endpoint().unwrap(), ep);
        drop(second);
        assert!(!path.exists(), "the socket file is removed on drop");
    }
}
