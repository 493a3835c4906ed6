//! Two-process bulk transfers for `benches/compare.sh`: the same guest bytes moved over
//! loopback by plain TCP, by a direct rustls TLS 1.3 AES-256-GCM connection (ring
//! provider, 256 KiB writes), and by a vmotion migration (plaintext or encrypted, 1..N
//! streams). The sender is this process; the receiver is a child process it starts.
//!
//! ```text
//! vmotion-bench-peer run tcp|tls|tls-lowat|plain|encrypted --mib N [--streams S] [--seed K] [--warm]
//! ```
//!
//! `--warm`: the receiver faults its destination memory in before the clock starts, so
//! the run measures the transport alone (a cold run includes the kernel zeroing each
//! destination page on its first write, which on this nested host is a third of the
//! time).
//!
//! Prints one JSON line: `{"kind", "warm", "streams", "mib", "secs", "gbps", "digest_ok",
//! "receiver_peak_rss_beyond_guest_mib", "window"}` (the receiver's peak RSS, `VmHWM`, less
//! the guest's size); `window` is the timed stretch in CLOCK_MONOTONIC seconds, for
//! `perf record -k CLOCK_MONOTONIC` then `perf report --time START,END`.
//! The time runs from before the connection is opened to the receiver's acknowledgement
//! of the last byte (for a migration: `Sender::migrate` returning, after the commit).
//! The source bytes are a seeded synthetic guest of random pages (no zero pages), built
//! before the clock starts; the receiver writes into fresh memory (first-touch page faults
//! included, as a migration's blank destination guest has them). After the clock stops
//! both ends hash what they hold (SHA-256) and the run fails unless the digests agree.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Instant;

use vmotion::{Receiver, Sender};
use vmotion_benches::monotonic;
use vmotion_mover::GuestMemory;
use vmotion_mover::synthetic::{SyntheticConfig, SyntheticGuest};
use vmotion_proto::MigrationId;

/// rustls and plain TCP write this much at a time.
const WRITE: usize = 256 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Tcp,
    Tls,
    /// rustls on sockets with vmotion's `TCP_NOTSENT_LOWAT`, the socket option apart.
    TlsLowat,
    Plain,
    Encrypted,
}

impl Kind {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "tcp" => Self::Tcp,
            "tls" => Self::Tls,
            "tls-lowat" => Self::TlsLowat,
            "plain" => Self::Plain,
            "encrypted" => Self::Encrypted,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::TlsLowat => "tls-lowat",
            Self::Plain => "plain",
            Self::Encrypted => "encrypted",
        }
    }
}

#[derive(Clone, Debug)]
struct Opts {
    kind: Kind,
    mib: u64,
    streams: u16,
    seed: u64,
    /// `serve`: where the TLS certificate and key are.
    tls_dir: Option<String>,
    /// Fault the destination memory in before the clock starts.
    warm: bool,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let kind = args
        .first()
        .and_then(|k| Kind::parse(k))
        .ok_or("the kind: tcp, tls, tls-lowat, plain or encrypted")?;
    let mut o = Opts {
        kind,
        mib: 2048,
        streams: 1,
        seed: 1,
        tls_dir: None,
        warm: false,
    };
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        if flag == "--warm" {
            o.warm = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = || value.parse::<u64>().map_err(|_| format!("{flag} {value}"));
        match flag.as_str() {
            "--mib" => o.mib = num()?,
            "--streams" => o.streams = u16::try_from(num()?).map_err(|e| e.to_string())?,
            "--seed" => o.seed = num()?,
            "--tls-dir" => o.tls_dir = Some(value.clone()),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(o)
}

fn guest_config(o: &Opts) -> SyntheticConfig {
    SyntheticConfig {
        pages: o.mib * 256,
        zero_fraction: 0.0,
        seed: o.seed,
        writers: 0,
        ..SyntheticConfig::default()
    }
}

fn sha256<C: AsRef<[u8]>>(chunks: impl Iterator<Item = C>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for c in chunks {
        ctx.update(c.as_ref());
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A guest's memory, hashed a MiB at a time.
fn guest_digest(memory: &dyn GuestMemory) -> String {
    let pages = memory.page_count();
    let step = 256;
    sha256((0..pages).step_by(step).map(|first| {
        let n = step.min((pages - first) as usize);
        let mut buf = vec![0u8; n * 4096];
        memory.read_pages(first, &mut buf).expect("in range");
        buf
    }))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => parse(&args[1..]).and_then(|o| run(&o)),
        Some("serve") => parse(&args[1..]).and_then(|o| serve(&o)),
        _ => Err("usage: vmotion-bench-peer run tcp|tls|tls-lowat|plain|encrypted --mib N [--streams S] [--seed K] [--warm]".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmotion-bench-peer: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The sender: starts the receiver process, moves the bytes, checks the digests.
fn run(o: &Opts) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut child_args = vec![
        "serve".to_owned(),
        o.kind.name().to_owned(),
        "--mib".into(),
        o.mib.to_string(),
        "--streams".into(),
        o.streams.to_string(),
        "--seed".into(),
        o.seed.to_string(),
    ];
    if o.warm {
        child_args.push("--warm".into());
    }
    let tls = if matches!(o.kind, Kind::Tls | Kind::TlsLowat) {
        let t = TlsFiles::create(dir.path())?;
        child_args.extend(["--tls-dir".into(), dir.path().display().to_string()]);
        Some(t)
    } else {
        None
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(&child_args)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut next = || -> Result<String, String> {
        lines
            .next()
            .ok_or("the receiver ended early")?
            .map_err(|e| e.to_string())
    };
    let port: u16 = next()?
        .strip_prefix("port ")
        .and_then(|p| p.parse().ok())
        .ok_or("the receiver did not say its port")?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut window = (0.0, 0.0);
    let (secs, digest) = match o.kind {
        Kind::Tcp | Kind::Tls | Kind::TlsLowat => bulk_send(o, addr, tls.as_ref(), &mut window)?,
        Kind::Plain | Kind::Encrypted => migrate_send(o, addr, &mut window)?,
    };
    let theirs = next()?;
    let status = child.wait().map_err(|e| e.to_string())?;
    let mut said = theirs
        .strip_prefix("digest ")
        .unwrap_or_default()
        .split(' ');
    let digest_ok = said.next() == Some(digest.as_str());
    // What the receiver held beyond the guest's own memory, at its peak.
    let peak_kib: u64 = said.next().and_then(|k| k.parse().ok()).unwrap_or(0);
    let extra_mib = (peak_kib / 1024).saturating_sub(o.mib);
    let bytes = (o.mib << 20) as f64;
    println!(
        "{{\"kind\":\"{}\",\"warm\":{},\"streams\":{},\"mib\":{},\"secs\":{secs:.4},\"gbps\":{:.4},\"digest_ok\":{digest_ok},\"receiver_peak_rss_beyond_guest_mib\":{extra_mib},\"window\":[{:.6},{:.6}]}}",
        o.kind.name(),
        o.warm,
        o.streams,
        o.mib,
        bytes / secs / 1e9,
        window.0,
        window.1
    );
    if !status.success() || !digest_ok {
        return Err(format!(
            "the receiver's bytes differ from the source's ({theirs} vs digest {digest}), or it failed ({status})"
        ));
    }
    Ok(())
}

/// The receiver process.
fn serve(o: &Opts) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let digest = match o.kind {
        Kind::Tcp | Kind::Tls | Kind::TlsLowat => bulk_receive(o, &listener)?,
        Kind::Plain | Kind::Encrypted => migrate_receive(o, listener)?,
    };
    println!("digest {digest} {}", peak_rss_kib());
    Ok(())
}

/// This process's peak resident set (`VmHWM`), KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Tells the sender where to connect, once the destination memory is ready.
fn announce(listener: &TcpListener) -> Result<(), String> {
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    println!("port {port}");
    std::io::stdout().flush().map_err(|e| e.to_string())
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn migrate_send(
    o: &Opts,
    addr: std::net::SocketAddr,
    window: &mut (f64, f64),
) -> Result<(f64, String), String> {
    let id = MigrationId([o.seed as u8; 16]);
    let (_, policy, key) = vmotion_benches::direct_keys(id, o.kind == Kind::Encrypted);
    let mut guest = SyntheticGuest::start(guest_config(o));
    let rt = runtime()?;
    window.0 = monotonic();
    let started = Instant::now();
    rt.block_on(
        Sender::builder("bench")
            .policy(policy)
            .key(key)
            .streams(o.streams)
            .build()
            .map_err(|e| e.to_string())?
            .migrate(addr, &mut guest),
    )
    .map_err(|e| e.to_string())?;
    let secs = started.elapsed().as_secs_f64();
    window.1 = monotonic();
    Ok((secs, guest_digest(&guest.memory_handle())))
}

fn migrate_receive(o: &Opts, listener: TcpListener) -> Result<String, String> {
    let id = MigrationId([o.seed as u8; 16]);
    let (keys, _, _) = vmotion_benches::direct_keys(id, o.kind == Kind::Encrypted);
    let rt = runtime()?;
    let pages = o.mib * 256;
    let blank = SyntheticGuest::blank(pages, 4096);
    if o.warm {
        let zeros = vec![0u8; 256 * 4096];
        let memory = blank.memory_handle();
        for first in (0..pages).step_by(256) {
            let n = 256.min(pages - first) as usize;
            memory
                .write_pages(first, &zeros[..n * 4096])
                .map_err(|e| e.to_string())?;
        }
    }
    let mut blank = Some(blank);
    announce(&listener)?;
    let (_, sink) = rt.block_on(async {
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        Receiver::new(keys)
            .max_streams(o.streams.max(1))
            .receive(&listener, |h| {
                if h.guest_pages != pages || h.page_size != 4096 {
                    return Err("not the guest this receiver was built for".to_owned());
                }
                blank.take().ok_or_else(|| "one guest only".to_owned())
            })
            .await
            .map_err(|e| e.to_string())
    })?;
    Ok(guest_digest(&sink.memory_handle()))
}

/// The TLS server's certificate and key, and the client's trust in it.
struct TlsFiles {
    cert: rustls::pki_types::CertificateDer<'static>,
}

impl TlsFiles {
    fn create(dir: &std::path::Path) -> Result<Self, String> {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()])
            .map_err(|e| e.to_string())?;
        std::fs::write(dir.join("cert.der"), c.cert.der()).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("key.der"), c.key_pair.serialize_der())
            .map_err(|e| e.to_string())?;
        Ok(Self {
            cert: c.cert.der().clone(),
        })
    }
}

/// TLS 1.3 only, AES-256-GCM only, the ring provider.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let ring = rustls::crypto::ring::default_provider();
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384],
        ..ring
    })
}

fn bulk_send(
    o: &Opts,
    addr: std::net::SocketAddr,
    tls: Option<&TlsFiles>,
    window: &mut (f64, f64),
) -> Result<(f64, String), String> {
    let source = SyntheticGuest::start(guest_config(o)).snapshot();
    window.0 = monotonic();
    let started = Instant::now();
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    if o.kind == Kind::TlsLowat {
        vmotion_tcp::set_notsent_lowat(&tcp, vmotion_tcp::NOTSENT_LOWAT)
            .map_err(|e| e.to_string())?;
    }
    let mut stream: Box<dyn ReadWrite> = match tls {
        None => Box::new(tcp),
        Some(files) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(files.cert.clone()).map_err(|e| e.to_string())?;
            let config = rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
            let conn =
                rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
            Box::new(rustls::StreamOwned::new(conn, tcp))
        }
    };
    for chunk in source.chunks(WRITE) {
        stream.write_all(chunk).map_err(|e| e.to_string())?;
    }
    stream.flush().map_err(|e| e.to_string())?;
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack).map_err(|e| e.to_string())?;
    let secs = started.elapsed().as_secs_f64();
    window.1 = monotonic();
    Ok((secs, sha256(source.chunks(1 << 20))))
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn bulk_receive(o: &Opts, listener: &TcpListener) -> Result<String, String> {
    let len = (o.mib << 20) as usize;
    // Fresh memory, faulted in as the bytes arrive (or before, when warm).
    let mut dest = vec![0u8; len];
    if o.warm {
        dest.fill(1);
    }
    announce(listener)?;
    let (tcp, _) = listener.accept().map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    if o.kind == Kind::TlsLowat {
        vmotion_tcp::set_notsent_lowat(&tcp, vmotion_tcp::NOTSENT_LOWAT)
            .map_err(|e| e.to_string())?;
    }
    let mut stream: Box<dyn ReadWrite> = match &o.tls_dir {
        None => Box::new(tcp),
        Some(dir) => {
            let dir = std::path::Path::new(dir);
            let cert = std::fs::read(dir.join("cert.der")).map_err(|e| e.to_string())?;
            let key = std::fs::read(dir.join("key.der")).map_err(|e| e.to_string())?;
            let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.into());
            let config = rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_single_cert(vec![cert.into()], key)
                .map_err(|e| e.to_string())?;
            let conn =
                rustls::ServerConnection::new(Arc::new(config)).map_err(|e| e.to_string())?;
            Box::new(rustls::StreamOwned::new(conn, tcp))
        }
    };
    let mut at = 0;
    while at < len {
        let n = stream.read(&mut dest[at..]).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("the sender closed after {at} of {len} bytes"));
        }
        at += n;
    }
    stream.write_all(&[1]).map_err(|e| e.to_string())?;
    stream.flush().map_err(|e| e.to_string())?;
    Ok(sha256(dest.chunks(1 << 20)))
}
