//! A live upgrade from a real older build: the daemon of commit a412568, built from this
//! repository's history, hands its VMs to this build; this build then reboots into itself
//! (with the commit protocol), and refuses to hand them back down to the old build; the old
//! build's guests, which know no power button, still power off when stopped. The old build
//! holds no lock on its state directory; this build takes it as it takes over, so a third
//! daemon is refused from then on.
//!
//! Why a412568: it is the last commit before the handover got its commit point (issue 7),
//! so it writes state format 2 and has no Ready/Commit step. Format 2 is the oldest this
//! build takes over from; an upgrade from it is what every deployed daemon will go through.
//!
//! A second upgrade starts from 34a1981, the last commit whose successor settings (what a
//! daemon hands the next one beside the VMs) were untyped JSON without a version: this build
//! reads them as the legacy version, so the old daemon's connection limit and executable
//! reach the new daemon; and the old build, started by this one, still reads this build's
//! versioned settings (a downgrade within state format 3).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warmvm_testkit::{
    daemon_command, pid_alive, refused, scratch, Daemon, Outcome, Ready, Start, BUSY,
};

const BIN: &str = env!("CARGO_BIN_EXE_warmvm");

/// The old build: the last commit before the commit protocol (state format 2).
const OLD_COMMIT: &str = "a4125687dc243b036af1a0ed9ee947d7161014e4";
const OLD_SHORT: &str = "a412568";
/// The last commit whose successor settings were untyped (no version key).
const UNTYPED_COMMIT: &str = "34a198173d6d3e256826f5cb527e55b272f568d2";
const UNTYPED_SHORT: &str = "34a1981";

/// The workspace's root, and its target directory.
fn dirs() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/warmvm is two levels below the workspace")
        .to_path_buf();
    let target = Path::new(BIN)
        .ancestors()
        .nth(2)
        .expect("target dir above target/<profile>/warmvm")
        .to_path_buf();
    (root, target)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Build an old commit's daemon (`cargo build --release --locked -p warmvm`) from
/// `git archive` into target/old-builds/<short>/, with a target directory of its own; skip
/// the build when its binary exists and the stamp (commit, compiler) matches.
fn old_build(commit: &str, short: &str) -> PathBuf {
    let (root, target) = dirs();
    let known = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        known,
        "commit {commit} (the old build this test upgrades from) is not in the history \
         of the repository at {}: run the test in a full clone (git fetch --unshallow)",
        root.display()
    );
    let base = target.join("old-builds").join(short);
    let src = base.join("src");
    let bin = base.join("target").join("release").join("warmvm");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let stamp = format!("{commit}\n{}\n", run(Command::new(rustc).arg("-V")));
    let stamp_file = base.join("stamp");
    if bin.exists() && std::fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp) {
        return bin;
    }
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_file(&stamp_file);
    std::fs::create_dir_all(&src).unwrap();
    let archive = base.join("src.tar");
    run(Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["archive", "--format=tar", "-o"])
        .arg(&archive)
        .arg(commit));
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&src));
    let _ = std::fs::remove_file(&archive);
    let started = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args(["build", "--release", "--locked", "--quiet", "-p", "warmvm"])
        .arg("--target-dir")
        .arg(base.join("target"))
        .current_dir(&src)
        .env_remove("WARMVM_BUILD_ID"));
    eprintln!("built {short} in {:.0} s", started.elapsed().as_secs_f64());
    assert!(bin.exists(), "the old build made no {}", bin.display());
    std::fs::write(&stamp_file, stamp).unwrap();
    bin
}

/// An older build's daemon, given the time a release binary of its age needs to answer.
fn old_daemon(dir: &Path, old_bin: &Path) -> Start {
    Daemon::builder(dir)
        .binary(old_bin)
        .log_level("info")
        .stop_grace_secs(1)
        .ready(Ready::Answers, Duration::from_secs(60))
        .client_timeout(Duration::from_secs(20))
}

fn status(d: &Daemon) -> Value {
    d.client().status().unwrap()
}

/// Another daemon of this build on `d`'s state directory is refused, naming `d`'s pid: the
/// daemon serving holds the directory's lock, also when an older build without the lock
/// started it.
fn assert_third_daemon_refused(d: &Daemon) {
    let out = refused(
        daemon_command(&d.dir.join("third.sock"))
            .args(["--log-level", "error", "--state-dir"])
            .arg(d.dir.join("state")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.trim_end().ends_with(&format!(
            "is in use by another warmvm process (pid {}): refusing to start",
            d.pid
        )),
        "{err}"
    );
    assert!(!d.dir.join("third.sock").exists());
}

/// Reboot `d` into `binary` (None: its own); it must succeed and hand over to a new pid,
/// the old daemon must exit, and the VMs must run on in the new one, verified.
fn upgrade(d: &mut Daemon, binary: Option<&Path>, names: &[String]) {
    let mut body = json!({ "mode": "warm" });
    if let Some(b) = binary {
        body["binary"] = b.to_str().unwrap().into();
    }
    upgrade_with(d, &body, names);
}

/// [`upgrade`] with the reboot request's `body`.
fn upgrade_with(d: &mut Daemon, body: &Value, names: &[String]) {
    let old = d.pid;
    let (code, answer) = d
        .reboot(body)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    assert_eq!(code, 200, "{answer}\n{}", d.log());
    assert_eq!(
        d.settle_and_judge(names, 30),
        Outcome::Running { in_old: false },
        "{}",
        d.log()
    );
    assert_ne!(d.pid, old);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pid_alive(old) {
        assert!(
            Instant::now() < deadline,
            "the old daemon {old} did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn upgrade_from_the_last_build_without_the_commit_protocol() {
    if !warmvm_testkit::kvm_available("upgrade_from_the_last_build_without_the_commit_protocol") {
        return;
    }
    let old_bin = old_build(OLD_COMMIT, OLD_SHORT);
    let dir = scratch("upgrade");
    // Ready once it answers: the old build may not notify as this one does.
    let mut d = old_daemon(&dir, &old_bin).start();
    let names: Vec<String> = (0..2).map(|i| format!("vm{i}")).collect();
    // One vCPU each: the older build runs only vCPU 0 of a VM with several.
    d.create_vms(&names, 1, BUSY);

    // Old build -> this build: it reads the old state format and knows there is no commit.
    let old_pid = d.pid;
    upgrade(&mut d, Some(Path::new(BIN)), &names);
    let s = status(&d);
    let t = &s["last_takeover"];
    assert_eq!(t["previous_pid"], old_pid, "{s}");
    assert_eq!(t["state_format"], 2, "{s}");
    assert_eq!(t["commit_protocol"], false, "{s}");
    assert_eq!(t["to_build"], s["build"], "{s}");
    assert!(t["from_build"].is_string(), "{s}");
    // The old build held no lock and handed none: the new daemon took it as it started.
    assert_third_daemon_refused(&d);

    // This build -> this build: the current format, with the commit step.
    let previous = d.pid;
    upgrade(&mut d, None, &names);
    let s = status(&d);
    let t = &s["last_takeover"];
    assert_eq!(t["previous_pid"], previous, "{s}");
    assert_eq!(t["state_format"], 3, "{s}");
    assert_eq!(t["commit_protocol"], true, "{s}");
    assert_third_daemon_refused(&d);

    // This build -> the old one: it cannot read state format 3, so the reboot is refused
    // and the VMs run on here.
    let serving = d.pid;
    let body = json!({ "mode": "warm", "binary": old_bin.to_str().unwrap() });
    let (code, answer) = d
        .reboot(&body)
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    assert_eq!(code, 409, "a downgrade is refused: {answer}\n{}", d.log());
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.contains("state format"), "{error}");
    assert_eq!(
        d.settle_and_judge(&names, 30),
        Outcome::Running { in_old: true },
        "{}",
        d.log()
    );
    assert_eq!(d.pid, serving);

    // The guests are still the old build's: they do not watch the ACPI power button, so a
    // stop also posts them the power-off command they know, and they power off themselves.
    let r = d
        .client()
        .stop(&names[0], Some(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    assert_eq!(r["state"], "powered-off", "{r}\n{}", d.log());
    assert_eq!(r["exit_status"], 0, "{r}");
}

/// The status of a `GET /v1/status` sent while `idle` other connections to `d` send
/// nothing: 503 when they use up the daemon's connection budget.
fn status_beside_idle_connections(d: &Daemon, idle: usize) -> u16 {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let held: Vec<UnixStream> = (0..idle)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    // Accepted and counted before the request below arrives.
    std::thread::sleep(Duration::from_millis(300));
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    drop(held);
    // Let the server close them before anything else is asked of it.
    std::thread::sleep(Duration::from_millis(300));
    warmvm_api::http::parse_response(&answer)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&answer)))
        .status
}

/// True if `d` serves `budget` connections at once, no more. The server counts a
/// connection until its thread ends, so one that has just been answered may still take a
/// place for a moment (then an idle connection is refused instead of held, and the request
/// gets through, or the request is refused beside fewer idle ones): each side is tried until
/// it is seen once. A budget of 64 (the default) never refuses beside `budget` idle
/// connections, and a budget below `budget` always refuses beside `budget - 1`.
fn budget_is(d: &Daemon, budget: usize) -> bool {
    let over = (0..10).any(|_| status_beside_idle_connections(d, budget) == 503);
    let under = (0..10).any(|_| status_beside_idle_connections(d, budget - 1) == 200);
    eprintln!(
        "beside {budget} idle connections, refused: {over}; beside {}, served: {under}",
        budget - 1
    );
    over && under
}

#[test]
fn upgrade_from_the_last_build_with_untyped_successor_settings() {
    if !warmvm_vmm::testing::kvm_available(
        "upgrade_from_the_last_build_with_untyped_successor_settings",
    ) {
        return;
    }
    let old_bin = old_build(UNTYPED_COMMIT, UNTYPED_SHORT);
    let dir = scratch("upgrade-untyped");
    // The old daemon gets a connection budget of 3 (default 64). A warm reboot's new daemon
    // is started without that flag: only the settings handed over can give it the budget.
    let flags = r#"exec "$0" "$@" --max-connections 3"#;
    let mut d = old_daemon(&dir, &old_bin)
        .wrapper(&["sh", "-c", flags])
        .start();
    let names: Vec<String> = (0..2).map(|i| format!("vm{i}")).collect();
    d.create_vms(&names, 1, BUSY);
    assert!(budget_is(&d, 3), "{}", d.log());

    // Old build -> this build: the legacy settings are read.
    let old_pid = d.pid;
    upgrade(&mut d, Some(Path::new(BIN)), &names);
    let s = status(&d);
    let t = &s["last_takeover"];
    assert_eq!(t["previous_pid"], old_pid, "{s}");
    assert_eq!(t["state_format"], 3, "{s}");
    assert_eq!(
        t["from_binary"]["path"],
        old_bin.to_str().unwrap(),
        "the old daemon's executable, as it handed it over: {s}"
    );
    assert!(
        budget_is(&d, 3),
        "the old daemon's connection budget was not taken over\n{}",
        d.log()
    );
    assert_third_daemon_refused(&d);

    // This build -> this build: the versioned settings carry the budget on.
    upgrade(&mut d, None, &names);
    assert!(budget_is(&d, 3), "{}", d.log());

    // This build -> the old build: it reads the versioned settings' keys as it read its own.
    let body = json!({ "mode": "warm", "binary": old_bin.to_str().unwrap() });
    upgrade_with(&mut d, &body, &names);
    assert_eq!(status(&d)["last_takeover"]["state_format"], 3);
    assert!(budget_is(&d, 3), "{}", d.log());
}
