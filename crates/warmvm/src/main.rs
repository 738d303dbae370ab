//! The `warmvm` command.

mod aging;
mod bench;
mod bench_aging;
mod bench_aging_plot;
mod bench_aging_report;
mod bench_aging_sim;
mod bench_cache;
mod bench_cache_load;
mod bench_daemon;
mod bench_faults;
mod bench_pause;
mod bench_peer;
mod bench_qemu;
mod bench_reboot;
mod bench_segments;
mod bench_soak;
mod cli;
mod client;
mod console;
mod demo;
mod interrupt;
mod manpages;
mod output;
mod plots;
mod progress;
mod reboot_progress;
mod run;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before anything can replace the file this process was started from.
    warmvm_vmm::executable::remember();
    let args = cli::Cli::parse();
    cli::init_logging(&args);
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("warmvm: error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}
