//! The `bench` subcommands' arguments, defined once for both binaries: `warmvm` parses them
//! (so its help, man pages and completions list them) and runs `warmvm-bench` with the same
//! command line, which parses them again and does the work.

use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Blackout of chained warm reboots for several VM counts and RAM sizes, through the
    /// daemon's API and through the demo.
    WarmReboot(WarmRebootArgs),
    /// Warm, saved and cold reboot side by side: downtime against the number of VMs and
    /// the RAM size, phases, the disk's bandwidth; a table or --json, and plots.
    Reboot(RebootBenchArgs),
    /// Randomised fault-injection trials of the daemon's warm reboot (a fault-injection build).
    Faults(FaultsArgs),
    /// A guest serving HTTP from its page cache under wrk, with and without a warm reboot
    /// (root: it makes a network namespace; needs wrk and curl).
    Cache(CacheArgs),
    /// Aging detection: live leaks (a fault-injection build), leak rates and false positives
    /// in accelerated time over recorded noise, against time-based rejuvenation; with plots.
    Aging(AgingArgs),
    /// Warm reboots back to back through a daemon (one guest serving HTTP under httperf):
    /// every VM judged after every reboot, the daemon's fds, threads, RSS and heap and the
    /// blackout per window of reboots (root: it makes a network namespace).
    Soak(SoakArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RebootMode {
    /// Hand every VM to a new daemon process, suspended on memory only briefly.
    Warm,
    /// Snapshot every VM to the state directory; the new daemon restores them.
    Saved,
    /// Power every guest off; the new daemon boots them again from their configs.
    Cold,
}

impl RebootMode {
    pub fn name(self) -> &'static str {
        match self {
            RebootMode::Warm => "warm",
            RebootMode::Saved => "saved",
            RebootMode::Cold => "cold",
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct WarmRebootArgs {
    /// Print one JSON document (the global `--json`).
    #[arg(skip)]
    pub json: bool,
    /// The global `--socket` (unused: the bench starts its own daemon).
    #[arg(skip)]
    pub socket: Option<std::path::PathBuf>,
    /// Reboots per cell.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub reboots: u32,
    /// VM counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub vms: Vec<u32>,
    /// RAM per VM in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    pub memory_mib: Vec<u64>,
    /// Reference guest command line: busy guests (interval_ms=0) give the steady
    /// stream the guest-visible gap needs; idle ones isolate the VMM's own cost.
    #[arg(long, default_value = "quiet interval_ms=0")]
    pub guest_cmdline: String,
    #[arg(long, default_value_t = 100)]
    pub reboot_interval_ms: u64,
    #[arg(long, default_value_t = 200)]
    pub gap_window_ms: u64,
    /// Skip cells whose guest RAM is more than this share of host memory.
    #[arg(long, default_value_t = 0.7)]
    pub max_host_share: f64,
    /// Which reboot paths to measure, comma-separated: daemon (PUT /v1/reboot to a
    /// `warmvm daemon`, as operators do), demo (`warmvm demo --reboots N`).
    #[arg(long, value_delimiter = ',', value_enum, default_value = "daemon,demo")]
    pub paths: Vec<RebootPath>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RebootPath {
    Daemon,
    Demo,
}

impl RebootPath {
    pub fn name(self) -> &'static str {
        match self {
            RebootPath::Daemon => "daemon",
            RebootPath::Demo => "demo",
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RebootBenchArgs {
    /// Print one JSON document (the global `--json`).
    #[arg(skip)]
    pub json: bool,
    /// Reboot modes to compare, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "warm,saved,cold"
    )]
    pub modes: Vec<RebootMode>,
    /// VM counts for the downtime-against-VMs sweep (at the first --memory-mib).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub vms: Vec<u32>,
    /// RAM per VM in MiB for the downtime-against-RAM sweep (at one VM).
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    pub memory_mib: Vec<u64>,
    /// Reboots per cell and mode.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// Skip cells with more guest RAM than this in total (the machine is shared).
    #[arg(long, default_value_t = 4096)]
    pub max_total_mib: u64,
    /// Where the daemons and the snapshots live (the disk measured) [default: a directory
    /// under /var/tmp].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also write everything into this directory: table.txt, results.json and the plots
    /// (downtime-vs-vms, downtime-vs-ram, phases; SVG and PNG).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Reference guest command line.
    #[arg(long, default_value = "quiet interval_ms=20")]
    pub guest_cmdline: String,
    /// Do not run QEMU's CheckPoint-and-Restart as a peer (it runs when qemu-system-x86_64
    /// 10 or later is installed).
    #[arg(long)]
    pub no_qemu: bool,
}

#[derive(clap::Args, Debug)]
pub struct FaultsArgs {
    /// Random trials to run (ignored with --fault).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100000))]
    pub trials: u32,
    /// Seed of the choice of faults and durations [default: from the clock; printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON document instead of the table (the global `--json`).
    #[arg(skip)]
    pub json: bool,
    /// VMs per trial.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vms: u32,
    /// RAM per VM in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(2..=65536))]
    pub memory_mib: u64,
    /// vCPUs per VM: each verifies its own share of the RAM and is judged on its own.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vcpus: u32,
    /// Run exactly these faults, one trial each, in order, instead of random ones
    /// (as WARMVM_FAULT spells them, e.g. `old:quiesced:kill`; repeatable).
    #[arg(long = "fault", value_name = "SIDE:POINT:ACTION")]
    pub faults: Vec<String>,
    /// How long the guests run before the reboot (after each has verified some memory).
    #[arg(long, default_value_t = 200)]
    pub run_ms: u64,
    /// The ready budget to ask for in the reboot request [default: the daemon's, 500 ms];
    /// random delays are drawn below and above it.
    #[arg(long)]
    pub ready_budget_ms: Option<u64>,
    /// The stage timeout to ask for in the reboot request [default: the daemon's].
    #[arg(long)]
    pub stage_timeout_ms: Option<u64>,
    /// Reference guest command line.
    #[arg(long, default_value = "quiet interval_ms=0 refill_every=1")]
    pub guest_cmdline: String,
    /// Run nothing: print the table of a campaign saved with --json (the table in
    /// docs/benchmarks.md is made this way from the committed campaign).
    #[arg(long, value_name = "FILE")]
    pub table_from: Option<std::path::PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct CacheArgs {
    /// Print one JSON document (the global `--json`).
    #[arg(skip)]
    pub json: bool,
    /// Length of each load run, in seconds.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub duration_secs: u64,
    /// When the reboot happens in its run, in seconds from its start.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub reboot_after_secs: u64,
    /// The fixed request rate of the reboot runs (httperf), requests per second.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub rate: u32,
    /// Keep-alive sessions sharing the fixed rate (each makes a request every
    /// sessions / rate seconds; the reference guest serves 8 connections at once).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub sessions: u32,
    /// The reboot modes to measure, in this order (comma-separated: warm, saved, cold).
    #[arg(long, value_delimiter = ',', default_value = "warm,saved,cold")]
    pub modes: Vec<RebootMode>,
    /// wrk connections for the maximum-throughput run (the guest serves 8 at once).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub connections: u32,
    /// Files in the guest's archive, 64 KiB each.
    #[arg(long, default_value_t = 48, value_parser = clap::value_parser!(u32).range(1..=60))]
    pub files: u32,
    /// The guest's page cache in MiB.
    #[arg(long, default_value_t = 16)]
    pub cache_mib: u64,
}

#[derive(clap::Args, Debug)]
pub struct AgingArgs {
    /// Print one JSON document (the global `--json`).
    #[arg(skip)]
    pub json: bool,
    /// Seconds of live noise to record from a daemon under load.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub record_secs: u64,
    /// The monitor's period while recording, in ms.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(50..=10_000))]
    pub record_period_ms: u64,
    /// VMs (64 MiB reference guests) the recorded daemon runs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub vms: u32,
    /// Simulated days of non-aging operation, for the false-positive rate.
    #[arg(long, default_value_t = 60.0)]
    pub days: f64,
    /// Simulated days of each leak run.
    #[arg(long, default_value_t = 7.0)]
    pub leak_days: f64,
    /// The simulated monitor's period, in seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub sim_period_secs: u64,
    /// The simulated memory budget (MiB) and fd limit the leaks run against.
    #[arg(long, default_value_t = 1024)]
    pub budget_mib: u64,
    #[arg(long, default_value_t = 1024)]
    pub fd_limit: u64,
    /// Simulated heap leak rates, MiB per hour.
    #[arg(long, value_delimiter = ',', default_value = "8,32,128,512")]
    pub heap_mib_per_hour: Vec<f64>,
    /// Simulated fd leak rates, per hour.
    #[arg(long, value_delimiter = ',', default_value = "5,20,100")]
    pub fds_per_hour: Vec<f64>,
    /// Live heap leak rates, MiB per second (a fault-injection build; empty for none).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub live_heap_mib_per_sec: Vec<f64>,
    /// Skip the live leaks.
    #[arg(long)]
    pub no_live: bool,
    /// Time-based schedules to compare with, in hours.
    #[arg(long, value_delimiter = ',', default_value = "6,24,168")]
    pub schedule_hours: Vec<f64>,
    /// Directory for the plots (SVG and PNG).
    #[arg(long, default_value = "bench-aging")]
    pub out: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// Print one JSON document (the global `--json`).
    #[arg(skip)]
    pub json: bool,
    /// Warm reboots, back to back.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub reboots: u64,
    /// Reboots per reported window (the resources and the blackout percentiles).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub window: u64,
    /// VMs in all: one serves HTTP, the others are reference guests verifying their memory.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=64))]
    pub vms: u32,
    /// RAM of each reference guest in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(16..=65536))]
    pub memory_mib: u64,
    /// vCPUs of each reference guest.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub vcpus: u32,
    /// The HTTP guest's fixed request rate (httperf), requests per second.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rate: u32,
    /// Write the plots (SVG and PNG) into this directory.
    #[arg(long)]
    pub plot_dir: Option<PathBuf>,
}
