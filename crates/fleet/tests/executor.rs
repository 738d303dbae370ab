//! A host's step executor against a real etcd, with a fake daemon (its record and its
//! reboot requests are the test's): a plan's binary whose sha256 on disk is not the plan's
//! fails the step and halts the fleet without asking for a reboot; a reboot that fails
//! does the same, and the slot is given back either way; so does a step found started by a
//! daemon that did not come from its reboot. Needs root and etcd (skipped
//! without them, failing under `WARMVM_REQUIRE_KVM=1` or `CI`).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{host_record, register, request, with_etcd};
use etcd_client::Client;
use warmvm_fleet::executor::{Executor, RebootAsk};
use warmvm_fleet::lead::{self, Session};
use warmvm_fleet::plan::{self, Mode, StepRecord, StepState};
use warmvm_fleet::{coordinate, halt, keys, slots};

/// Run one coordinator round as leader `a`: the canary h0 is assigned.
async fn assign_canary(c: &mut Client) -> Session {
    let s = Session::start(c, 10).await.unwrap();
    let l = lead::campaign(c, "a", s.lease).await.unwrap();
    let actions = coordinate::round(c, &l, "a", 60_000).await.unwrap();
    assert!(!actions.is_empty(), "nothing assigned");
    s
}

async fn step(c: &mut Client, plan: &str, host: &str) -> StepRecord {
    let kv = c.get(keys::step(plan, host), None).await.unwrap();
    let kv = kv.kvs().first().expect("the step is there").clone();
    serde_json::from_slice(kv.value()).unwrap()
}

/// Start h0's executor with a fake daemon; its reboot requests arrive on the receiver.
async fn executor(c: &Client) -> (std_mpsc::Receiver<RebootAsk>, tokio::task::JoinHandle<()>) {
    let mut c = c.clone();
    let lease = c.lease_grant(60, None).await.unwrap().id();
    let (tx, rx) = std_mpsc::channel();
    let e = Executor {
        host: "h0".into(),
        lease,
        record: Arc::new(Mutex::new(Box::new(|| Some(host_record("h0"))))),
        reboots: tx,
        busy: Arc::new(AtomicBool::new(false)),
    };
    (rx, tokio::spawn(e.run(c)))
}

async fn wait_failed(c: &mut Client, plan: &str) -> StepRecord {
    for _ in 0..100 {
        let s = step(c, plan, "h0").await;
        if s.state == StepState::Failed {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the step never failed: {:?}", step(c, plan, "h0").await);
}

#[test]
fn a_binary_that_changed_on_disk_fails_the_step_and_halts_with_no_reboot() {
    with_etcd("exec-sha", |options| async move {
        let mut c = options.connect().await.unwrap();
        register(&mut c, &["h0", "h1"]).await;
        let dir = warmvm_testkit::scratch("fleet-exec-sha");
        let binary = dir.join("warmvm-next");
        std::fs::write(&binary, b"abc").unwrap();
        let mut r = request(&["h0", "h1"]);
        r.binary = Some(binary.display().to_string());
        r.sha256 = Some(plan::file_sha256(&binary).unwrap());
        let id = plan::create_plan(&mut c, &r).await.unwrap().id;
        let _leader = assign_canary(&mut c).await;
        // The staged build changes after the plan was stored.
        std::fs::write(&binary, b"abd").unwrap();
        let (asks, task) = executor(&c).await;
        let s = wait_failed(&mut c, &id).await;
        task.abort();
        assert_eq!(s.gates.len(), 1, "{s:?}");
        assert_eq!(s.gates[0].gate, "binary");
        assert!(s.detail.as_deref().unwrap().contains("sha256"), "{s:?}");
        assert_eq!(s.from_sha256.as_deref(), Some(&*"00".repeat(32)));
        assert_eq!(s.from_path.as_deref(), Some("/usr/bin/warmvm"));
        assert!(asks.try_recv().is_err(), "a reboot was asked for");
        let h = halt::get(&mut c).await.unwrap().expect("halted");
        assert_eq!(h.host.as_deref(), Some("h0"));
        assert_eq!(h.plan.as_deref(), Some(id.as_str()));
        assert!(slots::holders(&mut c).await.unwrap().is_empty());
        assert!(
            c.get(keys::step(&id, "h1"), None)
                .await
                .unwrap()
                .kvs()
                .is_empty(),
            "h1 was assigned"
        );
    });
}

#[test]
fn a_reboot_that_fails_leaves_the_old_build_fails_the_step_and_halts() {
    with_etcd("exec-reboot", |options| async move {
        let mut c = options.connect().await.unwrap();
        register(&mut c, &["h0", "h1"]).await;
        // A rejuvenation: no target build.
        let id = plan::create_plan(&mut c, &request(&["h0", "h1"]))
            .await
            .unwrap()
            .id;
        let _leader = assign_canary(&mut c).await;
        let (asks, task) = executor(&c).await;
        let mut ask = None;
        for _ in 0..100 {
            if let Ok(a) = asks.try_recv() {
                ask = Some(a);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ask = ask.expect("no reboot was asked for within 10 s");
        assert_eq!(ask.mode, Mode::Warm);
        assert_eq!(
            ask.binary, None,
            "a rejuvenation reboots onto the daemon's own build"
        );
        assert!(ask.busy.load(Ordering::SeqCst));
        let started = step(&mut c, &id, "h0").await;
        assert_eq!(started.state, StepState::Started);
        assert_eq!(started.vms_before, Vec::<String>::new());
        assert_eq!(
            slots::holders(&mut c).await.unwrap(),
            [(0, "h0".to_string())]
        );
        // The daemon says the new process refused the state.
        ask.busy.store(false, Ordering::SeqCst);
        ask.done
            .send(Err("the new daemon refused the handover".into()))
            .unwrap();
        let s = wait_failed(&mut c, &id).await;
        task.abort();
        assert!(
            s.detail
                .as_deref()
                .unwrap()
                .contains("refused the handover"),
            "{s:?}"
        );
        assert!(halt::get(&mut c).await.unwrap().is_some());
        assert!(slots::holders(&mut c).await.unwrap().is_empty());
    });
}

#[test]
fn a_started_step_whose_daemon_did_not_come_from_its_reboot_fails_and_halts() {
    with_etcd("exec-orphan", |options| async move {
        let mut c = options.connect().await.unwrap();
        register(&mut c, &["h0", "h1"]).await;
        let id = plan::create_plan(&mut c, &request(&["h0", "h1"]))
            .await
            .unwrap()
            .id;
        let _leader = assign_canary(&mut c).await;
        // The daemon that started the step is gone before its reboot; this one (no reboot
        // in its record) was started afresh.
        let lease = c.lease_grant(60, None).await.unwrap().id();
        let slot = slots::take(&mut c, 1, "h0", lease).await.unwrap().unwrap();
        plan::start_step(&mut c, &id, "h0", slot, Some("00".repeat(32)))
            .await
            .unwrap();
        let (asks, task) = executor(&c).await;
        let s = wait_failed(&mut c, &id).await;
        task.abort();
        assert!(
            s.detail
                .as_deref()
                .unwrap()
                .contains("did not come from its reboot"),
            "{s:?}"
        );
        assert!(asks.try_recv().is_err(), "a reboot was asked for");
        assert!(halt::get(&mut c).await.unwrap().is_some());
        assert!(slots::holders(&mut c).await.unwrap().is_empty());
    });
}
