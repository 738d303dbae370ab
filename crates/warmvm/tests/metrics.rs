//! The live metrics exposition, checked by Prometheus's own parser and linter
//! (`promtool check metrics`, Debian package `prometheus`): a daemon with running VMs,
//! paused and stopped ones, scraped on its socket and on its loopback port.

use std::io::Write;
use std::process::{Command, Stdio};

use warmvm_testkit::*;

/// promtool's verdict on `text`: (success, its output).
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run promtool ({e}): install Debian's `prometheus` package (see README, Requirements)"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), msg)
}

#[test]
fn promtool_rejects_a_broken_exposition() {
    // The checker itself must be able to fail: a counter without `_total` and a sample
    // without a value.
    let (ok, msg) = promtool_check("# TYPE x counter\nx 1\ny{a=\"b\"}\n");
    assert!(!ok, "promtool accepted a broken exposition: {msg}");
}

#[test]
fn live_metrics_pass_promtool() {
    if !warmvm_testkit::kvm_available("live_metrics_pass_promtool") {
        return;
    }
    let dir = scratch("promtool");
    let d = Daemon::start(&dir, &["--metrics-addr", "127.0.0.1:19467"]);
    let c = d.client();
    for name in ["m-run", "m-paused", "m-stopped"] {
        c.create(&serde_json::from_value(reference_vm(name)).unwrap())
            .unwrap();
    }
    assert!(wait_until(30, || c
        .show("m-run")
        .is_ok_and(|r| counter(&r) > 0)));
    c.pause("m-paused").unwrap();
    c.stop("m-stopped", Some(1)).unwrap();

    let text = c.metrics().unwrap();
    // Every family there today is still there, under its name.
    for sample in [
        "warmvm_daemon_info{",
        "warmvm_vms ",
        "warmvm_vm_state{",
        "warmvm_vm_memory_bytes{",
        "warmvm_vm_resident_memory_bytes{",
        "warmvm_vm_unknown_accesses_total{",
        "warmvm_vcpu_exits_total{",
        "warmvm_vcpu_kicks_total{",
        "warmvm_vcpu_waits_total{",
        "warmvm_vcpu_wait_seconds_total{",
        "warmvm_guest_pages_verified_total{",
        "warmvm_guest_mismatches_total{",
        "warmvm_guest_progress{",
        "warmvm_guest_passes_min{",
        "warmvm_guest_max_gap_seconds{",
        "warmvm_guest_vcpu_progress{",
        "warmvm_guest_vcpu_pages_verified_total{",
    ] {
        assert!(text.contains(sample), "{sample} missing:\n{text}");
    }
    assert!(
        text.contains("warmvm_vm_state{state=\"paused\",vm=\"m-paused\"} 1"),
        "{text}"
    );
    let (ok, msg) = promtool_check(&text);
    assert!(ok, "promtool check metrics failed: {msg}\n{text}");

    // The loopback port serves the same exposition.
    let mut s = std::net::TcpStream::connect("127.0.0.1:19467").unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut raw).unwrap();
    let resp = warmvm_api::http::parse_response(&raw).unwrap();
    assert_eq!(resp.status, 200);
    let (ok, msg) = promtool_check(&String::from_utf8_lossy(&resp.body));
    assert!(ok, "promtool check metrics failed on the TCP port: {msg}");
}
