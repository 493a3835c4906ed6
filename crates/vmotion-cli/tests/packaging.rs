//! Packaging, as an operator installs it: `scripts/dist.sh` lays out the built binaries,
//! their man pages and shell completions (generated from the programs' own argument
//! definitions) and the systemd units, and the units pass `systemd-analyze verify`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const BINS: &[&str] = &[
    "vmotion-send",
    "vmotion-recv",
    "vmotion-evacuate",
    "vmotion-keyservice",
    "vmotion-demo",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The folder of the binaries this test run built.
fn bin_dir() -> PathBuf {
    Path::new(SEND).parent().unwrap().to_owned()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn dist_lays_out_binaries_man_pages_completions_and_units() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(workspace().join("scripts/dist.sh"))
        .arg(out.path())
        .args(["--prefix", "/opt/vmotion", "--bin-dir"])
        .arg(bin_dir())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "dist.sh: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let o = out.path();
    for b in BINS {
        assert!(o.join("bin").join(b).is_file(), "{b}");
        let man = read(&o.join(format!("share/man/man1/{b}.1")));
        assert!(man.contains(&format!(".TH {b} 1")), "{b}: {man}");
        assert!(read(&o.join(format!("share/bash-completion/completions/{b}"))).contains(b));
        assert!(read(&o.join(format!("share/zsh/site-functions/_{b}"))).contains(b));
        assert!(read(&o.join(format!("share/fish/vendor_completions.d/{b}.fish"))).contains(b));
    }
    // The pages are the programs' own flags, recent ones included.
    let send = read(&o.join("share/man/man1/vmotion-send.1"));
    for flag in ["\\-\\-qemu", "\\-\\-tunnel", "\\-\\-queue\\-timeout"] {
        assert!(send.contains(flag), "vmotion-send(1) lacks {flag}");
    }
    assert!(read(&o.join("share/man/man1/vmotion-recv.1")).contains("\\-\\-qemu\\-qmp"));
    let unit = read(&o.join("lib/systemd/system/vmotion-recv.service"));
    assert!(
        unit.contains("ExecStart=/opt/vmotion/bin/vmotion-recv "),
        "{unit}"
    );
    assert!(!unit.contains("@BINDIR@"));
}

/// `systemd-analyze verify` of the units as installed, quiet: it reports a bad setting
/// only as a line of output, so any output fails (shown to fail on a bad value below).
#[test]
fn the_systemd_units_verify() {
    let has = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        eprintln!("SKIPPED: systemd-analyze not found (Debian's systemd package)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let verify = |name: &str, text: &str| {
        let unit = dir.path().join(name);
        std::fs::write(&unit, text).unwrap();
        let o = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), said)
    };
    let bins = bin_dir().canonicalize().unwrap();
    for name in ["vmotion-recv.service", "vmotion-keyservice.service"] {
        let text = read(&workspace().join("packaging/systemd").join(name))
            .replace("@BINDIR@", bins.to_str().unwrap());
        let (ok, said) = verify(name, &text);
        assert!(ok && said.trim().is_empty(), "{name}: {said}");
        // The check can fail: the same unit with one bad value does.
        let broken = text.replace("ProtectSystem=strict", "ProtectSystem=sometimes");
        let (_, said) = verify(&format!("broken-{name}"), &broken);
        assert!(
            said.contains("ProtectSystem") || said.contains("protect system"),
            "{said}"
        );
    }
}
