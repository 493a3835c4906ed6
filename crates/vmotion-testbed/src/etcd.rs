//! A real etcd cluster on loopback.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether an `etcd` binary is on `PATH`; the reason to skip when not.
pub fn etcd_available() -> Result<(), String> {
    match Command::new("etcd").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("no `etcd` on PATH (Debian's etcd-server; scripts/install-control-plane.sh installs it)".into()),
    }
}

/// One member.
#[derive(Debug)]
struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    /// Plain HTTP `/health` and `/metrics`, whatever the client URLs speak.
    metrics_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// An etcd cluster of real processes. Dropping it kills every member and removes its
/// data.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    /// Client TLS: CA, server certificate, server key (clients must present a
    /// certificate from the CA).
    tls: Option<[PathBuf; 3]>,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl EtcdCluster {
    /// Starts `n` members and waits (at most 30 s) until the cluster has a leader.
    pub fn start(n: usize) -> Result<Self, String> {
        Self::start_with(n, None)
    }

    /// As [`start`](Self::start), with clients served over TLS only (`https://` client
    /// URLs, client certificates required): `[ca, cert, key]`.
    pub fn start_tls(n: usize, tls: [PathBuf; 3]) -> Result<Self, String> {
        Self::start_with(n, Some(tls))
    }

    fn start_with(n: usize, tls: Option<[PathBuf; 3]>) -> Result<Self, String> {
        etcd_available()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("{scheme}://127.0.0.1:{}", free_port()),
                peer_url: format!("http://127.0.0.1:{}", free_port()),
                metrics_url: format!("http://127.0.0.1:{}", free_port()),
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members,
            initial_cluster,
            tls,
            dir,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let m = &mut self.members[i];
        let mut tls_args: Vec<std::ffi::OsString> = Vec::new();
        if let Some([ca, cert, key]) = &self.tls {
            for (flag, path) in [
                ("--trusted-ca-file", ca),
                ("--cert-file", cert),
                ("--key-file", key),
            ] {
                tls_args.push(flag.into());
                tls_args.push(path.into());
            }
            tls_args.push("--client-cert-auth".into());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .map_err(|e| e.to_string())?;
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "vmotion-test"])
            // Loopback: elect within about a second of a leader's death.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            // As docs/ha.md asks of every deployment: old revisions do not pile up.
            .args([
                "--auto-compaction-mode",
                "periodic",
                "--auto-compaction-retention",
                "5m",
            ])
            .args(["--listen-metrics-urls", &m.metrics_url])
            .args(&tls_args)
            .args(["--log-outputs", "stderr"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting etcd: {e}"))?;
        m.child = Some(child);
        Ok(())
    }

    /// The members' client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Member `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.members[i].data_dir
    }

    /// Member `i`'s log.
    pub fn log(&self, i: usize) -> &Path {
        &self.members[i].log
    }

    /// The folder holding every member's data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts member `i` (after [`kill`](Self::kill)) on its data directory.
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        self.kill(i);
        self.spawn(i)
    }

    /// Whether member `i` answers `/health` with a healthy cluster behind it.
    pub fn healthy(&self, i: usize) -> bool {
        let addr = self.members[i].metrics_url.trim_start_matches("http://");
        let Ok(mut s) = TcpStream::connect(addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .is_err()
        {
            return false;
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }

    /// Waits until every running member is healthy.
    pub fn wait_healthy(&self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let running: Vec<usize> = (0..self.members.len())
                .filter(|&i| self.members[i].child.is_some())
                .collect();
            if running.iter().all(|&i| self.healthy(i)) {
                return Ok(());
            }
            if start.elapsed() > limit {
                let logs: String = running
                    .iter()
                    .map(|&i| {
                        let text =
                            std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(5).collect();
                        format!("m{i}: {}\n", tail.join(" | "))
                    })
                    .collect();
                return Err(format!("etcd not healthy within {limit:?}:\n{logs}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
