//! The real processes several benchmarks start: the release binaries, a key service with
//! a development PKI, daemons that say where they listen.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A child process, killed and reaped when dropped.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A release binary of the workspace, next to the running bench's own folder.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the bench's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/release/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} missing: cargo build --release -p vmotion-cli -p vmotion-keyservice -p vmotion-testbed --bins",
        path.display()
    );
    path
}

/// Starts a daemon that prints `listening on ADDR` first; returns it and ADDR.
pub fn listening(cmd: &mut Command) -> (Proc, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("the daemon starts");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    let _ = BufReader::new(stdout).read_line(&mut line);
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected {line:?}"))
        .to_owned();
    (Proc(child), addr)
}

/// A key service with a development PKI for hosts `src` and `dst`.
#[derive(Debug)]
pub struct KeyService {
    _proc: Proc,
    url: String,
    pki: PathBuf,
}

impl KeyService {
    /// On loopback.
    pub fn start(dir: &Path) -> Self {
        Self::start_at(dir, "127.0.0.1")
    }

    /// Listening on `ip` (its certificate names it).
    pub fn start_at(dir: &Path, ip: &str) -> Self {
        let ks = bin("vmotion-keyservice");
        let pki = dir.join("pki");
        let ok = Command::new(&ks)
            .args(["pki", "init", "--out"])
            .arg(&pki)
            .args(["--hosts", "src,dst", "--service-names", ip])
            .output()
            .expect("pki init runs");
        assert!(ok.status.success(), "{ok:?}");
        let cfg = pki.join("keyservice.toml");
        let text = std::fs::read_to_string(&cfg)
            .expect("the configuration")
            .replace("127.0.0.1:7443", &format!("{ip}:0"));
        std::fs::write(&cfg, text).expect("the configuration");
        let (proc_, addr) = listening(
            Command::new(&ks)
                .args(["serve", "--config"])
                .arg(&cfg)
                .stderr(Stdio::null()),
        );
        Self {
            _proc: proc_,
            url: format!("https://{addr}"),
            pki,
        }
    }

    /// `--keyservice … --ca … --cert … --key …` for `host`.
    pub fn identity(&self, host: &str) -> Vec<String> {
        let p = |f: String| self.pki.join(f).display().to_string();
        vec![
            "--keyservice".into(),
            self.url.clone(),
            "--ca".into(),
            p("ca.pem".into()),
            "--cert".into(),
            p(format!("hosts/{host}.pem")),
            "--key".into(),
            p(format!("hosts/{host}-key.pem")),
        ]
    }
}
