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
#[command(name = "warmvm", version, about = "A KVM VMM whose VMs survive a restart of the VMM itself")]
pub struct Cli {
    /// Log verbosity (error, warn, info, debug, trace), or a tracing filter.
    #[arg(long, global = true, default_value = "warn", env = "WARMVM_LOG")]
    pub log_level: String,
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
    Demo {
        /// Print the results as one JSON document.
        #[arg(long)]
        json: bool,
        /// Number of VMs.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
        vms: u32,
        /// RAM of each VM, in MiB.
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        /// vCPUs of each VM.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Let the workloads run at least this long, in seconds.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Directory for console logs.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

/// A failure the binary turns into one line and an exit status.
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
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn dispatch(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Run {
            config,
            json,
            state_dir,
            grace_secs,
        } => crate::run::run(&config, json, state_dir, grace_secs),
        Command::Demo {
            json,
            vms,
            memory_mib,
            vcpus,
            seconds,
            state_dir,
        } => crate::demo::demo(&crate::demo::DemoArgs {
            json,
            vms,
            memory_mib,
            vcpus,
            seconds,
            state_dir,
        }),
    }
}
