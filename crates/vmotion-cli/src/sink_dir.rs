//! The folder of memory-file guests that `vmotion-recv --sink memfile` keeps. Every name
//! says what its guest is, so none can be taken for another:
//!
//! | name | what | its life |
//! |---|---|---|
//! | `VM.receiving/` (`memory`, `migration`) | a guest arriving | deleted on any failure, and at start (it never reached `Ready`, so its source never committed) |
//! | `VM.unsettled/` (`memory`, `device-state`, `migration`) | a verified guest whose claim is not settled: maybe the only copy allowed to run | written and fsynced before `Ready`; settled with the arbiter at start; a new migration of the VM is refused while it exists |
//! | `VM.mem`, `VM.state` | a guest claimed here: memory and device state for the VMM that runs it | written when the claim wins |

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmotion_mover::memfile::MemoryFile;
use vmotion_mover::{GuestMemory, MoverError, Sink, VmControl};
use vmotion_proto::MigrationId;

const RECEIVING: &str = ".receiving";
const UNSETTLED: &str = ".unsettled";

/// The sink folder.
#[derive(Debug, Clone)]
pub struct SinkDir {
    root: PathBuf,
}

/// A guest kept unsettled in the folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsettled {
    /// The VM.
    pub vm: String,
    /// The migration whose claim decides it.
    pub migration_id: MigrationId,
    /// Its folder.
    pub path: PathBuf,
}

/// Makes a rename or a new file in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

impl SinkDir {
    /// The folder at `root`, created if missing.
    pub fn open(root: &Path) -> io::Result<Self> {
        fs::create_dir_all(root)?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entry(&self, vm: &str, suffix: &str) -> PathBuf {
        self.root.join(format!("{vm}{suffix}"))
    }

    /// A sink for `vm`'s incoming guest, or the pre-flight's reason to refuse it: an
    /// unsettled copy of the VM is here (it may be the only one allowed to run, and must
    /// not be overwritten).
    pub fn receive(
        &self,
        vm: &str,
        id: MigrationId,
        pages: u64,
        page_size: u64,
    ) -> Result<FileSink, String> {
        if let Some(u) = self.unsettled_of(vm) {
            return Err(format!(
                "an unsettled copy of VM {vm} from migration {} is kept here ({}); settle \
                 that migration first",
                u.migration_id,
                u.path.display()
            ));
        }
        let dir = self.entry(vm, RECEIVING);
        // A leftover from a migration of this VM that ended without a trace: it never
        // reached Ready (this VM is not in flight here, or the receiver refused already).
        let _ = fs::remove_dir_all(&dir);
        let made = (|| {
            fs::create_dir(&dir).map_err(MoverError::from)?;
            fs::write(dir.join("migration"), format!("{id}\n")).map_err(MoverError::from)?;
            MemoryFile::create(&dir.join("memory"), pages, page_size)
        })();
        match made {
            Ok(file) => Ok(FileSink {
                root: self.root.clone(),
                vm: vm.to_owned(),
                dir,
                file,
            }),
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(format!(
                    "cannot make room for the guest in {}: {e}",
                    self.root.display()
                ))
            }
        }
    }

    fn unsettled_of(&self, vm: &str) -> Option<Unsettled> {
        let path = self.entry(vm, UNSETTLED);
        if !path.exists() {
            return None;
        }
        let id = fs::read_to_string(path.join("migration"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(MigrationId([0; 16]));
        Some(Unsettled {
            vm: vm.to_owned(),
            migration_id: id,
            path,
        })
    }

    /// Every unsettled guest in the folder, by VM name.
    pub fn unsettled(&self) -> io::Result<Vec<Unsettled>> {
        let mut all: Vec<Unsettled> = self
            .names(UNSETTLED)?
            .iter()
            .filter_map(|vm| self.unsettled_of(vm))
            .collect();
        all.sort_by(|a, b| a.vm.cmp(&b.vm));
        Ok(all)
    }

    /// Deletes every partly received guest (left by a daemon that died mid-migration:
    /// none reached `Ready`, so no source committed them); returns their VMs.
    pub fn remove_partial(&self) -> io::Result<Vec<String>> {
        let names = self.names(RECEIVING)?;
        for vm in &names {
            fs::remove_dir_all(self.entry(vm, RECEIVING))?;
        }
        Ok(names)
    }

    /// Deletes every `VM.unsettled/` that no longer holds its guest's memory: a daemon
    /// died while filing it (the claim won: `memory` was already renamed to `VM.mem`) or
    /// discarding it (`memory` goes first). Left alone, such a folder names no migration
    /// that can settle it and refuses every later migration of the VM. Returns their VMs.
    pub fn remove_emptied(&self) -> io::Result<Vec<String>> {
        let mut emptied = Vec::new();
        for vm in self.names(UNSETTLED)? {
            let dir = self.entry(&vm, UNSETTLED);
            if !dir.join("memory").exists() {
                fs::remove_dir_all(&dir)?;
                emptied.push(vm);
            }
        }
        Ok(emptied)
    }

    fn names(&self, suffix: &str) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in fs::read_dir(&self.root)? {
            let name = e?.file_name();
            if let Some(vm) = name.to_str().and_then(|n| n.strip_suffix(suffix))
                && vmotion_policy::valid_vm_name(vm)
            {
                names.push(vm.to_owned());
            }
        }
        Ok(names)
    }

    /// The unsettled guest as a sink again, to settle it: resuming it files it as
    /// `VM.mem` / `VM.state`, discarding deletes it.
    pub fn reopen(&self, u: &Unsettled) -> Result<FileSink, MoverError> {
        let mut file = MemoryFile::open(&u.path.join("memory"), 4096)?;
        let state = fs::read(u.path.join("device-state"))?;
        file.load_device_state(&state)?;
        Ok(FileSink {
            root: self.root.clone(),
            vm: u.vm.clone(),
            dir: u.path.clone(),
            file,
        })
    }
}

/// One guest in the sink folder, as a receiver's [`Sink`].
#[derive(Debug)]
pub struct FileSink {
    root: PathBuf,
    vm: String,
    /// `VM.receiving/` or, once persisted, `VM.unsettled/`.
    dir: PathBuf,
    file: MemoryFile,
}

impl FileSink {
    /// Where the guest is now.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The guest's memory file, once it is claimed here.
    pub fn claimed_memory(&self) -> PathBuf {
        self.root.join(format!("{}.mem", self.vm))
    }
}

impl Sink for FileSink {
    fn memory(&self) -> Arc<dyn GuestMemory> {
        Sink::memory(&self.file)
    }

    fn control(&mut self) -> &mut dyn VmControl {
        self
    }

    /// Memory and device state on disk, then `VM.receiving/` becomes `VM.unsettled/`:
    /// from here a crash leaves a guest the restarted daemon settles with the arbiter.
    fn persist(&mut self) -> Result<(), MoverError> {
        Sink::persist(&mut self.file)?;
        let state = self.dir.join("device-state");
        fs::write(&state, self.file.device_state())?;
        fs::File::open(&state)?.sync_all()?;
        sync_dir(&self.dir)?;
        let unsettled = self.root.join(format!("{}{UNSETTLED}", self.vm));
        fs::rename(&self.dir, &unsettled)?;
        sync_dir(&self.root)?;
        self.dir = unsettled;
        Ok(())
    }

    /// The memory goes first: a crash partway leaves a folder without a guest, which
    /// the restarted daemon deletes ([`SinkDir::remove_emptied`]), never one whose
    /// migration id is gone.
    fn discard(&mut self) -> Result<(), MoverError> {
        match fs::remove_file(self.dir.join("memory")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

/// A file runs nothing; "resuming" it files it as the guest that runs here.
impl VmControl for FileSink {
    fn pause(&mut self) -> Result<(), MoverError> {
        Ok(())
    }

    /// The claim won: `VM.mem` and `VM.state` for the VMM that runs the guest, then the
    /// unsettled folder goes (a crash after the rename leaves it without `memory`: the
    /// restarted daemon deletes it, [`SinkDir::remove_emptied`]).
    fn resume(&mut self) -> Result<(), MoverError> {
        let state = self.root.join(format!("{}.state", self.vm));
        fs::write(&state, self.file.device_state())?;
        fs::File::open(&state)?.sync_all()?;
        fs::rename(self.dir.join("memory"), self.claimed_memory())?;
        sync_dir(&self.root)?;
        fs::remove_dir_all(&self.dir)?;
        Ok(())
    }

    fn throttle(&mut self, _percent: u8) -> Result<(), MoverError> {
        Ok(())
    }

    fn save_device_state(&mut self) -> Result<Vec<u8>, MoverError> {
        Ok(self.file.device_state().to_vec())
    }

    fn load_device_state(&mut self, state: &[u8]) -> Result<(), MoverError> {
        self.file.load_device_state(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: MigrationId = MigrationId([0xab; 16]);

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    /// receiving → unsettled (persisted) → claimed as VM.mem / VM.state, and an
    /// unsettled copy refuses a second migration of the VM, naming its migration.
    #[test]
    fn a_guest_moves_through_its_names() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SinkDir::open(tmp.path()).unwrap();
        let mut sink = dir.receive("vm", ID, 4, 4096).unwrap();
        assert_eq!(names(tmp.path()), ["vm.receiving"]);
        sink.memory().write_pages(1, &[7u8; 4096]).unwrap();
        sink.control().load_device_state(b"regs").unwrap();
        sink.persist().unwrap();
        assert_eq!(names(tmp.path()), ["vm.unsettled"]);
        let refused = dir
            .receive("vm", MigrationId([1; 16]), 4, 4096)
            .unwrap_err();
        assert!(refused.contains(&ID.to_string()), "{refused}");
        assert_eq!(
            dir.unsettled().unwrap(),
            vec![Unsettled {
                vm: "vm".into(),
                migration_id: ID,
                path: tmp.path().join("vm.unsettled")
            }]
        );
        // A restart: reopened from disk, then the claim wins.
        let mut again = dir.reopen(&dir.unsettled().unwrap()[0]).unwrap();
        again.control().resume().unwrap();
        assert_eq!(names(tmp.path()), ["vm.mem", "vm.state"]);
        assert_eq!(fs::read(tmp.path().join("vm.state")).unwrap(), b"regs");
        let mem = fs::read(tmp.path().join("vm.mem")).unwrap();
        assert_eq!(&mem[4096..8192], &[7u8; 4096][..]);
        assert!(dir.receive("vm", MigrationId([1; 16]), 4, 4096).is_ok());
    }

    /// Discarding leaves nothing; partial guests from a dead daemon are removed at start,
    /// unsettled ones are not.
    #[test]
    fn nothing_is_left_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SinkDir::open(tmp.path()).unwrap();
        let mut a = dir.receive("a", ID, 4, 4096).unwrap();
        a.discard().unwrap();
        assert!(names(tmp.path()).is_empty());
        let _b = dir.receive("b", ID, 4, 4096).unwrap();
        let mut c = dir.receive("c", ID, 4, 4096).unwrap();
        c.persist().unwrap();
        assert_eq!(dir.remove_partial().unwrap(), vec!["b".to_owned()]);
        assert_eq!(names(tmp.path()), ["c.unsettled"]);
        let mut c = dir.reopen(&dir.unsettled().unwrap()[0]).unwrap();
        c.discard().unwrap();
        assert!(names(tmp.path()).is_empty());
    }

    /// A daemon that died while filing a claimed guest (its memory already `VM.mem`, the
    /// unsettled folder partly deleted) leaves a folder the restart deletes; a guest
    /// still in its folder is kept.
    #[test]
    fn an_interrupted_filing_is_finished_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SinkDir::open(tmp.path()).unwrap();
        for vm in ["filed", "kept"] {
            let mut s = dir.receive(vm, ID, 4, 4096).unwrap();
            s.persist().unwrap();
        }
        let filed = tmp.path().join("filed.unsettled");
        fs::rename(filed.join("memory"), tmp.path().join("filed.mem")).unwrap();
        fs::remove_file(filed.join("migration")).unwrap();
        assert_eq!(dir.remove_emptied().unwrap(), vec!["filed".to_owned()]);
        assert_eq!(names(tmp.path()), ["filed.mem", "kept.unsettled"]);
        assert!(dir.receive("filed", ID, 4, 4096).is_ok());
    }
}
