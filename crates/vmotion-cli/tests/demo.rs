//! The README's demo command, run as the binary it is.

use std::process::Command;

#[test]
fn the_demo_migrates_encrypted_and_verifies() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmotion-demo"))
        .args([
            "--size-mib",
            "32",
            "--dirty-rate",
            "20000",
            "--streams",
            "2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for needle in [
        "key service (mutual TLS 1.3)",
        "verified: the destination's 8192 pages equal the source's at pause time",
        "key service record: committed",
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
