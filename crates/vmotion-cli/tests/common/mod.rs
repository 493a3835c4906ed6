//! What the end-to-end tests share: the real binaries, a key service process with a dev
//! PKI for a few hosts, daemons that print the address they listen on.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different part

pub mod qemu;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

pub const SEND: &str = env!("CARGO_BIN_EXE_vmotion-send");
pub const RECV: &str = env!("CARGO_BIN_EXE_vmotion-recv");

pub fn keyservice_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("vmotion-keyservice");
    assert!(
        bin.exists(),
        "{} missing: `cargo build -p vmotion-keyservice` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn_listening(cmd: &mut Command) -> (Proc, String) {
    spawn_listening_logged(cmd, Stdio::null())
}

/// Starts a daemon with its stderr going to `stderr`; returns it and the address it
/// printed.
pub fn spawn_listening_logged(cmd: &mut Command, stderr: Stdio) -> (Proc, String) {
    let (child, addr) = vmotion_testbed::spawn_listening(cmd, stderr).unwrap();
    (Proc(child), addr)
}

pub struct World {
    pub dir: tempfile::TempDir,
    ks: Option<Proc>,
    pub ks_url: String,
}

impl World {
    pub fn new() -> Self {
        Self::at("127.0.0.1")
    }

    /// A world whose key service listens on `ip` (its certificate names it).
    pub fn at(ip: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ks = keyservice_bin();
        let out = Command::new(&ks)
            .args(["pki", "init", "--out"])
            .arg(dir.path())
            .args(["--hosts", "src,dst,plain,weak", "--service-names", ip])
            .output()
            .unwrap();
        assert!(out.status.success());
        let cfg = dir.path().join("keyservice.toml");
        let any_port = format!("{ip}:0");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("127.0.0.1:7443", &any_port);
        std::fs::write(&cfg, text).unwrap();
        let (proc_, addr) =
            spawn_listening(Command::new(&ks).args(["serve", "--config"]).arg(&cfg));
        // A restarted key service (`start_keyservice`) comes back on the same port, with
        // the same journal.
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(&any_port, &addr);
        std::fs::write(&cfg, text).unwrap();
        std::fs::create_dir(dir.path().join("policy")).unwrap();
        Self {
            ks_url: format!("https://{addr}"),
            ks: Some(proc_),
            dir,
        }
    }

    /// The key service's process id (while it runs).
    pub fn keyservice_pid(&self) -> Option<u32> {
        self.ks.as_ref().map(|p| p.0.id())
    }

    /// SIGKILL to the key service, and reaps it.
    pub fn kill_keyservice(&mut self) {
        if let Some(mut p) = self.ks.take() {
            let _ = p.0.kill();
            let _ = p.0.wait();
        }
    }

    /// Starts the key service again on the same address and journal (after
    /// `kill_keyservice`).
    pub fn start_keyservice(&mut self) {
        assert!(self.ks.is_none(), "the key service is running");
        let cfg = self.p("keyservice.toml");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let mut child = Command::new(keyservice_bin())
                .args(["serve", "--config"])
                .arg(&cfg)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            if line.starts_with("listening on ") {
                self.ks = Some(Proc(child));
                return;
            }
            // The port may not be free yet.
            let _ = child.wait();
            assert!(
                std::time::Instant::now() < deadline,
                "the key service did not restart"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// The key service's record of migration `id` (32 hex digits), read as the source:
    /// `None` while nothing is recorded, else "committed", "claimed", "reverted" or
    /// "aborted".
    pub fn outcome(&self, id: &str) -> Option<String> {
        let bytes: Vec<u8> = (0..16)
            .map(|i| u8::from_str_radix(&id[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let mid = vmotion_proto::MigrationId(bytes.try_into().unwrap());
        let identity = vmotion_keyservice_client::ClientIdentity {
            ca: self.p("ca.pem"),
            cert: self.p("hosts/src.pem"),
            key: self.p("hosts/src-key.pem"),
        };
        let client =
            vmotion_keyservice_client::KeyServiceClient::new(&self.ks_url, &identity).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut tries = 0;
        loop {
            match rt.block_on(client.outcome(mid)) {
                Ok(r) => return r.outcome.map(|o| o.as_str().to_owned()),
                // A step being written: read it back in a moment.
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("reading the outcome of {id}: {e}; again");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => panic!("reading the outcome of {id}: {e}"),
            }
        }
    }

    pub fn p(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    pub fn identity(&self, host: &str) -> Vec<String> {
        vec![
            "--keyservice".into(),
            self.ks_url.clone(),
            "--ca".into(),
            self.p("ca.pem").display().to_string(),
            "--cert".into(),
            self.p(&format!("hosts/{host}.pem")).display().to_string(),
            "--key".into(),
            self.p(&format!("hosts/{host}-key.pem"))
                .display()
                .to_string(),
        ]
    }

    /// A receiver: with the key service as `host` (it registers as able to encrypt), or
    /// without one.
    pub fn recv(&self, host: Option<&str>, extra: &[&str]) -> (Proc, String) {
        let mut cmd = Command::new(RECV);
        cmd.args(["--listen", "127.0.0.1:0"]).args(extra);
        if let Some(h) = host {
            cmd.args(self.identity(h));
        }
        spawn_listening(&mut cmd)
    }

    pub fn policy(&self, vm: &str, text: &str) {
        std::fs::write(self.p(&format!("policy/{vm}.toml")), text).unwrap();
    }

    pub fn send(&self, vm: &str, to: &str, with_keys: bool, extra: &[&str]) -> Output {
        let mut cmd = self.send_command(vm, to, with_keys);
        cmd.args(["--synthetic-mib", "8", "--dirty-rate", "5000"])
            .args(extra);
        cmd.output().unwrap()
    }

    /// A vmotion-send of `vm` to `to` (with the key service as "src" to "dst" if
    /// `with_keys`), without a source: add one.
    pub fn send_command(&self, vm: &str, to: &str, with_keys: bool) -> Command {
        let mut cmd = Command::new(SEND);
        cmd.args(["--vm", vm, "--to", to, "--policy-dir"])
            .arg(self.p("policy"));
        if with_keys {
            cmd.args(self.identity("src"))
                .args(["--destination", "dst"]);
        }
        cmd
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn expect(o: &Output, code: i32, needles: &[&str]) {
    let t = text(o);
    assert_eq!(o.status.code(), Some(code), "{t}");
    for n in needles {
        assert!(t.contains(n), "{n:?} missing:\n{t}");
    }
}

/// Waits (at most 10 s) for `p` to appear: the sender is done once the destination's
/// claim is known, and the daemon files the claimed guest (`VM.mem`) a moment later.
pub fn wait_for_file(p: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !p.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Polls `cond` every 20 ms until it holds (`true`) or `limit` has passed (`false`).
pub fn eventually(limit: std::time::Duration, cond: impl FnMut() -> bool) -> bool {
    poll_until(limit, std::time::Duration::from_millis(20), cond)
}

/// Polls `cond` every `every` until it holds (`true`) or `limit` has passed (`false`):
/// a short `every` for a state that lasts only milliseconds.
pub fn poll_until(
    limit: std::time::Duration,
    every: std::time::Duration,
    mut cond: impl FnMut() -> bool,
) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while !cond() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(every);
    }
    true
}
