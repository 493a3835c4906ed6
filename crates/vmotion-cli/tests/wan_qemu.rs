//! QEMU's own migration through the vmotion tunnel across the emulated long-distance link
//! (`vmotion_testbed::WanBed`: 150 ms round trip, 1 Gbit/s, 0.1 % loss), with the link
//! cut for 3 s while the memory crosses: `vmotion-send --tunnel` in host A,
//! `vmotion-recv --tunnel` in host B, the two QEMUs beside them on Unix sockets. The
//! tunnel's TCP connection rides the cut out, so QEMU's byte stream stays exact and its
//! migration completes with the destination's memory equal to the source's, one channel
//! and multifd. Skips, saying why, without QEMU or where namespaces cannot be made.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::qemu::*;
use common::*;
use serde_json::json;
use vmotion_testbed::{WanBed, WanLink};

/// At 24 MiB/s (QEMU's own cap) 256 MiB take about 10 s: the cut falls in the middle.
const MIB: u64 = 256;

fn cut_mid_migration(multifd: Option<u32>) {
    if vmotion_qemu::qemu_binary().is_none() {
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed");
        return;
    }
    if let Err(why) = vmotion_testbed::wan_available() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let emulator: PathBuf = keyservice_bin().with_file_name("vmotion-wan");
    let wan = WanBed::new(WanLink::long_distance(), &emulator).unwrap();
    let w = World::at(&wan.management_ip());
    w.policy("far-vm", "encryption = \"required\"\n");
    let run = w.p("run");
    std::fs::create_dir(&run).unwrap();
    let incoming = format!("unix:{}", run.join("{vm}.incoming").display());
    let mut recv = wan.command('b', RECV);
    recv.args(["--listen", &format!("{}:0", wan.wan_ip('b'))])
        .args(["--tunnel", &incoming])
        .args(w.identity("dst"));
    let (_recv, addr) = spawn_listening(&mut recv);

    let mut vms = qemus_with(&run, MIB, multifd, &[]);
    for q in [&mut vms.src, &mut vms.dst] {
        q.qmp()
            .set_parameters(json!({ "max-bandwidth": 24u64 << 20 }))
            .unwrap();
    }
    let dst_uri = format!("unix:{}", run.join("far-vm.incoming").display());
    vms.dst.qmp().migrate_incoming(&dst_uri).unwrap();
    let listen = run.join("out.sock");
    let mut send: Command = wan.command('a', SEND);
    send.args(["--vm", "far-vm", "--to", &addr, "--policy-dir"])
        .arg(w.p("policy"))
        .args(w.identity("src"))
        .args(["--destination", "dst", "--json", "--tunnel"])
        .arg(format!("unix:{}", listen.display()));
    let (_tunnel, said) = start_tunnel(send);
    assert!(said.contains("tunnel ready (encrypted"), "{said}");
    vms.src
        .qmp()
        .migrate(&format!("unix:{}", listen.display()))
        .unwrap();

    // A third of the memory across, then the link down for 3 s.
    let third = (MIB << 20) / 3;
    let mut last = serde_json::Value::Null;
    let going = eventually(Duration::from_secs(60), || {
        last = vms.src.qmp().query_migrate().unwrap();
        last["ram"]["transferred"]
            .as_u64()
            .is_some_and(|t| t > third)
    });
    assert!(going, "the migration never got going: {last}");
    let before = vms.src.qmp().query_migrate().unwrap();
    assert_eq!(before["status"], "active", "{before}");
    wan.set_link('a', false).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    wan.set_link('a', true).unwrap();

    let done = vms
        .src
        .qmp()
        .wait_migration(Duration::from_secs(120))
        .unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    vms.assert_arrived();
}

#[test]
fn qemu_through_the_tunnel_survives_a_three_second_cut() {
    cut_mid_migration(None);
}

#[test]
fn qemu_multifd_through_the_tunnel_survives_a_three_second_cut() {
    cut_mid_migration(Some(2));
}
