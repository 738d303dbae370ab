//! `warmvm fleet roll` and `warmvm fleet resume`: store a rolling plan in the fleet's etcd,
//! and clear a halt. Both talk to etcd through a current-thread runtime of their own.

use std::process::ExitCode;

use clap::Args;
use warmvm_fleet::plan::{MissingHost, PlanRequest, PlanSpec, DEFAULT_BLACKOUT_P99_LIMIT_US};
use warmvm_fleet::FleetError;

use super::etcd::{fleet_failure, EtcdArgs};
use crate::failure::Failure;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum OnMissingHost {
    Halt,
    Skip,
}

/// `warmvm fleet roll`'s plan, beside the etcd it goes to.
#[derive(Args, Debug)]
pub struct RollArgs {
    /// How each host reboots: warm, saved or cold.
    #[arg(long, value_parser = ["warm", "saved", "cold"])]
    pub mode: String,
    /// The new build's path, the same on every host (checked here against --sha256).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<String>,
    /// The new build's sha256, 64 lower-case hex digits.
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// How many hosts go first, alone.
    #[arg(long, default_value_t = 1)]
    pub canary: u32,
    /// The most hosts in a step at once.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub max_unavailable: u32,
    /// Seconds to wait after the canary passed, before the rest.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub soak: u64,
    /// The hosts, in order [default: every host registered now, by name].
    #[arg(long, value_delimiter = ',', value_name = "HOST[,HOST...]")]
    pub hosts: Vec<String>,
    /// The gate's limit on a host's reboot blackout (p99), microseconds.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_BLACKOUT_P99_LIMIT_US)]
    pub blackout_limit_us: u64,
    /// A host missing (or stale, or unhealthy) when its turn comes: halt the fleet, or
    /// skip it.
    #[arg(long, value_enum, default_value = "halt")]
    pub on_missing_host: OnMissingHost,
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

/// Store the plan (nothing when anything is refused) and print its id.
pub fn roll(etcd: &EtcdArgs, plan: RollArgs, json: bool) -> Result<ExitCode, Failure> {
    let RollArgs {
        mode,
        binary,
        sha256,
        canary,
        max_unavailable,
        soak,
        hosts,
        blackout_limit_us,
        on_missing_host,
    } = plan;
    let options = etcd.options()?;
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

/// Clear the fleet's halt (the plan goes on past the failed host).
pub fn resume(etcd: &EtcdArgs, json: bool) -> Result<ExitCode, Failure> {
    let options = etcd.options()?;
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

fn print_plan(spec: &PlanSpec, json: bool) {
    if json {
        println!("{}", serde_json::to_string(spec).unwrap_or_default());
    } else {
        println!("{}", spec.id);
    }
}
