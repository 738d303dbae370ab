//! Fleet membership against real etcd (the test kit's rig: members in network namespaces of
//! their own, one daemon per host namespace): hosts register under their lease, the
//! record stays through a warm reboot and goes with the daemon, a daemon that loses etcd
//! keeps its VMs, one without a client certificate or with a name already held stays out.
//! Seccomp is on (the daemon's default). Needs root, KVM and etcd (skipped without them,
//! failing under `WARMVM_REQUIRE_KVM=1`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use warmvm_testkit::{
    daemon_command, etcd_available, judge, kvm_available, refused, scratch, wait_until,
    warmvm_binary, Daemon, EtcdCluster,
};

/// The membership lease's TTL (warmvm_fleet::membership::LEASE_TTL_SECS).
const TTL: Duration = Duration::from_secs(5);

fn can_run(test: &str) -> bool {
    kvm_available(test) && etcd_available(test)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn host_key(name: &str) -> String {
    format!("/warmvm/hosts/{name}")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The host record at `name`, as etcd holds it now (None when absent).
fn record(rig: &EtcdCluster, name: &str) -> Option<Value> {
    let out = rig.etcdctl(&["get", &host_key(name), "--print-value-only"]);
    assert!(out.status.success(), "etcdctl get: {}", text(&out));
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!v.is_empty()).then(|| serde_json::from_str(&v).expect("a host record is JSON"))
}

/// The lease the key is under (0 when absent).
fn lease_of(rig: &EtcdCluster, name: &str) -> i64 {
    let out = rig.etcdctl(&["get", &host_key(name), "-w", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("etcdctl -w json");
    v["kvs"][0]["lease"].as_i64().unwrap_or(0)
}

/// A daemon on host `i` of the rig, named `name`, with the rig's fleet flags (with
/// `with_args` instead when given), and one reference VM `vm-NAME` of 64 MiB.
fn start_host(rig: &EtcdCluster, i: usize, name: &str, with_args: Option<Vec<String>>) -> Daemon {
    let dir = scratch(&format!("fleet-{name}-{i}-{}", now_ms() % 100_000));
    let mut args = with_args.unwrap_or_else(|| rig.fleet_args());
    args.extend(["--host-name".to_string(), name.to_string()]);
    let d = Daemon::builder(&dir)
        .netns(rig.netns(i))
        .args(&args)
        .start();
    d.create_reference_vms(&[&format!("vm-{name}")]);
    d
}

fn fleet_status(d: &Daemon) -> Value {
    d.client().status().expect("status")["fleet"].clone()
}

/// Wait until `name`'s record is there and written by `pid`.
fn wait_registered(rig: &EtcdCluster, name: &str, pid: u32, d: &Daemon) {
    assert!(
        wait_until(20, || record(rig, name)
            .is_some_and(|r| r["pid"].as_u64() == Some(u64::from(pid)))),
        "{name} (pid {pid}) never registered: {:?}\nstatus: {}\n{}",
        record(rig, name),
        fleet_status(d),
        d.log()
    );
}

/// The daemon's fleet thread runs under its own seccomp filter stacked on the main
/// thread's (mode 2, the main thread's two programs and its kind's two).
fn assert_fleet_thread_filtered(pid: u32) {
    let mut found = false;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() != "warmvm-fleet" {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let field = |name: &str| -> u32 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map_or(0, |v| v.trim().parse().unwrap())
        };
        assert_eq!(field("Seccomp:"), 2, "the fleet thread is unfiltered");
        assert!(field("Seccomp_filters:") >= 4, "{status}");
        found = true;
    }
    assert!(found, "no warmvm-fleet thread in daemon {pid}");
}

/// `warmvm fleet status ARGS` from host 0's namespace against the rig.
fn fleet_cli(rig: &EtcdCluster, extra: &[&str]) -> Output {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", rig.netns(0)])
        .arg(warmvm_binary())
        .args(["fleet", "status", "--etcd", &rig.endpoints()]);
    if let Some(t) = rig.tls() {
        c.arg("--etcd-ca").arg(&t.ca);
        c.arg("--etcd-cert").arg(&t.cert);
        c.arg("--etcd-key").arg(&t.key);
    }
    c.args(extra).output().expect("warmvm fleet status runs")
}

/// The sha256 of the daemon's executable, as its status says.
fn sha256_of(d: &Daemon) -> String {
    d.client().status().unwrap()["binary"]["sha256"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A watch event: PUT or DELETE, and the pid in the record put.
type Event = (String, Option<u64>);

/// `etcdctl watch KEY -w json` in host 0's namespace, its events collected by a thread.
struct Watch {
    child: std::process::Child,
    events: std::sync::Arc<std::sync::Mutex<Vec<Event>>>,
}

impl Watch {
    fn start(rig: &EtcdCluster, key: &str) -> Watch {
        let mut child = rig
            .etcdctl_command(0, &rig.endpoints(), true)
            .args(["watch", key, "-w", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcdctl watch");
        let out = child.stdout.take().unwrap();
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                for e in v["Events"].as_array().into_iter().flatten() {
                    let kind = if e["type"].as_i64() == Some(1) || e["type"] == "DELETE" {
                        "DELETE"
                    } else {
                        "PUT"
                    };
                    let pid = e["kv"]["value"]
                        .as_str()
                        .and_then(base64_decode)
                        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                        .and_then(|r| r["pid"].as_u64());
                    seen.lock().unwrap().push((kind.to_string(), pid));
                }
            }
        });
        Watch { child, events }
    }

    /// What the watch has seen so far.
    fn seen(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    fn stop(mut self) -> Vec<Event> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        let e = self.events.lock().unwrap().clone();
        e
    }
}

/// Standard base64 (etcdctl's JSON carries keys and values so).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    Some(out)
}

#[test]
fn three_hosts_register_keep_their_record_through_a_warm_reboot_and_leave_when_killed_or_stopped() {
    if !can_run("three_hosts_register") {
        return;
    }
    let rig = EtcdCluster::start("members", 3, true);
    let names = ["h0", "h1", "h2"];
    let mut hosts: Vec<Daemon> = names
        .iter()
        .enumerate()
        .map(|(i, n)| start_host(&rig, i, n, None))
        .collect();
    for (d, n) in hosts.iter().zip(names) {
        wait_registered(&rig, n, d.pid, d);
        assert_fleet_thread_filtered(d.pid);
    }
    // The guests verify, and the records say so (refreshed about every second).
    assert!(
        wait_until(20, || names.iter().all(
            |n| record(&rig, n).is_some_and(|r| r["vms"][0]["guest"]["verified_clean"] == true)
        )),
        "the records never showed verified guests: {:?}",
        names.map(|n| record(&rig, n))
    );
    // (a) every host in `fleet status --json`, with its build and its VM.
    let out = fleet_cli(&rig, &["--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let view: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    let listed = view["hosts"].as_array().expect("hosts");
    assert_eq!(listed.len(), 3, "{view:#}");
    for (d, n) in hosts.iter().zip(names) {
        let h = listed
            .iter()
            .find(|h| h["name"] == n)
            .unwrap_or_else(|| panic!("{n} not listed: {view:#}"));
        assert_eq!(h["build"]["sha256"], sha256_of(d), "{n}");
        assert_eq!(h["pid"].as_u64(), Some(u64::from(d.pid)), "{n}");
        assert_eq!(h["vms"][0]["name"], format!("vm-{n}"), "{n}");
        assert_eq!(h["vms"][0]["lifecycle"], "running", "{n}");
        assert_eq!(h["vms"][0]["memory_mib"], 64, "{n}");
        let fleet = fleet_status(d);
        assert_eq!(fleet["connected"], true, "{n}: {fleet}");
        assert_eq!(fleet["host_name"], n, "{n}: {fleet}");
        let metrics = d.client().raw("GET", "/metrics", None).expect("metrics");
        let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
        assert!(
            metrics.contains(&format!("warmvm_fleet_connected{{host=\"{n}\"}} 1")),
            "{metrics}"
        );
    }
    let table = fleet_cli(&rig, &[]);
    let table = text(&table);
    for n in names {
        assert!(table.lines().any(|l| l.starts_with(n)), "{table}");
    }
    eprintln!("{table}");

    // (b) a warm reboot of h0: the key is never deleted; its pid becomes the new daemon's.
    let lease_before = lease_of(&rig, "h0");
    assert_ne!(lease_before, 0);
    let watch = Watch::start(&rig, &host_key("h0"));
    let old_pid = hosts[0].pid;
    // The watch is in place once it has seen the old daemon's refresh (etcdctl takes a
    // while to start on a loaded machine).
    assert!(
        wait_until(15, || watch
            .seen()
            .iter()
            .any(|(_, p)| *p == Some(u64::from(old_pid)))),
        "the watch saw no refresh by the old daemon: {:?}",
        watch.seen()
    );
    let report = hosts[0]
        .client()
        .reboot("warm", None)
        .unwrap_or_else(|e| panic!("the warm reboot failed: {e}\n{}", hosts[0].log()));
    let new_pid = report["new_pid"].as_u64().expect("new_pid") as u32;
    hosts[0].follow_reboot(new_pid);
    wait_registered(&rig, "h0", new_pid, &hosts[0]);
    // A few refreshes by the new daemon, then the watch's view.
    std::thread::sleep(Duration::from_secs(2));
    let events = watch.stop();
    assert!(
        events.iter().all(|(k, _)| k == "PUT"),
        "the record went away during the warm reboot: {events:?}"
    );
    let pids: Vec<u64> = events.iter().filter_map(|(_, p)| *p).collect();
    assert!(pids.contains(&u64::from(old_pid)), "{events:?}");
    assert_eq!(pids.last(), Some(&u64::from(new_pid)), "{events:?}");
    // Once the new daemon wrote, the old one never wrote again.
    let first_new = pids.iter().position(|&p| p == u64::from(new_pid)).unwrap();
    assert!(
        pids[first_new..].iter().all(|&p| p == u64::from(new_pid)),
        "{events:?}"
    );
    assert_eq!(lease_of(&rig, "h0"), lease_before, "the lease was adopted");
    assert_fleet_thread_filtered(new_pid);
    let fleet = fleet_status(&hosts[0]);
    assert_eq!(fleet["connected"], true, "{fleet}");
    let rec = record(&rig, "h0").unwrap();
    assert_eq!(rec["last_reboot"]["mode"], "warm", "{rec}");
    judge(&hosts[0].client(), &["vm-h0".to_string()]).expect("h0's guest runs on");

    // (c) SIGKILL h1: its record goes within the lease's TTL (+2 s).
    // SAFETY: kill has no memory effects; the pid is h1's daemon.
    unsafe { libc::kill(hosts[1].pid as i32, libc::SIGKILL) };
    let killed = Instant::now();
    assert!(
        wait_until(TTL.as_secs() + 2, || record(&rig, "h1").is_none()),
        "h1's record outlived its daemon by more than TTL + 2 s"
    );
    eprintln!(
        "h1's record gone {:.1} s after SIGKILL",
        killed.elapsed().as_secs_f64()
    );
    assert!(record(&rig, "h0").is_some() && record(&rig, "h2").is_some());
    // SIGTERM h2: the lease is revoked as it stops; the record is gone when it has exited.
    let status = hosts[2].terminate();
    assert!(status.success(), "{status:?}\n{}", hosts[2].log());
    assert!(
        record(&rig, "h2").is_none(),
        "h2's record outlived its daemon's stop\n{}",
        hosts[2].log()
    );
    assert!(
        hosts[2].log().contains("lease revoked"),
        "{}",
        hosts[2].log()
    );
    assert!(record(&rig, "h0").is_some());
}

#[test]
fn with_every_etcd_member_down_the_daemons_and_guests_run_on_and_the_records_come_back() {
    if !can_run("every_etcd_member_down") {
        return;
    }
    let rig = EtcdCluster::start("alldown", 3, false);
    let names = ["d0", "d1"];
    let hosts: Vec<Daemon> = names
        .iter()
        .enumerate()
        .map(|(i, n)| start_host(&rig, i, n, None))
        .collect();
    for (d, n) in hosts.iter().zip(names) {
        wait_registered(&rig, n, d.pid, d);
    }
    for i in 0..rig.len() {
        rig.kill(i);
    }
    for (d, n) in hosts.iter().zip(names) {
        assert!(
            wait_until(15, || fleet_status(d)["connected"] == false),
            "{n} still says connected with etcd gone: {}",
            fleet_status(d)
        );
        let f = fleet_status(d);
        assert!(f["error"].as_str().is_some_and(|e| !e.is_empty()), "{f}");
        let line = text(&d.cli(&["status"]));
        assert!(line.contains("NOT connected"), "{line}");
        let metrics = d.client().raw("GET", "/metrics", None).expect("metrics");
        let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
        assert!(
            metrics.contains(&format!("warmvm_fleet_connected{{host=\"{n}\"}} 0")),
            "{metrics}"
        );
    }
    // Past the lease's TTL: nothing of the VMs depends on etcd.
    std::thread::sleep(TTL + Duration::from_secs(1));
    for (d, n) in hosts.iter().zip(names) {
        judge(&d.client(), &[format!("vm-{n}")])
            .unwrap_or_else(|e| panic!("{n}'s guest with etcd down: {e:?}\n{}", d.log()));
        assert_eq!(fleet_status(d)["connected"], false);
    }
    let restarted_ms = now_ms();
    for i in 0..rig.len() {
        rig.restart(i);
    }
    assert!(
        rig.wait_healthy(Duration::from_secs(30)),
        "{}",
        rig.log_tails()
    );
    for (d, n) in hosts.iter().zip(names) {
        assert!(
            wait_until(30, || record(&rig, n)
                .is_some_and(|r| r["pid"].as_u64() == Some(u64::from(d.pid))
                    && r["updated_unix_ms"].as_u64() > Some(restarted_ms))),
            "{n}'s record did not come back: {:?}\n{}",
            record(&rig, n),
            d.log()
        );
        assert!(
            wait_until(10, || fleet_status(d)["connected"] == true),
            "{}",
            fleet_status(d)
        );
        judge(&d.client(), &[format!("vm-{n}")]).expect("the guest runs on");
        // Logged once per change, not once per failed attempt.
        let log = d.log();
        let lost = log.matches("fleet: not connected to etcd").count();
        assert!((1..=3).contains(&lost), "{lost} times:\n{log}");
    }
}

#[test]
fn a_daemon_without_a_client_certificate_never_registers_and_says_why() {
    if !can_run("without_a_client_certificate") {
        return;
    }
    let rig = EtcdCluster::start("nocert", 1, true);
    let ca: PathBuf = rig.tls().unwrap().ca.clone();
    let args = vec![
        "--fleet-etcd".to_string(),
        rig.endpoints(),
        "--fleet-etcd-ca".into(),
        ca.display().to_string(),
    ];
    let d = start_host(&rig, 0, "nocert", Some(args));
    // Several attempts' worth: it never gets in, and says so.
    std::thread::sleep(Duration::from_secs(6));
    assert!(record(&rig, "nocert").is_none());
    let f = fleet_status(&d);
    assert_eq!(f["connected"], false, "{f}");
    let why = f["error"].as_str().unwrap_or_default();
    assert!(why.contains("no etcd client certificate"), "{f}");
    assert!(
        d.log().contains("fleet: not connected to etcd"),
        "{}",
        d.log()
    );
    eprintln!("without a client certificate: {why}");
    judge(&d.client(), &["vm-nocert".to_string()]).expect("its guest runs regardless");
}

#[test]
fn a_second_daemon_with_the_same_name_is_refused_and_the_first_keeps_its_record() {
    if !can_run("same_name") {
        return;
    }
    let rig = EtcdCluster::start("samename", 1, false);
    let mut first = start_host(&rig, 0, "twin", None);
    wait_registered(&rig, "twin", first.pid, &first);
    let lease = lease_of(&rig, "twin");
    let second = start_host(&rig, 0, "twin", None);
    assert!(
        wait_until(15, || fleet_status(&second)["error"]
            .as_str()
            .is_some_and(|e| e.contains("held by another daemon"))),
        "the second daemon was not refused: {}\n{}",
        fleet_status(&second),
        second.log()
    );
    let f = fleet_status(&second);
    assert_eq!(f["connected"], false, "{f}");
    assert!(
        f["error"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {}", first.pid)),
        "{f}"
    );
    assert!(
        second.log().contains("held by another daemon"),
        "{}",
        second.log()
    );
    // The first's record is untouched: its pid, its lease, still refreshed.
    std::thread::sleep(Duration::from_secs(2));
    let r = record(&rig, "twin").unwrap();
    assert_eq!(r["pid"].as_u64(), Some(u64::from(first.pid)), "{r}");
    assert_eq!(lease_of(&rig, "twin"), lease);
    assert_eq!(fleet_status(&first)["connected"], true);
    // The first leaves: the name is free, and the second takes it.
    assert!(first.terminate().success());
    wait_registered(&rig, "twin", second.pid, &second);
    assert!(
        wait_until(5, || fleet_status(&second)["connected"] == true),
        "{}",
        fleet_status(&second)
    );
}

/// Bad fleet flags or config: one line naming the flag, exit 2, before any VM of the
/// config starts and before the socket is bound. Needs neither KVM nor etcd.
#[test]
fn bad_fleet_flags_stop_the_daemon_at_start_with_one_line() {
    let dir = scratch("fleet-badflags");
    let config = dir.join("vms.toml");
    std::fs::write(&config, "[[vm]]\nname = \"a\"\nmemory_mib = 64\n").unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--fleet-etcd", "http://10.0.0.1:2379"],
            "needs --host-name",
        ),
        (&["--host-name", "h1"], "needs --fleet-etcd"),
        (
            &["--fleet-etcd", "http://10.0.0.1:2379", "--host-name", "H_1"],
            "--host-name \"H_1\"",
        ),
        (
            &["--fleet-etcd", "10.0.0.1:2379", "--host-name", "h1"],
            "http://HOST:PORT",
        ),
        (
            &["--fleet-etcd", "https://10.0.0.1:2379", "--host-name", "h1"],
            "--fleet-etcd-ca",
        ),
        (
            &[
                "--fleet-etcd",
                "https://10.0.0.1:2379",
                "--host-name",
                "h1",
                "--fleet-etcd-ca",
                "/nonexistent/ca.pem",
            ],
            "/nonexistent/ca.pem",
        ),
    ];
    for (args, says) in cases {
        let sock = dir.join("x.sock");
        let out = refused(
            daemon_command(&sock)
                .arg("--state-dir")
                .arg(dir.join("state"))
                .arg("--config")
                .arg(&config)
                .args(args),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(!sock.exists(), "{args:?}");
        assert!(!err.contains("VM started"), "{args:?}: {err}");
    }
    // The config's [fleet] is checked the same way.
    let with_fleet = dir.join("fleet.toml");
    std::fs::write(&with_fleet, "[fleet]\netcd = [\"http://10.0.0.1:2379\"]\n").unwrap();
    let out = refused(
        daemon_command(&dir.join("y.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--config")
            .arg(&with_fleet),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --host-name"));
    let _ = std::fs::remove_dir_all(&dir);
}
