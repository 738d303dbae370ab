//! A long reboot never takes the API away: while a cold reboot waits for a guest that
//! never says it is up, `warmvm status` and the metrics port answer, status shows the
//! reboot in progress, changes are refused, and the `warmvm reboot` that started it reports
//! how it really ended. Also the CLI's limits on a reboot: `--timeout` (it stops waiting
//! and says how far the reboot is; the reboot goes on) and `--stage-timeout-ms` (the new
//! daemon's preparation).

use std::io::{Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warmvm_testkit::{scratch, wait_until, Daemon};

const BIN: &str = env!("CARGO_BIN_EXE_warmvm");

/// The correctness bound on every answer while the reboot runs (not a speed figure: an
/// answer that waits for the reboot takes seconds).
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// A reference guest that stays in its booting phase for ten minutes: never up within
/// any boot wait these tests use.
fn slow_booting_vm(name: &str) -> Value {
    json!({ "name": name, "memory_mib": 64, "cmdline": "quiet boot_delay_ms=600000" })
}

fn create_slow(d: &Daemon, name: &str) {
    d.client()
        .create(&serde_json::from_value(slow_booting_vm(name)).unwrap())
        .unwrap_or_else(|e| panic!("{name}: {e}\n{}", d.log()));
    // Running, and not up: its guest says it is booting.
    assert!(
        wait_until(30, || {
            let vm = warmvm_testkit::show(d, name);
            vm["state"] == "running"
                && vm["guest"]["vcpus"]
                    .as_array()
                    .is_some_and(|v| !v.is_empty() && v.iter().all(|c| c["phase"] == "booting"))
        }),
        "the guest never reported its booting phase: {}\n{}",
        warmvm_testkit::show(d, name),
        d.log()
    );
}

/// Run the CLI with `args` against `d`, killed if it has not exited after `limit`.
fn cli_within(d: &Daemon, args: &[&str], limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--socket")
        .arg(&d.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() && started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = started.elapsed();
    let _ = child.kill();
    (child.wait_with_output().unwrap(), took)
}

/// `GET /metrics` on the loopback port, with a read timeout of `limit`.
fn scrape(addr: &str, limit: Duration) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

fn start_reboot(d: &Daemon, args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .arg("--socket")
        .arg(&d.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

#[test]
fn a_cold_reboot_waiting_for_a_guest_never_takes_the_api_away() {
    if !warmvm_testkit::kvm_available("reboot_served") {
        return;
    }
    let dir = scratch("reboot-served");
    let metrics = "127.0.0.1:19483";
    let mut d = Daemon::start(&dir, &["--metrics-addr", metrics]);
    create_slow(&d, "slow");
    let old_pid = d.pid;
    let boot_wait = 6;
    let mut reboot = start_reboot(
        &d,
        &[
            "reboot",
            "--mode",
            "cold",
            "--grace-secs",
            "2",
            "--boot-wait-secs",
            &boot_wait.to_string(),
            "--json",
        ],
    );
    let started = Instant::now();
    let (mut statuses, mut scrapes) = (0, 0);
    let mut phases: Vec<String> = Vec::new();
    let mut pause_refused = None;
    let (mut slowest_status, mut slowest_scrape) = (Duration::ZERO, Duration::ZERO);
    while reboot.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the reboot did not end\n{}",
            d.log()
        );
        let (out, took) = cli_within(&d, &["status", "--json"], ANSWER_WITHIN * 5);
        assert!(
            out.status.success() && took <= ANSWER_WITHIN,
            "warmvm status took {took:?} during the reboot ({:?}): {}\n{}",
            out.status,
            text(&out.stderr),
            d.log()
        );
        statuses += 1;
        slowest_status = slowest_status.max(took);
        let s: Value = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(p) = s["reboot_in_progress"]["phase"].as_str() {
            if phases.last().map(String::as_str) != Some(p) {
                phases.push(p.to_string());
            }
            assert_eq!(s["reboot_in_progress"]["mode"], "cold", "{s}");
            // The new daemon serves while its guest boots: a change is refused at once.
            if p == "waiting-for-guests" && pause_refused.is_none() {
                let (out, took) = cli_within(&d, &["vm", "pause", "slow"], ANSWER_WITHIN * 5);
                assert!(took <= ANSWER_WITHIN, "vm pause took {took:?}");
                pause_refused = Some((out.status.code(), text(&out.stderr)));
            }
        }
        // The VM list and the VM itself answer too (the VM may be missing for a moment,
        // between the old daemon handing it over and the new one creating it: 404).
        for args in [
            &["vm", "list", "--json"][..],
            &["vm", "show", "slow", "--json"],
        ] {
            let (out, took) = cli_within(&d, args, ANSWER_WITHIN * 5);
            let answered = out.status.success()
                || (out.status.code() == Some(2) && text(&out.stderr).contains("no VM named slow"));
            assert!(
                answered && took <= ANSWER_WITHIN,
                "warmvm {args:?} took {took:?} during the reboot ({:?}): {}",
                out.status,
                text(&out.stderr)
            );
        }
        let t = Instant::now();
        let scraped = scrape(metrics, ANSWER_WITHIN * 5);
        let took = t.elapsed();
        assert!(
            matches!(&scraped, Ok(m) if m.starts_with("HTTP/1.1 200") && m.contains("warmvm_vms"))
                && took <= ANSWER_WITHIN,
            "GET /metrics took {took:?} during the reboot: {scraped:?}\n{}",
            d.log()
        );
        scrapes += 1;
        slowest_scrape = slowest_scrape.max(took);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = reboot.wait_with_output().unwrap();
    eprintln!(
        "during the cold reboot: {statuses} `warmvm status` runs, slowest {slowest_status:?}; \
         {scrapes} scrapes, slowest {slowest_scrape:?}; phases seen {phases:?}"
    );
    // The whole boot wait was watched, answered throughout.
    assert!(
        started.elapsed() >= Duration::from_secs(boot_wait),
        "{:?}",
        started.elapsed()
    );
    assert!(statuses >= 10 && scrapes >= 10, "{statuses} {scrapes}");
    assert!(
        phases.iter().any(|p| p == "waiting-for-guests"),
        "the new daemon's wait for the guest was seen: {phases:?}"
    );
    let (code, why) = pause_refused.expect("a pause was tried during the wait");
    assert_eq!(code, Some(2), "{why}");
    assert!(why.contains("reboot is under way"), "{why}");
    // The reboot's real outcome, with the exit status of a failure on the daemon's side.
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}\n{}", d.log());
    assert!(
        err.contains("not every VM came back")
            && err.contains(&format!("did not say it was up within {boot_wait} s")),
        "{err}"
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    let new_pid = report["handover"]["new_pid"].as_u64().unwrap() as u32;
    assert_ne!(new_pid, old_pid);
    assert_eq!(report["reboot"]["previous_pid"], old_pid, "{report}");
    d.follow_reboot(new_pid);
    // The status text says how it went.
    let (out, _) = cli_within(&d, &["status"], Duration::from_secs(30));
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        shown.contains(&format!("last reboot: cold reboot from pid {old_pid}"))
            && shown.contains("0 of 1 VMs back")
            && shown.contains("NOT BACK: slow: the guest did not say it was up"),
        "{shown}"
    );
    assert!(!shown.contains("reboot in progress"), "{shown}");
    // The new daemon took over from the old one (with no live VM: they were powered off).
    assert!(
        shown.contains(&format!("last takeover: from pid {old_pid} (")),
        "{shown}"
    );
    d.terminate_adopted();
}

#[test]
fn the_cli_stops_waiting_at_its_timeout_and_says_how_far_the_reboot_is() {
    if !warmvm_testkit::kvm_available("reboot_cli_timeout") {
        return;
    }
    let dir = scratch("reboot-timeout");
    let mut d = Daemon::start(&dir, &[]);
    create_slow(&d, "slow");
    let refused = d.cli(&["reboot", "--mode", "cold", "--timeout", "0"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    let out = d.cli(&[
        "reboot",
        "--mode",
        "cold",
        "--grace-secs",
        "1",
        "--boot-wait-secs",
        "40",
        "--timeout",
        "4",
    ]);
    // Taken before the reboot's end: the CLI gave up while it still ran.
    let s = d.client().status().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}\n{}", d.log());
    assert!(
        err.contains("cold reboot: still under way after 4 s")
            && err.contains("waiting-for-guests"),
        "{err}"
    );
    assert_eq!(
        s["reboot_in_progress"]["phase"], "waiting-for-guests",
        "{s}"
    );
    let new_pid = s["pid"].as_u64().unwrap() as u32;
    d.follow_reboot(new_pid);
    // The reboot goes on without the CLI, and ends as it would have.
    let done = d
        .client()
        .wait_reboot_done(Some(u64::from(new_pid)), Duration::from_secs(90))
        .unwrap();
    assert!(
        done["last_reboot"]["vms"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("within 40 s")),
        "{done}"
    );
    d.terminate_adopted();
}

#[test]
fn the_stage_timeout_set_on_the_cli_bounds_a_new_daemon_that_hangs() {
    if !warmvm_testkit::kvm_available("reboot_stage_timeout") {
        return;
    }
    let dir = scratch("reboot-stage");
    let d = Daemon::start(&dir, &[]);
    warmvm_testkit::create(&d, "w1");
    // A "new daemon" that never says anything.
    let hang = dir.join("hang.sh");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&hang, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out_of_range = d.cli(&["reboot", "--mode", "warm", "--stage-timeout-ms", "50"]);
    assert_eq!(out_of_range.status.code(), Some(2));
    assert!(
        text(&out_of_range.stderr).contains("stage_timeout_ms = 50 is out of range"),
        "{}",
        text(&out_of_range.stderr)
    );
    let started = Instant::now();
    let reboot = start_reboot(
        &d,
        &[
            "reboot",
            "--mode",
            "warm",
            "--binary",
            hang.to_str().unwrap(),
            "--stage-timeout-ms",
            "3000",
        ],
    );
    // The old daemon serves while the new one (never) prepares: status answers, from the
    // same process, with the reboot in its staging phase.
    let mut seen_staging = false;
    let mut reboot = reboot;
    while reboot.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(60), "{}", d.log());
        let (out, took) = cli_within(&d, &["status", "--json"], ANSWER_WITHIN * 5);
        assert!(
            out.status.success() && took <= ANSWER_WITHIN,
            "warmvm status took {took:?} during the reboot: {}",
            text(&out.stderr)
        );
        let s: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(s["pid"].as_u64(), Some(u64::from(d.pid)), "{s}");
        if s["reboot_in_progress"]["phase"] == "starting" {
            assert_eq!(s["reboot_in_progress"]["mode"], "warm", "{s}");
            seen_staging = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = started.elapsed();
    let out = reboot.wait_with_output().unwrap();
    assert!(seen_staging, "the staging was never seen in the status");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("stage"), "{err}");
    // Bounded by the flag, not by the daemon's default of 30 s.
    assert!(took < Duration::from_secs(20), "{took:?}: {err}");
    // Nothing changed: the same daemon runs the VM on.
    let s = d.client().status().unwrap();
    assert_eq!(s["pid"].as_u64(), Some(u64::from(d.pid)));
    assert!(s["reboot_in_progress"].is_null(), "{s}");
    warmvm_testkit::verifies_on(&d, "w1", 1);
}

#[test]
fn a_new_daemon_stopped_while_it_waits_for_a_guest_stops_cleanly() {
    if !warmvm_testkit::kvm_available("reboot_stop_while_waiting") {
        return;
    }
    let dir = scratch("reboot-stop-waiting");
    let mut d = Daemon::start(&dir, &[]);
    create_slow(&d, "slow");
    let mut reboot = start_reboot(
        &d,
        &[
            "reboot",
            "--mode",
            "cold",
            "--grace-secs",
            "1",
            "--boot-wait-secs",
            "600",
            "--json",
        ],
    );
    let mut waiting = None;
    assert!(
        wait_until(60, || {
            let s = d.client().status();
            waiting = s
                .ok()
                .filter(|s| s["reboot_in_progress"]["phase"] == "waiting-for-guests");
            waiting.is_some()
        }),
        "the new daemon never waited for the guest\n{}",
        d.log()
    );
    let s = waiting.unwrap();
    let new_pid = s["pid"].as_u64().unwrap() as u32;
    d.follow_reboot(new_pid);
    // SIGTERM: the wait for the guest ends, the VM is powered off, the daemon exits.
    d.terminate_adopted();
    assert!(
        !dir.join("state")
            .join("saved-reboot")
            .join("bring-back.json")
            .exists(),
        "the VM was brought back: no manifest is left for the next daemon"
    );
    // The CLI that started the reboot learns that the daemon is gone.
    let out = reboot.wait().unwrap();
    assert_eq!(out.code(), Some(3));
    let mut err = String::new();
    reboot
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("no warmvm daemon is listening"), "{err}");
    assert!(
        d.log()
            .contains("the daemon stopped before the guest said it was up"),
        "{}",
        d.log()
    );
}
