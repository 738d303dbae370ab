//! `warmvm daemon` and the CLI that drives it, as operators use them: a real daemon process on
//! a temporary socket and state directory, reference-guest VMs, the CLI, raw HTTP and curl.
//!
//! Tests that need /dev/kvm are skipped without it, unless `WARMVM_REQUIRE_KVM=1` (CI), where
//! they fail.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The acceptance test: 8 VMs through the CLI; pause stops the guest's counter, resume lets
/// it go on; stop and delete them all; SIGTERM ends the daemon cleanly.
#[test]
fn eight_vms_through_the_cli() {
    if !warmvm_vmm::testing::kvm_available("eight_vms_through_the_cli") {
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

/// docs/openapi.json against a live daemon: every documented operation is served and every
/// answer matches its documented schema.
#[test]
fn live_daemon_matches_the_openapi_document() {
    if !warmvm_vmm::testing::kvm_available("live_daemon_matches_the_openapi_document") {
        return;
    }
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/openapi.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let dir = scratch("openapi");
    let mut d = Daemon::start(&dir, &[]);
    let c = d.client();

    let schema_of = |path: &str, method: &str, status: u16| -> Option<Value> {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not documented");
        let resp = &op["responses"][status.to_string()];
        assert!(
            resp.is_object(),
            "{method} {path} answered {status}, which is not documented"
        );
        resp["content"]["application/json"].get("schema").cloned()
    };
    let check = |template: &str, method: &str, actual: &str, body: Option<&[u8]>| -> u16 {
        let resp = c.raw(&method.to_uppercase(), actual, body).unwrap();
        assert_ne!(resp.status, 405, "{method} {actual}");
        let v: Option<Value> = serde_json::from_slice(&resp.body).ok();
        if resp.status == 404 {
            let msg = v.as_ref().and_then(|v| v["error"].as_str()).unwrap_or("");
            assert!(
                !msg.starts_with("no such path"),
                "{method} {actual} is not served"
            );
        }
        if let Some(schema) = schema_of(template, method, resp.status) {
            let v = v.unwrap_or_else(|| panic!("{method} {actual}: not JSON"));
            if let Err(e) = warmvm_api::schema::validate(&doc, &schema, &v) {
                panic!("{method} {actual} ({}): {e}\n{v:#}", resp.status);
            }
        } else {
            assert_eq!(template, "/metrics");
            assert!(String::from_utf8_lossy(&resp.body)
                .contains("# TYPE warmvm_daemon_uptime_seconds gauge"));
        }
        resp.status
    };

    let body = reference_vm("api0").to_string();
    assert_eq!(
        check("/v1/vms", "post", "/v1/vms", Some(body.as_bytes())),
        201
    );
    assert!(wait_until(60, || counter(&c.show("api0").unwrap()) > 0));
    // Every documented operation, DELETE last (after stop), on a real VM.
    let mut ops: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.push((path.clone(), method.clone()));
        }
    }
    let order = |(p, m): &(String, String)| match (m.as_str(), p.as_str()) {
        ("delete", _) => 3,
        (_, p) if p.ends_with("/stop") => 2,
        // A restore needs the snapshot taken first.
        (_, p) if p.ends_with("/resume") || p == "/v1/restore" => 1,
        _ => 0,
    };
    ops.sort_by_key(order);
    let snap = dir.join("snap-api0");
    for (path, method) in &ops {
        let actual = path.replace("{name}", "api0");
        let body = match (method.as_str(), path.as_str()) {
            (_, "/v1/vms/{name}/snapshot") => Some(json!({ "dir": snap }).to_string()),
            // From the snapshot just taken (see `order`), beside api0.
            (_, "/v1/restore") => Some(json!({ "dir": snap, "name": "api2" }).to_string()),
            ("post", _) => Some(reference_vm("api1").to_string()),
            // A real warm reboot: the daemon that answers from then on is a new process.
            (_, "/v1/reboot") => Some(json!({ "mode": "warm" }).to_string()),
            (_, "/v1/aging/hold") => Some(json!({ "hold": false }).to_string()),
            _ => None,
        };
        let status = check(path, method, &actual, body.as_deref().map(str::as_bytes));
        assert!(status < 300, "{method} {actual}: {status}");
        if path == "/v1/reboot" {
            let new_pid = c.status().unwrap()["pid"].as_u64().unwrap() as u32;
            d.follow_reboot(new_pid);
        }
    }
    // Errors match the documented error schema too.
    assert_eq!(check("/v1/vms/{name}", "get", "/v1/vms/nope", None), 404);
    assert_eq!(
        check(
            "/v1/restore",
            "post",
            "/v1/restore",
            Some(
                json!({ "dir": snap, "name": "api2" })
                    .to_string()
                    .as_bytes()
            )
        ),
        409
    );
    assert_eq!(
        check(
            "/v1/restore",
            "post",
            "/v1/restore",
            Some(br#"{"dir": "/nonexistent", "name": "api3"}"#)
        ),
        422
    );
    assert_eq!(
        check(
            "/v1/vms/{name}/snapshot",
            "put",
            "/v1/vms/api2/snapshot",
            Some(json!({ "dir": snap }).to_string().as_bytes())
        ),
        409
    );
    assert_eq!(
        check("/v1/vms/{name}/resume", "put", "/v1/vms/api1/resume", None),
        409
    );
    assert_eq!(check("/v1/vms", "post", "/v1/vms", Some(b"{")), 400);
    assert_eq!(
        check(
            "/v1/reboot",
            "put",
            "/v1/reboot",
            Some(br#"{"mode": "warm", "binary": "/nonexistent"}"#)
        ),
        422
    );
    // What Schemathesis found: "" is no path (400, and the document says so), a kernel
    // that is not there is a well-formed request the host cannot run (422), and null is
    // not a string (400).
    for (body, want) in [
        (
            &br#"{"name": "k1", "memory_mib": 16, "kernel": ""}"#[..],
            400,
        ),
        (
            br#"{"name": "k1", "memory_mib": 16, "kernel": "/nonexistent"}"#,
            422,
        ),
        (br#"{"name": "k1", "memory_mib": 16, "cmdline": null}"#, 400),
    ] {
        assert_eq!(check("/v1/vms", "post", "/v1/vms", Some(body)), want);
    }
    assert_eq!(
        check(
            "/v1/reboot",
            "put",
            "/v1/reboot",
            Some(br#"{"mode": "warm", "binary": null}"#)
        ),
        400
    );
    d.terminate_adopted();
}

/// Each malformed or invalid request gets the right 4xx with a JSON error, and changes
/// nothing.
#[test]
fn malformed_requests_get_4xx_and_change_nothing() {
    if !warmvm_vmm::testing::kvm_available("malformed_requests_get_4xx_and_change_nothing") {
        return;
    }
    let dir = scratch("malformed");
    let d = Daemon::start(&dir, &[]);
    let c = d.client();
    for name in ["m0", "m1"] {
        c.create(&serde_json::from_value(reference_vm(name)).unwrap())
            .unwrap();
    }
    c.pause("m1").unwrap();
    let snapshot = || -> Vec<(String, String)> {
        let list = c.list().unwrap();
        list["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_string(),
                    v["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let before = snapshot();
    assert_eq!(
        before,
        vec![
            ("m0".into(), "running".into()),
            ("m1".into(), "paused".into())
        ]
    );

    let big = vec![b' '; 70 * 1024];
    // What, method, path, body, expected status.
    type Case<'a> = (&'a str, &'a str, &'a str, Option<&'a [u8]>, u16);
    let cases: &[Case] = &[
        ("bad JSON", "POST", "/v1/vms", Some(b"{\"name\": "), 400),
        ("not an object", "POST", "/v1/vms", Some(b"[1, 2]"), 400),
        ("empty body", "POST", "/v1/vms", None, 400),
        (
            "unknown field",
            "POST",
            "/v1/vms",
            Some(br#"{"name": "m9", "memory_mib": 64, "memroy": 1}"#),
            400,
        ),
        (
            "bad value",
            "POST",
            "/v1/vms",
            Some(br#"{"name": "m9", "memory_mib": 1}"#),
            400,
        ),
        (
            "bad name",
            "POST",
            "/v1/vms",
            Some(br#"{"name": "a b", "memory_mib": 64}"#),
            400,
        ),
        (
            "wrong type",
            "POST",
            "/v1/vms",
            Some(br#"{"name": "m9", "memory_mib": "64"}"#),
            400,
        ),
        (
            "a name that exists",
            "POST",
            "/v1/vms",
            Some(br#"{"name": "m0", "memory_mib": 64}"#),
            409,
        ),
        ("unknown VM", "GET", "/v1/vms/nope", None, 404),
        (
            "pause an unknown VM",
            "PUT",
            "/v1/vms/nope/pause",
            None,
            404,
        ),
        ("delete an unknown VM", "DELETE", "/v1/vms/nope", None, 404),
        ("resume a running VM", "PUT", "/v1/vms/m0/resume", None, 409),
        ("pause a paused VM", "PUT", "/v1/vms/m1/pause", None, 409),
        ("delete a running VM", "DELETE", "/v1/vms/m0", None, 409),
        ("delete a paused VM", "DELETE", "/v1/vms/m1", None, 409),
        (
            "stop with an unknown field",
            "PUT",
            "/v1/vms/m0/stop",
            Some(br#"{"grace": 1}"#),
            400,
        ),
        (
            "stop with a huge grace",
            "PUT",
            "/v1/vms/m0/stop",
            Some(br#"{"grace_secs": 99999}"#),
            400,
        ),
        ("reboot with no body", "PUT", "/v1/reboot", None, 400),
        (
            "reboot in another mode",
            "PUT",
            "/v1/reboot",
            Some(br#"{"mode": "hot"}"#),
            400,
        ),
        (
            "reboot with an unknown field",
            "PUT",
            "/v1/reboot",
            Some(br#"{"mode": "warm", "force": true}"#),
            400,
        ),
        (
            "reboot into a directory",
            "PUT",
            "/v1/reboot",
            Some(br#"{"mode": "warm", "binary": "/tmp"}"#),
            422,
        ),
        (
            "reboot into a file that is not executable",
            "PUT",
            "/v1/reboot",
            Some(br#"{"mode": "warm", "binary": "/etc/passwd"}"#),
            422,
        ),
        ("wrong method", "PATCH", "/v1/vms", None, 405),
        ("wrong method on a VM", "POST", "/v1/vms/m0", None, 405),
        ("unknown path", "GET", "/v1/nothing", None, 404),
        ("oversized body", "POST", "/v1/vms", Some(&big), 413),
    ];
    for (what, method, path, body, want) in cases {
        let resp = c.raw(method, path, *body).unwrap();
        assert_eq!(
            resp.status,
            *want,
            "{what}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(
            resp.content_type.as_deref(),
            Some("application/json"),
            "{what}"
        );
        let v: Value = serde_json::from_slice(&resp.body)
            .unwrap_or_else(|e| panic!("{what}: error body is not JSON: {e}"));
        let msg = v["error"].as_str().unwrap_or_else(|| panic!("{what}: {v}"));
        assert!(!msg.is_empty() && !msg.contains('\n'), "{what}: {msg:?}");
        assert_eq!(v.as_object().unwrap().len(), 1, "{what}: {v}");
        assert_eq!(snapshot(), before, "{what} changed the VMs");
    }
    // A malformed request line or header, straight on the socket.
    for raw in [
        "GARBAGE\r\n\r\n",
        "GET /v1/vms HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    ] {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let resp = warmvm_api::http::parse_response(&out).unwrap();
        assert_eq!(resp.status, 400, "{raw:?}");
        let v: Value = serde_json::from_slice(&resp.body).unwrap();
        assert!(v["error"].is_string());
    }
    // A 405 says what is allowed.
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    std::io::Write::write_all(&mut s, b"PATCH /v1/vms/m0 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.contains("\r\nAllow: GET, DELETE\r\n"), "{out}");
    assert_eq!(snapshot(), before);

    // The CLI reports refusals on one line, exit status 2.
    let out = d.cli(&["vm", "resume", "m0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot resume"), "{err}");
}

/// Each VM's name, state, integrity counter and mismatches, from `warmvm vm list --json`.
fn vm_figures(d: &Daemon) -> Vec<(String, String, u64, u64)> {
    d.cli_json(&["vm", "list"])["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["state"].as_str().unwrap().to_string(),
                counter(v),
                v["guest"]["mismatches"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// `warmvm reboot --mode warm`, twice: each time a new daemon process (a new pid) runs all 4
/// VMs on, their integrity counters never go back and keep growing, and no guest sees a
/// mismatch. The last daemon, not our child, stops on SIGTERM and removes the socket.
#[test]
fn warm_reboots_of_the_daemon_keep_every_vm_running() {
    if !warmvm_vmm::testing::kvm_available("warm_reboots_of_the_daemon_keep_every_vm_running") {
        return;
    }
    let dir = scratch("reboot");
    let mut d = Daemon::start(&dir, &[]);
    let names: Vec<String> = (0..4).map(|i| format!("vm{i}")).collect();
    for name in &names {
        let file = dir.join(format!("{name}.json"));
        std::fs::write(&file, reference_vm(name).to_string()).unwrap();
        d.cli_json(&["vm", "create", file.to_str().unwrap()]);
    }
    assert!(
        wait_until(60, || vm_figures(&d).iter().all(|v| v.2 > 0)),
        "the guests never reported progress"
    );
    let mut before = vm_figures(&d);
    // Requests sent meanwhile wait for whichever daemon serves next: every one is answered.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (c, done) = (d.client(), done.clone());
        std::thread::spawn(move || {
            let (mut answered, mut failed) = (0u32, Vec::new());
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                match c.raw("GET", "/v1/vms", None) {
                    Ok(r) if r.status == 200 => answered += 1,
                    Ok(r) => failed.push(format!(
                        "{}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    )),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (answered, failed)
        })
    };
    for round in 1..=2 {
        let old_pid = d.cli_json(&["status"])["pid"].as_u64().unwrap() as u32;
        assert_eq!(old_pid, d.pid);
        let report = d.cli_json(&["reboot", "--mode", "warm"]);
        let new_pid = report["new_pid"].as_u64().unwrap() as u32;
        let blackouts: Vec<&str> = report["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(blackouts, names, "round {round}: {report}");
        assert!(report["phases"]["restore_us"].is_u64(), "{report}");
        d.follow_reboot(new_pid);

        let status = d.cli_json(&["status"]);
        assert_eq!(status["pid"], new_pid, "round {round}");
        assert_ne!(new_pid, old_pid);
        assert_eq!(status["vm_count"], 4);
        assert_eq!(status["vms_running"], 4, "round {round}: {status}");
        let after = vm_figures(&d);
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(a.0, b.0);
            assert_eq!(a.1, "running", "round {round}: {a:?}");
            assert!(
                a.2 >= b.2,
                "round {round}: {}'s counter went back: {b:?} -> {a:?}",
                a.0
            );
            assert_eq!(a.3, 0, "round {round}: {a:?}");
        }
        // ...and goes on growing in the new daemon.
        assert!(
            wait_until(30, || vm_figures(&d)
                .iter()
                .zip(&after)
                .all(|(now, a)| now.2 > a.2 && now.3 == 0)),
            "round {round}: the guests stopped making progress\n{}",
            d.log()
        );
        before = vm_figures(&d);
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (answered, failed) = prober.join().unwrap();
    assert!(answered > 0);
    assert!(
        failed.is_empty(),
        "requests during warm reboots failed: {failed:?}"
    );
    // The table form: each VM's blackout and the phases. And an upgrade: the new daemon
    // runs the binary named (a copy here, as a new build would be).
    let upgrade = dir.join("warmvm-upgrade");
    std::fs::copy(BIN, &upgrade).unwrap();
    let out = d.cli(&[
        "reboot",
        "--mode",
        "warm",
        "--binary",
        upgrade.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("phases (ms): stage"), "{table}");
    for name in &names {
        assert!(
            table
                .lines()
                .any(|l| l.trim_start().starts_with(name.as_str()) && l.contains("blackout")),
            "{table}"
        );
    }
    let new_pid = d.cli_json(&["status"])["pid"].as_u64().unwrap() as u32;
    d.follow_reboot(new_pid);
    assert_eq!(
        std::fs::read_link(format!("/proc/{new_pid}/exe")).unwrap(),
        upgrade
    );

    for name in &names {
        let r = d.cli_json(&["vm", "stop", name, "--grace-secs", "10"]);
        assert_eq!(r["state"], "powered-off", "{name}: {r}");
        assert_eq!(r["exit_status"], 0);
        assert_eq!(r["guest"]["mismatches"], 0, "{name}: {r}");
        assert!(counter(&r) >= before.iter().find(|b| &b.0 == name).unwrap().2);
    }
    d.terminate_adopted();
    assert!(!d.socket.exists(), "the last daemon removes the socket");
    let log = d.log();
    assert_eq!(
        log.matches("took the VMs over by a warm reboot").count(),
        3,
        "{log}"
    );
}

/// A warm reboot that cannot happen changes nothing: a missing binary is refused with 400
/// before anything starts; a binary that is not warmvm fails the handover (500), a new
/// daemon that refuses the state is a 409; each time the VMs run on in the same daemon.
#[test]
fn a_failed_warm_reboot_changes_nothing() {
    if !warmvm_vmm::testing::kvm_available("a_failed_warm_reboot_changes_nothing") {
        return;
    }
    let dir = scratch("rebootfail");
    // Every daemon this one starts refuses the state it is handed (fault injection).
    let mut d = Daemon::start_with_env(
        &dir,
        &[],
        &[(warmvm_vmm::handover::FAULT_ENV, "refuse-state")],
    );
    let c = d.client();
    for name in ["f0", "f1"] {
        c.create(&serde_json::from_value(reference_vm(name)).unwrap())
            .unwrap();
    }
    assert!(wait_until(60, || vm_figures(&d).iter().all(|v| v.2 > 0)));
    let pid = c.status().unwrap()["pid"].clone();

    let out = d.cli(&["reboot", "--mode", "warm", "--binary", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent"), "{err}");
    let resp = c
        .raw(
            "PUT",
            "/v1/reboot",
            Some(br#"{"mode": "warm", "binary": "/nonexistent"}"#),
        )
        .unwrap();
    assert_eq!(resp.status, 422);

    let before = vm_figures(&d);
    let resp = c
        .raw(
            "PUT",
            "/v1/reboot",
            Some(br#"{"mode": "warm", "binary": "/bin/true"}"#),
        )
        .unwrap();
    assert_eq!(resp.status, 500, "{}", String::from_utf8_lossy(&resp.body));
    let v: Value = serde_json::from_slice(&resp.body).unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("run on in this daemon"),
        "{v}"
    );
    let out = d.cli(&["reboot", "--mode", "warm"]);
    assert_eq!(out.status.code(), Some(2), "a refusal is a 409");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refuse-state"), "{err}");

    assert_eq!(c.status().unwrap()["pid"], pid, "the same daemon serves");
    assert_eq!(c.status().unwrap()["vms_running"], 2);
    let after = vm_figures(&d);
    assert!(wait_until(30, || vm_figures(&d).iter().zip(&after).all(
        |(now, a)| now.1 == "running" && now.2 > a.2 && now.3 == 0
    )));
    for (b, a) in before.iter().zip(&after) {
        assert!(a.2 >= b.2, "{b:?} -> {a:?}");
    }
    assert_eq!(d.terminate().code(), Some(0), "{}", d.log());
    assert!(!d.socket.exists());
}

/// Start-up and shutdown: a live daemon's socket is refused, a stale one replaced, a
/// non-loopback metrics address refused; the loopback metrics port serves only /metrics.
#[test]
fn daemon_start_and_stop() {
    if !warmvm_vmm::testing::kvm_available("daemon_start_and_stop") {
        return;
    }
    let dir = scratch("startstop");
    let mut d = Daemon::start(&dir, &["--metrics-addr", "127.0.0.1:19466"]);

    // A second daemon on the same socket is refused and leaves the first one alone.
    let out = Command::new(BIN)
        .args(["daemon", "--socket"])
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(dir.join("state2"))
        .output()
        .unwrap();
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
    let out = Command::new(BIN)
        .args(["daemon", "--metrics-addr", "0.0.0.0:9464", "--socket"])
        .arg(dir.join("x.sock"))
        .output()
        .unwrap();
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
