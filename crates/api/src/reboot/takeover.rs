//! The new daemon's side of a warm reboot: take the VMs over from the old daemon (see
//! [`warmvm_vmm::handover`]), decoding and checking the [`Successor`] settings while the
//! guests still run in the old one, then adopt the listeners and the state directory's lock
//! it hands on. Up to the commit a failure leaves the VMs with the old daemon; after it,
//! nothing makes this daemon give them up: a listener or lock that did not come is taken
//! anew, waiting for as long as it takes.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use warmvm_vmm::handover::{self, HandoverError, Phase};
use warmvm_vmm::{GivenTaps, Host};

use super::successor::{Fallbacks, Successor};
use crate::socket::{self, SocketFile};
use crate::state::TakeoverInfo;
use crate::state_lock::{self, StateLock};

/// The name under which a warm reboot hands the API listener to the new daemon.
pub const API_LISTENER_FD: &str = "api-listener";
/// The name under which a warm reboot hands the metrics listener to the new daemon.
pub const METRICS_LISTENER_FD: &str = "metrics-listener";

/// Why the VMs were not taken over (they run on in the old daemon).
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("--takeover-fd must be 3 or more")]
    FdTooLow,
    #[error("--takeover-fd {0}: not an open file descriptor")]
    FdNotOpen(RawFd),
    /// The handover failed in `phase`; the old daemon keeps the VMs.
    #[error("taking the VMs over from the old daemon failed in the {phase} phase")]
    Handover {
        phase: Phase,
        #[source]
        error: HandoverError,
    },
}

impl TakeoverError {
    /// A wrong `--takeover-fd` is the caller's mistake; a failed handover is not.
    pub fn is_input(&self) -> bool {
        !matches!(self, TakeoverError::Handover { .. })
    }
}

/// What a warm reboot's new daemon took over: the VMs, running here now, and the
/// listeners it serves them with.
pub(crate) struct TakenOver {
    pub host: Host,
    pub listener: UnixListener,
    pub socket_file: Option<SocketFile>,
    pub metrics: Option<TcpListener>,
    pub migration: Option<TcpListener>,
    pub takeover: TakeoverInfo,
    /// Settings the daemon before us passed on.
    pub inherited: Option<Successor>,
    /// A cold reboot's TAPs, per VM: the old daemon's fds, so the VMs boot on them again.
    pub cold_taps: BTreeMap<String, GivenTaps>,
}

/// How long a new daemon whose API listener did not come with the VMs tries to bind the
/// socket itself (the old daemon holds it until it exits).
const REBIND_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the new daemon listens for metrics and migrations, should the old one not hand
/// those listeners over.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ListenAddrs {
    pub metrics: Option<SocketAddr>,
    pub migration: Option<SocketAddr>,
}

/// The new daemon of a warm reboot: take the VMs and the listeners over from the old one.
/// Fails only before the VMs are ours (the old daemon then resumes them); after that, a
/// missing listener is bound anew rather than giving up running VMs.
pub(crate) fn take_over(
    fd: RawFd,
    state_dir: &Path,
    socket_path: &Path,
    addrs: ListenAddrs,
    lock: &mut Option<StateLock>,
    lock_holder: Option<u32>,
    fallbacks: &Fallbacks,
) -> Result<TakenOver, TakeoverError> {
    if fd < 3 {
        return Err(TakeoverError::FdTooLow);
    }
    // SAFETY: F_GETFD only reads the fd's flags; it fails on an fd that is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(TakeoverError::FdNotOpen(fd));
    }
    // SAFETY: the fd is open (checked above), and the old daemon started us with it for
    // the handover alone: nothing else in this process uses it.
    let channel = unsafe { OwnedFd::from_raw_fd(fd) };
    // VMs to bring back that this build cannot read are refused before the commit, so the
    // old daemon keeps them, rather than lost after it.
    // Nor are VMs taken over without the state directory's lock: an old daemon that does
    // not hand it over (an older build) holds none, so this daemon took it as it started;
    // if it could not, another daemon has the directory, and the old one keeps its VMs.
    // The settings are decoded here, while the new daemon stages: a version this build
    // does not read is refused as incompatible (409 to the operator), and the guests never
    // paused.
    let have_lock = lock.is_some();
    let decoded = std::cell::RefCell::new(None);
    let check_extra = |extra: &serde_json::Value| {
        let refuse =
            |e: String| handover::HandoverError::BadState(handover::Violation::Settings(e));
        let s = Successor::decode(extra, fallbacks).map_err(|e| {
            if e.is_incompatible() {
                handover::HandoverError::IncompatibleSettings(format!(
                    "the settings handed over: {}",
                    e.chain()
                ))
            } else {
                refuse(e.chain())
            }
        })?;
        if !have_lock && !s.state_lock {
            return Err(refuse(
                state_lock::LockError::Held {
                    dir: state_dir.to_path_buf(),
                    holder: lock_holder,
                }
                .to_string(),
            ));
        }
        s.check().map_err(|e| refuse(e.to_string()))?;
        *decoded.borrow_mut() = Some(s);
        Ok(())
    };
    let adopted = handover::take_over_checked(channel, state_dir, &check_extra).map_err(|e| {
        TakeoverError::Handover {
            phase: e.phase,
            error: e.error,
        }
    })?;
    // From here on the VMs run in this process: nothing may make it give up.
    let inherited = decoded.into_inner();
    let takeover = TakeoverInfo {
        previous_pid: inherited.as_ref().map(|s| u64::from(s.previous_pid)),
        from_build: adopted.report.from_build.clone(),
        to_build: adopted.report.to_build.clone(),
        state_format: adopted.report.state_format,
        commit_protocol: adopted.report.commit_protocol,
        host_blackout_us: adopted.report.host_blackout_us,
        // The old daemon's own account of itself; older builds do not give one.
        from_binary: inherited.as_ref().and_then(|s| s.previous_binary.clone()),
        to_binary: adopted.report.to_binary.clone(),
    };
    tracing::info!(
        vms = adopted.host.vms().len(),
        previous_pid = takeover.previous_pid,
        previous_version = inherited.as_ref().map(|s| s.previous_version.as_str()),
        host_blackout_us = adopted.report.host_blackout_us,
        "took the VMs over by a warm reboot"
    );
    let mut api = None;
    let mut metrics = None;
    let mut migration = None;
    let mut cold_taps: BTreeMap<String, GivenTaps> = Default::default();
    for (name, file) in adopted.extra_fds {
        if let Some((vm, index)) = super::modes::parse_cold_tap_name(&name) {
            cold_taps.entry(vm).or_default().0.insert(index, file);
            continue;
        }
        match name.as_str() {
            API_LISTENER_FD => match socket::listener_from_owned(OwnedFd::from(file)) {
                Ok(l) => api = Some(l),
                Err(e) => tracing::error!(error = %e, "the API listener handed over is unusable"),
            },
            state_lock::STATE_LOCK_FD if lock.is_none() => {
                match StateLock::adopt(OwnedFd::from(file), state_dir) {
                    Ok(l) => *lock = Some(l),
                    Err(e) => {
                        tracing::error!(error = %e, "the state directory's lock handed over is unusable")
                    }
                }
            }
            // Taken as we started, so the old daemon held none (not expected of a daemon
            // that hands one over): ours is the lock.
            state_lock::STATE_LOCK_FD => {}
            METRICS_LISTENER_FD => {
                let l = TcpListener::from(OwnedFd::from(file));
                if l.local_addr().is_ok() {
                    metrics = Some(l);
                }
            }
            crate::migration::MIGRATION_LISTENER_FD if addrs.migration.is_some() => {
                let l = TcpListener::from(OwnedFd::from(file));
                match l.local_addr() {
                    Ok(addr) => {
                        tracing::info!(%addr, "took the migration listener over");
                        migration = Some(l);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the migration listener handed over is unusable")
                    }
                }
            }
            other => tracing::warn!(name = other, "ignoring an unknown fd handed over"),
        }
    }
    if lock.is_none() {
        // The old daemon said it hands the lock over and then did not, or handed another
        // file: it cannot happen between builds that hold the lock, but the VMs are ours
        // now, so take it as soon as it is free rather than give them up.
        *lock = Some(take_lock_when_free(state_dir));
    }
    // The socket file stays the same across warm reboots: ours to remove at exit.
    let (listener, socket_file) = match api {
        Some(l) => (l, SocketFile::adopt(socket_path).ok()),
        None => {
            let (l, f) = rebind(socket_path);
            (l, Some(f))
        }
    };
    if metrics.is_none() {
        if let Some(addr) = addrs.metrics {
            match TcpListener::bind(addr) {
                Ok(l) => metrics = Some(l),
                Err(e) => {
                    tracing::error!(error = %e, %addr, "cannot listen for metrics; serving without")
                }
            }
        }
    }
    if migration.is_none() {
        if let Some(addr) = addrs.migration {
            match TcpListener::bind(addr) {
                Ok(l) => migration = Some(l),
                Err(e) => {
                    tracing::error!(error = %e, %addr, "cannot listen for migrations; serving without")
                }
            }
        }
    }
    Ok(TakenOver {
        host: adopted.host,
        migration,
        listener,
        socket_file,
        metrics,
        takeover,
        inherited,
        cold_taps,
    })
}

/// Bind the API socket once the old daemon has let go of it. The VMs run here already:
/// it keeps trying (saying why every [`REBIND_TIMEOUT`]) rather than give them up.
fn rebind(socket_path: &Path) -> (UnixListener, SocketFile) {
    let mut next_report = Instant::now() + REBIND_TIMEOUT;
    loop {
        match socket::bind(socket_path) {
            Ok(bound) => return bound,
            Err(e) => {
                if Instant::now() >= next_report {
                    tracing::error!(error = %e, socket = %socket_path.display(),
                        "cannot bind the API socket yet; the VMs run on, still trying");
                    next_report = Instant::now() + REBIND_TIMEOUT;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Take the state directory's lock, waiting (and saying why every [`REBIND_TIMEOUT`]) until
/// whoever holds it lets go: the VMs run here already.
fn take_lock_when_free(state_dir: &Path) -> StateLock {
    let mut next_report = Instant::now();
    loop {
        match StateLock::take(state_dir) {
            Ok(lock) => return lock,
            Err(e) => {
                if Instant::now() >= next_report {
                    tracing::error!(error = %e, "cannot take the state directory's lock yet; the VMs run on, still trying");
                    next_report = Instant::now() + REBIND_TIMEOUT;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
