//! docs/openapi.json against the server, without KVM: every route is documented and every
//! documented operation is a route; what the server sends and takes matches the schemas.
//! (crates/warmvm/tests/api_requests.rs checks a live daemon's answers too.)

use std::path::PathBuf;

use serde_json::{json, Value};
use warmvm_api::routes::ROUTES;
use warmvm_api::running_as::DaemonPrivileges;
use warmvm_api::schema::validate;
// The one set of request and answer types the daemon, the client and this test share.
use warmvm_api::types::{
    DaemonStatus, Mode, ModeReboot, ModeRebootVm, RebootRequest, RestoreRequest, SnapshotRequest,
    StopRequest, TakeoverInfo,
};
use warmvm_vmm::handover::{PhaseTimes, RebootReport, RebootStamps, VmBlackout, VmStamps};
use warmvm_vmm::snapshot::SaveReport;
use warmvm_vmm::status::{GuestFigures, GuestVcpuFigures};
use warmvm_vmm::{Lifecycle, VcpuStats, VmConfig, VmReport};

fn doc() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    let text = std::fs::read_to_string(path).expect("docs/openapi.json");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn binary(path: &str) -> warmvm_vmm::executable::BinaryInfo {
    warmvm_vmm::executable::BinaryInfo {
        path: path.into(),
        version: "0.1.0".into(),
        commit: "unknown".into(),
        sha256: "0f".repeat(32),
    }
}

/// `value` matches the document's schema `name`, and reads back as its own type unchanged:
/// what the daemon sends is what the client decodes (one set of types on both sides).
fn check<T: serde::Serialize + serde::de::DeserializeOwned>(doc: &Value, name: &str, value: &T) {
    let v = serde_json::to_value(value).unwrap();
    if let Err(e) = validate(doc, &schema(name), &v) {
        panic!("{name} does not match docs/openapi.json: {e}\n{v:#}");
    }
    let back: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{name} does not read back: {e}\n{v:#}"));
    assert_eq!(
        serde_json::to_value(&back).unwrap(),
        v,
        "{name} changes when read back"
    );
}

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

#[test]
fn routes_and_documented_operations_are_the_same() {
    let doc = doc();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            if METHODS.contains(&method.as_str()) {
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    for r in ROUTES {
        assert!(
            documented.contains(&(r.method.to_string(), r.path.to_string())),
            "route {} {} is not in docs/openapi.json",
            r.method,
            r.path
        );
    }
    for (method, path) in &documented {
        assert!(
            ROUTES.iter().any(|r| r.method == method && r.path == path),
            "docs/openapi.json documents {method} {path}, which the server does not have"
        );
    }
}

#[test]
fn every_schema_reference_resolves_and_every_operation_documents_its_errors() {
    let doc = doc();
    fn walk(doc: &Value, v: &Value) {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(r)) = o.get("$ref") {
                    warmvm_api::schema::resolve(doc, r).unwrap();
                }
                o.values().for_each(|x| walk(doc, x));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(doc, x)),
            _ => {}
        }
    }
    walk(&doc, &doc);
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|k| k.starts_with('2')),
                "{method} {path}: no success response"
            );
            if path.contains("{name}") {
                assert!(responses.contains_key("404"), "{method} {path}: no 404");
            }
        }
    }
}

fn report(lifecycle: Lifecycle, guest: Option<GuestFigures>) -> VmReport {
    VmReport {
        name: "vm0".into(),
        lifecycle,
        memory_mib: 64,
        vcpus: 2,
        boot: "ring3".into(),
        uptime_ms: 1234,
        console_log: PathBuf::from("/run/warmvm/vm0/console.log"),
        ram_resident_mib: 3,
        exits: vec![
            VcpuStats::default(),
            VcpuStats {
                id: 1,
                ..Default::default()
            },
        ],
        unknown_accesses: Default::default(),
        devices: vec![
            warmvm_vmm::DeviceReport {
                name: "disk0".into(),
                kind: warmvm_vmm::DeviceKind::VirtioBlk,
                mmio_base: 0xd000_0000,
                irq: None,
                status: warmvm_vmm::devices::virtio::DeviceHealth::Ok,
                requests: 12,
                failures: 0,
                path: Some("/var/lib/warmvm/site.img".into()),
                read_only: Some(false),
                cache: Some(warmvm_vmm::config::CacheMode::None),
                tap: None,
                mac: None,
            },
            warmvm_vmm::DeviceReport {
                name: "net0".into(),
                kind: warmvm_vmm::DeviceKind::VirtioNet,
                mmio_base: 0xd000_1000,
                irq: Some(6),
                status: warmvm_vmm::devices::virtio::DeviceHealth::NeedsReset,
                requests: 40,
                failures: 1,
                path: None,
                read_only: None,
                cache: None,
                tap: Some("tap0".into()),
                mac: Some("02:00:00:00:00:01".into()),
            },
        ],
        guest,
    }
}

#[test]
fn reports_in_every_state_match_the_schema() {
    let doc = doc();
    let guest = GuestFigures {
        vcpus: vec![GuestVcpuFigures {
            phase: "verifying".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let states = [
        Lifecycle::Created,
        Lifecycle::Running,
        Lifecycle::Paused,
        Lifecycle::PoweredOff { exit_status: 0 },
        Lifecycle::Crashed {
            reason: "triple fault".into(),
        },
        Lifecycle::Stopped,
        Lifecycle::HandedOver,
        Lifecycle::InDoubt,
    ];
    for state in states {
        check(
            &doc,
            "VmReport",
            &report(state.clone(), Some(guest.clone())),
        );
        check(&doc, "VmReport", &report(state, None));
    }
    check(
        &doc,
        "VmList",
        &json!({ "vms": [report(Lifecycle::Running, None)] }),
    );
    let fresh = DaemonStatus {
        version: "0.1.0".into(),
        pid: 1,
        uptime_ms: 2,
        vm_count: 0,
        vms_running: 0,
        vms_paused: 0,
        state_dir: "/run/warmvm".into(),
        build: "warmvm 0.1.0".into(),
        last_takeover: None,
        last_reboot: None,
        binary: Some(binary("/usr/local/bin/warmvm")),
        privileges: Some(DaemonPrivileges {
            uid: 0,
            gid: 0,
            groups: vec![],
            capabilities: vec!["CAP_CHOWN".into(), "CAP_SYS_ADMIN".into()],
            no_new_privs: false,
            seccomp: "false".into(),
        }),
        reboot_in_progress: None,
        fleet: None,
    };
    check(&doc, "DaemonStatus", &fresh);
    check(
        &doc,
        "DaemonStatus",
        &DaemonStatus {
            fleet: Some(warmvm_fleet::AgentStatus {
                host_name: "h1".into(),
                connected: false,
                since_unix_ms: 1,
                lease: Some("694d8f3c2b1a0e07".into()),
                error: Some("etcd: connect to https://10.0.0.1:2379: timed out".into()),
            }),
            ..fresh.clone()
        },
    );
    check(
        &doc,
        "DaemonStatus",
        &DaemonStatus {
            last_takeover: Some(TakeoverInfo {
                previous_pid: Some(9),
                from_build: "warmvm 0.1.0 (old)".into(),
                to_build: "warmvm 0.1.0".into(),
                state_format: 2,
                commit_protocol: false,
                host_blackout_us: 700,
                from_binary: None,
                to_binary: Some(binary("/usr/local/bin/warmvm")),
            }),
            last_reboot: Some(ModeReboot {
                mode: "saved".into(),
                previous_pid: 9,
                host_downtime_us: 1,
                prepare_us: 2,
                replace_us: 3,
                bring_back_us: 4,
                bytes_written: 5,
                bytes_read: 6,
                vms: vec![
                    ModeRebootVm {
                        name: "vm0".into(),
                        downtime_us: 7,
                        ..Default::default()
                    },
                    ModeRebootVm {
                        name: "vm1".into(),
                        error: Some("corrupt".into()),
                        ..Default::default()
                    },
                ],
                recovered: true,
            }),
            // A dropped daemon, and this test's own thread as the daemon would see it.
            privileges: Some(DaemonPrivileges {
                uid: 65534,
                gid: 992,
                groups: vec![992],
                capabilities: vec!["CAP_NET_ADMIN".into(), "CAP_63".into()],
                no_new_privs: true,
                seccomp: "log".into(),
            }),
            reboot_in_progress: Some(warmvm_api::progress::RebootInProgress {
                mode: "cold".into(),
                phase: "waiting-for-guests".into(),
                vms_done: 1,
                vms_total: 2,
                elapsed_ms: 12_000,
            }),
            ..fresh
        },
    );
    check(
        &doc,
        "DaemonPrivileges",
        &warmvm_api::running_as::current().unwrap(),
    );
    for bad in [
        json!({ "uid": 0, "gid": 0, "groups": [], "capabilities": [7],
                "no_new_privs": false, "seccomp": "true" }),
        json!({ "uid": 0, "gid": 0, "groups": [], "capabilities": [],
                "no_new_privs": false }),
        json!({ "uid": 0, "gid": 0, "groups": [], "capabilities": [],
                "no_new_privs": false, "seccomp": "yes" }),
    ] {
        assert!(
            validate(&doc, &schema("DaemonPrivileges"), &bad).is_err(),
            "the schema takes {bad}"
        );
    }
    check(
        &doc,
        "SaveReport",
        &SaveReport {
            vm: "vm0".into(),
            dir: "/s/vm0".into(),
            direct_io: true,
            ..Default::default()
        },
    );
    check(
        &doc,
        "Error",
        &json!({ "error": "warm reboot failed", "phase": "restore" }),
    );
    check(&doc, "Error", &json!({ "error": "no VM named x" }));
    check(
        &doc,
        "RebootReport",
        &RebootReport {
            new_pid: 7,
            from_build: "warmvm 0.1.0".into(),
            to_build: "warmvm 0.1.0 (upgrade)".into(),
            host_blackout_us: 900,
            phases: PhaseTimes {
                stage_us: 1,
                quiesce_us: 2,
                capture_us: 3,
                transfer_us: 4,
                restore_us: 5,
                commit_us: 7,
                resume_us: 6,
            },
            vms: vec![VmBlackout {
                name: "vm0".into(),
                blackout_us: 800,
            }],
            state_bytes: 20000,
            state_format: 3,
            commit_protocol: true,
            errors: vec!["the report did not reach the old VMM".into()],
            from_binary: Some(binary("/proc/self/exe")),
            to_binary: Some(binary("/usr/local/bin/warmvm")),
            stamps: RebootStamps {
                pause_requested_ns: 10,
                captured_ns: 20,
                state_sent_ns: 30,
                state_received_ns: 40,
                restored_ns: 50,
                commit_ns: 60,
                vms: vec![VmStamps {
                    name: "vm0".into(),
                    vcpu_stops_ns: vec![11, 12],
                    vcpu_runs_ns: vec![70, 0],
                }],
            },
        },
    );
    check(&doc, "RebootReport", &RebootReport::default());
    // A report with a field the document does not know fails.
    let mut extra = serde_json::to_value(report(Lifecycle::Running, None)).unwrap();
    extra["surprise"] = json!(1);
    assert!(validate(&doc, &schema("VmReport"), &extra).is_err());
}

#[test]
fn request_schemas_match_what_the_server_accepts() {
    let doc = doc();
    // Every field VmConfig has is documented...
    let full = VmConfig {
        kernel: Some("/k".into()),
        cmdline: Some("console=ttyS0".into()),
        initrd: Some("/i".into()),
        console_log: Some("/c".into()),
        disks: vec![warmvm_vmm::config::DiskConfig {
            path: "/d.img".into(),
            read_only: true,
            cache: warmvm_vmm::config::CacheMode::Writeback,
        }],
        nets: vec![
            warmvm_vmm::config::NetConfig {
                tap: Some("tap0".into()),
                tap_fd: None,
                mac: Some("02:00:00:00:00:01".into()),
            },
            warmvm_vmm::config::NetConfig {
                tap: None,
                tap_fd: Some(0),
                mac: None,
            },
        ],
        ..VmConfig::reference("web-1", 64, 2)
    };
    check(&doc, "DiskConfig", &full.disks[0]);
    check(&doc, "NetConfig", &full.nets[0]);
    check(&doc, "NetConfig", &full.nets[1]);
    check(&doc, "VmConfig", &full);
    check(&doc, "VmConfig", &json!({ "name": "a", "memory_mib": 64 }));
    // ...and every documented field is accepted.
    let documented = doc["components"]["schemas"]["VmConfig"]["properties"]
        .as_object()
        .unwrap();
    let serialized = serde_json::to_value(&full).unwrap();
    for key in documented.keys() {
        assert!(
            serialized.get(key).is_some(),
            "VmConfig schema documents {key}, which VmConfig lacks"
        );
    }
    assert!(
        serde_json::from_value::<VmConfig>(json!({"name": "a", "memory_mib": 64, "x": 1})).is_err()
    );
    check(
        &doc,
        "StopRequest",
        &StopRequest {
            grace_secs: Some(5),
        },
    );
    check(&doc, "StopRequest", &StopRequest::default());
    let full = RebootRequest {
        mode: Mode::Warm,
        binary: Some("/usr/local/bin/warmvm".into()),
        stage_timeout_ms: Some(30_000),
        ready_budget_ms: Some(500),
        grace_secs: Some(10),
        boot_wait_secs: Some(120),
    };
    check(&doc, "RebootRequest", &full);
    for mode in [Mode::Warm, Mode::Saved, Mode::Cold] {
        check(&doc, "RebootRequest", &RebootRequest::new(mode));
    }
    let documented = doc["components"]["schemas"]["RebootRequest"]["properties"]
        .as_object()
        .unwrap();
    let serialized = serde_json::to_value(&full).unwrap();
    assert_eq!(documented.len(), serialized.as_object().unwrap().len());
    for key in documented.keys() {
        assert!(serialized.get(key).is_some(), "RebootRequest lacks {key}");
    }
    for mode in ["warm", "saved", "cold"] {
        check(&doc, "RebootRequest", &json!({ "mode": mode }));
    }
    assert!(validate(&doc, &schema("RebootRequest"), &json!({ "mode": "hot" })).is_err());
    let snap = SnapshotRequest {
        dir: "/s".into(),
        leave_paused: true,
    };
    check(&doc, "SnapshotRequest", &snap);
    assert_eq!(
        doc["components"]["schemas"]["SnapshotRequest"]["properties"]
            .as_object()
            .unwrap()
            .len(),
        serde_json::to_value(&snap)
            .unwrap()
            .as_object()
            .unwrap()
            .len()
    );
    let restore = RestoreRequest {
        dir: "/s".into(),
        name: Some("copy".into()),
        disks: vec!["/d/copy.img".into()],
        taps: vec!["tap-copy".into()],
    };
    check(&doc, "RestoreRequest", &restore);
    assert_eq!(
        doc["components"]["schemas"]["RestoreRequest"]["properties"]
            .as_object()
            .unwrap()
            .len(),
        serde_json::to_value(&restore)
            .unwrap()
            .as_object()
            .unwrap()
            .len()
    );
}

/// The name pattern in the document is the name rule of the code: a brute-force comparison
/// over short names from an alphabet that has every kind of character the rule treats apart.
#[test]
fn the_name_pattern_is_the_name_rule() {
    let doc = doc();
    let pattern = doc["components"]["schemas"]["VmConfig"]["properties"]["name"]["pattern"]
        .as_str()
        .unwrap();
    assert_eq!(pattern, warmvm_api::schema::NAME_PATTERN);
    // The pattern, read by hand: a first character from [A-Za-z0-9_], then 0-63 from
    // [A-Za-z0-9._-].
    let first = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let rest = |c: char| first(c) || c == '.' || c == '-';
    let by_pattern = |s: &str| {
        let mut cs = s.chars();
        cs.next().is_some_and(first) && cs.all(rest) && s.chars().count() <= 64
    };
    let alphabet = ['a', 'Z', '0', '_', '.', '-', ' ', '/', 'é'];
    let mut names = vec![String::new(), "a".repeat(64), "a".repeat(65)];
    for a in alphabet {
        names.push(a.to_string());
        for b in alphabet {
            names.push(format!("{a}{b}"));
            for c in alphabet {
                names.push(format!("{a}{b}{c}"));
            }
        }
    }
    for n in names {
        assert_eq!(
            warmvm_vmm::config::validate_name(&n).is_ok(),
            by_pattern(&n),
            "{n:?}"
        );
    }
}

/// The aging report, history and hold request as the monitor produces them, including a
/// taken-over reboot history and a decision.
#[test]
fn aging_answers_match_the_schema() {
    use warmvm_api::aging::{Monitor, RebootReason};
    use warmvm_vmm::AgingConfig;
    let doc = doc();
    let cfg = AgingConfig {
        memory_budget_mib: Some(1024),
        latency_objective_ms: Some(50),
        window: 8,
        min_samples: 8,
        baseline_samples: 3,
        maintenance_windows: vec!["01:00-03:00".into()],
        ..AgingConfig::default()
    };
    let old = Monitor::new(cfg.clone(), None, None);
    for _ in 0..10 {
        old.tick(2);
    }
    let carry = old.carry(RebootReason::Aging {
        metric: warmvm_api::aging::Metric::OpenFds,
        detector: warmvm_api::aging::Detector::Trend,
    });
    let m = Monitor::new(
        cfg,
        Some(carry),
        Some(warmvm_api::aging::monitor::Arrival {
            from_pid: 1,
            host_blackout_us: 0,
            mode: Mode::Saved,
            downtime_us: Some(2),
        }),
    );
    for _ in 0..10 {
        m.record_latency(std::time::Duration::from_micros(300));
        m.tick(2);
    }
    m.record_failure(&RebootReason::Schedule, "test");
    let report = m.report();
    assert!(
        report.metrics.iter().any(|a| a.trend_p.is_some()),
        "{report:?}"
    );
    check(&doc, "AgingReport", &report);
    check(&doc, "AgingHistory", &m.history());
    check(&doc, "HoldRequest", &json!({ "hold": true }));
    assert!(validate(&doc, &schema("HoldRequest"), &json!({ "hold": 1 })).is_err());
    // Every setting is documented, and only those.
    let documented = doc["components"]["schemas"]["AgingConfig"]["properties"]
        .as_object()
        .unwrap();
    let serialized = serde_json::to_value(AgingConfig::default()).unwrap();
    assert_eq!(documented.len(), serialized.as_object().unwrap().len());
}

/// The document's patterns are those the checker knows, each checked by the code's own rule.
#[test]
fn the_documented_patterns_are_the_checked_ones() {
    use warmvm_api::schema::{MAC_PATTERN, NO_NUL_PATTERN, SOCKET_ADDR_PATTERN, TAP_PATTERN};
    let doc = doc();
    let s = &doc["components"]["schemas"];
    assert_eq!(
        s["MigrateRequest"]["properties"]["to"]["pattern"],
        SOCKET_ADDR_PATTERN
    );
    for (to, valid) in [
        ("192.0.2.7:7000", true),
        ("0.0.0.0:0", true),
        ("255.255.255.255:65535", true),
        ("192.0.2.7", false),
        ("192.0.2.07:7000", false),
        ("192.0.2.7:65536", false),
        ("[::1]:7000", false),
    ] {
        assert_eq!(
            validate(&doc, &schema("MigrateRequest"), &json!({ "to": to })).is_ok(),
            valid,
            "{to}"
        );
        let req = warmvm_api::types::MigrateRequest::to(to);
        assert_eq!(req.check().is_ok(), valid, "{to}");
    }
    assert_eq!(s["NetConfig"]["properties"]["tap"]["pattern"], TAP_PATTERN);
    assert_eq!(s["NetConfig"]["properties"]["mac"]["pattern"], MAC_PATTERN);
    assert_eq!(
        s["RestoreRequest"]["properties"]["taps"]["items"]["pattern"],
        TAP_PATTERN
    );
    assert_eq!(
        s["VmConfig"]["properties"]["cmdline"]["pattern"],
        NO_NUL_PATTERN
    );
    // The rules between fields: what the server refuses, the document refuses.
    let vm = schema("VmConfig");
    for (body, valid) in [
        (
            json!({"name": "a", "memory_mib": 64, "initrd": "/i"}),
            false,
        ),
        (
            json!({"name": "a", "memory_mib": 64, "initrd": "/i", "kernel": "/k"}),
            true,
        ),
        (
            json!({"name": "a", "memory_mib": 64, "kernel": "/k", "boot": "ring3"}),
            false,
        ),
        (
            json!({"name": "a", "memory_mib": 64, "boot": "ring3"}),
            true,
        ),
        (
            json!({"name": "a", "memory_mib": 65, "hugepages": true}),
            false,
        ),
        (
            json!({"name": "a", "memory_mib": 65, "hugepages": false}),
            true,
        ),
        (json!({"name": "a", "memory_mib": 64, "vcpus": 33}), false),
        (
            json!({"name": "a", "memory_mib": 64, "vcpus": 33, "kernel": "/k"}),
            true,
        ),
        (
            json!({"name": "a", "memory_mib": 64, "vcpus": 255, "kernel": "/k"}),
            false,
        ),
        // Any RAM size the server can read is valid as a request (the host may refuse it).
        (json!({"name": "a", "memory_mib": u64::MAX}), true),
    ] {
        let host = warmvm_vmm::HostLimits {
            memory_mib: 0,
            max_vcpus: warmvm_vmm::config::MAX_VCPUS,
        };
        let config: VmConfig = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(
            validate(&doc, &vm, &body).is_ok(),
            valid,
            "{body}: {:?}",
            validate(&doc, &vm, &body)
        );
        assert_eq!(config.validate_shape(host).is_ok(), valid, "{body}");
    }
}

#[test]
fn migration_requests_and_reports_match_the_schema() {
    use warmvm_api::types::{EndReason, MigrateRequest, MigrationReport, RoundReport};
    let doc = doc();
    let req = MigrateRequest {
        to: "192.0.2.7:7000".into(),
        downtime_ms: 50,
        max_rounds: 5,
        timeout_secs: 30,
        force: true,
    };
    check(&doc, "MigrateRequest", &req);
    assert_eq!(
        doc["components"]["schemas"]["MigrateRequest"]["properties"]
            .as_object()
            .unwrap()
            .len(),
        serde_json::to_value(&req)
            .unwrap()
            .as_object()
            .unwrap()
            .len()
    );
    check(
        &doc,
        "MigrateRequest",
        &MigrateRequest::to("127.0.0.1:7000"),
    );
    assert!(validate(
        &doc,
        &schema("MigrateRequest"),
        &json!({ "to": "a:1", "x": 1 })
    )
    .is_err());
    assert!(validate(&doc, &schema("MigrateRequest"), &json!({ "max_rounds": 3 })).is_err());
    let round = RoundReport {
        round: 1,
        pages: 10,
        zero_pages: 2,
        bytes: 33_000,
        duration_us: 120,
        dirty_rate_bps: 4096,
    };
    for end in [
        EndReason::Converged,
        EndReason::Forced,
        EndReason::Cancelled {
            why: "30 rounds".into(),
        },
        EndReason::Failed {
            step: "commit".into(),
            error: "the stream broke".into(),
        },
        EndReason::Unfinished,
    ] {
        let report = MigrationReport {
            vm: "web-1".into(),
            ram_bytes: 64 << 20,
            end,
            total_us: 1,
            downtime_us: 2,
            final_round_us: 3,
            state_us: 4,
            commit_us: 5,
            resume_us: 6,
            rounds: vec![round.clone(), round.clone()],
            bandwidth_bps: 7,
            state_cost_estimate_us: 8,
            bytes_total: 9,
            state_bytes: 10,
        };
        check(&doc, "MigrationReport", &report);
    }
    assert!(validate(
        &doc,
        &schema("MigrationEnd"),
        &json!({ "reason": "teleported" })
    )
    .is_err());
    use warmvm_api::types::{MigrationResolution, Resolved};
    for resolved in [Resolved::RunsThere, Resolved::ResumedHere] {
        let r = MigrationResolution {
            vm: "web-1".into(),
            to: "192.0.2.8:7000".into(),
            migration_id: "1-2".into(),
            resolved,
        };
        check(&doc, "MigrationResolution", &r);
    }
    assert!(validate(
        &doc,
        &schema("MigrationResolution"),
        &json!({ "vm": "a", "to": "b", "migration_id": "c", "resolved": "both" })
    )
    .is_err());
}
