//! Live migration between two daemons, each in a network namespace of its own joined by a
//! veth pair, over mutual TLS with certificates made here: a reference guest moves A→B→A
//! (once through the API, once through the CLI), and at no poll do both daemons list it
//! running; a migration that cannot happen (an unknown VM, no listener at the destination,
//! a destination that does not trust the source's certificate) leaves it running at the
//! source, verified. Faults around the commit point (named fault points of the test build,
//! `WARMVM_MIGRATION_FAULT`): a destination killed before the commit leaves the VM running
//! at the source; a source killed after it leaves it running at the destination; a stream
//! cut after it leaves the VM in doubt at the source until `--resolve` asks the
//! destination, which settles it to exactly one running copy.
//!
//! Stalls and dead links, with a short `--migration-io-timeout`: either daemon stopped
//! (SIGSTOP) mid-precopy for longer than it leaves the VM running at the source and
//! nothing at the destination; the destination stopped after Ready leaves it in doubt
//! until resolved; the source stopped after the commit still completes it. The link taken
//! down mid-precopy leaves it at the source; taken down right after the commit, in doubt
//! until resolved once the link is back. Over shaped links (tbf's rate, netem's delay
//! where the kernel has netem, random loss) a busy and a light guest each either migrate
//! or are cancelled cleanly, and the figures are printed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use warmvm_api::types::{EndReason, MigrateRequest};
use warmvm_api::{Client, ClientError};
use warmvm_testkit::{judge, sample, scratch, Daemon, Namespace};

const A_ADDR: &str = "10.91.0.1";
const B_ADDR: &str = "10.91.0.2";
const PORT: u16 = 7000;

/// Two namespaces joined by a veth pair, `A_ADDR` in the first and `B_ADDR` in the
/// second; both go (with the pair) when dropped.
struct Link {
    a: Namespace,
    b: Namespace,
}

fn link(tag: &str) -> Link {
    let a = Namespace::new(&format!("{tag}-a"));
    let b = Namespace::new(&format!("{tag}-b"));
    a.ip(&[
        "link", "add", A_VETH, "type", "veth", "peer", "name", B_VETH, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", &format!("{A_ADDR}/24"), "dev", A_VETH]);
    b.ip(&["addr", "add", &format!("{B_ADDR}/24"), "dev", B_VETH]);
    a.ip(&["link", "set", A_VETH, "up"]);
    b.ip(&["link", "set", B_VETH, "up"]);
    Link { a, b }
}

/// A CA, and certificates it signs for IP addresses, as PEM files in `dir`.
struct Ca {
    key: rcgen::KeyPair,
    cert: rcgen::Certificate,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().expect("a CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("warmvm test {name}"));
        let cert = params.self_signed(&key).expect("the CA certificate");
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem()).unwrap();
        Ca { key, cert, pem }
    }

    /// A certificate for `ip` and its key: (cert, key) files.
    fn issue(&self, dir: &Path, name: &str, ip: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("a key");
        let mut params = rcgen::CertificateParams::new(vec![ip.to_string()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("warmvm {name}"));
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("a signed certificate");
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// One test's two sides: the namespaces joined by their veth pair, a CA and both
/// daemons' certificates, and the scratch directory the daemons live in (removed when
/// dropped, unless the test is failing). Daemons are started from it with the faults a
/// test wants.
struct Rig {
    dir: PathBuf,
    link: Link,
    ca: Ca,
    a_cert: (PathBuf, PathBuf),
    b_cert: (PathBuf, PathBuf),
    /// `--migration-io-timeout` of every daemon started (the daemon's default if `None`).
    io_timeout_secs: Option<u64>,
}

/// The veth ends: `A_VETH` in A's namespace, `B_VETH` in B's.
const A_VETH: &str = "wvmig0";
const B_VETH: &str = "wvmig1";

impl Rig {
    fn new(tag: &str) -> Rig {
        let dir = scratch(tag);
        let link = link(tag);
        let ca = Ca::new(&dir, "ca");
        let a_cert = ca.issue(&dir, "a", A_ADDR);
        let b_cert = ca.issue(&dir, "b", B_ADDR);
        Rig {
            dir,
            link,
            ca,
            a_cert,
            b_cert,
            io_timeout_secs: None,
        }
    }

    /// Daemons started from here give up on a silent peer after `secs`.
    fn io_timeout(mut self, secs: u64) -> Rig {
        self.io_timeout_secs = Some(secs);
        self
    }

    /// A daemon in `ns` listening on `ip:PORT` with `cert`, trusting `trust`, in the
    /// directory `sub`, with the migration faults `faults` (`WARMVM_MIGRATION_FAULT`;
    /// none if empty).
    fn start(
        &self,
        ns: &Namespace,
        ip: &str,
        (cert, key): &(PathBuf, PathBuf),
        trust: &Path,
        sub: &str,
        faults: &str,
    ) -> Daemon {
        let listen = format!("{ip}:{PORT}");
        let mut args: Vec<std::ffi::OsString> = vec![
            "--migration-listen".into(),
            listen.into(),
            "--migration-cert".into(),
            cert.into(),
            "--migration-key".into(),
            key.into(),
            "--migration-ca".into(),
            trust.into(),
        ];
        if let Some(secs) = self.io_timeout_secs {
            args.extend(["--migration-io-timeout".into(), secs.to_string().into()]);
        }
        let env: &[(&str, &str)] = if faults.is_empty() {
            &[]
        } else {
            &[("WARMVM_MIGRATION_FAULT", faults)]
        };
        Daemon::builder(&self.dir.join(sub))
            .netns(&ns.name)
            .envs(env)
            .args(&args)
            .start()
    }

    /// The daemon at A (directory `a`).
    fn a(&self, faults: &str) -> Daemon {
        self.start(
            &self.link.a,
            A_ADDR,
            &self.a_cert,
            &self.ca.pem,
            "a",
            faults,
        )
    }

    /// A daemon at B, in its own directory `sub` (a B killed by a test is replaced by
    /// another).
    fn b(&self, sub: &str, faults: &str) -> Daemon {
        self.b_trusting(sub, faults, &self.ca.pem)
    }

    /// [`Rig::b`] trusting the CA `trust` instead of the rig's.
    fn b_trusting(&self, sub: &str, faults: &str, trust: &Path) -> Daemon {
        self.start(&self.link.b, B_ADDR, &self.b_cert, trust, sub, faults)
    }

    /// Take the link between A and B down (both ends lose their carrier), or up again.
    fn link_up(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        self.link.a.ip(&["link", "set", A_VETH, state]);
    }

    /// `tc ARGS` inside A's namespace: whether it succeeded, and its stderr.
    fn tc_at_a(&self, args: &[&str]) -> Result<(), String> {
        let out = std::process::Command::new("tc")
            .args(["-n", &self.link.a.name])
            .args(args)
            .output()
            .expect("tc runs");
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "tc {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Shape what A sends to B (the pages): `delay` with netem (if this kernel has it;
    /// what was done is returned, to be printed), then at most `rate` with tbf.
    fn shape(&self, rate: &str, delay: &str) -> String {
        let dev = A_VETH;
        let netem = self.tc_at_a(&[
            "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", delay,
        ]);
        let (parent, said) = match netem {
            Ok(()) => (
                vec!["parent", "1:", "handle", "2:"],
                format!("{rate}, {delay} delay"),
            ),
            Err(e) => (
                vec!["root"],
                format!(
                    "{rate}, no delay (netem refused: {})",
                    e.rsplit(": ").next().unwrap_or_default()
                ),
            ),
        };
        let mut args = vec!["qdisc", "add", "dev", dev];
        args.extend(parent);
        args.extend(["tbf", "rate", rate, "burst", "256kb", "latency", "100ms"]);
        self.tc_at_a(&args).unwrap_or_else(|e| panic!("{e}"));
        said
    }

    /// Drop one in `one_in` of the packets A sends to B, at random: a classic BPF filter
    /// on the egress hook (it matches when the kernel's random number is below
    /// 2^32 / `one_in`) redirects them to a veth end that is down, which drops them.
    /// (netem's loss does the same where the kernel has netem; this needs only clsact,
    /// cls_bpf and mirred.)
    fn lose(&self, one_in: u32) {
        self.link.a.ip(&[
            "link", "add", "wvdrop0", "type", "veth", "peer", "name", "wvdrop1",
        ]);
        // ld rand; jge #threshold → no match; ret -1 (match); ret 0 (no match).
        let threshold = u32::MAX / one_in;
        let program = format!("4,32 0 0 4294963256,53 1 0 {threshold},6 0 0 4294967295,6 0 0 0");
        for args in [
            &["qdisc", "add", "dev", A_VETH, "clsact"][..],
            &[
                "filter", "add", "dev", A_VETH, "egress", "bpf", "bytecode", &program, "action",
                "mirred", "egress", "redirect", "dev", "wvdrop0",
            ],
        ] {
            self.tc_at_a(args).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// What the loss filter redirected (to be dropped) so far, if there is one.
    fn lost(&self) -> Option<String> {
        let out = std::process::Command::new("tc")
            .args([
                "-n",
                &self.link.a.name,
                "-s",
                "filter",
                "show",
                "dev",
                A_VETH,
                "egress",
            ])
            .output()
            .expect("tc runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.trim_start().starts_with("Sent"))
            .map(|l| l.trim().to_string())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn create(d: &Daemon, name: &str) {
    create_with(d, name, 64, "quiet interval_ms=20");
}

fn create_with(d: &Daemon, name: &str, memory_mib: u64, cmdline: &str) {
    let config = serde_json::json!({
        "name": name, "memory_mib": memory_mib, "vcpus": 2, "cmdline": cmdline,
    });
    d.client()
        .create(&serde_json::from_value(config).expect("a VM config"))
        .unwrap_or_else(|e| panic!("{name}: {e}\n{}", d.log()));
    warmvm_testkit::verifies_on(d, name, 1);
}

fn is_running(client: &Client, name: &str) -> bool {
    sample(client)
        .expect("the daemon answers")
        .get(name)
        .is_some_and(|vm| vm.state == "running")
}

/// Run `migrate` in a thread while polling both daemons: the destination first, then
/// the source (once the destination runs the VM, the source has stopped it for good, so
/// in that order a VM that runs in one place at a time can never be seen running twice).
/// Returns what `migrate` returned and how many polls were made.
fn watched<T: Send>(
    to: &Daemon,
    from: &Daemon,
    name: &str,
    migrate: impl FnOnce() -> T + Send,
) -> (T, usize) {
    std::thread::scope(|s| {
        let job = s.spawn(migrate);
        let mut polls = 0;
        while !job.is_finished() {
            let there = is_running(&to.client(), name);
            let here = is_running(&from.client(), name);
            assert!(
                !(there && here),
                "{name} runs in both daemons at poll {polls}\n{}\n{}",
                from.log(),
                to.log()
            );
            polls += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        (job.join().expect("the migration thread"), polls)
    })
}

/// [`judged`] once `d` lists `name` running (at most 10 s): a daemon continued after a stop
/// answers before it has added the VM it then runs, and the judge's first look must
/// include the VM.
fn judged_once_listed(d: &Daemon, name: &str) {
    assert!(
        warmvm_testkit::wait_until(10, || runs(d, name)),
        "{name} is not listed running\n{}",
        d.log()
    );
    judged(d, name);
}

fn judged(d: &Daemon, name: &str) {
    if let Err(e) = judge(&d.client(), &[name.to_string()]) {
        panic!("{name} is not running verified: {e:?}\n{}", d.log());
    }
}

fn status_of(e: &ClientError) -> u16 {
    match e {
        ClientError::Api { status, .. } => *status,
        other => panic!("not the daemon's refusal: {other}"),
    }
}

#[test]
fn a_guest_migrates_there_and_back_over_mutual_tls_and_never_runs_twice() {
    let test = "a_guest_migrates_there_and_back_over_mutual_tls_and_never_runs_twice";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let rig = Rig::new("mig");
    let mut a = rig.a("");
    let b = rig.b("b", "");
    let name = "mover";
    create(&a, name);

    // A→B through the API.
    let (sent, polls) = watched(&b, &a, name, || {
        a.client()
            .typed()
            .migrate(name, &MigrateRequest::to(format!("{B_ADDR}:{PORT}")))
    });
    let report = sent
        .unwrap_or_else(|e| panic!("A→B: {e}\n{}\n{}", a.log(), b.log()))
        .value;
    eprintln!(
        "A→B: total {} ms, paused {} us (final round {}, state {}, commit {}, resume {}), {} rounds, {} KiB",
        report.total_us / 1000,
        report.downtime_us,
        report.final_round_us,
        report.state_us,
        report.commit_us,
        report.resume_us,
        report.rounds.len(),
        report.bytes_total >> 10
    );
    assert_eq!(report.end, EndReason::Converged, "{report:?}");
    assert_eq!(report.vm, name);
    assert!(
        !report.rounds.is_empty() && report.bytes_total > 0,
        "{report:?}"
    );
    assert!(polls > 0, "the migration was never watched");
    judged(&b, name);
    assert!(
        !sample(&a.client()).expect("A answers").contains_key(name),
        "A still lists {name} after it moved"
    );

    // A warm reboot of A hands its migration listener to the new daemon (the old one holds
    // the port until it exits, so the new one could not bind it itself in time).
    let out = a.cli(&["reboot", "--mode", "warm"]);
    assert!(
        out.status.success(),
        "warm reboot of A: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log()
    );
    let new_pid = a.cli_json(&["status"])["pid"].as_u64().expect("a pid") as u32;
    a.follow_reboot(new_pid);
    assert!(
        a.log().contains("took the migration listener over"),
        "{}",
        a.log()
    );

    // B→A through the CLI, which prints one JSON report.
    let (out, _) = watched(&a, &b, name, || {
        b.cli(&[
            "vm",
            "migrate",
            name,
            "--to",
            &format!("{A_ADDR}:{PORT}"),
            "--json",
        ])
    });
    assert!(
        out.status.success(),
        "B→A: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.log(),
        a.log()
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(json["vm"], name);
    assert_eq!(json["end"]["reason"], "converged", "{json}");
    eprintln!(
        "B→A: total {} us, paused {} us, {} rounds, {} bytes",
        json["total_us"],
        json["downtime_us"],
        json["rounds"].as_array().map_or(0, Vec::len),
        json["bytes_total"]
    );
    judged(&a, name);
    assert!(!sample(&b.client()).expect("B answers").contains_key(name));
}

#[test]
fn migrations_that_cannot_happen_leave_the_guest_running_at_the_source() {
    let test = "migrations_that_cannot_happen_leave_the_guest_running_at_the_source";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let rig = Rig::new("migno");
    let other = Ca::new(&rig.dir, "other-ca");
    let a = rig.a("");
    // B's certificate is one A trusts, but B trusts another CA only: A is refused.
    let b = rig.b_trusting("b", "", &other.pem);
    let name = "stayer";
    create(&a, name);
    let migrate = |vm: &str, to: &str| a.client().typed().migrate(vm, &MigrateRequest::to(to));

    let e = migrate("nobody", &format!("{B_ADDR}:{PORT}")).expect_err("unknown VM");
    assert_eq!(status_of(&e), 404, "{e}");

    let e = migrate(name, "not-an-address").expect_err("bad address");
    assert_eq!(status_of(&e), 400, "{e}");

    let e = migrate(name, &format!("{A_ADDR}:{PORT}")).expect_err("to itself");
    assert_eq!(status_of(&e), 409, "{e}");

    // No listener on that port at B.
    let e = migrate(name, &format!("{B_ADDR}:{}", PORT + 1)).expect_err("no listener");
    assert_eq!(status_of(&e), 502, "{e}");
    assert!(e.to_string().contains("cannot reach"), "{e}");
    judged(&a, name);

    // B does not trust A's certificate: B says nothing but the TLS alert, and logs it.
    let e = migrate(name, &format!("{B_ADDR}:{PORT}")).expect_err("untrusted source");
    assert_eq!(status_of(&e), 502, "{e}");
    assert!(e.to_string().contains("is running here"), "{e}");
    judged(&a, name);
    assert!(
        sample(&b.client()).expect("B answers").is_empty(),
        "B kept something"
    );
    assert!(
        warmvm_testkit::wait_until(10, || b.log().contains("failed authentication")),
        "B did not log the failed peer\n{}",
        b.log()
    );
}

#[test]
fn plain_tcp_is_refused_off_loopback_and_half_a_certificate_set_or_a_bad_io_timeout_is_refused() {
    let dir = scratch("migrate-flags");
    let socket = dir.join("api.sock");
    for (args, says) in [
        (
            vec![
                "--migration-listen",
                "192.0.2.1:7000",
                "--migration-insecure",
            ],
            "only on loopback",
        ),
        (
            vec!["--migration-listen", "127.0.0.1:7000"],
            "needs --migration-cert",
        ),
        (
            vec!["--migration-cert", "/nonexistent/a.crt"],
            "--migration-key is missing",
        ),
        (
            vec!["--migration-io-timeout", "0", "--migration-insecure"],
            "--migration-io-timeout 0: must be 1..=600 seconds",
        ),
    ] {
        let out = warmvm_testkit::refused(
            warmvm_testkit::daemon_command(&socket)
                .arg("--state-dir")
                .arg(&dir)
                .args(&args),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(!socket.exists(), "{args:?}: the daemon bound its socket");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_migrating_vm_refuses_other_operations_and_reboots_until_it_is_cancelled() {
    let test = "a_migrating_vm_refuses_other_operations_and_reboots_until_it_is_cancelled";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let rig = Rig::new("migbusy");
    let a = rig.a("");
    let b = rig.b("b", "");
    let name = "busy";
    // It rewrites its 256 MiB without pause: each of the first rounds has most of it to
    // send again (seconds here), and a 1 ms budget is never met (saving the state alone is
    // allowed more), so the round limit cancels the migration, seconds after it began.
    create_with(&a, name, 256, warmvm_testkit::BUSY);
    let req = MigrateRequest {
        downtime_ms: 1,
        max_rounds: 3,
        timeout_secs: 120,
        ..MigrateRequest::to(format!("{B_ADDR}:{PORT}"))
    };
    std::thread::scope(|s| {
        let job = s.spawn(|| a.client().typed().migrate(name, &req));
        assert!(
            warmvm_testkit::wait_until(10, || a.log().contains("migrating VM")),
            "the migration did not start\n{}",
            a.log()
        );
        let c = a.client();
        let refused = |what: &str, r: Result<serde_json::Value, ClientError>| {
            let e = r.expect_err(what);
            assert_eq!(status_of(&e), 409, "{what}: {e}");
            assert!(e.to_string().contains("migrating"), "{what}: {e}");
        };
        refused("pause", c.pause(name));
        refused("resume", c.resume(name));
        refused("stop", c.stop(name, Some(1)));
        refused("delete", c.delete(name, false));
        refused("snapshot", c.snapshot(name, &rig.dir.join("snap"), false));
        refused(
            "a second migration",
            a.client()
                .typed()
                .migrate(name, &req)
                .map(|answer| answer.json),
        );
        for (who, d) in [("source", &a), ("destination", &b)] {
            let (status, body) = d.reboot(&serde_json::json!({ "mode": "warm" })).expect(who);
            assert_eq!(status, 409, "{who}: {body}");
            assert!(body.to_string().contains("migrat"), "{who}: {body}");
        }
        assert!(
            !job.is_finished(),
            "the migration ended before the checks were done"
        );
        let e = job
            .join()
            .expect("the migration thread")
            .expect_err("cancelled");
        assert_eq!(status_of(&e), 409, "{e}");
        assert!(e.to_string().contains("did not converge"), "{e}");
    });
    judged(&a, name);
    assert!(sample(&b.client()).expect("B answers").is_empty());
    // Done: the VM can be operated on again.
    a.client().pause(name).expect("paused after the migration");
}

/// Whether `d` lists `name` running; a daemon that does not answer (killed, or stopped
/// with every vCPU thread of it) runs nothing.
fn runs(d: &Daemon, name: &str) -> bool {
    sample(&d.client().with_timeout(Duration::from_secs(1)))
        .ok()
        .and_then(|s| s.get(name).map(|vm| vm.state == "running"))
        .unwrap_or(false)
}

fn state_at(d: &Daemon, name: &str) -> Option<String> {
    sample(&d.client())
        .expect("the daemon answers")
        .get(name)
        .map(|vm| vm.state.clone())
}

/// [`watched`] for migrations in which a daemon is killed: one that does not answer is
/// counted as running nothing. Polls on for `after` once `migrate` has returned.
fn watched_through_kills<T: Send>(
    to: &Daemon,
    from: &Daemon,
    name: &str,
    after: Duration,
    migrate: impl FnOnce() -> T + Send,
) -> T {
    std::thread::scope(|s| {
        let job = s.spawn(migrate);
        let mut until: Option<std::time::Instant> = None;
        let mut polls = 0;
        while until.is_none_or(|u| std::time::Instant::now() < u) {
            if until.is_none() && job.is_finished() {
                until = Some(std::time::Instant::now() + after);
            }
            let there = runs(to, name);
            let here = runs(from, name);
            assert!(
                !(there && here),
                "{name} runs in both daemons at poll {polls}\n{}\n{}",
                from.log(),
                to.log()
            );
            polls += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(polls > 1, "the migration was never watched");
        job.join().expect("the migration thread")
    })
}

fn to_b() -> MigrateRequest {
    MigrateRequest::to(format!("{B_ADDR}:{PORT}"))
}

#[test]
fn a_link_cut_after_the_commit_leaves_the_vm_in_doubt_until_resolve_finds_it_runs_there() {
    let test =
        "a_link_cut_after_the_commit_leaves_the_vm_in_doubt_until_resolve_finds_it_runs_there";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let rig = Rig::new("migcut");
    // A's stream fails right after it sent Commit, as if the link went down there.
    let a = rig.a("source-committed:cut");
    let b = rig.b("b", "");
    let name = "cut";
    create(&a, name);
    let sent = watched_through_kills(&b, &a, name, Duration::from_millis(500), || {
        a.client().typed().migrate(name, &to_b())
    });
    let e = sent.expect_err("the commit was never confirmed");
    assert_eq!(status_of(&e), 502, "{e}");
    assert!(e.to_string().contains("in doubt"), "{e}");
    assert_eq!(state_at(&a, name).as_deref(), Some("in-doubt"));
    judged(&b, name);
    assert_eq!(
        state_at(&a, name).as_deref(),
        Some("in-doubt"),
        "{}",
        a.log()
    );

    // Resolving anything else is refused, and changes nothing.
    let e = b
        .client()
        .typed()
        .resolve_migration(name)
        .expect_err("running, not in doubt");
    assert_eq!(status_of(&e), 409, "{e}");
    let e = a
        .client()
        .typed()
        .resolve_migration("nobody")
        .expect_err("unknown");
    assert_eq!(status_of(&e), 404, "{e}");

    // A VM in doubt cannot cross a reboot: refused, nothing changes.
    let (status, body) = a
        .reboot(&serde_json::json!({ "mode": "warm" }))
        .expect("A answers");
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("in doubt"), "{body}");
    assert_eq!(state_at(&a, name).as_deref(), Some("in-doubt"));

    let out = a.cli(&["vm", "migrate", "--resolve", name]);
    assert!(
        out.status.success(),
        "resolve: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log(),
        b.log()
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("runs at 10.91.0.2:7000"), "{said}");
    assert!(
        !sample(&a.client()).expect("A answers").contains_key(name),
        "A still holds {name} after the destination said it runs there"
    );
    judged(&b, name);
}

#[test]
fn a_destination_killed_after_ready_leaves_the_vm_in_doubt_until_resolve_resumes_it_at_the_source()
{
    let test = "a_destination_killed_after_ready_leaves_the_vm_in_doubt_until_resolve_resumes_it_at_the_source";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let rig = Rig::new("migready");
    let a = rig.a("");
    // B dies right after it sent Ready: it never reads Commit.
    let b = rig.b("b", "dest-ready-sent:kill");
    let name = "unready";
    create(&a, name);
    let sent = watched_through_kills(&b, &a, name, Duration::from_millis(500), || {
        a.client().typed().migrate(name, &to_b())
    });
    let e = sent.expect_err("the destination died");
    eprintln!("{test}: {e}");
    // The source had sent Commit (or may have): it holds the VM in doubt.
    assert_eq!(status_of(&e), 502, "{e}");
    assert_eq!(state_at(&a, name).as_deref(), Some("in-doubt"), "{e}");

    // Nobody answers at B: nothing changes.
    let e = a
        .client()
        .typed()
        .resolve_migration(name)
        .expect_err("B is gone");
    assert_eq!(status_of(&e), 502, "{e}");
    assert!(e.to_string().contains("in doubt"), "{e}");
    assert_eq!(state_at(&a, name).as_deref(), Some("in-doubt"));

    // A new daemon at B never had that migration: resolving resumes the VM at A.
    drop(b);
    let b = rig.b("b2", "");
    let r = a
        .client()
        .typed()
        .resolve_migration(name)
        .unwrap_or_else(|e| panic!("resolve: {e}\n{}\n{}", a.log(), b.log()))
        .value;
    assert_eq!(
        r.resolved,
        warmvm_api::types::Resolved::ResumedHere,
        "{r:?}"
    );
    assert_eq!(r.vm, name);
    judged(&a, name);
    assert!(sample(&b.client()).expect("B answers").is_empty());
}

#[test]
fn a_destination_killed_before_the_commit_leaves_the_vm_running_at_the_source() {
    let test = "a_destination_killed_before_the_commit_leaves_the_vm_running_at_the_source";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let rig = Rig::new("migkill");
    let a = rig.a("");
    let name = "survivor";
    create(&a, name);
    // During pre-copy (the first round acknowledged), and with the state in hand before
    // Ready: both before the commit.
    for (i, fault) in ["dest-precopy:kill", "dest-state:kill"].iter().enumerate() {
        let b = rig.b(&format!("b{i}"), fault);
        let (sent, listed, verified_after) =
            watched_through_kills(&b, &a, name, Duration::from_millis(300), || {
                let sent = a.client().typed().migrate(name, &to_b());
                // The source resumes the VM before it answers: the first look after the
                // answer finds it running.
                let failed_at = std::time::Instant::now();
                let listed = runs(&a, name);
                judged(&a, name);
                (sent, listed, failed_at.elapsed())
            });
        let e = sent.expect_err("the destination died");
        assert_eq!(status_of(&e), 502, "{fault}: {e}");
        assert!(e.to_string().contains("is running here"), "{fault}: {e}");
        assert!(listed, "{fault}: not listed running at A\n{}", a.log());
        eprintln!(
            "{test}: {fault}: verified running at A {} ms after the migrate call failed ({e})",
            verified_after.as_millis()
        );
        drop(b);
    }
}

#[test]
fn a_source_killed_after_the_commit_leaves_the_vm_running_at_the_destination() {
    let test = "a_source_killed_after_the_commit_leaves_the_vm_running_at_the_destination";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let rig = Rig::new("migsrc");
    let a = rig.a("source-committed:kill");
    let b = rig.b("b", "");
    let name = "orphan";
    create(&a, name);
    let sent = watched_through_kills(&b, &a, name, Duration::from_millis(500), || {
        a.client().typed().migrate(name, &to_b())
    });
    assert!(sent.is_err(), "the source died mid-call, yet it answered");
    judged(&b, name);
    assert!(!runs(&a, name));
}

/// Whether process `pid` is stopped (by SIGSTOP).
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('T'))
    })
}

/// Wait (at most 30 s) until daemon `pid` has stopped itself at its fault point, do
/// `meanwhile`, keep it stopped for `hold` in all, then continue it. Returns false if it
/// never stopped.
fn continue_after(pid: u32, hold: Duration, meanwhile: impl FnOnce()) -> bool {
    if !warmvm_testkit::wait_until(30, || is_stopped(pid)) {
        return false;
    }
    let stopped = std::time::Instant::now();
    meanwhile();
    std::thread::sleep(hold.saturating_sub(stopped.elapsed()));
    let out = std::process::Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .output()
        .expect("kill runs");
    assert!(out.status.success(), "SIGCONT to {pid}: {out:?}");
    true
}

/// [`watched_through_kills`] for a migration in which `stopped` stops itself at a fault
/// point: once it has, `meanwhile` runs, and it is continued `hold` after it stopped.
#[allow(clippy::too_many_arguments)]
fn watched_through_a_stop<T: Send>(
    to: &Daemon,
    from: &Daemon,
    name: &str,
    stopped: &Daemon,
    hold: Duration,
    meanwhile: impl FnOnce() + Send,
    after: Duration,
    migrate: impl FnOnce() -> T + Send,
) -> T {
    let pid = stopped.pid;
    std::thread::scope(|s| {
        let stopper = s.spawn(move || continue_after(pid, hold, meanwhile));
        let sent = watched_through_kills(to, from, name, after, migrate);
        assert!(
            stopper.join().expect("the stopper thread"),
            "the daemon never stopped at its fault point\n{}",
            stopped.log()
        );
        sent
    })
}

/// `name` at `d` is in doubt and its guest does not advance there (its vCPUs are parked).
fn held_in_doubt(d: &Daemon, name: &str) {
    let before = sample(&d.client()).expect("the daemon answers");
    std::thread::sleep(Duration::from_millis(300));
    let now = sample(&d.client()).expect("the daemon answers");
    let (b, n) = (&before[name], &now[name]);
    assert_eq!(n.state, "in-doubt", "{n:?}\n{}", d.log());
    assert_eq!(b.verified, n.verified, "{name} runs on while in doubt");
}

/// The migration's I/O timeout of the fault tests, and how long they keep a daemon
/// stopped: longer than it, with a margin, so that the other side gives up first (a read
/// that gets nothing, or writes a stopped peer takes only a trickle of, fail after it).
const IO_TIMEOUT_SECS: u64 = 2;
const HOLD: Duration = Duration::from_secs(IO_TIMEOUT_SECS + 2);

#[test]
fn a_source_stopped_mid_precopy_past_the_io_timeout_runs_on_and_the_destination_discards() {
    let test =
        "a_source_stopped_mid_precopy_past_the_io_timeout_runs_on_and_the_destination_discards";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let rig = Rig::new("migsstop").io_timeout(IO_TIMEOUT_SECS);
    let a = rig.a("source-precopy:stop");
    let b = rig.b("b", "");
    let name = "sleeper";
    create(&a, name);
    let sent = watched_through_a_stop(
        &b,
        &a,
        name,
        &a,
        HOLD,
        || {},
        Duration::from_millis(500),
        || a.client().typed().migrate(name, &to_b()),
    );
    let e = sent.expect_err("the destination gave up meanwhile");
    eprintln!("{test}: {e}");
    assert_eq!(status_of(&e), 502, "{e}");
    assert!(e.to_string().contains("is running here"), "{e}");
    assert!(
        b.log().contains("incoming migration failed; nothing kept"),
        "{}",
        b.log()
    );
    judged(&a, name);
    assert!(sample(&b.client()).expect("B answers").is_empty());
}

#[test]
fn a_source_stopped_mid_precopy_past_the_migration_timeout_cancels_it_once_continued() {
    let test = "a_source_stopped_mid_precopy_past_the_migration_timeout_cancels_it_once_continued";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    // B waits for A as long as the default I/O timeout allows: it is A that gives up, by
    // the migration's own time limit, as soon as it runs again.
    let rig = Rig::new("migtstop");
    let a = rig.a("source-precopy:stop");
    let b = rig.b("b", "");
    let name = "overdue";
    // Rewriting all its memory during the first round, it has everything dirty again
    // after it: not converged, so the time limit decides.
    create_with(&a, name, 64, warmvm_testkit::BUSY);
    let req = MigrateRequest {
        timeout_secs: 1,
        ..to_b()
    };
    let hold = Duration::from_secs(2);
    let sent = watched_through_a_stop(
        &b,
        &a,
        name,
        &a,
        hold,
        || {},
        Duration::from_millis(500),
        || a.client().typed().migrate(name, &req),
    );
    let e = sent.expect_err("the time limit passed while A was stopped");
    eprintln!("{test}: {e}");
    assert_eq!(status_of(&e), 409, "{e}");
    assert!(e.to_string().contains("did not converge"), "{e}");
    assert!(e.to_string().contains("ms passed"), "{e}");
    assert!(e.to_string().contains("is running here"), "{e}");
    judged(&a, name);
    assert!(
        warmvm_testkit::wait_until(10, || b
            .log()
            .contains("incoming migration failed; nothing kept")),
        "{}",
        b.log()
    );
    assert!(sample(&b.client()).expect("B answers").is_empty());
}

#[test]
fn a_destination_stopped_mid_precopy_past_the_io_timeout_leaves_the_vm_running_at_the_source() {
    let test =
        "a_destination_stopped_mid_precopy_past_the_io_timeout_leaves_the_vm_running_at_the_source";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let rig = Rig::new("migdstop").io_timeout(IO_TIMEOUT_SECS);
    let a = rig.a("");
    let b = rig.b("b", "dest-precopy:stop");
    let name = "waiter";
    create(&a, name);
    let sent = watched_through_a_stop(
        &b,
        &a,
        name,
        &b,
        HOLD,
        || {},
        Duration::from_millis(500),
        || a.client().typed().migrate(name, &to_b()),
    );
    let e = sent.expect_err("the destination did not answer in time");
    eprintln!("{test}: {e}");
    assert_eq!(status_of(&e), 502, "{e}");
    assert!(e.to_string().contains("is running here"), "{e}");
    judged(&a, name);
    // B, continued, finds the migration over and keeps nothing.
    assert!(
        warmvm_testkit::wait_until(10, || b
            .log()
            .contains("incoming migration failed; nothing kept")),
        "{}",
        b.log()
    );
    assert!(sample(&b.client()).expect("B answers").is_empty());
    judged(&a, name);
}

#[test]
fn a_destination_stopped_after_ready_past_the_io_timeout_leaves_the_vm_in_doubt_until_resolved() {
    let test =
        "a_destination_stopped_after_ready_past_the_io_timeout_leaves_the_vm_in_doubt_until_resolved";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let rig = Rig::new("migrstop").io_timeout(IO_TIMEOUT_SECS);
    let a = rig.a("");
    // B stops right after it sent Ready: A commits, and hears nothing back in time.
    let b = rig.b("b", "dest-ready-sent:stop");
    let name = "doubted";
    create(&a, name);
    let sent = watched_through_a_stop(
        &b,
        &a,
        name,
        &b,
        HOLD,
        || {},
        Duration::from_secs(1),
        || a.client().typed().migrate(name, &to_b()),
    );
    let e = sent.expect_err("Running never came in time");
    eprintln!("{test}: {e}");
    assert_eq!(status_of(&e), 502, "{e}");
    assert!(e.to_string().contains("in doubt"), "{e}");
    // B, continued, read the Commit waiting for it: the VM runs there, and only there.
    judged_once_listed(&b, name);
    held_in_doubt(&a, name);
    let r = a
        .client()
        .typed()
        .resolve_migration(name)
        .unwrap_or_else(|e| panic!("resolve: {e}\n{}\n{}", a.log(), b.log()))
        .value;
    assert_eq!(r.resolved, warmvm_api::types::Resolved::RunsThere, "{r:?}");
    assert!(!sample(&a.client()).expect("A answers").contains_key(name));
    judged(&b, name);
}

#[test]
fn a_source_stopped_after_the_commit_past_the_io_timeout_still_completes_the_migration() {
    let test =
        "a_source_stopped_after_the_commit_past_the_io_timeout_still_completes_the_migration";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let rig = Rig::new("migcstop").io_timeout(IO_TIMEOUT_SECS);
    let a = rig.a("source-committed:stop");
    let b = rig.b("b", "");
    let name = "late";
    create(&a, name);
    // B runs the VM on Commit and answers Running, which waits in A's socket until A is
    // continued and reads it.
    let sent = watched_through_a_stop(
        &b,
        &a,
        name,
        &a,
        HOLD,
        || {},
        Duration::from_millis(500),
        || a.client().typed().migrate(name, &to_b()),
    );
    let report = sent
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", a.log(), b.log()))
        .value;
    assert_eq!(report.end, EndReason::Converged, "{report:?}");
    judged(&b, name);
    assert!(!sample(&a.client()).expect("A answers").contains_key(name));
}

#[test]
fn a_link_down_mid_precopy_leaves_the_vm_running_at_the_source_and_the_destination_discards() {
    let test =
        "a_link_down_mid_precopy_leaves_the_vm_running_at_the_source_and_the_destination_discards";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let rig = Rig::new("migdown").io_timeout(IO_TIMEOUT_SECS);
    // A stops after the first round only so that the link goes down at that point.
    let a = rig.a("source-precopy:stop");
    let b = rig.b("b", "");
    let name = "cutoff";
    create(&a, name);
    let sent = watched_through_a_stop(
        &b,
        &a,
        name,
        &a,
        Duration::ZERO,
        || rig.link_up(false),
        Duration::from_millis(500),
        || a.client().typed().migrate(name, &to_b()),
    );
    let e = sent.expect_err("the link is down");
    eprintln!("{test}: {e}");
    assert_eq!(status_of(&e), 502, "{e}");
    assert!(e.to_string().contains("is running here"), "{e}");
    judged(&a, name);
    assert!(
        warmvm_testkit::wait_until(10, || b
            .log()
            .contains("incoming migration failed; nothing kept")),
        "{}",
        b.log()
    );
    rig.link_up(true);
    assert!(sample(&b.client()).expect("B answers").is_empty());
    judged(&a, name);
}

#[test]
fn a_link_down_right_after_the_commit_leaves_the_vm_in_doubt_until_resolved_over_the_link_back() {
    let test =
        "a_link_down_right_after_the_commit_leaves_the_vm_in_doubt_until_resolved_over_the_link_back";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let rig = Rig::new("migcdown").io_timeout(IO_TIMEOUT_SECS);
    let a = rig.a("");
    // B stops as it has read Commit, before it runs the VM: the link goes down then, so
    // B's Running never reaches A.
    let b = rig.b("b", "dest-committed:stop");
    let name = "stranded";
    create(&a, name);
    let sent = watched_through_a_stop(
        &b,
        &a,
        name,
        &b,
        Duration::ZERO,
        || rig.link_up(false),
        Duration::from_millis(500),
        || a.client().typed().migrate(name, &to_b()),
    );
    let e = sent.expect_err("Running never came");
    eprintln!("{test}: {e}");
    assert_eq!(status_of(&e), 502, "{e}");
    assert!(e.to_string().contains("in doubt"), "{e}");
    judged_once_listed(&b, name);
    held_in_doubt(&a, name);

    // Nobody can be asked while the link is down: nothing changes.
    let e = a
        .client()
        .typed()
        .resolve_migration(name)
        .expect_err("B cannot be reached");
    assert_eq!(status_of(&e), 502, "{e}");
    assert!(e.to_string().contains("in doubt"), "{e}");
    held_in_doubt(&a, name);

    rig.link_up(true);
    let out = a.cli(&["vm", "migrate", "--resolve", name]);
    assert!(
        out.status.success(),
        "resolve: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log(),
        b.log()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("runs at {B_ADDR}:{PORT}")),
        "{out:?}"
    );
    assert!(!sample(&a.client()).expect("A answers").contains_key(name));
    judged(&b, name);
}

/// The guests migrated over shaped links: a busy one (64 MiB rewritten non-stop) and a
/// light one (a tenth of its 64 MiB touched, rewritten now and then).
const SHAPED_GUESTS: [(&str, &str); 2] = [
    ("busy", warmvm_testkit::BUSY),
    ("light", "quiet fill=10 interval_ms=50"),
];

/// Each of [`SHAPED_GUESTS`] migrates A→B, in turn, over the link as `shape` leaves it.
/// Each either converges and runs at B, or, when its downtime budget cannot be met within
/// the rounds allowed, the migration is cancelled and it runs on at A (as documented);
/// either way exactly one copy runs, verified. Prints the figures.
fn guests_over_a_shaped_link(test: &str, tag: &str, shape: impl FnOnce(&Rig) -> String) {
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let rig = Rig::new(tag);
    let a = rig.a("");
    let b = rig.b("b", "");
    for (name, cmdline) in SHAPED_GUESTS {
        create_with(&a, name, 64, cmdline);
    }
    let link = shape(&rig);
    let req = MigrateRequest {
        max_rounds: 4,
        timeout_secs: 60,
        ..to_b()
    };
    for (name, _) in SHAPED_GUESTS {
        let t0 = std::time::Instant::now();
        let sent = watched_through_kills(&b, &a, name, Duration::from_millis(300), || {
            a.client().typed().migrate(name, &req)
        });
        let took = t0.elapsed();
        let (here, there) = match sent {
            Ok(answer) => {
                let r = answer.value;
                eprintln!(
                    "{test}: {link}: {name}: migrated in {} ms, paused {} us (final round {}, state {}, commit {}, resume {}), {} rounds {:?} KiB, {} KiB in all, bandwidth {} KiB/s",
                    r.total_us / 1000,
                    r.downtime_us,
                    r.final_round_us,
                    r.state_us,
                    r.commit_us,
                    r.resume_us,
                    r.rounds.len(),
                    r.rounds.iter().map(|x| x.bytes >> 10).collect::<Vec<_>>(),
                    r.bytes_total >> 10,
                    r.bandwidth_bps >> 10,
                );
                assert_eq!(r.end, EndReason::Converged, "{r:?}");
                (&b, &a)
            }
            Err(e) => {
                eprintln!(
                    "{test}: {link}: {name}: cancelled after {} ms: {e}",
                    took.as_millis()
                );
                assert_eq!(status_of(&e), 409, "{e}");
                assert!(e.to_string().contains("did not converge"), "{e}");
                assert!(e.to_string().contains("is running here"), "{e}");
                (&a, &b)
            }
        };
        judged(here, name);
        assert!(
            !sample(&there.client())
                .expect("it answers")
                .contains_key(name),
            "{name} is listed at both daemons"
        );
    }
    if let Some(lost) = rig.lost() {
        eprintln!("{test}: the loss filter took {lost}");
    }
}

#[test]
fn guests_migrate_over_a_slow_link_or_run_on_at_the_source() {
    guests_over_a_shaped_link(
        "guests_migrate_over_a_slow_link_or_run_on_at_the_source",
        "migslow",
        |rig| rig.shape("200mbit", "5ms"),
    );
}

#[test]
fn guests_migrate_over_a_lossy_link_or_run_on_at_the_source() {
    guests_over_a_shaped_link(
        "guests_migrate_over_a_lossy_link_or_run_on_at_the_source",
        "miglossy",
        |rig| {
            rig.lose(100);
            "1% loss".to_string()
        },
    );
}
