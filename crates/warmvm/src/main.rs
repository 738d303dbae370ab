//! The `warmvm` command.

mod aging;
mod args;
mod cli;
mod client;
mod console;
mod demo;
mod external;
mod failure;
mod fleet;
mod manpages;
mod output;
mod reboot_progress;
mod run;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before anything can replace the file this process was started from.
    warmvm_vmm::executable::remember();
    let args = args::Cli::parse();
    cli::init_logging(&args);
    cli::dispatch(args).unwrap_or_else(failure::Failure::exit)
}
