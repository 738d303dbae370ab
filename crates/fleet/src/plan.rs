//! Plans: what an operator asks the fleet to do (reboot every host in waves, optionally
//! onto a new build), where a plan stands, and its steps (one per host).
//!
//! A plan is checked whole before anything is stored: every bad input is one line and
//! leaves the keyspace as it was. Storing it is one transaction that also checks the
//! fleet: no plan runs, no halt is set, and every host it names is registered.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::kv::{self, now_unix_ms};
use crate::records::{encode, HostRecord, FORMAT};
use crate::{keys, FleetError};

/// The most hosts one plan names: storing a plan compares every named host's key in one
/// transaction, and etcd takes at most 128 operations of each kind per transaction by
/// default (`--max-txn-ops`); a few are the plan's own.
pub const MAX_PLAN_HOSTS: usize = 120;

/// A plan's default blackout limit for the gate: 50 ms at the p99.
pub const DEFAULT_BLACKOUT_P99_LIMIT_US: u64 = 50_000;

/// How each host reboots: the daemon's reboot modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Warm,
    Saved,
    Cold,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, FleetError> {
        match s {
            "warm" => Ok(Mode::Warm),
            "saved" => Ok(Mode::Saved),
            "cold" => Ok(Mode::Cold),
            _ => Err(FleetError::Invalid(format!(
                "reboot mode {s:?} is not warm, saved or cold"
            ))),
        }
    }
}

/// What the coordinator does with a host that is missing (no membership record) or
/// stale when its turn comes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissingHost {
    /// Halt the plan: an operator looks.
    #[default]
    Halt,
    /// Record the host as skipped and go on.
    Skip,
}

/// The build a plan moves the hosts to: the binary, staged at the same path on every
/// host, and its sha256 (each host checks it before it starts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetBuild {
    pub path: String,
    pub sha256: String,
}

/// A plan as the operator gave it (`keys::plan`), written once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanSpec {
    pub format: u32,
    pub id: String,
    pub mode: Mode,
    /// None: rejuvenate (reboot onto the build each host runs).
    pub target: Option<TargetBuild>,
    /// The first `canary` hosts of `hosts` go first, alone, then the soak.
    pub canary: u32,
    /// At most this many hosts are in a step at once (the slots).
    pub max_unavailable: u32,
    /// Seconds the fleet waits after the canary passed, before the rest.
    pub soak_secs: u64,
    /// In the order they go.
    pub hosts: Vec<String>,
    /// The gate's limit on a host's reboot blackout, p99, microseconds.
    pub blackout_p99_limit_us: u64,
    pub on_missing_host: MissingHost,
    pub created_unix_ms: u64,
    /// Who stored it (user@machine of the CLI).
    pub created_by: String,
}

/// What the operator asked, before it is checked (the CLI's flags).
#[derive(Clone, Debug, Default)]
pub struct PlanRequest {
    pub mode: String,
    pub binary: Option<String>,
    pub sha256: Option<String>,
    pub canary: u32,
    pub max_unavailable: u32,
    pub soak_secs: u64,
    /// Empty: every host registered when the plan is stored.
    pub hosts: Vec<String>,
    pub blackout_p99_limit_us: u64,
    pub on_missing_host: MissingHost,
    pub created_by: String,
}

impl PlanRequest {
    /// The checks that need neither etcd nor the binary's file; `hosts` are the hosts the
    /// plan will name.
    pub fn check(&self, hosts: &[String]) -> Result<(Mode, Option<TargetBuild>), FleetError> {
        let invalid = |m: String| Err(FleetError::Invalid(m));
        let mode = Mode::parse(&self.mode)?;
        if self.max_unavailable == 0 {
            return invalid("--max-unavailable must be at least 1".into());
        }
        if self.canary == 0 {
            return invalid("--canary must be at least 1 (the first host is the canary)".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for h in hosts {
            keys::check_name("host", h).map_err(FleetError::Invalid)?;
            if !seen.insert(h) {
                return invalid(format!("host {h} is named twice"));
            }
        }
        if hosts.len() > MAX_PLAN_HOSTS {
            return invalid(format!(
                "the plan names {} hosts; a plan takes at most {MAX_PLAN_HOSTS} (split the fleet into several plans)",
                hosts.len()
            ));
        }
        if hosts.is_empty() {
            return invalid(
                "the plan has no hosts (none is registered under /warmvm/hosts/)".into(),
            );
        }
        if self.canary as usize > hosts.len() {
            return invalid(format!(
                "--canary {} is more than the plan's {} host(s)",
                self.canary,
                hosts.len()
            ));
        }
        if self.blackout_p99_limit_us == 0 {
            return invalid("the blackout limit must be more than 0 us".into());
        }
        let target = match (&self.binary, &self.sha256) {
            (None, None) => None,
            (Some(_), None) => {
                return invalid("--binary needs --sha256 (the build's sha256)".into())
            }
            (None, Some(_)) => {
                return invalid("--sha256 needs --binary (where the build is staged)".into())
            }
            (Some(path), Some(sha)) => {
                check_sha256(sha)?;
                if !path.starts_with('/') {
                    return invalid(format!(
                        "--binary {path:?} is not an absolute path (it is staged at the same path on every host)"
                    ));
                }
                Some(TargetBuild {
                    path: path.clone(),
                    sha256: sha.clone(),
                })
            }
        };
        Ok((mode, target))
    }
}

/// A sha256 as the fleet writes it: 64 lower-case hex digits.
pub fn check_sha256(sha: &str) -> Result<(), FleetError> {
    if sha.len() == 64
        && sha
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(FleetError::Invalid(format!(
            "sha256 {sha:?} is not 64 lower-case hex digits"
        )))
    }
}

/// The sha256 of the file at `path`, lower-case hex.
pub fn file_sha256(path: &Path) -> Result<String, FleetError> {
    let read = |source| FleetError::ReadFile {
        what: "binary",
        path: path.into(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(read)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The binary at the target's path here (on the machine storing the plan) is the build
/// its sha256 names.
pub fn check_binary(target: &TargetBuild) -> Result<(), FleetError> {
    let actual = file_sha256(Path::new(&target.path))?;
    if actual != target.sha256 {
        return Err(FleetError::Invalid(format!(
            "{} has sha256 {actual}, not the {} given",
            target.path, target.sha256
        )));
    }
    Ok(())
}

/// A new plan's id: `plan-` and the creation time in milliseconds, base 36 (ordered by
/// time, and a valid key segment).
pub fn new_plan_id(created_unix_ms: u64) -> String {
    let mut n = created_unix_ms;
    let mut digits = Vec::new();
    loop {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    format!("plan-{}", String::from_utf8_lossy(&digits))
}

/// Where a plan stands (`keys::plan_progress`), written by the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanStatus {
    Running,
    Halted,
    Done,
    Aborted,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanProgress {
    pub format: u32,
    pub plan: String,
    pub status: PlanStatus,
    /// 0: the canary; 1: the rest (after the soak).
    pub wave: u32,
    /// When the soak after the canary ends, once it began.
    pub soak_until_unix_ms: Option<u64>,
    /// Each host's step as the coordinator last saw it.
    pub steps: BTreeMap<String, StepState>,
    /// Hosts whose failed step an operator resumed past (they are not retried).
    pub acknowledged_failures: Vec<String>,
    pub updated_unix_ms: u64,
}

impl PlanProgress {
    pub fn new(plan: &str, now_unix_ms: u64) -> PlanProgress {
        PlanProgress {
            format: FORMAT,
            plan: plan.into(),
            status: PlanStatus::Running,
            wave: 0,
            soak_until_unix_ms: None,
            steps: BTreeMap::new(),
            acknowledged_failures: Vec::new(),
            updated_unix_ms: now_unix_ms,
        }
    }
}

/// A step's state: assigned by the coordinator, started by the host (once only), then
/// passed or failed at its gate; or skipped (its host was missing, by the plan's policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    Assigned,
    Started,
    GatePassed,
    Failed,
    Skipped,
}

impl StepState {
    /// The host is (or may be) down or rebooting: it counts against the budget.
    pub fn in_flight(self) -> bool {
        matches!(self, StepState::Assigned | StepState::Started)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Assigned => "assigned",
            StepState::Started => "started",
            StepState::GatePassed => "gate-passed",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
        }
    }
}

/// One gate's verdict after a host's step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateResult {
    /// `daemon`, `vms-running`, `guests-verify`, `blackout`, `aging`, ...
    pub gate: String,
    pub passed: bool,
    pub detail: String,
}

/// One host's step of a plan (`keys::step`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub format: u32,
    pub plan: String,
    pub host: String,
    pub wave: u32,
    pub state: StepState,
    pub assigned_unix_ms: u64,
    pub started_unix_ms: Option<u64>,
    pub finished_unix_ms: Option<u64>,
    pub from_sha256: Option<String>,
    pub to_sha256: Option<String>,
    pub blackout_p99_us: Option<u64>,
    pub gates: Vec<GateResult>,
    /// Why it failed or was skipped.
    pub detail: Option<String>,
    /// The path of the build the host ran when it started the step: what a failed gate
    /// reboots back into (its sha256 is `from_sha256`). Added with the hosts' step
    /// executor; absent in steps started by hand.
    #[serde(default)]
    pub from_path: Option<String>,
    /// The VMs the host ran when it started the step: each must still run at the gate.
    /// Added with the hosts' step executor.
    #[serde(default)]
    pub vms_before: Vec<String>,
}

impl StepRecord {
    pub fn assigned(plan: &str, host: &str, wave: u32, now_unix_ms: u64) -> StepRecord {
        StepRecord {
            format: FORMAT,
            plan: plan.into(),
            host: host.into(),
            wave,
            state: StepState::Assigned,
            assigned_unix_ms: now_unix_ms,
            started_unix_ms: None,
            finished_unix_ms: None,
            from_sha256: None,
            to_sha256: None,
            blackout_p99_us: None,
            gates: Vec::new(),
            detail: None,
            from_path: None,
            vms_before: Vec::new(),
        }
    }

    /// The step's id: the plan's and the host's.
    pub fn id(&self) -> String {
        format!("{}/{}", self.plan, self.host)
    }
}

/// The hosts registered now, by name (records that do not decode are reported, not
/// skipped: the fleet must not act on a host it cannot read).
pub async fn registered_hosts(
    client: &mut Client,
) -> Result<BTreeMap<String, (HostRecord, i64)>, FleetError> {
    let mut hosts = BTreeMap::new();
    let prefix = keys::hosts_prefix();
    for kv in kv::get_prefix(client, &prefix).await? {
        let key = kv::key_text(&kv);
        let record: HostRecord = crate::records::decode(&key, "host record", kv.value())?;
        let name = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
        hosts.insert(name, (record, kv.create_revision()));
    }
    Ok(hosts)
}

/// The plan that runs now, if any: its id.
pub async fn current_plan(client: &mut Client) -> Result<Option<String>, FleetError> {
    Ok(kv::get(client, &keys::current_plan())
        .await?
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

/// Check `request` whole and store it as the running plan, in one transaction; nothing is
/// written when anything is refused. Returns the stored spec.
pub async fn create_plan(
    client: &mut Client,
    request: &PlanRequest,
) -> Result<PlanSpec, FleetError> {
    // The checks of the request alone come first: they need nothing from etcd.
    let explicit = !request.hosts.is_empty();
    if explicit {
        request.check(&request.hosts)?;
    } else {
        // The hosts are not known yet; check the rest with a stand-in of the right size
        // after reading them (below).
    }
    if let Some(halt) = kv::get(client, &keys::halt()).await? {
        return Err(FleetError::Refused(format!(
            "the fleet is halted ({}): `warmvm fleet resume` first",
            crate::halt::describe(&halt)
        )));
    }
    if let Some(id) = current_plan(client).await? {
        return Err(FleetError::Refused(format!(
            "plan {id} is running: one plan at a time"
        )));
    }
    let registered = registered_hosts(client).await?;
    let hosts: Vec<String> = if explicit {
        request.hosts.clone()
    } else {
        registered.keys().cloned().collect()
    };
    let (mode, target) = request.check(&hosts)?;
    let absent: Vec<&str> = hosts
        .iter()
        .filter(|h| !registered.contains_key(*h))
        .map(String::as_str)
        .collect();
    if !absent.is_empty() {
        return Err(FleetError::Refused(format!(
            "host(s) {} not registered under {}",
            absent.join(", "),
            keys::hosts_prefix()
        )));
    }
    if let Some(target) = &target {
        check_binary(target)?;
    }
    let created_unix_ms = now_unix_ms();
    let spec = PlanSpec {
        format: FORMAT,
        id: new_plan_id(created_unix_ms),
        mode,
        target,
        canary: request.canary,
        max_unavailable: request.max_unavailable,
        soak_secs: request.soak_secs,
        hosts,
        blackout_p99_limit_us: request.blackout_p99_limit_us,
        on_missing_host: request.on_missing_host,
        created_unix_ms,
        created_by: request.created_by.clone(),
    };
    store_plan(client, &spec).await?;
    Ok(spec)
}

/// The transaction that stores a checked plan: it lands only if no plan runs, no halt is
/// set, the id is new and every host named is registered, all at once.
pub async fn store_plan(client: &mut Client, spec: &PlanSpec) -> Result<(), FleetError> {
    keys::check_name("plan id", &spec.id).map_err(FleetError::Invalid)?;
    let mut compares = vec![
        Compare::create_revision(keys::current_plan(), CompareOp::Equal, 0),
        Compare::create_revision(keys::halt(), CompareOp::Equal, 0),
        Compare::create_revision(keys::plan(&spec.id), CompareOp::Equal, 0),
    ];
    for h in &spec.hosts {
        compares.push(Compare::create_revision(
            keys::host(h),
            CompareOp::NotEqual,
            0,
        ));
    }
    let progress = PlanProgress::new(&spec.id, spec.created_unix_ms);
    let event =
        crate::events::Event::new(crate::events::EventKind::PlanCreated, spec.created_unix_ms)
            .plan(&spec.id)
            .detail(format!(
                "{} reboot of {} host(s) by {}",
                match spec.mode {
                    Mode::Warm => "warm",
                    Mode::Saved => "saved",
                    Mode::Cold => "cold",
                },
                spec.hosts.len(),
                spec.created_by
            ));
    let puts = vec![
        TxnOp::put(keys::plan(&spec.id), encode(spec), None),
        TxnOp::put(keys::plan_progress(&spec.id), encode(&progress), None),
        TxnOp::put(keys::current_plan(), spec.id.clone(), None),
    ];
    let txn = Txn::new().when(compares).and_then(puts);
    let r = client
        .txn(txn)
        .await
        .map_err(FleetError::etcd("store the plan"))?;
    if !r.succeeded() {
        return Err(why_not_stored(client, spec).await);
    }
    // The event goes after the plan: the history is a record of what landed.
    crate::events::append(client, &[], event).await?;
    Ok(())
}

/// The fleet changed between the checks and the transaction: say what changed.
async fn why_not_stored(client: &mut Client, spec: &PlanSpec) -> FleetError {
    let refused = |m: String| FleetError::Refused(m);
    match current_plan(client).await {
        Ok(Some(id)) => return refused(format!("plan {id} is running: one plan at a time")),
        Err(e) => return e,
        Ok(None) => {}
    }
    match kv::get(client, &keys::halt()).await {
        Ok(Some(halt)) => {
            return refused(format!(
                "the fleet is halted ({}): `warmvm fleet resume` first",
                crate::halt::describe(&halt)
            ))
        }
        Err(e) => return e,
        Ok(None) => {}
    }
    match registered_hosts(client).await {
        Ok(registered) => {
            let absent: Vec<&str> = spec
                .hosts
                .iter()
                .filter(|h| !registered.contains_key(*h))
                .map(String::as_str)
                .collect();
            if !absent.is_empty() {
                return refused(format!(
                    "host(s) {} not registered under {}",
                    absent.join(", "),
                    keys::hosts_prefix()
                ));
            }
        }
        Err(e) => return e,
    }
    refused(format!(
        "plan id {} is taken or the fleet changed while storing: try again",
        spec.id
    ))
}

/// A plan's spec, progress and steps.
pub async fn read_plan(
    client: &mut Client,
    id: &str,
) -> Result<Option<(PlanSpec, PlanProgress, BTreeMap<String, StepRecord>)>, FleetError> {
    keys::check_name("plan id", id).map_err(FleetError::Invalid)?;
    let Some((spec, _)) = kv::get_record::<PlanSpec>(client, &keys::plan(id), "plan").await? else {
        return Ok(None);
    };
    let progress =
        match kv::get_record::<PlanProgress>(client, &keys::plan_progress(id), "plan progress")
            .await?
        {
            Some((p, _)) => p,
            None => PlanProgress::new(id, spec.created_unix_ms),
        };
    let mut steps = BTreeMap::new();
    let prefix = keys::steps_prefix(id);
    for kv in kv::get_prefix(client, &prefix).await? {
        let key = kv::key_text(&kv);
        let step: StepRecord = crate::records::decode(&key, "plan step", kv.value())?;
        steps.insert(step.host.clone(), step);
    }
    Ok(Some((spec, progress, steps)))
}

/// A host starts its step: only from `assigned`, and only once (the transaction compares
/// the step's revision as read, so two starts cannot both land); only while it holds slot
/// `slot` (see `slots::take`) and no halt is set, both compared in the same transaction.
pub async fn start_step(
    client: &mut Client,
    plan: &str,
    host: &str,
    slot: u32,
    from_sha256: Option<String>,
) -> Result<StepRecord, FleetError> {
    let from = StepStart {
        from_sha256,
        ..StepStart::default()
    };
    start_step_from(client, plan, host, slot, from).await
}

/// What a host records as it starts its step: the build it runs (to come back to) and
/// its VMs (each must run at the gate).
#[derive(Clone, Debug, Default)]
pub struct StepStart {
    pub from_sha256: Option<String>,
    pub from_path: Option<String>,
    pub vms: Vec<String>,
}

/// [`start_step`] recording `from` in the step.
pub async fn start_step_from(
    client: &mut Client,
    plan: &str,
    host: &str,
    slot: u32,
    from: StepStart,
) -> Result<StepRecord, FleetError> {
    let key = keys::step(plan, host);
    let Some((mut step, kv)) = kv::get_record::<StepRecord>(client, &key, "plan step").await?
    else {
        return Err(FleetError::Refused(format!(
            "no step {plan}/{host} is assigned"
        )));
    };
    if step.state != StepState::Assigned {
        return Err(FleetError::StepNotAssigned {
            step: step.id(),
            state: step.state.as_str().into(),
        });
    }
    step.state = StepState::Started;
    step.started_unix_ms = Some(now_unix_ms());
    step.from_sha256 = from.from_sha256;
    step.from_path = from.from_path;
    step.vms_before = from.vms;
    let txn = Txn::new()
        .when([
            Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
            Compare::value(keys::slot(slot), CompareOp::Equal, host),
            Compare::create_revision(keys::halt(), CompareOp::Equal, 0),
        ])
        .and_then([TxnOp::put(key.clone(), encode(&step), None)]);
    let r = client
        .txn(txn)
        .await
        .map_err(FleetError::etcd(format!("start step {plan}/{host}")))?;
    if !r.succeeded() {
        if let Some(halt) = kv::get(client, &keys::halt()).await? {
            return Err(FleetError::Refused(format!(
                "the fleet is halted ({}): step {} does not start",
                crate::halt::describe(&halt),
                step.id()
            )));
        }
        let holder = kv::get(client, &keys::slot(slot)).await?;
        if holder.as_ref().map(|kv| kv.value()) != Some(host.as_bytes()) {
            return Err(FleetError::Refused(format!(
                "host {host} does not hold {}: step {} does not start",
                keys::slot(slot),
                step.id()
            )));
        }
        let state = match kv::get_record::<StepRecord>(client, &key, "plan step").await? {
            Some((s, _)) => s.state.as_str().to_string(),
            None => "gone".into(),
        };
        return Err(FleetError::StepNotAssigned {
            step: step.id(),
            state,
        });
    }
    let event = crate::events::Event::new(crate::events::EventKind::StepStarted, now_unix_ms())
        .plan(plan)
        .host(host)
        .step(&step.id());
    crate::events::append(client, &[], event).await?;
    Ok(step)
}

/// How a host's step ended: its gates' verdicts and the reboot's figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepOutcome {
    pub gates: Vec<GateResult>,
    pub to_sha256: Option<String>,
    pub blackout_p99_us: Option<u64>,
    /// Why it failed, when it did.
    pub detail: Option<String>,
}

impl StepOutcome {
    /// Passed when there is at least one gate and every gate passed.
    pub fn passed(&self) -> bool {
        !self.gates.is_empty() && self.gates.iter().all(|g| g.passed)
    }
}

/// A host records how its started step ended (gate-passed or failed), once: only from
/// `started`, by a transaction on the step's revision as read.
pub async fn finish_step(
    client: &mut Client,
    plan: &str,
    host: &str,
    outcome: StepOutcome,
) -> Result<StepRecord, FleetError> {
    let key = keys::step(plan, host);
    let Some((mut step, kv)) = kv::get_record::<StepRecord>(client, &key, "plan step").await?
    else {
        return Err(FleetError::Refused(format!(
            "no step {plan}/{host} is assigned"
        )));
    };
    if step.state != StepState::Started {
        return Err(FleetError::Refused(format!(
            "step {} is {}, not started: only a started step ends",
            step.id(),
            step.state.as_str()
        )));
    }
    let passed = outcome.passed();
    step.state = if passed {
        StepState::GatePassed
    } else {
        StepState::Failed
    };
    step.finished_unix_ms = Some(now_unix_ms());
    step.gates = outcome.gates;
    step.to_sha256 = outcome.to_sha256;
    step.blackout_p99_us = outcome.blackout_p99_us;
    step.detail = outcome.detail;
    let txn = Txn::new()
        .when([Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            kv.mod_revision(),
        )])
        .and_then([TxnOp::put(key.clone(), encode(&step), None)]);
    let r = client
        .txn(txn)
        .await
        .map_err(FleetError::etcd(format!("finish step {plan}/{host}")))?;
    if !r.succeeded() {
        return Err(FleetError::Refused(format!(
            "step {} changed while it was being finished",
            step.id()
        )));
    }
    let kind = if passed {
        crate::events::EventKind::GatePassed
    } else {
        crate::events::EventKind::GateFailed
    };
    let detail = step
        .gates
        .iter()
        .map(|g| {
            format!(
                "{}: {} ({})",
                g.gate,
                if g.passed { "ok" } else { "FAILED" },
                g.detail
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let event = crate::events::Event::new(kind, now_unix_ms())
        .plan(plan)
        .host(host)
        .step(&step.id())
        .detail(detail);
    crate::events::append(client, &[], event).await?;
    Ok(step)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> PlanRequest {
        PlanRequest {
            mode: "warm".into(),
            canary: 1,
            max_unavailable: 1,
            blackout_p99_limit_us: DEFAULT_BLACKOUT_P99_LIMIT_US,
            created_by: "op@here".into(),
            ..PlanRequest::default()
        }
    }

    fn hosts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("h{i}")).collect()
    }

    fn err(r: &PlanRequest, n: usize) -> String {
        r.check(&hosts(n)).unwrap_err().to_string()
    }

    #[test]
    fn each_bad_request_is_one_clear_line() {
        let sha = "ab".repeat(32);
        let cases: Vec<(PlanRequest, &str)> = vec![
            (
                PlanRequest {
                    max_unavailable: 0,
                    ..request()
                },
                "--max-unavailable must be at least 1",
            ),
            (
                PlanRequest {
                    canary: 0,
                    ..request()
                },
                "--canary must be at least 1",
            ),
            (
                PlanRequest {
                    canary: 4,
                    ..request()
                },
                "--canary 4 is more than the plan's 3 host(s)",
            ),
            (
                PlanRequest {
                    mode: "hot".into(),
                    ..request()
                },
                "not warm, saved or cold",
            ),
            (
                PlanRequest {
                    binary: Some("/b".into()),
                    ..request()
                },
                "--binary needs --sha256",
            ),
            (
                PlanRequest {
                    sha256: Some(sha.clone()),
                    ..request()
                },
                "--sha256 needs --binary",
            ),
            (
                PlanRequest {
                    binary: Some("/b".into()),
                    sha256: Some("xyz".into()),
                    ..request()
                },
                "not 64 lower-case hex",
            ),
            (
                PlanRequest {
                    binary: Some("/b".into()),
                    sha256: Some(sha.to_uppercase()),
                    ..request()
                },
                "not 64 lower-case hex",
            ),
            (
                PlanRequest {
                    binary: Some("b".into()),
                    sha256: Some(sha.clone()),
                    ..request()
                },
                "not an absolute path",
            ),
            (
                PlanRequest {
                    blackout_p99_limit_us: 0,
                    ..request()
                },
                "blackout limit",
            ),
        ];
        for (r, want) in cases {
            let e = err(&r, 3);
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            assert!(!e.contains('\n'), "{e:?}");
        }
        assert!(err(&request(), 0).contains("no hosts"));
        assert!(err(&request(), MAX_PLAN_HOSTS + 1).contains("at most 120"));
        request().check(&hosts(MAX_PLAN_HOSTS)).unwrap();
        let twice = vec!["a".to_string(), "a".to_string()];
        assert!(request()
            .check(&twice)
            .unwrap_err()
            .to_string()
            .contains("named twice"));
        let bad = vec!["A/b".to_string()];
        assert!(request().check(&bad).is_err());
        let (mode, target) = PlanRequest {
            binary: Some("/b".into()),
            sha256: Some(sha.clone()),
            ..request()
        }
        .check(&hosts(1))
        .unwrap();
        assert_eq!(mode, Mode::Warm);
        assert_eq!(target.unwrap().sha256, sha);
    }

    #[test]
    fn a_binary_must_be_there_and_match_its_sha256() {
        let dir = std::env::temp_dir().join(format!("warmvm-fleet-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("warmvm");
        std::fs::write(&file, b"abc").unwrap();
        // sha256("abc")
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let target = |sha: &str, path: &Path| TargetBuild {
            path: path.to_string_lossy().into(),
            sha256: sha.into(),
        };
        check_binary(&target(abc, &file)).unwrap();
        let e = check_binary(&target(&"00".repeat(32), &file))
            .unwrap_err()
            .to_string();
        assert!(e.contains(abc) && e.contains("not the"), "{e}");
        let e = check_binary(&target(abc, &dir.join("missing")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn plan_ids_are_valid_key_segments_ordered_by_time() {
        let a = new_plan_id(1_700_000_000_000);
        let b = new_plan_id(1_700_000_000_001);
        keys::check_name("plan id", &a).unwrap();
        assert_ne!(a, b);
        assert!(a < b);
        assert_eq!(new_plan_id(0), "plan-0");
    }

    #[test]
    fn plan_records_round_trip_and_follow_the_format_rule() {
        use crate::records::decode;
        let spec = PlanSpec {
            format: FORMAT,
            id: "plan-1".into(),
            mode: Mode::Saved,
            target: Some(TargetBuild {
                path: "/usr/bin/warmvm".into(),
                sha256: "ab".repeat(32),
            }),
            canary: 1,
            max_unavailable: 2,
            soak_secs: 30,
            hosts: hosts(3),
            blackout_p99_limit_us: 50_000,
            on_missing_host: MissingHost::Skip,
            created_unix_ms: 5,
            created_by: "op".into(),
        };
        assert_eq!(
            decode::<PlanSpec>("k", "plan", &encode(&spec)).unwrap(),
            spec
        );
        let mut progress = PlanProgress::new("plan-1", 5);
        progress.steps.insert("h0".into(), StepState::GatePassed);
        assert_eq!(
            decode::<PlanProgress>("k", "p", &encode(&progress)).unwrap(),
            progress
        );
        let mut step = StepRecord::assigned("plan-1", "h0", 0, 7);
        step.gates.push(GateResult {
            gate: "blackout".into(),
            passed: true,
            detail: "3 ms".into(),
        });
        assert_eq!(step.id(), "plan-1/h0");
        assert_eq!(
            decode::<StepRecord>("k", "s", &encode(&step)).unwrap(),
            step
        );
        let mut v = serde_json::to_value(&spec).unwrap();
        v.as_object_mut().unwrap().remove("canary");
        assert!(decode::<PlanSpec>("k", "plan", v.to_string().as_bytes()).is_err());
    }
}
