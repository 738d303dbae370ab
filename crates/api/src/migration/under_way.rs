//! Which migrations are under way in this daemon: what the state consults to refuse
//! operations on a VM that is leaving, and reboots while any migration runs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

/// Migrations under way in this daemon: the VMs going out (by name) and those coming in
/// (the names they reserved, and how many connections are being received).
#[derive(Debug, Default)]
pub struct UnderWay {
    pub(super) outgoing: Mutex<BTreeSet<String>>,
    pub(super) incoming_names: Mutex<BTreeSet<String>>,
    pub(super) incoming: std::sync::atomic::AtomicUsize,
    /// Migrations that committed here: their ids, with the VM each brought (what a source
    /// holding one in doubt is told).
    pub(super) committed_in: Mutex<BTreeMap<String, String>>,
    /// VMs left in doubt here: where each went, and by which migration.
    pub(super) in_doubt: Mutex<BTreeMap<String, InDoubt>>,
}

/// Where a VM in doubt went: what resolving it asks, and whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct InDoubt {
    pub(super) to: SocketAddr,
    pub(super) migration_id: String,
}

impl UnderWay {
    pub(super) fn outgoing(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.outgoing.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn incoming_names(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.incoming_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn committed_in(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.committed_in.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn in_doubt(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, InDoubt>> {
        self.in_doubt.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `name` is migrating out.
    pub fn is_outgoing(&self, name: &str) -> bool {
        self.outgoing().contains(name)
    }

    /// Any migration under way, as a reason to refuse a reboot.
    pub fn any(&self) -> Option<String> {
        let out = self.outgoing();
        if let Some(name) = out.iter().next() {
            return Some(format!("VM {name} is migrating"));
        }
        drop(out);
        // A VM in doubt cannot cross a reboot (nor could the record of where it went).
        if let Some(name) = self.in_doubt().keys().next() {
            return Some(format!(
                "VM {name} is in doubt after a migration: resolve it first (warmvm vm migrate --resolve {name})"
            ));
        }
        let n = self.incoming.load(Ordering::SeqCst);
        (n > 0).then(|| format!("{n} incoming migration(s) under way"))
    }
}

/// Removes a VM's name from the outgoing set when its migration ends.
pub(super) struct Outgoing<'a>(pub(super) &'a UnderWay, pub(super) String);

impl Drop for Outgoing<'_> {
    fn drop(&mut self) {
        self.0.outgoing().remove(&self.1);
    }
}

/// Counts an incoming migration until it ends, and frees the name it reserved.
pub(super) struct Incoming<'a> {
    pub(super) under_way: &'a UnderWay,
    pub(super) name: Mutex<Option<String>>,
}

impl Drop for Incoming<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.name.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.under_way.incoming_names().remove(&n);
        }
        self.under_way.incoming.fetch_sub(1, Ordering::SeqCst);
    }
}
