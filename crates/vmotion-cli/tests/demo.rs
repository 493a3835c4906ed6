//! The README's demo command, run as the binary it is.

use std::process::Command;

fn run(guest: &str) -> (std::process::Output, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmotion-demo"))
        .args([
            "--size-mib",
            "32",
            "--dirty-rate",
            "20000",
            "--streams",
            "2",
            "--guest",
            guest,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// The README's default: a KVM micro-VM where /dev/kvm opens, else a synthetic guest
/// with a note saying why.
#[test]
fn the_demo_migrates_a_kvm_micro_vm_or_says_why_not() {
    let (out, stdout, stderr) = run("auto");
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let needle = match vmotion_vmm::kvm_available() {
        Ok(()) => "verified: the guest runs at the destination",
        Err(_) => "the demo uses a synthetic guest instead of a KVM micro-VM",
    };
    assert!(
        stdout.contains(needle),
        "{needle:?} missing from:\n{stdout}"
    );
    assert!(stdout.contains("its own checksum") || needle.contains("synthetic"));
}

#[test]
fn the_demo_migrates_encrypted_and_verifies() {
    let (out, stdout, stderr) = run("synthetic");
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for needle in [
        "key service (mutual TLS 1.3)",
        "verified: the destination's 8192 pages equal the source's at pause time",
        "key service record: claimed by the destination",
        "encrypted (AES-256-GCM)",
        "demo complete",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
    // Not a terminal here: progress comes as plain lines, one per stage at least.
    assert!(
        stderr.contains("pre-copy") && stderr.contains("done"),
        "{stderr}"
    );
    assert!(!stderr.contains('\u{1b}'), "no escape codes off a terminal");
}
