//! The destination QEMU of `vmotion-recv --qemu-qmp`: made ready over QMP for each
//! tunnel once it is authenticated, and watched until it runs the guest.
//!
//! The destination QEMU runs with `-incoming defer` and a QMP socket the daemon can name
//! from the VM (`--qemu-qmp 'unix:/run/vmotion/{vm}.qmp'`). For a tunnel of VM `vm` that
//! announced `n` connections the daemon sets `multifd` (with `n - 1` channels) when
//! `n > 1`, and issues `migrate-incoming` on the address the tunnel delivers to.
//! `vmotion-send --qemu` announces exactly its QEMU's connections; a `--tunnel` sender
//! must do so with `--max-connections` (1, or 1 + the multifd channels).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use vmotion_qemu::Qmp;

/// How long one QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where each VM's destination QEMU listens for QMP: a `unix:` path with `{vm}`.
#[derive(Debug, Clone)]
pub struct QmpTemplate(String);

impl QmpTemplate {
    /// Parses `unix:PATH` where PATH holds `{vm}`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let path = s
            .strip_prefix("unix:")
            .ok_or_else(|| format!("`{s}`: a QMP socket is a unix:PATH"))?;
        if !path.contains("{vm}") {
            return Err(format!(
                "`{s}`: the path must hold {{vm}}, each VM's QEMU has its own"
            ));
        }
        Ok(Self(path.to_owned()))
    }

    /// The QMP socket of `vm` (a plain name, checked by the caller).
    pub fn path(&self, vm: &str) -> PathBuf {
        PathBuf::from(self.0.replace("{vm}", vm))
    }
}

fn connect(path: &Path) -> Result<Qmp, String> {
    let mut qmp = Qmp::connect(path).map_err(|e| {
        format!(
            "the destination QEMU's QMP at {}: {e} (QEMU serves one client per QMP \
             socket: give vmotion-recv one of its own)",
            path.display()
        )
    })?;
    qmp.set_timeout(QMP_TIMEOUT);
    Ok(qmp)
}

/// Makes the destination QEMU at `qmp` ready for a tunnel of `connections` connections
/// delivered to `incoming` (a QEMU URI, `unix:PATH`): it must wait for a migration
/// (`inmigrate`, started with `-incoming defer`); `multifd` is set to match; then
/// `migrate-incoming`.
pub fn prepare(qmp: &Path, connections: u16, incoming: &str) -> Result<(), String> {
    let mut q = connect(qmp)?;
    let status = q.query_status().map_err(|e| e.to_string())?;
    if status != "inmigrate" {
        return Err(format!(
            "the destination QEMU at {} is `{status}`, not waiting for a migration \
             (start it with -incoming defer)",
            qmp.display()
        ));
    }
    let multifd = connections > 1;
    q.set_capabilities(&[("multifd", multifd)])
        .map_err(|e| e.to_string())?;
    if multifd {
        q.set_parameters(json!({ "multifd-channels": connections - 1 }))
            .map_err(|e| e.to_string())?;
    }
    q.migrate_incoming(incoming).map_err(|e| e.to_string())
}

/// Waits (up to `limit`) for the destination QEMU at `qmp` to run the guest: `Ok` with
/// the time it took, or `Err` with its last state.
pub fn wait_running(qmp: &Path, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut q = connect(qmp)?;
    loop {
        let status = q.query_status().map_err(|e| e.to_string())?;
        if status == "running" {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            let migration = q.query_migrate().map(|m| m.to_string()).unwrap_or_default();
            return Err(format!(
                "not running {limit:?} after its tunnel closed: `{status}` ({migration})"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_is_a_unix_path_naming_the_vm() {
        let t = QmpTemplate::parse("unix:/run/vmotion/{vm}.qmp").unwrap();
        assert_eq!(t.path("web-1"), PathBuf::from("/run/vmotion/web-1.qmp"));
        assert!(QmpTemplate::parse("/run/vmotion/{vm}.qmp").is_err());
        assert!(QmpTemplate::parse("unix:/run/vmotion/one.qmp").is_err());
    }
}
