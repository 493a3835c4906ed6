//! # vmotion-testbed: real parts for tests and benchmarks
//!
//! [`EtcdCluster`]: an etcd cluster of real `etcd` processes (Debian's `etcd-server`)
//! on loopback, each member with its own data directory and log, killed with SIGKILL and
//! restarted on demand. [`WanBed`]: two hosts in network namespaces joined by an emulated
//! WAN link (`vmotion-wan`: delay, rate, loss) with management links to this namespace.
//! Nothing here is a mock; nothing listens beyond 127.0.0.1 and the beds' own links.

#![forbid(unsafe_code)]

mod etcd;
mod wan;

pub use etcd::{EtcdCluster, etcd_available};
pub use wan::{WanBed, WanLink, ip, wan_available};

/// Starts a daemon that prints `listening on ADDR` as its first line on stdout (as
/// `vmotion-keyservice serve` and `vmotion-recv` do), its stderr to `stderr`. Returns the
/// child and the address, or the line it printed instead (e.g. when its port is taken).
pub fn spawn_listening(
    cmd: &mut std::process::Command,
    stderr: std::process::Stdio,
) -> Result<(std::process::Child, String), String> {
    use std::io::BufRead as _;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    let _ = std::io::BufReader::new(stdout).read_line(&mut line);
    match line.trim().strip_prefix("listening on ") {
        Some(addr) => Ok((child, addr.to_owned())),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("{:?} printed {line:?}", cmd.get_program()))
        }
    }
}

/// Makes the key service's development PKI (for `hosts`, comma-separated) and a KEK named
/// `kek` in `dir`, with the `vmotion-keyservice` binary at `bin`, as an operator would.
pub fn keyservice_pki(
    bin: &std::path::Path,
    dir: &std::path::Path,
    hosts: &str,
) -> Result<(), String> {
    for args in [
        &["pki", "init", "--out", ".", "--hosts", hosts][..],
        &["kek", "generate", "kek"],
    ] {
        let out = std::process::Command::new(bin)
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} {}: {}",
                bin.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}
