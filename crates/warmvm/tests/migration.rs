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
        "link", "add", "wvmig0", "type", "veth", "peer", "name", "wvmig1", "netns", &b.name,
    ]);
    a.ip(&["addr", "add", &format!("{A_ADDR}/24"), "dev", "wvmig0"]);
    b.ip(&["addr", "add", &format!("{B_ADDR}/24"), "dev", "wvmig1"]);
    a.ip(&["link", "set", "wvmig0", "up"]);
    b.ip(&["link", "set", "wvmig1", "up"]);
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

/// A daemon in namespace `ns` listening for migrations on `ip:port` with `cert`/`key`,
/// trusting `ca`.
fn daemon(
    dir: &Path,
    ns: &Namespace,
    ip: &str,
    port: u16,
    cert: &(PathBuf, PathBuf),
    ca: &Path,
) -> Daemon {
    faulty_daemon(dir, ns, ip, port, cert, ca, "")
}

/// [`daemon`] with the migration faults `faults` (`WARMVM_MIGRATION_FAULT`; none if empty).
fn faulty_daemon(
    dir: &Path,
    ns: &Namespace,
    ip: &str,
    port: u16,
    (cert, key): &(PathBuf, PathBuf),
    ca: &Path,
    faults: &str,
) -> Daemon {
    let listen = format!("{ip}:{port}");
    let env: &[(&str, &str)] = if faults.is_empty() {
        &[]
    } else {
        &[("WARMVM_MIGRATION_FAULT", faults)]
    };
    Daemon::builder(dir)
        .netns(&ns.name)
        .envs(env)
        .args(&[
            "--migration-listen".as_ref(),
            listen.as_ref(),
            "--migration-cert".as_ref(),
            cert.as_os_str(),
            "--migration-key".as_ref(),
            key.as_os_str(),
            "--migration-ca".as_ref(),
            ca.as_os_str(),
        ] as &[&std::ffi::OsStr])
        .start()
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
    let dir = scratch("migrate");
    let link = link("mig");
    let ca = Ca::new(&dir, "ca");
    let a_cert = ca.issue(&dir, "a", A_ADDR);
    let b_cert = ca.issue(&dir, "b", B_ADDR);
    let mut a = daemon(&dir.join("a"), &link.a, A_ADDR, PORT, &a_cert, &ca.pem);
    let b = daemon(&dir.join("b"), &link.b, B_ADDR, PORT, &b_cert, &ca.pem);
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
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn migrations_that_cannot_happen_leave_the_guest_running_at_the_source() {
    let test = "migrations_that_cannot_happen_leave_the_guest_running_at_the_source";
    if !warmvm_testkit::kvm_available(test) {
        return;
    }
    let dir = scratch("migrate-refused");
    let link = link("migno");
    let ca = Ca::new(&dir, "ca");
    let other = Ca::new(&dir, "other-ca");
    let a_cert = ca.issue(&dir, "a", A_ADDR);
    let b_cert = ca.issue(&dir, "b", B_ADDR);
    let a = daemon(&dir.join("a"), &link.a, A_ADDR, PORT, &a_cert, &ca.pem);
    // B's certificate is one A trusts, but B trusts another CA only: A is refused.
    let b = daemon(&dir.join("b"), &link.b, B_ADDR, PORT, &b_cert, &other.pem);
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
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plain_tcp_is_refused_off_loopback_and_half_a_certificate_set_is_refused() {
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
    let dir = scratch("migrate-busy");
    let link = link("migbusy");
    let ca = Ca::new(&dir, "ca");
    let a_cert = ca.issue(&dir, "a", A_ADDR);
    let b_cert = ca.issue(&dir, "b", B_ADDR);
    let a = daemon(&dir.join("a"), &link.a, A_ADDR, PORT, &a_cert, &ca.pem);
    let b = daemon(&dir.join("b"), &link.b, B_ADDR, PORT, &b_cert, &ca.pem);
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
        refused("snapshot", c.snapshot(name, &dir.join("snap"), false));
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
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether `d` lists `name` running; a daemon that does not answer (killed) runs nothing.
fn runs(d: &Daemon, name: &str) -> bool {
    sample(&d.client())
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

/// The two namespaces, the CA and both daemons' certificates of one fault test.
struct Rig {
    dir: PathBuf,
    link: Link,
    ca: Ca,
    a_cert: (PathBuf, PathBuf),
    b_cert: (PathBuf, PathBuf),
}

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
        }
    }

    fn a(&self, faults: &str) -> Daemon {
        let dir = self.dir.join("a");
        faulty_daemon(
            &dir,
            &self.link.a,
            A_ADDR,
            PORT,
            &self.a_cert,
            &self.ca.pem,
            faults,
        )
    }

    /// A daemon at B, in its own directory `sub` (a B killed by a test is replaced by
    /// another).
    fn b(&self, sub: &str, faults: &str) -> Daemon {
        let dir = self.dir.join(sub);
        faulty_daemon(
            &dir,
            &self.link.b,
            B_ADDR,
            PORT,
            &self.b_cert,
            &self.ca.pem,
            faults,
        )
    }
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
    drop((a, b));
    let _ = std::fs::remove_dir_all(&rig.dir);
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
    drop((a, b));
    let _ = std::fs::remove_dir_all(&rig.dir);
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
    drop(a);
    let _ = std::fs::remove_dir_all(&rig.dir);
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
    drop((a, b));
    let _ = std::fs::remove_dir_all(&rig.dir);
}
