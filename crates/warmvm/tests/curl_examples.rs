//! The README's and docs/daemon.md's curl examples, run as written against a live daemon.

use std::process::Command;

use serde_json::{json, Value};
use warmvm_testkit::*;

/// Every `curl` example in the README runs as written against a daemon, warm reboot included.
#[test]
fn curl_examples_in_the_readme_work() {
    if !warmvm_testkit::kvm_available("curl_examples_in_the_readme_work") {
        return;
    }
    if Command::new("curl").arg("--version").output().is_err() {
        skip_or_fail(
            "curl_examples_in_the_readme_work",
            "curl is not installed (apt-get install -y curl)",
        );
        return;
    }
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let examples = curl_examples(&text);
    assert!(examples.len() >= 6, "{examples:#?}");
    let dir = scratch("readme-curl");
    let mut d = Daemon::start(&dir, &[]);
    let first_pid = d.client().status().unwrap()["pid"].clone();
    for example in &examples {
        let stdout = run_example(example, &d.socket);
        let v: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{example}: not JSON ({e}): {stdout}"));
        assert!(v.get("error").is_none(), "{example}: {v}");
        if example.contains("-X POST") {
            assert!(wait_until(60, || counter(
                &d.client().show("ref-1").unwrap()
            ) > 0));
        }
        if example.contains("/v1/reboot") {
            let new_pid = d.client().status().unwrap()["pid"].as_u64().unwrap() as u32;
            d.follow_reboot(new_pid);
        }
    }
    let status = d.client().status().unwrap();
    assert_ne!(
        status["pid"], first_pid,
        "the README's reboot replaced the daemon"
    );
    assert_eq!(
        d.client().list().unwrap()["vms"],
        json!([]),
        "the examples clean up"
    );
}

/// Every `curl` example in docs/daemon.md runs as written (with $SOCK pointing at a test
/// daemon) and succeeds.
#[test]
fn curl_examples_in_the_docs_work() {
    if !warmvm_testkit::kvm_available("curl_examples_in_the_docs_work") {
        return;
    }
    if Command::new("curl").arg("--version").output().is_err() {
        skip_or_fail(
            "curl_examples_in_the_docs_work",
            "curl is not installed (apt-get install -y curl)",
        );
        return;
    }
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/daemon.md"))
            .unwrap();
    let examples = curl_examples(&text);
    assert!(examples.len() >= 8, "{examples:#?}");
    let dir = scratch("curl");
    let d = Daemon::start(&dir, &["--metrics-addr", "127.0.0.1:9464"]);
    for example in &examples {
        let stdout = run_example(example, &d.socket);
        if example.contains("/metrics") {
            assert!(
                stdout.contains("# TYPE warmvm_vms gauge"),
                "{example}: {stdout}"
            );
        } else {
            let v: Value = serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("{example}: not JSON ({e}): {stdout}"));
            // Only the example that shows an error leaves out --fail-with-body.
            let shows_error = !example.contains("--fail-with-body");
            assert_eq!(v.get("error").is_some(), shows_error, "{example}: {v}");
        }
        // Give the guest a moment to report before it is shown, paused or stopped.
        if example.contains("-X POST") {
            let name = "web-1";
            assert!(wait_until(60, || counter(&d.client().show(name).unwrap()) > 0));
        }
    }
    assert_eq!(
        d.client().list().unwrap()["vms"],
        json!([]),
        "the examples clean up"
    );
}

/// Run a documented shell example with $SOCK set; it must succeed. Returns its stdout.
fn run_example(example: &str, socket: &std::path::Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(example)
        .env("SOCK", socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{example}\nexit {:?}: {stdout}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The commands in ```sh blocks of docs/daemon.md that start with `curl`, continuation lines
/// joined as the shell would.
fn curl_examples(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut current: Option<String> = None;
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            in_sh = !in_sh && line.trim() == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        match current.as_mut() {
            Some(cmd) => {
                cmd.push('\n');
                cmd.push_str(line);
            }
            None if line.starts_with("curl ") => current = Some(line.to_string()),
            None => continue,
        }
        if !line.ends_with('\\') {
            out.extend(current.take());
        }
    }
    out
}
