//! `warmvm-bench`'s command line: the global flags and `bench` subcommands `warmvm` has (one
//! definition, in warmvm-cli-common; `warmvm bench ...` runs this binary with its command
//! line), plus `foundation`; and how a benchmark fails.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
pub use warmvm_cli_common::bench_args::{BenchCommand, RebootMode};
pub use warmvm_cli_common::exit::{EXIT_BAD_INPUT, EXIT_HOST, EXIT_VM_FAILED};
/// A benchmark that failed: one line and an exit status, as `warmvm` prints them.
pub use warmvm_cli_common::failure::Failure;
use warmvm_cli_common::globals::GlobalArgs;

#[derive(Parser, Debug)]
#[command(name = "warmvm-bench", version, about = "warmvm's benchmarks")]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    #[command(flatten)]
    Bench(BenchCommand),
    /// The VMM foundation's figures (issue 2, point 9): start-up time, port-exit cost
    /// against the bare C probe, VMM memory per VM. Needs /dev/kvm, gcc, and a built
    /// `warmvm` (build both with `cargo build --release -p warmvm -p warmvm-bench`).
    Foundation(crate::FoundationArgs),
}

/// The API's reboot mode for a bench's `--modes` entry.
pub fn api_mode(mode: RebootMode) -> warmvm_api::types::Mode {
    match mode {
        RebootMode::Warm => warmvm_api::types::Mode::Warm,
        RebootMode::Saved => warmvm_api::types::Mode::Saved,
        RebootMode::Cold => warmvm_api::types::Mode::Cold,
    }
}

/// The `warmvm` binary beside this one, whose daemons and demo the benchmarks run.
pub fn warmvm_exe() -> Result<PathBuf, Failure> {
    let exe = std::env::current_exe()
        .map_err(|e| Failure::new(EXIT_HOST, format!("cannot find this binary: {e}")))?;
    let warmvm = exe.with_file_name("warmvm");
    if !warmvm.is_file() {
        return Err(Failure::new(
            EXIT_HOST,
            format!(
                "{} not found: the benchmarks run the warmvm beside them (build both with `cargo build --release -p warmvm -p warmvm-bench`)",
                warmvm.display()
            ),
        ));
    }
    Ok(warmvm)
}

/// Run one of the `bench` subcommands, with the global `--json` (and `--socket`).
pub fn dispatch(global: GlobalArgs, what: BenchCommand) -> Result<ExitCode, Failure> {
    match what {
        BenchCommand::WarmReboot(mut args) => {
            args.json = global.json;
            args.socket = global.socket;
            crate::bench::warm_reboot(&args)
        }
        BenchCommand::Cache(mut args) => {
            args.json = global.json;
            crate::bench_cache::cache(&args)
        }
        BenchCommand::Reboot(mut args) => {
            args.json = global.json;
            crate::bench_reboot::reboot(&args)
        }
        BenchCommand::Faults(mut args) => {
            args.json = global.json;
            crate::bench_faults::faults(&args)
        }
        BenchCommand::Aging(mut args) => {
            args.json = global.json;
            crate::bench_aging::aging(&args)
        }
        BenchCommand::Soak(mut args) => {
            args.json = global.json;
            crate::bench_soak::soak(&args)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    /// `warmvm` hands its command line over with only the word `bench` taken out.
    #[test]
    fn it_takes_what_warmvm_bench_takes() {
        let cli = Cli::try_parse_from([
            "warmvm-bench",
            "--json",
            "--log-level",
            "error",
            "reboot",
            "--modes",
            "warm",
            "--socket",
            "/x.sock",
        ])
        .unwrap();
        assert!(cli.global.json);
        assert_eq!(cli.global.socket, Some(PathBuf::from("/x.sock")));
        let Command::Bench(BenchCommand::Reboot(args)) = cli.command else {
            panic!("not reboot");
        };
        assert_eq!(args.modes, [RebootMode::Warm]);
        let cli = Cli::try_parse_from(["warmvm-bench", "foundation", "--json"]).unwrap();
        assert!(cli.global.json);
    }
}
