//! The daemon's HTTP API against a live daemon with reference-guest VMs: every operation of
//! docs/openapi.json answers as documented, and malformed requests are refused and change
//! nothing.
//!
//! Tests that need /dev/kvm are skipped without it, unless `WARMVM_REQUIRE_KVM=1` (CI), where
//! they fail.

use std::io::Read;

use serde_json::{json, Value};
use warmvm_testkit::*;

/// docs/openapi.json against a live daemon: every documented operation is served and every
/// answer matches its documented schema.
#[test]
fn live_daemon_matches_the_openapi_document() {
    if !warmvm_testkit::kvm_available("live_daemon_matches_the_openapi_document") {
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
            (_, "/v1/vms/{name}/migrate") => Some(json!({ "to": "127.0.0.1:9" }).to_string()),
            (_, "/v1/vms/{name}/migrate/resolve") => None,
            ("post", _) => Some(reference_vm("api1").to_string()),
            // A real warm reboot: the daemon that answers from then on is a new process.
            (_, "/v1/reboot") => Some(json!({ "mode": "warm" }).to_string()),
            (_, "/v1/aging/hold") => Some(json!({ "hold": false }).to_string()),
            _ => None,
        };
        let status = check(path, method, &actual, body.as_deref().map(str::as_bytes));
        match path.as_str() {
            // A daemon alone cannot migrate: without migration certificates it refuses a
            // migration, and a VM that is not in doubt has nothing to resolve. The refusals
            // still match the document (tests/migration.rs moves VMs between two daemons).
            "/v1/vms/{name}/migrate" | "/v1/vms/{name}/migrate/resolve" => {
                assert_eq!(status, 409, "{method} {actual}")
            }
            _ => assert!(status < 300, "{method} {actual}: {status}"),
        }
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
        404
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
        404
    );
    // What Schemathesis found: "" is no path (400, and the document says so), a kernel
    // that is not there is a well-formed request naming a file the host lacks (404), and
    // null is not a string (400).
    for (body, want) in [
        (
            &br#"{"name": "k1", "memory_mib": 16, "kernel": ""}"#[..],
            400,
        ),
        (
            br#"{"name": "k1", "memory_mib": 16, "kernel": "/nonexistent"}"#,
            404,
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
    if !warmvm_testkit::kvm_available("malformed_requests_get_4xx_and_change_nothing") {
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
            409,
        ),
        (
            "reboot into a file that is not executable",
            "PUT",
            "/v1/reboot",
            Some(br#"{"mode": "warm", "binary": "/etc/passwd"}"#),
            409,
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

/// The client's typed answers are the daemon's own answer types, read back from a live
/// daemon: the same values as the JSON the untyped methods return.
#[test]
fn typed_client_answers_decode_a_live_daemons_json() {
    if !warmvm_vmm::testing::kvm_available("typed_client_answers_decode_a_live_daemons_json") {
        return;
    }
    let dir = scratch("typed-client");
    let mut d = Daemon::start(&dir, &[]);
    create(&d, "t0");
    let c = d.client();
    let raw = c.status().unwrap();
    let typed = c.typed().status().unwrap();
    assert_eq!(u64::from(typed.pid), raw["pid"].as_u64().unwrap());
    assert_eq!(typed.vm_count, 1);
    assert_eq!(typed.build, raw["build"].as_str().unwrap());
    assert_eq!(typed.state_dir, raw["state_dir"].as_str().unwrap());
    assert_eq!(
        serde_json::to_value(&typed.privileges).unwrap(),
        raw["privileges"]
    );
    assert!(typed.last_takeover.is_none() && typed.reboot_in_progress.is_none());

    let held = c.typed().hold(true).unwrap();
    assert!(held.hold);
    assert_eq!(c.call("GET", "/v1/aging", None).unwrap()["hold"], true);
    assert!(c.typed().aging().unwrap().hold);
    assert!(!c.typed().hold(false).unwrap().hold);
    let history = c.typed().aging_history().unwrap();
    assert_eq!(
        serde_json::to_value(&history.value).unwrap()["samples"]
            .as_array()
            .map(Vec::len),
        Some(history.samples.len())
    );

    let snap = dir.join("snap");
    let report = c
        .typed()
        .snapshot(
            "t0",
            &warmvm_api::types::SnapshotRequest {
                dir: snap.clone(),
                leave_paused: false,
            },
        )
        .unwrap();
    assert_eq!(report.vm, "t0");
    assert!(report.ram_bytes > 0, "{report:?}");
    // A refusal is the daemon's error, as with the untyped methods.
    let again = c.typed().snapshot(
        "t0",
        &warmvm_api::types::SnapshotRequest {
            dir: snap,
            leave_paused: false,
        },
    );
    assert!(again
        .unwrap_err()
        .status()
        .is_some_and(|s| (400..500).contains(&s)));
    assert_eq!(d.terminate().code(), Some(0), "{}", d.log());
}
