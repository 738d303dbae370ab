//! Least privilege: a daemon started as root with `--user` runs on as that user with only
//! the capabilities it was told to keep, and so do the daemons its warm reboots start;
//! its VMs run and verify through a warm reboot and a live upgrade; what the user may not
//! do fails (a root-only disk, creating a TAP without CAP_NET_ADMIN); and bad settings
//! are refused before anything runs.
//!
//! The user is 65534 (nobody) with the `kvm` group (which owns /dev/kvm here): nothing on
//! the machine is changed for it; the daemon creates its state directory and gives it to
//! the user.

use std::os::unix::fs::MetadataExt;

use warmvm_testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_warmvm");

const UID: u32 = 65534;

/// A copy of the test's build in `dir`, where the dropped user can run it: a warm reboot
/// runs the daemon's start path again as that user, and a checkout under a home directory
/// the user may not enter (root's is 0700) would have it refused, as an operator's would
/// be. Daemons that drop privileges and reboot start from here, as from an installed build.
fn installed_build(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("warmvm");
    std::fs::copy(BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

fn kvm_gid() -> u32 {
    std::fs::metadata("/dev/kvm").unwrap().gid()
}

/// A field of a /proc status file, e.g. `Uid` or `CapEff`.
fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_string()
}

/// Every thread of `pid` runs as uid/gid with exactly `caps` (a mask) in its permitted,
/// effective, bounding and ambient sets, and with no_new_privs.
fn assert_dropped(pid: u32, gid: u32, caps: u64) {
    let hex = format!("{caps:016x}");
    let ids = |n: u32| format!("{n}\t{n}\t{n}\t{n}");
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(s) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let who = field(&s, "Name");
        assert_eq!(field(&s, "Uid"), ids(UID), "{who}: {s}");
        assert_eq!(field(&s, "Gid"), ids(gid), "{who}: {s}");
        for set in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(&s, set), hex, "{who} {set}: {s}");
        }
        assert_eq!(field(&s, "NoNewPrivs"), "1", "{who}: {s}");
    }
}

/// `GET /v1/status`'s `privileges` agrees with what the kernel says of the daemon's main
/// thread, read from outside: ids, groups, the permitted capabilities (as many names as
/// bits), no_new_privs; and `warmvm status` shows them. Returns the privileges.
fn reported_matches_proc(d: &Daemon, seccomp: &str) -> serde_json::Value {
    let p = d.client().status().unwrap()["privileges"].clone();
    let s = std::fs::read_to_string(format!("/proc/{}/status", d.pid)).unwrap();
    let effective = |name: &str| -> u64 {
        field(&s, name)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(p["uid"], effective("Uid"), "{p}\n{s}");
    assert_eq!(p["gid"], effective("Gid"), "{p}\n{s}");
    let mut groups: Vec<u64> = field(&s, "Groups")
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    groups.sort_unstable();
    assert_eq!(p["groups"], serde_json::json!(groups), "{p}\n{s}");
    let mask = u64::from_str_radix(&field(&s, "CapPrm"), 16).unwrap();
    let names = p["capabilities"].as_array().unwrap();
    assert_eq!(names.len() as u32, mask.count_ones(), "{p}\n{s}");
    assert_eq!(
        p["no_new_privs"],
        field(&s, "NoNewPrivs") == "1",
        "{p}\n{s}"
    );
    assert_eq!(p["seccomp"], seccomp, "{p}");

    let out = d.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    let line = text
        .lines()
        .find(|l| l.starts_with("runs as: "))
        .unwrap_or_else(|| panic!("no privileges in `warmvm status`: {text}"));
    assert!(
        line.starts_with(&format!("runs as: uid {} gid {},", p["uid"], p["gid"])),
        "{line}"
    );
    assert!(line.contains(&format!("seccomp: {seccomp}")), "{line}");
    p
}

#[test]
fn a_dropped_daemon_runs_vms_through_a_warm_reboot_and_an_upgrade_as_its_user() {
    if !warmvm_testkit::kvm_available(
        "a_dropped_daemon_runs_vms_through_a_warm_reboot_and_an_upgrade_as_its_user",
    ) {
        return;
    }
    let dir = scratch("priv");
    let gid = kvm_gid();
    let net_admin = 1u64 << 12; // CAP_NET_ADMIN
    let mut d = Daemon::start_from(
        &installed_build(&dir),
        &dir,
        &[
            "--user",
            &UID.to_string(),
            "--group",
            "kvm",
            "--keep-caps",
            "CAP_NET_ADMIN",
        ],
    );
    assert_dropped(d.pid, gid, net_admin);
    let p = reported_matches_proc(&d, "true");
    assert_eq!(p["uid"], UID, "{p}");
    assert_eq!(p["gid"], gid, "{p}");
    assert_eq!(
        p["capabilities"],
        serde_json::json!(["CAP_NET_ADMIN"]),
        "{p}"
    );
    assert_eq!(p["no_new_privs"], true, "{p}");
    let state = std::fs::metadata(dir.join("state")).unwrap();
    assert_eq!(
        (state.uid(), state.gid()),
        (UID, gid),
        "the state dir is the user's"
    );

    let c = d.client();
    c.create(&serde_json::from_value(reference_vm("pv")).unwrap())
        .unwrap();
    assert!(wait_until(30, || counter(&c.show("pv").unwrap()) > 0));
    let log = std::fs::metadata(dir.join("state/pv/console.log")).unwrap();
    assert_eq!(log.uid(), UID, "console logs are written as the user");

    // What the user may not do fails: a disk only root may read.
    let secret = dir.join("secret.img");
    std::fs::write(&secret, vec![0u8; 4096]).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut vm = reference_vm("root-disk");
    vm["disks"] = serde_json::json!([{ "path": secret }]);
    let e = c
        .create(&serde_json::from_value(vm).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("ermission denied"), "{e}");

    let before = counter(&c.show("pv").unwrap());
    let report = c.reboot("warm", None).unwrap();
    d.follow_reboot(report["new_pid"].as_u64().unwrap() as u32);
    assert_dropped(d.pid, gid, net_admin);

    // A live upgrade: another binary, which the user may run.
    let upgrade = dir.join("warmvm-upgrade");
    std::fs::copy(BIN, &upgrade).unwrap();
    let report = d.client().reboot("warm", Some(&upgrade)).unwrap();
    d.follow_reboot(report["new_pid"].as_u64().unwrap() as u32);
    assert_dropped(d.pid, gid, net_admin);
    let exe = std::fs::read_link(format!("/proc/{}/exe", d.pid)).unwrap();
    assert_eq!(exe, upgrade);
    // The daemon the upgrade started reports the same drop.
    let p = reported_matches_proc(&d, "true");
    assert_eq!(
        (p["uid"].clone(), p["gid"].clone()),
        (UID.into(), gid.into())
    );
    assert_eq!(
        p["capabilities"],
        serde_json::json!(["CAP_NET_ADMIN"]),
        "{p}"
    );

    let c = d.client();
    assert!(wait_until(30, || counter(&c.show("pv").unwrap()) > before));
    let vm = c.show("pv").unwrap();
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["guest"]["mismatches"], 0, "{vm}");
    d.terminate_adopted();
}

/// `warmvm daemon` with `args`, expected to refuse to start: its exit status and stderr.
fn refused(dir: &std::path::Path, state: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = warmvm_testkit::refused(
        daemon_command(&dir.join("refused.sock"))
            .arg("--state-dir")
            .arg(dir.join(state))
            .args(args),
    );
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    (out.status.code(), err)
}

#[test]
fn without_kept_capabilities_none_remain_and_bad_settings_are_refused() {
    if !warmvm_testkit::kvm_available(
        "without_kept_capabilities_none_remain_and_bad_settings_are_refused",
    ) {
        return;
    }
    let dir = scratch("priv-none");
    let uid = UID.to_string();
    for (args, status, says) in [
        (
            vec!["--user", "no-such-user-xq"],
            2,
            "--user no-such-user-xq: no such user",
        ),
        (
            vec!["--user", &uid, "--keep-caps", "CAP_FLY"],
            2,
            "--keep-caps CAP_FLY: not a capability",
        ),
        (
            vec!["--group", "kvm"],
            2,
            "--group and --keep-caps need --user",
        ),
        (vec!["--user", "0"], 2, "uid 0 drops nothing"),
    ] {
        let (code, err) = refused(&dir, "state", &args);
        assert_eq!(code, Some(status), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // A state directory that exists and is root's is not silently taken over.
    std::fs::create_dir(dir.join("roots")).unwrap();
    let (code, err) = refused(&dir, "roots", &["--user", &uid, "--group", "kvm"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("state directory"), "{err}");
    assert!(err.contains("is not writable"), "{err}");

    let mut d = Daemon::start(&dir, &["--user", &uid, "--group", "kvm"]);
    assert_dropped(d.pid, kvm_gid(), 0);
    // It serves as the user.
    let st = d.client().status().unwrap();
    assert_eq!(st["pid"], d.pid, "{st}");
    let p = reported_matches_proc(&d, "true");
    assert_eq!(p["capabilities"], serde_json::json!([]), "{p}");
    assert!(d
        .cli(&["status"])
        .stdout
        .windows(18)
        .any(|w| w == b"capabilities: none"));
    d.terminate();
}

/// A daemon that drops nothing says so: root's ids and capabilities (CAP_SYS_ADMIN among
/// them); no_new_privs only because the seccomp filters set it, and not with them off.
#[test]
fn a_root_daemon_reports_roots_privileges_and_its_seccomp_mode() {
    if !warmvm_testkit::kvm_available("a_root_daemon_reports_roots_privileges_and_its_seccomp_mode")
    {
        return;
    }
    for (seccomp, no_new_privs) in [("true", true), ("log", true), ("false", false)] {
        let dir = scratch(&format!("priv-root-{seccomp}"));
        let mut d = Daemon::start(&dir, &["--seccomp", seccomp]);
        let p = reported_matches_proc(&d, seccomp);
        assert_eq!(
            (p["uid"].as_u64(), p["gid"].as_u64()),
            (Some(0), Some(0)),
            "{p}"
        );
        assert!(
            p["capabilities"]
                .as_array()
                .unwrap()
                .contains(&"CAP_SYS_ADMIN".into()),
            "{p}"
        );
        assert_eq!(p["no_new_privs"], no_new_privs, "{seccomp}: {p}");
        d.terminate();
    }
}

/// Creating a TAP needs CAP_NET_ADMIN: a dropped daemon that kept it creates one for a VM
/// (in a network namespace of the test's own), and one that did not is refused with the
/// kernel's answer, changing nothing; both attach the namespace's persistent TAP, which
/// has no owner (the kernel asks no capability for that).
#[test]
fn creating_a_tap_needs_the_kept_cap_net_admin() {
    if !warmvm_testkit::kvm_available("creating_a_tap_needs_the_kept_cap_net_admin") {
        return;
    }
    let uid = UID.to_string();
    for keep in [true, false] {
        let dir = scratch(if keep { "priv-tap" } else { "priv-notap" });
        let ns = Netns::new(if keep { "ptap" } else { "pnotap" }, "10.79.0.1/24");
        let mut args = vec!["--user", uid.as_str(), "--group", "kvm"];
        if keep {
            args.extend(["--keep-caps", "net_admin"]);
        }
        let mut d = Daemon::start_in_netns_with(&dir, &ns.name, &args);
        let c = d.client();
        let mut vm = reference_vm("persistent");
        vm["nets"] = serde_json::json!([{ "tap": ns.tap }]);
        let made = c.create(&serde_json::from_value(vm).unwrap()).unwrap();
        assert_eq!(made["state"], "running", "{made}");
        let mut vm = reference_vm("new-tap");
        vm["nets"] = serde_json::json!([{ "tap": "wvnew0" }]);
        let made = c.create(&serde_json::from_value(vm).unwrap());
        if keep {
            let vm = made.unwrap();
            assert_eq!(vm["state"], "running", "{vm}");
        } else {
            let e = made.unwrap_err().to_string();
            assert!(e.contains("not permitted"), "{e}");
            let list = c.list().unwrap();
            assert_eq!(list["vms"].as_array().unwrap().len(), 1, "{list}");
        }
        d.terminate();
    }
}

/// The KVM device travels with the warm reboot: a daemon dropped to a user that may not
/// open /dev/kvm (nobody, in nogroup) starts with a warning, runs a VM, and warm-reboots
/// it twice (the second time handing on the fd it was handed), the guest verifying; the
/// new daemons hold /dev/kvm open although they could not have opened it.
#[test]
fn a_user_without_kvm_access_warm_reboots_with_the_kvm_fd_handed_over() {
    if !warmvm_testkit::kvm_available(
        "a_user_without_kvm_access_warm_reboots_with_the_kvm_fd_handed_over",
    ) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata("/dev/kvm").unwrap().permissions().mode();
    assert_eq!(
        mode & 0o006,
        0,
        "/dev/kvm is open to everyone here ({mode:o}): nothing to show"
    );
    let dir = scratch("priv-nokvm");
    let uid = UID.to_string();
    let mut d = Daemon::start_from(&installed_build(&dir), &dir, &["--user", &uid]);
    let p = d.client().status().unwrap()["privileges"].clone();
    assert_eq!(p["uid"], UID, "{p}");
    assert_ne!(p["gid"], kvm_gid(), "{p}");
    assert!(
        !p["groups"].as_array().unwrap().contains(&kvm_gid().into()),
        "{p}"
    );
    assert!(
        d.log()
            .contains("the KVM device cannot be opened as this user"),
        "{}",
        d.log()
    );
    let c = d.client();
    c.create(&serde_json::from_value(reference_vm("nk")).unwrap())
        .unwrap();
    assert!(wait_until(30, || counter(&c.show("nk").unwrap()) > 0));
    for _ in 0..2 {
        let before = counter(&d.client().show("nk").unwrap());
        let report = d.client().reboot("warm", None).unwrap();
        d.follow_reboot(report["new_pid"].as_u64().unwrap() as u32);
        let holds_kvm = std::fs::read_dir(format!("/proc/{}/fd", d.pid))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .any(|target| target == std::path::Path::new("/dev/kvm"));
        assert!(holds_kvm, "the new daemon has no /dev/kvm fd");
        let c = d.client();
        assert_eq!(c.status().unwrap()["privileges"]["uid"], UID);
        assert!(wait_until(30, || counter(&c.show("nk").unwrap()) > before));
        let vm = c.show("nk").unwrap();
        assert_eq!(vm["state"], "running", "{vm}");
        assert_eq!(vm["guest"]["mismatches"], 0, "{vm}");
    }
    d.terminate_adopted();
}

/// What systemd's `StateDirectory=` makes for a unit without `User=` (root's, mode 0700,
/// and at each start the whole tree given back to root) is the daemon's to give: named in
/// `$STATE_DIRECTORY`, it and what root owns in it become the user's, and the daemon
/// starts. Another user's file in it stays theirs.
#[test]
fn a_state_directory_that_systemd_made_is_given_to_the_user() {
    if !warmvm_testkit::kvm_available("a_state_directory_that_systemd_made_is_given_to_the_user") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("priv-sysd");
    let state = dir.join("state");
    std::fs::create_dir_all(state.join("vm1")).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    // A console log of an earlier run, given back to root by systemd.
    std::fs::write(state.join("vm1/console.log"), "earlier run\n").unwrap();
    std::fs::write(state.join("someone-elses"), "x").unwrap();
    std::os::unix::fs::chown(state.join("someone-elses"), Some(4321), Some(4321)).unwrap();
    let uid = UID.to_string();
    let listed = format!("/var/lib/elsewhere:{}", state.display());
    // Without the environment, the same directory is the operator's: refused.
    let (code, err) = refused(&dir, "state", &["--user", &uid, "--group", &uid]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("is not writable"), "{err}");
    assert_eq!(std::fs::metadata(&state).unwrap().uid(), 0);
    let mut d = Daemon::start_with_env(
        &dir,
        &["--user", &uid, "--group", &uid],
        &[("STATE_DIRECTORY", &listed)],
    );
    assert_dropped(d.pid, UID, 0);
    for p in ["", "vm1", "vm1/console.log", "warmvm.lock"] {
        let m = std::fs::symlink_metadata(state.join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (UID, UID), "{p}");
    }
    assert_eq!(
        std::fs::metadata(state.join("someone-elses"))
            .unwrap()
            .uid(),
        4321
    );
    // It writes there as the user: a VM's console log.
    create(&d, "sd1");
    let log = std::fs::metadata(state.join("sd1")).unwrap();
    assert_eq!(log.uid(), UID);
    assert_eq!(d.terminate().code(), Some(0));
}
