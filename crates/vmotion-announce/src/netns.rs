//! A throw-away network namespace with a veth pair, for testing announcements on a real
//! (virtual) link without touching the host's interfaces. Needs root and iproute2.

use std::process::Command;

/// A network namespace holding a veth pair `va`/`vb` (and `lo`), all up; deleted on drop.
#[derive(Debug)]
pub struct TestNetns(String);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl TestNetns {
    /// Creates `vmo-TAG-PID`; the error says what `ip` refused (no root, no iproute2).
    pub fn create(tag: &str) -> Result<Self, String> {
        let name = format!("vmo-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Self(name.clone());
        ip(&[
            "netns", "exec", &name, "ip", "link", "add", "va", "type", "veth", "peer", "name", "vb",
        ])?;
        for dev in ["va", "vb", "lo"] {
            ip(&["netns", "exec", &name, "ip", "link", "set", dev, "up"])?;
        }
        Ok(ns)
    }

    /// A command that runs `program` inside the namespace.
    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
