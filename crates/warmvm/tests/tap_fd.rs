//! TAP devices handed to the daemon as open fds rather than by name: one inherited at start
//! (`tap_fd = N` in its config) and one passed by the CLI over the API socket (SCM_RIGHTS,
//! `warmvm vm create --net tap-fd=N`). The TAPs live in a network namespace the daemon is
//! not in, so only the fds can reach them; the guests serve HTTP through them before and
//! after a warm reboot. Fds that are not TAPs are refused with one clear line.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;

use warmvm_testkit::*;

const INDEX: &[u8] = b"<html><body>served through a TAP passed by fd</body></html>\n";

/// Open TAP `name` inside namespace `ns` (a thread that enters it opens the TAP, so the
/// name is looked up there).
fn open_tap_in(ns: &str, name: &str) -> OwnedFd {
    let name = name.to_string();
    in_netns(ns, move || {
        OwnedFd::from(warmvm_vmm::devices::virtio::tap::open_tap(&name).unwrap())
    })
}

/// Let children inherit `fd` (Rust opens everything close-on-exec).
fn inheritable(fd: &OwnedFd) {
    // SAFETY: F_SETFD on an open fd we own changes only its close-on-exec flag.
    assert_eq!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) }, 0);
}

fn serves(ns: &Netns, addr: &str) -> bool {
    let mut body = None;
    wait_until(30, || {
        body = ns.fetch(addr, "/index.html");
        body.is_some()
    }) && body.as_deref() == Some(INDEX)
}

#[test]
fn guests_serve_through_taps_passed_by_fd_across_a_warm_reboot() {
    if !warmvm_testkit::kvm_available("guests_serve_through_taps_passed_by_fd_across_a_warm_reboot")
    {
        return;
    }
    let dir = scratch("tapfd");
    let ns = Netns::new("tapfd", "10.81.0.1/24");
    ns.add_tap("tapb", Some("10.81.1.1/24"));
    let mut image = warmvm_vmm::testing::ustar_entries(&[("index.html", INDEX.to_vec())]);
    image.resize(256 * 512, 0);
    for vm in ["web-a", "web-b"] {
        std::fs::write(dir.join(format!("{vm}.img")), &image).unwrap();
    }
    let cmdline =
        |addr: &str| format!("quiet interval_ms=20 disk_check_ms=0 ip={addr}/24 cache_mib=2");

    // web-a: the daemon inherits the TAP's fd and its config names it.
    let tap_a = open_tap_in(&ns.name, &ns.tap);
    inheritable(&tap_a);
    let config = dir.join("vms.toml");
    std::fs::write(
        &config,
        format!(
            "[[vm]]\nname = \"web-a\"\nmemory_mib = 48\ncmdline = \"{}\"\n[[vm.disks]]\npath = {:?}\n[[vm.nets]]\ntap_fd = {}\n",
            cmdline("10.81.0.2"),
            dir.join("web-a.img"),
            tap_a.as_raw_fd()
        ),
    )
    .unwrap();
    let mut d = Daemon::start(&dir, &["--config", config.to_str().unwrap()]);
    drop(tap_a); // the daemon has its own copy

    // web-b: the CLI passes a TAP it has open.
    let tap_b = open_tap_in(&ns.name, "tapb");
    inheritable(&tap_b);
    let created = d.cli_json(&[
        "vm",
        "create",
        "--name",
        "web-b",
        "--memory",
        "48",
        "--cmdline",
        &cmdline("10.81.1.2"),
        "--disk",
        dir.join("web-b.img").to_str().unwrap(),
        "--net",
        &format!("tap-fd={}", tap_b.as_raw_fd()),
    ]);
    drop(tap_b);
    let console_b = std::path::PathBuf::from(created["console_log"].as_str().unwrap());
    assert!(
        wait_until(60, || read(&console_b).contains("http: serving")),
        "{}\n{}",
        read(&console_b),
        d.log()
    );
    // The VMs' reports name the TAPs they were given as fds.
    for (vm, tap) in [("web-a", ns.tap.as_str()), ("web-b", "tapb")] {
        let net = &d.cli_json(&["vm", "show", vm])["devices"][1];
        assert_eq!(net["tap"], tap, "{vm}: {net}");
    }
    assert!(serves(&ns, "10.81.0.2"), "web-a\n{}", d.log());
    assert!(serves(&ns, "10.81.1.2"), "web-b\n{}", d.log());
    // The daemon's namespace has no such TAPs: it reached them through the fds alone.
    let root_links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let root_links = String::from_utf8_lossy(&root_links.stdout);
    assert!(!root_links.contains(" tapb:"), "{root_links}");

    let report = d.cli_json(&["reboot", "--mode", "warm"]);
    let new_pid = report["new_pid"].as_u64().unwrap() as u32;
    d.follow_reboot(new_pid);
    assert!(
        serves(&ns, "10.81.0.2"),
        "web-a after the reboot\n{}",
        d.log()
    );
    assert!(
        serves(&ns, "10.81.1.2"),
        "web-b after the reboot\n{}",
        d.log()
    );
    for vm in ["web-a", "web-b"] {
        let r = d.cli_json(&["vm", "stop", vm, "--grace-secs", "10"]);
        assert_eq!(r["exit_status"], 0, "{vm}: {r}");
        assert_eq!(r["guest"]["mismatches"], 0, "{vm}: {r}");
    }
    d.terminate_adopted();
}

#[test]
fn fds_that_are_not_taps_are_refused_with_one_line() {
    if !warmvm_testkit::kvm_available("fds_that_are_not_taps_are_refused_with_one_line") {
        return;
    }
    let dir = scratch("tapfd-bad");
    let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    inheritable(&null);
    let fd = null.as_raw_fd().to_string();

    // At start: the daemon refuses the config and exits 2 with one line.
    let config = dir.join("bad.toml");
    std::fs::write(
        &config,
        format!("[[vm]]\nname = \"a\"\nmemory_mib = 16\n[[vm.nets]]\ntap_fd = {fd}\n"),
    )
    .unwrap();
    let out = refused(
        daemon_command(&dir.join("bad.sock"))
            .arg("--state-dir")
            .arg(dir.join("bad-state"))
            .arg("--config")
            .arg(&config),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("fd {fd} is not a TAP device")),
        "{stderr}"
    );

    let d = Daemon::start(&dir, &[]);
    let create = |net: &str| {
        d.cli(&[
            "vm", "create", "--name", "a", "--memory", "16", "--net", net,
        ])
    };
    // Over the API: the daemon checks the fd it was passed.
    let out = create(&format!("tap-fd={fd}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not a TAP device"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    // An fd the CLI does not have is refused before anything is sent.
    let out = create("tap-fd=999");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no open fd 999"), "{stderr}");
    // A create that passes an fd no interface names, or names one it did not pass.
    let body = br#"{"name": "a", "memory_mib": 16, "nets": [{"tap_fd": 1}]}"#;
    let r = d
        .client()
        .raw_with_fds("POST", "/v1/vms", Some(body), &[null.as_raw_fd()])
        .unwrap();
    // The body is well-formed (so not 400): the fd it names does not exist (404), and one
    // passed but not named conflicts with the interfaces it names (409).
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("passed 1 fds"));
    let body = br#"{"name": "a", "memory_mib": 16}"#;
    let r = d
        .client()
        .raw_with_fds("POST", "/v1/vms", Some(body), &[null.as_raw_fd()])
        .unwrap();
    assert_eq!(r.status, 409);
    assert!(String::from_utf8_lossy(&r.body).contains("not named by any tap_fd"));
    let r = d
        .client()
        .raw_with_fds("GET", "/v1/vms", None, &[null.as_raw_fd()])
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("takes no fds"));
    // Nothing was created.
    assert_eq!(d.cli_json(&["vm", "list"])["vms"], serde_json::json!([]));
}

/// A cold reboot powers the guest off and boots it again in a new daemon while the old one
/// still holds the powered-off VM and its TAP: the TAP is handed over, not attached to again
/// by name (which a TAP still attached refuses), so the guest serves again.
#[test]
fn a_cold_reboot_boots_the_guest_on_its_tap_again() {
    if !warmvm_testkit::kvm_available("a_cold_reboot_boots_the_guest_on_its_tap_again") {
        return;
    }
    let dir = scratch("tapcold");
    let ns = Netns::new("tapcold", "10.82.0.1/24");
    let mut image = warmvm_vmm::testing::ustar_entries(&[("index.html", INDEX.to_vec())]);
    image.resize(256 * 512, 0);
    let img = dir.join("web.img");
    std::fs::write(&img, &image).unwrap();
    let mut d = Daemon::start_in_netns(&dir, &ns.name);
    d.cli_json(&[
        "vm",
        "create",
        "--name",
        "web",
        "--memory",
        "48",
        "--cmdline",
        "quiet interval_ms=20 disk_check_ms=0 ip=10.82.0.2/24 cache_mib=2",
        "--disk",
        img.to_str().unwrap(),
        "--net",
        &ns.tap,
    ]);
    assert!(serves(&ns, "10.82.0.2"), "{}", d.log());
    let out = d.cli(&["--json", "reboot", "--mode", "cold"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    let vms = report["reboot"]["vms"].as_array().unwrap();
    assert!(vms.iter().all(|v| v["error"].is_null()), "{report}");
    assert!(out.status.success(), "{report}");
    d.follow_reboot(report["handover"]["new_pid"].as_u64().unwrap() as u32);
    assert!(
        serves(&ns, "10.82.0.2"),
        "after the cold reboot\n{}",
        d.log()
    );
    let r = d.cli_json(&["vm", "stop", "web", "--grace-secs", "10"]);
    assert_eq!(r["exit_status"], 0, "{r}");
    d.terminate_adopted();
}
