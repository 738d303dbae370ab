//! `warmvm daemon`: the process around the API server, from start-up to a clean exit.
//!
//! Start-up order: read and validate the optional config (nothing touched yet), open KVM,
//! take the socket (refusing a live daemon's), create and start the config's VMs, then
//! listen and tell systemd `READY=1`. SIGTERM or SIGINT: stop taking requests, power every
//! VM off (each guest gets the grace period, then is forced), remove the socket, exit 0.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use warmvm_vmm::{Config, Host, HostError};

use crate::server::Server;
use crate::socket::{self, SocketError, SocketFile};
use crate::state::ApiState;

/// The socket's file name in the state directory.
pub const SOCKET_NAME: &str = "warmvm.sock";

/// The default API socket: `<default state dir>/warmvm.sock`.
pub fn default_socket() -> PathBuf {
    warmvm_vmm::config::default_state_dir().join(SOCKET_NAME)
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
        }
    }
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The operator's input is wrong (config, flags).
    #[error("{0}")]
    Input(String),
    /// The host cannot run the daemon (no KVM, socket taken, I/O errors).
    #[error("{0}")]
    Host(String),
}

impl From<HostError> for DaemonError {
    fn from(e: HostError) -> Self {
        match &e {
            HostError::Hypervisor(_) | HostError::Vm { .. } => DaemonError::Host(e.to_string()),
            _ => DaemonError::Input(e.to_string()),
        }
    }
}

impl From<SocketError> for DaemonError {
    fn from(e: SocketError) -> Self {
        DaemonError::Host(e.to_string())
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

/// Run the daemon until SIGTERM or SIGINT.
pub fn run(opts: &DaemonOptions) -> Result<(), DaemonError> {
    let config = match &opts.config {
        Some(path) => {
            let config =
                Config::from_toml_file(path).map_err(|e| DaemonError::Input(e.to_string()))?;
            if !config.vms.is_empty() {
                config
                    .validate(warmvm_vmm::HostLimits::probe())
                    .map_err(|e| DaemonError::Input(e.to_string()))?;
            }
            Some(config)
        }
        None => None,
    };
    if let Some(addr) = &opts.metrics_addr {
        check_metrics_addr(addr).map_err(DaemonError::Input)?;
    }
    let state_dir = opts
        .state_dir
        .clone()
        .or_else(|| config.as_ref().and_then(|c| c.state_dir.clone()))
        .unwrap_or_else(warmvm_vmm::config::default_state_dir);
    if !state_dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state_dir)
            .map_err(|e| {
                DaemonError::Host(format!(
                    "cannot create the state directory {}: {e}",
                    state_dir.display()
                ))
            })?;
    }
    let socket_path = opts
        .socket
        .clone()
        .unwrap_or_else(|| state_dir.join(SOCKET_NAME));

    let host = Host::open(&state_dir)?;
    let (listener, socket_file) = match opts.listen_fd {
        Some(fd) => {
            let listener = socket::listener_from_fd(fd)?;
            // An inherited socket's file is ours to remove at exit only if it is where we
            // were told it is.
            (listener, SocketFile::adopt(&socket_path).ok())
        }
        None => {
            let (l, f) = socket::bind(&socket_path)?;
            (l, Some(f))
        }
    };
    let metrics =
        match &opts.metrics_addr {
            Some(addr) => Some(TcpListener::bind(addr).map_err(|e| {
                DaemonError::Host(format!("cannot listen for metrics on {addr}: {e}"))
            })?),
            None => None,
        };
    let metrics_url = metrics
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map_or_else(|| "-".to_string(), |a| format!("http://{a}/metrics"));

    let state = Arc::new(ApiState::new(host));
    if let Some(config) = config.as_ref().filter(|c| !c.vms.is_empty()) {
        let mut host = state.host().lock().unwrap_or_else(|p| p.into_inner());
        host.create_all(config)?;
        host.start_all()?;
        for vm in host.vms() {
            tracing::info!(vm = %vm.name(), memory_mib = vm.config.memory_mib, vcpus = vm.config.vcpus, "VM started from the config");
        }
    }

    let mut server = Server::new(listener, state.clone())
        .map_err(|e| DaemonError::Host(format!("cannot serve the API: {e}")))?;
    if let Some(m) = metrics {
        server = server
            .with_metrics(m)
            .map_err(|e| DaemonError::Host(format!("cannot serve metrics: {e}")))?;
    }
    server
        .stop_on_signals(&[signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
        .map_err(|e| DaemonError::Host(format!("cannot install signal handlers: {e}")))?;

    tracing::info!(
        socket = %socket_path.display(),
        state_dir = %state_dir.display(),
        metrics = %metrics_url,
        pid = std::process::id(),
        version = env!("CARGO_PKG_VERSION"),
        "warmvm daemon ready"
    );
    let vm_count = state.vms().len();
    if let Err(e) = socket::sd_notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS=serving {} with {vm_count} VMs",
        std::process::id(),
        socket_path.display()
    )) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }

    let served = server.run();
    let _ = socket::sd_notify("STOPPING=1\nSTATUS=stopping every VM");
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
    served.map_err(|e| DaemonError::Host(format!("the API server failed: {e}")))
}
