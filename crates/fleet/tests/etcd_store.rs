//! The fleet's store against a real etcd (the test kit's rig, one member in a network
//! namespace of its own; each test connects from inside that namespace): the election and
//! its fencing, plans refused with nothing stored, steps started once, slots, the halt
//! and the event history. They need root and etcd (skipped without it, failing under
//! `WARMVM_REQUIRE_KVM=1` or `CI`).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{keyspace, register, request, value, with_etcd};
use etcd_client::{GetOptions, TxnOp};
use warmvm_fleet::events::{self, Event, EventKind};
use warmvm_fleet::halt::{self, HaltChange, HaltRecord, HaltWatch};
use warmvm_fleet::lead::{self, Session};
use warmvm_fleet::plan::{self, PlanRequest, StepRecord, StepState};
use warmvm_fleet::records::encode;
use warmvm_fleet::{keys, slots, FleetError};

const TTL: i64 = 3;

#[test]
fn one_candidate_leads_and_another_takes_over_when_its_lease_is_revoked_or_it_is_dropped() {
    with_etcd("elect", |options| async move {
        let mut c1 = options.connect().await.unwrap();
        let s1 = Session::start(&c1, TTL).await.unwrap();
        let l1 = lead::campaign(&mut c1, "one", s1.lease).await.unwrap();
        assert_eq!(lead::leader(&mut c1).await.unwrap().as_deref(), Some("one"));
        assert!(l1.key_text().starts_with(&keys::election()));

        // Two more candidates wait in line, each on its own connection.
        let mut waiters = Vec::new();
        for name in ["two", "three"] {
            let c = options.connect().await.unwrap();
            let s = Session::start(&c, TTL).await.unwrap();
            let mut cc = c.clone();
            let lease = s.lease;
            let task = tokio::spawn(async move {
                (lead::campaign(&mut cc, name, lease).await, Instant::now())
            });
            waiters.push((name, c, s, task));
        }
        // Longer than a call's deadline: the campaigns are repeated, and neither leads.
        tokio::time::sleep(Duration::from_secs(4)).await;
        for (name, _, _, task) in &waiters {
            assert!(!task.is_finished(), "{name} leads while one does");
        }
        assert!(l1.still_leads(&mut c1).await.unwrap());

        // The leader's lease is revoked: a waiting candidate leads within TTL + 3 s (which
        // one depends on their places in line, which each repeated call may change).
        let revoked = Instant::now();
        s1.close(&mut c1).await.unwrap();
        let deadline = revoked + Duration::from_secs(TTL as u64 + 3);
        let winner = loop {
            if let Some(i) = waiters.iter().position(|(_, _, _, t)| t.is_finished()) {
                break i;
            }
            assert!(
                Instant::now() < deadline,
                "no candidate leads within TTL + 3 s of the revoke"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (name, mut c2, s2, task) = waiters.remove(winner);
        let (l2, at) = task.await.unwrap();
        let l2 = l2.unwrap();
        eprintln!("{name} leads {:?} after the revoke", at - revoked);
        assert_eq!(lead::leader(&mut c2).await.unwrap().as_deref(), Some(name));
        assert!(l2.still_leads(&mut c2).await.unwrap());
        assert!(!l1.still_leads(&mut c2).await.unwrap());
        assert!(l2.create_revision > l1.create_revision);
        assert!(!waiters[0].3.is_finished(), "two lead at once");

        // That leader's process goes away without revoking anything: its lease runs out,
        // and the last candidate leads within TTL + 3 s of it.
        let dropped = Instant::now();
        drop(s2);
        drop(c2);
        let (last, mut c3, _s3, task) = waiters.remove(0);
        let (l3, at) = tokio::time::timeout(Duration::from_secs(TTL as u64 + 3), task)
            .await
            .expect("the last candidate leads within TTL + 3 s of the leader's end")
            .unwrap();
        let l3 = l3.unwrap();
        eprintln!("{last} leads {:?} after {name} was dropped", at - dropped);
        assert_eq!(lead::leader(&mut c3).await.unwrap().as_deref(), Some(last));
        assert!(l3.still_leads(&mut c3).await.unwrap());
        assert!(!l2.still_leads(&mut c3).await.unwrap());
    });
}

#[test]
fn a_leader_paused_past_its_lease_writes_nothing_that_lands() {
    with_etcd("fence", |options| async move {
        let mut old = options.connect().await.unwrap();
        // The old leader's lease, renewed while it leads and then never again (its
        // process is paused).
        let lease = old.lease_grant(TTL, None).await.unwrap().id();
        let l_old = lead::campaign(&mut old, "old", lease).await.unwrap();
        let (mut keeper, mut renewals) = old.lease_keep_alive(lease).await.unwrap();
        keeper.keep_alive().await.unwrap();
        assert!(renewals.message().await.unwrap().unwrap().ttl() > 0);
        let target = format!("{}plans/p/progress", keys::ROOT);
        // While it leads, its fenced write lands.
        let r = l_old
            .fenced_txn(
                &mut old,
                vec![],
                vec![TxnOp::put(target.clone(), "old-1", None)],
                vec![],
            )
            .await
            .unwrap();
        assert!(r.succeeded());
        assert_eq!(
            value(&mut old, &target).await.as_deref(),
            Some(&b"old-1"[..])
        );

        // Another candidate leads once the lease ran out.
        let mut new = options.connect().await.unwrap();
        let s_new = Session::start(&new, TTL).await.unwrap();
        let l_new = tokio::time::timeout(
            Duration::from_secs(TTL as u64 + 3),
            lead::campaign(&mut new, "new", s_new.lease),
        )
        .await
        .expect("the new candidate leads within TTL + 3 s")
        .unwrap();
        // The old leader wakes up and writes as if it still led: nothing lands.
        let e = l_old
            .fenced_txn(
                &mut old,
                vec![],
                vec![TxnOp::put(target.clone(), "old-2", None)],
                vec![],
            )
            .await
            .unwrap_err();
        assert!(matches!(e, FleetError::NotLeader { .. }), "{e}");
        assert_eq!(
            value(&mut old, &target).await.as_deref(),
            Some(&b"old-1"[..])
        );
        assert!(!l_old.still_leads(&mut old).await.unwrap());
        // Its event appends are fenced too.
        let e = events::append(
            &mut old,
            &[l_old.fence()],
            Event::new(EventKind::WaveDone, 1),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, FleetError::Refused(_)), "{e}");
        assert!(events::last(&mut old, 10).await.unwrap().is_empty());
        // The new leader's writes land; its own compares still decide within the fence.
        let r = l_new
            .fenced_txn(
                &mut new,
                vec![],
                vec![TxnOp::put(target.clone(), "new-1", None)],
                vec![],
            )
            .await
            .unwrap();
        assert!(r.succeeded());
        assert_eq!(
            value(&mut new, &target).await.as_deref(),
            Some(&b"new-1"[..])
        );
        let r = l_new
            .fenced_txn(
                &mut new,
                vec![etcd_client::Compare::create_revision(
                    target.clone(),
                    etcd_client::CompareOp::Equal,
                    0,
                )],
                vec![TxnOp::put(target.clone(), "new-2", None)],
                vec![],
            )
            .await
            .unwrap();
        assert!(!r.succeeded());
        assert_eq!(
            value(&mut new, &target).await.as_deref(),
            Some(&b"new-1"[..])
        );
    });
}

#[test]
fn each_bad_plan_is_refused_with_nothing_stored_and_one_plan_runs_at_a_time() {
    with_etcd("plans", |options| async move {
        let mut c = options.connect().await.unwrap();
        register(&mut c, &["h0", "h1"]).await;
        let dir = std::env::temp_dir().join(format!("warmvm-fleet-plans-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let binary = dir.join("warmvm-new");
        std::fs::write(&binary, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let bin = binary.display().to_string();
        let missing = dir.join("missing").display().to_string();
        let with = |r: PlanRequest, f: &dyn Fn(&mut PlanRequest)| {
            let mut r = r;
            f(&mut r);
            r
        };
        let base = request(&["h0", "h1"]);
        let cases: Vec<(PlanRequest, &str)> = vec![
            (
                with(base.clone(), &|r| r.max_unavailable = 0),
                "--max-unavailable must be at least 1",
            ),
            (
                with(base.clone(), &|r| r.canary = 3),
                "--canary 3 is more than the plan's 2 host(s)",
            ),
            (
                with(base.clone(), &|r| r.binary = Some(bin.clone())),
                "--binary needs --sha256",
            ),
            (
                with(base.clone(), &|r| r.sha256 = Some(abc.into())),
                "--sha256 needs --binary",
            ),
            (
                with(base.clone(), &|r| {
                    r.binary = Some(bin.clone());
                    r.sha256 = Some("12ab".into())
                }),
                "not 64 lower-case hex",
            ),
            (
                with(base.clone(), &|r| {
                    r.binary = Some(missing.clone());
                    r.sha256 = Some(abc.into())
                }),
                "cannot read binary",
            ),
            (
                with(base.clone(), &|r| {
                    r.binary = Some(bin.clone());
                    r.sha256 = Some("00".repeat(32))
                }),
                "not the 0000",
            ),
            (request(&["h0", "h9"]), "host(s) h9 not registered"),
        ];
        let before = keyspace(&mut c).await;
        for (r, want) in &cases {
            let e = plan::create_plan(&mut c, r).await.unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            assert_eq!(
                keyspace(&mut c).await,
                before,
                "{want}: something was stored"
            );
        }

        // A good plan (onto the binary that matches) is stored whole.
        let good = with(base.clone(), &|r| {
            r.binary = Some(bin.clone());
            r.sha256 = Some(abc.into())
        });
        let spec = plan::create_plan(&mut c, &good).await.unwrap();
        assert_eq!(
            plan::current_plan(&mut c).await.unwrap().as_deref(),
            Some(spec.id.as_str())
        );
        let (stored, progress, steps) = plan::read_plan(&mut c, &spec.id).await.unwrap().unwrap();
        assert_eq!(stored, spec);
        assert_eq!(progress.status, plan::PlanStatus::Running);
        assert!(steps.is_empty());
        assert_eq!(
            events::last(&mut c, 5).await.unwrap().last().unwrap().kind,
            EventKind::PlanCreated
        );

        // A second plan while one runs: refused, nothing stored, by the checks and by the
        // transaction itself (a plan written past the checks).
        let before = keyspace(&mut c).await;
        let e = plan::create_plan(&mut c, &request(&["h1"]))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("plan {} is running", spec.id)), "{e}");
        let mut second = spec.clone();
        second.id = "plan-second".into();
        let e = plan::store_plan(&mut c, &second)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("is running"), "{e}");
        assert_eq!(keyspace(&mut c).await, before);

        // No plan runs but the fleet is halted: refused until resumed.
        c.delete(keys::current_plan(), None).await.unwrap();
        assert!(
            halt::set(&mut c, &HaltRecord::new("op@test", "looking at h0"))
                .await
                .unwrap()
        );
        let before = keyspace(&mut c).await;
        let e = plan::create_plan(&mut c, &request(&["h1"]))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("halted (by op@test: looking at h0)"), "{e}");
        let e = plan::store_plan(&mut c, &second)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("halted"), "{e}");
        assert_eq!(keyspace(&mut c).await, before);
        halt::clear(&mut c, "op@test").await.unwrap().unwrap();

        // A plan naming a host that went away between the checks and the transaction.
        let mut gone = second.clone();
        gone.hosts = vec!["h0".into(), "h7".into()];
        let before = keyspace(&mut c).await;
        let e = plan::store_plan(&mut c, &gone)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("host(s) h7 not registered"), "{e}");
        assert_eq!(keyspace(&mut c).await, before);

        // With no hosts named, the plan takes every registered host.
        let all = plan::create_plan(&mut c, &request(&[])).await.unwrap();
        assert_eq!(all.hosts, ["h0", "h1"]);
        std::fs::remove_dir_all(&dir).unwrap();
    });
}

#[test]
fn a_step_is_started_once_only_even_by_two_at_once_and_only_with_a_slot_and_no_halt() {
    with_etcd("steps", |options| async move {
        let mut c = options.connect().await.unwrap();
        let step = StepRecord::assigned("plan-1", "h0", 0, 1);
        c.put(keys::step("plan-1", "h0"), encode(&step), None)
            .await
            .unwrap();
        let lease = c.lease_grant(60, None).await.unwrap().id();
        // Without the slot, or while halted, it does not start.
        let before = keyspace(&mut c).await;
        let e = plan::start_step(&mut c, "plan-1", "h0", 0, None)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("does not hold /warmvm/slots/0"),
            "{e}"
        );
        assert_eq!(keyspace(&mut c).await, before);
        let slot = slots::take(&mut c, 1, "h0", lease).await.unwrap().unwrap();
        halt::set(&mut c, &HaltRecord::new("h9", "gate failed"))
            .await
            .unwrap();
        let before = keyspace(&mut c).await;
        let e = plan::start_step(&mut c, "plan-1", "h0", slot, None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("halted (by h9: gate failed)"), "{e}");
        assert_eq!(keyspace(&mut c).await, before);
        halt::clear(&mut c, "op").await.unwrap();

        // Two at once: one starts it.
        let (mut a, mut b) = (c.clone(), c.clone());
        let (ra, rb) = tokio::join!(
            plan::start_step(&mut a, "plan-1", "h0", slot, Some("aa".into())),
            plan::start_step(&mut b, "plan-1", "h0", slot, Some("bb".into())),
        );
        let started: Vec<_> = [&ra, &rb].into_iter().filter(|r| r.is_ok()).collect();
        assert_eq!(started.len(), 1, "{ra:?} {rb:?}");
        let winner_sha = started[0].as_ref().unwrap().from_sha256.clone();
        let loser = if ra.is_ok() { rb } else { ra };
        assert!(
            matches!(loser, Err(FleetError::StepNotAssigned { .. })),
            "{loser:?}"
        );
        let again = plan::start_step(&mut c, "plan-1", "h0", slot, None)
            .await
            .unwrap_err();
        assert_eq!(
            again.to_string(),
            "step plan-1/h0 is started, not assigned: a step is started once only"
        );
        let kv = c.get(keys::step("plan-1", "h0"), None).await.unwrap();
        let stored: StepRecord =
            warmvm_fleet::records::decode("step", "plan step", kv.kvs()[0].value()).unwrap();
        assert_eq!(stored.state, StepState::Started);
        assert!(stored.started_unix_ms.is_some());
        // The winner's start is the one recorded.
        assert_eq!(stored.from_sha256, winner_sha);
    });
}

#[test]
fn of_three_hosts_racing_for_two_slots_exactly_two_hold_one() {
    with_etcd("slots", |options| async move {
        let mut c = options.connect().await.unwrap();
        let mut leases = Vec::new();
        for _ in 0..3 {
            leases.push(c.lease_grant(30, None).await.unwrap().id());
        }
        let (mut a, mut b, mut d) = (c.clone(), c.clone(), c.clone());
        let (ra, rb, rd) = tokio::join!(
            slots::take(&mut a, 2, "h0", leases[0]),
            slots::take(&mut b, 2, "h1", leases[1]),
            slots::take(&mut d, 2, "h2", leases[2]),
        );
        let results = [ra.unwrap(), rb.unwrap(), rd.unwrap()];
        let held: Vec<u32> = results.iter().flatten().copied().collect();
        assert_eq!(held.len(), 2, "{results:?}");
        assert_eq!(held.iter().collect::<BTreeSet<_>>().len(), 2, "{results:?}");
        let holders = slots::holders(&mut c).await.unwrap();
        assert_eq!(holders.len(), 2, "{holders:?}");
        let waiting = ["h0", "h1", "h2"][results.iter().position(Option::is_none).unwrap()];
        // Taking again is idempotent for a holder, and still nothing for the third.
        let (i0, h0) = holders[0].clone();
        assert_eq!(slots::take(&mut c, 2, &h0, 0).await.unwrap(), Some(i0));
        assert_eq!(slots::take(&mut c, 2, waiting, 0).await.unwrap(), None);
        // Another's slot is not released by the wrong host; the holder's release frees it.
        assert!(!slots::release(&mut c, i0, waiting).await.unwrap());
        assert!(slots::release(&mut c, i0, &h0).await.unwrap());
        let lease = leases[["h0", "h1", "h2"]
            .iter()
            .position(|h| *h == waiting)
            .unwrap()];
        assert_eq!(
            slots::take(&mut c, 2, waiting, lease).await.unwrap(),
            Some(i0)
        );
        // A holder whose lease ends (its daemon died) frees its slot.
        let (i1, h1) = slots::holders(&mut c)
            .await
            .unwrap()
            .into_iter()
            .find(|(i, _)| *i != i0)
            .unwrap();
        let l1 = leases[["h0", "h1", "h2"].iter().position(|h| *h == h1).unwrap()];
        c.lease_revoke(l1).await.unwrap();
        assert!(slots::holders(&mut c)
            .await
            .unwrap()
            .iter()
            .all(|(i, _)| *i != i1));
    });
}

#[test]
fn the_halt_is_set_once_watched_and_cleared_with_its_events() {
    with_etcd("halt", |options| async move {
        let mut c = options.connect().await.unwrap();
        let (now, mut watch) = HaltWatch::start(&mut c).await.unwrap();
        assert_eq!(now, None);
        let mut first = HaltRecord::new("h1", "gate failed: blackout 90 ms over 50 ms");
        first.plan = Some("plan-1".into());
        first.host = Some("h1".into());
        assert!(halt::set(&mut c, &first).await.unwrap());
        // A second halt keeps the first reason.
        assert!(!halt::set(&mut c, &HaltRecord::new("h2", "later"))
            .await
            .unwrap());
        assert_eq!(halt::get(&mut c).await.unwrap(), Some(first.clone()));
        let seen = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen, Some(HaltChange::Set(first.clone())));
        // A watch started while halted says so at once.
        let (now, _) = HaltWatch::start(&mut c).await.unwrap();
        assert_eq!(now, Some(first.clone()));

        assert_eq!(
            halt::clear(&mut c, "op@test").await.unwrap(),
            Some(first.clone())
        );
        let seen = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen, Some(HaltChange::Cleared));
        assert_eq!(halt::get(&mut c).await.unwrap(), None);
        assert_eq!(
            halt::clear(&mut c, "op@test").await.unwrap(),
            None,
            "nothing to clear"
        );
        let kinds: Vec<_> = events::last(&mut c, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.kind, e.host))
            .collect();
        assert_eq!(
            kinds,
            [
                (EventKind::Halted, Some("h1".into())),
                (EventKind::Resumed, Some("h1".into()))
            ]
        );
    });
}

#[test]
fn events_from_many_writers_are_numbered_in_order_and_never_overwritten() {
    with_etcd("events", |options| async move {
        let mut c = options.connect().await.unwrap();
        let writers = 4;
        let each = 8;
        let mut tasks = Vec::new();
        for w in 0..writers {
            let mut cw = c.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..each {
                    let e = Event::new(EventKind::StepAssigned, 1)
                        .host(&format!("h{w}"))
                        .detail(format!("{i}"));
                    seqs.push(events::append(&mut cw, &[], e).await.unwrap());
                }
                seqs
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            let seqs = t.await.unwrap();
            // One writer's events are in the order it appended them.
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
            all.extend(seqs);
        }
        all.sort();
        let n = writers * each;
        assert_eq!(
            all,
            (1..=n as u64).collect::<Vec<_>>(),
            "numbers repeat or skip"
        );
        let last = events::last(&mut c, 5).await.unwrap();
        assert_eq!(
            last.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (n as u64 - 4..=n as u64).collect::<Vec<_>>()
        );
        let everything = events::last(&mut c, 1000).await.unwrap();
        assert_eq!(everything.len(), n);
        // Each event key was written once: version 1.
        let r = c
            .get(keys::events_prefix(), Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(r.kvs().len(), n);
        assert!(r.kvs().iter().all(|kv| kv.version() == 1));
        // An append whose extra condition fails writes nothing.
        let never = etcd_client::Compare::create_revision(
            "/warmvm/nothing",
            etcd_client::CompareOp::NotEqual,
            0,
        );
        let before = keyspace(&mut c).await;
        assert!(
            events::append(&mut c, &[never], Event::new(EventKind::Other, 1))
                .await
                .is_err()
        );
        assert_eq!(keyspace(&mut c).await, before);
    });
}

/// Sends SIGCONT to a stopped process when dropped (also when the test fails).
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

#[test]
fn a_session_that_cannot_renew_its_lease_says_it_is_lost() {
    if !warmvm_testkit::etcd_available("session_lost") {
        return;
    }
    let rig = warmvm_testkit::EtcdCluster::start("lost", 1, false);
    let options = warmvm_fleet::EtcdOptions::new(&rig.endpoints(), None, None, None).unwrap();
    let etcd = rig.pid(0).expect("the member runs");
    warmvm_testkit::in_netns(rig.netns(0), move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let mut c = options.connect().await.unwrap();
                // Kept alive: not lost after several TTLs.
                let kept = Session::start(&c, TTL).await.unwrap();
                tokio::time::sleep(Duration::from_secs(TTL as u64 * 2)).await;
                assert!(!kept.is_lost());
                let ttl = c.lease_time_to_live(kept.lease, None).await.unwrap().ttl();
                assert!(ttl > 0, "the lease was renewed: {ttl}");

                // Revoked by someone else: lost at the next renewal.
                c.lease_revoke(kept.lease).await.unwrap();
                tokio::time::timeout(Duration::from_secs(TTL as u64 + 2), kept.lost())
                    .await
                    .expect("a revoked lease is seen as lost");

                // etcd stops answering (its process stopped): lost once the TTL has run
                // out unrenewed.
                let s = Session::start(&c, TTL).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let stopped = Instant::now();
                std::process::Command::new("kill")
                    .args(["-STOP", &etcd.to_string()])
                    .status()
                    .unwrap();
                let _resume = Resume(etcd);
                // Renewed at most a TTL before etcd stopped, the lease cannot outlive the
                // stop by more than its TTL; the session says so by then (the margin is the
                // scheduler's).
                let by_expiry = Duration::from_secs(TTL as u64) + Duration::from_secs(1);
                tokio::time::timeout(by_expiry, s.lost())
                    .await
                    .expect("a lease that cannot be renewed is seen as lost by its expiry");
                eprintln!("lost {:?} after etcd stopped", stopped.elapsed());
            })
    });
}

#[test]
fn a_plan_naming_the_most_hosts_a_plan_takes_is_stored_in_one_transaction() {
    with_etcd("bigplan", |options| async move {
        let mut c = options.connect().await.unwrap();
        let names: Vec<String> = (0..plan::MAX_PLAN_HOSTS).map(|i| format!("h{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        register(&mut c, &refs).await;
        let spec = plan::create_plan(&mut c, &request(&refs)).await.unwrap();
        assert_eq!(spec.hosts.len(), plan::MAX_PLAN_HOSTS);
        assert_eq!(
            plan::current_plan(&mut c).await.unwrap().as_deref(),
            Some(spec.id.as_str())
        );
    });
}
