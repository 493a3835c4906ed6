//! Setting a migration up at the source, for a guest ([`crate::Sender`]) or a tunnel
//! ([`crate::TunnelSender`]): the key (and the arbiter) from its [`KeySource`],
//! connections as [`NetOptions`] say, and the handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use vmotion_authority::{Arbiter, Authority, AuthorityError, CreateOptions, IssuedKey};
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

/// How long a source waits for an admission slot at the key authority by default: 10
/// minutes, enough for a few migrations ahead of it to finish.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(600);

/// The authority's `retry_after` is kept within these bounds: never a busy loop, never a
/// wait so long that a freed slot goes unnoticed for long.
const RETRY_AFTER_MIN: Duration = Duration::from_millis(50);
const RETRY_AFTER_MAX: Duration = Duration::from_secs(5);
/// The wait when the authority named none.
const RETRY_AFTER_DEFAULT: Duration = Duration::from_secs(1);
/// While queued, the caller hears how long it has waited at least this often.
const QUEUED_REPORT: Duration = Duration::from_secs(1);

/// How a source asks the key authority for its migration: how long it waits for an
/// admission slot, and whether its own stale migration of the VM may be aborted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Admission {
    pub(crate) queue_timeout: Duration,
    pub(crate) abort_stale: bool,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            abort_stale: false,
        }
    }
}

/// A callback told how long the source has waited for admission.
#[derive(Clone)]
pub(crate) struct QueuedFn(pub(crate) Arc<dyn Fn(Duration) + Send + Sync>);

impl std::fmt::Debug for QueuedFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueuedFn")
    }
}

/// Creates the migration, waiting its turn while the authority answers
/// [`AuthorityError::Busy`]: asks again after the authority's `retry_after` (within
/// [`RETRY_AFTER_MIN`]..[`RETRY_AFTER_MAX`]) until `admission.queue_timeout` has passed,
/// calling `queued` with the time waited at least every [`QUEUED_REPORT`]. A busy answer
/// created nothing, so each ask is a new create.
async fn create_admitted(
    client: &dyn Authority,
    vm_name: &str,
    destination: &str,
    admission: Admission,
    queued: &(dyn Fn(Duration) + Send + Sync),
) -> Result<IssuedKey, MigrateError> {
    let options = CreateOptions::default().abort_stale(admission.abort_stale);
    let started = Instant::now();
    let deadline = started + admission.queue_timeout;
    loop {
        let (message, retry_after) = match client
            .create_migration_with(vm_name, destination, options)
            .await
        {
            Err(AuthorityError::Busy {
                message,
                retry_after,
            }) => (message, retry_after),
            other => return Ok(other?),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(MigrateError::QueueTimeout {
                waited: now - started,
                limit: admission.queue_timeout,
                message,
            });
        }
        let pause = retry_after
            .unwrap_or(RETRY_AFTER_DEFAULT)
            .clamp(RETRY_AFTER_MIN, RETRY_AFTER_MAX);
        let until = (now + pause).min(deadline);
        tracing::debug!(%message, ?pause, "the key authority is busy; waiting for a slot");
        loop {
            queued(started.elapsed());
            let now = Instant::now();
            if now >= until {
                break;
            }
            tokio::time::sleep((until - now).min(QUEUED_REPORT)).await;
        }
    }
}

/// Resolves `key`; `arbiter` is the builder's (used unless the key authority is the
/// arbiter). With a key authority, the create waits for admission as `admission` says,
/// reporting the wait to `queued`.
pub(crate) async fn resolve_key(
    key: KeySource,
    vm_name: &str,
    arbiter: Option<Arc<dyn Arbiter>>,
    admission: Admission,
    queued: &(dyn Fn(Duration) + Send + Sync),
) -> Result<Keyed, MigrateError> {
    Ok(match key {
        KeySource::Service {
            client,
            destination,
        } => {
            let issued =
                create_admitted(&*client, vm_name, &destination, admission, queued).await?;
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
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use vmotion_authority::{
        ArbiterError, BoxFuture, FetchedKey, KeyAuthority, MemoryAuthority, MemoryClient, Record,
        Transition,
    };

    use super::*;

    /// An authority whose creates answer from a script (`None`: the memory authority
    /// takes it), recording the options each create was asked with.
    struct Scripted {
        inner: Arc<MemoryClient>,
        script: Mutex<VecDeque<Option<AuthorityError>>>,
        asked: Mutex<Vec<CreateOptions>>,
    }

    impl Scripted {
        fn new(script: impl IntoIterator<Item = Option<AuthorityError>>) -> Self {
            let authority = MemoryAuthority::new();
            authority.register("dst", true);
            Self {
                inner: authority.client("src"),
                script: Mutex::new(script.into_iter().collect()),
                asked: Mutex::new(Vec::new()),
            }
        }

        fn asked(&self) -> Vec<CreateOptions> {
            self.asked.lock().unwrap().clone()
        }
    }

    impl KeyAuthority for Scripted {
        fn create_migration_with<'a>(
            &'a self,
            vm: &'a str,
            destination: &'a str,
            options: CreateOptions,
        ) -> BoxFuture<'a, Result<IssuedKey, AuthorityError>> {
            self.asked.lock().unwrap().push(options);
            let next = self.script.lock().unwrap().pop_front().flatten();
            match next {
                Some(e) => Box::pin(async move { Err(e) }),
                None => self.inner.create_migration_with(vm, destination, options),
            }
        }

        fn fetch_key(&self, id: MigrationId) -> BoxFuture<'_, Result<FetchedKey, AuthorityError>> {
            self.inner.fetch_key(id)
        }
    }

    impl Arbiter for Scripted {
        fn read(&self, id: MigrationId) -> BoxFuture<'_, Result<Record, ArbiterError>> {
            self.inner.read(id)
        }

        fn ask(
            &self,
            id: MigrationId,
            t: Transition,
        ) -> BoxFuture<'_, Result<Record, ArbiterError>> {
            self.inner.ask(id, t)
        }
    }

    fn busy(retry_after_ms: Option<u64>) -> Option<AuthorityError> {
        Some(AuthorityError::Busy {
            message: "2 migrations in flight to dst (its limit)".into(),
            retry_after: retry_after_ms.map(Duration::from_millis),
        })
    }

    fn admission(queue_timeout_ms: u64) -> Admission {
        Admission {
            queue_timeout: Duration::from_millis(queue_timeout_ms),
            abort_stale: false,
        }
    }

    /// Runs `create_admitted` on `a`; returns its result, how long it took and the waits
    /// reported while queued.
    async fn admit(
        a: &Scripted,
        admission: Admission,
    ) -> (Result<IssuedKey, MigrateError>, Duration, Vec<Duration>) {
        let reports = Arc::new(Mutex::new(Vec::new()));
        let seen = reports.clone();
        let queued = move |waited| seen.lock().unwrap().push(waited);
        let started = Instant::now();
        let r = create_admitted(a, "vm-1", "dst", admission, &queued).await;
        let reports = reports.lock().unwrap().clone();
        (r, started.elapsed(), reports)
    }

    /// Busy twice, then admitted: the create is asked again after the authority's
    /// `retry_after`, raised to the 50 ms floor, and the wait is reported meanwhile.
    #[tokio::test]
    async fn a_busy_authority_is_asked_again_after_its_retry_after() {
        let a = Scripted::new([busy(Some(1)), busy(Some(1)), None]);
        let (r, took, reports) = admit(&a, admission(5_000)).await;
        assert!(r.is_ok(), "{:?}", r.err());
        assert_eq!(a.asked().len(), 3);
        assert!(
            took >= 2 * RETRY_AFTER_MIN,
            "{took:?}: never faster than the floor"
        );
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert!(!reports.is_empty());
        assert!(reports.windows(2).all(|w| w[0] <= w[1]), "{reports:?}");
    }

    /// A `retry_after` longer than what is left of the queue timeout: the last ask comes
    /// at the timeout, not after the (capped) `retry_after`, and then it fails.
    #[tokio::test]
    async fn the_queue_timeout_bounds_the_wait() {
        let a = Scripted::new([busy(Some(60_000)), busy(Some(60_000)), None]);
        let (r, took, reports) = admit(&a, admission(300)).await;
        let Err(MigrateError::QueueTimeout {
            waited,
            limit,
            message,
        }) = r
        else {
            panic!("{:?}", r.map(|k| k.id))
        };
        assert_eq!(limit, Duration::from_millis(300));
        assert!(waited >= limit && took < Duration::from_secs(2), "{took:?}");
        assert!(message.contains("its limit"), "{message}");
        assert_eq!(a.asked().len(), 2, "asked at the start and at the timeout");
        assert!(!reports.is_empty());
    }

    /// Zero: do not wait. One ask, an error at once, nothing reported as queued.
    #[tokio::test]
    async fn a_zero_queue_timeout_fails_at_the_first_busy() {
        let a = Scripted::new([busy(None), None]);
        let (r, took, reports) = admit(&a, admission(0)).await;
        let e = r.err().unwrap();
        assert!(matches!(e, MigrateError::QueueTimeout { .. }), "{e}");
        assert!(e.is_refusal());
        assert!(e.to_string().contains("queue timeout is 0"), "{e}");
        assert_eq!(a.asked().len(), 1);
        assert!(took < Duration::from_millis(50), "{took:?}");
        assert!(reports.is_empty(), "{reports:?}");
    }

    /// `vm_in_flight` is no queue: it comes back at once, typed; `abort_stale` reaches
    /// the authority.
    #[tokio::test]
    async fn vm_in_flight_is_returned_at_once_and_abort_stale_is_passed_on() {
        let holder = MigrationId([7; 16]);
        let a = Scripted::new([Some(AuthorityError::VmInFlight {
            vm: "vm-1".into(),
            migration: Some(holder),
        })]);
        let mut with_abort = admission(5_000);
        with_abort.abort_stale = true;
        let (r, _, reports) = admit(&a, with_abort).await;
        let e = r.err().unwrap();
        assert!(
            matches!(
                &e,
                MigrateError::KeyService(AuthorityError::VmInFlight { migration: Some(m), .. })
                    if *m == holder
            ),
            "{e}"
        );
        assert!(e.is_refusal());
        assert!(e.to_string().contains(&holder.to_string()), "{e}");
        assert_eq!(a.asked(), [CreateOptions::default().abort_stale(true)]);
        assert!(reports.is_empty());
    }

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
        for s in [&tcp, &accepted] {
            assert_eq!(
                vmotion_tcp::notsent_lowat(s).unwrap(),
                vmotion_tcp::NOTSENT_LOWAT,
                "the unsent tail is bounded on both ends"
            );
        }
        let tos = tokio::net::TcpSocket::from_std_stream(tcp.into_std().unwrap())
            .tos_v4()
            .unwrap();
        assert_eq!(tos, 46 << 2, "EF marked");
    }
}
