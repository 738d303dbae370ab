//! docs/openapi.json is the API's contract, checked by a third-party client: Schemathesis
//! (PyPI; scripts/install-schemathesis.sh puts it in target/schemathesis) runs against a live
//! daemon, with every check, in all its phases (examples, coverage, fuzzing, and stateful
//! sequences that follow the document's links), and this test fails if Schemathesis does.
//!
//! Schemathesis speaks HTTP over TCP and the daemon over a Unix socket, so the test forwards
//! a loopback port to the socket. `PUT /v1/reboot` is left out of the fuzzed operations: a
//! successful one replaces the daemon process (and each takes a second or more), which would
//! make the run slow and leave the forwarder talking to a daemon the test does not own; the
//! reboot request's schema is checked by tests/api_requests.rs instead (a missing binary, a null
//! binary). contract/hooks.py keeps generated VMs small.
//!
//! The checks are Schemathesis's own, unconfigured: a request the document allows may be
//! refused only with a status that says the host's state is why (404 a file it names does not
//! exist, 409 a conflict with the host's or the daemon's state, 507 not enough memory or
//! space) or that the host failed, so the document states every rule a request alone can break.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use warmvm_testkit::*;

/// The whole Schemathesis run may take this long; it is killed (and the test fails) after.
const RUN_LIMIT: Duration = Duration::from_secs(240);

fn schemathesis() -> PathBuf {
    let path = std::env::var_os("WARMVM_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/schemathesis/bin/st")
        });
    assert!(
        path.is_file(),
        "Schemathesis is not installed at {}: run scripts/install-schemathesis.sh (scripts/test does)",
        path.display()
    );
    path
}

/// Copy one direction of a forwarded connection, then pass the end of the stream on.
fn pump(mut from: impl Read, mut to: impl Write, done: impl FnOnce()) {
    let _ = std::io::copy(&mut from, &mut to);
    done();
}

/// Forward connections on a loopback port to the daemon's socket, one thread pair each.
fn forward(socket: PathBuf) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let Ok(unix) = UnixStream::connect(&socket) else {
                continue;
            };
            let (tcp2, unix2) = (tcp.try_clone().unwrap(), unix.try_clone().unwrap());
            let (tcp3, unix3) = (tcp.try_clone().unwrap(), unix.try_clone().unwrap());
            std::thread::spawn(move || {
                pump(tcp, unix, move || drop(unix2.shutdown(Shutdown::Write)))
            });
            std::thread::spawn(move || {
                pump(unix3, tcp3, move || drop(tcp2.shutdown(Shutdown::Both)))
            });
        }
    });
    port
}

#[test]
fn schemathesis_finds_the_daemon_true_to_its_openapi_document() {
    if !warmvm_testkit::kvm_available("schemathesis") {
        return;
    }
    let st = schemathesis();
    let dir = scratch("contract");
    let d = Daemon::start(&dir, &[]);
    let port = forward(d.socket.clone());
    let contract = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/contract");
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let report = dir.join("report");
    let mut child = Command::new(&st)
        .arg("run")
        .arg(&doc)
        .args(["--url", &format!("http://127.0.0.1:{port}")])
        .args(["--checks", "all"])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--exclude-path", "/v1/reboot"])
        // Snapshots write and read files anywhere the daemon (root) can: not for fuzzing.
        .args(["--exclude-path", "/v1/vms/{name}/snapshot"])
        .args(["--exclude-path", "/v1/restore"])
        .args(["--max-examples", "100", "--workers", "1"])
        .args([
            "--seed",
            &std::env::var("WARMVM_SCHEMATHESIS_SEED").unwrap_or("12".into()),
        ])
        .args(["--request-timeout", "30", "--no-color"])
        .args(["--generation-database", "none"])
        .arg("--report-dir")
        .arg(&report)
        .current_dir(&dir)
        .env("SCHEMATHESIS_HOOKS", contract.join("hooks.py"))
        .env("WARMVM_CONTRACT_DIR", &dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read its output on threads, so a full pipe never stalls it.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let elapsed = started.elapsed();
    eprintln!("schemathesis ran {:.1} s\n{out}", elapsed.as_secs_f64());
    match status {
        None => panic!(
            "schemathesis did not finish within {RUN_LIMIT:?}\n{out}\n{err}\n{}",
            d.log()
        ),
        Some(s) => assert!(
            s.success(),
            "schemathesis failed ({s}):\n{out}\n{err}\ndaemon log:\n{}",
            d.log()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
    // The daemon is still there and answers.
    assert!(d.client().status().is_ok(), "{}", d.log());
}
