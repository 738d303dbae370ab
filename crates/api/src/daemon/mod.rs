//! `warmvm daemon`: the process around the API server, from start-up to a clean exit.
//!
//! Start-up order: read and validate the optional config (nothing touched yet), open KVM,
//! take the socket (refusing a live daemon's), drop privileges if configured, install the
//! seccomp filters, create and start the config's VMs, then listen and tell systemd
//! `READY=1`. SIGTERM or SIGINT: stop taking requests, power every
//! VM off (each guest gets the grace period, then is forced), remove the socket, exit 0.
//!
//! Warm reboot (`PUT /v1/reboot`): the daemon starts a new daemon process with
//! `--takeover-fd` and hands it every VM, the listening API socket (`api-listener`) and the
//! metrics listener (`metrics-listener`); see [`warmvm_vmm::handover`]. The new daemon
//! tells systemd its pid (`MAINPID=`, hence `NotifyAccess=all` in the unit) and serves on
//! the same socket; the old one answers the request and exits without stopping any VM or
//! removing the socket. If the new daemon fails, the VMs run on in the old one.

mod error;

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use warmvm_vmm::devices as warmvm_devices_limits;
use warmvm_vmm::{handover, Config, Host};

pub use self::error::DaemonError;
use crate::reboot::modes::{bring_back_in_background, BringBackJob};
use crate::reboot::successor::{Fallbacks, Successor};
use crate::reboot::takeover::take_over;
use crate::server::Server;
use crate::socket::{self, SocketFile};
use crate::state::{ApiState, RebootSetup, TakeoverInfo};
use crate::state_lock::{self, StateLock};

use crate::reboot::rejuvenation::{aging_monitor, start_aging_monitor, start_rejuvenator};

pub use crate::migration::MIGRATION_LISTENER_FD;
pub use crate::reboot::takeover::{API_LISTENER_FD, METRICS_LISTENER_FD};

/// The environment variable that gives a warm reboot's new daemon the console limits.
pub const CONSOLE_LIMITS_ENV: &str = "WARMVM_CONSOLE_LIMITS";

/// The socket's file name in the state directory.
pub const SOCKET_NAME: &str = "warmvm.sock";

/// The default API socket: `<default runtime dir>/warmvm.sock` (`/run/warmvm/warmvm.sock`
/// for root).
pub fn default_socket() -> PathBuf {
    warmvm_vmm::config::default_runtime_dir().join(SOCKET_NAME)
}

#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// The API socket; default `<state_dir>/warmvm.sock`.
    pub socket: Option<PathBuf>,
    /// Console logs and the default socket; default: the config's, else the per-user default.
    pub state_dir: Option<PathBuf>,
    /// Also serve `GET /metrics` here (loopback only).
    pub metrics_addr: Option<SocketAddr>,
    /// VMs to create and start at start-up.
    pub config: Option<PathBuf>,
    /// Serve on this inherited, already listening socket instead of binding one.
    pub listen_fd: Option<RawFd>,
    /// What each guest gets to power off when the daemon stops.
    pub stop_grace: Duration,
    /// Take the VMs over from the daemon that started this one, on this fd (warm reboot).
    pub takeover_fd: Option<RawFd>,
    /// Arguments placed before `daemon` when a warm reboot starts the new daemon (the
    /// global flags, e.g. the log level).
    pub successor_args: Vec<OsString>,
    /// Default stage timeout and ready budget of a warm reboot (a request may set its own).
    pub stage_timeout: Duration,
    pub ready_budget: Duration,
    /// What one client may take: connections per listener, request deadline, reboot grace.
    pub limits: crate::limits::Limits,
    /// What a guest's console output may cost: log cap, rate, burst.
    pub console: warmvm_devices_limits::ConsoleLimits,
    /// Seccomp filters per thread kind (passed on to a warm reboot's new daemon).
    pub seccomp: warmvm_sandbox::Mode,
    /// Whom to run as after start-up (`--user`, `--group`, `--keep-caps`); over the
    /// config's `[privileges]`. A warm reboot's new daemon inherits the result.
    pub privileges: Option<warmvm_vmm::PrivilegesConfig>,
    /// Live migration: the listener (off by default) and the TLS both directions use.
    pub migration: crate::migration::MigrationOptions,
    /// The fleet this daemon joins through etcd (off by default); over the config's
    /// `[fleet]`.
    pub fleet: crate::fleet::FleetOptions,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self {
            socket: None,
            state_dir: None,
            metrics_addr: None,
            config: None,
            listen_fd: None,
            stop_grace: Duration::from_secs(crate::state::DEFAULT_STOP_GRACE_SECS),
            takeover_fd: None,
            successor_args: Vec::new(),
            stage_timeout: handover::outgoing::DEFAULT_STAGE_TIMEOUT,
            ready_budget: handover::outgoing::DEFAULT_READY_BUDGET,
            limits: crate::limits::Limits::default(),
            console: warmvm_devices_limits::ConsoleLimits::default(),
            seccomp: warmvm_sandbox::Mode::Kill,
            privileges: None,
            migration: Default::default(),
            fleet: Default::default(),
        }
    }
}

/// Refuse anything but a loopback address for the unauthenticated metrics port.
pub fn check_metrics_addr(addr: &SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "--metrics-addr {addr}: only loopback addresses (127.0.0.0/8, [::1]) are allowed"
        ))
    }
}

/// What the daemon serves with: its VMs and its listeners, fresh or taken over.
struct Started {
    host: Host,
    listener: UnixListener,
    socket_file: Option<SocketFile>,
    metrics: Option<TcpListener>,
    /// The migration listener, if one is configured.
    migration: Option<TcpListener>,
    /// How we took the VMs over, if we did.
    takeover: Option<TakeoverInfo>,
    /// Settings the daemon before us passed on (see [`Successor`]).
    inherited: Option<Successor>,
    /// A cold reboot's TAPs, per VM: the old daemon's fds, so the VMs boot on them again.
    cold_taps: std::collections::BTreeMap<String, warmvm_vmm::GivenTaps>,
}

/// Run the daemon until SIGTERM or SIGINT (or until a warm reboot hands everything over to
/// a new daemon: then this process exits without returning).
pub fn run(opts: &DaemonOptions) -> Result<(), DaemonError> {
    // Snapshots (and a saved reboot's) are written by a process of their own, so that
    // killing it loses a snapshot, never a VM.
    warmvm_vmm::snapshot::writer::use_writer_process(warmvm_vmm::handover::this_binary());
    // VMs taken over are not created again from the config.
    let config = match (&opts.config, opts.takeover_fd) {
        (Some(path), None) => {
            let config = Config::from_toml_file(path).map_err(DaemonError::Config)?;
            if !config.vms.is_empty() {
                config
                    .validate(warmvm_vmm::HostLimits::probe())
                    .map_err(DaemonError::Config)?;
            }
            if let Some(aging) = &config.aging {
                aging.validate().map_err(|source| DaemonError::Aging {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            Some(config)
        }
        _ => None,
    };
    // Before this process opens any TAP of its own (see take_inherited_taps).
    let mut given_taps = match &config {
        Some(c) => warmvm_vmm::take_inherited_taps(c)?,
        None => Default::default(),
    };
    if let Some(addr) = &opts.metrics_addr {
        check_metrics_addr(addr).map_err(DaemonError::Flag)?;
    }
    // The certificates are read here, before privileges drop (the key may be root's).
    let migration_setup = opts.migration.setup().map_err(DaemonError::Migration)?;
    // The fleet's flags over the config's; a warm reboot's new daemon gets them as flags.
    // Checked (and the TLS files read) before any VM starts; etcd is not reached here.
    let fleet_setup = opts
        .fleet
        .over(config.as_ref().and_then(|c| c.fleet.as_ref()))
        .setup()
        .map_err(DaemonError::Fleet)?;
    // A warm reboot's new daemon inherits the dropped privileges; it has none to drop.
    let drop_to = match opts.takeover_fd {
        None => crate::privileges::resolve(
            opts.privileges.as_ref(),
            config.as_ref().and_then(|c| c.privileges.as_ref()),
        )
        .map_err(DaemonError::Privileges)?,
        Some(_) => None,
    };
    opts.limits.validate().map_err(DaemonError::Flag)?;
    opts.console.validate().map_err(DaemonError::Flag)?;
    // A warm reboot's new daemon gets the console limits in its environment, so that the
    // VMs it stages are bounded from their first byte (the handover's settings come after
    // the VMs, and the guests run as soon as they are ours).
    let console = match std::env::var(CONSOLE_LIMITS_ENV) {
        Ok(v) if opts.takeover_fd.is_some() => {
            match serde_json::from_str::<warmvm_devices_limits::ConsoleLimits>(&v) {
                Ok(c) if c.validate().is_ok() => c,
                _ => {
                    tracing::warn!(limits = %v, "ignoring unusable console limits handed over; using the flags'");
                    opts.console
                }
            }
        }
        _ => opts.console,
    };
    warmvm_devices_limits::console::set_default_limits(console);
    // Flags relative to the working directory are resolved once, here: the daemon a warm
    // reboot starts gets them absolute.
    let absolute = |flag: &'static str, p: &Path| {
        std::path::absolute(p).map_err(|source| DaemonError::Path {
            flag,
            path: p.to_path_buf(),
            source,
        })
    };
    let given_state_dir = match &opts.state_dir {
        Some(p) => Some(absolute("--state-dir", p)?),
        None => config.as_ref().and_then(|c| c.state_dir.clone()),
    };
    // The socket: where --socket says, in a directory that must exist; by default beside
    // a given state directory, else in the runtime directory (created if missing).
    let socket_path = match &opts.socket {
        Some(p) => {
            let p = absolute("--socket", p)?;
            match p.parent() {
                Some(dir) if !dir.is_dir() => {
                    return Err(DaemonError::NoSocketDir {
                        socket: p.clone(),
                        dir: dir.to_path_buf(),
                    })
                }
                _ => p,
            }
        }
        None => match &given_state_dir {
            Some(dir) => dir.join(SOCKET_NAME),
            None => default_socket(),
        },
    };
    let state_dir = given_state_dir.unwrap_or_else(warmvm_vmm::config::default_state_dir);
    let state_dir_created = create_private_dir(&state_dir, "state")?;
    // The socket's directory stays root's: the user the daemon drops to does not get the
    // API (see docs/daemon.md, "Least privilege").
    if let Some(dir) = socket_path.parent().filter(|_| opts.socket.is_none()) {
        create_private_dir(dir, "socket")?;
    }
    // One daemon per state directory, before anything in it (or the socket) is touched. A
    // warm reboot's new daemon is handed the old one's lock; it takes the lock itself only
    // from an older build, which holds none (see `state_lock`).
    let (mut lock, lock_holder) = match opts.takeover_fd {
        None => (Some(StateLock::take(&state_dir)?), None),
        Some(_) => match StateLock::try_take(&state_dir) {
            Ok(Ok(lock)) => (Some(lock), None),
            Ok(Err(holder)) => (None, holder),
            Err(e) => {
                tracing::warn!(error = %e, "cannot take the state directory's lock; expecting it from the old daemon");
                (None, None)
            }
        },
    };

    if opts.takeover_fd.is_none() && is_in_ram(&state_dir) {
        tracing::warn!(state_dir = %state_dir.display(),
            "the state directory is in RAM (tmpfs): a saved reboot writes every VM's RAM there \
             (doubling its use, or refused for room) and a host reboot empties it; \
             /var/lib/warmvm is the default");
    }
    // A new daemon must not die of SIGTERM between taking the VMs over and serving (they
    // would die with it): note the signal, and stop cleanly once the server runs.
    let early_stop = Arc::new(AtomicBool::new(false));
    if opts.takeover_fd.is_some() {
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, early_stop.clone()).map_err(DaemonError::Signals)?;
        }
    }
    // An interrupted saved or cold reboot's VMs, to bring back once this daemon owns the
    // state directory; a manifest it cannot trust stops it here, before it binds anything.
    let interrupted = match opts.takeover_fd {
        None => crate::reboot::bring_back::pending(&state_dir)?,
        Some(_) => None,
    };
    let started = match opts.takeover_fd {
        Some(fd) => {
            enter_sandbox(opts.seccomp)?;
            let t = take_over(
                fd,
                &state_dir,
                &socket_path,
                crate::reboot::takeover::ListenAddrs {
                    metrics: opts.metrics_addr,
                    migration: opts.migration.listen,
                },
                &mut lock,
                lock_holder,
                &Fallbacks {
                    stage_timeout: opts.stage_timeout,
                    ready_budget: opts.ready_budget,
                    limits: opts.limits,
                },
            )?;
            Started {
                host: t.host,
                listener: t.listener,
                socket_file: t.socket_file,
                metrics: t.metrics,
                migration: t.migration,
                takeover: Some(t.takeover),
                inherited: t.inherited,
                cold_taps: t.cold_taps,
            }
        }
        None => {
            // KVM and the listeners are open: what needs root is done. Drop before any
            // other thread exists (capabilities are per thread), then sandbox.
            let started = start_fresh(opts, &state_dir, &socket_path)?;
            if let Some(target) = &drop_to {
                let give = crate::privileges::is_ours_to_give(
                    &state_dir,
                    state_dir_created,
                    &crate::privileges::systemd_dirs_from_env(),
                );
                target
                    .apply(
                        &state_dir,
                        give,
                        lock.as_ref().map(|l| l.path()),
                        &Host::kvm_device(),
                    )
                    .map_err(DaemonError::DropPrivileges)?;
            }
            enter_sandbox(opts.seccomp)?;
            started
        }
    };
    // The status and every reboot's report name this executable's sha256. Not before the
    // privileges are dropped: that needs the process to have one thread.
    warmvm_vmm::executable::hash_in_background();
    let Started {
        host,
        listener,
        mut socket_file,
        metrics,
        migration: migration_listener,
        takeover,
        inherited,
        mut cold_taps,
    } = started;
    let adopted = takeover.is_some();
    // Timeouts and limits outlive the reboot through the handover's settings, not through
    // flags: a successor's flags must stay those every build understands (an older build
    // may be the successor, to refuse a downgrade with a clear message).
    let (stage_timeout, ready_budget, limits) = match &inherited {
        Some(s) => (s.stage_timeout(), s.ready_budget(), s.limits),
        None => (opts.stage_timeout, opts.ready_budget, opts.limits),
    };
    let metrics_url = metrics
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map_or_else(|| "-".to_string(), |a| format!("http://{a}/metrics"));

    let state = Arc::new(ApiState::from_shared(Arc::new(Mutex::new(host))));
    state.set_reboot_grace(limits.reboot_grace());
    if let Some(info) = takeover.clone() {
        state.set_last_takeover(info);
    }
    // A saved or cold reboot: the VMs are brought back while the daemon serves (see
    // `bring_back_in_background`); requests that change anything are refused until then.
    let mut bring_back = None;
    if let Some(bb) = inherited.as_ref().and_then(|s| s.bring_back.clone()) {
        let wait = inherited.as_ref().map_or(
            crate::reboot::modes::DEFAULT_BOOT_WAIT,
            Successor::boot_wait,
        );
        bring_back = Some(BringBackJob::AfterCommit(
            bb,
            std::mem::take(&mut cold_taps),
            wait,
        ));
    }
    let monitor = Arc::new(aging_monitor(
        config.as_ref().and_then(|c| c.aging.clone()),
        inherited.as_ref().and_then(|s| s.aging.as_ref()),
        inherited.as_ref().and_then(|s| s.aging_configured.as_ref()),
        takeover.as_ref(),
        state.last_reboot().as_ref(),
    ));
    let adopt_lease = inherited.as_ref().and_then(|s| s.fleet_lease);
    // The handed-over settings, history included, have been decoded: do not keep the JSON
    // tree for the process's lifetime (it would count as the new daemon's own memory).
    drop(inherited);
    state.set_aging(monitor.clone());
    if let Some(config) = config.as_ref().filter(|c| !c.vms.is_empty()) {
        let mut host = state.host().lock().unwrap_or_else(|p| p.into_inner());
        host.create_all_with(config, std::mem::take(&mut given_taps))?;
        host.start_all()?;
        for vm in host.vms() {
            tracing::info!(vm = %vm.name(), memory_mib = vm.config.memory_mib, vcpus = vm.config.vcpus, "VM started from the config");
        }
    }
    if let Some(bb) = interrupted {
        bring_back = Some(BringBackJob::Recover(bb));
    }
    if let Some(job) = &bring_back {
        // Before the first request is served: it already sees the reboot under way.
        state.rebooting.store(true, Ordering::SeqCst);
        let (mode, count) = job.what();
        let phase = match mode {
            crate::reboot::modes::Mode::Cold => "booting",
            _ => "restoring",
        };
        state.progress.begin(mode.name(), phase, count);
    }

    // A daemon that took VMs over never gives them up for an error it can wait out: it
    // logs it and tries again (a fresh daemon fails at once instead: it runs no VM yet).
    let mut server = keep_trying(adopted, "serving the API", || {
        let l = listener.try_clone().map_err(serve_api)?;
        Server::new(l, state.clone())
            .map(|s| s.with_limits(limits))
            .map_err(serve_api)
    })?;
    drop(listener);
    if let Some(m) = metrics {
        match server.with_metrics(m) {
            Ok(s) => server = s,
            Err((s, e)) if adopted => {
                tracing::error!(error = %e, "cannot serve metrics; serving the API without");
                server = s;
            }
            Err((_, source)) => {
                return Err(DaemonError::Serve {
                    what: "serve metrics",
                    source,
                })
            }
        }
    }
    keep_trying(adopted, "installing signal handlers", || {
        server
            .stop_on_signals(&[signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
            .map_err(DaemonError::Signals)
    })?;
    let stop = keep_trying(adopted, "serving the API", || {
        server.stop_handle().map_err(serve_api)
    })?;
    if early_stop.load(Ordering::SeqCst) {
        tracing::info!("SIGTERM or SIGINT during start-up");
        stop.stop();
    }
    let mut extra_fds = vec![(API_LISTENER_FD.to_string(), server.listener_fd())];
    if let Some(l) = &lock {
        extra_fds.push((state_lock::STATE_LOCK_FD.to_string(), l.raw_fd()));
    }
    if let Some(fd) = server.metrics_fd() {
        extra_fds.push((METRICS_LISTENER_FD.to_string(), fd));
    }
    if let Some(l) = &migration_listener {
        use std::os::fd::AsRawFd;
        extra_fds.push((MIGRATION_LISTENER_FD.to_string(), l.as_raw_fd()));
    }
    state.enable_reboot(RebootSetup {
        args: successor_args(
            opts,
            &socket_path,
            &state_dir,
            fleet_setup.as_ref().map(|f| &f.options),
        ),
        limits,
        hands_lock: lock.is_some(),
        extra_fds,
        env: vec![
            (
                warmvm_sandbox::MODE_ENV.into(),
                opts.seccomp.as_str().into(),
            ),
            (
                CONSOLE_LIMITS_ENV.into(),
                serde_json::to_string(&console).unwrap_or_default().into(),
            ),
        ],
        stage_timeout,
        ready_budget,
        stop,
    });

    let migration_url = match &migration_setup {
        Some(setup) => start_migration(&state, setup, migration_listener.as_ref(), adopted)?,
        None => "-".to_string(),
    };
    tracing::info!(
        socket = %socket_path.display(),
        state_dir = %state_dir.display(),
        metrics = %metrics_url,
        migration = %migration_url,
        pid = std::process::id(),
        version = env!("CARGO_PKG_VERSION"),
        "warmvm daemon ready"
    );
    let vm_count = state.vms().len();
    let how = match takeover.as_ref().and_then(|t| t.previous_pid) {
        Some(pid) => format!(" (taken over from pid {pid} by a warm reboot)"),
        None => String::new(),
    };
    // After a warm reboot this process is not the one systemd started: MAINPID tells it
    // which process the service is now (the unit needs NotifyAccess=all for that).
    if let Err(e) = socket::sd_notify(&format!(
        "MAINPID={}\nREADY=1\nSTATUS=serving {} with {vm_count} VMs{how}",
        std::process::id(),
        socket_path.display()
    )) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }

    if let Some(setup) = &fleet_setup {
        // etcd unreachable is not an error here: the agent keeps trying, the VMs run.
        let started = crate::fleet::start(&state, setup, adopt_lease, fleet_thread_setup());
        if let Err(e) = started {
            if !adopted {
                return Err(DaemonError::Fleet(e));
            }
            tracing::error!(error = %e, "cannot start the fleet agent; serving without the fleet");
        }
    }
    let bringing_back =
        bring_back.map(|job| bring_back_in_background(state.clone(), job, state_dir.clone()));
    start_rejuvenator(state.clone());
    start_aging_monitor(state.clone(), monitor);
    // A panic of the main loop must not end the process (and the VMs): the panic hook has
    // asked for an emergency warm reboot; until it exits this process, serve on.
    let served = loop {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.run())) {
            Ok(served) => break served,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    if state.handed_over() {
        // A warm reboot handed the VMs and the socket to a new daemon. The thread that
        // answers the reboot request exits the process once its answer is sent; this is
        // only the fallback should that answer never get out. No VM is stopped and the
        // socket file stays: both are the new daemon's.
        if let Some(f) = socket_file.as_mut() {
            f.keep();
        }
        std::thread::sleep(crate::http::IO_TIMEOUT + Duration::from_secs(5));
        tracing::warn!("the reboot's answer was not sent in time; exiting");
        std::process::exit(0);
    }
    let _ = socket::sd_notify("STOPPING=1\nSTATUS=stopping every VM");
    // VMs still being brought back: the wait for their guests ends, and they are stopped
    // with the others.
    state.shutting_down.store(true, Ordering::SeqCst);
    // Leave the fleet first: the lease is revoked, so the host's record goes at once.
    crate::fleet::leave(&state, Duration::from_secs(3));
    if let Some(Some(t)) = bringing_back {
        let _ = t.join();
    }
    let vms = state.vms().len();
    tracing::info!(
        vms,
        grace_secs = opts.stop_grace.as_secs(),
        "stopping: powering every VM off"
    );
    state.shutdown(opts.stop_grace);
    drop(server);
    // Removes the socket file if it is still ours.
    drop(socket_file);
    tracing::info!("warmvm daemon stopped");
    served.map_err(DaemonError::Server)
}

fn serve_api(source: std::io::Error) -> DaemonError {
    DaemonError::Serve {
        what: "serve the API",
        source,
    }
}

/// Turn the seccomp filters on, with the helper that starts a warm reboot's new daemon
/// outside them. Before any other thread exists: every later thread inherits the main
/// thread's filter (and the helper must be created unfiltered).
fn enter_sandbox(mode: warmvm_sandbox::Mode) -> Result<(), DaemonError> {
    if mode != warmvm_sandbox::Mode::Off {
        warmvm_sandbox::set_mode(mode);
        warmvm_sandbox::start_helper()?;
        warmvm_sandbox::enter(warmvm_sandbox::ThreadKind::Main)?;
        // Not from a vCPU thread later: it would inherit the vCPU filter.
        warmvm_devices_limits::console::start_flusher(warmvm_vmm::device_thread_setup());
    }
    Ok(())
}

/// Run `f` until it succeeds when `adopted` (logging each failure, once a second), else
/// once.
fn keep_trying<T>(
    adopted: bool,
    what: &str,
    mut f: impl FnMut() -> Result<T, DaemonError>,
) -> Result<T, DaemonError> {
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if adopted => {
                tracing::error!(error = %e, "{what} failed; the VMs run on; retrying in 1 s");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The arguments of the daemon a warm reboot starts: the same settings, resolved, without
/// the config (its VMs are handed over, not created again).
fn successor_args(
    opts: &DaemonOptions,
    socket: &Path,
    state_dir: &Path,
    fleet: Option<&crate::fleet::FleetOptions>,
) -> Vec<OsString> {
    let mut args = opts.successor_args.clone();
    args.extend([
        "daemon".into(),
        "--socket".into(),
        socket.into(),
        "--state-dir".into(),
        state_dir.into(),
        "--stop-grace-secs".into(),
        opts.stop_grace.as_secs().to_string().into(),
    ]);
    if let Some(addr) = &opts.metrics_addr {
        args.extend(["--metrics-addr".into(), addr.to_string().into()]);
    }
    args.extend(opts.migration.to_args());
    if let Some(f) = fleet {
        args.extend(f.to_args());
    }
    args
}

/// What the fleet agent's thread runs first: its seccomp filter (a network client).
fn fleet_thread_setup() -> Box<dyn FnOnce() + Send> {
    Box::new(|| warmvm_sandbox::enter_or_log(warmvm_sandbox::ThreadKind::Fleet))
}

/// Let the daemon migrate VMs out, and accept them on `listener` if it has one. Returns
/// what the start-up log says of it.
fn start_migration(
    state: &Arc<ApiState>,
    setup: &crate::migration::Setup,
    listener: Option<&TcpListener>,
    adopted: bool,
) -> Result<String, DaemonError> {
    let listening_on = listener.and_then(|l| l.local_addr().ok());
    state.enable_migration(setup.clone(), listening_on);
    let Some(listener) = listener else {
        return Ok(match setup.listen {
            // A new daemon that could not bind it: it serves its VMs without.
            Some(addr) => format!("not listening on {addr}"),
            None => "outgoing only".to_string(),
        });
    };
    let started = keep_trying(adopted, "accepting migrations", || {
        let hv = state
            .lock()
            .hypervisor()
            .try_clone()
            .map_err(|e| DaemonError::Host(e.into()))?;
        let l = listener.try_clone().map_err(migration_listen)?;
        crate::migration::start_listener(
            state.clone(),
            l,
            hv,
            setup.tls.as_ref().map(|t| t.server()),
            setup.io_timeout,
        )
        .map_err(migration_listen)
    });
    started?;
    Ok(match (listening_on, &setup.tls) {
        (Some(a), Some(_)) => format!("mtls://{a}"),
        (Some(a), None) => format!("tcp://{a} (insecure)"),
        (None, _) => "listening".to_string(),
    })
}

fn migration_listen(source: std::io::Error) -> DaemonError {
    DaemonError::Serve {
        what: "accept migrations",
        source,
    }
}

/// A new daemon: open KVM, bind (or inherit) the socket and the metrics port.
fn start_fresh(
    opts: &DaemonOptions,
    state_dir: &Path,
    socket_path: &Path,
) -> Result<Started, DaemonError> {
    let host = Host::open(state_dir)?;
    let (listener, socket_file) = match opts.listen_fd {
        Some(fd) => {
            let listener = socket::listener_from_fd(fd)?;
            // An inherited socket's file is ours to remove at exit only if it is where we
            // were told it is.
            (listener, SocketFile::adopt(socket_path).ok())
        }
        None => {
            let (l, f) = socket::bind(socket_path)?;
            (l, Some(f))
        }
    };
    let migration = match opts.migration.listen {
        Some(addr) => Some(crate::migration::bind(addr).map_err(DaemonError::Migration)?),
        None => None,
    };
    let metrics = match &opts.metrics_addr {
        Some(addr) => {
            Some(
                TcpListener::bind(addr).map_err(|source| DaemonError::MetricsListen {
                    addr: *addr,
                    source,
                })?,
            )
        }
        None => None,
    };
    Ok(Started {
        host,
        listener,
        socket_file,
        metrics,
        migration,
        takeover: None,
        inherited: None,
        cold_taps: Default::default(),
    })
}

/// Create `dir` (mode 0700, with its parents) if missing; true if this call created it.
fn create_private_dir(dir: &Path, what: &'static str) -> Result<bool, DaemonError> {
    if dir.exists() {
        return Ok(false);
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| DaemonError::CreateDir {
            what,
            dir: dir.to_path_buf(),
            source,
        })?;
    Ok(true)
}

/// True if `dir` is on a RAM-backed file system (tmpfs or ramfs, as `/run` is).
fn is_in_ram(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value for the kernel to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is valid for writes of its size.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return false;
    }
    // ramfs's, which libc does not name.
    const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
    st.f_type == libc::TMPFS_MAGIC || st.f_type == RAMFS_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_backed_directories_are_told_from_disk_ones() {
        // Where the sources are checked out is on disk.
        assert!(!is_in_ram(Path::new(env!("CARGO_MANIFEST_DIR"))));
        // POSIX shared memory is a tmpfs on Linux.
        if Path::new("/dev/shm").is_dir() {
            assert!(is_in_ram(Path::new("/dev/shm")));
        }
        assert!(!is_in_ram(Path::new("/nonexistent/warmvm")));
    }
}
