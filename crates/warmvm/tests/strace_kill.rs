//! The reproduction from issue 7, literally: a warm reboot whose new VMM runs as
//!
//! ```sh
//! exec strace -f -e trace=sendmsg -e inject=sendmsg:signal=KILL:when=N /path/to/warmvm "$@"
//! ```
//!
//! (SIGKILLed as it enters its Nth sendmsg, so that message is never sent), for every N
//! that hits a message of the handover, and the same with the old daemon started under
//! strace. Busy guests (`interval_ms=0 refill_every=1`) rewrite their memory without pause.
//! Each case must end with the VM running with no mismatch, or lost where the process
//! killed owned it.
//!
//! Which message the Nth sendmsg is comes from a survey: the same reboot traced without
//! injection. strace counts per thread ("per syscall and per tracee"), so the victim of N
//! is the first sendmsg, in the order of the trace, that is the Nth of its thread.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use warmvm_testkit::{scratch, Daemon, Outcome, Ready, BUSY};

const BIN: &str = env!("CARGO_BIN_EXE_warmvm");

#[derive(Clone, Copy, Debug)]
enum Traced {
    /// The new VMM, through `--binary` = a script that execs strace.
    New,
    /// The old daemon, started under strace (`-f` follows the new VMM it starts, too).
    Old,
}

fn strace_usable(test: &str) -> bool {
    let ok = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    ok || warmvm_testkit::skip_or_fail(
        test,
        "strace is not installed (apt-get install strace; .ci/run does)",
    )
}

/// A daemon of this build in `dir` under `wrapper` (strace, or nothing), logging at info
/// and stopping its guests within 1 s; ready once its API answers, which is all the judge
/// watches.
fn daemon(dir: &Path, wrapper: &[&str]) -> Daemon {
    Daemon::builder(dir)
        .binary(BIN)
        .wrapper(wrapper)
        .log_level("info")
        .stop_grace_secs(1)
        .ready(Ready::Answers, Duration::from_secs(60))
        .client_timeout(Duration::from_secs(20))
        .start()
}

/// One warm reboot of a daemon with one busy VM, with `traced` under
/// `strace -f -e trace=sendmsg <opts>`; the settled outcome and the daemons' log.
fn reboot_under_strace(traced: Traced, opts: &[String], tag: &str) -> (Outcome, String) {
    let dir = scratch(tag);
    let mut strace = vec!["strace", "-f", "-e", "trace=sendmsg"];
    strace.extend(opts.iter().map(String::as_str));
    let mut body = json!({ "mode": "warm" });
    let mut d = match traced {
        Traced::New => {
            let script = dir.join("warmvm-under-strace");
            std::fs::write(
                &script,
                format!("#!/bin/sh\nexec {} {BIN} \"$@\"\n", strace.join(" ")),
            )
            .unwrap();
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
            body["binary"] = script.to_str().unwrap().into();
            daemon(&dir, &[])
        }
        Traced::Old => daemon(&dir, &strace),
    };
    let names = vec!["vm0".to_string()];
    d.create_vms(&names, 2, BUSY);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let _ = d.reboot(&body);
    let outcome = d.settle_and_judge(&names, 30);
    (outcome, d.log())
}

/// The handover message each sendmsg of a trace carries (the MessagePack enum variant's
/// name, the first word of the buffer), with the thread that sent it, in trace order.
fn messages(trace: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for line in trace.lines() {
        let Some((tid, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let (Ok(tid), Some(iov)) = (tid.parse(), rest.trim_start().strip_prefix("sendmsg(")) else {
            continue;
        };
        let Some((_, buf)) = iov.split_once("iov_base=\"") else {
            out.push((tid, "?".to_string()));
            continue;
        };
        // Skip the MessagePack headers (octal escapes), then take the name.
        let mut s = buf;
        while let Some(r) = s.strip_prefix('\\') {
            s = r.trim_start_matches(|c: char| c.is_ascii_digit());
        }
        let name: String = s.chars().take_while(char::is_ascii_alphabetic).collect();
        out.push((tid, name));
    }
    out
}

/// For each N, the message whose sendmsg is hit first: the first in trace order that is
/// the Nth of its thread.
fn victims(msgs: &[(u32, String)]) -> BTreeMap<usize, String> {
    let mut per_thread: BTreeMap<u32, usize> = BTreeMap::new();
    let mut victims = BTreeMap::new();
    for (tid, name) in msgs {
        let n = per_thread.entry(*tid).or_default();
        *n += 1;
        victims.entry(*n).or_insert_with(|| name.clone());
    }
    victims
}

/// What killing the sender of `msg` just before it is sent must end in.
fn expected(msg: &str) -> Outcome {
    match msg {
        // The old VMM dies before the state has left it: the VMs die with it.
        "Hello" | "PrepareVm" | "PrepareDone" | "StageVm" | "StageDone" | "State" => {
            Outcome::Lost(String::new())
        }
        // The old VMM dies after sending the state: the new one adopts the VMs.
        "Commit" => Outcome::Running { in_old: false },
        // The new VMM dies before it may run a guest: the old one resumes its own VMs.
        "Prepared" | "Ready" | "Failed" => Outcome::Running { in_old: true },
        // The new VMM dies after `Commit`, running the guests: they were its own.
        "Resumed" => Outcome::Lost(String::new()),
        // Anything else (after the handover): the VMs must run on somewhere.
        other => panic!("unexpected message {other:?} in the survey"),
    }
}

fn matches(got: &Outcome, want: &Outcome) -> bool {
    match (got, want) {
        (Outcome::Lost(_), Outcome::Lost(_)) => true,
        _ => got == want,
    }
}

/// The trace shows the thread that sent `msg` interrupted in that sendmsg (`= ?`, on its
/// line or, when other threads' lines came between, on its `<... sendmsg resumed>`: the
/// call never returned) and the process killed by SIGKILL. The SIGKILL line is looked for
/// on any thread: in a group exit strace does not always print one for the thread that
/// was inside the call (seen in a clean-clone run: its `= ?`, its siblings' `killed by
/// SIGKILL`, and nothing more of its own).
fn kill_fired(trace: &str, msg: &str) -> bool {
    let killed = trace
        .lines()
        .any(|l| l.trim_end().ends_with("+++ killed by SIGKILL +++"));
    killed
        && trace
            .lines()
            .filter(|l| l.contains("sendmsg(") && l.contains(msg))
            .filter_map(|l| l.split_whitespace().next())
            .any(|tid| {
                trace
                    .lines()
                    .filter(|l| l.split_whitespace().next() == Some(tid))
                    .any(|l| l.contains("sendmsg") && l.trim_end().ends_with("= ?"))
            })
}

fn kill_at_each_sendmsg(traced: Traced, tag: &str) {
    // The survey: the same reboot, traced, nothing injected.
    let dir = scratch(&format!("{tag}-survey"));
    let trace_file = dir.join("sendmsg.trace");
    let opts = ["-s", "64", "-o", trace_file.to_str().unwrap()].map(String::from);
    let (outcome, log) = reboot_under_strace(traced, &opts, &format!("{tag}-s"));
    assert_eq!(outcome, Outcome::Running { in_old: false }, "survey\n{log}");
    let trace = std::fs::read_to_string(&trace_file).unwrap();
    let msgs = messages(&trace);
    let victims = victims(&msgs);
    eprintln!("{tag}: sendmsg calls {msgs:?}; victim of each N {victims:?}");
    assert!(
        msgs.iter().any(|(_, m)| m == "Prepared"),
        "the survey saw the new VMM's messages: {trace}"
    );
    let _ = std::fs::remove_dir_all(dir);

    let mut wrong = Vec::new();
    for (n, msg) in &victims {
        let kill_trace = scratch(&format!("{tag}-{n}-trace")).join("kill.trace");
        let inject = [
            "-e".to_string(),
            format!("inject=sendmsg:signal=KILL:when={n}"),
            "-o".to_string(),
            kill_trace.to_str().unwrap().to_string(),
        ];
        let (got, log) = reboot_under_strace(traced, &inject, &format!("{tag}-{n}"));
        // Some outcomes (a kill at Commit) look just like no kill at all: the trace must
        // show that the kill was injected and the process died of it.
        let trace = std::fs::read_to_string(&kill_trace).unwrap_or_default();
        assert!(
            kill_fired(&trace, msg),
            "{tag}: the kill at sendmsg {n} ({msg}) never fired:\n{trace}\n{log}"
        );
        let want = expected(msg);
        eprintln!("{tag}: killed at sendmsg {n} ({msg}): {got:?}");
        if !matches(&got, &want) {
            wrong.push(format!(
                "killed at sendmsg {n} ({msg}): {got:?}, expected {want:?}\n{log}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

#[test]
fn new_vmm_killed_at_each_sendmsg_by_strace() {
    let test = "new_vmm_killed_at_each_sendmsg_by_strace";
    if !warmvm_testkit::kvm_available(test) || !strace_usable(test) {
        return;
    }
    kill_at_each_sendmsg(Traced::New, "snew");
}

#[test]
fn old_daemon_killed_at_each_sendmsg_by_strace() {
    let test = "old_daemon_killed_at_each_sendmsg_by_strace";
    if !warmvm_testkit::kvm_available(test) || !strace_usable(test) {
        return;
    }
    kill_at_each_sendmsg(Traced::Old, "sold");
}

#[test]
fn a_kill_shows_in_the_trace_also_when_other_threads_interleave() {
    let whole = "7 sendmsg(21, {msg_iov=[{iov_base=\"\\201\\245Commit\"}]}, 0) = ?\n7 +++ killed by SIGKILL +++\n";
    assert!(kill_fired(whole, "Commit"));
    let split = "7 sendmsg(21, {msg_iov=[{iov_base=\"\\201\\253PrepareDone\"}]}, 0 <unfinished ...>\n\
                 8 +++ killed by SIGKILL +++\n7 <... sendmsg resumed>) = ?\n7 +++ killed by SIGKILL +++\n";
    assert!(kill_fired(split, "PrepareDone"));
    // The sending thread's own SIGKILL line missing, as strace printed it once.
    let siblings_only =
        "9 sendmsg(21, {msg_iov=[{iov_base=\"\\201\\245Hello\"}]}, 0 <unfinished ...>\n\
                         5 +++ killed by SIGKILL +++\n9 <... sendmsg resumed>) = ?\n\
                         6 +++ killed by SIGKILL +++\n";
    assert!(kill_fired(siblings_only, "Hello"));
    // Interrupted, but nothing was killed: not the injected kill.
    let no_kill = "9 sendmsg(21, {msg_iov=[{iov_base=\"\\201\\245Hello\"}]}, 0) = ?\n9 +++ exited with 1 +++\n";
    assert!(!kill_fired(no_kill, "Hello"));
    // Sent whole, and the process ended on its own: no kill.
    let sent = "7 sendmsg(21, {msg_iov=[{iov_base=\"\\201\\246Commit\"}]}, 0) = 9\n7 +++ exited with 0 +++\n";
    assert!(!kill_fired(sent, "Commit"));
    assert!(!kill_fired(whole, "Ready"));
}

#[test]
fn messages_are_read_from_strace_lines() {
    let trace = r#"6007  sendmsg(17, {msg_name=NULL, msg_iov=[{iov_base="\201\245Hello\202\256format", iov_len=44}]}, 0) = 44
6008  sendmsg(3, {msg_name=NULL, msg_iov=[{iov_base="\201\250Prepared\201\243pid\315\27x", iov_len=18}]}, 0) = 18
6002  --- SIGRT_3 {si_signo=SIGRT_3} ---
6007  sendmsg(17, {msg_name=NULL, msg_iov=[{iov_base="\245State", iov_len=6}]}, 0) = 6
6007  +++ exited with 0 +++"#;
    let msgs = messages(trace);
    assert_eq!(
        msgs,
        vec![
            (6007, "Hello".to_string()),
            (6008, "Prepared".to_string()),
            (6007, "State".to_string())
        ]
    );
    let v = victims(&msgs);
    assert_eq!(v.get(&1).map(String::as_str), Some("Hello"));
    assert_eq!(v.get(&2).map(String::as_str), Some("State"));
    assert_eq!(v.len(), 2);
}
