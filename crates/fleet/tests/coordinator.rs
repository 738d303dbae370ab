//! The coordinator's rounds against a real etcd: a whole roll driven by fenced rounds
//! while fake hosts start and finish their steps, with a change of leader in the middle
//! (the new leader takes the plan over where it stands: no step assigned or started
//! twice, the old leader's round writes nothing), and a failed gate that halts the fleet
//! until an operator resumes. Needs root and etcd (skipped without them, failing under
//! `WARMVM_REQUIRE_KVM=1` or `CI`).

mod common;

use common::{keyspace, register, request, with_etcd};
use etcd_client::Client;
use warmvm_fleet::coordinate::{self, round};
use warmvm_fleet::events::{self, EventKind};
use warmvm_fleet::halt;
use warmvm_fleet::lead::{self, Leadership, Session};
use warmvm_fleet::plan::{self, GateResult, PlanStatus, StepOutcome, StepState};
use warmvm_fleet::roll::Action;
use warmvm_fleet::{keys, slots, FleetError};

const STALE_MS: u64 = 60_000;

fn assign(host: &str, wave: u32) -> Action {
    Action::Assign {
        host: host.into(),
        wave,
    }
}

fn gate(passed: bool, detail: &str) -> StepOutcome {
    StepOutcome {
        gates: vec![GateResult {
            gate: "guests-verify".into(),
            passed,
            detail: detail.into(),
        }],
        to_sha256: Some("00".repeat(32)),
        blackout_p99_us: Some(3_000),
        detail: (!passed).then(|| detail.to_string()),
    }
}

/// A host takes a slot (of 1: the plans here have max_unavailable 1) under a lease of its
/// own; its index.
async fn take_slot(c: &mut Client, host: &str) -> u32 {
    let lease = c.lease_grant(60, None).await.unwrap().id();
    slots::take(c, 1, host, lease)
        .await
        .unwrap()
        .expect("a free slot")
}

/// A host does its step: takes a slot, starts the step once, records its gates and gives
/// the slot back.
async fn host_step(c: &mut Client, plan: &str, host: &str, passed: bool) {
    let slot = take_slot(c, host).await;
    plan::start_step(c, plan, host, slot, Some("11".repeat(32)))
        .await
        .unwrap();
    plan::finish_step(c, plan, host, gate(passed, "0 mismatches"))
        .await
        .unwrap();
    assert!(slots::release(c, slot, host).await.unwrap());
}

async fn lead(c: &mut Client, name: &str) -> (Session, Leadership) {
    let s = Session::start(c, 3).await.unwrap();
    let l = lead::campaign(c, name, s.lease).await.unwrap();
    (s, l)
}

#[test]
fn a_new_leader_takes_the_roll_over_where_it_stands_and_no_step_runs_twice() {
    with_etcd("takeover", |options| async move {
        let mut c = options.connect().await.unwrap();
        register(&mut c, &["h0", "h1", "h2"]).await;
        let mut r = request(&["h0", "h1", "h2"]);
        r.soak_secs = 0;
        let id = plan::create_plan(&mut c, &r).await.unwrap().id;

        let mut ca = options.connect().await.unwrap();
        let (sa, la) = lead(&mut ca, "a").await;
        assert_eq!(
            round(&mut ca, &la, "a", STALE_MS).await.unwrap(),
            [assign("h0", 0)]
        );
        assert_eq!(
            round(&mut ca, &la, "a", STALE_MS).await.unwrap(),
            [],
            "h0 is under way"
        );
        host_step(&mut c, &id, "h0", true).await;
        assert_eq!(
            round(&mut ca, &la, "a", STALE_MS).await.unwrap(),
            [Action::WaveDone { wave: 0 }, assign("h1", 1)]
        );
        let h1_slot = take_slot(&mut c, "h1").await;
        plan::start_step(&mut c, &id, "h1", h1_slot, None)
            .await
            .unwrap();

        // Leader a goes (its lease revoked); b leads and goes on from the same state.
        sa.close(&mut ca).await.unwrap();
        let mut cb = options.connect().await.unwrap();
        let (_sb, lb) = lead(&mut cb, "b").await;
        let before = keyspace(&mut c).await;
        let e = round(&mut ca, &la, "a", STALE_MS).await.unwrap_err();
        assert!(matches!(e, FleetError::NotLeader { .. }), "{e}");
        assert_eq!(
            keyspace(&mut c).await,
            before,
            "the old leader's round wrote"
        );
        assert_eq!(
            round(&mut cb, &lb, "b", STALE_MS).await.unwrap(),
            [],
            "h1 is under way"
        );
        // h1's step, started under a, is not started again under b.
        let again = plan::start_step(&mut c, &id, "h1", h1_slot, None)
            .await
            .unwrap_err();
        assert!(
            matches!(again, FleetError::StepNotAssigned { .. }),
            "{again}"
        );
        plan::finish_step(&mut c, &id, "h1", gate(true, "ok"))
            .await
            .unwrap();
        assert!(slots::release(&mut c, h1_slot, "h1").await.unwrap());
        // Now there is something to write: still nothing of the old leader's lands.
        let before = keyspace(&mut c).await;
        let e = round(&mut ca, &la, "a", STALE_MS).await.unwrap_err();
        assert!(matches!(e, FleetError::NotLeader { .. }), "{e}");
        assert_eq!(
            keyspace(&mut c).await,
            before,
            "the old leader's round wrote"
        );
        assert_eq!(
            round(&mut cb, &lb, "b", STALE_MS).await.unwrap(),
            [assign("h2", 1)]
        );
        host_step(&mut c, &id, "h2", true).await;
        assert_eq!(
            round(&mut cb, &lb, "b", STALE_MS).await.unwrap(),
            [Action::WaveDone { wave: 1 }, Action::PlanDone]
        );
        assert_eq!(plan::current_plan(&mut c).await.unwrap(), None);
        let (_, progress, steps) = plan::read_plan(&mut c, &id).await.unwrap().unwrap();
        assert_eq!(progress.status, PlanStatus::Done);
        assert!(
            steps.values().all(|s| s.state == StepState::GatePassed),
            "{steps:?}"
        );
        assert!(coordinate::read_view(&mut c).await.unwrap().is_none());
        assert_eq!(round(&mut cb, &lb, "b", STALE_MS).await.unwrap(), []);

        // The history: each host assigned once and started once, in order.
        let history = events::last(&mut c, 100).await.unwrap();
        for h in ["h0", "h1", "h2"] {
            for kind in [
                EventKind::StepAssigned,
                EventKind::StepStarted,
                EventKind::GatePassed,
            ] {
                let n = history
                    .iter()
                    .filter(|e| e.kind == kind && e.host.as_deref() == Some(h))
                    .count();
                assert_eq!(n, 1, "{h} {kind:?}: {history:#?}");
            }
        }
        assert!(history.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        assert_eq!(history.last().unwrap().kind, EventKind::PlanDone);
    });
}

#[test]
fn a_failed_gate_halts_the_roll_until_an_operator_resumes_past_that_host() {
    with_etcd("gatefail", |options| async move {
        let mut c = options.connect().await.unwrap();
        register(&mut c, &["h0", "h1"]).await;
        let mut r = request(&["h0", "h1"]);
        r.soak_secs = 0;
        let id = plan::create_plan(&mut c, &r).await.unwrap().id;
        let (_s, l) = lead(&mut c, "a").await;
        assert_eq!(
            round(&mut c, &l, "a", STALE_MS).await.unwrap(),
            [assign("h0", 0)]
        );
        host_step(&mut c, &id, "h0", false).await;
        let halted = round(&mut c, &l, "a", STALE_MS).await.unwrap();
        assert!(
            matches!(&halted[..], [Action::Halt { host: Some(h), .. }] if h == "h0"),
            "{halted:?}"
        );
        let h = halt::get(&mut c).await.unwrap().expect("the halt is set");
        assert_eq!(h.by, "a");
        assert!(h.reason.contains("0 mismatches"), "{}", h.reason);
        // Nothing moves while halted.
        assert_eq!(round(&mut c, &l, "a", STALE_MS).await.unwrap(), []);
        assert!(!keys_exist(&mut c, &keys::step(&id, "h1")).await);
        // The operator resumes: h1 goes, h0 is not retried.
        halt::clear(&mut c, "op").await.unwrap().unwrap();
        assert_eq!(
            round(&mut c, &l, "a", STALE_MS).await.unwrap(),
            [
                Action::Resume {
                    acknowledge: vec!["h0".into()]
                },
                Action::WaveDone { wave: 0 },
                assign("h1", 1)
            ]
        );
        host_step(&mut c, &id, "h1", true).await;
        assert_eq!(
            round(&mut c, &l, "a", STALE_MS).await.unwrap(),
            [Action::WaveDone { wave: 1 }, Action::PlanDone]
        );
        let (_, _, steps) = plan::read_plan(&mut c, &id).await.unwrap().unwrap();
        assert_eq!(steps["h0"].state, StepState::Failed);
        assert!(steps["h0"].started_unix_ms.is_some());
    });
}

#[test]
fn a_host_missing_when_its_turn_comes_halts_and_nothing_is_assigned_to_it() {
    with_etcd("missing", |options| async move {
        let mut c = options.connect().await.unwrap();
        register(&mut c, &["h0", "h1"]).await;
        let mut r = request(&["h0", "h1"]);
        r.soak_secs = 0;
        let id = plan::create_plan(&mut c, &r).await.unwrap().id;
        let (_s, l) = lead(&mut c, "a").await;
        round(&mut c, &l, "a", STALE_MS).await.unwrap();
        // h1's daemon goes (its record with its lease) before its turn.
        c.delete(keys::host("h1"), None).await.unwrap();
        host_step(&mut c, &id, "h0", true).await;
        let a = round(&mut c, &l, "a", STALE_MS).await.unwrap();
        assert!(
            matches!(&a[..], [Action::WaveDone { .. }, Action::Halt { host: Some(h), reason }] if h == "h1" && reason.contains("not registered")),
            "{a:?}"
        );
        assert!(!keys_exist(&mut c, &keys::step(&id, "h1")).await);
    });
}

async fn keys_exist(c: &mut Client, key: &str) -> bool {
    !c.get(key, None).await.unwrap().kvs().is_empty()
}

#[test]
fn with_etcd_down_to_a_minority_no_round_and_no_step_start_lands() {
    if !warmvm_testkit::etcd_available("minority") {
        return;
    }
    let rig = std::sync::Arc::new(warmvm_testkit::EtcdCluster::start("minority", 3, false));
    let options = warmvm_fleet::EtcdOptions::new(&rig.endpoints(), None, None, None).unwrap();
    let r2 = rig.clone();
    warmvm_testkit::in_netns(rig.netns(0), move || {
        let rig = r2;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let mut c = options.connect().await.unwrap();
                register(&mut c, &["h0", "h1"]).await;
                let mut r = request(&["h0", "h1"]);
                r.soak_secs = 0;
                let id = plan::create_plan(&mut c, &r).await.unwrap().id;
                let (_s, l) = lead(&mut c, "a").await;
                assert_eq!(
                    round(&mut c, &l, "a", STALE_MS).await.unwrap(),
                    [assign("h0", 0)]
                );
                let slot = take_slot(&mut c, "h0").await;
                let before = keyspace(&mut c).await;

                // Two of three members stop: member 0, reachable, is a minority.
                rig.stop(1);
                rig.stop(2);
                let mut m0 =
                    warmvm_fleet::EtcdOptions::new(&rig.member_endpoint(0), None, None, None)
                        .unwrap()
                        .connect()
                        .await
                        .unwrap();
                let e = plan::start_step(&mut m0, &id, "h0", slot, None)
                    .await
                    .unwrap_err();
                eprintln!("start on a minority: {e}");
                assert!(matches!(e, FleetError::Etcd { .. }), "{e}");
                let e = round(&mut m0, &l, "a", STALE_MS).await.unwrap_err();
                eprintln!("round on a minority: {e}");
                assert!(matches!(e, FleetError::Etcd { .. }), "{e}");

                // Back to a majority: nothing of the above was applied.
                rig.cont(1);
                rig.cont(2);
                assert!(rig.wait_healthy(std::time::Duration::from_secs(20)));
                let mut c = options.connect().await.unwrap();
                // (The leader's own key may be gone: its lease could not be renewed while
                // the majority was away.)
                let without_leader = |kvs: Vec<(String, Vec<u8>, i64)>| {
                    kvs.into_iter()
                        .filter(|(k, _, _)| !k.starts_with(&keys::election()))
                        .collect::<Vec<_>>()
                };
                let after = keyspace(&mut c).await;
                assert!(
                    without_leader(after.1) == without_leader(before.1),
                    "a write on the minority side was applied"
                );
                let (_, _, steps) = plan::read_plan(&mut c, &id).await.unwrap().unwrap();
                assert_eq!(steps["h0"].state, StepState::Assigned);
            })
    });
}
