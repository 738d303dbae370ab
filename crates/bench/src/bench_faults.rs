//! `warmvm bench faults`: randomised fault-injection trials of the daemon's warm reboot.
//!
//! Each trial starts a fresh `warmvm daemon` (its own state directory and socket) with
//! `WARMVM_FAULT` naming one (side, point, action), creates reference-guest VMs that rewrite
//! their memory without pause, warm-reboots the daemon through its API, waits until the
//! reboot has settled, and then finds out who runs the VMs and whether they are intact:
//!
//! - `running-in-old` / `running-in-new`: one daemon serves the socket and runs every VM,
//!   whose guest verifies pages (the counter advances) with no mismatch and no register
//!   check failure;
//! - `lost (owner killed)`: the VMs are gone, and the fault killed the process that owned
//!   them at that point of the protocol (the old VMM before it sent the state, the new one
//!   after it received `Commit`);
//! - failures: `lost (owner alive)` (gone, or not running, although their owner was not
//!   killed), `corrupted` (a mismatch, a register check failure, a crashed guest),
//!   `both alive` (two daemons of the trial still running once the reboot settled),
//!   `stray process` (one is left that does not serve the socket: it should have exited),
//!   and `setup failed` (the trial could not start its daemon or VMs).
//!
//! The faults are spread evenly: every (point, action kind) pair of both sides comes up
//! once per round of 72 trials (kill, stop, delay and panic at each of 18 points), in an
//! order and with durations drawn from `--seed`.
//! Both binaries, warmvm-bench and the warmvm it runs, must be built with the
//! `fault-injection` feature (as the tests build them).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use warmvm_api::Client;
use warmvm_cli_common::bench_args::FaultsArgs;
use warmvm_testkit::{Judgement, VmFigures};
use warmvm_vmm::handover::faults::{self, Action, Fault, Point};

use crate::cli::{Failure, EXIT_BAD_INPUT, EXIT_VM_FAILED};

/// How a trial ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    RunningInOld,
    RunningInNew,
    LostOwnerKilled,
    LostOwnerAlive,
    Corrupted,
    BothAlive,
    Stray,
    SetupFailed,
}

impl Outcome {
    const ALL: [Outcome; 8] = [
        Outcome::RunningInOld,
        Outcome::RunningInNew,
        Outcome::LostOwnerKilled,
        Outcome::LostOwnerAlive,
        Outcome::Corrupted,
        Outcome::BothAlive,
        Outcome::Stray,
        Outcome::SetupFailed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::RunningInOld => "running-in-old",
            Outcome::RunningInNew => "running-in-new",
            Outcome::LostOwnerKilled => "lost (owner killed)",
            Outcome::LostOwnerAlive => "lost (owner alive)",
            Outcome::Corrupted => "corrupted",
            Outcome::BothAlive => "both alive",
            Outcome::Stray => "stray process",
            Outcome::SetupFailed => "setup failed",
        }
    }

    pub fn is_failure(self) -> bool {
        !matches!(
            self,
            Outcome::RunningInOld | Outcome::RunningInNew | Outcome::LostOwnerKilled
        )
    }
}

impl Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.label())
    }
}

/// Whether killing the VMM at `point` may lose the VMs: the killed process owned them
/// there (the old VMM until it has sent the state; the new one once it has claimed them).
pub fn kill_may_lose(point: Point) -> bool {
    use Point::*;
    matches!(
        point,
        OldSpawned | OldStaged | OldPrepared | OldQuiesced | OldCaptured | NewRunning | NewReported
    )
}

#[derive(Serialize)]
struct Trial {
    index: u32,
    fault: String,
    side: &'static str,
    point: &'static str,
    action: &'static str,
    ms: Option<u64>,
    outcome: Outcome,
    failure: bool,
    /// Whether the daemons logged that the fault point was reached and acted on.
    fired: bool,
    /// The reboot request's answer: `200`, `409: ...`, or the connection error.
    reboot: String,
    old_pid: u32,
    /// The pid that serves the socket once the reboot settled, if any.
    serving_pid: Option<u32>,
    detail: String,
    trial_ms: u64,
    /// Each VM as the daemon that serves after the reboot reports it (none if none does).
    vms: Vec<VmOutcome>,
}

/// One VM at the end of a trial.
#[derive(Serialize)]
struct VmOutcome {
    name: String,
    state: String,
    /// Pages each vCPU has verified.
    verified: Vec<u64>,
    mismatches: u64,
    register_check_failures: u64,
}

/// What the table needs of a trial, from a campaign just run or one read from its JSON.
struct Row {
    index: u64,
    fault: String,
    side: String,
    point: String,
    action: String,
    outcome: Outcome,
    failure: bool,
    fired: bool,
    detail: String,
}

impl From<&Trial> for Row {
    fn from(t: &Trial) -> Self {
        Row {
            index: u64::from(t.index),
            fault: t.fault.clone(),
            side: t.side.to_string(),
            point: t.point.to_string(),
            action: t.action.to_string(),
            outcome: t.outcome,
            failure: t.failure,
            fired: t.fired,
            detail: t.detail.clone(),
        }
    }
}

/// The rows of a campaign's JSON document (as `--json` printed it), and its seed.
fn rows_of(doc: &Value) -> Result<(Vec<Row>, u64), String> {
    let trials = doc["trials"].as_array().ok_or("no \"trials\" array")?;
    let text = |t: &Value, k: &str| -> Result<String, String> {
        t[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("trial {}: no \"{k}\"", t["index"]))
    };
    let rows = trials
        .iter()
        .map(|t| {
            let label = text(t, "outcome")?;
            let outcome = Outcome::ALL
                .into_iter()
                .find(|o| o.label() == label)
                .ok_or_else(|| format!("trial {}: unknown outcome {label:?}", t["index"]))?;
            Ok(Row {
                index: t["index"].as_u64().unwrap_or(0),
                fault: text(t, "fault")?,
                side: text(t, "side")?,
                point: text(t, "point")?,
                action: text(t, "action")?,
                outcome,
                failure: t["failure"].as_bool().ok_or("no \"failure\"")?,
                fired: t["fired"].as_bool().ok_or("no \"fired\"")?,
                detail: text(t, "detail")?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((rows, doc["seed"].as_u64().unwrap_or(0)))
}

pub fn faults(args: &FaultsArgs) -> Result<ExitCode, Failure> {
    if let Some(file) = &args.table_from {
        let bad = |e: String| Failure::new(EXIT_BAD_INPUT, format!("{}: {e}", file.display()));
        let text = std::fs::read_to_string(file).map_err(|e| bad(e.to_string()))?;
        let doc: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let (rows, seed) = rows_of(&doc).map_err(bad)?;
        print_table(&rows, seed);
        return Ok(ExitCode::SUCCESS);
    }
    if !faults::ENABLED {
        return Err(Failure::new(
            EXIT_BAD_INPUT,
            "this warmvm-bench was built without fault injection: build it and warmvm with \
             `cargo build -p warmvm -p warmvm-bench --features fault-injection`",
        ));
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let plan = if args.faults.is_empty() {
        random_plan(args.trials, seed, args.ready_budget_ms.unwrap_or(500))
    } else {
        let (plan, errors) = faults::parse(&args.faults.join(","));
        if let Some(e) = errors.first() {
            return Err(Failure::new(EXIT_BAD_INPUT, format!("--fault {e}")));
        }
        plan
    };
    let exe = crate::cli::warmvm_exe()?;
    eprintln!(
        "warmvm bench faults: {} trials, seed {seed}, {} VMs x {} MiB x {} vCPUs",
        plan.len(),
        args.vms,
        args.memory_mib,
        args.vcpus
    );
    let mut trials = Vec::new();
    for (i, fault) in plan.iter().enumerate() {
        let t = run_trial(&exe, args, i as u32 + 1, *fault);
        eprintln!(
            "trial {}/{} {:<28} {:<20} {:>6} ms{}",
            t.index,
            plan.len(),
            t.fault,
            t.outcome.label(),
            t.trial_ms,
            if t.failure {
                format!("  FAILURE: {}", t.detail)
            } else {
                String::new()
            }
        );
        trials.push(t);
    }
    let mut totals: BTreeMap<&str, u32> = BTreeMap::new();
    for t in &trials {
        *totals.entry(t.outcome.label()).or_default() += 1;
    }
    let failures = trials.iter().filter(|t| t.failure).count();
    if args.json {
        warmvm_cli_common::output::print_json(&json!({
            "ok": failures == 0,
            "seed": seed,
            "vms": args.vms,
            "memory_mib": args.memory_mib,
            "vcpus": args.vcpus,
            "guest_cmdline": args.guest_cmdline,
            "failures": failures,
            "totals": totals,
            "trials": trials,
        }));
    } else {
        print_table(&trials.iter().map(Row::from).collect::<Vec<_>>(), seed);
    }
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VM_FAILED)
    })
}

/// A small xorshift64* generator: reproducible from `--seed`, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in lo..=hi.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi.saturating_sub(lo) + 1)
    }
}

/// `trials` faults: rounds of every (point, action kind) pair of both sides, each round
/// shuffled (kinds: kill, stop, delay, panic). Stops last 50-1500 ms; delays are drawn half below and half above the ready
/// budget, so that both sides of the old VMM's deadline are tried.
fn random_plan(trials: u32, seed: u64, budget_ms: u64) -> Vec<Fault> {
    let mut rng = Rng::new(seed);
    let mut plan = Vec::new();
    let mut round: Vec<(Point, u8)> = Vec::new();
    while plan.len() < trials as usize {
        if round.is_empty() {
            round = Point::HANDOVER
                .iter()
                .flat_map(|&p| (0..4u8).map(move |k| (p, k)))
                .collect();
            for i in (1..round.len()).rev() {
                let j = rng.range(0, i as u64) as usize;
                round.swap(i, j);
            }
        }
        let Some((point, kind)) = round.pop() else {
            break;
        };
        let action = match kind {
            0 => Action::Kill,
            1 => Action::Stop(rng.range(50, 1500)),
            // A bug on the handover thread itself: it must end in the protocol's failure
            // path, like a refusal, never with the guests held.
            3 => Action::Panic,
            _ if rng.next() & 1 == 0 => Action::Delay(rng.range(20, budget_ms * 4 / 5)),
            _ => Action::Delay(rng.range(budget_ms * 6 / 5, (budget_ms * 3).max(1500))),
        };
        plan.push(Fault { point, action });
    }
    plan
}

fn action_kind(a: Action) -> (&'static str, Option<u64>) {
    match a {
        Action::Kill => ("kill", None),
        Action::Stop(ms) => ("stop", Some(ms)),
        Action::Delay(ms) => ("delay", Some(ms)),
        Action::Panic => ("panic", None),
        Action::Fail => ("fail", None),
    }
}

fn run_trial(exe: &Path, args: &FaultsArgs, index: u32, fault: Fault) -> Trial {
    let started = Instant::now();
    let (action, ms) = action_kind(fault.action);
    let dir = std::env::temp_dir().join(format!("wvf-{}-{index}", std::process::id()));
    let mut trial = Trial {
        index,
        fault: fault.to_string(),
        side: fault.point.side().name(),
        point: fault.point.name(),
        action,
        ms,
        outcome: Outcome::SetupFailed,
        failure: true,
        fired: false,
        reboot: String::new(),
        old_pid: 0,
        serving_pid: None,
        detail: String::new(),
        trial_ms: 0,
        vms: Vec::new(),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let socket = dir.join("api.sock");
    let child = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::File::create(dir.join("daemon.log")))
        .and_then(|log| {
            Command::new(exe)
                .args(["--log-level", "info", "daemon", "--socket"])
                .arg(&socket)
                .arg("--state-dir")
                .arg(dir.join("state"))
                .args(["--stop-grace-secs", "1"])
                .env("WARMVM_FAULT", fault.to_string())
                .env_remove("NOTIFY_SOCKET")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
        });
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            trial.detail = format!("cannot start the daemon: {e}");
            return trial;
        }
    };
    trial.old_pid = child.id();
    let client = Client::new(&socket).with_timeout(Duration::from_secs(10));
    match set_up(&client, &mut child, args) {
        Ok(()) => {
            let settle_ms = ms.unwrap_or(0) + 15_000;
            let (outcome, reboot, serving, detail) =
                reboot_and_judge(&client, &mut child, &socket, args, fault, settle_ms);
            trial.outcome = outcome;
            trial.failure = outcome.is_failure();
            trial.reboot = reboot;
            trial.serving_pid = serving;
            trial.detail = detail;
            if serving.is_some() {
                trial.vms = sample(&client)
                    .map(|vms| {
                        vms.into_iter()
                            .map(|(name, f)| VmOutcome {
                                name,
                                state: f.state,
                                verified: f.verified,
                                mismatches: f.mismatches,
                                register_check_failures: f.register_check_failures,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
            }
        }
        Err(e) => trial.detail = e,
    }
    let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
    trial.fired = log.contains("fault injected");
    if let Some(stray) = kill_all(&mut child, &socket) {
        trial.failure = true;
        trial.detail = format!("{} {stray}", trial.detail);
    }
    if !trial.failure {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        trial.detail = format!(
            "{} (log: {})",
            trial.detail,
            dir.join("daemon.log").display()
        );
    }
    trial.trial_ms = started.elapsed().as_millis() as u64;
    trial
}

fn vm_names(args: &FaultsArgs) -> Vec<String> {
    (0..args.vms).map(|i| format!("vm{i}")).collect()
}

/// Wait for the daemon, create the VMs, and let every guest verify some memory.
fn set_up(client: &Client, child: &mut Child, args: &FaultsArgs) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.status().is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the daemon exited at start-up ({status})"));
        }
        if Instant::now() > deadline {
            return Err("the daemon did not answer within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for name in vm_names(args) {
        let body = json!({
            "name": name,
            "memory_mib": args.memory_mib,
            "vcpus": args.vcpus,
            "cmdline": args.guest_cmdline,
        });
        client
            .call("POST", "/v1/vms", Some(body.to_string().as_bytes()))
            .map_err(|e| format!("cannot create {name}: {e}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Setup only: one failed poll is retried. On this shared 2-core host under a load
        // of 16, one GET in a campaign once came back "connection reset" before any fault
        // was injected; a setup hiccup is not what the campaign measures.
        let figures = match sample(client) {
            Ok(f) => f,
            Err(first) => {
                std::thread::sleep(Duration::from_millis(50));
                sample(client).map_err(|again| format!("{first}; again: {again}"))?
            }
        };
        if figures.len() == args.vms as usize
            && figures.values().all(|f| {
                f.verified.len() == args.vcpus as usize && f.verified.iter().all(|&v| v > 0)
            })
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("the guests did not start verifying: {figures:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(args.run_ms));
    Ok(())
}

fn reboot_body(args: &FaultsArgs) -> Value {
    let mut body = json!({ "mode": "warm" });
    if let Some(ms) = args.stage_timeout_ms {
        body["stage_timeout_ms"] = ms.into();
    }
    if let Some(ms) = args.ready_budget_ms {
        body["ready_budget_ms"] = ms.into();
    }
    body
}

/// Reboot, wait until one daemon (or none) of the trial is left, and judge the VMs.
fn reboot_and_judge(
    client: &Client,
    child: &mut Child,
    socket: &Path,
    args: &FaultsArgs,
    fault: Fault,
    settle_ms: u64,
) -> (Outcome, String, Option<u32>, String) {
    let body = reboot_body(args).to_string();
    let reboot = match client.clone().with_timeout(Duration::from_secs(150)).raw(
        "PUT",
        "/v1/reboot",
        Some(body.as_bytes()),
    ) {
        Ok(r) if r.status == 200 => "200".to_string(),
        Ok(r) => format!("{}: {}", r.status, String::from_utf8_lossy(&r.body).trim()),
        Err(e) => format!("no answer: {e}"),
    };
    // Settled: no daemon of the trial is left, or one, and it serves the socket (the old
    // one exits after a successful handover, the new one is killed after a failed one; a
    // new one that adopts the VMs may take a moment before it serves).
    let old_pid = child.id();
    let deadline = Instant::now() + Duration::from_millis(settle_ms);
    let mut alive;
    let mut serving;
    loop {
        let _ = child.try_wait();
        alive = trial_processes(socket);
        serving = match alive.len() {
            1 => client.typed().status().ok().map(|s| s.pid),
            _ => None,
        };
        let settled = alive.is_empty() || (serving.is_some() && serving == alive.first().copied());
        if settled || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive.len() > 1 {
        return (
            Outcome::BothAlive,
            reboot,
            serving,
            format!("daemons {alive:?} still alive {settle_ms} ms after the reboot"),
        );
    }
    let lost = |why: String| {
        let killed = fault.action == Action::Kill && kill_may_lose(fault.point);
        let outcome = if killed {
            Outcome::LostOwnerKilled
        } else {
            Outcome::LostOwnerAlive
        };
        (outcome, why)
    };
    let (outcome, detail) = match serving {
        None if !alive.is_empty() => (
            Outcome::Stray,
            format!("daemon {alive:?} is alive but does not serve the socket"),
        ),
        None => lost("no daemon is left".to_string()),
        Some(pid) => match warmvm_testkit::judge(client, &vm_names(args)) {
            Ok(()) if pid == old_pid => (Outcome::RunningInOld, String::new()),
            Ok(()) => (Outcome::RunningInNew, String::new()),
            Err(Judgement::Corrupted(why)) => (Outcome::Corrupted, why),
            Err(Judgement::Lost(why)) => lost(why),
        },
    };
    (outcome, reboot, serving, detail)
}

/// Every VM's state and guest figures, from `GET /v1/vms`.
fn sample(client: &Client) -> Result<BTreeMap<String, VmFigures>, String> {
    warmvm_testkit::sample(client).map_err(|e| format!("cannot list the VMs: {e}"))
}

/// Live (not zombie) processes of this trial: any whose arguments name its socket.
fn trial_processes(socket: &Path) -> Vec<u32> {
    let Some(want) = socket.to_str() else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if !cmdline.split(|&b| b == 0).any(|a| a == want.as_bytes()) {
            continue;
        }
        let live = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
        });
        if live {
            pids.push(pid);
        }
    }
    pids
}

/// SIGKILL every process of the trial and wait until they are gone; name any that is not.
fn kill_all(child: &mut Child, socket: &Path) -> Option<String> {
    let _ = child.kill();
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = trial_processes(socket);
        if left.is_empty() {
            return None;
        }
        if Instant::now() > deadline {
            return Some(format!("processes {left:?} survived SIGKILL"));
        }
        for pid in left {
            // SAFETY: kill has no memory effects; the pid is a process of this trial
            // (its arguments name the trial's own socket).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn print_table(trials: &[Row], seed: u64) {
    let mut rows: BTreeMap<(usize, &str), BTreeMap<Outcome, u32>> = BTreeMap::new();
    let mut fired: BTreeMap<(usize, &str), u32> = BTreeMap::new();
    for t in trials {
        let order = Point::HANDOVER
            .iter()
            .position(|p| p.side().name() == t.side && p.name() == t.point)
            .unwrap_or(usize::MAX);
        *fired.entry((order, t.action.as_str())).or_default() += u32::from(t.fired);
        *rows
            .entry((order, t.action.as_str()))
            .or_default()
            .entry(t.outcome)
            .or_default() += 1;
    }
    let short = [
        "old",
        "new",
        "lost-kld",
        "lost-alive",
        "corrupt",
        "both",
        "stray",
        "setup",
    ];
    print!(
        "{:<4} {:<11} {:<6} {:>6} {:>6}",
        "side", "point", "action", "trials", "fired"
    );
    for s in short {
        print!(" {s:>10}");
    }
    println!();
    let mut totals: BTreeMap<Outcome, u32> = BTreeMap::new();
    for ((order, action), outcomes) in &rows {
        let (side, point) = Point::HANDOVER
            .get(*order)
            .map_or(("?", "?"), |p| (p.side().name(), p.name()));
        let n: u32 = outcomes.values().sum();
        let f = fired.get(&(*order, *action)).copied().unwrap_or(0);
        print!("{side:<4} {point:<11} {action:<6} {n:>6} {f:>6}");
        for o in Outcome::ALL {
            let c = outcomes.get(&o).copied().unwrap_or(0);
            *totals.entry(o).or_default() += c;
            print!(" {:>10}", if c == 0 { "-".into() } else { c.to_string() });
        }
        println!();
    }
    let all_fired = trials.iter().filter(|t| t.fired).count();
    print!(
        "{:<4} {:<11} {:<6} {:>6} {all_fired:>6}",
        "all",
        "",
        "",
        trials.len()
    );
    for o in Outcome::ALL {
        print!(" {:>10}", totals.get(&o).copied().unwrap_or(0));
    }
    println!();
    let failures: Vec<&Row> = trials.iter().filter(|t| t.failure).collect();
    println!(
        "seed {seed}; fired = the fault point was reached and acted on; {} failures (lost although \
         the owner was not killed, corrupted, both alive, stray, setup)",
        failures.len()
    );
    for t in failures {
        println!(
            "  trial {} {}: {} — {}",
            t.index,
            t.fault,
            t.outcome.label(),
            t.detail
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_campaign_reads_back_into_the_same_rows() {
        let trial = Trial {
            index: 3,
            fault: "old:ready:panic".into(),
            side: "old",
            point: "ready",
            action: "panic",
            ms: None,
            outcome: Outcome::RunningInOld,
            failure: false,
            fired: true,
            reboot: "500: ...".into(),
            old_pid: 1,
            serving_pid: Some(1),
            detail: String::new(),
            trial_ms: 10,
            vms: vec![VmOutcome {
                name: "vm0".into(),
                state: "running".into(),
                verified: vec![5, 6],
                mismatches: 0,
                register_check_failures: 0,
            }],
        };
        let doc = json!({ "seed": 42, "trials": [trial] });
        let (rows, seed) = rows_of(&doc).expect("rows");
        assert_eq!(seed, 42);
        let want = Row::from(&trial);
        let got = &rows[0];
        assert_eq!(
            (
                &got.fault,
                &got.side,
                &got.point,
                &got.action,
                got.outcome,
                got.fired
            ),
            (
                &want.fault,
                &want.side,
                &want.point,
                &want.action,
                want.outcome,
                want.fired
            )
        );
        let mut spoilt = doc.clone();
        spoilt["trials"][0]["outcome"] = "fine".into();
        let refused = rows_of(&spoilt).err().unwrap_or_default();
        assert!(refused.contains("unknown outcome"), "{refused}");
    }

    #[test]
    fn a_round_covers_every_point_and_action_kind_once() {
        let plan = random_plan(72, 7, 500);
        let mut seen = std::collections::BTreeSet::new();
        for f in &plan {
            let (kind, ms) = action_kind(f.action);
            seen.insert((f.point.side().name(), f.point.name(), kind));
            match f.action {
                Action::Stop(ms) => assert!((50..=1500).contains(&ms)),
                Action::Delay(ms) => {
                    assert!((20..=400).contains(&ms) || (600..=1500).contains(&ms))
                }
                _ => assert_eq!(ms, None),
            }
        }
        assert_eq!(seen.len(), 72);
        // Reproducible from the seed, and another seed gives another order.
        assert_eq!(random_plan(72, 7, 500), plan);
        assert_ne!(random_plan(72, 8, 500), plan);
    }
}
