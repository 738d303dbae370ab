//! The bring-back manifest: the durable list of the VMs a saved or cold reboot took out of
//! the old daemon and that no process runs yet (`<state dir>/saved-reboot/bring-back.json`,
//! a [`BringBack`]).
//!
//! The handover's commit decides who owns the VMs while they cross; the manifest carries
//! that decision past the commit, when a killed new daemon would otherwise lose every VM it
//! had not brought back yet. Its rules make it safe:
//!
//! - The old daemon writes it after saving (or powering off) every VM and before starting
//!   the new daemon; if the reboot fails, it removes the manifest *before* it resumes any
//!   VM, so a manifest never names a VM that the old daemon went on running.
//! - The new daemon, after the commit, records itself as the manifest's owner, then for each
//!   VM: restores (or creates) it without running it, takes it off the manifest, and only
//!   then lets it run. Killed in between, that VM is lost with its owner, but it never runs
//!   again from its older state.
//! - A daemon started normally on a state directory with a manifest whose writers are gone
//!   brings the VMs left in it back the same way ([`super::modes::recover`]); a manifest
//!   it cannot trust makes it refuse to start, naming the file ([`load`]).
//!
//! Every change is made durable: written to a temporary file, fsynced, renamed into place
//! and the directory fsynced.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use warmvm_vmm::VmConfig;

use crate::types::Mode;

/// The manifest's file name, in the saved-reboot directory.
pub const MANIFEST: &str = "bring-back.json";

/// Why the manifest could not be written, read or trusted.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot write the bring-back manifest {path}: {err}")]
    Write {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("cannot read the bring-back manifest {path}: {err}")]
    Read {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error(
        "{path} is not a bring-back manifest this daemon can use ({why}); restore its VMs by hand \
         (`warmvm vm restore DIR` for each snapshot beside it) or move it away, then start the daemon again"
    )]
    Invalid { path: PathBuf, why: String },
    #[error(
        "{path}: the saved or cold reboot of daemon pid {pid} is still under way; start this daemon once that one has exited"
    )]
    Busy { path: PathBuf, pid: u32 },
}

/// Where the manifest of the state directory `state_dir` lives.
pub fn path(state_dir: &Path) -> PathBuf {
    saved_dir(state_dir).join(MANIFEST)
}

/// Write `bb` to `path` durably, replacing what was there; the directory is created
/// (mode 0700) if missing.
pub fn write(path: &Path, bb: &BringBack) -> Result<(), ManifestError> {
    let err = |err| ManifestError::Write {
        path: path.to_path_buf(),
        err,
    };
    let dir = parent(path);
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    let json = serde_json::to_vec_pretty(bb).map_err(|e| err(std::io::Error::other(e)))?;
    let tmp = dir.join(format!(".{MANIFEST}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(err)
}

/// Remove the manifest at `path` durably (nothing to do if it is not there).
pub fn remove(path: &Path) -> Result<(), ManifestError> {
    let err = |err| ManifestError::Write {
        path: path.to_path_buf(),
        err,
    };
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(parent(path)).map_err(err),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(e)),
    }
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The manifest of `state_dir`, if there is one, checked strictly: its format, its mode,
/// one entry per VM name, and (saved) each VM's snapshot beside it under the VM's name.
pub fn load(state_dir: &Path) -> Result<Option<BringBack>, ManifestError> {
    let path = path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(ManifestError::Read { path, err }),
    };
    let invalid = |why: String| ManifestError::Invalid {
        path: path.clone(),
        why,
    };
    let bb: BringBack = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    check(&bb, parent(&path)).map_err(invalid)?;
    Ok(Some(bb))
}

fn check(bb: &BringBack, dir: &Path) -> Result<(), String> {
    if bb.version != BRING_BACK_VERSION {
        return Err(format!(
            "format {}, this daemon reads {BRING_BACK_VERSION}",
            bb.version
        ));
    }
    let canonical_dir = std::fs::canonicalize(dir).map_err(|e| e.to_string())?;
    let mut names = std::collections::BTreeSet::new();
    for v in &bb.vms {
        if !names.insert(v.name.as_str()) {
            return Err(format!("VM {:?} is listed twice", v.name));
        }
        if v.name != v.config.name {
            return Err(format!(
                "VM {:?} comes with the config of {:?}",
                v.name, v.config.name
            ));
        }
        match (bb.mode, &v.snapshot) {
            (Mode::Saved, Some(snap)) => {
                let beside = snap.file_name().is_some_and(|f| *f == *v.name)
                    && snap
                        .parent()
                        .and_then(|p| std::fs::canonicalize(p).ok())
                        .is_some_and(|p| p == canonical_dir);
                if !beside {
                    return Err(format!(
                        "VM {:?}'s snapshot {} is not {}",
                        v.name,
                        snap.display(),
                        dir.join(&v.name).display()
                    ));
                }
            }
            (Mode::Cold, None) => {}
            (mode, _) => {
                return Err(format!(
                    "VM {:?} does not fit a {} reboot",
                    v.name,
                    mode.name()
                ))
            }
        }
    }
    Ok(())
}

/// The pid of a process that may still be writing the manifest (the old daemon, or the new
/// daemon that claimed it), if one is alive. A pid counts only while it is a live warmvm
/// daemon: after a host reboot the pids in a manifest name unrelated processes.
pub fn live_owner(bb: &BringBack) -> Option<u32> {
    let me = std::process::id();
    [Some(bb.previous_pid), bb.claimed_by]
        .into_iter()
        .flatten()
        .filter(|&pid| pid != me)
        .find(|&pid| is_live_daemon(pid))
}

fn is_live_daemon(pid: u32) -> bool {
    process_running(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|&b| b == 0).any(|arg| arg == b"daemon"))
}

/// A daemon started normally on `state_dir`: the VMs a saved or cold reboot left in the
/// manifest, to bring back, if any. Errors if the manifest is untrustworthy or its writer
/// still runs; the daemon must then refuse to start (the error names the file).
pub fn pending(state_dir: &Path) -> Result<Option<BringBack>, ManifestError> {
    let Some(bb) = load(state_dir)? else {
        return Ok(None);
    };
    if let Some(pid) = live_owner(&bb) {
        return Err(ManifestError::Busy {
            path: path(state_dir),
            pid,
        });
    }
    Ok(Some(bb))
}

/// The format of [`BringBack`]; a new daemon refuses another, before the commit. 2: the
/// receiver takes each VM off the durable manifest (`bring_back.rs`) before it runs it. A
/// daemon that read format 1 would boot a cold reboot's VMs and leave the manifest behind,
/// so that a later daemon booted them again.
pub const BRING_BACK_VERSION: u32 = 2;
/// The directory, under the state directory, that a saved reboot writes its snapshots to.
pub const SAVED_DIR: &str = "saved-reboot";

/// What the old daemon hands the new one for a saved or cold reboot, and what the
/// bring-back manifest (this module) keeps on disk until every VM runs again.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BringBack {
    pub version: u32,
    pub mode: Mode,
    pub previous_pid: u32,
    /// The new daemon that took the VMs over after the commit (manifest only; absent in
    /// what the old daemon writes and hands over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<u32>,
    /// Saving or shutting down every VM, in the old daemon.
    pub prepare_us: u64,
    /// CLOCK_MONOTONIC ns when the old daemon had finished preparing.
    pub prepared_ns: u64,
    pub vms: Vec<BringBackVm>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BringBackVm {
    pub name: String,
    /// To boot it again (cold).
    pub config: VmConfig,
    /// Its snapshot (saved).
    pub snapshot: Option<PathBuf>,
    /// CLOCK_MONOTONIC ns when its guest stopped running (paused, or asked to power off).
    pub stopped_ns: u64,
    pub prepare_us: u64,
    /// Bytes of RAM written to its snapshot.
    pub bytes: u64,
    /// Paused when the reboot began: restored paused.
    pub was_paused: bool,
}

/// True while `pid` is a process that has not exited (neither gone nor a zombie).
pub(crate) fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// The state directory's saved-reboot directory.
pub fn saved_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(SAVED_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(dir: &Path, mode: Mode) -> BringBack {
        let saved = saved_dir(dir);
        BringBack {
            version: BRING_BACK_VERSION,
            mode,
            previous_pid: u32::MAX,
            prepare_us: 1,
            prepared_ns: 2,
            claimed_by: None,
            vms: ["a", "b"]
                .into_iter()
                .map(|n| BringBackVm {
                    name: n.into(),
                    config: VmConfig::reference(n, 64, 1),
                    snapshot: (mode == Mode::Saved).then(|| saved.join(n)),
                    stopped_ns: 1,
                    prepare_us: 1,
                    bytes: 3,
                    was_paused: false,
                })
                .collect(),
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wvm-bb-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_manifest_round_trips_and_is_removed_durably() {
        let dir = scratch("rt");
        assert!(load(&dir).unwrap().is_none());
        for mode in [Mode::Saved, Mode::Cold] {
            let bb = manifest(&dir, mode);
            write(&path(&dir), &bb).unwrap();
            let back = load(&dir).unwrap().unwrap();
            assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(&bb).unwrap()
            );
            // Nobody alive wrote it (pid u32::MAX does not exist): it is pending.
            assert!(pending(&dir).unwrap().is_some());
            remove(&path(&dir)).unwrap();
            assert!(load(&dir).unwrap().is_none());
            remove(&path(&dir)).unwrap();
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_manifest_this_daemon_cannot_trust_is_refused_with_its_path() {
        let dir = scratch("bad");
        let p = path(&dir);
        let refused = |text: &str, want: &str| {
            std::fs::write(&p, text).unwrap();
            let e = load(&dir).unwrap_err().to_string();
            assert!(e.contains(&p.display().to_string()), "{e}");
            assert!(e.contains(want), "{want}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
            // Never removed: it may be the only record of the VMs.
            assert!(p.exists());
        };
        write(&p, &manifest(&dir, Mode::Saved)).unwrap();
        let good = serde_json::to_value(manifest(&dir, Mode::Saved)).unwrap();
        refused("{\"version\": 1", "EOF");
        refused("not json", "expected");
        let mut v = good.clone();
        v["surprise"] = 1.into();
        refused(&v.to_string(), "unknown field");
        let mut v = good.clone();
        v["version"] = (BRING_BACK_VERSION + 1).into();
        refused(&v.to_string(), "format");
        let mut v = good.clone();
        v["vms"][0]["snapshot"] = "/etc".into();
        refused(&v.to_string(), "snapshot /etc");
        let mut v = good.clone();
        v["vms"][1]["name"] = "a".into();
        refused(&v.to_string(), "listed twice");
        let mut v = good.clone();
        v["mode"] = "warm".into();
        refused(&v.to_string(), "warm reboot");
        let mut v = good;
        v["mode"] = "cold".into();
        refused(&v.to_string(), "cold reboot");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_live_writer_keeps_the_manifest_its_own() {
        let dir = scratch("busy");
        let mut bb = manifest(&dir, Mode::Cold);
        // This test process is no daemon: its pid counts as gone.
        bb.previous_pid = std::process::id();
        assert_eq!(live_owner(&bb), None);
        // A live daemon (any process with a `daemon` argument stands in for one).
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30; exit 0", "daemon"])
            .spawn()
            .unwrap();
        bb.claimed_by = Some(child.id());
        write(&path(&dir), &bb).unwrap();
        let e = pending(&dir).unwrap_err();
        assert!(
            matches!(e, ManifestError::Busy { pid, .. } if pid == child.id()),
            "{e}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(pending(&dir).unwrap().is_some());
        let _ = std::fs::remove_dir_all(dir);
    }
}
