//! `warmvm fleet roll` and `warmvm fleet resume`: store a rolling plan in the fleet's etcd,
//! and clear a halt. Both talk to etcd through a current-thread runtime of their own.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use warmvm_fleet::plan::{MissingHost, PlanRequest, PlanSpec, DEFAULT_BLACKOUT_P99_LIMIT_US};
use warmvm_fleet::{EtcdOptions, FleetError};

use crate::failure::{Failure, EXIT_BAD_INPUT, EXIT_HOST};

/// How the CLI reaches the fleet's etcd.
#[derive(Args, Debug, Clone)]
pub struct EtcdArgs {
    /// The etcd cluster: http://HOST:PORT or https://HOST:PORT, comma separated.
    #[arg(long, value_name = "URL[,URL...]")]
    pub etcd: String,
    /// The CA (PEM) that signed the etcd members' certificates (https endpoints).
    #[arg(long, value_name = "PATH")]
    pub etcd_ca: Option<PathBuf>,
    /// This client's certificate (PEM), for clusters that require one.
    #[arg(long, value_name = "PATH", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, value_name = "PATH", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum OnMissingHost {
    Halt,
    Skip,
}

#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Store a plan that reboots the fleet's hosts in waves: the canary host(s), a soak,
    /// then the rest at most --max-unavailable at a time; optionally onto a new build
    /// (--binary, staged at that path on every host, and its --sha256). Prints the plan's
    /// id. Nothing is stored when anything is refused.
    Roll {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// How each host reboots: warm, saved or cold.
        #[arg(long, value_parser = ["warm", "saved", "cold"])]
        mode: String,
        /// The new build's path, the same on every host (checked here against --sha256).
        #[arg(long, value_name = "PATH")]
        binary: Option<String>,
        /// The new build's sha256, 64 lower-case hex digits.
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// How many hosts go first, alone.
        #[arg(long, default_value_t = 1)]
        canary: u32,
        /// The most hosts in a step at once.
        #[arg(long, value_name = "N", default_value_t = 1)]
        max_unavailable: u32,
        /// Seconds to wait after the canary passed, before the rest.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        soak: u64,
        /// The hosts, in order [default: every host registered now, by name].
        #[arg(long, value_delimiter = ',', value_name = "HOST[,HOST...]")]
        hosts: Vec<String>,
        /// The gate's limit on a host's reboot blackout (p99), microseconds.
        #[arg(long, value_name = "US", default_value_t = DEFAULT_BLACKOUT_P99_LIMIT_US)]
        blackout_limit_us: u64,
        /// A host missing (or stale, or unhealthy) when its turn comes: halt the fleet, or
        /// skip it.
        #[arg(long, value_enum, default_value = "halt")]
        on_missing_host: OnMissingHost,
    },
    /// Clear the fleet's halt after an operator has looked: the plan goes on (past the
    /// failed host, which is not retried).
    Resume {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

fn fleet_failure(e: FleetError) -> Failure {
    let code = match &e {
        FleetError::Invalid(_)
        | FleetError::Refused(_)
        | FleetError::ReadFile { .. }
        | FleetError::StepNotAssigned { .. } => EXIT_BAD_INPUT,
        _ => EXIT_HOST,
    };
    Failure::from_error(code, &e)
}

/// Who runs this command: user@machine.
fn operator() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid{}", uid()));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{host}")
}

fn uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(u32::MAX)
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fleet_failure(FleetError::Runtime(e)))
}

fn options(etcd: &EtcdArgs) -> Result<EtcdOptions, Failure> {
    EtcdOptions::new(
        &etcd.etcd,
        etcd.etcd_ca.clone(),
        etcd.etcd_cert.clone(),
        etcd.etcd_key.clone(),
    )
    .map_err(fleet_failure)
}

pub fn fleet(cmd: FleetCommand, json: bool) -> Result<ExitCode, Failure> {
    match cmd {
        FleetCommand::Roll {
            etcd,
            mode,
            binary,
            sha256,
            canary,
            max_unavailable,
            soak,
            hosts,
            blackout_limit_us,
            on_missing_host,
        } => {
            let options = options(&etcd)?;
            let request = PlanRequest {
                mode,
                binary,
                sha256,
                canary,
                max_unavailable,
                soak_secs: soak,
                hosts,
                blackout_p99_limit_us: blackout_limit_us,
                on_missing_host: match on_missing_host {
                    OnMissingHost::Halt => MissingHost::Halt,
                    OnMissingHost::Skip => MissingHost::Skip,
                },
                created_by: operator(),
            };
            // What needs neither etcd nor the binary is refused before connecting.
            if !request.hosts.is_empty() {
                request.check(&request.hosts).map_err(fleet_failure)?;
            }
            let spec = runtime()?.block_on(async {
                let mut client = options.connect().await?;
                warmvm_fleet::plan::create_plan(&mut client, &request).await
            });
            let spec = spec.map_err(fleet_failure)?;
            print_plan(&spec, json);
            Ok(ExitCode::SUCCESS)
        }
        FleetCommand::Resume { etcd } => {
            let options = options(&etcd)?;
            let by = operator();
            let cleared = runtime()?
                .block_on(async {
                    let mut client = options.connect().await?;
                    warmvm_fleet::halt::clear(&mut client, &by).await
                })
                .map_err(fleet_failure)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "resumed": cleared.is_some(), "halt": cleared })
                );
            } else {
                match cleared {
                    Some(h) => println!("resumed: the halt by {} ({}) is cleared", h.by, h.reason),
                    None => println!("the fleet is not halted: nothing to resume"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_plan(spec: &PlanSpec, json: bool) {
    if json {
        println!("{}", serde_json::to_string(spec).unwrap_or_default());
    } else {
        println!("{}", spec.id);
    }
}
