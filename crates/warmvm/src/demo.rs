//! `warmvm demo`: reference-guest VMs verify their memory, the VMM warm-reboots itself
//! halfway, and the new VMM checks that every guest went on with nothing lost.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use warmvm_cli_common::stats::{p50_p99_max, percentile, P99_MIN_SAMPLES};
use warmvm_vmm::handover::{self, RebootOptions, RebootReport};
use warmvm_vmm::{Config, Host, Lifecycle, VmConfig, VmReport};

use crate::failure::{self, Failure, EXIT_BAD_INPUT, EXIT_VM_FAILED};
use crate::output;

/// `warmvm demo`'s arguments.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Print the results as one JSON document (the global `--json`).
    #[arg(skip)]
    pub json: bool,
    /// Number of VMs.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub vms: u32,
    /// RAM of each VM, in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// vCPUs of each VM.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Let the workloads run at least this long, in seconds.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Directory for console logs [default: demo-<pid> in /run/warmvm as root,
    /// $XDG_RUNTIME_DIR/warmvm or /tmp/warmvm-<uid> otherwise, removed at the end].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Skip the warm reboot halfway through.
    #[arg(long)]
    pub no_reboot: bool,
    /// Compare the guests' longest stall in a window of this many ms across each reboot
    /// with one just before it (0: don't measure).
    #[arg(long, default_value_t = 500)]
    pub gap_window_ms: u64,
    /// Warm-reboot into this (other) warmvm binary: a live upgrade.
    #[arg(long)]
    pub upgrade_to: Option<PathBuf>,
    /// Command line of the reference guests (see README: fill, interval_ms, ...).
    #[arg(long, default_value = "quiet interval_ms=20")]
    pub guest_cmdline: String,
    /// Warm reboots to chain, one after another (each new VMM reboots into the next).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub reboots: u32,
    /// Pause between chained reboots, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub reboot_interval_ms: u64,
    /// How long a new VMM may take to start and prepare every VM (the guests run meanwhile).
    #[arg(long, default_value_t = 30)]
    pub reboot_timeout_secs: u64,
    /// How long the guests may be frozen before the new VMM is ready; past it the reboot
    /// is aborted and the VMs run on in the old VMM.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub ready_budget_ms: u64,
    /// (internal) Continue a demo handed over by the previous VMM on this fd.
    #[arg(long, hide = true)]
    pub takeover_fd: Option<i32>,
    /// (tests) Carry this many KiB of filler from VMM to VMM along the chain, as a long
    /// chain's growing results would be; every VMM checks it arrived whole.
    #[arg(long, hide = true, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=65_536))]
    pub carry_filler_kib: u64,
}

/// The longest the demo waits for every guest to complete a full verification pass.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(180);

/// What the first VMM tells the second about the demo so far.
#[derive(Clone, Serialize, Deserialize, Default)]
struct DemoCarry {
    /// Each VM's integrity counter just before the reboot: it must never go back.
    counters: BTreeMap<String, u64>,
    passes: BTreeMap<String, u64>,
    elapsed_ms: u64,
    /// Longest stall any guest saw in the window just before the reboot that carried this.
    pending_baseline_gap_ns: Option<u64>,
    /// (without, with) a reboot: the longest guest stall in equal windows, per reboot.
    gaps: Vec<(u64, u64)>,
    /// Reboots still to do after the one that carried this.
    reboots_left: u32,
    /// Every completed reboot's report, oldest first.
    reports: Vec<RebootReport>,
    /// `--carry-filler-kib`'s filler (tests).
    #[serde(default)]
    filler: String,
    /// The executable of the VMM that handed this over (its report, made by the new VMM,
    /// cannot know it). Absent from older builds.
    #[serde(default)]
    from_binary: Option<warmvm_vmm::executable::BinaryInfo>,
}

/// `--carry-filler-kib`'s filler: `kib` KiB that no encoding shortens much.
fn filler(kib: u64) -> String {
    (0..kib * 1024)
        .map(|i| char::from(b'a' + ((i * 7 + i / 13) % 26) as u8))
        .collect()
}

/// Blackout statistics over a chain of reboots, in ms.
#[derive(Serialize, Default)]
pub struct ChainSummary {
    pub reboots: usize,
    /// Reboots that moved the VMs but whose report says a step's outcome is not known
    /// (`errors`): left out of every figure below.
    pub unmeasured: usize,
    pub host_p50_ms: f64,
    /// `None` below 100 samples, where a "p99" would only be the maximum.
    pub host_p99_ms: Option<f64>,
    pub host_max_ms: f64,
    pub vm_p50_ms: f64,
    pub vm_p99_ms: Option<f64>,
    pub vm_max_ms: f64,
    /// Median time of each phase, in ms.
    pub phase_p50_ms: BTreeMap<String, f64>,
}

/// An optional figure for a text line: `-` when there is none.
pub(crate) fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"))
}

fn summarize(all: &[RebootReport]) -> ChainSummary {
    let reports: Vec<&RebootReport> = all.iter().filter(|r| r.is_measured()).collect();
    let (host_p50_ms, host_p99_ms, host_max_ms) =
        p50_p99_max(reports.iter().map(|r| r.host_blackout_us).collect());
    let (vm_p50_ms, vm_p99_ms, vm_max_ms) = p50_p99_max(
        reports
            .iter()
            .flat_map(|r| r.vms.iter().map(|v| v.blackout_us))
            .collect(),
    );
    let phase = |f: fn(&handover::PhaseTimes) -> u64| {
        let mut v: Vec<u64> = reports.iter().map(|r| f(&r.phases)).collect();
        v.sort_unstable();
        percentile(&v, 0.5)
    };
    let phase_p50_ms = [
        ("stage", phase(|p| p.stage_us)),
        ("quiesce", phase(|p| p.quiesce_us)),
        ("capture", phase(|p| p.capture_us)),
        ("transfer", phase(|p| p.transfer_us)),
        ("restore", phase(|p| p.restore_us)),
        ("commit", phase(|p| p.commit_us)),
        ("resume", phase(|p| p.resume_us)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    ChainSummary {
        phase_p50_ms,
        reboots: all.len(),
        unmeasured: all.len() - reports.len(),
        host_p50_ms,
        host_p99_ms,
        host_max_ms,
        vm_p50_ms,
        vm_p99_ms,
        vm_max_ms,
    }
}

/// The longest stall a guest saw in equal windows with and without a warm reboot, over
/// all reboots (the windows without one show this host's scheduling noise).
#[derive(Serialize)]
struct GuestGaps {
    window_ms: u64,
    windows: usize,
    without_reboot_p50_ms: f64,
    without_reboot_p99_ms: Option<f64>,
    without_reboot_max_ms: f64,
    with_reboot_p50_ms: f64,
    with_reboot_p99_ms: Option<f64>,
    with_reboot_max_ms: f64,
}

fn summarize_gaps(window_ms: u64, gaps: &[(u64, u64)]) -> Option<GuestGaps> {
    if gaps.is_empty() || window_ms == 0 {
        return None;
    }
    let (without_reboot_p50_ms, without_reboot_p99_ms, without_reboot_max_ms) =
        p50_p99_max(gaps.iter().map(|g| g.0 / 1000).collect());
    let (with_reboot_p50_ms, with_reboot_p99_ms, with_reboot_max_ms) =
        p50_p99_max(gaps.iter().map(|g| g.1 / 1000).collect());
    Some(GuestGaps {
        window_ms,
        windows: gaps.len(),
        without_reboot_p50_ms,
        without_reboot_p99_ms,
        without_reboot_max_ms,
        with_reboot_p50_ms,
        with_reboot_p99_ms,
        with_reboot_max_ms,
    })
}

/// Measure the guests' longest stall over a window without a reboot, then restart the
/// measurement for the reboot that follows.
fn baseline_gap(host: &Host, window_ms: u64) -> Option<u64> {
    if window_ms == 0 {
        return None;
    }
    reset_gaps(host);
    let baseline = max_gap_after_window(host, window_ms);
    reset_gaps(host);
    Some(baseline)
}

fn max_gap_after_window(host: &Host, window_ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(window_ms));
    host.vms()
        .iter()
        .filter_map(|vm| vm.guest_figures().map(|g| g.max_gap_ns))
        .max()
        .unwrap_or(0)
}

fn reset_gaps(host: &Host) {
    for vm in host.vms() {
        vm.reset_guest_gaps();
    }
    // The guests pick the reset up at their next tick (every 64 pages).
    std::thread::sleep(Duration::from_millis(5));
}

#[derive(Serialize)]
struct DemoResult<'a> {
    ok: bool,
    seconds: f64,
    warm_reboot: Option<&'a RebootReport>,
    reboot_chain: Option<ChainSummary>,
    guest_visible_gap: Option<GuestGaps>,
    warm_reboot_error: Option<String>,
    vms: &'a [VmReport],
}

pub fn demo(args: &DemoArgs) -> Result<ExitCode, Failure> {
    // Each reboot's report names the executables on both sides, with their sha256.
    warmvm_vmm::executable::hash_in_background();
    if let Some(fd) = args.takeover_fd {
        // A later VMM of the demo: the first one chose the directory, and removes it.
        let Some(state_dir) = args.state_dir.clone() else {
            return Err(Failure::new(
                EXIT_BAD_INPUT,
                "--takeover-fd needs --state-dir",
            ));
        };
        let stop = crate::run::termination_flag()?;
        return continue_after_reboot(args, fd, state_dir, &stop);
    }
    match &args.state_dir {
        Some(dir) => first_vmm(args, dir.clone()),
        None => {
            // Console logs only (the RAM is in memfds): the runtime directory, with a
            // directory of this run's own that goes when the demo ends, however it ends
            // (Ctrl-C ends it through the termination flag, as a normal finish).
            let runtime = warmvm_vmm::config::default_runtime_dir();
            let runtime_existed = runtime.exists();
            let dir = runtime.join(format!("demo-{}", std::process::id()));
            let result = first_vmm(args, dir.clone());
            remove_demo_dirs(&dir, (!runtime_existed).then_some(runtime.as_path()));
            result
        }
    }
}

/// Remove the demo's own directory, and its parent if the demo created it and it is empty
/// (another daemon's or demo's files there stay).
fn remove_demo_dirs(dir: &std::path::Path, created_parent: Option<&std::path::Path>) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("warmvm demo: cannot remove {}: {e}", dir.display());
        }
    }
    if let Some(parent) = created_parent {
        let _ = std::fs::remove_dir(parent);
    }
}

/// The demo's first VMM: boots the VMs, warm-reboots into the next VMM halfway (then waits
/// for the last one's verdict), or finishes itself.
fn first_vmm(args: &DemoArgs, state_dir: PathBuf) -> Result<ExitCode, Failure> {
    let stop = crate::run::termination_flag()?;
    let config = Config {
        state_dir: Some(state_dir.clone()),
        vms: (0..args.vms)
            .map(|i| {
                let mut vm = VmConfig::reference(&format!("demo-{i}"), args.memory_mib, args.vcpus);
                vm.cmdline = Some(args.guest_cmdline.clone());
                vm
            })
            .collect(),
        aging: None,
        privileges: None,
        fleet: None,
    };
    config
        .validate(warmvm_vmm::HostLimits::probe())
        .map_err(failure::config)?;
    let started = Instant::now();
    let mut host = Host::open(&config.state_dir()).map_err(failure::host)?;
    host.create_all(&config).map_err(failure::host)?;
    host.start_all().map_err(failure::host)?;
    if !args.json {
        eprintln!(
            "warmvm demo: {} VMs of {} MiB with {} vCPU each; verifying their memory for at least {} s{}",
            args.vms,
            args.memory_mib,
            args.vcpus,
            args.seconds,
            if args.no_reboot {
                String::new()
            } else {
                format!(", with {} of the VMM from halfway", warm_reboots(args.reboots.max(1) as usize))
            }
        );
    }
    let half = if args.no_reboot {
        args.seconds
    } else {
        args.seconds.div_ceil(2)
    };
    wait_verified(&host, Duration::from_secs(half), &stop, &BTreeMap::new());

    let mut reboot_error = None;
    if !args.no_reboot && !stop.load(Ordering::Relaxed) && all_healthy(&host) {
        let pending_baseline_gap_ns = baseline_gap(&host, args.gap_window_ms);
        let carry = DemoCarry {
            counters: figures(&host, |g| g.counter),
            passes: figures(&host, |g| g.min_passes),
            elapsed_ms: started.elapsed().as_millis() as u64,
            pending_baseline_gap_ns,
            gaps: Vec::new(),
            reboots_left: args.reboots.saturating_sub(1),
            reports: Vec::new(),
            filler: filler(args.carry_filler_kib),
            from_binary: None,
        };
        // Every later VMM hands over and exits; as subreaper this process inherits and
        // reaps them all, and the last one's verdict is the demo's.
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes how orphans are reparented.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        match reboot(args, &host, &carry, &state_dir, args.upgrade_to.as_deref()) {
            Ok(child) => {
                // The new VMM runs the guests and finishes the demo; this one lets go of
                // its side of the VMs (unmapping their RAM) and waits for the verdict.
                drop(host);
                drop(child);
                return Ok(ExitCode::from(reap_all()));
            }
            Err(e) => {
                if !args.json {
                    eprintln!(
                        "warmvm demo: warm reboot failed, VMs continue in this VMM: {}",
                        e.message
                    );
                }
                reboot_error = Some(e.message);
                wait_verified(&host, Duration::from_secs(half), &stop, &carry.passes);
            }
        }
    }
    finish(args, &host, started.elapsed(), None, reboot_error)
}

fn reboot(
    args: &DemoArgs,
    host: &Host,
    carry: &DemoCarry,
    state_dir: &std::path::Path,
    binary: Option<&std::path::Path>,
) -> Result<Option<std::process::Child>, Failure> {
    let binary = match binary {
        Some(b) => b.to_path_buf(),
        None => handover::this_binary(),
    };
    let mut new_args: Vec<std::ffi::OsString> = vec![
        "demo".into(),
        "--seconds".into(),
        args.seconds.to_string().into(),
        "--state-dir".into(),
        state_dir.into(),
    ];
    if args.json {
        new_args.push("--json".into());
    }
    new_args.extend([
        "--reboot-interval-ms".into(),
        args.reboot_interval_ms.to_string().into(),
        "--reboot-timeout-secs".into(),
        args.reboot_timeout_secs.to_string().into(),
        "--ready-budget-ms".into(),
        args.ready_budget_ms.to_string().into(),
        "--vms".into(),
        args.vms.to_string().into(),
        "--gap-window-ms".into(),
        args.gap_window_ms.to_string().into(),
        "--carry-filler-kib".into(),
        args.carry_filler_kib.to_string().into(),
    ]);
    let opts = RebootOptions {
        binary,
        args: new_args,
        stage_timeout: Duration::from_secs(args.reboot_timeout_secs),
        ready_budget: Duration::from_millis(args.ready_budget_ms),
        extra: serde_json::to_value(DemoCarry {
            from_binary: Some(warmvm_vmm::executable::info()),
            ..carry.clone()
        })
        .unwrap_or_default(),
        extra_fds: Vec::new(),
        env: Vec::new(),
        before_blackout: None,
    };
    handover::warm_reboot(host, &opts)
        .map(|handed| handed.child)
        .map_err(|e| Failure::new(EXIT_VM_FAILED, e.to_string()))
}

fn continue_after_reboot(
    args: &DemoArgs,
    fd: i32,
    state_dir: PathBuf,
    stop: &AtomicBool,
) -> Result<ExitCode, Failure> {
    if fd < 3 {
        return Err(Failure::new(
            EXIT_BAD_INPUT,
            "--takeover-fd must be 3 or more",
        ));
    }
    // SAFETY: the previous VMM started us with this fd open for us alone (see
    // handover::outgoing); nothing else in this process uses it.
    let channel = unsafe { OwnedFd::from_raw_fd(fd) };
    let adopted = handover::take_over(channel, &state_dir)
        .map_err(|e| Failure::new(EXIT_VM_FAILED, format!("taking over the VMs failed: {e}")))?;
    let host = adopted.host;
    // Unreadable, the results so far are lost: a verdict without them would be no verdict
    // (counters that went back would go unseen).
    let mut carry: DemoCarry = match serde_json::from_value(adopted.extra) {
        Ok(carry) => carry,
        Err(e) => {
            let error = format!("the demo's results so far did not arrive readable: {e}");
            return finish(
                args,
                &host,
                Duration::ZERO,
                Some(&adopted.report),
                Some(error),
            );
        }
    };
    carry.reports.push(RebootReport {
        from_binary: carry.from_binary.take(),
        ..adopted.report.clone()
    });
    if carry.filler != filler(args.carry_filler_kib) {
        let error = format!(
            "the filler carried along the chain arrived as {} bytes, not {} KiB",
            carry.filler.len(),
            args.carry_filler_kib
        );
        let summary = summarize(&carry.reports);
        return finish_chain(args, &host, &carry, summary, None, Some(error));
    }
    if let Some(baseline) = carry.pending_baseline_gap_ns.take() {
        carry
            .gaps
            .push((baseline, max_gap_after_window(&host, args.gap_window_ms)));
    }
    if let Some(error) = counters_went_back(&host, &carry) {
        return finish(
            args,
            &host,
            Duration::from_millis(carry.elapsed_ms),
            None,
            Some(error),
        );
    }
    if carry.reboots_left > 0 && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(args.reboot_interval_ms));
        let pending_baseline_gap_ns = baseline_gap(&host, args.gap_window_ms);
        let elapsed_ms = carry.elapsed_ms + args.reboot_interval_ms + 2 * args.gap_window_ms;
        let next = DemoCarry {
            counters: figures(&host, |g| g.counter),
            passes: carry.passes.clone(),
            elapsed_ms,
            pending_baseline_gap_ns,
            gaps: std::mem::take(&mut carry.gaps),
            reboots_left: carry.reboots_left - 1,
            reports: std::mem::take(&mut carry.reports),
            filler: std::mem::take(&mut carry.filler),
            from_binary: None,
        };
        match reboot(args, &host, &next, &state_dir, None) {
            // Our part is done: the next VMM carries on and the first process reaps us.
            Ok(_child) => std::process::exit(0),
            Err(e) => {
                carry.reports = next.reports;
                carry.gaps = next.gaps;
                let error = format!(
                    "warm reboot {} failed: {}",
                    carry.reports.len() + 1,
                    e.message
                );
                wait_verified(&host, Duration::ZERO, stop, &carry.passes);
                let summary = summarize(&carry.reports);
                let gaps = summarize_gaps(args.gap_window_ms, &carry.gaps);
                return finish_chain(args, &host, &carry, summary, gaps, Some(error));
            }
        }
    }
    let gaps = summarize_gaps(args.gap_window_ms, &carry.gaps);
    let remaining =
        Duration::from_secs(args.seconds).saturating_sub(Duration::from_millis(carry.elapsed_ms));
    wait_verified(&host, remaining, stop, &carry.passes);
    let error = counters_went_back(&host, &carry);
    let summary = summarize(&carry.reports);
    finish_chain(args, &host, &carry, summary, gaps, error)
}

fn finish_chain(
    args: &DemoArgs,
    host: &Host,
    carry: &DemoCarry,
    summary: ChainSummary,
    gaps: Option<GuestGaps>,
    error: Option<String>,
) -> Result<ExitCode, Failure> {
    let last = carry.reports.last().cloned().unwrap_or_default();
    finish_with(
        args,
        host,
        Duration::from_millis(carry.elapsed_ms),
        Some(&last),
        (carry.reports.len() > 1).then_some(summary),
        gaps,
        error,
    )
}

/// Nothing may go back across a reboot: every counter at least what it was before.
///
/// A guest stopped in the middle of updating its figures (its sequence lock odd) cannot be
/// read until it has run again, so the figures are retried for a while before a missing
/// one counts as lost.
fn counters_went_back(host: &Host, carry: &DemoCarry) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = BTreeMap::new();
    while after.len() < host.vms().len() && Instant::now() < deadline {
        for vm in host.vms() {
            if let Some(g) = vm.guest_figures() {
                after.insert(vm.name().to_string(), g.counter);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let went_back: Vec<&String> = carry
        .counters
        .iter()
        .filter(|(name, before)| after.get(*name).is_none_or(|a| a < before))
        .map(|(name, _)| name)
        .collect();
    (!went_back.is_empty()).then(|| {
        format!("integrity counters went back or vanished across the reboot: {went_back:?}")
    })
}

/// Reap every descendant (this process is their subreaper); the worst exit status wins.
fn reap_all() -> u8 {
    let mut worst = 0u8;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into the integer it is given.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return worst;
        }
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status) as u8
        } else {
            EXIT_VM_FAILED
        };
        worst = worst.max(code);
    }
}

fn figures(
    host: &Host,
    f: impl Fn(&warmvm_vmm::status::GuestFigures) -> u64,
) -> BTreeMap<String, u64> {
    host.vms()
        .iter()
        .map(|vm| {
            (
                vm.name().to_string(),
                vm.guest_figures().map(|g| f(&g)).unwrap_or(0),
            )
        })
        .collect()
}

fn all_healthy(host: &Host) -> bool {
    host.vms()
        .iter()
        .all(|vm| vm.lifecycle() == Lifecycle::Running)
}

/// Wait at least `min_run`, and until every guest has completed a verification pass more
/// than `passes_before` records (or something ends a VM, or time runs out).
fn wait_verified(
    host: &Host,
    min_run: Duration,
    stop: &AtomicBool,
    passes_before: &BTreeMap<String, u64>,
) {
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let elapsed = started.elapsed();
        let all_verified = host.vms().iter().all(|vm| {
            vm.guest_figures().is_some_and(|g| {
                g.all_verified_clean()
                    && g.min_passes > passes_before.get(vm.name()).copied().unwrap_or(0)
            })
        });
        let any_ended = host.vms().iter().any(|vm| vm.lifecycle().is_finished());
        if (elapsed >= min_run && all_verified)
            || any_ended
            || elapsed >= VERIFY_TIMEOUT
            || stop.load(Ordering::Relaxed)
        {
            return;
        }
    }
}

/// "a warm reboot" or "N chained warm reboots".
fn warm_reboots(n: usize) -> String {
    if n == 1 {
        "a warm reboot".to_string()
    } else {
        format!("{n} chained warm reboots")
    }
}

fn finish(
    args: &DemoArgs,
    host: &Host,
    before: Duration,
    reboot: Option<&RebootReport>,
    error: Option<String>,
) -> Result<ExitCode, Failure> {
    finish_with(args, host, before, reboot, None, None, error)
}

fn finish_with(
    args: &DemoArgs,
    host: &Host,
    before: Duration,
    reboot: Option<&RebootReport>,
    chain: Option<ChainSummary>,
    gaps: Option<GuestGaps>,
    error: Option<String>,
) -> Result<ExitCode, Failure> {
    let started = Instant::now();
    host.stop_all(Duration::from_secs(10));
    let reports: Vec<VmReport> = host.vms().iter().map(|vm| vm.report()).collect();
    let verified = |r: &VmReport| {
        r.lifecycle == Lifecycle::PoweredOff { exit_status: 0 }
            && r.guest.as_ref().is_some_and(|g| g.all_verified_clean())
    };
    let ok = error.is_none() && reports.iter().all(verified);
    if args.json {
        output::print_json(&DemoResult {
            ok,
            seconds: (before + started.elapsed()).as_secs_f64(),
            warm_reboot: reboot,
            reboot_chain: chain,
            guest_visible_gap: gaps,
            warm_reboot_error: error.clone(),
            vms: &reports,
        });
    } else {
        output::print_vm_table(&reports);
        if let Some(r) = reboot {
            if let Some(c) = &chain {
                println!("the last of {}:", warm_reboots(c.reboots));
            }
            output::print_reboot_report(r);
        }
        if let Some(c) = &chain {
            println!(
                "  {} chained reboots: host blackout p50 {:.3} / p99 {} / max {:.3} ms; per VM p50 {:.3} / p99 {} / max {:.3} ms (p99 needs {P99_MIN_SAMPLES}+ samples)",
                c.reboots, c.host_p50_ms, opt_ms(c.host_p99_ms), c.host_max_ms, c.vm_p50_ms, opt_ms(c.vm_p99_ms), c.vm_max_ms
            );
            if c.unmeasured > 0 {
                println!(
                    "  {} of them not measured (left out of the figures)",
                    c.unmeasured
                );
            }
        }
        if let Some(g) = &gaps {
            println!(
                "  longest stall a guest saw in {} ms windows ({}): across a reboot p50 {:.3} / max {:.3} ms; without one p50 {:.3} / max {:.3} ms",
                g.window_ms,
                g.windows,
                g.with_reboot_p50_ms,
                g.with_reboot_max_ms,
                g.without_reboot_p50_ms,
                g.without_reboot_max_ms
            );
        }
        if let Some(e) = &error {
            println!("warm reboot: FAILED: {e}");
        }
        println!(
            "{}: {} of {} VMs verified all their memory with no mismatch{}",
            if ok { "PASS" } else { "FAIL" },
            reports.iter().filter(|r| verified(r)).count(),
            reports.len(),
            if reboot.is_some() {
                format!(
                    ", across {} of the VMM",
                    warm_reboots(chain.as_ref().map_or(1, |c| c.reboots))
                )
            } else {
                String::new()
            }
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VM_FAILED)
    })
}

#[cfg(test)]
mod tests {
    use super::warm_reboots;

    #[test]
    fn the_wording_counts_the_reboots() {
        assert_eq!(warm_reboots(1), "a warm reboot");
        assert_eq!(warm_reboots(5), "5 chained warm reboots");
    }
}
