//! `warmvm daemon` and the CLI that drives it, as operators use them: a real daemon process on
//! a temporary socket and state directory, reference-guest VMs and the CLI. Its API requests
//! are in api_requests.rs, its warm reboots in daemon_reboot.rs.
//!
//! Tests that need /dev/kvm are skipped without it, unless `WARMVM_REQUIRE_KVM=1` (CI), where
//! they fail.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use warmvm_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_warmvm");

/// The acceptance test: 8 VMs through the CLI; pause stops the guest's counter, resume lets
/// it go on; stop and delete them all; SIGTERM ends the daemon cleanly.
#[test]
fn eight_vms_through_the_cli() {
    if !warmvm_testkit::kvm_available("eight_vms_through_the_cli") {
        return;
    }
    let dir = scratch("eight");
    let mut d = Daemon::start(&dir, &[]);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the API socket is private");

    let names: Vec<String> = (0..8).map(|i| format!("vm{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        // Both file forms: TOML with the VM's keys at the top level, and JSON.
        let file = if i % 2 == 0 {
            let p = dir.join(format!("{name}.toml"));
            std::fs::write(
                &p,
                format!("name = \"{name}\"\nmemory_mib = 64\ncmdline = \"quiet interval_ms=20\"\n"),
            )
            .unwrap();
            p
        } else {
            let p = dir.join(format!("{name}.json"));
            std::fs::write(&p, reference_vm(name).to_string()).unwrap();
            p
        };
        let out = d.cli(&["vm", "create", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "create {name}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.log()
        );
    }

    let list = d.cli_json(&["vm", "list"]);
    let vms = list["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 8);
    for (vm, name) in vms.iter().zip(&names) {
        assert_eq!(vm["name"], name.as_str());
        assert_eq!(vm["state"], "running");
        assert_eq!(vm["memory_mib"], 64);
    }
    let table = d.cli(&["vm", "list"]);
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout);
    assert_eq!(table.lines().count(), 9, "{table}");
    assert!(table.starts_with("NAME"), "{table}");

    // Every guest makes progress.
    for name in &names {
        assert!(
            wait_until(60, || counter(&d.cli_json(&["vm", "show", name])) > 0),
            "{name}'s guest never reported progress"
        );
    }

    let target = "vm3";
    let paused = d.cli_json(&["vm", "pause", target]);
    assert_eq!(paused["state"], "paused");
    let a = counter(&d.cli_json(&["vm", "show", target]));
    std::thread::sleep(Duration::from_millis(300));
    let b = d.cli_json(&["vm", "show", target]);
    assert_eq!(b["state"], "paused");
    assert_eq!(a, counter(&b), "the counter moved while the VM was paused");
    let resumed = d.cli_json(&["vm", "resume", target]);
    assert_eq!(resumed["state"], "running");
    assert!(
        wait_until(30, || counter(&d.cli_json(&["vm", "show", target])) > a),
        "the counter did not move after resume"
    );

    let status = d.cli_json(&["status"]);
    assert_eq!(status["vm_count"], 8);
    assert_eq!(status["vms_running"], 8);

    for name in &names {
        let r = d.cli_json(&["vm", "stop", name, "--grace-secs", "10"]);
        assert_eq!(r["state"], "powered-off", "{name}: {r}");
        assert_eq!(r["exit_status"], 0);
        let g = &r["guest"];
        assert_eq!(g["mismatches"], 0, "{name}: {g}");
    }
    for name in &names {
        let out = d.cli(&["vm", "delete", name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(d.cli_json(&["vm", "list"])["vms"], json!([]));

    let status = d.terminate();
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(!d.socket.exists(), "the daemon removes its socket");
    let log = d.log();
    assert!(log.contains("vm=vm3"), "per-VM log context: {log}");
}

/// Start-up and shutdown: a live daemon's socket is refused, a stale one replaced, a
/// non-loopback metrics address refused; the loopback metrics port serves only /metrics.
#[test]
fn daemon_start_and_stop() {
    if !warmvm_testkit::kvm_available("daemon_start_and_stop") {
        return;
    }
    let dir = scratch("startstop");
    let mut d = Daemon::start(&dir, &["--metrics-addr", "127.0.0.1:19466"]);

    // A second daemon on the same socket is refused and leaves the first one alone.
    let out = refused(
        daemon_command(&d.socket)
            .arg("--state-dir")
            .arg(dir.join("state2")),
    );
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listening"), "{err}");
    assert!(d.client().status().is_ok());

    let metrics = d.client().metrics().unwrap();
    for family in [
        "warmvm_daemon_resident_memory_bytes",
        "warmvm_daemon_open_fds",
        "warmvm_daemon_threads",
        "warmvm_daemon_uptime_seconds",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {family} gauge")),
            "{metrics}"
        );
    }

    // The loopback port serves the metrics and nothing else.
    let tcp = |req: &str| {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect("127.0.0.1:19466").unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        warmvm_api::http::parse_response(&out).unwrap()
    };
    let m = tcp("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(m.status, 200);
    assert!(String::from_utf8_lossy(&m.body).contains("warmvm_daemon_threads"));
    assert_eq!(
        tcp("GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n").status,
        404
    );
    assert_eq!(tcp("POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").status, 405);

    // Killed hard, the daemon leaves its socket behind; the next one replaces it.
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(d.socket.exists());
    let out = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    // The next one also starts the VMs of a --config file before it is ready, and powers
    // them off when it stops.
    let config = dir.join("vms.toml");
    std::fs::write(
        &config,
        "[[vm]]\nname = \"cfg0\"\nmemory_mib = 64\ncmdline = \"quiet interval_ms=20\"\n",
    )
    .unwrap();
    let mut d2 = Daemon::start(&dir, &["--config", config.to_str().unwrap()]);
    let list = d2.client().list().unwrap();
    assert_eq!(list["vms"][0]["name"], "cfg0");
    assert_eq!(list["vms"][0]["state"], "running");
    assert!(wait_until(60, || counter(
        &d2.client().show("cfg0").unwrap()
    ) > 0));
    assert_eq!(d2.terminate().code(), Some(0));
    assert!(!d2.socket.exists());
    let log = d2.log();
    assert!(
        log.lines().any(|l| l.contains("VM stopped")
            && l.contains("vm=cfg0")
            && l.contains("powered-off")),
        "{log}"
    );

    // Non-loopback metrics addresses are refused before anything starts.
    let out = refused(daemon_command(&dir.join("x.sock")).args(["--metrics-addr", "0.0.0.0:9464"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    assert!(!dir.join("x.sock").exists());
    drop(d);
}

/// With no daemon, every client subcommand says so on one line and exits 3. Needs no KVM.
#[test]
fn no_daemon_is_one_clear_line() {
    let dir = scratch("nodaemon");
    let sock = dir.join("none.sock");
    let s = sock.to_str().unwrap();
    for args in [
        vec!["status"],
        vec!["vm", "list"],
        vec!["vm", "show", "a"],
        vec!["vm", "pause", "a"],
        vec!["vm", "stop", "a", "--json"],
        vec!["vm", "delete", "a"],
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .args(["--socket", s])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.trim_end(),
            format!(
                "warmvm: error: no warmvm daemon is listening on {s}: start one with `warmvm daemon`"
            ),
            "{args:?}"
        );
        assert!(out.stdout.is_empty());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vm stop` and SIGTERM press each guest's ACPI power button: a guest that watches it
/// powers off (`outcome=Clean` in the log, `powered-off` in the API), one that ignores it is
/// forced off after the grace period (`outcome=Forced`, `stopped`).
#[test]
fn stop_and_sigterm_press_the_power_button_and_force_only_guests_that_ignore_it() {
    if !warmvm_testkit::kvm_available(
        "stop_and_sigterm_press_the_power_button_and_force_only_guests_that_ignore_it",
    ) {
        return;
    }
    let dir = scratch("power-button");
    // Daemon::start gives every guest 5 s on SIGTERM.
    let mut d = Daemon::start(&dir, &[]);
    let vm = |name: &str, ignore: bool| {
        let cmdline = if ignore {
            "quiet interval_ms=20 power_button=ignore"
        } else {
            "quiet interval_ms=20"
        };
        d.client()
            .create(
                &serde_json::from_value(
                    json!({"name": name, "memory_mib": 64, "cmdline": cmdline}),
                )
                .unwrap(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", d.log()));
        verifies_on(&d, name, 1);
    };
    let outcome_logged = |log: &str, name: &str, outcome: &str| {
        log.lines().any(|l| {
            l.contains("power button pressed")
                && l.contains(&format!("vm={name}"))
                && l.contains(&format!("outcome={outcome}"))
        })
    };
    vm("watches", false);
    vm("ignores", true);
    let r = d.cli_json(&["vm", "stop", "watches", "--grace-secs", "30"]);
    assert_eq!(r["state"], "powered-off", "{r}");
    assert_eq!(r["exit_status"], 0, "{r}");
    let t0 = Instant::now();
    let r = d.cli_json(&["vm", "stop", "ignores", "--grace-secs", "2"]);
    assert_eq!(r["state"], "stopped", "{r}");
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "forced before its grace"
    );
    let log = d.log();
    assert!(outcome_logged(&log, "watches", "Clean"), "{log}");
    assert!(outcome_logged(&log, "ignores", "Forced"), "{log}");
    assert!(!outcome_logged(&log, "watches", "Forced"), "{log}");

    vm("term-watches", false);
    vm("term-ignores", true);
    assert_eq!(d.terminate().code(), Some(0), "{}", d.log());
    let log = d.log();
    assert!(outcome_logged(&log, "term-watches", "Clean"), "{log}");
    assert!(outcome_logged(&log, "term-ignores", "Forced"), "{log}");
}
