//! A rolling plan carried out by the daemons themselves, against real etcd (the test kit's
//! rig: three members speaking mTLS only, one daemon per host namespace, each with two
//! reference VMs of 64 MiB): one of them leads, each host takes a slot, starts its step,
//! warm-reboots into the plan's build, gates it and releases the slot. Seccomp is on (the
//! daemon's default). Needs root, KVM and etcd (skipped without them, failing under
//! `WARMVM_REQUIRE_KVM=1`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use warmvm_testkit::{
    etcd_available, judge, kvm_available, scratch, wait_until, warmvm_binary, Daemon, EtcdCluster,
};

fn can_run(test: &str) -> bool {
    kvm_available(test) && etcd_available(test)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The JSON value at `key` (None when absent).
fn get(rig: &EtcdCluster, key: &str) -> Option<Value> {
    let out = rig.etcdctl(&["get", key, "--print-value-only"]);
    assert!(out.status.success(), "etcdctl get: {}", text(&out));
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!v.is_empty()).then(|| serde_json::from_str(&v).expect("a record is JSON"))
}

/// Every value under `prefix`, in key order.
fn get_prefix(rig: &EtcdCluster, prefix: &str) -> Vec<Value> {
    let out = rig.etcdctl(&["get", prefix, "--prefix", "--print-value-only"]);
    assert!(out.status.success(), "etcdctl get: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn host_record(rig: &EtcdCluster, name: &str) -> Option<Value> {
    get(rig, &format!("/warmvm/hosts/{name}"))
}

/// A daemon on host `i` of the rig with the rig's fleet flags and two reference VMs.
fn start_host(rig: &EtcdCluster, i: usize, name: &str) -> Daemon {
    let dir = scratch(&format!("fleet-roll-{name}-{}", now_ms() % 100_000));
    let mut args = rig.fleet_args();
    args.extend(["--host-name".to_string(), name.to_string()]);
    let d = Daemon::builder(&dir)
        .netns(rig.netns(i))
        .args(&args)
        .start();
    d.create_reference_vms(&[&format!("a-{name}"), &format!("b-{name}")]);
    d
}

fn vm_names(name: &str) -> Vec<String> {
    vec![format!("a-{name}"), format!("b-{name}")]
}

/// `warmvm fleet ARGS --etcd ... (TLS files)` from host 0's namespace.
fn fleet(rig: &EtcdCluster, args: &[&str]) -> Output {
    let tls = rig.tls().expect("a TLS rig");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", rig.netns(0)])
        .arg(warmvm_binary())
        .arg("fleet")
        .args(args)
        .args(["--etcd", &rig.endpoints()])
        .arg("--etcd-ca")
        .arg(&tls.ca)
        .arg("--etcd-cert")
        .arg(&tls.cert)
        .arg("--etcd-key")
        .arg(&tls.key);
    c.output().expect("run warmvm fleet")
}

/// A build other than the test's: its binary with a few bytes appended (still a valid
/// ELF, another sha256), and that sha256.
fn other_build(dir: &Path, tail: &[u8]) -> (PathBuf, String) {
    let path = dir.join("warmvm-next");
    let mut bytes = std::fs::read(warmvm_binary()).expect("read the test's warmvm");
    bytes.extend_from_slice(tail);
    std::fs::write(&path, &bytes).unwrap();
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).unwrap();
    let sha = warmvm_fleet::plan::file_sha256(&path).expect("its sha256");
    (path, sha)
}

/// Each VM's uptime, by name, as the daemon lists it.
fn uptimes(d: &Daemon) -> BTreeMap<String, u64> {
    let list = d.client().list().expect("list the VMs");
    list["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or_default().to_string(),
                v["uptime_ms"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// The rig, three daemons registered with verifying guests, and the plan's other build.
struct Fleet {
    rig: EtcdCluster,
    names: [&'static str; 3],
    hosts: Vec<Daemon>,
}

fn fleet_of_three(tag: &str) -> Fleet {
    let rig = EtcdCluster::start(tag, 3, true);
    let names = ["h0", "h1", "h2"];
    let hosts: Vec<Daemon> = names
        .iter()
        .enumerate()
        .map(|(i, n)| start_host(&rig, i, n))
        .collect();
    assert!(
        wait_until(60, || names.iter().all(|n| host_record(&rig, n)
            .is_some_and(|r| r["vms"].as_array().is_some_and(|vms| vms.len()
                == 2
                && vms.iter().all(|v| v["guest"]["verified_clean"] == true
                    && v["guest"]["counter"].as_u64() > Some(0)))))),
        "the records never showed verifying guests: {:?}",
        names.map(|n| host_record(&rig, n))
    );
    Fleet { rig, names, hosts }
}

/// Poll the hosts' records until `done` says so (or `limit` passes), checking every
/// reference guest's counter never goes back and following each host's daemon to the new
/// process a reboot started. Returns whether `done` came true.
fn watch_roll(f: &mut Fleet, limit: Duration, done: &dyn Fn(&EtcdCluster) -> bool) -> bool {
    let mut counters: BTreeMap<String, u64> = BTreeMap::new();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        for (i, n) in f.names.iter().enumerate() {
            let Some(r) = host_record(&f.rig, n) else {
                continue;
            };
            for v in r["vms"].as_array().into_iter().flatten() {
                let name = v["name"].as_str().unwrap_or_default().to_string();
                let c = v["guest"]["counter"].as_u64().unwrap_or(0);
                let before = counters.entry(name.clone()).or_insert(0);
                assert!(
                    c >= *before,
                    "{name}'s guest counter went back from {before} to {c}: its VM restarted"
                );
                *before = c;
            }
            let pid = r["pid"].as_u64().unwrap_or(0) as u32;
            if pid != 0 && pid != f.hosts[i].pid {
                f.hosts[i].follow_reboot(pid);
            }
        }
        if done(&f.rig) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    false
}

fn progress(rig: &EtcdCluster, plan: &str) -> Value {
    get(rig, &format!("/warmvm/plans/{plan}/progress")).unwrap_or(Value::Null)
}

fn steps(rig: &EtcdCluster, plan: &str) -> Vec<Value> {
    get_prefix(rig, &format!("/warmvm/plans/{plan}/steps/"))
}

fn events(rig: &EtcdCluster) -> Vec<Value> {
    get_prefix(rig, "/warmvm/events/")
}

fn roll(f: &Fleet, binary: &Path, sha: &str, extra: &[&str]) -> String {
    let bin = binary.display().to_string();
    let mut args = vec![
        "roll",
        "--mode",
        "warm",
        "--binary",
        &bin,
        "--sha256",
        sha,
        "--soak",
        "5",
        "--max-unavailable",
        "1",
        "--hosts",
        "h0,h1,h2",
    ];
    args.extend(extra);
    let out = fleet(&f.rig, &args);
    assert!(out.status.success(), "fleet roll: {}", text(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(id.starts_with("plan-"), "{id}");
    id
}

#[test]
fn the_daemons_roll_a_new_build_across_three_hosts_one_at_a_time_and_no_vm_restarts() {
    if !can_run("fleet_roll_hosts") {
        return;
    }
    let mut f = fleet_of_three("rollhosts");
    let dir = scratch(&format!("fleet-roll-build-{}", now_ms() % 100_000));
    let (binary, sha) = other_build(&dir, b"fleet-roll-next");
    let old_sha = host_record(&f.rig, "h0").unwrap()["build"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(old_sha, sha);
    let uptimes_before: Vec<BTreeMap<String, u64>> = f.hosts.iter().map(uptimes).collect();
    let started = Instant::now();
    let id = roll(&f, &binary, &sha, &[]);
    let finished = watch_roll(&mut f, Duration::from_secs(240), &|rig| {
        progress(rig, &id)["status"] == "done"
    });
    let took = started.elapsed();
    let logs: String = f.hosts.iter().map(|d| d.log()).collect();
    assert!(
        finished,
        "the plan did not finish: {:#}\nsteps: {:#?}\nevents: {:#?}\n{logs}",
        progress(&f.rig, &id),
        steps(&f.rig, &id),
        events(&f.rig)
    );
    // Every host runs the new build; every step passed its gate, each started once.
    let steps = steps(&f.rig, &id);
    assert_eq!(steps.len(), 3, "{steps:#?}");
    for s in &steps {
        assert_eq!(s["state"], "gate-passed", "{s:#}");
        assert_eq!(s["from_sha256"], old_sha.as_str(), "{s:#}");
        assert_eq!(s["to_sha256"], sha.as_str(), "{s:#}");
        assert_eq!(s["vms_before"].as_array().map(Vec::len), Some(2), "{s:#}");
    }
    let history = events(&f.rig);
    for n in f.names {
        let count = |kind: &str| {
            history
                .iter()
                .filter(|e| e["kind"] == kind && e["host"] == n && e["plan"] == id.as_str())
                .count()
        };
        assert_eq!(count("step-started"), 1, "{n}: {history:#?}");
        assert_eq!(count("gate-passed"), 1, "{n}: {history:#?}");
        assert_eq!(count("gate-failed"), 0, "{n}: {history:#?}");
    }
    assert!(get(&f.rig, "/warmvm/halt").is_none());
    // `fleet status` shows the finished plan, its steps and the history.
    let out = fleet(&f.rig, &["status", "--events", "200"]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains(&format!("plan {id}: done")), "{shown}");
    for n in f.names {
        assert!(
            shown.contains(&format!("  step {n}: gate-passed")),
            "{shown}"
        );
        assert!(
            shown.contains(&format!(" gate-passed host {n} plan {id}")),
            "{shown}"
        );
    }
    // One election only: every host rebooted, the leader's too, and its new daemon led on
    // with the election key its lease kept instead of campaigning again.
    let elected: Vec<&Value> = history
        .iter()
        .filter(|e| e["kind"] == "leader-elected")
        .collect();
    assert_eq!(elected.len(), 1, "{history:#?}");
    let out = f
        .rig
        .etcdctl(&["get", "/warmvm/slots/", "--prefix", "--keys-only"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "a slot is still held: {}",
        text(&out)
    );
    // At most one host was in a step at a time: each step started after the one before
    // it finished.
    let mut spans: Vec<(u64, u64)> = steps
        .iter()
        .map(|s| {
            (
                s["started_unix_ms"].as_u64().unwrap(),
                s["finished_unix_ms"].as_u64().unwrap(),
            )
        })
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1, "two steps overlapped: {spans:?}");
    }
    for (i, n) in f.names.iter().enumerate() {
        let r = host_record(&f.rig, n).unwrap();
        assert_eq!(r["build"]["sha256"], sha.as_str(), "{n}: {r:#}");
        assert_eq!(r["pid"].as_u64(), Some(u64::from(f.hosts[i].pid)), "{n}");
        judge(&f.hosts[i].client(), &vm_names(n))
            .unwrap_or_else(|e| panic!("{n}'s guests: {e:?}\n{}", f.hosts[i].log()));
        let after = uptimes(&f.hosts[i]);
        for (vm, before) in &uptimes_before[i] {
            let now = after.get(vm).copied().unwrap_or(0);
            assert!(
                now >= before + took.as_millis() as u64 - 1000,
                "{vm} restarted: uptime {before} ms before the roll, {now} ms after it ({took:?} later)"
            );
        }
    }
    eprintln!("roll of 3 hosts: {:.1} s in all", took.as_secs_f64());
    for s in &steps {
        eprintln!(
            "  {}: blackout p99 {} us, step {} ms",
            s["host"].as_str().unwrap_or_default(),
            s["blackout_p99_us"],
            s["finished_unix_ms"].as_u64().unwrap_or(0)
                - s["started_unix_ms"].as_u64().unwrap_or(0)
        );
    }
}

#[test]
fn a_canary_that_fails_its_gate_halts_the_fleet_goes_back_to_its_build_and_no_other_host_starts() {
    if !can_run("fleet_roll_hosts_halt") {
        return;
    }
    let mut f = fleet_of_three("rollhalt");
    let dir = scratch(&format!("fleet-halt-build-{}", now_ms() % 100_000));
    let (binary, sha) = other_build(&dir, b"fleet-roll-canary");
    let old_sha = host_record(&f.rig, "h0").unwrap()["build"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let pids: Vec<u32> = f.hosts.iter().map(|d| d.pid).collect();
    let uptimes_before: Vec<BTreeMap<String, u64>> = f.hosts.iter().map(uptimes).collect();
    let started = Instant::now();
    // No warm reboot has a blackout of 1 us: the canary's blackout gate fails.
    let id = roll(&f, &binary, &sha, &["--blackout-limit-us", "1"]);
    // The canary reboots twice: into the new build, then back to its own.
    let back = watch_roll(&mut f, Duration::from_secs(180), &|rig| {
        get(rig, "/warmvm/halt").is_some()
            && host_record(rig, "h0").is_some_and(|r| {
                r["build"]["sha256"] == old_sha.as_str()
                    && r["last_reboot"]["from_sha256"] == sha.as_str()
            })
    });
    let logs: String = f.hosts.iter().map(|d| d.log()).collect();
    assert!(
        back,
        "the canary did not halt and go back: halt {:?}\nh0: {:#?}\nsteps: {:#?}\nevents: {:#?}\n{logs}",
        get(&f.rig, "/warmvm/halt"),
        host_record(&f.rig, "h0"),
        steps(&f.rig, &id),
        events(&f.rig)
    );
    let took = started.elapsed();
    let halt = get(&f.rig, "/warmvm/halt").unwrap();
    assert_eq!(halt["host"], "h0", "{halt:#}");
    assert_eq!(halt["plan"], id.as_str(), "{halt:#}");
    assert!(
        halt["reason"].as_str().unwrap().contains("blackout"),
        "{halt:#}"
    );
    // Give the coordinator a few rounds: still no other host is assigned.
    std::thread::sleep(Duration::from_secs(3));
    let all = steps(&f.rig, &id);
    assert_eq!(all.len(), 1, "another host got a step: {all:#?}");
    let s = &all[0];
    assert_eq!(s["host"], "h0");
    assert_eq!(s["state"], "failed", "{s:#}");
    assert_eq!(s["to_sha256"], sha.as_str(), "{s:#}");
    let blackout = s["gates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["gate"] == "blackout")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(blackout["passed"], false, "{s:#}");
    let history = events(&f.rig);
    let count = |kind: &str, host: &str| {
        history
            .iter()
            .filter(|e| e["kind"] == kind && e["host"] == host)
            .count()
    };
    assert_eq!(count("step-started", "h0"), 1, "{history:#?}");
    assert_eq!(count("gate-failed", "h0"), 1, "{history:#?}");
    for n in ["h1", "h2"] {
        assert_eq!(count("step-started", n), 0, "{history:#?}");
    }
    let out = f
        .rig
        .etcdctl(&["get", "/warmvm/slots/", "--prefix", "--keys-only"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "a slot is still held: {}",
        text(&out)
    );
    // h1 and h2 never rebooted; every VM runs and verifies, none restarted.
    assert_eq!(f.hosts[1].pid, pids[1]);
    assert_eq!(f.hosts[2].pid, pids[2]);
    assert_ne!(f.hosts[0].pid, pids[0]);
    for (i, n) in f.names.iter().enumerate() {
        let r = host_record(&f.rig, n).unwrap();
        assert_eq!(r["build"]["sha256"], old_sha.as_str(), "{n}: {r:#}");
        judge(&f.hosts[i].client(), &vm_names(n))
            .unwrap_or_else(|e| panic!("{n}'s guests: {e:?}\n{}", f.hosts[i].log()));
        let after = uptimes(&f.hosts[i]);
        for (vm, before) in &uptimes_before[i] {
            let now = after.get(vm).copied().unwrap_or(0);
            assert!(
                now >= before + took.as_millis() as u64 - 1000,
                "{vm} restarted: uptime {before} ms before, {now} ms after ({took:?} later)"
            );
        }
    }
    eprintln!(
        "canary failed its gate, halted and back on its build {:.1} s after the plan",
        took.as_secs_f64()
    );
}

#[test]
fn the_leader_killed_mid_roll_is_replaced_within_its_lease_and_no_step_runs_twice() {
    if !can_run("fleet_roll_hosts_leader_killed") {
        return;
    }
    let mut f = fleet_of_three("rollkill");
    let dir = scratch(&format!("fleet-kill-build-{}", now_ms() % 100_000));
    let (binary, sha) = other_build(&dir, b"fleet-roll-leader-killed");
    let elected = |rig: &EtcdCluster| -> Vec<Value> {
        events(rig)
            .into_iter()
            .filter(|e| e["kind"] == "leader-elected")
            .collect()
    };
    assert!(
        wait_until(30, || !elected(&f.rig).is_empty()),
        "nobody leads: {:#?}",
        events(&f.rig)
    );
    let leader = elected(&f.rig)[0]["host"]
        .as_str()
        .expect("the leader names its host")
        .to_string();
    let leader_index = f
        .names
        .iter()
        .position(|n| *n == leader)
        .expect("a host of ours");
    // A host that is gone when its turn comes is skipped, so the roll can complete without
    // the killed leader (whose VMs die with it: the process that owned them was killed).
    let id = roll(&f, &binary, &sha, &["--on-missing-host", "skip"]);
    let canary_passed = |rig: &EtcdCluster| {
        events(rig)
            .iter()
            .any(|e| e["kind"] == "gate-passed" && e["host"] == "h0" && e["plan"] == id.as_str())
    };
    assert!(
        watch_roll(&mut f, Duration::from_secs(120), &canary_passed),
        "the canary never passed: {:#?}",
        events(&f.rig)
    );
    // Mid-roll, in the soak after the canary: the leader's daemon is killed.
    let killed_pid = f.hosts[leader_index].pid;
    let killed_at = now_ms();
    let status = Command::new("kill")
        .args(["-KILL", &killed_pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let finished = watch_roll(&mut f, Duration::from_secs(240), &|rig| {
        progress(rig, &id)["status"] == "done"
    });
    let history = events(&f.rig);
    assert!(
        finished,
        "the plan did not finish after the leader was killed: {:#}\n{history:#?}",
        progress(&f.rig, &id)
    );
    // Another host leads, within the lease's TTL (5 s) and 3 s.
    let next = elected(&f.rig)
        .into_iter()
        .find(|e| e["host"] != leader.as_str() && e["at_unix_ms"].as_u64() > Some(killed_at))
        .unwrap_or_else(|| panic!("no other host took the lead: {history:#?}"));
    let took_ms = next["at_unix_ms"].as_u64().unwrap() - killed_at;
    eprintln!(
        "leader {leader} killed; {} leads {took_ms} ms later",
        next["host"].as_str().unwrap_or_default()
    );
    assert!(
        took_ms <= 8_000,
        "the new leader took {took_ms} ms: {history:#?}"
    );
    // No step ran twice; every host still alive passed its gate on the new build.
    for (i, n) in f.names.iter().enumerate() {
        let count = |kind: &str| {
            history
                .iter()
                .filter(|e| e["kind"] == kind && e["host"] == *n && e["plan"] == id.as_str())
                .count()
        };
        assert!(
            count("step-started") <= 1,
            "{n} started twice: {history:#?}"
        );
        if i == leader_index {
            continue;
        }
        assert_eq!(count("step-started"), 1, "{n}: {history:#?}");
        assert_eq!(count("gate-passed"), 1, "{n}: {history:#?}");
        let r = host_record(&f.rig, n).unwrap();
        assert_eq!(r["build"]["sha256"], sha.as_str(), "{n}: {r:#}");
        judge(&f.hosts[i].client(), &vm_names(n))
            .unwrap_or_else(|e| panic!("{n}'s guests: {e:?}\n{}", f.hosts[i].log()));
    }
}
