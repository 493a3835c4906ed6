//! Real QEMU: a TLS migration with the credentials of `write_tls_creds`, both ends
//! verifying the other. Skips, saying why, without QEMU or the openssl CLI.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{BOOT_TIMEOUT, Scratch, config, spawn};
use vmotion_qemu::{Qemu, QemuConfig, idle_guest, write_tls_creds};

/// A destination for `source`'s guest, waiting for a TLS migration.
fn tls_destination(scratch: &Scratch, name: &str, creds: &str) -> Qemu {
    let mut cfg: QemuConfig = config(scratch, name, 64, &idle_guest());
    vmotion_qemu::create_zeroed(&cfg.mem_path, 64 << 20).unwrap();
    cfg.incoming = Some("defer".into());
    cfg.extra_args = vec![
        "-object".into(),
        format!("tls-creds-x509,id=tls0,dir={creds},endpoint=server,verify-peer=on"),
    ];
    let mut qemu = spawn(cfg);
    qemu.qmp()
        .set_parameters(json!({ "tls-creds": "tls0" }))
        .unwrap();
    qemu
}

#[test]
fn an_idle_guest_migrates_over_tls() {
    require_qemu!();
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: the openssl CLI is not installed");
        return;
    }
    let t0 = Instant::now();
    let scratch = Scratch::new("tls", 3 * (64 << 20));
    let creds = scratch.path("creds");
    write_tls_creds(&creds, &["localhost", "127.0.0.1"]).unwrap();
    let creds = creds.to_str().unwrap().to_owned();

    let mut src_cfg = config(&scratch, "src", 64, &idle_guest());
    src_cfg.extra_args = vec![
        "-object".into(),
        format!("tls-creds-x509,id=tls0,dir={creds},endpoint=client"),
    ];
    let accel = src_cfg.accel;
    let mut src = spawn(src_cfg);
    src.wait_started(BOOT_TIMEOUT).unwrap();

    // A host name the server certificate does not carry: the source refuses the
    // destination, stays running, and the destination exits.
    let mut wrong = tls_destination(&scratch, "wrong", &creds);
    let uri = format!("unix:{}", scratch.path("wrong.sock").display());
    wrong.qmp().migrate_incoming(&uri).unwrap();
    src.qmp()
        .set_parameters(json!({ "tls-creds": "tls0", "tls-hostname": "not-the-server" }))
        .unwrap();
    src.qmp().migrate(&uri).unwrap();
    let failed = src.qmp().wait_migration(Duration::from_secs(30)).unwrap();
    assert_eq!(failed["status"], "failed", "{failed}");
    let why = failed["error-desc"].as_str().unwrap_or_default();
    assert!(why.contains("does not match the hostname"), "{failed}");
    assert_eq!(src.qmp().query_status().unwrap(), "running");
    drop(wrong);

    // tcp:127.0.0.1 without tls-hostname: the certificate's IP entry matches.
    let mut dst = tls_destination(&scratch, "dst", &creds);
    dst.qmp().migrate_incoming("tcp:127.0.0.1:0").unwrap();
    let listening = dst.qmp().query_migrate().unwrap();
    let port = listening["socket-address"][0]["port"]
        .as_str()
        .unwrap_or_else(|| panic!("no port in {listening}"))
        .to_owned();
    src.qmp()
        .set_parameters(json!({ "tls-hostname": "", "max-bandwidth": 8u64 << 30 }))
        .unwrap();
    let t1 = Instant::now();
    src.qmp().migrate(&format!("tcp:127.0.0.1:{port}")).unwrap();
    let done = src.qmp().wait_migration(Duration::from_secs(60)).unwrap();
    eprintln!("{accel:?}: TLS migration in {:?}: {done}", t1.elapsed());
    assert_eq!(done["status"], "completed", "{done}");
    dst.qmp()
        .wait_status("running", Duration::from_secs(10))
        .unwrap();
    assert_eq!(src.qmp().query_status().unwrap(), "postmigrate");
    eprintln!("test took {:?}", t0.elapsed());
}
