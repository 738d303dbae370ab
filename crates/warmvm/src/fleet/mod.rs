//! `warmvm fleet ...`: the fleet of hosts as etcd holds it. Each subcommand names the etcd
//! cluster itself (`--etcd`, and its TLS files); none needs a daemon on this host.

mod etcd;
mod plan;
mod status;

use std::process::ExitCode;

pub use etcd::EtcdArgs;
pub use status::membership_line;

use crate::failure::Failure;

#[derive(clap::Subcommand, Debug)]
pub enum FleetCommand {
    /// List the hosts (build, pid, health, VMs, verified guests, how fresh the record is)
    /// the fleet-wide keys (halt, slots), and the current or last plan with its steps. With
    /// --json: the records themselves.
    Status {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Also print the last N events of the fleet's history [N: 20].
        #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "20")]
        events: Option<u32>,
    },
    /// Store a plan that reboots the fleet's hosts in waves: the canary host(s), a soak,
    /// then the rest at most --max-unavailable at a time; optionally onto a new build
    /// (--binary, staged at that path on every host, and its --sha256). Prints the plan's
    /// id. Nothing is stored when anything is refused.
    Roll {
        #[command(flatten)]
        etcd: EtcdArgs,
        #[command(flatten)]
        plan: plan::RollArgs,
    },
    /// Clear the fleet's halt after an operator has looked: the plan goes on (past the
    /// failed host, which is not retried).
    Resume {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

pub fn fleet(what: FleetCommand, json: bool) -> Result<ExitCode, Failure> {
    match what {
        FleetCommand::Status { etcd, events } => status::status(&etcd, events.unwrap_or(0), json),
        FleetCommand::Roll { etcd, plan } => plan::roll(&etcd, plan, json),
        FleetCommand::Resume { etcd } => plan::resume(&etcd, json),
    }
}
