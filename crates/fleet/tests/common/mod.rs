//! What the fleet's store tests share: a cluster per test, entered from its namespace;
//! fake hosts registered as daemons register; the keyspace to compare.

#![allow(dead_code)]

use std::future::Future;

use etcd_client::{Client, GetOptions, PutOptions};
use warmvm_fleet::plan::{self, MissingHost, PlanRequest};
use warmvm_fleet::records::{encode, Build, Health, HostRecord, FORMAT};
use warmvm_fleet::{keys, EtcdOptions};
use warmvm_testkit::{etcd_available, in_netns, EtcdCluster};

/// Start a one-member cluster and run `test` against it from inside its namespace, on a
/// current-thread runtime (as the daemon and the CLI run the fleet).
pub fn with_etcd<F, Fut>(tag: &str, test: F)
where
    F: FnOnce(EtcdOptions) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    if !etcd_available(tag) {
        return;
    }
    let rig = EtcdCluster::start(tag, 1, false);
    let options = EtcdOptions::new(&rig.endpoints(), None, None, None).unwrap();
    in_netns(rig.netns(0), move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(test(options))
    });
}

pub fn host_record(name: &str) -> HostRecord {
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
        updated_unix_ms: warmvm_fleet::kv::now_unix_ms(),
        health: Health::Ok,
        vms: Vec::new(),
        aging: None,
        migration_addr: None,
        last_reboot: None,
    }
}

/// Register fake hosts as their daemons would: each record under a lease of its own.
pub async fn register(client: &mut Client, names: &[&str]) {
    for name in names {
        let lease = client.lease_grant(60, None).await.unwrap().id();
        client
            .put(
                keys::host(name),
                encode(&host_record(name)),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .unwrap();
    }
}

/// Everything under the fleet's root and the store's revision: equal before and after
/// means nothing at all was written.
pub async fn keyspace(client: &mut Client) -> (i64, Vec<(String, Vec<u8>, i64)>) {
    let r = client
        .get(keys::ROOT, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let revision = r.header().unwrap().revision();
    let kvs = r
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
                kv.mod_revision(),
            )
        })
        .collect();
    (revision, kvs)
}

pub async fn value(client: &mut Client, key: &str) -> Option<Vec<u8>> {
    let r = client.get(key, None).await.unwrap();
    r.kvs().first().map(|kv| kv.value().to_vec())
}

pub fn request(hosts: &[&str]) -> PlanRequest {
    PlanRequest {
        mode: "warm".into(),
        canary: 1,
        max_unavailable: 1,
        soak_secs: 5,
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        blackout_p99_limit_us: plan::DEFAULT_BLACKOUT_P99_LIMIT_US,
        on_missing_host: MissingHost::Halt,
        created_by: "op@test".into(),
        ..PlanRequest::default()
    }
}
