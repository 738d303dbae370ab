//! `warmvm-bench`: warmvm's benchmarks. See docs/benchmarks.md.

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
mod exits;
mod interrupt;
mod memory;
mod plots;
mod progress;
mod startup;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

use crate::util::{Result, ScratchDir};

#[derive(clap::Args, Debug)]
pub(crate) struct FoundationArgs {
    /// Print the results as one JSON document (the global `--json`).
    #[arg(skip)]
    json: bool,
    /// The warmvm binary [default: `warmvm` next to this binary].
    #[arg(long)]
    warmvm: Option<PathBuf>,
    /// The bare KVM probe's C source (kept in the repository, crates/bench/probes/).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/probes/ring3_exits.c"))]
    probe: PathBuf,
    /// Start-up runs (each: one `warmvm run` and one in-process VM).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    startup_runs: u32,
    /// RAM of the start-up VM, in MiB.
    #[arg(long, default_value_t = 256)]
    startup_memory_mib: u64,
    /// Interleaved rounds of probe and warmvm exit timings.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    exit_rounds: u32,
    /// Loop iterations per exit timing (the probe makes two exits per iteration).
    #[arg(long, default_value_t = 20000, value_parser = clap::value_parser!(u32).range(100..=10_000_000))]
    exit_loops: u32,
    /// VMs of the second memory sample (the first has 1).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=256))]
    memory_vms: u32,
}

#[derive(Serialize)]
struct FoundationReport {
    date: String,
    host: String,
    warmvm: PathBuf,
    startup: startup::StartupReport,
    port_exit: exits::ExitReport,
    vmm_memory: memory::MemoryReport,
    all_goals_met: bool,
}

fn foundation(args: FoundationArgs) -> Result<ExitCode> {
    let warmvm = util::find_warmvm(args.warmvm)?;
    if !args.probe.is_file() {
        return util::fail(format!(
            "probe source {} not found (pass --probe PATH to ring3_exits.c)",
            args.probe.display()
        ));
    }
    let scratch = ScratchDir::new()?;
    // Progress goes to standard error, with or without --json (which only owns stdout): one
    // plain line per step, which reads the same on a terminal and in a log.
    let started = std::time::Instant::now();
    let progress = |step: usize, what: &str| {
        eprintln!(
            "warmvm-bench: [{step}/3] measuring {what} ({} s)",
            started.elapsed().as_secs()
        );
    };
    progress(1, "start-up");
    let startup = startup::measure(
        &warmvm,
        scratch.path(),
        args.startup_runs as usize,
        args.startup_memory_mib,
    )?;
    progress(2, "port exits");
    let port_exit = exits::measure(
        &args.probe,
        scratch.path(),
        args.exit_rounds as usize,
        args.exit_loops,
    )?;
    progress(3, "VMM memory per VM");
    let vmm_memory = memory::measure(&warmvm, scratch.path(), args.memory_vms as usize)?;
    let report = FoundationReport {
        date: util::utc_date(),
        host: util::host_description(),
        warmvm,
        all_goals_met: port_exit.meets_goal && vmm_memory.meets_goal,
        startup,
        port_exit,
        vmm_memory,
    };
    if args.json {
        let text = serde_json::to_string_pretty(&report).map_err(util::ctx("encoding JSON"))?;
        println!("{text}");
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn stats(s: &util::Stats, unit: &str) -> String {
    format!(
        "{:.2} {unit}  (min {:.2}, max {:.2}, n={})",
        s.median,
        s.min,
        s.max,
        s.samples.len()
    )
}

fn print_table(r: &FoundationReport) {
    let verdict = |ok: bool| if ok { "met" } else { "NOT MET" };
    println!("warmvm foundation benchmark, {} ({})", r.date, r.host);
    println!("warmvm binary: {}", r.warmvm.display());
    println!();
    let s = &r.startup;
    println!(
        "1. Start-up: one {} MiB reference-guest VM, cmdline \"{}\" (medians of {} runs; no goal set)",
        s.memory_mib, s.cmdline, s.runs
    );
    let row = |name: &str, value: String| println!("   {name:<52} {value}");
    row(
        "process start -> first instruction (estimate)",
        format!("{:.2} ms", s.estimated_spawn_to_first_instruction_ms),
    );
    row(
        "spawn `warmvm run` -> first guest console output",
        stats(&s.spawn_to_first_console_output_ms, "ms"),
    );
    row(
        "spawn `warmvm run` -> exit",
        stats(&s.spawn_to_exit_ms, "ms"),
    );
    row("in process: create VM", stats(&s.create_ms, "ms"));
    row(
        "in process: VM created -> first KVM_RUN",
        stats(&s.created_to_first_run_ms, "ms"),
    );
    row(
        "in process: start of creation -> first KVM_RUN",
        stats(&s.create_to_first_run_ms, "ms"),
    );
    row(
        "in process: first KVM_RUN -> first console output",
        stats(&s.first_run_to_first_console_output_ms, "ms"),
    );
    println!();
    let e = &r.port_exit;
    println!(
        "2. Port-exit round trip ({} interleaved rounds of {} loop iterations)",
        e.rounds, e.loops
    );
    row(
        "bare C probe (MMIO + port exits, as printed)",
        stats(&e.probe_us, "us/exit"),
    );
    if let Some(p) = &e.probe_port_only_us {
        row("bare C probe, port exits only", stats(p, "us/exit"));
    }
    row(
        "warmvm (hypervisor + devices + vCPU loop)",
        stats(&e.warmvm_us, "us/exit"),
    );
    row(
        "ratio warmvm / probe",
        format!(
            "{:.3}   goal <= {:.2}: {}",
            e.ratio,
            e.goal_max_ratio,
            verdict(e.meets_goal)
        ),
    );
    if let Some(ratio) = e.ratio_port_only {
        row("ratio warmvm / port-only probe", format!("{ratio:.3}"));
    }
    println!();
    let m = &r.vmm_memory;
    println!(
        "3. VMM resident memory excluding guest RAM (VmRSS - RssShmem), VMs of {} MiB",
        m.memory_mib_per_vm
    );
    for sample in [&m.one, &m.many] {
        row(
            &format!(
                "{} VM{}",
                sample.vms,
                if sample.vms == 1 { "" } else { "s" }
            ),
            format!(
                "{:.1} MiB  (VmRSS {:.1}, RssShmem {:.1}, RssAnon {:.1}, RssFile {:.1}){}",
                sample.vmm_kib as f64 / 1024.0,
                sample.proc.vm_rss_kib as f64 / 1024.0,
                sample.proc.rss_shmem_kib as f64 / 1024.0,
                sample.proc.rss_anon_kib as f64 / 1024.0,
                sample.proc.rss_file_kib as f64 / 1024.0,
                if sample.clean_exit {
                    ""
                } else {
                    "  [unclean exit]"
                }
            ),
        );
    }
    row(
        &format!("per VM ({} VMs - 1 VM) / {}", m.many.vms, m.many.vms - 1),
        format!(
            "{:.2} MiB   goal <= {:.1} MiB: {}",
            m.per_vm_mib,
            m.goal_max_mib_per_vm,
            verdict(m.meets_goal)
        ),
    );
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    warmvm_cli_common::globals::init_logging(&cli.global, "warn");
    match cli.command {
        // As `warmvm bench` prints it: the failure is the one both binaries share.
        cli::Command::Bench(what) => {
            cli::dispatch(cli.global, what).unwrap_or_else(cli::Failure::exit)
        }
        cli::Command::Foundation(mut args) => {
            args.json = cli.global.json;
            match foundation(args) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("warmvm-bench: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
