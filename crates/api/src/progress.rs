//! What a reboot under way is doing, for `GET /v1/status` (`reboot_in_progress`): the old
//! daemon's side (waiting for operations under way, saving or shutting the VMs down,
//! starting the new daemon, the handover) and the new daemon's (bringing the VMs of a
//! saved or cold reboot back, and waiting for cold-booted guests to say they are up).
//!
//! Only this small record is locked, never for longer than a copy, so that status requests
//! answer at once however long the reboot takes.

use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// A reboot under way, as `GET /v1/status` reports it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RebootInProgress {
    /// `warm`, `saved` or `cold`.
    pub mode: String,
    /// What it does now: `waiting` (for VM operations under way), `saving`,
    /// `shutting-down`, `starting` (the new daemon prepares while the guests run),
    /// `handover` (the blackout and the commit), `restoring`, `booting`, `waiting-for-guests`.
    pub phase: String,
    /// VMs done in this phase, of `vms_total`.
    pub vms_done: usize,
    pub vms_total: usize,
    /// Since the reboot began in this daemon process.
    pub elapsed_ms: u64,
}

impl std::fmt::Display for RebootInProgress {
    /// In a few words: `saved reboot, saving, 3 s in, 1 of 2 VMs done`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} reboot, {}, {} s in",
            self.mode,
            self.phase,
            self.elapsed_ms / 1000
        )?;
        if self.vms_total > 0 {
            write!(f, ", {} of {} VMs done", self.vms_done, self.vms_total)?;
        }
        Ok(())
    }
}

struct Current {
    mode: String,
    phase: &'static str,
    done: usize,
    total: usize,
    started: Instant,
}

/// The reboot under way in this process, if any.
#[derive(Default)]
pub struct Tracker(Mutex<Option<Current>>);

impl Tracker {
    fn with(&self, f: impl FnOnce(&mut Option<Current>)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A reboot begins (or a new daemon starts bringing VMs back).
    pub fn begin(&self, mode: &str, phase: &'static str, total: usize) {
        self.with(|c| {
            *c = Some(Current {
                mode: mode.to_string(),
                phase,
                done: 0,
                total,
                started: Instant::now(),
            })
        });
    }

    /// The reboot moves on to `phase`, over `total` VMs.
    pub fn phase(&self, phase: &'static str, total: usize) {
        self.with(|c| {
            if let Some(c) = c {
                c.phase = phase;
                c.done = 0;
                c.total = total;
            }
        });
    }

    /// `done` VMs of this phase are done.
    pub fn done(&self, done: usize) {
        self.with(|c| {
            if let Some(c) = c {
                c.done = done.min(c.total);
            }
        });
    }

    /// One more VM of this phase is done.
    pub fn one_done(&self) {
        self.with(|c| {
            if let Some(c) = c {
                c.done = (c.done + 1).min(c.total);
            }
        });
    }

    /// The reboot is over (done, failed, or handed to the new daemon).
    pub fn end(&self) {
        self.with(|c| *c = None);
    }

    pub fn get(&self) -> Option<RebootInProgress> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| RebootInProgress {
                mode: c.mode.clone(),
                phase: c.phase.to_string(),
                vms_done: c.done,
                vms_total: c.total,
                elapsed_ms: c.started.elapsed().as_millis() as u64,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reboot_is_reported_from_begin_to_end() {
        let t = Tracker::default();
        assert_eq!(t.get(), None);
        t.begin("cold", "shutting-down", 2);
        t.one_done();
        let r = t.get().unwrap();
        assert_eq!(
            (r.mode.as_str(), r.phase.as_str()),
            ("cold", "shutting-down")
        );
        assert_eq!((r.vms_done, r.vms_total), (1, 2));
        t.phase("starting", 0);
        t.one_done();
        assert_eq!(t.get().unwrap().vms_done, 0, "done never exceeds the total");
        t.end();
        assert_eq!(t.get(), None);
    }
}
