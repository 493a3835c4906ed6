//! Which VMs are being migrated through a [`Sender`](crate::Sender) or a
//! [`Receiver`](crate::Receiver): a second migration of the same VM is refused before it
//! starts.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::error::MigrateError;

/// A set of VMs in flight. Clones share the set: give the same one to every `Sender` that
/// must not migrate a VM twice at once (a `Receiver` keeps its own for what it takes in).
/// Outgoing and incoming are kept apart on purpose: a host may send a VM to itself.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<Mutex<BTreeSet<String>>>);

impl InFlight {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The VMs in flight now, in name order.
    pub fn list(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    /// Claims `vm` until the guard drops.
    pub(crate) fn claim(&self, vm: &str) -> Result<InFlightGuard, MigrateError> {
        if !self.lock().insert(vm.to_owned()) {
            return Err(MigrateError::AlreadyInFlight(vm.to_owned()));
        }
        Ok(InFlightGuard {
            vm: vm.to_owned(),
            set: self.clone(),
            kept: false,
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One VM's place in an [`InFlight`] set; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct InFlightGuard {
    vm: String,
    set: InFlight,
    kept: bool,
}

impl InFlightGuard {
    /// Keeps the VM claimed after the guard drops: its outcome is unknown and no second
    /// migration may start until an operator has settled it (and restarted).
    pub(crate) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if !self.kept {
            self.set.lock().remove(&self.vm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_is_claimed_once_per_set() {
        let a = InFlight::new();
        let g = a.claim("vm").unwrap();
        assert!(matches!(a.claim("vm"), Err(MigrateError::AlreadyInFlight(v)) if v == "vm"));
        assert!(
            InFlight::new().claim("vm").is_ok(),
            "another set is another program"
        );
        drop(g);
        assert!(a.claim("vm").is_ok(), "freed when the migration ends");
        a.claim("stuck").unwrap().keep();
        assert_eq!(
            a.list(),
            vec!["stuck".to_owned()],
            "an unknown outcome stays claimed"
        );
    }
}
