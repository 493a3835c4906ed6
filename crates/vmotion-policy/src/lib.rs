//! # vmotion-policy: per-VM policy files
//!
//! A policy folder holds `defaults.toml` (optional) and one `NAME.toml` per VM. A VM's file
//! overrides the defaults key by key; keys set in neither take the built-in defaults below.
//! Every key is documented in `docs/policy.md`. Unknown keys, bad values and a missing file
//! for a named VM are errors that name the file, the line and the key.
//!
//! ```toml
//! encryption = "required"        # "disabled" | "opportunistic" (default) | "required"
//! encrypted = false              # the VM itself is encrypted: always migrated as required
//! max_downtime_ms = 300          # longest acceptable pause
//! max_bandwidth = "1GB/s"        # or "unlimited" (default), or bytes per second
//! streams = 4                    # data connections
//! max_iterations = 30            # pre-copy iterations after the full pass
//! max_precopy_time = "5m"        # longest pre-copy phase
//! on_limit = "abort"             # "abort" (VM stays at the source) | "force"
//! auto_converge = true           # throttle a guest that dirties faster than the link
//! throttle_initial_percent = 20
//! throttle_step_percent = 10
//! throttle_max_percent = 99
//! switchover_timeout = "10s"     # pause to Ready
//! claim_timeout = "10s"          # Commit to the destination's claim, then revert
//! progress_timeout = "150s"      # no progress for this long: abort
//! macs = ["52:54:00:12:34:56"]   # announced after the switchover
//! ips = ["192.0.2.10"]           # gratuitous ARP for these
//! ```

#![forbid(unsafe_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vmotion_engine::{AutoConverge, ConvergencePolicy, OnLimit};
use vmotion_proto::{EncryptionPolicy, VmPolicy};

/// Everything a VM's policy decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The VM's name (the file it came from).
    pub vm: String,
    /// Encryption policy and the `encrypted` flag.
    pub vm_policy: VmPolicy,
    /// Convergence knobs.
    pub convergence: ConvergencePolicy,
    /// Bandwidth cap, bytes per second (`None`: unlimited).
    pub max_bandwidth: Option<u64>,
    /// Data streams.
    pub streams: u16,
    /// Pause-to-Ready limit.
    pub switchover_timeout: Duration,
    /// `Commit` to the destination's claim; past it the source tries to take the VM back.
    pub claim_timeout: Duration,
    /// No progress (no bytes taken, nothing heard) for this long aborts the migration.
    pub progress_timeout: Duration,
    /// MAC addresses to announce after the switchover.
    pub macs: Vec<[u8; 6]>,
    /// IPv4 addresses to announce with gratuitous ARP.
    pub ips: Vec<Ipv4Addr>,
}

/// What is wrong with a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The VM has no policy file.
    #[error("{path}: no policy file for VM `{vm}` (create it, or copy {defaults})")]
    Missing {
        /// The file expected.
        path: PathBuf,
        /// The VM.
        vm: String,
        /// The defaults file to start from.
        defaults: PathBuf,
    },
    /// The VM name cannot name a file.
    #[error("`{0}` is not a valid VM name (1 to 255 of A-Z a-z 0-9 . _ -, not starting with '.')")]
    BadName(String),
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A syntax error, an unknown key or a bad value.
    #[error("{path}:{line}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 if unknown).
        line: usize,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// Whether `vm` may name a policy file.
pub fn valid_vm_name(vm: &str) -> bool {
    !vm.is_empty()
        && vm.len() <= 255
        && !vm.starts_with('.')
        && vm
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    encryption: Option<Encryption>,
    encrypted: Option<bool>,
    #[serde(default, deserialize_with = "downtime")]
    max_downtime_ms: Option<u64>,
    #[serde(default, deserialize_with = "bandwidth")]
    max_bandwidth: Option<Bandwidth>,
    #[serde(default, deserialize_with = "streams")]
    streams: Option<u16>,
    #[serde(default, deserialize_with = "iterations")]
    max_iterations: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    max_precopy_time: Option<Duration>,
    on_limit: Option<OnLimitRaw>,
    auto_converge: Option<bool>,
    #[serde(default, deserialize_with = "percent")]
    throttle_initial_percent: Option<u8>,
    #[serde(default, deserialize_with = "percent")]
    throttle_step_percent: Option<u8>,
    #[serde(default, deserialize_with = "percent")]
    throttle_max_percent: Option<u8>,
    #[serde(default, deserialize_with = "duration")]
    switchover_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    claim_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    progress_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "macs")]
    macs: Option<Vec<[u8; 6]>>,
    ips: Option<Vec<Ipv4Addr>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Encryption {
    Disabled,
    Opportunistic,
    Required,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OnLimitRaw {
    Abort,
    Force,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bandwidth {
    Unlimited,
    BytesPerSecond(u64),
}

fn custom<E: serde::de::Error>(msg: String) -> E {
    E::custom(msg)
}

fn ranged<'de, D, T>(d: D, lo: T, hi: T, what: &str) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + PartialOrd + std::fmt::Display + Copy,
{
    let v = T::deserialize(d)?;
    if v < lo || v > hi {
        return Err(custom(format!("{what} must be from {lo} to {hi}, not {v}")));
    }
    Ok(Some(v))
}

fn downtime<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    ranged(d, 1u64, 600_000, "max_downtime_ms")
}

fn streams<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    ranged(d, 1u16, 256, "streams")
}

fn iterations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    ranged(d, 1u32, 10_000, "max_iterations")
}

fn percent<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    ranged(d, 0u8, 99, "a throttle percentage")
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    let v = humantime::parse_duration(&s).map_err(|e| {
        custom(format!(
            "`{s}` is not a duration ({e}); write e.g. \"10s\" or \"5m\""
        ))
    })?;
    if v.is_zero() || v > Duration::from_secs(24 * 3600) {
        return Err(custom(format!(
            "`{s}` must be more than 0 and at most 24 hours"
        )));
    }
    Ok(Some(v))
}

/// `"unlimited"`, a number of bytes per second, or `"<number><unit>/s"` with units B, KB,
/// MB, GB (powers of 1000) or KiB, MiB, GiB (powers of 1024).
fn parse_bandwidth(s: &str) -> Result<Bandwidth, String> {
    let t = s.trim();
    if t == "unlimited" {
        return Ok(Bandwidth::Unlimited);
    }
    let body = t.strip_suffix("/s").ok_or_else(|| {
        format!("`{s}` is not a bandwidth; write e.g. \"800MB/s\" or \"unlimited\"")
    })?;
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (num, unit) = body.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: `{num}` is not a number"))?;
    let scale = match unit.trim() {
        "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    let v = n * scale;
    if !(1.0..=1e13).contains(&v) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Bandwidth::BytesPerSecond(v as u64))
}

/// Parses a bandwidth as policy files write it (`"unlimited"`, `"800MB/s"`, `"1GiB/s"`):
/// bytes per second, `None` for unlimited. For command-line flags that override a policy.
pub fn parse_bandwidth_flag(s: &str) -> Result<Option<u64>, String> {
    match parse_bandwidth(s)? {
        Bandwidth::Unlimited => Ok(None),
        Bandwidth::BytesPerSecond(b) => Ok(Some(b)),
    }
}

fn bandwidth<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Bandwidth>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Number(u64),
        Text(String),
    }
    match Value::deserialize(d)? {
        Value::Number(0) => Err(custom(
            "max_bandwidth must be above 0 (or \"unlimited\")".into(),
        )),
        Value::Number(n) => Ok(Some(Bandwidth::BytesPerSecond(n))),
        Value::Text(s) => parse_bandwidth(&s).map(Some).map_err(custom),
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

fn macs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<[u8; 6]>>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    list.iter()
        .map(|s| {
            parse_mac(s)
                .ok_or_else(|| custom(format!("`{s}` is not a MAC address (aa:bb:cc:dd:ee:ff)")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// "line N, key `k`: message" from a toml error.
fn invalid(path: &Path, text: &str, e: &toml::de::Error) -> PolicyError {
    let message = e.message().trim_end().to_owned();
    let (line, message) = match e.span() {
        None => (0, message),
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let source = text.lines().nth(line - 1).unwrap_or("").trim();
            match source.split_once('=') {
                Some((key, _)) if !message.contains(&format!("`{}`", key.trim())) => {
                    (line, format!("key `{}`: {message}", key.trim()))
                }
                _ => (line, message),
            }
        }
    };
    PolicyError::Invalid {
        path: path.to_owned(),
        line,
        message,
    }
}

fn read(path: &Path) -> Result<Option<Raw>, PolicyError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PolicyError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| invalid(path, &text, &e))
}

macro_rules! merge {
    ($vm:expr, $defaults:expr, $($field:ident),*) => {
        Raw { $($field: $vm.$field.or($defaults.$field)),* }
    };
}

/// Loads VM `vm`'s policy from the folder `dir`: `dir/vm.toml` over `dir/defaults.toml`
/// over the built-in defaults.
pub fn load(dir: &Path, vm: &str) -> Result<Policy, PolicyError> {
    if !valid_vm_name(vm) || vm == "defaults" {
        return Err(PolicyError::BadName(vm.to_owned()));
    }
    let defaults_path = dir.join("defaults.toml");
    let defaults = read(&defaults_path)?.unwrap_or_default();
    let path = dir.join(format!("{vm}.toml"));
    let own = read(&path)?.ok_or_else(|| PolicyError::Missing {
        path: path.clone(),
        vm: vm.to_owned(),
        defaults: defaults_path.clone(),
    })?;
    let r = merge!(
        own,
        defaults,
        encryption,
        encrypted,
        max_downtime_ms,
        max_bandwidth,
        streams,
        max_iterations,
        max_precopy_time,
        on_limit,
        auto_converge,
        throttle_initial_percent,
        throttle_step_percent,
        throttle_max_percent,
        switchover_timeout,
        claim_timeout,
        progress_timeout,
        macs,
        ips
    );
    let base = ConvergencePolicy::default();
    let ac = AutoConverge::default();
    let auto_converge = AutoConverge {
        enabled: r.auto_converge.unwrap_or(ac.enabled),
        initial_percent: r.throttle_initial_percent.unwrap_or(ac.initial_percent),
        step_percent: r.throttle_step_percent.unwrap_or(ac.step_percent),
        max_percent: r.throttle_max_percent.unwrap_or(ac.max_percent),
        ..ac
    };
    if auto_converge.initial_percent > auto_converge.max_percent {
        return Err(PolicyError::Invalid {
            path,
            line: 0,
            message: "key `throttle_initial_percent` is above `throttle_max_percent`".into(),
        });
    }
    Ok(Policy {
        vm: vm.to_owned(),
        vm_policy: VmPolicy {
            encryption: match r.encryption.unwrap_or(Encryption::Opportunistic) {
                Encryption::Disabled => EncryptionPolicy::Disabled,
                Encryption::Opportunistic => EncryptionPolicy::Opportunistic,
                Encryption::Required => EncryptionPolicy::Required,
            },
            vm_encrypted: r.encrypted.unwrap_or(false),
        },
        convergence: ConvergencePolicy {
            max_downtime: r
                .max_downtime_ms
                .map_or(base.max_downtime, Duration::from_millis),
            max_iterations: r.max_iterations.unwrap_or(base.max_iterations),
            max_total_time: r.max_precopy_time.unwrap_or(base.max_total_time),
            on_limit: match r.on_limit {
                Some(OnLimitRaw::Force) => OnLimit::Force,
                Some(OnLimitRaw::Abort) | None => OnLimit::Abort,
            },
            auto_converge,
        },
        max_bandwidth: match r.max_bandwidth.unwrap_or(Bandwidth::Unlimited) {
            Bandwidth::Unlimited => None,
            Bandwidth::BytesPerSecond(b) => Some(b),
        },
        streams: r.streams.unwrap_or(1),
        switchover_timeout: r.switchover_timeout.unwrap_or(Duration::from_secs(10)),
        claim_timeout: r.claim_timeout.unwrap_or(Duration::from_secs(10)),
        progress_timeout: r.progress_timeout.unwrap_or(Duration::from_secs(150)),
        macs: r.macs.unwrap_or_default(),
        ips: r.ips.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidths_parse() {
        for (s, v) in [
            ("unlimited", Bandwidth::Unlimited),
            ("800MB/s", Bandwidth::BytesPerSecond(800_000_000)),
            ("1.5GiB/s", Bandwidth::BytesPerSecond(1_610_612_736)),
            ("64 KiB/s", Bandwidth::BytesPerSecond(65_536)),
            ("10B/s", Bandwidth::BytesPerSecond(10)),
        ] {
            assert_eq!(parse_bandwidth(s), Ok(v), "{s}");
        }
        for bad in ["fast", "800MB", "800XB/s", "0MB/s", "-1MB/s", "1e99GB/s"] {
            assert!(parse_bandwidth(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("52:54:00:12:34:5f"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x5f])
        );
        for bad in [
            "52:54:00:12:34",
            "52-54-00-12-34-56",
            "5254:00:12:34:56:7",
            "zz:54:00:12:34:56",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn vm_names() {
        for good in ["web-1", "db_2.prod", "A"] {
            assert!(valid_vm_name(good));
        }
        for bad in ["", ".hidden", "a/b", "../x", "a b", &"x".repeat(256)] {
            assert!(!valid_vm_name(bad), "{bad}");
        }
    }
}
