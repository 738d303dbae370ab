use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use warmvm_vmm::{ConfigError, HostError, VmError};

/// Exit statuses: 0 success, 1 a VM failed (crash, integrity error), 2 bad input,
/// 3 the host cannot run VMs (no KVM, no permission).
pub const EXIT_VM_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;
pub const EXIT_HOST: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "warmvm",
    version,
    about = "A KVM VMM whose VMs survive a restart of the VMM itself"
)]
pub struct Cli {
    /// Log verbosity (error, warn, info, debug, trace), or a tracing filter
    /// [default: info for `daemon`, warn otherwise].
    #[arg(long, global = true, env = "WARMVM_LOG")]
    pub log_level: Option<String>,
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Blackout of chained warm reboots for several VM counts and RAM sizes.
    WarmReboot(crate::bench::WarmRebootArgs),
    /// Randomised fault-injection trials of the daemon's warm reboot (a fault-injection build).
    Faults(crate::bench_faults::FaultsArgs),
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot the VMs a TOML config file describes and wait until they all power off
    /// (Ctrl-C asks them to power off).
    Run {
        config: PathBuf,
        /// Print the results as one JSON document.
        #[arg(long)]
        json: bool,
        /// Directory for console logs (default: /run/warmvm as root).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Seconds a guest gets to power off after being asked, before it is forced.
        #[arg(long, default_value_t = 10)]
        grace_secs: u64,
    },
    /// Boot built-in reference-guest VMs, let them verify their memory, and report.
    /// Needs no files.
    Demo(crate::demo::DemoArgs),
    /// Benchmarks that print figures (see docs/benchmarks.md).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Run the host daemon: it holds VMs and serves the HTTP/JSON API on a Unix socket
    /// until SIGTERM or SIGINT, which power every VM off. See docs/daemon.md.
    Daemon {
        /// The API socket [default: <state dir>/warmvm.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Directory for console logs and the default socket [default: /run/warmvm as root,
        /// $XDG_RUNTIME_DIR/warmvm or /tmp/warmvm-<uid> otherwise].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Also serve GET /metrics on this loopback TCP address, e.g. 127.0.0.1:9464.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// A TOML config (as for `run`) whose VMs are created and started at start-up.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Seconds each guest gets to power off when the daemon stops, before it is forced.
        #[arg(long, default_value_t = 10)]
        stop_grace_secs: u64,
        /// Serve on this inherited, already listening Unix socket instead of binding one
        /// (for a warm reboot's handover).
        #[arg(long, hide = true)]
        listen_fd: Option<i32>,
        /// (internal) Take the VMs over from the daemon that started this one, on this fd.
        #[arg(long, hide = true)]
        takeover_fd: Option<i32>,
    },
    /// Warm-reboot the daemon: a new daemon process (the same binary, or --binary to
    /// upgrade) takes over every VM without stopping it, and serves on the same socket.
    /// Prints each VM's blackout and the time of each phase.
    Reboot {
        /// How to reboot: `warm` (the VMs keep running, suspended only briefly).
        #[arg(long, value_enum)]
        mode: RebootMode,
        /// The new daemon's binary [default: the running daemon's own].
        #[arg(long)]
        binary: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Manage the daemon's VMs through its API.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Show the daemon's version, pid, uptime and VM count.
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RebootMode {
    /// Hand every VM to a new daemon process, suspended on memory only briefly.
    Warm,
}

/// How the CLI reaches the daemon.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// The daemon's API socket [default: <default state dir>/warmvm.sock].
    #[arg(long, env = "WARMVM_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Print the daemon's JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Create a VM from a file holding one VM's config (TOML with the VM's keys at the top
    /// level, or JSON) and start it.
    Create {
        config: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the daemon's VMs.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one VM: state, RAM, vCPUs, uptime, exits, the reference guest's figures.
    Show {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Pause a running VM (every vCPU stops between two instructions).
    Pause {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Resume a paused VM.
    Resume {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Ask a VM's guest to power off, and force it off after the grace period.
    Stop {
        name: String,
        /// Seconds the guest gets before it is forced off.
        #[arg(long)]
        grace_secs: Option<u64>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a VM that is not running (stop it first).
    Delete {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// A failure the binary turns into one line and an exit status.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code,
        }
    }
}

impl From<HostError> for Failure {
    fn from(e: HostError) -> Self {
        let code = match &e {
            HostError::Hypervisor(_) => EXIT_HOST,
            HostError::Config(_)
            | HostError::Exists(_)
            | HostError::NotFound(_)
            | HostError::StillRunning(_) => EXIT_BAD_INPUT,
            HostError::Vm { err, .. } => match err {
                VmError::Boot(_) | VmError::ReadFile { .. } => EXIT_BAD_INPUT,
                _ => EXIT_HOST,
            },
        };
        Self::new(code, e.to_string())
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Self::new(EXIT_BAD_INPUT, e.to_string())
    }
}

pub fn init_logging(cli: &Cli) {
    // The daemon's log is its operators' record of what happened to each VM.
    let default = match cli.command {
        Command::Daemon { .. } => "info",
        _ => "warn",
    };
    let filter =
        tracing_subscriber::EnvFilter::try_new(cli.log_level.as_deref().unwrap_or(default))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The global flags again, for a daemon started by a warm reboot.
fn global_args(cli: &Cli) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    if let Some(level) = &cli.log_level {
        args.extend(["--log-level".into(), level.into()]);
    }
    let format = match cli.log_format {
        LogFormat::Human => "human",
        LogFormat::Json => "json",
    };
    args.extend(["--log-format".into(), format.into()]);
    args
}

pub fn dispatch(cli: Cli) -> Result<ExitCode, Failure> {
    let successor_args = global_args(&cli);
    match cli.command {
        Command::Run {
            config,
            json,
            state_dir,
            grace_secs,
        } => crate::run::run(&config, json, state_dir, grace_secs),
        Command::Bench {
            what: BenchCommand::WarmReboot(args),
        } => crate::bench::warm_reboot(&args),
        Command::Bench {
            what: BenchCommand::Faults(args),
        } => crate::bench_faults::faults(&args),
        Command::Demo(args) => crate::demo::demo(&args),
        Command::Daemon {
            socket,
            state_dir,
            metrics_addr,
            config,
            stop_grace_secs,
            listen_fd,
            takeover_fd,
        } => crate::client::daemon(warmvm_api::DaemonOptions {
            socket,
            state_dir,
            metrics_addr,
            config,
            listen_fd,
            stop_grace: std::time::Duration::from_secs(stop_grace_secs),
            takeover_fd,
            successor_args,
            ..Default::default()
        }),
        Command::Reboot { mode, binary, api } => crate::client::reboot(mode, binary, &api),
        Command::Vm(cmd) => crate::client::vm(cmd),
        Command::Status { api } => crate::client::status(&api),
    }
}
