//! Finding, spawning and stopping `qemu-system-x86_64`.

use std::env;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::guest;
use crate::qmp::Qmp;

/// The QEMU binary this crate drives.
const QEMU: &str = "qemu-system-x86_64";
/// How long [`Qemu::spawn`] waits for the QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Qemu::quit`] waits for QEMU to exit before killing it.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The CPU of [`QemuConfig::new`]: see [`QemuConfig::args`].
pub const DEFAULT_CPU: &str = "qemu64,kvmclock=off";
/// How much of the log errors quote.
const LOG_TAIL_LINES: usize = 20;

/// Finds `qemu-system-x86_64`: the path in `VMOTION_QEMU` when set (and a file), else
/// the first executable of that name on `PATH`.
pub fn qemu_binary() -> Option<PathBuf> {
    if let Some(path) = env::var_os("VMOTION_QEMU").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(QEMU))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Whether `/dev/kvm` opens read-write (what `-accel kvm` needs).
pub fn kvm_usable() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// QEMU's accelerator (`-accel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

impl Accel {
    /// `VMOTION_QEMU_ACCEL` (`kvm` or `tcg`) when set, else [`Accel::Kvm`] when
    /// [`kvm_usable`], else [`Accel::Tcg`].
    pub fn detect() -> Self {
        match env::var("VMOTION_QEMU_ACCEL").as_deref() {
            Ok("kvm") => Self::Kvm,
            Ok("tcg") => Self::Tcg,
            _ if kvm_usable() => Self::Kvm,
            _ => Self::Tcg,
        }
    }

    /// The name `-accel` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

impl Default for Accel {
    fn default() -> Self {
        Self::detect()
    }
}

/// How to run one QEMU ([`Qemu::spawn`]).
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// Names the QMP socket (`<run_dir>/<name>.qmp`) and the log (`<run_dir>/<name>.log`).
    pub name: String,
    /// Where the QMP socket and the log go (created if missing).
    pub run_dir: PathBuf,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The file behind guest RAM (`memory-backend-file`, `share=on`): QEMU sizes it to
    /// `memory_mib`; file offset = guest-physical address.
    pub mem_path: PathBuf,
    /// Whether QEMU touches all of guest RAM at start (`prealloc=on`).
    pub prealloc: bool,
    /// The image passed to `-kernel`: a Multiboot image (see [`crate::guest`]) or a
    /// Linux kernel ([`crate::linux`]).
    pub kernel: PathBuf,
    /// `-initrd`, for a Linux kernel.
    pub initrd: Option<PathBuf>,
    /// `-append`: a Linux kernel's command line.
    pub append: Option<String>,
    /// Where the guest's first serial port writes (`-serial file:PATH`); `None`: no
    /// serial port.
    pub serial_log: Option<PathBuf>,
    /// `-cpu`: the model and its flags.
    pub cpu: String,
    /// `-incoming` argument, e.g. `defer` or `unix:/path`; `None` boots the guest.
    pub incoming: Option<String>,
    /// The accelerator.
    pub accel: Accel,
    /// More arguments, appended last (e.g. `-object tls-creds-x509,...`).
    pub extra_args: Vec<String>,
    /// A network namespace to run QEMU in (`ip netns exec NETNS qemu …`): a test host of
    /// `vmotion_testbed::WanBed`. Its QMP socket is a file, reachable from anywhere.
    pub netns: Option<String>,
}

impl QemuConfig {
    /// A configuration with no preallocation, no `-incoming`, the detected accelerator
    /// and no extra arguments.
    pub fn new(
        name: impl Into<String>,
        run_dir: impl Into<PathBuf>,
        memory_mib: u64,
        mem_path: impl Into<PathBuf>,
        kernel: impl Into<PathBuf>,
    ) -> Self {
        Self {
            name: name.into(),
            run_dir: run_dir.into(),
            memory_mib,
            mem_path: mem_path.into(),
            prealloc: false,
            kernel: kernel.into(),
            initrd: None,
            append: None,
            serial_log: None,
            cpu: DEFAULT_CPU.into(),
            incoming: None,
            accel: Accel::detect(),
            extra_args: Vec::new(),
            netns: None,
        }
    }

    /// The QMP socket: `<run_dir>/<name>.qmp`.
    pub fn qmp_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}.qmp", self.name))
    }

    /// QEMU's stdout and stderr: `<run_dir>/<name>.log`.
    pub fn log_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}.log", self.name))
    }

    /// QEMU's command line, without the binary.
    ///
    /// The CPU ([`DEFAULT_CPU`]) is the named model `qemu64` (`-cpu host` crashes QEMU on the nested
    /// hypervisor of the development machines; a named model also keeps source and
    /// destination identical) without kvmclock: SeaBIOS enables kvmclock when it sees it
    /// and never turns it off, and KVM then keeps rewriting a pvclock structure in guest
    /// RAM (at 0xe8380), so a destination's memory would drift from the source's after
    /// a migration even with an idle guest.
    pub fn args(&self) -> Vec<OsString> {
        let mib = self.memory_mib;
        let mut backend = OsString::from(format!(
            "memory-backend-file,id=mem,size={mib}M,share=on,mem-path="
        ));
        backend.push(option_value(&self.mem_path));
        if self.prealloc {
            backend.push(",prealloc=on");
        }
        let mut qmp = OsString::from("unix:");
        qmp.push(option_value(&self.qmp_path()));
        qmp.push(",server=on,wait=off");

        let mut args: Vec<OsString> = [
            "-machine",
            "pc,memory-backend=mem",
            "-accel",
            self.accel.as_str(),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-vga",
            "none",
            "-monitor",
            "none",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        let mut serial = OsString::from("none");
        if let Some(log) = &self.serial_log {
            serial = OsString::from("file:");
            serial.push(log);
        }
        args.extend([
            "-cpu".into(),
            self.cpu.clone().into(),
            "-serial".into(),
            serial,
            "-m".into(),
            format!("{mib}M").into(),
            "-object".into(),
            backend,
            "-kernel".into(),
            self.kernel.clone().into(),
            "-qmp".into(),
            qmp,
        ]);
        if let Some(initrd) = &self.initrd {
            args.extend(["-initrd".into(), initrd.clone().into()]);
        }
        if let Some(append) = &self.append {
            args.extend(["-append".into(), append.into()]);
        }
        if let Some(incoming) = &self.incoming {
            args.extend(["-incoming".into(), incoming.into()]);
        }
        args.extend(self.extra_args.iter().map(OsString::from));
        args
    }
}

/// `path` as the value in a QEMU `key=value,...` option: commas doubled.
fn option_value(path: &Path) -> OsString {
    match path.to_str() {
        Some(s) => s.replace(',', ",,").into(),
        None => path.as_os_str().to_owned(),
    }
}

/// A running QEMU with a negotiated QMP connection.
///
/// Dropping it kills QEMU (SIGKILL) and reaps it; [`Qemu::quit`] stops it cleanly.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    qmp: Qmp,
    config: QemuConfig,
    reaped: bool,
}

impl Qemu {
    /// Starts QEMU as `config` says and connects to its QMP socket once it accepts
    /// (waiting up to 20 s). If QEMU exits first, the error quotes the end of its log.
    pub fn spawn(config: QemuConfig) -> Result<Self> {
        let binary = qemu_binary().ok_or(Error::QemuNotFound)?;
        fs::create_dir_all(&config.run_dir).map_err(|e| {
            Error::io(
                format!("creating run directory {}", config.run_dir.display()),
                e,
            )
        })?;
        let qmp_path = config.qmp_path();
        match fs::remove_file(&qmp_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(Error::io(
                    format!("removing the stale QMP socket {}", qmp_path.display()),
                    e,
                ));
            }
            _ => {}
        }
        let log_path = config.log_path();
        let log = File::create(&log_path)
            .map_err(|e| Error::io(format!("creating QEMU's log {}", log_path.display()), e))?;
        let log_out = log
            .try_clone()
            .map_err(|e| Error::io("duplicating the log file", e))?;
        let mut command = match &config.netns {
            // `ip netns exec` execs QEMU in place: the child's pid is QEMU's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        let mut child = command
            .args(config.args())
            .stdin(Stdio::null())
            .stdout(log_out)
            .stderr(log)
            .spawn()
            .map_err(|e| Error::io(format!("starting {}", binary.display()), e))?;
        match connect_when_ready(&mut child, &config) {
            Ok(qmp) => Ok(Self {
                child,
                qmp,
                config,
                reaped: false,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// The QMP connection.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// The last lines of QEMU's log (stdout and stderr).
    pub fn log_tail(&self) -> String {
        log_tail(&self.config.log_path())
    }

    /// How QEMU exited, or `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let status = self
            .child
            .try_wait()
            .map_err(|e| Error::io("checking whether QEMU runs", e))?;
        self.reaped |= status.is_some();
        Ok(status)
    }

    /// Waits until the guest program has started: the "started" word of this crate's
    /// guests ([`guest::STARTED_ADDR`]) reads 1 in the memory file. Under KVM on a
    /// nested hypervisor, SeaBIOS and the Multiboot loader take about 3 s.
    pub fn wait_started(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let started = guest::started(&self.config.mem_path).map_err(|e| {
                Error::io(
                    format!("reading guest memory {}", self.config.mem_path.display()),
                    e,
                )
            })?;
            if started {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                return Err(Error::Exited {
                    what: "before the guest started".into(),
                    status,
                    log_tail: self.log_tail(),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("after {timeout:?} waiting for the guest to start"),
                    log_tail: self.log_tail(),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `quit`, waits (up to 10 s) for QEMU to exit — killing it after that — and
    /// returns how it exited.
    pub fn quit(mut self) -> Result<ExitStatus> {
        // QEMU may close the connection before its reply arrives: only the exit counts.
        let _ = self.qmp.execute("quit", None);
        let deadline = Instant::now() + QUIT_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let status = self
                    .child
                    .wait()
                    .map_err(|e| Error::io("waiting for QEMU after killing it", e))?;
                self.reaped = true;
                return Err(Error::Timeout {
                    what: format!(
                        "after {QUIT_TIMEOUT:?} waiting for QEMU to quit (killed: {status})"
                    ),
                    log_tail: self.log_tail(),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Connects to the QMP socket of `child` once it accepts.
fn connect_when_ready(child: &mut Child, config: &QemuConfig) -> Result<Qmp> {
    let qmp_path = config.qmp_path();
    let exited = |child: &mut Child, what: &str| -> Result<Option<Error>> {
        let status = child
            .try_wait()
            .map_err(|e| Error::io("checking whether QEMU runs", e))?;
        Ok(status.map(|status| Error::Exited {
            what: what.to_owned(),
            status,
            log_tail: log_tail(&config.log_path()),
        }))
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(e) = exited(child, "before its QMP socket accepted")? {
            return Err(e);
        }
        if let Ok(stream) = UnixStream::connect(&qmp_path) {
            return Qmp::from_stream(stream).or_else(|e| {
                // A QEMU that dies during the handshake: say so, with its log.
                thread::sleep(Duration::from_millis(50));
                Err(exited(child, "during the QMP handshake")?.unwrap_or(e))
            });
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!(
                    "after {START_TIMEOUT:?} waiting for QEMU's QMP socket {}",
                    qmp_path.display()
                ),
                log_tail: log_tail(&config.log_path()),
            });
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The last [`LOG_TAIL_LINES`] lines of the file at `path` (empty if unreadable).
fn log_tail(path: &Path) -> String {
    let mut text = Vec::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map_or(0, |m| m.len());
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(8192)));
        let _ = file.read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg_after<'a>(args: &'a [OsString], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].to_str().unwrap())
            .collect()
    }

    #[test]
    fn the_command_line_names_the_backend_socket_and_cpu() {
        let mut config = QemuConfig::new("src", "/run/x", 256, "/dev/shm/src.mem", "/k.bin");
        config.accel = Accel::Tcg;
        config.prealloc = true;
        config.incoming = Some("defer".into());
        config.extra_args = vec!["-S".into()];
        let args = config.args();
        assert_eq!(arg_after(&args, "-cpu"), ["qemu64,kvmclock=off"]);
        assert_eq!(arg_after(&args, "-accel"), ["tcg"]);
        assert_eq!(arg_after(&args, "-m"), ["256M"]);
        assert_eq!(
            arg_after(&args, "-object"),
            ["memory-backend-file,id=mem,size=256M,share=on,mem-path=/dev/shm/src.mem,prealloc=on"]
        );
        assert_eq!(
            arg_after(&args, "-qmp"),
            ["unix:/run/x/src.qmp,server=on,wait=off"]
        );
        assert_eq!(arg_after(&args, "-incoming"), ["defer"]);
        assert_eq!(arg_after(&args, "-kernel"), ["/k.bin"]);
        assert_eq!(args.last().unwrap(), "-S");
        assert_eq!(config.log_path(), Path::new("/run/x/src.log"));

        config.mem_path = "/tmp/a,b".into();
        let args = config.args();
        assert!(arg_after(&args, "-object")[0].contains("mem-path=/tmp/a,,b,"));
    }

    #[test]
    fn the_log_tail_is_the_last_lines() {
        let path = env::temp_dir().join(format!("vmotion-qemu-log-{}", std::process::id()));
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        fs::write(&path, text).unwrap();
        let tail = log_tail(&path);
        fs::remove_file(&path).unwrap();
        assert_eq!(tail.lines().count(), LOG_TAIL_LINES);
        assert!(
            tail.starts_with("line 80\n") && tail.ends_with("line 99"),
            "{tail}"
        );
        assert_eq!(log_tail(Path::new("/nonexistent/log")), "");
    }
}
