//! `warmvm fleet roll` and `warmvm fleet resume` against a real etcd cluster that speaks
//! mTLS only (the test kit's rig; the CLI runs inside its namespace). Hosts are
//! registered as their daemons would register them (a host record under a lease), so no
//! daemon runs. Every bad input is one line, exit status 2, and nothing stored (the
//! store's revision unchanged). Needs root and etcd (skipped without them, failing under
//! `WARMVM_REQUIRE_KVM=1` or `CI`).

use std::process::{Command, Output};

use warmvm_fleet::halt::HaltRecord;
use warmvm_fleet::keys;
use warmvm_fleet::records::{encode, Build, Health, HostRecord, FORMAT};
use warmvm_testkit::{etcd_available, EtcdCluster};

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn etcdctl(rig: &EtcdCluster, args: &[&str]) -> String {
    let out = rig.etcdctl(args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "etcdctl {args:?}: {stdout}{stderr}");
    stdout
}

/// The store's revision: unchanged means nothing at all was written.
fn revision(rig: &EtcdCluster) -> i64 {
    let v: serde_json::Value = serde_json::from_str(&etcdctl(
        rig,
        &["get", "/warmvm/", "--prefix", "-w", "json"],
    ))
    .expect("etcdctl's JSON");
    v["header"]["revision"].as_i64().expect("a revision")
}

fn register(rig: &EtcdCluster, name: &str) {
    let lease = etcdctl(rig, &["lease", "grant", "120"]);
    // "lease 694d81a1e0b4b2c5 granted with TTL(120s)"
    let id = lease
        .split_whitespace()
        .nth(1)
        .expect("a lease id")
        .to_string();
    let record = HostRecord {
        format: FORMAT,
        name: name.into(),
        build: Build {
            version: "0.1.0".into(),
            git_commit: "c".into(),
            sha256: "00".repeat(32),
            path: "/usr/bin/warmvm".into(),
        },
        pid: 1,
        updated_unix_ms: 1,
        health: Health::Ok,
        vms: Vec::new(),
        aging: None,
        migration_addr: None,
        last_reboot: None,
    };
    let value = String::from_utf8(encode(&record)).unwrap();
    etcdctl(
        rig,
        &["put", &format!("--lease={id}"), &keys::host(name), &value],
    );
}

/// `warmvm fleet ARGS --etcd ... (TLS files)` from host 0's namespace; `cert` false leaves
/// the client certificate out.
fn fleet(rig: &EtcdCluster, cert: bool, args: &[&str]) -> Output {
    let tls = rig.tls().expect("a TLS rig");
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        rig.netns(0),
        env!("CARGO_BIN_EXE_warmvm"),
        "fleet",
    ])
    .args(args)
    .args(["--etcd", &rig.endpoints()])
    .arg("--etcd-ca")
    .arg(&tls.ca);
    if cert {
        c.arg("--etcd-cert")
            .arg(&tls.cert)
            .arg("--etcd-key")
            .arg(&tls.key);
    }
    c.output().expect("run warmvm fleet")
}

#[test]
fn roll_refuses_each_bad_input_with_nothing_stored_then_stores_one_plan_and_resume_clears_a_halt() {
    if !etcd_available("fleet_roll") {
        return;
    }
    let rig = EtcdCluster::start("roll", 1, true);
    register(&rig, "h0");
    register(&rig, "h1");
    let dir = warmvm_testkit::scratch("fleet-roll");
    let binary = dir.join("warmvm-next");
    std::fs::write(&binary, b"abc").unwrap();
    let bin = binary.display().to_string();
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    let zeros = "00".repeat(32);
    let missing = dir.join("missing").display().to_string();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--max-unavailable", "0"],
            "--max-unavailable must be at least 1",
        ),
        (
            vec!["--canary", "3"],
            "--canary 3 is more than the plan's 2 host(s)",
        ),
        (vec!["--binary", &bin], "--binary needs --sha256"),
        (vec!["--sha256", abc], "--sha256 needs --binary"),
        (
            vec!["--binary", &bin, "--sha256", "12ab"],
            "not 64 lower-case hex digits",
        ),
        (
            vec!["--binary", &missing, "--sha256", abc],
            "cannot read binary",
        ),
        (vec!["--binary", &bin, "--sha256", &zeros], "not the 0000"),
        (vec!["--hosts", "h0,h9"], "host(s) h9 not registered"),
        (vec!["--hosts", "h0,H/1"], "is not 1 to 63 of a-z"),
    ];
    let before = revision(&rig);
    for (args, want) in &cases {
        let mut all = vec!["roll", "--mode", "warm"];
        all.extend(args.iter().copied());
        let out = fleet(&rig, true, &all);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr:?} lacks {want:?}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr:?}");
        assert_eq!(revision(&rig), before, "{args:?}: something was stored");
    }

    // Without a client certificate the cluster refuses the CLI: a failure, nothing stored.
    let out = fleet(&rig, false, &["roll", "--mode", "warm"]);
    assert_eq!(out.status.code(), Some(3), "{:?}", text(&out));
    assert_eq!(revision(&rig), before);

    // A good plan: its id is printed and it is the current plan.
    let out = fleet(
        &rig,
        true,
        &[
            "roll", "--mode", "warm", "--binary", &bin, "--sha256", abc, "--soak", "5",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let id = stdout.trim().to_string();
    assert!(id.starts_with("plan-"), "{stdout}");
    let current = etcdctl(&rig, &["get", &keys::current_plan(), "--print-value-only"]);
    assert_eq!(current.trim(), id);
    let spec = etcdctl(&rig, &["get", &keys::plan(&id), "--print-value-only"]);
    let spec: serde_json::Value = serde_json::from_str(spec.trim()).unwrap();
    assert_eq!(spec["hosts"], serde_json::json!(["h0", "h1"]));
    assert_eq!(spec["target"]["sha256"], abc);
    assert_eq!(spec["soak_secs"], 5);

    // A second plan while it runs: refused, nothing stored.
    let before = revision(&rig);
    let out = fleet(
        &rig,
        true,
        &["roll", "--mode", "cold", "--hosts", "h1", "--json"],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("plan {id} is running")),
        "{stderr}"
    );
    assert_eq!(revision(&rig), before);

    // Resume with no halt set changes nothing; with one, clears it and records it.
    let out = fleet(&rig, true, &["resume"]);
    assert!(out.status.success());
    assert!(text(&out).0.contains("not halted"), "{:?}", text(&out));
    assert_eq!(revision(&rig), before);
    let halt = HaltRecord::new("h0", "gate failed: guest mismatch");
    let halt = String::from_utf8(encode(&halt)).unwrap();
    etcdctl(&rig, &["put", &keys::halt(), &halt]);
    let out = fleet(&rig, true, &["resume", "--json"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["resumed"], true);
    assert_eq!(v["halt"]["reason"], "gate failed: guest mismatch");
    let left = etcdctl(&rig, &["get", &keys::halt(), "--print-value-only"]);
    assert_eq!(left.trim(), "", "the halt is cleared");
    let events = etcdctl(
        &rig,
        &[
            "get",
            &keys::events_prefix(),
            "--prefix",
            "--print-value-only",
        ],
    );
    assert!(
        events.contains("\"plan-created\"") && events.contains("\"resumed\""),
        "{events}"
    );
}
