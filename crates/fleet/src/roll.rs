//! The coordinator's decisions, as a pure function of what it reads from etcd: the plan,
//! where it stands, its steps, the registered hosts and the halt. No etcd here: a new
//! leader that reads the same state decides the same, so a change of leader neither
//! repeats nor skips a step; and every rule can be tested alone.
//!
//! The waves: the first `canary` hosts (wave 0), then a soak of `soak_secs` once they all
//! passed their gates, then the rest (wave 1). In both, at most `max_unavailable` hosts
//! are in a step at once. A host is assigned only while its membership record is there,
//! fresh and healthy; otherwise the plan's policy halts the fleet or skips the host. A
//! host gets one step per plan, ever. Nothing is decided while the fleet is halted, and a
//! failed gate halts it.

use std::collections::BTreeMap;

use crate::events::{Event, EventKind};
use crate::halt::HaltRecord;
use crate::plan::{MissingHost, PlanProgress, PlanSpec, PlanStatus, StepRecord, StepState};
use crate::records::{Health, HostRecord, FORMAT};

/// What the coordinator reads, at one moment.
#[derive(Clone, Copy, Debug)]
pub struct RollState<'a> {
    pub spec: &'a PlanSpec,
    pub progress: &'a PlanProgress,
    /// The plan's steps by host.
    pub steps: &'a BTreeMap<String, StepRecord>,
    /// The registered hosts' records by name.
    pub hosts: &'a BTreeMap<String, HostRecord>,
    /// The halt key is set.
    pub halted: bool,
    pub now_unix_ms: u64,
    /// A host record older than this is stale (its daemon stopped refreshing it).
    pub stale_after_ms: u64,
}

/// One thing the coordinator does next. It applies them in order, each by a fenced
/// transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The halt key was set (by a host whose gate failed, or an operator): the plan's
    /// progress says halted too, so that a resume is seen as one.
    MarkHalted,
    /// An operator resumed: the plan runs again, and the failed hosts are not retried.
    Resume { acknowledge: Vec<String> },
    /// Write the host's step as assigned (only where it has none).
    Assign { host: String, wave: u32 },
    /// Record the host as skipped (it is missing, and the plan says skip).
    Skip { host: String, reason: String },
    /// The wave's hosts all passed (or were skipped).
    WaveDone { wave: u32 },
    /// The soak after the canary begins; the rest waits until then.
    StartSoak { until_unix_ms: u64 },
    /// Set the halt: no host starts a step until an operator resumes.
    Halt {
        host: Option<String>,
        reason: String,
    },
    /// Every host passed: the plan is done (and no longer the current plan).
    PlanDone,
}

/// Why a host cannot be assigned now, if it cannot.
pub fn unavailable(state: &RollState<'_>, host: &str) -> Option<String> {
    let Some(record) = state.hosts.get(host) else {
        return Some(format!(
            "host {host} is not registered (its daemon is gone or cut off)"
        ));
    };
    let age = state.now_unix_ms.saturating_sub(record.updated_unix_ms);
    if age > state.stale_after_ms {
        return Some(format!(
            "host {host}'s record is {} s old (its daemon stopped refreshing it)",
            age / 1000
        ));
    }
    match &record.health {
        Health::Ok => None,
        Health::Busy => Some(format!(
            "host {host} is busy (a reboot or migration is under way)"
        )),
        Health::Degraded(why) => Some(format!("host {host} is degraded: {why}")),
    }
}

/// The next actions; empty when there is nothing to do now (waiting on steps, the soak,
/// or an operator).
pub fn next_actions(state: &RollState<'_>) -> Vec<Action> {
    let mut actions = Vec::new();
    // Failed hosts an operator resumed past (before, or by the resume decided now).
    let mut acknowledged_failures = state.progress.acknowledged_failures.clone();
    match state.progress.status {
        PlanStatus::Running if state.halted => {
            actions.push(Action::MarkHalted);
            return actions;
        }
        PlanStatus::Running => {}
        PlanStatus::Halted if !state.halted => {
            let acknowledge: Vec<String> = state
                .steps
                .values()
                .filter(|s| {
                    s.state == StepState::Failed && !acknowledged_failures.contains(&s.host)
                })
                .map(|s| s.host.clone())
                .collect();
            acknowledged_failures.extend(acknowledge.iter().cloned());
            actions.push(Action::Resume { acknowledge });
        }
        PlanStatus::Halted | PlanStatus::Done | PlanStatus::Aborted => return actions,
    }
    if state.halted {
        return actions;
    }
    let acknowledged = |host: &str| acknowledged_failures.iter().any(|h| h == host);
    // A failed gate nobody has resumed past halts the fleet.
    if let Some(failed) = state
        .steps
        .values()
        .find(|s| s.state == StepState::Failed && !acknowledged(&s.host))
    {
        actions.push(Action::Halt {
            host: Some(failed.host.clone()),
            reason: format!(
                "step {} failed: {}",
                failed.id(),
                failed.detail.as_deref().unwrap_or("its gate did not pass")
            ),
        });
        return actions;
    }
    let finished = |host: &str| {
        state.steps.get(host).is_some_and(|s| {
            matches!(s.state, StepState::GatePassed | StepState::Skipped)
                || (s.state == StepState::Failed && acknowledged(host))
        })
    };
    let canary = (state.spec.canary as usize).min(state.spec.hosts.len());
    let (canaries, rest) = state.spec.hosts.split_at(canary);
    let wave = if canaries.iter().all(|h| finished(h)) {
        1
    } else {
        0
    };
    if wave == 1 && state.progress.wave == 0 {
        actions.push(Action::WaveDone { wave: 0 });
        if !rest.is_empty() && state.spec.soak_secs > 0 {
            actions.push(Action::StartSoak {
                until_unix_ms: state.now_unix_ms + state.spec.soak_secs * 1000,
            });
            return actions;
        }
    }
    if wave == 1 {
        if let Some(until) = state.progress.soak_until_unix_ms {
            if state.now_unix_ms < until {
                return actions;
            }
        }
        if rest.iter().all(|h| finished(h)) {
            if !rest.is_empty() {
                actions.push(Action::WaveDone { wave: 1 });
            }
            actions.push(Action::PlanDone);
            return actions;
        }
    }
    let hosts = if wave == 0 { canaries } else { rest };
    // The budget counts every host of the plan in a step, whatever its wave.
    let mut in_flight = state.steps.values().filter(|s| s.state.in_flight()).count();
    let budget = state.spec.max_unavailable as usize;
    for host in hosts {
        if in_flight >= budget {
            break;
        }
        // One step per host per plan, ever: a host with a step is never assigned again,
        // whatever that step's state.
        if state.steps.contains_key(host) {
            continue;
        }
        if let Some(why) = unavailable(state, host) {
            match state.spec.on_missing_host {
                MissingHost::Halt => {
                    actions.push(Action::Halt {
                        host: Some(host.clone()),
                        reason: why,
                    });
                    return actions;
                }
                MissingHost::Skip => {
                    actions.push(Action::Skip {
                        host: host.clone(),
                        reason: why,
                    });
                    continue;
                }
            }
        }
        actions.push(Action::Assign {
            host: host.clone(),
            wave,
        });
        in_flight += 1;
    }
    actions
}

/// What one decision writes, all in one fenced transaction (see `coordinate`).
#[derive(Clone, Debug, PartialEq)]
pub struct Writes {
    pub progress: PlanProgress,
    /// Steps new to the store (assigned or skipped): each lands only where its host has
    /// none yet.
    pub new_steps: Vec<StepRecord>,
    /// The halt to set, where none is set yet.
    pub halt: Option<HaltRecord>,
    /// The plan is over: it is no longer the current plan.
    pub done: bool,
    /// The history of it, appended once the rest landed.
    pub events: Vec<Event>,
}

/// The records that `actions`, decided on `state`, write; `by` names the coordinator.
pub fn writes(state: &RollState<'_>, actions: &[Action], by: &str) -> Writes {
    let now = state.now_unix_ms;
    let plan = state.spec.id.as_str();
    let mut progress = state.progress.clone();
    progress.updated_unix_ms = now;
    let mut w = Writes {
        progress,
        new_steps: Vec::new(),
        halt: None,
        done: false,
        events: Vec::new(),
    };
    for (host, step) in state.steps {
        w.progress.steps.insert(host.clone(), step.state);
    }
    let event = |kind| Event::new(kind, now).plan(plan);
    for a in actions {
        match a {
            Action::MarkHalted => w.progress.status = PlanStatus::Halted,
            Action::Resume { acknowledge } => {
                w.progress.status = PlanStatus::Running;
                for h in acknowledge {
                    if !w.progress.acknowledged_failures.contains(h) {
                        w.progress.acknowledged_failures.push(h.clone());
                    }
                }
            }
            Action::Assign { host, wave } => {
                let step = StepRecord::assigned(plan, host, *wave, now);
                w.progress.steps.insert(host.clone(), StepState::Assigned);
                w.events.push(
                    event(EventKind::StepAssigned)
                        .host(host)
                        .step(&step.id())
                        .detail(format!("wave {wave}")),
                );
                w.new_steps.push(step);
            }
            Action::Skip { host, reason } => {
                let mut step = StepRecord::assigned(plan, host, w.progress.wave, now);
                step.state = StepState::Skipped;
                step.finished_unix_ms = Some(now);
                step.detail = Some(reason.clone());
                w.progress.steps.insert(host.clone(), StepState::Skipped);
                w.events.push(
                    event(EventKind::HostSkipped)
                        .host(host)
                        .step(&step.id())
                        .detail(reason.clone()),
                );
                w.new_steps.push(step);
            }
            Action::WaveDone { wave } => {
                w.progress.wave = wave + 1;
                w.events
                    .push(event(EventKind::WaveDone).detail(format!("wave {wave} done")));
            }
            Action::StartSoak { until_unix_ms } => {
                w.progress.soak_until_unix_ms = Some(*until_unix_ms);
                w.events.push(
                    event(EventKind::SoakStarted)
                        .detail(format!("soak of {} s", state.spec.soak_secs)),
                );
            }
            Action::Halt { host, reason } => {
                w.progress.status = PlanStatus::Halted;
                w.halt = Some(HaltRecord {
                    format: FORMAT,
                    by: by.into(),
                    plan: Some(plan.into()),
                    host: host.clone(),
                    reason: reason.clone(),
                    at_unix_ms: now,
                });
                let mut e = event(EventKind::Halted).detail(format!("by {by}: {reason}"));
                e.host = host.clone();
                w.events.push(e);
            }
            Action::PlanDone => {
                w.progress.status = PlanStatus::Done;
                w.done = true;
                w.events.push(
                    event(EventKind::PlanDone)
                        .detail(format!("{} host(s)", state.spec.hosts.len())),
                );
            }
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Mode, PlanProgress};
    use crate::records::Build;

    const NOW: u64 = 1_000_000;

    fn spec(n: usize, canary: u32, max_unavailable: u32, soak_secs: u64) -> PlanSpec {
        PlanSpec {
            format: FORMAT,
            id: "plan-1".into(),
            mode: Mode::Warm,
            target: None,
            canary,
            max_unavailable,
            soak_secs,
            hosts: (0..n).map(|i| format!("h{i}")).collect(),
            blackout_p99_limit_us: 50_000,
            on_missing_host: MissingHost::Halt,
            created_unix_ms: 0,
            created_by: "op".into(),
        }
    }

    fn host(name: &str, updated: u64) -> HostRecord {
        HostRecord {
            format: FORMAT,
            name: name.into(),
            build: Build {
                version: "0.1.0".into(),
                git_commit: "c".into(),
                sha256: "00".repeat(32),
                path: "/usr/bin/warmvm".into(),
            },
            pid: 1,
            updated_unix_ms: updated,
            health: Health::Ok,
            vms: Vec::new(),
            aging: None,
            migration_addr: None,
            last_reboot: None,
        }
    }

    /// A fleet in which every plan host is registered and fresh.
    struct Fleet {
        spec: PlanSpec,
        progress: PlanProgress,
        steps: BTreeMap<String, StepRecord>,
        hosts: BTreeMap<String, HostRecord>,
        halted: bool,
        now: u64,
    }

    impl Fleet {
        fn new(spec: PlanSpec) -> Fleet {
            let hosts = spec
                .hosts
                .iter()
                .map(|h| (h.clone(), host(h, NOW)))
                .collect();
            Fleet {
                progress: PlanProgress::new(&spec.id, 0),
                spec,
                steps: BTreeMap::new(),
                hosts,
                halted: false,
                now: NOW,
            }
        }

        fn next(&self) -> Vec<Action> {
            next_actions(&RollState {
                spec: &self.spec,
                progress: &self.progress,
                steps: &self.steps,
                hosts: &self.hosts,
                halted: self.halted,
                now_unix_ms: self.now,
                stale_after_ms: 15_000,
            })
        }

        /// Time passes; the daemons refresh their records meanwhile.
        fn tick(&mut self, now: u64) {
            self.now = now;
            for h in self.hosts.values_mut() {
                h.updated_unix_ms = now;
            }
        }

        fn set(&mut self, host: &str, state: StepState) {
            let mut s = StepRecord::assigned("plan-1", host, 0, self.now);
            s.state = state;
            self.steps.insert(host.into(), s);
        }

        /// Apply actions as the coordinator would (steps as assigned, progress as said).
        fn apply(&mut self, actions: &[Action]) {
            for a in actions {
                match a {
                    Action::MarkHalted => self.progress.status = PlanStatus::Halted,
                    Action::Resume { acknowledge } => {
                        self.progress.status = PlanStatus::Running;
                        self.progress
                            .acknowledged_failures
                            .extend(acknowledge.iter().cloned());
                    }
                    Action::Assign { host, wave } => {
                        assert!(!self.steps.contains_key(host), "{host} assigned twice");
                        self.steps.insert(
                            host.clone(),
                            StepRecord::assigned("plan-1", host, *wave, self.now),
                        );
                    }
                    Action::Skip { host, .. } => self.set(host, StepState::Skipped),
                    Action::WaveDone { wave } => self.progress.wave = wave + 1,
                    Action::StartSoak { until_unix_ms } => {
                        self.progress.soak_until_unix_ms = Some(*until_unix_ms)
                    }
                    Action::Halt { .. } => {
                        self.halted = true;
                        self.progress.status = PlanStatus::Halted;
                    }
                    Action::PlanDone => self.progress.status = PlanStatus::Done,
                }
            }
        }

        fn step_then_pass(&mut self) {
            let hosts: Vec<String> = self
                .steps
                .values()
                .filter(|s| s.state.in_flight())
                .map(|s| s.host.clone())
                .collect();
            for h in hosts {
                self.set(&h, StepState::GatePassed);
            }
        }
    }

    fn assign(host: &str, wave: u32) -> Action {
        Action::Assign {
            host: host.into(),
            wave,
        }
    }

    #[test]
    fn the_canary_goes_alone_then_the_soak_then_the_rest_within_the_budget() {
        let mut f = Fleet::new(spec(5, 1, 2, 60));
        let a = f.next();
        assert_eq!(a, [assign("h0", 0)]);
        f.apply(&a);
        // The canary is under way: nothing else starts, however large the budget.
        assert_eq!(f.next(), []);
        f.set("h0", StepState::Started);
        assert_eq!(f.next(), []);
        f.step_then_pass();
        let a = f.next();
        assert_eq!(
            a,
            [
                Action::WaveDone { wave: 0 },
                Action::StartSoak {
                    until_unix_ms: NOW + 60_000
                }
            ]
        );
        f.apply(&a);
        f.tick(NOW + 59_999);
        assert_eq!(f.next(), [], "the rest waits for the soak");
        f.tick(NOW + 60_000);
        let a = f.next();
        assert_eq!(a, [assign("h1", 1), assign("h2", 1)]);
        f.apply(&a);
        assert_eq!(f.next(), [], "the budget of 2 is used");
        f.set("h1", StepState::GatePassed);
        let a = f.next();
        assert_eq!(a, [assign("h3", 1)]);
        f.apply(&a);
        f.step_then_pass();
        let a = f.next();
        assert_eq!(a, [assign("h4", 1)]);
        f.apply(&a);
        f.step_then_pass();
        assert_eq!(f.next(), [Action::WaveDone { wave: 1 }, Action::PlanDone]);
        f.apply(&f.next());
        assert_eq!(f.next(), [], "a done plan decides nothing");
    }

    #[test]
    fn several_canaries_share_the_budget_and_no_soak_goes_straight_on() {
        let mut f = Fleet::new(spec(4, 3, 2, 0));
        let a = f.next();
        assert_eq!(a, [assign("h0", 0), assign("h1", 0)]);
        f.apply(&a);
        f.set("h0", StepState::GatePassed);
        let a = f.next();
        assert_eq!(a, [assign("h2", 0)]);
        f.apply(&a);
        f.step_then_pass();
        // No soak: the wave ends and the rest begins in the same decision.
        assert_eq!(f.next(), [Action::WaveDone { wave: 0 }, assign("h3", 1)]);
    }

    #[test]
    fn a_plan_of_canaries_only_is_done_after_them_without_a_soak() {
        let mut f = Fleet::new(spec(1, 1, 1, 600));
        f.apply(&f.next());
        f.step_then_pass();
        assert_eq!(f.next(), [Action::WaveDone { wave: 0 }, Action::PlanDone]);
    }

    #[test]
    fn a_failed_gate_halts_and_nothing_is_decided_while_halted() {
        let mut f = Fleet::new(spec(3, 1, 1, 0));
        f.apply(&f.next());
        f.set("h0", StepState::Failed);
        f.steps.get_mut("h0").unwrap().detail = Some("blackout 90 ms over 50 ms".into());
        let a = f.next();
        assert_eq!(
            a,
            [Action::Halt {
                host: Some("h0".into()),
                reason: "step plan-1/h0 failed: blackout 90 ms over 50 ms".into()
            }]
        );
        f.apply(&a);
        assert_eq!(f.next(), []);
        // The halt key set by a host, before the coordinator saw any failure, stops it too:
        // the progress says so, and then nothing is decided until it is cleared.
        let mut g = Fleet::new(spec(3, 1, 1, 0));
        g.apply(&g.next());
        g.set("h0", StepState::Failed);
        g.halted = true;
        assert_eq!(g.next(), [Action::MarkHalted]);
        g.apply(&g.next());
        assert_eq!(g.next(), []);
        g.halted = false;
        assert!(matches!(&g.next()[0], Action::Resume { acknowledge } if acknowledge == &["h0"]));
    }

    #[test]
    fn resuming_goes_on_past_the_failed_host_without_retrying_it() {
        let mut f = Fleet::new(spec(3, 1, 1, 0));
        f.apply(&f.next());
        f.set("h0", StepState::Failed);
        f.apply(&f.next());
        assert!(f.halted);
        // The operator resumes: the halt key is gone, the progress still says halted.
        f.halted = false;
        let a = f.next();
        assert_eq!(
            a,
            [
                Action::Resume {
                    acknowledge: vec!["h0".into()]
                },
                Action::WaveDone { wave: 0 },
                assign("h1", 1)
            ]
        );
        f.apply(&a);
        assert_eq!(f.next(), [], "h1 is under way; h0 is never retried");
    }

    #[test]
    fn a_missing_stale_or_unhealthy_host_is_never_assigned_and_halts_by_default() {
        for (what, change) in [
            (
                "not registered",
                Box::new(|f: &mut Fleet| {
                    f.hosts.remove("h0");
                }) as Box<dyn Fn(&mut Fleet)>,
            ),
            (
                "s old",
                Box::new(|f: &mut Fleet| {
                    f.hosts.get_mut("h0").unwrap().updated_unix_ms = NOW - 16_000
                }),
            ),
            (
                "degraded: vm a failed",
                Box::new(|f: &mut Fleet| {
                    f.hosts.get_mut("h0").unwrap().health = Health::Degraded("vm a failed".into())
                }),
            ),
            (
                "busy",
                Box::new(|f: &mut Fleet| f.hosts.get_mut("h0").unwrap().health = Health::Busy),
            ),
        ] {
            let mut f = Fleet::new(spec(3, 1, 1, 0));
            change(&mut f);
            let a = f.next();
            match a.as_slice() {
                [Action::Halt {
                    host: Some(h),
                    reason,
                }] => {
                    assert_eq!(h, "h0");
                    assert!(reason.contains(what), "{reason:?} lacks {what:?}");
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_missing_host_is_skipped_when_the_plan_says_so() {
        let mut s = spec(4, 1, 2, 0);
        s.on_missing_host = MissingHost::Skip;
        let mut f = Fleet::new(s);
        f.hosts.remove("h2");
        f.apply(&f.next());
        f.step_then_pass();
        let a = f.next();
        assert!(
            matches!(&a[..], [Action::WaveDone { wave: 0 }, Action::Assign { host, .. }, Action::Skip { host: skipped, .. }, Action::Assign { host: h3, .. }] if host == "h1" && skipped == "h2" && h3 == "h3"),
            "{a:?}"
        );
        f.apply(&a);
        f.step_then_pass();
        assert_eq!(f.next(), [Action::WaveDone { wave: 1 }, Action::PlanDone]);
    }

    #[test]
    fn a_step_already_started_is_never_reassigned_after_a_leader_change() {
        // The first leader assigned h1 and h2; h1 started; then the leader died. The new
        // leader reads the same state from etcd and decides exactly what the first would.
        let mut f = Fleet::new(spec(4, 1, 2, 0));
        f.apply(&f.next());
        f.step_then_pass();
        f.apply(&f.next());
        f.set("h1", StepState::Started);
        let before = f.next();
        let new_leader = Fleet {
            spec: f.spec.clone(),
            progress: f.progress.clone(),
            steps: f.steps.clone(),
            hosts: f.hosts.clone(),
            halted: f.halted,
            now: f.now + 7_000,
        };
        let after = new_leader.next();
        assert_eq!(before, after);
        assert_eq!(after, [], "h1 started and h2 assigned fill the budget of 2");
        for a in &after {
            if let Action::Assign { host, .. } = a {
                assert!(host != "h1" && host != "h2", "{host} reassigned");
            }
        }
        // Even with the budget free (h2 done), h1, still started, is not assigned again.
        let mut f = new_leader;
        f.set("h2", StepState::GatePassed);
        assert_eq!(f.next(), [assign("h3", 1)]);
    }

    #[test]
    fn a_host_record_going_away_mid_step_assigns_nobody_else_in_its_place() {
        let mut f = Fleet::new(spec(3, 1, 1, 0));
        f.apply(&f.next());
        f.set("h0", StepState::Started);
        // h0's daemon is rebooting: its record may be gone for a moment. Its step holds the
        // budget; no other host starts.
        f.hosts.remove("h0");
        assert_eq!(f.next(), []);
    }

    #[test]
    fn a_decision_writes_its_steps_progress_halt_and_events_together() {
        let mut f = Fleet::new(spec(3, 1, 2, 30));
        f.apply(&f.next());
        f.step_then_pass();
        let state = RollState {
            spec: &f.spec,
            progress: &f.progress,
            steps: &f.steps,
            hosts: &f.hosts,
            halted: false,
            now_unix_ms: NOW,
            stale_after_ms: 15_000,
        };
        let a = next_actions(&state);
        let w = writes(&state, &a, "coordinator:h2");
        assert_eq!(w.progress.wave, 1);
        assert_eq!(w.progress.soak_until_unix_ms, Some(NOW + 30_000));
        assert_eq!(w.progress.steps["h0"], StepState::GatePassed);
        assert!(w.new_steps.is_empty() && w.halt.is_none() && !w.done);
        let kinds: Vec<_> = w.events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::WaveDone, EventKind::SoakStarted]);

        let halt = [Action::Halt {
            host: Some("h1".into()),
            reason: "h1 is gone".into(),
        }];
        let w = writes(&state, &halt, "coordinator:h2");
        let h = w.halt.unwrap();
        assert_eq!(
            (h.by.as_str(), h.host.as_deref(), h.plan.as_deref()),
            ("coordinator:h2", Some("h1"), Some("plan-1"))
        );
        assert_eq!(w.progress.status, PlanStatus::Halted);

        let assign = [
            assign("h1", 1),
            Action::Skip {
                host: "h2".into(),
                reason: "gone".into(),
            },
        ];
        let w = writes(&state, &assign, "c");
        assert_eq!(w.new_steps.len(), 2);
        assert_eq!(
            (w.new_steps[0].host.as_str(), w.new_steps[0].state),
            ("h1", StepState::Assigned)
        );
        assert_eq!(
            (w.new_steps[1].host.as_str(), w.new_steps[1].state),
            ("h2", StepState::Skipped)
        );
        assert_eq!(w.progress.steps["h2"], StepState::Skipped);
        assert!(writes(&state, &[Action::PlanDone], "c").done);
    }
}
