//! Every etcd call the fleet makes, against the etcd this machine runs (Debian's 3.4.23
//! where the client is tested upstream against newer ones): on a 1-member cluster over
//! plain HTTP and on a 3-member cluster speaking mTLS only, each call's result checked on
//! the fleet's own keys. Also: a campaign or lock that must wait longer than one call's
//! timeout fails and leaves no key behind (so the coordinator retries them in a loop), and
//! a client without a certificate gets nothing from the TLS cluster. Needs root and etcd (skipped without it, failing under `WARMVM_REQUIRE_KVM=1`
//! or `CI`).

use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LeaseTimeToLiveOptions, LockOptions,
    ProclaimOptions, PutOptions, ResignOptions, TxnOp, TxnOpResponse, WatchOptions,
};
use warmvm_fleet::connect::CALL_TIMEOUT;
use warmvm_fleet::{keys, EtcdOptions};
use warmvm_testkit::{etcd_available, in_netns, EtcdCluster};

/// How long a call the test expects to block (a second campaigner, a second locker)
/// is given before the test counts it as blocked.
const BLOCKED: Duration = Duration::from_millis(800);

fn options(rig: &EtcdCluster, client_cert: bool) -> EtcdOptions {
    let tls = rig.tls();
    EtcdOptions::new(
        &rig.endpoints(),
        tls.map(|t| t.ca.clone()),
        tls.filter(|_| client_cert).map(|t| t.cert.clone()),
        tls.filter(|_| client_cert).map(|t| t.key.clone()),
    )
    .expect("the rig's options are valid")
}

/// The installed etcd's version, from `etcd --version`.
fn installed_version() -> String {
    let out = std::process::Command::new(warmvm_testkit::ETCD)
        .arg("--version")
        .output()
        .expect("etcd --version");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("etcd Version: "))
        .unwrap_or_else(|| panic!("no version in {text:?}"))
        .trim()
        .to_string()
}

/// Run `f` on a current-thread runtime on a thread inside host 0's namespace, where the
/// members' addresses are reachable.
fn on_host<T: Send + 'static>(
    rig: &EtcdCluster,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    in_netns(rig.netns(0), move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(f)
    })
}

fn value(kv: &etcd_client::KeyValue) -> String {
    String::from_utf8_lossy(kv.value()).into_owned()
}

async fn get(c: &mut Client, key: &str) -> Option<String> {
    let r = c.get(key, None).await.expect("get");
    r.kvs().first().map(value)
}

/// Every call, checked; `members` and `endpoints` describe the cluster, `version` the
/// etcd it runs.
async fn calls(options: EtcdOptions, members: usize, endpoints: Vec<String>, version: String) {
    let mut c = options.connect().await.expect("connect");

    // Leases: grant, keep alive, time to live (with the keys on it), revoke.
    let lease = c.lease_grant(5, None).await.expect("lease grant");
    assert_eq!(lease.ttl(), 5);
    let id = lease.id();
    assert_ne!(id, 0);
    let (mut keeper, mut kept) = c.lease_keep_alive(id).await.expect("lease keep alive");
    keeper.keep_alive().await.expect("send a keep-alive");
    let k = kept
        .message()
        .await
        .expect("keep-alive answer")
        .expect("the keep-alive stream is open");
    assert_eq!((k.id(), k.ttl()), (id, 5));

    // Put under the lease; prefix get.
    let host = keys::host("h0");
    c.put(
        host.as_str(),
        "record-0",
        Some(PutOptions::new().with_lease(id)),
    )
    .await
    .expect("put with lease");
    c.put(keys::host("h1"), "record-1", None)
        .await
        .expect("put");
    let all = c
        .get(keys::hosts_prefix(), Some(GetOptions::new().with_prefix()))
        .await
        .expect("prefix get");
    let got: Vec<(String, String)> = all
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().expect("utf-8").to_string(), value(kv)))
        .collect();
    assert_eq!(
        got,
        [
            (host.clone(), "record-0".to_string()),
            (keys::host("h1"), "record-1".to_string())
        ]
    );
    assert_eq!(all.kvs()[0].lease(), id);
    assert_eq!(all.kvs()[1].lease(), 0);
    let ttl = c
        .lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .expect("lease time to live");
    assert_eq!(ttl.granted_ttl(), 5);
    assert!((1..=5).contains(&ttl.ttl()), "ttl {}", ttl.ttl());
    assert_eq!(ttl.keys(), [host.as_bytes().to_vec()]);

    // Transactions: create_revision == 0 takes a free slot once; the else branch reads
    // who holds it; mod_revision and value compares.
    let slot = keys::slot(0);
    let take = |who: &str| {
        etcd_client::Txn::new()
            .when([Compare::create_revision(slot.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(slot.as_str(), who, None)])
            .or_else([TxnOp::get(slot.as_str(), None)])
    };
    let first = c.txn(take("h0")).await.expect("txn");
    assert!(first.succeeded());
    let second = c.txn(take("h1")).await.expect("txn");
    assert!(!second.succeeded(), "a taken slot was taken again");
    let holder = match &second.op_responses()[..] {
        [TxnOpResponse::Get(g)] => g.kvs().first().map(value),
        other => panic!("the else branch answered {other:?}"),
    };
    assert_eq!(holder.as_deref(), Some("h0"));
    let rev = c.get(slot.as_str(), None).await.expect("get").kvs()[0].mod_revision();
    let by_rev = |r: i64, v: &str| {
        etcd_client::Txn::new()
            .when([Compare::mod_revision(slot.as_str(), CompareOp::Equal, r)])
            .and_then([TxnOp::put(slot.as_str(), v, None)])
    };
    assert!(c.txn(by_rev(rev, "h0+")).await.expect("txn").succeeded());
    assert!(
        !c.txn(by_rev(rev, "stale")).await.expect("txn").succeeded(),
        "a stale mod_revision compare succeeded"
    );
    let by_value = |v: &str| {
        etcd_client::Txn::new()
            .when([Compare::value(slot.as_str(), CompareOp::Equal, v)])
            .and_then([TxnOp::delete(slot.as_str(), None)])
    };
    assert!(!c.txn(by_value("h0")).await.expect("txn").succeeded());
    assert!(c.txn(by_value("h0+")).await.expect("txn").succeeded());
    assert_eq!(get(&mut c, &slot).await, None);

    // Watch: the first message is the watch's creation with no event, then the event.
    let mut events = c
        .watch(keys::halt(), Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    let created = events
        .message()
        .await
        .expect("watch message")
        .expect("watch open");
    assert!(created.created());
    assert!(created.events().is_empty());
    c.put(keys::halt(), "gate failed", None).await.expect("put");
    let event = events
        .message()
        .await
        .expect("watch message")
        .expect("watch open");
    let [e] = event.events() else {
        panic!("one event expected: {:?}", event.events())
    };
    assert_eq!(e.event_type(), EventType::Put);
    let kv = e.kv().expect("the event's key");
    assert_eq!(
        (kv.key_str().expect("utf-8"), value(kv).as_str()),
        (keys::halt().as_str(), "gate failed")
    );

    // Election: campaign, observe, proclaim, leader; a fenced write lands while leading
    // and not after resigning; a second campaigner then leads.
    let name = keys::election();
    let won = c.campaign(name.as_str(), "h0", id).await.expect("campaign");
    let leader = won.leader().expect("a leader key").clone();
    assert!(leader.rev() > 0);
    assert_eq!(leader.lease(), id);
    let mut observed = c.observe(name.as_str()).await.expect("observe");
    let first = observed
        .message()
        .await
        .expect("observe message")
        .expect("observe open");
    assert_eq!(first.kv().map(value).as_deref(), Some("h0"));
    c.proclaim(
        "h0 proclaimed",
        Some(ProclaimOptions::new().with_leader(leader.clone())),
    )
    .await
    .expect("proclaim");
    let next = observed
        .message()
        .await
        .expect("observe message")
        .expect("observe open");
    assert_eq!(next.kv().map(value).as_deref(), Some("h0 proclaimed"));
    let now = c.leader(name.as_str()).await.expect("leader");
    assert_eq!(now.kv().map(value).as_deref(), Some("h0 proclaimed"));
    assert_eq!(now.kv().map(|kv| kv.key()), Some(leader.key()));

    let fenced = |v: &str| {
        etcd_client::Txn::new()
            .when([Compare::create_revision(
                leader.key(),
                CompareOp::Equal,
                leader.rev(),
            )])
            .and_then([TxnOp::put(keys::current_plan(), v, None)])
    };
    assert!(
        c.txn(fenced("while leading"))
            .await
            .expect("txn")
            .succeeded(),
        "the leader's fenced write failed"
    );

    let lease2 = c.lease_grant(5, None).await.expect("lease grant").id();
    let mut c2 = c.clone();
    let rival = tokio::spawn(async move { c2.campaign(keys::election(), "h1", lease2).await });
    tokio::time::sleep(BLOCKED).await;
    assert!(!rival.is_finished(), "a second campaigner won while h0 led");
    c.resign(Some(ResignOptions::new().with_leader(leader.clone())))
        .await
        .expect("resign");
    assert!(
        !c.txn(fenced("after resigning"))
            .await
            .expect("txn")
            .succeeded(),
        "a fenced write landed after the leader resigned"
    );
    assert_eq!(
        get(&mut c, &keys::current_plan()).await.as_deref(),
        Some("while leading")
    );
    let rival = tokio::time::timeout(Duration::from_secs(10), rival)
        .await
        .expect("the second campaigner wins after the resignation")
        .expect("the campaign task")
        .expect("the second campaign");
    let rival_key = rival.leader().expect("a leader key");
    assert!(rival_key.rev() > leader.rev());
    let now = c.leader(name.as_str()).await.expect("leader");
    assert_eq!(now.kv().map(value).as_deref(), Some("h1"));
    let next = observed
        .message()
        .await
        .expect("observe message")
        .expect("observe open");
    assert_eq!(next.kv().map(value).as_deref(), Some("h1"));

    // Lock: held under a lease, a second locker waits until it is unlocked.
    let lock_name = keys::ROOT.to_string() + "lock/test";
    let held = c
        .lock(lock_name.as_str(), Some(LockOptions::new().with_lease(id)))
        .await
        .expect("lock");
    let mut c3 = c.clone();
    let (n, l) = (lock_name.clone(), lease2);
    let waiter =
        tokio::spawn(async move { c3.lock(n, Some(LockOptions::new().with_lease(l))).await });
    tokio::time::sleep(BLOCKED).await;
    assert!(!waiter.is_finished(), "a held lock was taken again");
    c.unlock(held.key()).await.expect("unlock");
    let second = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter takes the lock after the unlock")
        .expect("the lock task")
        .expect("the second lock");
    assert!(second.key().starts_with(lock_name.as_bytes()));
    c.unlock(second.key()).await.expect("unlock");

    // The second leader's lease revoked: nobody leads.
    c.lease_revoke(lease2).await.expect("lease revoke");
    assert!(
        c.leader(name.as_str()).await.is_err(),
        "the election still has a leader after its lease was revoked"
    );

    // Revoking the lease deletes the keys on it.
    c.lease_revoke(id).await.expect("lease revoke");
    assert_eq!(get(&mut c, &host).await, None);
    assert_eq!(
        get(&mut c, &keys::host("h1")).await.as_deref(),
        Some("record-1")
    );
    let gone = c
        .lease_time_to_live(id, None)
        .await
        .expect("lease time to live");
    assert_eq!(gone.ttl(), -1, "a revoked lease still lives");

    // Status and members.
    let status = c.status().await.expect("status");
    assert_eq!(status.version(), version);
    assert_ne!(status.leader(), 0);
    eprintln!(
        "etcd status: version {}, leader {:x}",
        status.version(),
        status.leader()
    );
    let list = c.member_list().await.expect("member list");
    assert_eq!(list.members().len(), members);
    let mut urls: Vec<String> = list
        .members()
        .iter()
        .flat_map(|m| m.client_urls().iter().cloned())
        .collect();
    urls.sort();
    let mut want = endpoints;
    want.sort();
    assert_eq!(urls, want);
}

/// A campaign or a lock that waits longer than one call may take
/// (`warmvm_fleet::connect::CALL_TIMEOUT`) fails with a timeout, and etcd removes the key
/// it queued: the coordinator must campaign (and lock) in a loop, and each retry starts
/// clean.
async fn waiting_calls_time_out_cleanly(options: EtcdOptions) {
    let mut c = options.connect().await.expect("connect");
    let held = c.lease_grant(30, None).await.expect("lease grant").id();
    let waiting = c.lease_grant(30, None).await.expect("lease grant").id();
    let name = keys::election();
    let lock_name = keys::ROOT.to_string() + "lock/timeout";
    c.campaign(name.as_str(), "h0", held)
        .await
        .expect("campaign");
    let lock = c
        .lock(
            lock_name.as_str(),
            Some(LockOptions::new().with_lease(held)),
        )
        .await
        .expect("lock");
    let started = Instant::now();
    let campaign = c.campaign(name.as_str(), "h1", waiting).await;
    let waited = started.elapsed();
    assert!(campaign.is_err(), "a second campaign won while h0 led");
    assert!(
        waited >= CALL_TIMEOUT,
        "the campaign failed after {waited:?}"
    );
    eprintln!(
        "a waiting campaign failed after {waited:?}: {:?}",
        campaign.err()
    );
    let started = Instant::now();
    let locked = c
        .lock(
            lock_name.as_str(),
            Some(LockOptions::new().with_lease(waiting)),
        )
        .await;
    let waited = started.elapsed();
    assert!(locked.is_err(), "a held lock was taken again");
    assert!(waited >= CALL_TIMEOUT, "the lock failed after {waited:?}");
    // The waiters' keys go (etcd deletes them when the call is cancelled).
    let mut left = (Vec::new(), Vec::new());
    for _ in 0..50 {
        left = (
            leases_under(&mut c, &name).await,
            leases_under(&mut c, &lock_name).await,
        );
        if left == (vec![held], vec![held]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        left,
        (vec![held], vec![held]),
        "a timed-out waiter's key stayed"
    );
    c.unlock(lock.key()).await.expect("unlock");
    c.lease_revoke(held).await.expect("lease revoke");
    c.lease_revoke(waiting).await.expect("lease revoke");
}

/// The leases of the keys under `prefix`, in key order.
async fn leases_under(c: &mut Client, prefix: &str) -> Vec<i64> {
    c.get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .expect("prefix get")
        .kvs()
        .iter()
        .map(|kv| kv.lease())
        .collect()
}

/// A client that has the CA but no certificate of its own puts nothing.
async fn without_certificate(options: EtcdOptions, with_cert: EtcdOptions) {
    match options.connect().await {
        Err(e) => eprintln!("a client without a certificate: {e}"),
        Ok(mut c) => match c.put(keys::host("nocert"), "x", None).await {
            Ok(_) => panic!("a client without a certificate could put"),
            Err(e) => eprintln!("a client without a certificate, put: {e}"),
        },
    }
    let mut c = with_cert.connect().await.expect("connect");
    assert_eq!(get(&mut c, &keys::host("nocert")).await, None);
}

#[test]
fn every_call_the_fleet_makes_works_on_the_installed_etcd() {
    if !etcd_available("every_call_the_fleet_makes") {
        return;
    }
    let version = installed_version();
    for (members, tls) in [(1, false), (3, true)] {
        let rig = EtcdCluster::start("calls", members, tls);
        let endpoints = rig.endpoints().split(',').map(String::from).collect();
        on_host(
            &rig,
            calls(options(&rig, true), members, endpoints, version.clone()),
        );
        if !tls {
            on_host(&rig, waiting_calls_time_out_cleanly(options(&rig, true)));
        }
        if tls {
            on_host(
                &rig,
                without_certificate(options(&rig, false), options(&rig, true)),
            );
        }
    }
}
