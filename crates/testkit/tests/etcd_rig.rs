//! The etcd rig's own tests: a cluster that works, TLS that refuses clients without a
//! certificate, the faults the fleet's tests rely on (a killed leader, a cut host), and
//! nothing left behind. They need root and etcd (skipped without it, failing under
//! `WARMVM_REQUIRE_KVM=1` or `CI`).

use std::process::Output;
use std::time::{Duration, Instant};

use warmvm_testkit::{etcd_available, pid_alive, EtcdCluster};

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `etcdctl get KEY --print-value-only` from host `host`'s namespace against member
/// `member` alone (a serializable read: what that member has applied).
fn value_on(rig: &EtcdCluster, host: usize, member: usize, key: &str) -> String {
    let out = rig
        .etcdctl_command(host, &rig.member_endpoint(member), true)
        .args([
            "get",
            key,
            "--print-value-only",
            "--consistency=s",
            "--command-timeout=3s",
        ])
        .output()
        .expect("run etcdctl");
    ok(&out, &format!("get {key} on member {member}"))
        .trim()
        .to_string()
}

fn namespaces() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn three_members_agree_a_write_on_one_is_read_on_another() {
    if !etcd_available("three_members_agree") {
        return;
    }
    let rig = EtcdCluster::start("agree", 3, false);
    assert_eq!(rig.len(), 3);
    let leader = rig.leader().expect("a healthy cluster has a leader");
    let ids: std::collections::HashSet<u64> = (0..3).map(|i| rig.member_id(i)).collect();
    assert_eq!(ids.len(), 3, "member ids are distinct");
    let status = ok(
        &rig.etcdctl(&["endpoint", "status", "-w", "json"]),
        "endpoint status",
    );
    assert!(
        status.contains(&format!("\"leader\":{}", rig.member_id(leader))),
        "member {leader} is not the leader etcd reports: {status}"
    );
    let out = rig
        .etcdctl_command(0, &rig.member_endpoint(0), true)
        .args(["put", "/rig/k", "from-0"])
        .output()
        .expect("run etcdctl");
    ok(&out, "put on member 0");
    // Read linearizably from member 2, from host 2's namespace: it went over the bridge.
    let out = rig
        .etcdctl_command(2, &rig.member_endpoint(2), true)
        .args(["get", "/rig/k", "--print-value-only"])
        .output()
        .expect("run etcdctl");
    assert_eq!(ok(&out, "get on member 2").trim(), "from-0");
    let list = ok(&rig.etcdctl(&["member", "list"]), "member list");
    assert_eq!(list.lines().count(), 3, "{list}");
}

#[test]
fn tls_refuses_a_client_without_a_certificate_and_serves_one_with_it() {
    if !etcd_available("tls_refuses") {
        return;
    }
    let rig = EtcdCluster::start("tls", 3, true);
    let tls = rig.tls().expect("a TLS rig has client files");
    assert!(tls.ca.exists() && tls.cert.exists() && tls.key.exists());
    assert!(
        rig.endpoints().starts_with("https://"),
        "{}",
        rig.endpoints()
    );
    let args = rig.fleet_args();
    assert_eq!(args[0], "--fleet-etcd");
    assert!(args.contains(&"--fleet-etcd-key".to_string()), "{args:?}");

    let refused = rig
        .etcdctl_command(0, &rig.endpoints(), false)
        .args(["put", "/rig/tls", "no-cert", "--command-timeout=3s"])
        .output()
        .expect("run etcdctl");
    assert!(
        !refused.status.success(),
        "a client without a certificate was served: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
    ok(
        &rig.etcdctl(&["put", "/rig/tls", "with-cert"]),
        "put with cert",
    );
    let v = ok(
        &rig.etcdctl(&["get", "/rig/tls", "--print-value-only"]),
        "get",
    );
    assert_eq!(
        v.trim(),
        "with-cert",
        "the refused put must not have landed"
    );
}

#[test]
fn writes_resume_after_the_leader_is_killed() {
    if !etcd_available("writes_resume") {
        return;
    }
    let rig = EtcdCluster::start("leaderkill", 3, false);
    let leader = rig.leader().expect("a leader");
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let rest = others
        .iter()
        .map(|&i| rig.member_endpoint(i))
        .collect::<Vec<_>>()
        .join(",");
    let killed = Instant::now();
    rig.kill(leader);
    let mut resumed = None;
    while killed.elapsed() < Duration::from_secs(20) {
        let out = rig
            .etcdctl_command(others[0], &rest, true)
            .args(["put", "/rig/after", "yes", "--command-timeout=1s"])
            .output()
            .expect("run etcdctl");
        if out.status.success() {
            resumed = Some(killed.elapsed());
            break;
        }
    }
    let resumed = resumed.expect("writes resume within 20 s of the leader's death");
    eprintln!(
        "writes resumed {:.2} s after the leader (member {leader}) was killed",
        resumed.as_secs_f64()
    );
    let new = rig
        .wait_leader(Duration::from_secs(10))
        .expect("a new leader");
    assert_ne!(new, leader);

    rig.restart(leader);
    assert!(
        rig.wait_healthy(Duration::from_secs(20)),
        "{}",
        rig.log_tails()
    );
    // The restarted member caught up on its own data directory.
    assert!(
        warmvm_testkit::wait_until(10, || value_on(&rig, leader, leader, "/rig/after") == "yes"),
        "the restarted member never applied the write made without it"
    );
}

#[test]
fn a_write_on_a_cut_member_fails_and_is_never_applied() {
    if !etcd_available("a_write_on_a_cut_member") {
        return;
    }
    let rig = EtcdCluster::start("cut", 3, false);
    let leader = rig.leader().expect("a leader");
    let cut = (leader + 1) % 3;
    rig.link_down(cut);
    // Once the cut member knows it has no leader, a write it takes can go nowhere.
    let mut seen = String::new();
    let leaderless = warmvm_testkit::wait_until(10, || {
        let out = rig
            .etcdctl_command(cut, &rig.member_endpoint(cut), true)
            .args(["endpoint", "status", "-w", "json", "--command-timeout=1s"])
            .output()
            .expect("run etcdctl");
        seen = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            // No leader: the field is left out (or 0).
            .is_ok_and(|s| {
                s[0]["Status"]["header"]["member_id"].is_u64()
                    && s[0]["Status"]["leader"].as_u64().unwrap_or(0) == 0
            })
    });
    assert!(leaderless, "the cut member never lost its leader: {seen}");

    let out = rig
        .etcdctl_command(cut, &rig.member_endpoint(cut), true)
        .args(["put", "/rig/minority", "lost", "--command-timeout=2s"])
        .output()
        .expect("run etcdctl");
    assert!(
        !out.status.success(),
        "a write on a member cut from the others succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The majority still takes writes, from a host that still reaches it.
    let other = (cut + 1) % 3;
    let majority = [other, (cut + 2) % 3]
        .map(|i| rig.member_endpoint(i))
        .join(",");
    let out = rig
        .etcdctl_command(other, &majority, true)
        .args(["put", "/rig/majority", "kept", "--command-timeout=3s"])
        .output()
        .expect("run etcdctl");
    ok(&out, "put on the majority");
    for i in [other, (cut + 2) % 3] {
        assert_eq!(value_on(&rig, other, i, "/rig/minority"), "", "member {i}");
    }
    let majority_leader = rig
        .wait_leader(Duration::from_secs(10))
        .expect("the majority has a leader");
    assert_ne!(majority_leader, cut);

    rig.link_up(cut);
    assert!(
        rig.wait_healthy(Duration::from_secs(20)),
        "{}",
        rig.log_tails()
    );
    assert!(
        warmvm_testkit::wait_until(10, || value_on(&rig, cut, cut, "/rig/majority") == "kept"),
        "the member that was cut never caught up"
    );
    for i in 0..3 {
        assert_eq!(
            value_on(&rig, i, i, "/rig/minority"),
            "",
            "the minority's write was applied on member {i}"
        );
    }
}

#[test]
fn a_stopped_member_is_continued() {
    if !etcd_available("a_stopped_member") {
        return;
    }
    let rig = EtcdCluster::start("stop", 1, false);
    rig.stop(0);
    let out = rig
        .etcdctl(&["put", "/rig/stopped", "x", "--command-timeout=1s"])
        .status;
    assert!(!out.success(), "a stopped member answered");
    rig.cont(0);
    ok(
        &rig.etcdctl(&["put", "/rig/stopped", "x"]),
        "put after SIGCONT",
    );
}

#[test]
fn drop_removes_the_members_and_namespaces_also_on_panic() {
    if !etcd_available("drop_removes") {
        return;
    }
    let rig = EtcdCluster::start("drop", 3, true);
    let names = rig.namespaces();
    let pids = rig.pids();
    let dir = rig.dir().to_path_buf();
    assert_eq!((names.len(), pids.len()), (4, 3));
    for p in &pids {
        // `ip netns exec` runs etcd in place: the pid the rig kills is etcd's own.
        let exe = std::fs::read_link(format!("/proc/{p}/exe")).expect("the member's exe");
        assert_eq!(exe, std::path::Path::new(warmvm_testkit::ETCD));
    }
    let before = namespaces();
    for n in &names {
        assert!(before.contains(n.as_str()), "{n} not in {before}");
    }
    drop(rig);
    let after = namespaces();
    for n in &names {
        assert!(!after.contains(n.as_str()), "{n} left behind: {after}");
    }
    for p in &pids {
        assert!(!pid_alive(*p), "etcd {p} left running");
    }
    assert!(!dir.exists(), "{} left behind", dir.display());

    // A test that panics while holding a rig leaves nothing behind either.
    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = std::thread::spawn(move || {
        let rig = EtcdCluster::start("panic", 1, false);
        tx.send((rig.namespaces(), rig.pids(), rig.dir().to_path_buf()))
            .unwrap();
        panic!("a deliberate panic: the test holding the rig fails");
    })
    .join();
    assert!(panicked.is_err());
    let (names, pids, dir) = rx.recv().expect("the rig's names");
    let after = namespaces();
    for n in &names {
        assert!(!after.contains(n.as_str()), "{n} left behind: {after}");
    }
    for p in &pids {
        assert!(!pid_alive(*p), "etcd {p} left running");
    }
    // A failed test keeps its logs to read.
    assert!(dir.join("m0.log").exists());
    let _ = std::fs::remove_dir_all(dir);
}
