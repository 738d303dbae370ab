//! The source of a live migration: pre-copy, then the switchover with its commit point.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::Digest;
use warmvm_devices::Pausable;

use super::pages::{self, DirtyLog, PageSet};
use super::stream::{self, Hello, Msg, PAGE, STREAM_VERSION};
use super::{Failed, MigrationError, STATE_KIND};
use crate::state::envelope;
use crate::vm::{Lifecycle, VCPU_RESPONSE_TIMEOUT};
use crate::Vm;

/// How a migration may go.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// Pre-copy stops once what is left is estimated to take at most this with the VM
    /// paused (remaining bytes ÷ measured bandwidth + the state's cost).
    pub downtime: Duration,
    /// Pre-copy rounds (round 0 included) after which the migration is cancelled (or,
    /// with `force`, switched over whatever is left).
    pub max_rounds: u32,
    /// Time after which the same happens.
    pub timeout: Duration,
    /// At the limits, stop and copy instead of cancelling.
    pub force: bool,
    /// Tests only: the state format the Hello announces (an incompatible destination
    /// must refuse it before the guest pauses).
    #[doc(hidden)]
    pub announce_state_format: Option<u32>,
    /// Called after each pre-copy round with where the migration stands (for a progress
    /// display: round, bytes, dirty rate, estimate).
    pub progress: Option<ProgressHook>,
    /// Tests only: called after each pre-copy round is acknowledged, with its number.
    #[doc(hidden)]
    pub between_rounds: Option<RoundHook>,
    /// This migration's id (sent in Hello, kept by the destination): what the source
    /// asks about if the VM ends in doubt. The caller makes it unique.
    pub migration_id: String,
}

/// Where a migration stands after a pre-copy round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The round just sent.
    pub round: RoundReport,
    /// Bytes sent so far.
    pub bytes_total: u64,
    /// Dirty now, to send next.
    pub remaining_bytes: u64,
    pub bandwidth_bps: u64,
    /// The pause switching over now would take, estimated (µs; `u64::MAX` if unknown).
    pub downtime_estimate_us: u64,
}

/// A progress callback.
#[derive(Clone)]
pub struct ProgressHook(pub std::sync::Arc<dyn Fn(&Progress) + Send + Sync>);

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHook")
    }
}

/// A test's hook between pre-copy rounds.
#[derive(Clone)]
pub struct RoundHook(pub std::sync::Arc<dyn Fn(u32) + Send + Sync>);

impl std::fmt::Debug for RoundHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoundHook")
    }
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            downtime: Duration::from_millis(300),
            max_rounds: 30,
            timeout: Duration::from_secs(600),
            force: false,
            announce_state_format: None,
            progress: None,
            between_rounds: None,
            migration_id: String::new(),
        }
    }
}

/// How a migration ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum EndReason {
    /// What was left fit the downtime budget (or nothing was left).
    Converged,
    /// The round or time limit was reached with `force`: stopped and copied.
    Forced,
    /// The round or time limit was reached: the VM runs on at the source.
    Cancelled { why: String },
    /// It failed at `step` (the VM runs on at the source unless `step` is after the
    /// commit, when it is in doubt).
    Failed { step: String, error: String },
    /// Not ended yet.
    #[default]
    Unfinished,
}

/// One pre-copy round (the last one is the final round, sent with the VM paused).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: u32,
    /// Pages sent, zero pages among them (sent as their length only).
    pub pages: u64,
    pub zero_pages: u64,
    /// Bytes on the stream.
    pub bytes: u64,
    pub duration_us: u64,
    /// The guest's (and the VMM's) rate of dirtying pages while the round before was sent,
    /// bytes per second (0 for round 0).
    pub dirty_rate_bps: u64,
}

/// What a migration did and what it cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub vm: String,
    pub ram_bytes: u64,
    pub end: EndReason,
    /// From the call to the end (the VM running at the destination, or here again).
    pub total_us: u64,
    /// The VM paused: from the pause to `Running` (0 if it never paused).
    pub downtime_us: u64,
    /// The pause, parking the vCPUs and sending the last dirty pages.
    pub final_round_us: u64,
    /// Saving the state (devices finish the request in hand, disks synced), sending it,
    /// until `Ready`.
    pub state_us: u64,
    /// `Commit` sent until `Running` read.
    pub commit_us: u64,
    /// At the destination: `Commit` read until every vCPU runs.
    pub resume_us: u64,
    pub rounds: Vec<RoundReport>,
    /// Pre-copy bandwidth measured (bytes/s, the last round's).
    pub bandwidth_bps: u64,
    /// The estimate of the state's cost the convergence test used, µs.
    pub state_cost_estimate_us: u64,
    pub bytes_total: u64,
    pub state_bytes: u64,
}

/// Time for the state itself at the switchover, beside the round trips: saving and
/// loading vCPU and device state, a few ms here (see the report's `state_us`).
const STATE_ALLOWANCE: Duration = Duration::from_millis(5);

/// The sha256 of the vCPUs' CPUIDs, in order, as the Hello carries it.
pub fn cpuid_digest(cpuids: &[Vec<kvm_bindings::kvm_cpuid_entry2>]) -> String {
    let mut h = sha2::Sha256::new();
    for (i, entries) in cpuids.iter().enumerate() {
        h.update((i as u32).to_le_bytes());
        for e in entries {
            for v in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
                h.update(v.to_le_bytes());
            }
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Migrate `vm`, which must be running, over `stream` (its timeouts bound every wait for
/// the destination: set them, e.g. `TcpStream::set_read_timeout`). On success the VM runs
/// at the destination and is [`Lifecycle::HandedOver`] here (its RAM is freed once the
/// caller drops it). On failure before the commit it runs on here; after the commit it is
/// [`Lifecycle::InDoubt`], paused.
pub fn send<S: Read + Write>(
    vm: &Vm,
    mut stream: S,
    opts: &SendOptions,
) -> Result<MigrationReport, Failed> {
    let t0 = Instant::now();
    let mut report = MigrationReport {
        vm: vm.name().to_string(),
        ram_bytes: vm.shared.ram.size(),
        ..Default::default()
    };
    let result = Source {
        vm,
        stream: &mut stream,
        opts,
        report: &mut report,
        t0,
    }
    .run();
    report.total_us = t0.elapsed().as_micros() as u64;
    match result {
        Ok(()) => {
            tracing::info!(vm = %report.vm, rounds = report.rounds.len(),
                downtime_us = report.downtime_us, total_us = report.total_us,
                bytes = report.bytes_total, "migrated");
            Ok(report)
        }
        Err((step, error)) => {
            if !matches!(report.end, EndReason::Cancelled { .. }) {
                report.end = EndReason::Failed {
                    step: step.to_string(),
                    error: error.to_string(),
                };
            }
            tracing::warn!(vm = %report.vm, step, error = %error, "migration failed");
            Err(Failed {
                error,
                report: Box::new(report),
            })
        }
    }
}

type Step<T> = Result<T, (&'static str, MigrationError)>;

fn at<E: Into<MigrationError>>(step: &'static str) -> impl Fn(E) -> (&'static str, MigrationError) {
    move |e| (step, e.into())
}

struct Source<'a, S> {
    vm: &'a Vm,
    stream: &'a mut S,
    opts: &'a SendOptions,
    report: &'a mut MigrationReport,
    t0: Instant,
}

impl<S: Read + Write> Source<'_, S> {
    fn run(&mut self) -> Step<()> {
        let vm = self.vm;
        if vm.lifecycle() != Lifecycle::Running {
            return Err(at("check")(MigrationError::NotRunning {
                vm: vm.name().to_string(),
                state: vm.lifecycle().name(),
            }));
        }
        self.hello()?;
        let log = DirtyLog::start(vm).map_err(at("dirty log"));
        let log = match log {
            Ok(log) => log,
            Err(e) => return Err(self.abort(e)),
        };
        let decision = match self.precopy(&log) {
            Ok(d) => d,
            Err(e) => return Err(self.abort(e)),
        };
        let pending = match decision {
            Decision::Switch(pending, reason) => {
                self.report.end = reason;
                pending
            }
            Decision::Cancel(why) => {
                self.report.end = EndReason::Cancelled { why: why.clone() };
                return Err(self.abort(("pre-copy", MigrationError::Cancelled(why))));
            }
        };
        self.switch_over(&log, pending)
    }

    /// Hello, and the destination's answer: nothing has paused, whatever it says.
    fn hello(&mut self) -> Step<()> {
        let spec = self.vm.spec();
        let hello = Hello {
            sender: crate::build(),
            stream_version: STREAM_VERSION,
            state_format: self
                .opts
                .announce_state_format
                .unwrap_or(envelope::FORMAT_VERSION),
            cpuid_digest: cpuid_digest(&spec.cpuids),
            migration_id: self.opts.migration_id.clone(),
            spec,
        };
        stream::write_magic(self.stream).map_err(at("hello"))?;
        self.report.bytes_total +=
            8 + stream::send(self.stream, &Msg::Hello(Box::new(hello))).map_err(at("hello"))?;
        match stream::recv(self.stream).map_err(at("hello"))? {
            Msg::Accepted { receiver } => {
                tracing::info!(vm = %self.vm.name(), %receiver, "destination accepted the VM");
                Ok(())
            }
            Msg::Refused { reason } => Err(("hello", MigrationError::Refused(reason))),
            other => Err(("hello", unexpected("Accepted", &other))),
        }
    }

    /// Send rounds until the rest fits the budget (or the limits are reached).
    fn precopy(&mut self, log: &DirtyLog) -> Step<Decision> {
        let vm = self.vm;
        let ram = &vm.shared.ram;
        let mut set = PageSet::touched(ram).map_err(at("round 0"))?;
        let mut round = 0u32;
        let mut bandwidth = 0f64;
        let mut last_harvest = Instant::now();
        let mut dirty_rate = 0u64;
        loop {
            let t_round = Instant::now();
            let sent = pages::send_set(self.stream, ram, &set, round).map_err(at("pre-copy"))?;
            let t_end = Instant::now();
            let mut bytes = sent.bytes;
            bytes += stream::send(self.stream, &Msg::RoundEnd { round }).map_err(at("pre-copy"))?;
            match stream::recv(self.stream).map_err(at("pre-copy"))? {
                Msg::RoundAck { round: r } if r == round => {}
                Msg::Failed { step, reason } => {
                    return Err((
                        "pre-copy",
                        MigrationError::DestinationFailed { step, reason },
                    ))
                }
                other => return Err(("pre-copy", unexpected("RoundAck", &other))),
            }
            let took = t_round.elapsed();
            let rtt = Instant::now().duration_since(t_end);
            if round == 0 {
                super::faults::hit(super::faults::Point::SourcePrecopy);
            }
            if let Some(hook) = &self.opts.between_rounds {
                (hook.0)(round);
            }
            // A round of a few pages measures latency more than bandwidth: it counts only
            // while nothing better has been measured.
            if took > Duration::ZERO && (bytes > 64 << 10 || bandwidth == 0.0) {
                bandwidth = bytes as f64 / took.as_secs_f64();
            }
            self.report.bytes_total += bytes;
            self.report.rounds.push(RoundReport {
                round,
                pages: sent.pages,
                zero_pages: sent.zero_pages,
                bytes,
                duration_us: took.as_micros() as u64,
                dirty_rate_bps: dirty_rate,
            });
            round += 1;

            set.clear();
            log.harvest(&mut set).map_err(at("pre-copy"))?;
            let since = last_harvest.elapsed();
            last_harvest = Instant::now();
            let remaining = set.pages() * PAGE;
            dirty_rate = (remaining as f64 / since.as_secs_f64().max(1e-6)) as u64;
            // Two round trips (State → Ready, Commit → Running) and the state itself.
            let state_cost = rtt * 2 + STATE_ALLOWANCE;
            self.report.state_cost_estimate_us = state_cost.as_micros() as u64;
            self.report.bandwidth_bps = bandwidth as u64;
            let estimate = if bandwidth > 0.0 {
                Duration::from_secs_f64(remaining as f64 / bandwidth) + state_cost
            } else {
                Duration::MAX
            };
            if let Some(hook) = &self.opts.progress {
                (hook.0)(&Progress {
                    round: self.report.rounds.last().cloned().unwrap_or_default(),
                    bytes_total: self.report.bytes_total,
                    remaining_bytes: remaining,
                    bandwidth_bps: bandwidth as u64,
                    downtime_estimate_us: u64::try_from(estimate.as_micros()).unwrap_or(u64::MAX),
                });
            }
            if remaining == 0 || estimate <= self.opts.downtime {
                return Ok(Decision::Switch(set, EndReason::Converged));
            }
            let limit = if round >= self.opts.max_rounds {
                Some(format!(
                    "{} rounds sent and {} KiB still dirty (dirtied at {} KiB/s, sent at {} KiB/s)",
                    round,
                    remaining >> 10,
                    dirty_rate >> 10,
                    bandwidth as u64 >> 10
                ))
            } else if self.t0.elapsed() >= self.opts.timeout {
                Some(format!(
                    "{} ms passed and {} KiB still dirty",
                    self.opts.timeout.as_millis(),
                    remaining >> 10
                ))
            } else {
                None
            };
            if let Some(why) = limit {
                return Ok(if self.opts.force {
                    Decision::Switch(set, EndReason::Forced)
                } else {
                    Decision::Cancel(why)
                });
            }
        }
    }

    /// Pause, send the rest and the state, and commit.
    fn switch_over(&mut self, log: &DirtyLog, mut pending: PageSet) -> Step<()> {
        let vm = self.vm;
        let t_pause = Instant::now();
        let round = self.report.rounds.len() as u32;
        // Until `Commit` is sent, every failure resumes the VM here.
        let ready = (|| -> Step<()> {
            vm.park_and_save(false);
            let deadline = Instant::now() + VCPU_RESPONSE_TIMEOUT;
            for h in vm.handles() {
                if !h.wait_parked(deadline.saturating_duration_since(Instant::now())) {
                    return Err(("pause", MigrationError::VcpuNotStopped(h.id)));
                }
            }
            // The devices finish the request in hand and stop; what they wrote is in the
            // VMM's log, harvested below.
            let t_state = Instant::now();
            let record = vm
                .save(deadline)
                .map_err(|e| ("save", MigrationError::state(e)))?;
            crate::snapshot::flush_disks(vm)
                .map_err(|e| ("save", MigrationError::Disks(Box::new(e))))?;
            // A guest that powered off (or a VM paused by someone else) meanwhile is not
            // migrated: it is no longer the running VM the destination prepared for.
            if record.lifecycle != crate::state::LifecycleState::Running {
                return Err((
                    "save",
                    MigrationError::NotRunning {
                        vm: vm.name().to_string(),
                        state: vm.lifecycle().name(),
                    },
                ));
            }
            let save_time = t_state.elapsed();

            let t_final = Instant::now();
            log.harvest(&mut pending).map_err(at("final round"))?;
            let sent = pages::send_set(self.stream, &vm.shared.ram, &pending, round)
                .map_err(at("final round"))?;
            self.report.bytes_total += sent.bytes;
            self.report.rounds.push(RoundReport {
                round,
                pages: sent.pages,
                zero_pages: sent.zero_pages,
                bytes: sent.bytes,
                duration_us: t_final.elapsed().as_micros() as u64,
                dirty_rate_bps: 0,
            });
            self.report.final_round_us = (t_state - t_pause + t_final.elapsed()).as_micros() as u64;

            let t_send = Instant::now();
            let bytes = envelope::encode_as(&STATE_KIND, &record, envelope::FORMAT_VERSION)
                .map_err(|e| ("state", MigrationError::state(e)))?;
            self.report.state_bytes = bytes.len() as u64;
            self.report.bytes_total +=
                stream::send(self.stream, &Msg::State { envelope: bytes }).map_err(at("state"))?;
            match stream::recv(self.stream).map_err(at("restore"))? {
                Msg::Ready => {}
                Msg::Failed { step, reason } => {
                    return Err((
                        "restore",
                        MigrationError::DestinationFailed { step, reason },
                    ))
                }
                other => return Err(("restore", unexpected("Ready", &other))),
            }
            self.report.state_us = (save_time + t_send.elapsed()).as_micros() as u64;
            Ok(())
        })();
        if let Err(e) = ready {
            let e = self.abort(e);
            resume_here(vm);
            self.report.downtime_us = t_pause.elapsed().as_micros() as u64;
            return Err(e);
        }
        // The commit point. From the moment `Commit` may have left, this VMM never runs
        // the VM again: without `Running` back it is in doubt, not resumed. It is in doubt
        // already while `Running` is awaited (the destination may run it by then), so no
        // one looking at both hosts ever sees it running here and there.
        *vm.shared.lifecycle() = Lifecycle::InDoubt;
        vm.shared.lifecycle_cv.notify_all();
        let t_commit = Instant::now();
        let committed = stream::send(self.stream, &Msg::Commit).and_then(|_| {
            if super::faults::hit(super::faults::Point::SourceCommitted) {
                return Err(stream::StreamError::Io(std::io::Error::other(
                    "fault injected: the link was cut after Commit",
                )));
            }
            stream::recv(self.stream)
        });
        match committed {
            Ok(Msg::Running { resume_us }) => {
                *vm.shared.lifecycle() = Lifecycle::HandedOver;
                vm.shared.lifecycle_cv.notify_all();
                self.report.commit_us = t_commit.elapsed().as_micros() as u64;
                self.report.resume_us = resume_us;
                self.report.downtime_us = t_pause.elapsed().as_micros() as u64;
                Ok(())
            }
            other => {
                let why = match other {
                    Ok(msg) => format!("it answered {}", msg.name()),
                    Err(e) => e.to_string(),
                };
                tracing::error!(vm = %vm.name(), %why,
                    "migration committed but not confirmed: the VM stays paused, in doubt");
                Err(("commit", MigrationError::InDoubt(why)))
            }
        }
    }

    /// Tell the destination the migration is off (it may be gone: best effort) and hand
    /// the failure on.
    fn abort(
        &mut self,
        (step, error): (&'static str, MigrationError),
    ) -> (&'static str, MigrationError) {
        let reason = format!("{step}: {error}");
        let _ = stream::send(self.stream, &Msg::Abort { reason });
        (step, error)
    }
}

/// Ask the destination, over a new connection `stream` (its timeouts bound the wait),
/// what became of migration `migration_id` of VM `vm`.
pub fn ask<S: Read + Write>(
    mut stream: S,
    vm: &str,
    migration_id: &str,
) -> Result<stream::Outcome, MigrationError> {
    stream::write_magic(&mut stream)?;
    stream::send(
        &mut stream,
        &Msg::Ask {
            vm: vm.to_string(),
            migration_id: migration_id.to_string(),
        },
    )?;
    match stream::recv(&mut stream)? {
        Msg::Answer {
            vm: v,
            migration_id: id,
            outcome,
        } => {
            if v != vm || id != migration_id {
                return Err(MigrationError::OtherAnswer {
                    got: format!("VM {v}, migration {id}"),
                });
            }
            Ok(outcome)
        }
        other => Err(unexpected("Answer", &other)),
    }
}

/// Settle a VM left in doubt by the destination's answer: `Committed` frees it here (it
/// becomes [`Lifecycle::HandedOver`]; its RAM goes with the caller's last reference),
/// `NotCommitted` resumes it here. `Undecided` changes nothing and is an error, as is a VM
/// that is not in doubt.
pub fn settle(vm: &Vm, outcome: stream::Outcome) -> Result<(), MigrationError> {
    let mut lifecycle = vm.shared.lifecycle();
    if *lifecycle != Lifecycle::InDoubt {
        return Err(MigrationError::NotInDoubt {
            vm: vm.name().to_string(),
            state: lifecycle.name(),
        });
    }
    match outcome {
        stream::Outcome::Undecided => return Err(MigrationError::Undecided),
        stream::Outcome::Committed => {
            *lifecycle = Lifecycle::HandedOver;
            tracing::info!(vm = %vm.name(), "the destination runs the VM: the copy in doubt here is freed");
        }
        stream::Outcome::NotCommitted => {
            *lifecycle = Lifecycle::Running;
            tracing::info!(vm = %vm.name(), "the destination never committed: the VM resumes here");
        }
    }
    drop(lifecycle);
    vm.shared.lifecycle_cv.notify_all();
    resume_here(vm);
    Ok(())
}

enum Decision {
    Switch(PageSet, EndReason),
    Cancel(String),
}

fn unexpected(wanted: &'static str, got: &Msg) -> MigrationError {
    match got {
        Msg::Failed { step, reason } => MigrationError::DestinationFailed {
            step: step.clone(),
            reason: reason.clone(),
        },
        Msg::Refused { reason } => MigrationError::Refused(reason.clone()),
        other => MigrationError::Unexpected {
            wanted,
            got: other.name(),
        },
    }
}

/// Let the VM run here again after a failure before the commit (its vCPUs parked by the
/// switchover, its devices paused by the save).
fn resume_here(vm: &Vm) {
    if matches!(vm.lifecycle(), Lifecycle::Running) {
        let _ = Pausable::resume(&vm.shared.devices); // an order: never fails
        for h in vm.handles() {
            h.request_run();
        }
    }
}
