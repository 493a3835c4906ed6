//! Policy files as an operator writes them: the repo's examples load, VM files override
//! defaults key by key, and every mistake is an error naming the file, the line and the
//! key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmotion_engine::OnLimit;
use vmotion_policy::{PolicyError, load};
use vmotion_proto::EncryptionPolicy;

fn repo_policy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policy")
}

#[test]
fn the_example_files_load() {
    let dir = repo_policy_dir();
    let web = load(&dir, "web-1").unwrap();
    assert_eq!(web.vm_policy.effective(), EncryptionPolicy::Opportunistic);
    assert_eq!(web.convergence.max_downtime, Duration::from_millis(100));
    assert_eq!(web.streams, 4, "overrides the default 2");
    assert_eq!(web.convergence.max_iterations, 30, "from defaults.toml");
    assert_eq!(web.macs, [[0x52, 0x54, 0, 0x12, 0x34, 0x56]]);
    assert_eq!(
        web.ips,
        ["192.0.2.10".parse::<std::net::Ipv4Addr>().unwrap()]
    );

    let vault = load(&dir, "vault").unwrap();
    assert_eq!(
        vault.vm_policy.encryption,
        EncryptionPolicy::Opportunistic,
        "from defaults"
    );
    assert_eq!(
        vault.vm_policy.effective(),
        EncryptionPolicy::Required,
        "encrypted = true wins"
    );

    let batch = load(&dir, "batch-7").unwrap();
    assert_eq!(batch.vm_policy.effective(), EncryptionPolicy::Disabled);
    assert_eq!(batch.max_bandwidth, Some(200_000_000));
    assert_eq!(batch.convergence.on_limit, OnLimit::Force);
}

fn folder(defaults: Option<&str>, vm: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    if let Some(text) = defaults {
        std::fs::write(d.path().join("defaults.toml"), text).unwrap();
    }
    std::fs::write(d.path().join("vm.toml"), vm).unwrap();
    d
}

#[test]
fn built_in_defaults_apply_without_a_defaults_file() {
    let d = folder(None, "");
    let p = load(d.path(), "vm").unwrap();
    assert_eq!(p.vm_policy.effective(), EncryptionPolicy::Opportunistic);
    assert_eq!(p.streams, 1);
    assert_eq!(p.max_bandwidth, None);
    assert_eq!(p.switchover_timeout, Duration::from_secs(10));
}

fn err(defaults: Option<&str>, vm: &str) -> String {
    let d = folder(defaults, vm);
    let e = load(d.path(), "vm").unwrap_err();
    assert!(matches!(e, PolicyError::Invalid { .. }), "{e}");
    e.to_string()
}

#[test]
fn every_mistake_names_file_line_and_key() {
    let cases: &[(&str, &[&str])] = &[
        ("streams = 4\ncolour = \"blue\"\n", &["vm.toml:2", "colour"]),
        ("encryption = \"maybe\"\n", &["vm.toml:1", "maybe"]),
        (
            "\n\nstreams = 0\n",
            &["vm.toml:3", "streams", "from 1 to 256"],
        ),
        ("max_downtime_ms = -5\n", &["vm.toml:1", "max_downtime_ms"]),
        (
            "switchover_timeout = \"soon\"\n",
            &["vm.toml:1", "switchover_timeout", "soon"],
        ),
        (
            "max_bandwidth = \"fast\"\n",
            &["vm.toml:1", "max_bandwidth", "fast"],
        ),
        ("max_bandwidth = 0\n", &["vm.toml:1", "max_bandwidth"]),
        (
            "macs = [\"52:54:00\"]\n",
            &["vm.toml:1", "macs", "52:54:00"],
        ),
        ("ips = [\"300.1.1.1\"]\n", &["vm.toml:1", "ips"]),
        (
            "throttle_max_percent = 100\n",
            &["vm.toml:1", "throttle_max_percent"],
        ),
        ("encrypted = \"yes\"\n", &["vm.toml:1", "encrypted"]),
        ("streams = \n", &["vm.toml:1"]),
    ];
    for (text, needles) in cases {
        let msg = err(None, text);
        for n in *needles {
            assert!(msg.contains(n), "{n:?} not in {msg:?} (for {text:?})");
        }
    }
    // A mistake in defaults.toml names that file.
    let msg = err(Some("on_limit = \"panic\"\n"), "");
    assert!(
        msg.contains("defaults.toml:1") && msg.contains("panic"),
        "{msg}"
    );
}

#[test]
fn a_vm_without_a_file_is_refused_by_name() {
    let d = folder(Some(""), "");
    let e = load(d.path(), "web-9").unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, PolicyError::Missing { .. }));
    assert!(
        msg.contains("web-9.toml") && msg.contains("no policy file for VM `web-9`"),
        "{msg}"
    );
    for bad in ["../etc/passwd", "defaults", "", ".x"] {
        assert!(
            matches!(load(d.path(), bad), Err(PolicyError::BadName(_))),
            "{bad}"
        );
    }
}

#[test]
fn throttle_start_above_its_maximum_is_refused() {
    let msg = err(
        None,
        "throttle_initial_percent = 60\nthrottle_max_percent = 50\n",
    );
    assert!(msg.contains("throttle_initial_percent"), "{msg}");
}
