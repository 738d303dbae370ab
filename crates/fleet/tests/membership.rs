//! A host's membership against real etcd (the test kit's rig, one member): the record is
//! claimed only when absent, refused while another lease holds it, kept by the same lease,
//! and freed by a revoke; the agent registers, a second agent adopting the lease (as a warm
//! reboot's new daemon does) takes the record over without it ever going, and a stop with
//! revoke removes it. Needs root and etcd (skipped without it, failing under
//! `WARMVM_REQUIRE_KVM=1` or `CI`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warmvm_fleet::membership::{self, Written};
use warmvm_fleet::records::{Build, Health, HostRecord, FORMAT};
use warmvm_fleet::{keys, Agent, AgentConfig, EtcdOptions};
use warmvm_testkit::{etcd_available, in_netns, EtcdCluster};

fn options(rig: &EtcdCluster) -> EtcdOptions {
    EtcdOptions::new(&rig.endpoints(), None, None, None).expect("the rig's options")
}

fn host(name: &str, pid: u32) -> HostRecord {
    HostRecord {
        format: FORMAT,
        name: name.into(),
        build: Build {
            version: "0.1.0".into(),
            git_commit: "abc".into(),
            sha256: "00".repeat(32),
            path: "/usr/bin/warmvm".into(),
        },
        pid,
        updated_unix_ms: 1,
        health: Health::Ok,
        vms: vec![],
        aging: None,
        migration_addr: None,
        last_reboot: None,
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(f)
}

/// The record's pid and lease as etcd holds them now.
async fn stored(c: &mut etcd_client::Client, name: &str) -> Option<(u64, i64)> {
    let r = c.get(keys::host(name), None).await.expect("get");
    r.kvs().first().map(|kv| {
        let v: serde_json::Value = serde_json::from_slice(kv.value()).expect("JSON");
        (v["pid"].as_u64().expect("pid"), kv.lease())
    })
}

#[test]
fn a_name_is_claimed_when_free_refused_to_another_lease_and_freed_by_a_revoke() {
    if !etcd_available("a_name_is_claimed_when_free") {
        return;
    }
    let rig = EtcdCluster::start("claim", 1, false);
    let opts = options(&rig);
    in_netns(rig.netns(0), move || {
        block_on(async move {
            let mut c = opts.connect().await.expect("connect");
            let a = membership::grant(&mut c).await.unwrap();
            let b = membership::grant(&mut c).await.unwrap();
            assert_eq!(
                membership::write(&mut c, a, &host("h1", 1)).await.unwrap(),
                Written::Ours
            );
            assert_eq!(stored(&mut c, "h1").await, Some((1, a)));
            assert_eq!(
                membership::write(&mut c, b, &host("h1", 2)).await.unwrap(),
                Written::HeldByOther {
                    lease: a,
                    pid: Some(1)
                }
            );
            assert_eq!(stored(&mut c, "h1").await, Some((1, a)), "untouched");
            assert_eq!(
                membership::write(&mut c, a, &host("h1", 3)).await.unwrap(),
                Written::Ours
            );
            assert_eq!(stored(&mut c, "h1").await, Some((3, a)));
            membership::revoke(&mut c, a).await.unwrap();
            assert_eq!(stored(&mut c, "h1").await, None, "gone with its lease");
            assert!(membership::remaining(&mut c, a).await.unwrap() <= 0);
            assert_eq!(
                membership::write(&mut c, b, &host("h1", 2)).await.unwrap(),
                Written::Ours
            );
            assert_eq!(stored(&mut c, "h1").await, Some((2, b)));
        })
    });
}

#[test]
fn an_adopted_lease_keeps_the_record_and_a_stop_with_revoke_removes_it() {
    if !etcd_available("an_adopted_lease_keeps_the_record") {
        return;
    }
    let rig = EtcdCluster::start("adopt", 1, false);
    let opts = options(&rig);
    in_netns(rig.netns(0), move || {
        let start = |pid: u32, adopt: Option<i64>| {
            Agent::start(AgentConfig {
                etcd: opts.clone(),
                host_name: "h1".into(),
                adopt_lease: adopt,
                record: Box::new(move || Some(host("h1", pid))),
                thread_setup: Box::new(|| {}),
                reboots: None,
            })
            .expect("the agent starts")
        };
        let wait = |what: &str, f: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !f() {
                assert!(Instant::now() < deadline, "{what}");
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        // One runtime for the test's own client: its connection's tasks live in it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let mut c = rt.block_on(opts.connect()).expect("connect");
        let look = Arc::new(Mutex::new(move || rt.block_on(stored(&mut c, "h1"))));
        let now = || (look.lock().unwrap())();

        let old = start(10, None);
        wait("the first agent never connected", &|| {
            old.status().connected
        });
        let lease = old.lease().expect("a lease");
        assert_eq!(old.status().lease, Some(format!("{lease:x}")));
        assert_eq!(now(), Some((10, lease)));

        // The successor adopts the lease: the record is its own from its first write.
        let new = start(11, Some(lease));
        wait("the successor never wrote", &|| now() == Some((11, lease)));
        assert_eq!(new.lease(), Some(lease));
        // The old one goes without revoking (a warm reboot's old daemon simply exits).
        old.stop(false, Duration::from_secs(3));
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(now(), Some((11, lease)), "the record stayed");
        assert!(new.status().connected);

        new.stop(true, Duration::from_secs(3));
        assert_eq!(now(), None, "revoked at the stop");
    });
}
