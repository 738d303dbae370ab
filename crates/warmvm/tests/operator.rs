//! The CLI as an operator meets it in the first hour (issue 12): global options on either
//! side of the subcommand, `vm create` from flags, a file or standard input, names the CLI
//! can address, tables that fit long names, `vm console`, `vm delete` and its state
//! directory, completions and man pages.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use warmvm_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_warmvm");

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn warmvm(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[test]
fn global_options_go_before_or_after_the_subcommand() {
    // No daemon there: every form must get as far as trying to connect (exit 3), not be
    // refused by the argument parser (exit 2).
    for args in [
        &["--socket", "/nonexistent/s", "reboot", "--mode", "warm"][..],
        &["reboot", "--mode", "warm", "--socket", "/nonexistent/s"],
        &["--json", "--socket", "/nonexistent/s", "status"],
        &["status", "--json", "--socket", "/nonexistent/s"],
        &["--socket", "/nonexistent/s", "vm", "list", "--json"],
        &["vm", "--socket", "/nonexistent/s", "show", "web-1"],
    ] {
        let o = warmvm(args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("no warmvm daemon is listening on /nonexistent/s"));
    }
}

#[test]
fn names_the_cli_cannot_address_are_refused_before_anything_is_sent() {
    let o = warmvm(&["--socket", "/nonexistent/s", "vm", "show", "a/b"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("is invalid"), "{}", stderr(&o));
    let long = "x".repeat(65);
    let o = warmvm(&[
        "--socket",
        "/nonexistent/s",
        "vm",
        "create",
        "--name",
        &long,
        "--memory",
        "64",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // A file naming `-dash` is refused by the CLI too, before the daemon is asked.
    let dir = scratch("dashfile");
    let f = dir.join("vm.toml");
    std::fs::write(&f, "name = \"-dash\"\nmemory_mib = 64\n").unwrap();
    let o = warmvm(&[
        "--socket",
        "/nonexistent/s",
        "vm",
        "create",
        f.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("\"-dash\" is invalid"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn completions_and_man_pages_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let o = warmvm(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let text = stdout(&o);
        assert!(
            text.contains("console") && text.contains("keep-logs"),
            "{shell} completion lacks the vm subcommands"
        );
    }
    let dir = scratch("man");
    let o = warmvm(&["man", dir.join("man1").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for page in [
        "warmvm.1",
        "warmvm-vm-create.1",
        "warmvm-vm-console.1",
        "warmvm-daemon.1",
    ] {
        let text = std::fs::read_to_string(dir.join("man1").join(page)).unwrap();
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is not roff"
        );
    }
    let create = std::fs::read_to_string(dir.join("man1/warmvm-vm-create.1")).unwrap();
    assert!(create.contains("memory") && create.contains("socket"));
    let _ = std::fs::remove_dir_all(dir);
}

/// Create a VM through `vm create` with `args`, optionally feeding `stdin`.
fn create(d: &Daemon, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args([
            "--socket",
            d.socket.to_str().unwrap(),
            "--json",
            "vm",
            "create",
        ])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

#[test]
fn vm_create_from_flags_file_and_stdin_and_long_names_in_tables() {
    if !warmvm_testkit::kvm_available("vm_create_forms") {
        return;
    }
    let dir = scratch("create");
    let d = Daemon::start(&dir, &[]);
    let long = "n".repeat(64);
    let o = create(
        &d,
        &[
            "--name",
            &long,
            "--memory",
            "16",
            "--vcpus",
            "2",
            "--cmdline",
            "quiet interval_ms=50",
            "--boot",
            "ring3",
        ],
        None,
    );
    assert!(o.status.success(), "{}\n{}", stderr(&o), d.log());
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            r["name"].as_str(),
            r["memory_mib"].as_u64(),
            r["vcpus"].as_u64()
        ),
        (Some(long.as_str()), Some(16), Some(2))
    );
    assert_eq!(r["boot"], "ring3");

    let o = create(
        &d,
        &["-"],
        Some("name = \"from-stdin\"\nmemory_mib = 16\ncmdline = \"quiet\"\n"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = create(
        &d,
        &["-"],
        Some(r#"{"name": "json-stdin", "memory_mib": 16, "cmdline": "quiet"}"#),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let f = dir.join("vm.toml");
    std::fs::write(
        &f,
        "name = \"from-file\"\nmemory_mib = 16\ncmdline = \"quiet\"\n",
    )
    .unwrap();
    let o = create(&d, &[f.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", stderr(&o));
    // Bad standard input: one line, exit 2, nothing created.
    let o = create(
        &d,
        &["-"],
        Some("name = \"bad\"\nmemory_mib = 16\nbogus = 1\n"),
    );
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));

    // The API refuses a name the CLI could not address.
    let r = d
        .client()
        .raw(
            "POST",
            "/v1/vms",
            Some(br#"{"name": "-dash", "memory_mib": 16}"#),
        )
        .unwrap();
    assert_eq!(r.status, 400);

    let list = d.cli(&["vm", "list"]);
    assert!(list.status.success());
    let text = stdout(&list);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(!text.contains("bad") && !text.contains("-dash"));
    // The STATE column starts at the same offset on every line, past the 64-character name.
    let col = lines[0].find("STATE").unwrap();
    assert!(col > 64, "{text}");
    for l in &lines[1..] {
        assert_eq!(l.find("running"), Some(col), "{text}");
    }
}

#[test]
fn vm_console_prints_and_follows_and_delete_removes_the_state_directory() {
    if !warmvm_testkit::kvm_available("vm_console") {
        return;
    }
    let dir = scratch("console");
    let d = Daemon::start(&dir, &[]);
    let sock = d.socket.to_str().unwrap().to_string();
    // Not quiet: the guest writes a console line per pass, many passes a second on 16 MiB.
    for name in ["talky", "kept"] {
        let o = create(
            &d,
            &[
                "--name",
                name,
                "--memory",
                "16",
                "--cmdline",
                "interval_ms=0",
            ],
            None,
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let log = dir.join("state/talky/console.log");
    assert!(wait_until(30, || std::fs::read_to_string(&log)
        .is_ok_and(|t| t.lines().count() >= 5)));

    let o = warmvm(&[
        "--socket",
        &sock,
        "vm",
        "console",
        "talky",
        "--lines",
        "3",
        "--no-follow",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let last3 = stdout(&o);
    assert_eq!(last3.lines().count(), 3, "{last3}");
    let whole = std::fs::read_to_string(&log).unwrap();
    assert!(whole.contains(last3.lines().next().unwrap()));

    // Following: the output grows while the VM runs, and the command ends once it stops.
    let follower = Command::new(BIN)
        .args(["--socket", &sock, "vm", "console", "talky", "-n", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let stop = d.cli(&["vm", "stop", "talky", "--grace-secs", "1"]);
    assert!(stop.status.success(), "{}", stderr(&stop));
    let out = follower.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).lines().count() > 2,
        "the follower saw no new lines: {}",
        stdout(&out)
    );

    // delete removes <state dir>/<name> ...
    assert!(dir.join("state/talky").is_dir());
    let del = d.cli(&["vm", "delete", "talky"]);
    assert!(del.status.success(), "{}", stderr(&del));
    assert!(
        !dir.join("state/talky").exists(),
        "the state directory is left behind"
    );
    // ... unless asked to keep the logs.
    assert!(d
        .cli(&["vm", "stop", "kept", "--grace-secs", "1"])
        .status
        .success());
    let del = d.cli(&["vm", "delete", "kept", "--keep-logs"]);
    assert!(del.status.success(), "{}", stderr(&del));
    assert!(dir.join("state/kept/console.log").is_file());
    // A bad query is refused, and changes nothing.
    let r = d
        .client()
        .raw("DELETE", "/v1/vms/kept?keep_logs=maybe", None)
        .unwrap();
    assert_eq!(r.status, 400);
}
