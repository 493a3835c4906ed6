//! Setting a migration up at the source, for a guest ([`crate::Sender`]) or a tunnel
//! ([`crate::TunnelSender`]): the key (and the arbiter) from its [`KeySource`],
//! connections as [`NetOptions`] say, and the handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use vmotion_authority::{Arbiter, Authority};
use vmotion_proto::{
    DestinationCapability, ExpectHelloAck, KeyMaterial, MigrationId, SenderNext, SenderSession,
    WireFrame,
};

use crate::error::MigrateError;
use crate::transport::{Conn, Endpoint};
use crate::wire::{read_frame, write_frame};

/// Where the migration key comes from.
pub enum KeySource {
    /// The key authority creates the migration (id, key, nonce), says whether the
    /// destination can encrypt, and is the arbiter of the switchover.
    Service {
        /// This host's client of the authority: the key service's
        /// (`vmotion_keyservice_client::KeyServiceClient`, with this host's certificate)
        /// or a [`MemoryClient`](crate::MemoryClient).
        client: Arc<dyn Authority>,
        /// The destination host's identity at the key service.
        destination: String,
    },
    /// An orchestrator handed the key in, vouching that the destination holds it too.
    Direct {
        /// The migration id both ends use.
        migration_id: MigrationId,
        /// The key.
        material: KeyMaterial,
    },
    /// No key: the migration can only be plaintext (the policy must allow it).
    None {
        /// The migration id both ends use.
        migration_id: MigrationId,
    },
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Service { destination, .. } => write!(f, "KeySource::Service({destination})"),
            Self::Direct { migration_id, .. } => write!(f, "KeySource::Direct({migration_id})"),
            Self::None { migration_id } => write!(f, "KeySource::None({migration_id})"),
        }
    }
}

/// How the sender's connections go out: from which local address, with which DSCP mark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetOptions {
    /// Local address to send from (a dedicated migration network's address).
    pub bind: Option<std::net::IpAddr>,
    /// DSCP code point (0 to 63) marked on every migration packet, so the network can
    /// give migration traffic its own class (e.g. 10 = AF11, 46 = EF).
    pub dscp: Option<u8>,
}

/// Connecting and each handshake read must finish within this.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `endpoint` as `net` says. A Unix socket has no local address or DSCP
/// mark: asking for either with one is an error, not silently ignored.
pub(crate) async fn connect(endpoint: &Endpoint, net: NetOptions) -> std::io::Result<Conn> {
    match endpoint {
        Endpoint::Tcp(addr) => connect_tcp(*addr, net).await.map(Conn::Tcp),
        Endpoint::Unix(path) => {
            if net.bind.is_some() || net.dscp.is_some() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a bind address or DSCP mark applies to TCP, not to a Unix socket",
                ));
            }
            tokio::net::UnixStream::connect(path).await.map(Conn::Unix)
        }
    }
}

/// Connects within [`HANDSHAKE_TIMEOUT`].
pub(crate) async fn connect_within(
    endpoint: &Endpoint,
    net: NetOptions,
    what: &'static str,
) -> Result<Conn, MigrateError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(endpoint, net)).await {
        Ok(c) => Ok(c?),
        Err(_) => Err(MigrateError::Timeout {
            waiting_for: what,
            after: HANDSHAKE_TIMEOUT,
        }),
    }
}

async fn connect_tcp(addr: SocketAddr, net: NetOptions) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(dscp) = net.dscp {
        let tos = u32::from(dscp.min(63)) << 2;
        match addr {
            SocketAddr::V4(_) => socket.set_tos_v4(tos)?,
            SocketAddr::V6(_) => socket.set_tclass_v6(tos)?,
        }
    }
    if let Some(ip) = net.bind {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let tcp = socket.connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    crate::transport::keepalive(&tcp);
    Ok(tcp)
}

/// What a [`KeySource`] yields: the migration id, the key, the authority's word on the
/// destination, and the arbiter to record the switchover with.
pub(crate) struct Keyed {
    pub(crate) id: MigrationId,
    pub(crate) material: Option<KeyMaterial>,
    pub(crate) destination: DestinationCapability,
    pub(crate) arbiter: Option<Arc<dyn Arbiter>>,
}

/// Resolves `key`; `arbiter` is the builder's (used unless the key authority is the
/// arbiter).
pub(crate) async fn resolve_key(
    key: KeySource,
    vm_name: &str,
    arbiter: Option<Arc<dyn Arbiter>>,
) -> Result<Keyed, MigrateError> {
    Ok(match key {
        KeySource::Service {
            client,
            destination,
        } => {
            let issued = client.create_migration(vm_name, &destination).await?;
            Keyed {
                id: issued.id,
                destination: issued.destination,
                material: Some(issued.material),
                arbiter: Some(client),
            }
        }
        KeySource::Direct {
            migration_id,
            material,
        } => Keyed {
            id: migration_id,
            material: Some(material),
            destination: DestinationCapability::Encrypts,
            arbiter,
        },
        KeySource::None { migration_id } => Keyed {
            id: migration_id,
            material: None,
            destination: DestinationCapability::DoesNotEncrypt,
            arbiter,
        },
    })
}

/// Reads one handshake frame within [`HANDSHAKE_TIMEOUT`].
async fn handshake_frame(conn: &mut Conn) -> Result<WireFrame, MigrateError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(conn, 4096))
        .await
        .map_err(|_| MigrateError::Timeout {
            waiting_for: "the receiver's answer to the handshake",
            after: HANDSHAKE_TIMEOUT,
        })??
        .ok_or(MigrateError::ConnectionClosed {
            during: "the handshake",
        })
}

/// The handshake on a fresh control connection.
pub(crate) async fn handshake(
    to: &Endpoint,
    net: NetOptions,
    expect_ack: ExpectHelloAck,
    hello: WireFrame,
) -> Result<(SenderSession, Conn), MigrateError> {
    let mut conn = connect_within(to, net, "the connection to the receiver").await?;
    write_frame(&mut conn, &hello).await?;
    let ack = handshake_frame(&mut conn).await?;
    let next = match expect_ack.handle(ack) {
        Ok(n) => n,
        Err(f) => {
            if let Some(abort) = &f.abort {
                let _ = write_frame(&mut conn, abort).await;
            }
            return Err(f.into());
        }
    };
    match next {
        SenderNext::Established(s) => Ok((s, conn)),
        SenderNext::ExpectKeyConfirm(state) => {
            let kc = handshake_frame(&mut conn).await?;
            match state.handle(kc) {
                Ok((s, my_kc)) => {
                    write_frame(&mut conn, &my_kc).await?;
                    Ok((s, conn))
                }
                Err(f) => {
                    if let Some(abort) = &f.abort {
                        let _ = write_frame(&mut conn, abort).await;
                    }
                    Err(f.into())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connection leaves from the bound address with the DSCP mark in its TOS byte,
    /// and both ends probe a silent peer.
    #[tokio::test]
    async fn connections_carry_the_bind_address_and_dscp() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let net = NetOptions {
            bind: Some("127.0.0.2".parse().unwrap()),
            dscp: Some(46),
        };
        let tcp = connect_tcp(addr, net).await.unwrap();
        assert_eq!(tcp.local_addr().unwrap().ip(), net.bind.unwrap());
        let (accepted, peer) = crate::Accept::accept_conn(&listener).await.unwrap();
        let crate::Peer::Tcp(peer) = peer else {
            panic!("a TCP peer")
        };
        assert_eq!(
            peer.ip(),
            net.bind.unwrap(),
            "the receiver sees the migration address"
        );
        let Conn::Tcp(accepted) = accepted else {
            panic!("a TCP connection")
        };
        for s in [&tcp, &accepted] {
            let s = socket2::SockRef::from(s);
            assert!(s.keepalive().unwrap(), "keepalive on");
            assert_eq!(
                s.tcp_keepalive_time().unwrap(),
                Duration::from_secs(10),
                "first probe after 10 s idle"
            );
            assert_eq!(
                s.tcp_user_timeout().unwrap(),
                Some(Duration::from_secs(30)),
                "unacknowledged data fails the connection after 30 s"
            );
        }
        let tos = tokio::net::TcpSocket::from_std_stream(tcp.into_std().unwrap())
            .tos_v4()
            .unwrap();
        assert_eq!(tos, 46 << 2, "EF marked");
    }
}
