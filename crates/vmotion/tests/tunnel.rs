//! Tunnel mode over real sockets, with stand-in hypervisors: a "source" that connects to
//! the tunnel's local socket like QEMU's `migrate unix:...`, and a "destination" that
//! listens like QEMU's `-incoming`. (Real QEMU runs in tests/tests/qemu_tunnel.rs.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use vmotion::{Endpoint, KeySource, Listener, MigrateError, Receiver, ReceiverKeys, TunnelSender};
use vmotion_proto::{
    EncryptionPolicy, EpochLimits, KeyMaterial, MigrationId, MigrationKey, MigrationNonce, Mode,
    Refusal, VmPolicy,
};

const ID: MigrationId = MigrationId([0x3c; 16]);

fn key() -> KeyMaterial {
    KeyMaterial {
        key: MigrationKey::from_bytes([0x21; 32]),
        nonce: MigrationNonce([4; 8]),
    }
}

/// A tunnel with the test key and a `required` policy.
fn keyed() -> vmotion::TunnelSenderBuilder {
    TunnelSender::builder("qemu-vm")
        .policy(required())
        .key(KeySource::Direct {
            migration_id: ID,
            material: key(),
        })
}

fn required() -> VmPolicy {
    VmPolicy {
        encryption: EncryptionPolicy::Required,
        vm_encrypted: false,
    }
}

/// Deterministic bytes, different per connection.
fn data(tag: u8, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(tag);
    (0..len)
        .map(|i| {
            if i == 0 {
                return tag;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What the stand-in destination hypervisor got on each connection.
type Delivered = Arc<Mutex<Vec<Vec<u8>>>>;

/// A destination "hypervisor": reads each connection to its end of file, records it, then
/// answers with its length and closes (the way QEMU's return path answers late).
fn destination(listener: UnixListener) -> (Delivered, tokio::task::JoinHandle<()>) {
    let got: Delivered = Arc::default();
    let seen = got.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() {
                    let answer = format!("got {} bytes", buf.len());
                    seen.lock().unwrap().push(buf);
                    let _ = s.write_all(answer.as_bytes()).await;
                }
            });
        }
    });
    (got, task)
}

/// A source "hypervisor" connection: sends `bytes`, half-closes, reads the answer.
async fn source(path: &std::path::Path, bytes: Vec<u8>) -> std::io::Result<String> {
    let mut s = UnixStream::connect(path).await?;
    s.write_all(&bytes).await?;
    s.shutdown().await?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await?;
    Ok(answer)
}

struct Setup {
    dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
    listener: Option<TcpListener>,
    qemu_in: std::path::PathBuf,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Setup {
        qemu_in: dir.path().join("incoming.sock"),
        addr: listener.local_addr().unwrap(),
        listener: Some(listener),
        dir,
    }
}

/// The test's receiver, taking one tunnel on the setup's listener.
fn spawn_receiver(
    s: &mut Setup,
) -> tokio::task::JoinHandle<Result<vmotion::TunnelReport, MigrateError>> {
    let listener = s.listener.take().unwrap();
    let r = receiver(&s.qemu_in);
    tokio::spawn(async move { r.receive_tunnel(&listener).await })
}

fn receiver(target: &std::path::Path) -> Receiver {
    let target = Endpoint::Unix(target.to_owned());
    Receiver::new(ReceiverKeys::Direct {
        migration_id: ID,
        material: key(),
    })
    .tunnel_to(move |h| {
        assert_eq!(h.guest_pages, 0);
        Ok(target.clone())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_connections_cross_both_ways_encrypted_with_key_updates() {
    let mut s = setup().await;
    let (delivered, _dst) = destination(UnixListener::bind(&s.qemu_in).unwrap());
    let recv = spawn_receiver(&mut s);
    let tunnel = keyed()
        .epoch_limits(EpochLimits::new(8, 1 << 20).unwrap())
        .build()
        .unwrap()
        .negotiate(s.addr)
        .await
        .unwrap();
    assert!(matches!(tunnel.negotiated().mode, Mode::Encrypted(_)));
    let local = s.dir.path().join("qemu-out.sock");
    let qemu = Listener::bind(&Endpoint::Unix(local.clone()))
        .await
        .unwrap();
    let sizes = [3 << 20, 1, 700_001];
    let sources = sizes.iter().enumerate().map(|(i, &n)| {
        let local = local.clone();
        async move { source(&local, data(i as u8 + 1, n)).await }
    });
    let (report, answers) = tokio::join!(
        tunnel.run(&qemu, std::future::pending()),
        futures_join_all(sources.collect())
    );
    let report = report.unwrap();
    // Each source connection got the destination's late answer back: the half-close
    // crossed one way and the answer and the final close the other.
    for (answer, n) in answers.into_iter().zip(sizes) {
        assert_eq!(answer.unwrap(), format!("got {n} bytes"));
    }
    let mut got = delivered.lock().unwrap().clone();
    got.sort_by_key(|b| b[0]);
    let sent: Vec<Vec<u8>> = (0..3).map(|i| data(i as u8 + 1, sizes[i])).collect();
    assert!(
        got == sent,
        "the destination got exactly what each source sent"
    );

    let total: u64 = sizes.iter().map(|n| *n as u64).sum();
    assert_eq!(report.connections, 3);
    assert_eq!(report.bytes_to_destination, total);
    let back: u64 = sizes
        .iter()
        .map(|n| format!("got {n} bytes").len() as u64)
        .sum();
    assert_eq!(report.bytes_from_destination, back);
    assert!(
        report.epochs > 2,
        "8-frame epochs force key updates: {}",
        report.epochs
    );
    let received = recv.await.unwrap().unwrap();
    assert_eq!(received.bytes_to_destination, total);
    assert_eq!(received.bytes_from_destination, back);
    assert_eq!(received.connections, 3);
    assert_eq!(received.vm_name, "qemu-vm");
}

/// `join_all` without a futures dependency: each on its own task.
async fn futures_join_all<T: Send + 'static>(
    fs: Vec<impl Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_policy_is_refused_before_anything_listens_for_the_hypervisor() {
    let s = setup().await;
    let listener = s.listener.unwrap();
    // The destination host cannot encrypt.
    let target = Endpoint::Unix(s.qemu_in.clone());
    let recv = tokio::spawn(async move {
        Receiver::new(ReceiverKeys::None)
            .tunnel_to(move |_| Ok(target.clone()))
            .receive_tunnel(&listener)
            .await
    });
    let dst = UnixListener::bind(&s.qemu_in).unwrap();
    // The key service (or orchestrator) says so: refused before connecting at all.
    let err = TunnelSender::builder("qemu-vm")
        .policy(required())
        .key(KeySource::None { migration_id: ID })
        .build()
        .unwrap()
        .negotiate(s.addr)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            MigrateError::Refused(Refusal::PolicyRequiresEncryption)
        ),
        "{err:?}"
    );
    // An authority that wrongly vouches for the destination: the receiver's own word
    // refuses it in the handshake instead.
    let err = keyed()
        .build()
        .unwrap()
        .negotiate(s.addr)
        .await
        .unwrap_err();
    assert!(
        matches!(err, MigrateError::Refused(Refusal::DowngradeDetected)),
        "{err:?}"
    );
    assert!(recv.await.unwrap().is_err());
    // Nothing ever reached the destination hypervisor.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), dst.accept())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_without_a_tunnel_target_refuses_tunnels() {
    let s = setup().await;
    let listener = s.listener.unwrap();
    let recv = tokio::spawn(async move {
        Receiver::new(ReceiverKeys::Direct {
            migration_id: ID,
            material: key(),
        })
        .receive_tunnel(&listener)
        .await
    });
    let err = keyed()
        .build()
        .unwrap()
        .negotiate(s.addr)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("takes no tunnelled migrations"),
        "{err}"
    );
    assert!(recv.await.unwrap().is_err());
}

/// Relays TCP to `to`, flipping one byte of the data connection (the second connection)
/// once `after` bytes have passed.
async fn tampering_proxy(to: std::net::SocketAddr, after: usize) -> std::net::SocketAddr {
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = proxy.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((inbound, _)) = proxy.accept().await {
            n += 1;
            let tamper = n == 2;
            let outbound = tokio::net::TcpStream::connect(to).await.unwrap();
            let (mut ir, mut iw) = inbound.into_split();
            let (mut or, mut ow) = outbound.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut or, &mut iw).await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut passed = 0usize;
                let mut flipped = !tamper;
                loop {
                    let k = match ir.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => k,
                    };
                    if !flipped && passed + k > after {
                        buf[after - passed] ^= 0x01;
                        flipped = true;
                    }
                    passed += k;
                    if ow.write_all(&buf[..k]).await.is_err() {
                        break;
                    }
                }
                let _ = ow.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_tears_down_both_hypervisor_connections() {
    let mut s = setup().await;
    let dst = UnixListener::bind(&s.qemu_in).unwrap();
    let recv = spawn_receiver(&mut s);
    let proxy = tampering_proxy(s.addr, 1 << 20).await;
    let tunnel = keyed().build().unwrap().negotiate(proxy).await.unwrap();
    let local = s.dir.path().join("qemu-out.sock");
    let qemu = Listener::bind(&Endpoint::Unix(local.clone()))
        .await
        .unwrap();
    let run = tokio::spawn(async move { tunnel.run(&qemu, std::future::pending()).await });
    // The source streams without end, as a hypervisor mid-migration does.
    let mut src = UnixStream::connect(&local).await.unwrap();
    let (mut dst_conn, _) = tokio::time::timeout(Duration::from_secs(10), dst.accept())
        .await
        .unwrap()
        .unwrap();
    let writer = tokio::spawn(async move {
        let chunk = data(9, 1 << 16);
        loop {
            if src.write_all(&chunk).await.is_err() {
                return src;
            }
        }
    });
    // The destination sees its connection end before a byte of the forged frame (and
    // without the sender's clean shutdown), and the source's writes start failing.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), dst_conn.read(&mut buf))
            .await
            .expect("the destination connection must not hang")
        {
            Ok(0) | Err(_) => break,
            Ok(k) => got += k,
        }
    }
    assert!(got < 1 << 20, "nothing past the forged frame: {got}");
    let mut src = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the source connection must be torn down")
        .unwrap();
    let mut rest = Vec::new();
    let _ = src.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    let recv_err = recv.await.unwrap().unwrap_err();
    assert!(
        matches!(recv_err, MigrateError::Protocol(_)),
        "the receiver names the forgery: {recv_err:?}"
    );
    // The sender learns the receiver's reason, not just a cut stream.
    let run_err = run.await.unwrap().unwrap_err();
    assert!(
        matches!(
            run_err,
            MigrateError::PeerAborted {
                code: vmotion_proto::AbortCode::BadRecordMac,
                ..
            }
        ),
        "{run_err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_sender_closes_the_destination_connection() {
    let mut s = setup().await;
    let dst = UnixListener::bind(&s.qemu_in).unwrap();
    let recv = spawn_receiver(&mut s);
    let tunnel = keyed().build().unwrap().negotiate(s.addr).await.unwrap();
    let local = s.dir.path().join("qemu-out.sock");
    let qemu = Listener::bind(&Endpoint::Unix(local.clone()))
        .await
        .unwrap();
    let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(async move {
        tunnel
            .run(&qemu, async {
                let _ = cancelled.await;
            })
            .await
    });
    let mut src = UnixStream::connect(&local).await.unwrap();
    src.write_all(b"QEVM").await.unwrap();
    let (mut dst_conn, _) = dst.accept().await.unwrap();
    let mut head = [0u8; 4];
    dst_conn.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"QEVM");
    cancel.send(()).unwrap();
    let err = run.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    // Both hypervisors see their connection end; the receiver learned of the abort.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), dst_conn.read_to_end(&mut rest))
        .await
        .expect("the destination is not left waiting");
    assert!(r.is_err() || rest.is_empty());
    let r = tokio::time::timeout(Duration::from_secs(5), src.read_to_end(&mut rest))
        .await
        .expect("the source is not left waiting");
    assert!(r.is_err() || rest.is_empty());
    assert!(matches!(
        recv.await.unwrap().unwrap_err(),
        MigrateError::PeerAborted { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hypervisor_that_never_connects_times_out_and_the_receiver_is_told() {
    let mut s = setup().await;
    let recv = spawn_receiver(&mut s);
    let tunnel = keyed()
        .accept_timeout(Duration::from_millis(200))
        .build()
        .unwrap()
        .negotiate(s.addr)
        .await
        .unwrap();
    let qemu = Listener::bind(&Endpoint::Unix(s.dir.path().join("qemu-out.sock")))
        .await
        .unwrap();
    let err = tunnel.run(&qemu, std::future::pending()).await.unwrap_err();
    assert!(err.to_string().contains("did not connect"), "{err}");
    let recv_err = recv.await.unwrap().unwrap_err();
    assert!(
        recv_err.to_string().contains("did not connect"),
        "the receiver gets the reason: {recv_err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_than_negotiated_fail_the_tunnel() {
    let mut s = setup().await;
    let dst = UnixListener::bind(&s.qemu_in).unwrap();
    let recv = spawn_receiver(&mut s);
    let tunnel = keyed()
        .max_connections(2)
        .build()
        .unwrap()
        .negotiate(s.addr)
        .await
        .unwrap();
    let local = s.dir.path().join("qemu-out.sock");
    let qemu = Listener::bind(&Endpoint::Unix(local.clone()))
        .await
        .unwrap();
    let run = tokio::spawn(async move { tunnel.run(&qemu, std::future::pending()).await });
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut c = UnixStream::connect(&local).await.unwrap();
        // The connection past the maximum may be dropped before this write lands.
        let _ = c.write_all(b"x").await;
        conns.push(c);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = run.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("more than 2 connections"), "{err}");
    // Every connection, carried or not, is closed on the source side...
    for mut c in conns {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
            .await
            .expect("not left waiting");
        assert!(r.is_err() || rest.is_empty());
    }
    // ...and the two that reached the destination are closed there.
    for _ in 0..2 {
        let (mut d, _) = dst.accept().await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), d.read_to_end(&mut rest))
            .await
            .expect("not left waiting");
    }
    assert!(recv.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_tunnels_are_refused_unless_the_receiver_allows_them() {
    let disabled = VmPolicy {
        encryption: EncryptionPolicy::Disabled,
        vm_encrypted: false,
    };
    for allow in [false, true] {
        let mut s = setup().await;
        let (_delivered, _dst) = destination(UnixListener::bind(&s.qemu_in).unwrap());
        let listener = s.listener.take().unwrap();
        let target = Endpoint::Unix(s.qemu_in.clone());
        let recv = tokio::spawn(async move {
            Receiver::new(ReceiverKeys::Direct {
                migration_id: ID,
                material: key(),
            })
            .tunnel_to(move |_| Ok(target.clone()))
            .allow_plaintext_tunnels(allow)
            .receive_tunnel(&listener)
            .await
        });
        // A sender whose policy disables encryption: nothing is authenticated.
        let negotiated = TunnelSender::builder("qemu-vm")
            .policy(disabled)
            .key(KeySource::None { migration_id: ID })
            .build()
            .unwrap()
            .negotiate(s.addr)
            .await;
        if allow {
            let tunnel = negotiated.unwrap();
            assert!(matches!(tunnel.negotiated().mode, Mode::Plaintext(_)));
            let local = s.dir.path().join("qemu-out.sock");
            let qemu = Listener::bind(&Endpoint::Unix(local.clone()))
                .await
                .unwrap();
            let (report, answer) = tokio::join!(
                tunnel.run(&qemu, std::future::pending()),
                source(&local, data(1, 1000))
            );
            assert_eq!(answer.unwrap(), "got 1000 bytes");
            assert_eq!(report.unwrap().bytes_to_destination, 1000);
            assert!(recv.await.unwrap().is_ok());
        } else {
            let err = negotiated.unwrap_err();
            assert!(
                matches!(
                    err,
                    MigrateError::Refused(Refusal::ReceiverRequiresEncryption)
                ),
                "{err:?}"
            );
            assert!(recv.await.unwrap().is_err());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_on_the_receivers_port_neither_stall_nor_fail_a_tunnel() {
    let mut s = setup().await;
    let (delivered, _dst) = destination(UnixListener::bind(&s.qemu_in).unwrap());
    let recv = spawn_receiver(&mut s);
    let tunnel = keyed().build().unwrap().negotiate(s.addr).await.unwrap();
    // Silent connections and junk, more than the receiver reads binds from at once.
    let mut strangers = Vec::new();
    for i in 0..24 {
        let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        if i % 2 == 0 {
            let _ = c.write_all(&[0x5a; 64]).await;
        }
        strangers.push(c);
    }
    let local = s.dir.path().join("qemu-out.sock");
    let qemu = Listener::bind(&Endpoint::Unix(local.clone()))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (report, answer) = tokio::join!(
        tunnel.run(&qemu, std::future::pending()),
        source(&local, data(7, 100_000))
    );
    assert_eq!(answer.unwrap(), "got 100000 bytes");
    assert_eq!(report.unwrap().bytes_to_destination, 100_000);
    // Not held up by even one silent stranger's 5 s bind timeout (read inline, a dozen of
    // them would take a minute).
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(recv.await.unwrap().unwrap().connections, 1);
    assert_eq!(delivered.lock().unwrap().len(), 1);
    drop(strangers);
}
