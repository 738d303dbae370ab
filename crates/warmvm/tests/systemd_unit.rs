//! contrib/warmvm.service as docs/daemon.md installs it: systemd's own checker accepts it,
//! with and without `--user`, and what it runs matches the directories it asks systemd for
//! and the daemon's flags. (Starting it needs systemd as PID 1, which the tests cannot
//! assume; the daemon's side of `--user` under systemd is tested in privileges.rs.)

use std::path::{Path, PathBuf};
use std::process::Command;

use warmvm_testkit::scratch;

const BIN: &str = env!("CARGO_BIN_EXE_warmvm");

const INSTALLED: &str = "/usr/local/bin/warmvm";

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/warmvm.service");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The value of `key=` in the unit (the only one: each is set once).
fn value(text: &str, key: &str) -> String {
    let found: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .collect();
    assert_eq!(found.len(), 1, "{key}= is set once: {found:?}");
    found[0].to_string()
}

/// `systemd-analyze verify` on the unit with the binary it runs at `bin`: nothing printed,
/// exit 0.
fn verify(text: &str, tag: &str) {
    let dir = scratch(tag);
    let unit = dir.join("warmvm.service");
    std::fs::write(&unit, text.replace(INSTALLED, BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs (Debian package systemd, see README)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{tag}: {err}");
    assert!(err.trim().is_empty(), "{tag}: warnings: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_unit_passes_systemd_analyze_verify_with_and_without_user() {
    let text = unit_text();
    assert!(text.contains(INSTALLED), "the unit runs {INSTALLED}");
    verify(&text, "unit");
    let exec = value(&text, "ExecStart");
    let with_user = text.replace(&exec, &format!("{exec} --user nobody --group nogroup"));
    assert_ne!(with_user, text);
    verify(&with_user, "unit-user");
    // The checker must be able to fail: a command it cannot run is refused.
    let dir = scratch("unit-bad");
    let unit = dir.join("warmvm.service");
    std::fs::write(&unit, text.replace(INSTALLED, "/nonexistent/warmvm")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The words of a command line (the unit quotes nothing).
fn words(cmd: &str) -> Vec<String> {
    cmd.split_whitespace().map(str::to_string).collect()
}

fn flag(args: &[String], name: &str) -> PathBuf {
    let i = args
        .iter()
        .position(|a| a == name)
        .unwrap_or_else(|| panic!("{name} in {args:?}"));
    PathBuf::from(&args[i + 1])
}

#[test]
fn the_unit_runs_what_it_asks_systemd_for() {
    let text = unit_text();
    let start = words(&value(&text, "ExecStart"));
    let reload = words(&value(&text, "ExecReload"));
    assert_eq!(&start[..2], [INSTALLED, "daemon"]);
    // State (snapshots, saved reboots) on persistent storage that systemd makes; the socket
    // in the runtime directory; the reload is a warm reboot against that very socket.
    let state = flag(&start, "--state-dir");
    assert_eq!(
        state,
        Path::new("/var/lib").join(value(&text, "StateDirectory"))
    );
    let socket = flag(&start, "--socket");
    assert_eq!(
        socket.parent().unwrap(),
        Path::new("/run").join(value(&text, "RuntimeDirectory"))
    );
    assert_eq!(
        reload,
        words(&format!(
            "{INSTALLED} reboot --mode warm --socket {}",
            socket.display()
        ))
    );
    assert_eq!(value(&text, "Type"), "notify");
    assert_eq!(value(&text, "NotifyAccess"), "all");
    // This build takes the flags as the unit writes them (without running anything).
    for (args, tag) in [(&start, "ExecStart"), (&reload, "ExecReload")] {
        let mut help = args[1..].to_vec();
        help.push("--help".into());
        let out = Command::new(BIN).args(&help).output().unwrap();
        assert!(
            out.status.success(),
            "{tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
