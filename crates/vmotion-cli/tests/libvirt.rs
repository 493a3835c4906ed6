//! libvirt through vmotion: `virsh migrate --live` between two real libvirt daemons
//! (Debian's libvirt 9.0), each a "host" in its own mount namespace
//! (`scripts/libvirt-host.sh`), moves the Linux guest with QEMU's migration stream inside
//! an encrypted vmotion tunnel: `vmotion-send --tunnel unix:/run/vmotion/VM.migrate --
//! virsh migrate ... --migrateuri unix:///run/vmotion/VM.migrate` on the source host, a
//! `vmotion-recv --tunnel 'unix:/run/vmotion/{vm}.migrate'` on the destination host, keys
//! from a live key service. The same path names a different socket on each host, so
//! nothing but the tunnel joins them.
//!
//! Skips, saying why, without root, libvirt (`scripts/install-libvirt.sh`), QEMU or the
//! Linux guest. The guest runs under TCG (see `vmotion_qemu::linux`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use vmotion_qemu::linux::{self, LinuxGuest};

const VM: &str = "web-1";

/// Why the test cannot run here, if it cannot.
fn missing() -> Option<String> {
    if vmotion_qemu::qemu_binary().is_none() {
        return Some("qemu-system-x86_64 is not installed".into());
    }
    for tool in ["libvirtd", "virsh", "unshare", "nsenter"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "{tool} not found (scripts/install-libvirt.sh installs libvirt)"
            ));
        }
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root {
        return Some("not root: the libvirt hosts need mount namespaces".into());
    }
    LinuxGuest::in_dir(&linux::default_dir()).err()
}

/// One libvirt "host": a libvirtd in its own mount namespace.
struct Host {
    dir: PathBuf,
    daemon: Child,
}

impl Host {
    fn start(dir: &Path, name: &str, uuid: &str) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/libvirt-host.sh");
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        let daemon = Command::new(script)
            .arg(dir)
            .args([name, uuid])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let host = Self {
            dir: dir.to_owned(),
            daemon,
        };
        let up = eventually(Duration::from_secs(60), || {
            host.dir.join("libvirtd.pid").exists() && host.virsh(&["hostname"]).status.success()
        });
        assert!(
            up,
            "libvirtd {name} did not start: {}",
            std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
        );
        host
    }

    fn uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}",
            self.dir.join("sock/libvirt-sock").display()
        )
    }

    fn virsh(&self, args: &[&str]) -> Output {
        Command::new("virsh")
            .args(["-c", &self.uri()])
            .args(args)
            .output()
            .unwrap()
    }

    /// `PROGRAM` run in this host's namespaces.
    fn inside(&self, program: &str) -> Command {
        let pid = std::fs::read_to_string(self.dir.join("libvirtd.pid")).unwrap();
        let mut c = Command::new("nsenter");
        c.args(["--mount", "--uts", "--target", pid.trim(), "--", program]);
        c
    }

    /// The guest's serial log on this host.
    fn serial(&self) -> PathBuf {
        self.dir.join(format!("log/qemu/{VM}-serial.log"))
    }

    fn state(&self) -> String {
        String::from_utf8_lossy(&self.virsh(&["domstate", VM]).stdout)
            .trim()
            .to_owned()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Domains outlive their libvirtd: destroy them first.
        let _ = self.virsh(&["destroy", VM]);
        let _ = Command::new("kill")
            .args(["-TERM", &self.daemon.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.daemon.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// The guest's domain: the Linux guest booted directly, its serial console in a file.
fn domain_xml(guest: &LinuxGuest) -> String {
    format!(
        "<domain type='qemu'><name>{VM}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\
         <cmdline>console=ttyS0 quiet panic=-1</cmdline></os>\
         <features><acpi/></features>\
         <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>\
         <devices><emulator>{}</emulator><controller type='usb' model='none'/>\
         <serial type='file'><source path='/var/log/libvirt/qemu/{VM}-serial.log' append='on'/>\
         <target port='0'/></serial><video><model type='none'/></video>\
         <memballoon model='none'/></devices></domain>",
        guest.kernel.canonicalize().unwrap().display(),
        guest.initrd.canonicalize().unwrap().display(),
        vmotion_qemu::qemu_binary().unwrap().display(),
    )
}

/// A `vmotion-recv --tunnel` in `host`, as `identity` at the key service.
fn daemon(w: &World, host: &Host, identity: &str, extra: &[&str]) -> (Proc, String) {
    let mut cmd = host.inside(RECV);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--tunnel",
        "unix:/run/vmotion/{vm}.migrate",
    ])
    .args(extra)
    .args(w.identity(identity));
    spawn_listening(&mut cmd)
}

/// `vmotion-send --tunnel ... -- virsh migrate ...` from `from` (as `identity`) to the
/// daemon at `addr` on `to` (as `destination`), with more `virsh migrate` flags.
fn migrate(
    w: &World,
    (from, identity): (&Host, &str),
    (to, destination, addr): (&Host, &str, &str),
    virsh_flags: &[&str],
) -> (Option<i32>, String, String) {
    let path = format!("/run/vmotion/{VM}.migrate");
    let out = from
        .inside(SEND)
        .args(["--vm", VM, "--to", addr, "--policy-dir"])
        .arg(w.p("policy"))
        .args(w.identity(identity))
        .args(["--destination", destination, "--json"])
        .args(["--tunnel", &format!("unix:{path}"), "--"])
        .args([
            "virsh",
            "-c",
            &from.uri(),
            "migrate",
            "--live",
            "--persistent",
        ])
        .args(["--undefinesource", VM, "--desturi", &to.uri()])
        .args(["--migrateuri", &format!("unix://{path}")])
        .args(virsh_flags)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Checks a completed hop's report and records, and returns the report.
fn completed(
    w: &World,
    (code, out, err): (Option<i32>, String, String),
    connections: u64,
) -> Value {
    assert_eq!(code, Some(0), "{out}\n{err}");
    let report: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("not a JSON report ({e}): {out}\n{err}"));
    assert_eq!(report["outcome"], "completed", "{report}");
    let tunnel = &report["tunnel"];
    assert_eq!(tunnel["mode"], "encrypted", "{report}");
    assert_eq!(tunnel["connections"], connections, "{report}");
    assert!(
        tunnel["bytes_from_destination"].as_u64().unwrap() > 0,
        "QEMU's return path crossed back: {report}"
    );
    let id = tunnel["migration_id"].as_str().unwrap();
    assert_eq!(w.outcome(id).as_deref(), Some("committed"), "{report}");
    report
}

/// The text of `log` from byte `from` on, written to `to` (a host's serial log holds
/// every stay of the guest there, appended).
fn tail_from(log: &Path, from: usize, to: &Path) -> usize {
    let all = std::fs::read(log).unwrap_or_default();
    std::fs::write(to, &all[from.min(all.len())..]).unwrap();
    all.len()
}

#[test]
fn virsh_migrate_live_goes_through_the_encrypted_tunnel_and_back() {
    if let Some(why) = missing() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let guest = LinuxGuest::in_dir(&linux::default_dir()).unwrap();
    let w = World::new();
    w.policy(VM, "encryption = \"required\"\n");
    let lab = tempfile::tempdir().unwrap();
    let src = Host::start(
        &lab.path().join("src"),
        "src-host",
        "11111111-1111-4111-8111-111111111111",
    );
    let dst = Host::start(
        &lab.path().join("dst"),
        "dst-host",
        "22222222-2222-4222-8222-222222222222",
    );
    let xml = lab.path().join("domain.xml");
    std::fs::write(&xml, domain_xml(&guest)).unwrap();
    let defined = src.virsh(&["define", xml.to_str().unwrap()]);
    assert!(defined.status.success(), "{defined:?}");
    let started = src.virsh(&["start", VM]);
    assert!(started.status.success(), "{started:?}");
    assert!(
        eventually(Duration::from_secs(120), || !linux::heartbeats(
            &src.serial()
        )
        .unwrap()
        .is_empty()),
        "no heartbeat from the guest under libvirt"
    );

    // A destination that cannot encrypt: refused before virsh even runs; the guest stays.
    let (weak, weak_addr) = daemon(&w, &dst, "dst", &["--no-encryption"]);
    let (code, out, err) = migrate(&w, (&src, "src"), (&dst, "dst", &weak_addr), &[]);
    assert_eq!(code, Some(3), "{out}\n{err}");
    assert!(err.contains("requires encryption"), "{err}");
    assert_eq!(src.state(), "running");
    drop(weak);

    // src → dst, one connection.
    let (_recv_dst, dst_addr) = daemon(&w, &dst, "dst", &[]);
    let hop1 = migrate(&w, (&src, "src"), (&dst, "dst", &dst_addr), &[]);
    completed(&w, hop1, 1);
    assert_eq!(dst.state(), "running");
    let listed = src.virsh(&["list", "--all", "--name"]);
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(VM),
        "the source no longer has the domain"
    );
    let on_src = lab.path().join("1-src.serial");
    let src_len = tail_from(&src.serial(), 0, &on_src);

    // dst → src, multifd with 2 channels (3 connections).
    let (_recv_src, src_addr) = daemon(&w, &src, "src", &[]);
    let flags = ["--parallel", "--parallel-connections", "2"];
    let hop2 = migrate(&w, (&dst, "dst"), (&src, "src", &src_addr), &flags);
    completed(&w, hop2, 3);
    assert_eq!(src.state(), "running");
    let back = lab.path().join("3-src.serial");
    assert!(eventually(Duration::from_secs(30), || {
        tail_from(&src.serial(), src_len, &back);
        linux::heartbeats(&back).unwrap().len() >= 5
    }));
    let last = linux::unbroken(&[on_src, dst.serial(), back])
        .unwrap()
        .unwrap_or_else(|e| panic!("the heartbeat broke: {e}"));
    eprintln!("heartbeat unbroken up to {last} over two hops through libvirt");
}
