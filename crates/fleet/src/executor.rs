//! A host's step executor: it runs on the agent's runtime, watches this host's step of
//! the current plan and carries it out. It never touches a VM: the reboot is asked of the
//! daemon ([`RebootAsk`]), which runs the same reboot an operator's request does.
//!
//! Assigned, no halt: take a slot under the host's lease, start the step (recording the
//! build and VMs it starts from), check the plan's binary on disk, ask the daemon to
//! reboot into it. A reboot that fails leaves the old daemon running: the step fails and
//! the fleet halts. After a reboot the new daemon's executor finds its step `started` and
//! itself rebooted since: it runs the gate for the soak, records the verdict, and on a
//! failure halts the fleet and reboots back to the build the step started from. The slot
//! is released once the step has ended.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::oneshot;

use crate::halt::{self, HaltRecord};
use crate::kv::{self, now_unix_ms};
use crate::plan::{
    self, GateResult, Mode, PlanSpec, StepOutcome, StepRecord, StepStart, StepState,
};
use crate::records::{Health, HostRecord};
use crate::{keys, slots, FleetError};

/// How often the executor looks at its step.
pub const POLL: Duration = Duration::from_secs(1);
/// The gate watches the host for the plan's soak, and never less than this.
pub const MIN_GATE: Duration = Duration::from_secs(3);

/// A reboot the executor asks of its daemon. On success the daemon's process is replaced
/// (this one exits, `done` is never answered); on failure `done` gets why and the VMs run
/// on in this daemon.
pub struct RebootAsk {
    pub mode: Mode,
    /// The build to run next; None: the path this daemon was started from.
    pub binary: Option<PathBuf>,
    /// For the log: the plan's step and what the reboot is for.
    pub why: String,
    pub done: oneshot::Sender<Result<(), String>>,
    /// Set while the reboot is under way; the daemon clears it when the reboot failed,
    /// before it answers. The executor starts nothing while it is set, even if the
    /// session that asked ended meanwhile (a reconnected executor must not judge a step
    /// whose reboot is still running).
    pub busy: Arc<AtomicBool>,
}

/// The daemon's host record, read by the agent's session and its executor.
pub type SharedRecord = Arc<Mutex<Box<dyn FnMut() -> Option<HostRecord> + Send>>>;

/// What the executor reads and shares with its agent.
#[derive(Clone)]
pub struct Executor {
    pub host: String,
    pub lease: i64,
    /// The host's record as its daemon stands now (None while it hands over or stops).
    pub record: SharedRecord,
    pub reboots: std_mpsc::Sender<RebootAsk>,
    /// A reboot is under way in this daemon: the executor waits for its answer (it
    /// outlives a lost session, so a reconnected executor does not judge a step halfway).
    pub busy: Arc<AtomicBool>,
}

impl Executor {
    fn record(&self) -> Option<HostRecord> {
        let mut f = self.record.lock().unwrap_or_else(|p| p.into_inner());
        f()
    }

    /// Look at the step every [`POLL`] for as long as the agent lets it run.
    pub async fn run(self, mut client: Client) {
        loop {
            tokio::time::sleep(POLL).await;
            if self.busy.load(Ordering::SeqCst) {
                continue;
            }
            if let Err(e) = self.tick(&mut client).await {
                tracing::warn!(error = %e, "fleet: the step executor failed; trying again");
            }
        }
    }

    async fn tick(&self, client: &mut Client) -> Result<(), FleetError> {
        let Some(record) = self.record() else {
            return Ok(());
        };
        let Some(id) = plan::current_plan(client).await? else {
            return Ok(());
        };
        let key = keys::step(&id, &self.host);
        let Some((step, _)) = kv::get_record::<StepRecord>(client, &key, "plan step").await? else {
            return Ok(());
        };
        if !matches!(step.state, StepState::Assigned | StepState::Started) {
            return Ok(());
        }
        let Some((spec, _, _)) = plan::read_plan(client, &id).await? else {
            return Ok(());
        };
        match step.state {
            // A reboot or migration of the daemon's own is under way: the step waits
            // for it rather than failing on it.
            StepState::Assigned if record.health == Health::Busy => Ok(()),
            StepState::Assigned => self.start(client, &spec, &record).await,
            _ => self.resume(client, &spec, &step, &record).await,
        }
    }

    /// An assigned step: slot, start, check the binary, ask for the reboot.
    async fn start(
        &self,
        client: &mut Client,
        spec: &PlanSpec,
        record: &HostRecord,
    ) -> Result<(), FleetError> {
        if kv::get(client, &keys::halt()).await?.is_some() {
            return Ok(());
        }
        let Some(slot) = slots::take(client, spec.max_unavailable, &self.host, self.lease).await?
        else {
            return Ok(());
        };
        let from = StepStart {
            from_sha256: Some(record.build.sha256.clone()),
            from_path: Some(record.build.path.clone()),
            vms: record.vms.iter().map(|v| v.name.clone()).collect(),
        };
        let step = match plan::start_step_from(client, &spec.id, &self.host, slot, from).await {
            Ok(s) => s,
            Err(e @ (FleetError::StepNotAssigned { .. } | FleetError::Refused(_))) => {
                tracing::info!(error = %e, "fleet: the step does not start");
                slots::release(client, slot, &self.host).await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        tracing::info!(step = step.id(), "fleet: step started");
        let binary = match &spec.target {
            Some(t) => {
                let on_disk = plan::file_sha256(std::path::Path::new(&t.path));
                match on_disk {
                    Ok(sha) if sha == t.sha256 => Some(PathBuf::from(&t.path)),
                    Ok(sha) => {
                        let why = format!(
                            "the plan's binary {} has sha256 {sha} on this host, not {}: not rebooted",
                            t.path, t.sha256
                        );
                        return self.fail(client, spec, slot, "binary", why, None).await;
                    }
                    Err(e) => {
                        let why = format!("the plan's binary cannot be checked: {e}: not rebooted");
                        return self.fail(client, spec, slot, "binary", why, None).await;
                    }
                }
            }
            None => None,
        };
        match self.reboot(spec.mode, binary, step.id()).await {
            // The process is being replaced: the new daemon's executor gates the step.
            Ok(()) => Ok(()),
            Err(why) => {
                let why = format!("the reboot failed, the old build runs on: {why}");
                self.fail(client, spec, slot, "reboot", why, None).await
            }
        }
    }

    /// Ask the daemon to reboot; returns only if it failed (on success this process is
    /// replaced and exits while waiting).
    async fn reboot(&self, mode: Mode, binary: Option<PathBuf>, why: String) -> Result<(), String> {
        let (done, answer) = oneshot::channel();
        self.busy.store(true, Ordering::SeqCst);
        let asked = self.reboots.send(RebootAsk {
            mode,
            binary,
            why,
            done,
            busy: self.busy.clone(),
        });
        let r = match asked {
            Err(_) => Err("the daemon takes no reboot request (it is stopping)".to_string()),
            Ok(()) => match answer.await {
                Ok(r) => r,
                Err(_) => Err("the daemon dropped the reboot request".to_string()),
            },
        };
        self.busy.store(false, Ordering::SeqCst);
        r
    }

    /// A started step: if this daemon came from the step's reboot, run the gate; else
    /// the step's reboot never happened here (the daemon that started it stopped or was
    /// restarted without a takeover): the step fails and the fleet halts; the VMs are
    /// left as they are.
    async fn resume(
        &self,
        client: &mut Client,
        spec: &PlanSpec,
        step: &StepRecord,
        record: &HostRecord,
    ) -> Result<(), FleetError> {
        let slot = slots::holders(client)
            .await?
            .into_iter()
            .find(|(_, h)| *h == self.host)
            .map(|(i, _)| i);
        let started = step.started_unix_ms.unwrap_or(u64::MAX);
        let rebooted = record
            .last_reboot
            .as_ref()
            .is_some_and(|r| r.finished_unix_ms >= started);
        if !rebooted {
            let why = "the step started but this host's daemon did not come from its reboot (it stopped or was restarted); the VMs are left as they are".to_string();
            return self.fail_at(client, spec, slot, "reboot", why, None).await;
        }
        let outcome = self.gate(spec, step, record).await;
        if outcome.passed() {
            plan::finish_step(client, &spec.id, &self.host, outcome).await?;
            tracing::info!(step = step.id(), "fleet: the step's gate passed");
            if let Some(slot) = slot {
                slots::release(client, slot, &self.host).await?;
            }
            return Ok(());
        }
        let why = outcome.detail.clone().unwrap_or_default();
        tracing::error!(step = step.id(), why, "fleet: the step's gate failed");
        plan::finish_step(client, &spec.id, &self.host, outcome).await?;
        self.halt(client, spec, &why).await?;
        if let Some(slot) = slot {
            slots::release(client, slot, &self.host).await?;
        }
        self.roll_back(spec, step, record).await;
        Ok(())
    }

    /// Back to the build the step started from, after a failed gate (checked on disk
    /// first: a build that is no longer there is not run).
    async fn roll_back(&self, spec: &PlanSpec, step: &StepRecord, record: &HostRecord) {
        let (Some(path), Some(sha)) = (&step.from_path, &step.from_sha256) else {
            tracing::error!(
                step = step.id(),
                "fleet: the step recorded no build to go back to; the host stays on this one"
            );
            return;
        };
        if *sha == record.build.sha256 {
            tracing::warn!(
                step = step.id(),
                "fleet: the host already runs the build the step started from; no reboot back"
            );
            return;
        }
        match plan::file_sha256(std::path::Path::new(path)) {
            Ok(on_disk) if on_disk == *sha => {}
            Ok(on_disk) => {
                tracing::error!(
                    path,
                    on_disk,
                    expected = sha,
                    "fleet: the previous build changed on disk; not rebooting back"
                );
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "fleet: the previous build cannot be checked; not rebooting back");
                return;
            }
        }
        let why = format!("{}: back to the previous build", step.id());
        if let Err(e) = self.reboot(spec.mode, Some(PathBuf::from(path)), why).await {
            tracing::error!(error = %e, "fleet: the reboot back to the previous build failed; the VMs run on here");
        }
    }

    /// The gate: watch the host for the plan's soak; every VM the step started with still
    /// runs, every reference guest's counter advances with no mismatch or register check
    /// failure, the build is the target, and the reboot's blackout is under the limit.
    async fn gate(&self, spec: &PlanSpec, step: &StepRecord, first: &HostRecord) -> StepOutcome {
        let mut gates = Vec::new();
        let mut ok = |gate: &str, passed: bool, detail: String| {
            gates.push(GateResult {
                gate: gate.into(),
                passed,
                detail,
            })
        };
        let target = spec.target.as_ref().map(|t| t.sha256.clone());
        if let Some(t) = &target {
            ok(
                "build",
                first.build.sha256 == *t,
                format!("running {}", first.build.sha256),
            );
        }
        let blackout = first.last_reboot.as_ref().map(|r| r.blackout_p99_us);
        match blackout {
            Some(b) => ok(
                "blackout",
                b <= spec.blackout_p99_limit_us,
                format!("{b} us (limit {} us)", spec.blackout_p99_limit_us),
            ),
            None => ok("blackout", false, "no reboot figures".into()),
        }
        let soak = Duration::from_secs(spec.soak_secs).max(MIN_GATE);
        let deadline = tokio::time::Instant::now() + soak;
        let mut problems: Vec<String> = Vec::new();
        let mut last = first.clone();
        let mut answered = true;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
            let Some(r) = self.record() else {
                answered = false;
                break;
            };
            for v in &r.vms {
                if v.lifecycle != "running" {
                    problems.push(format!("VM {} is {}", v.name, v.lifecycle));
                }
                if let Some(g) = &v.guest {
                    if g.mismatches > 0 || g.register_check_failures > 0 {
                        problems.push(format!(
                            "VM {}'s guest found {} mismatches, {} register check failures",
                            v.name, g.mismatches, g.register_check_failures
                        ));
                    }
                }
            }
            last = r;
        }
        ok(
            "daemon",
            answered,
            if answered {
                "answers"
            } else {
                "stopped answering"
            }
            .into(),
        );
        let missing: Vec<&String> = step
            .vms_before
            .iter()
            .filter(|n| !last.vms.iter().any(|v| v.name == **n))
            .collect();
        if !missing.is_empty() {
            problems.push(format!("VMs gone: {missing:?}"));
        }
        problems.sort();
        problems.dedup();
        ok(
            "vms-running",
            problems.is_empty(),
            if problems.is_empty() {
                format!("{} VMs running for {}s", last.vms.len(), soak.as_secs())
            } else {
                problems.join("; ")
            },
        );
        let stalled: Vec<String> = last
            .vms
            .iter()
            .filter_map(|v| {
                let now = v.guest.as_ref()?.counter;
                let before = first
                    .vms
                    .iter()
                    .find(|f| f.name == v.name)
                    .and_then(|f| f.guest.as_ref())
                    .map_or(0, |g| g.counter);
                (now <= before).then(|| format!("VM {}'s counter stayed at {now}", v.name))
            })
            .collect();
        ok(
            "guests-verify",
            stalled.is_empty(),
            if stalled.is_empty() {
                "every guest's counter advanced".into()
            } else {
                stalled.join("; ")
            },
        );
        let failed: Vec<String> = gates
            .iter()
            .filter(|g| !g.passed)
            .map(|g| format!("{}: {}", g.gate, g.detail))
            .collect();
        StepOutcome {
            gates,
            to_sha256: Some(last.build.sha256.clone()),
            blackout_p99_us: blackout,
            detail: (!failed.is_empty()).then(|| failed.join("; ")),
        }
    }

    /// The step failed before or at its reboot: record it, halt, release the slot.
    async fn fail(
        &self,
        client: &mut Client,
        spec: &PlanSpec,
        slot: u32,
        gate: &str,
        why: String,
        blackout: Option<u64>,
    ) -> Result<(), FleetError> {
        self.fail_at(client, spec, Some(slot), gate, why, blackout)
            .await
    }

    async fn fail_at(
        &self,
        client: &mut Client,
        spec: &PlanSpec,
        slot: Option<u32>,
        gate: &str,
        why: String,
        blackout: Option<u64>,
    ) -> Result<(), FleetError> {
        tracing::error!(plan = spec.id, why, "fleet: the step failed");
        let outcome = StepOutcome {
            gates: vec![GateResult {
                gate: gate.into(),
                passed: false,
                detail: why.clone(),
            }],
            to_sha256: None,
            blackout_p99_us: blackout,
            detail: Some(why.clone()),
        };
        plan::finish_step(client, &spec.id, &self.host, outcome).await?;
        self.halt(client, spec, &why).await?;
        if let Some(slot) = slot {
            slots::release(client, slot, &self.host).await?;
        }
        Ok(())
    }

    async fn halt(
        &self,
        client: &mut Client,
        spec: &PlanSpec,
        why: &str,
    ) -> Result<(), FleetError> {
        let mut h = HaltRecord::new(
            &self.host,
            format!("step {}/{} failed: {why}", spec.id, self.host),
        );
        h.plan = Some(spec.id.clone());
        h.host = Some(self.host.clone());
        h.at_unix_ms = now_unix_ms();
        halt::set(client, &h).await?;
        Ok(())
    }
}
