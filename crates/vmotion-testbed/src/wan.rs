//! Two hosts joined by an emulated WAN link, made with network namespaces: host A and host
//! B each get a management link to this (the root) namespace over a veth pair — where a key
//! service listening on [`WanBed::management_ip`] serves both — and a migration link to
//! each other through `vmotion-wan` (delay, rate, loss; this kernel has no `netem`).
//! Everything is removed again on drop: the emulator, the namespaces, the veths.
//!
//! | link | host A | host B | root |
//! |---|---|---|---|
//! | migration (WAN) | `10.77.N.1` | `10.77.N.2` | — |
//! | management | `10.88.N.2` | `10.89.N.2` | `10.88.N.1`, `10.89.N.1` |
//!
//! Each namespace gets TCP buffers that can fill a long fat pipe (`tcp_rmem`/`tcp_wmem`
//! up to 64 MiB: 1 Gbit/s × 150 ms is 19 MB in flight), as an operator tunes a WAN host.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The link's properties (one way: the round trip is twice `delay`).
#[derive(Debug, Clone, Copy)]
pub struct WanLink {
    /// One-way delay.
    pub delay: Duration,
    /// Line rate, bits per second.
    pub rate_bps: f64,
    /// Probability a packet is lost.
    pub loss: f64,
    /// The MTU of the link.
    pub mtu: u16,
}

impl WanLink {
    /// Long-distance vMotion's limit: 150 ms round trip, 1 Gbit/s, 0.1 % loss.
    pub fn long_distance() -> Self {
        Self {
            delay: Duration::from_millis(75),
            rate_bps: 1e9,
            loss: 0.001,
            mtu: 9000,
        }
    }
}

/// Whether this machine can build a [`WanBed`] (root, `ip`, `/dev/net/tun`), or why not.
pub fn wan_available() -> Result<(), String> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("no /dev/net/tun".into());
    }
    let ok = Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err("`ip netns` does not work here (iproute2 missing, or not root)".into());
    }
    if !is_root() {
        return Err("not root: network namespaces need it".into());
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs `ip ARGS`; the error says what it refused.
pub fn ip(args: &[&str]) -> Result<(), String> {
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

/// Two namespaces joined by an emulated WAN link (see the module doc).
#[derive(Debug)]
pub struct WanBed {
    n: u32,
    tag: String,
    emulator: Option<Child>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl WanBed {
    /// Builds the two hosts and starts the link. `emulator` is the `vmotion-wan` binary.
    pub fn new(link: WanLink, emulator: &std::path::Path) -> Result<Self, String> {
        wan_available()?;
        let mut bed = Self::claim_number()?;
        bed.build(link, emulator)?;
        Ok(bed)
    }

    /// The first free bed number, from one of this process's own: its host A namespace is
    /// made at once, so two beds (nextest runs tests as separate processes) never share
    /// one, and a bed never removes anything another made.
    fn claim_number() -> Result<Self, String> {
        let first = std::process::id() + NEXT.fetch_add(1, Ordering::Relaxed) * 7919;
        for k in 0..250 {
            let n = (first + k) % 250 + 1;
            let tag = format!("vw{n}");
            if ip(&["netns", "add", &format!("{tag}a")]).is_ok() {
                return Ok(Self {
                    n,
                    tag,
                    emulator: None,
                });
            }
        }
        Err("no free WAN bed number (250 namespaces vw*a exist: `ip netns list`)".into())
    }

    /// Host A's or B's namespace name.
    pub fn ns(&self, host: char) -> String {
        format!("{}{host}", self.tag)
    }

    /// Host A's (`'a'`) or B's (`'b'`) address on the WAN link.
    pub fn wan_ip(&self, host: char) -> String {
        format!("10.77.{}.{}", self.n, if host == 'a' { 1 } else { 2 })
    }

    /// The root namespace's address on host A's management link: a service listening
    /// here is reachable from both hosts.
    pub fn management_ip(&self) -> String {
        format!("10.88.{}.1", self.n)
    }

    /// The WAN device inside `host`'s namespace (for `ip link set … down`).
    pub fn wan_dev(&self, host: char) -> String {
        format!("{}w{host}", self.tag)
    }

    /// A command that runs inside `host`'s namespace.
    pub fn command(&self, host: char, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)]).arg(program);
        c
    }

    /// Sets host `host`'s end of the WAN link down (a cut) or up again.
    pub fn set_link(&self, host: char, up: bool) -> Result<(), String> {
        let (ns, dev) = (self.ns(host), self.wan_dev(host));
        let state = if up { "up" } else { "down" };
        ip(&["netns", "exec", &ns, "ip", "link", "set", &dev, state])
    }

    fn build(&mut self, link: WanLink, emulator: &std::path::Path) -> Result<(), String> {
        for (host, subnet) in [('a', 88), ('b', 89)] {
            let (ns, root_dev) = (self.ns(host), format!("{}m{host}", self.tag));
            if host == 'b' {
                ip(&["netns", "add", &ns])?;
            }
            ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
            ip(&[
                "link", "add", &root_dev, "type", "veth", "peer", "name", "mgmt", "netns", &ns,
            ])?;
            let root_ip = format!("10.{subnet}.{}.1", self.n);
            ip(&["addr", "add", &format!("{root_ip}/30"), "dev", &root_dev])?;
            ip(&["link", "set", &root_dev, "up"])?;
            let host_ip = format!("10.{subnet}.{}.2/30", self.n);
            let exec = ["netns", "exec", ns.as_str(), "ip"];
            let in_ns = |rest: &[&str]| ip(&[&exec[..], rest].concat());
            in_ns(&["addr", "add", &host_ip, "dev", "mgmt"])?;
            in_ns(&["link", "set", "mgmt", "up"])?;
            in_ns(&["route", "add", "default", "via", &root_ip])?;
            self.tune_tcp(&ns)?;
        }
        let mut child = Command::new(emulator)
            .args(["--dev-a", &self.wan_dev('a'), "--dev-b", &self.wan_dev('b')])
            .args(["--ns-a", &self.ns('a'), "--ns-b", &self.ns('b')])
            .args(["--addr-a", &self.wan_ip('a'), "--addr-b", &self.wan_ip('b')])
            .args(["--delay-ms", &format!("{}", link.delay.as_secs_f64() * 1e3)])
            .args(["--rate-mbit", &format!("{}", link.rate_bps / 1e6)])
            .args(["--loss", &format!("{}", link.loss)])
            .args(["--mtu", &link.mtu.to_string()])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", emulator.display()))?;
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped");
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        self.emulator = Some(child);
        if line.trim() != "ready" {
            return Err("the WAN emulator did not start".into());
        }
        Ok(())
    }

    /// Buffers for a long fat pipe, in this namespace only.
    fn tune_tcp(&self, ns: &str) -> Result<(), String> {
        for (key, value) in [
            ("ipv4/tcp_rmem", "4096 131072 67108864"),
            ("ipv4/tcp_wmem", "4096 65536 67108864"),
            // A stream that paused between passes keeps its window instead of starting
            // over from slow start, which on 150 ms costs seconds (measured).
            ("ipv4/tcp_slow_start_after_idle", "0"),
        ] {
            // /proc/sys/net shows the namespace of the process that opens it.
            let ok = Command::new("ip")
                .args(["netns", "exec", ns, "sh", "-c"])
                .arg(format!("echo '{value}' > /proc/sys/net/{key}"))
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err(format!("net.{key} in {ns}"));
            }
        }
        Ok(())
    }

    fn remove(&mut self) {
        if let Some(mut e) = self.emulator.take() {
            let _ = e.kill();
            let _ = e.wait();
        }
        for host in ['a', 'b'] {
            let _ = ip(&["link", "del", &format!("{}m{host}", self.tag)]);
            let _ = ip(&["netns", "del", &self.ns(host)]);
        }
    }
}

impl Drop for WanBed {
    fn drop(&mut self) {
        self.remove();
    }
}
