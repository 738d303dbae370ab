//! Guests whose virtio-net driver breaks the protocol, one way each (a looping descriptor
//! chain, a buffer outside guest RAM, a buffer larger than any frame, an avail index far
//! beyond the ring, DRIVER_OK set before FEATURES_OK), in one daemon beside healthy VMs, one
//! of them serving HTTP over its own TAP. Each hostile device ends DEVICE_NEEDS_RESET with a
//! rate-limited log line and its failure counted; its TAP stays usable (the guest resets the
//! device and then serves HTTP through it); the healthy VMs keep verifying and serving, and
//! the daemon keeps answering. (virtio-blk's cases are in tests/virtio_blk.rs.)

use std::path::PathBuf;

use warmvm_testkit::*;

const KINDS: [&str; 5] = ["loop", "addr", "len", "index", "status"];
const INDEX: &[u8] = b"<html><body>served after a broken driver</body></html>\n";

/// The value of `warmvm_virtio_device_failures_total` for `vm`'s `device`.
fn failures(metrics: &str, vm: &str, device: &str) -> u64 {
    let want = format!("warmvm_virtio_device_failures_total{{device=\"{device}\",vm=\"{vm}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .unwrap_or_else(|| panic!("no failure metric for {vm}/{device}\n{metrics}"))
        .parse()
        .unwrap()
}

#[test]
fn hostile_net_drivers_fail_only_their_own_device() {
    if !warmvm_testkit::kvm_available("hostile_net_drivers_fail_only_their_own_device") {
        return;
    }
    let dir = scratch("hostile-net");
    let ns = Netns::new("hnet", "10.79.0.1/24");
    let mut image = warmvm_vmm::testing::ustar_entries(&[("index.html", INDEX.to_vec())]);
    image.resize(256 * 512, 0);
    let mut d = Daemon::start_in_netns(&dir, &ns.name);

    let disk = |name: &str| -> String {
        let path = dir.join(format!("{name}.img"));
        std::fs::write(&path, &image).unwrap();
        path.to_str().unwrap().to_string()
    };
    let create = |name: &str, tap: &str, addr: &str, extra: &str| -> PathBuf {
        let r = d.cli_json(&[
            "vm",
            "create",
            "--name",
            name,
            "--memory",
            "48",
            "--cmdline",
            &format!("quiet interval_ms=20 disk_check_ms=0 ip={addr}/24 cache_mib=2 {extra}"),
            "--disk",
            &disk(name),
            "--net",
            tap,
        ]);
        PathBuf::from(r["console_log"].as_str().unwrap())
    };

    // The healthy ones: a web server, and a VM with no devices that verifies its RAM.
    let web_console = create("good-web", &ns.tap, "10.79.0.2", "");
    d.cli_json(&[
        "vm",
        "create",
        "--name",
        "good-plain",
        "--memory",
        "16",
        "--cmdline",
        "quiet interval_ms=20",
    ]);
    assert!(
        wait_until(60, || read(&web_console).contains("http: serving")),
        "the healthy web server never served\n{}\n{}",
        read(&web_console),
        d.log()
    );
    assert_eq!(ns.fetch("10.79.0.2", "/index.html").as_deref(), Some(INDEX));

    let mut hostile = Vec::new();
    for (i, kind) in KINDS.iter().enumerate() {
        let tap = format!("hn{}", i + 1);
        ns.add_tap(&tap, Some(&format!("10.79.{}.1/24", i + 1)));
        let addr = format!("10.79.{}.2", i + 1);
        let name = format!("bad-{kind}");
        let console = create(&name, &tap, &addr, &format!("hostile_net={kind}"));
        hostile.push((kind, name, tap, addr, console));
    }

    for (kind, name, _, _, console) in &hostile {
        assert!(
            wait_until(60, || read(console)
                .contains("the net device needs a reset")),
            "{kind}: the device did not fail\n{}\n{}",
            read(console),
            d.log()
        );
        assert!(
            !read(console).contains("does NOT need"),
            "{name}: {}",
            read(console)
        );
    }

    let metrics = d.client().raw("GET", "/metrics", None).unwrap();
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    let log = d.log();
    for (kind, name, _, _, _) in &hostile {
        let n = failures(&metrics, name, "net0");
        assert!(n >= 1, "{kind}: failures not counted");
        // One log line per power of two of the device's failures.
        let lines = log
            .lines()
            .filter(|l| {
                l.contains("guest broke the virtio protocol") && l.contains(&format!("{name}/net0"))
            })
            .count() as u32;
        assert!(
            lines >= 1 && lines <= 64 - n.leading_zeros(),
            "{kind}: {lines} log lines for {n} failures\n{log}"
        );
        assert_eq!(failures(&metrics, name, "disk0"), 0, "{kind}");
    }
    assert_eq!(failures(&metrics, "good-web", "net0"), 0);
    assert_eq!(failures(&metrics, "good-web", "disk0"), 0);

    // Each hostile guest then resets its device and serves through the same TAP.
    for (kind, _, tap, addr, console) in &hostile {
        assert!(
            wait_until(60, || read(console).contains("http: serving")),
            "{kind}: no server after the reset\n{}",
            read(console)
        );
        let mut body = None;
        assert!(
            wait_until(30, || {
                body = ns.fetch(addr, "/index.html");
                body.is_some()
            }),
            "{kind}: nothing served through {tap} after the reset\n{}",
            read(console)
        );
        assert_eq!(body.as_deref(), Some(INDEX), "{kind}");
    }
    // The VM's report shows each device: the reset device serves again over the same TAP,
    // its failures still counted.
    for (kind, name, tap, _, _) in &hostile {
        let show = d.cli_json(&["vm", "show", name]);
        let net = &show["devices"][1];
        assert_eq!(net["name"], "net0", "{kind}: {show}");
        assert_eq!(net["kind"], "virtio-net", "{kind}: {net}");
        assert_eq!(net["tap"], tap.as_str(), "{kind}: {net}");
        assert_eq!(net["status"], "ok", "{kind}: {net}");
        assert_eq!(net["mmio_base"], 0xd000_1000u64, "{kind}: {net}");
        assert!(net["irq"].is_null(), "the reference guest polls: {net}");
        assert!(net["failures"].as_u64().unwrap() >= 1, "{kind}: {net}");
        assert!(net["requests"].as_u64().unwrap() > 0, "{kind}: {net}");
        assert_eq!(show["devices"][0]["kind"], "virtio-blk", "{kind}: {show}");
    }

    // The healthy VMs go on: the server serves, every VM's counter moves, the daemon answers.
    assert_eq!(ns.fetch("10.79.0.2", "/index.html").as_deref(), Some(INDEX));
    let before = figures(&d);
    assert!(
        wait_until(30, || {
            let now = figures(&d);
            before
                .iter()
                .all(|(name, _, count, _)| now.iter().any(|(n, _, c, _)| n == name && c > count))
        }),
        "a VM stopped verifying: {before:?} then {:?}",
        figures(&d)
    );
    for (name, state, _, bad) in figures(&d) {
        assert_eq!(state, "running", "{name}");
        assert_eq!(bad, 0, "{name}");
    }
    assert_eq!(d.cli_json(&["status"])["pid"], d.pid);
    for (_, name, _, _, _) in &hostile {
        let r = d.cli_json(&["vm", "stop", name, "--grace-secs", "10"]);
        assert_eq!(r["exit_status"], 0, "{name}: {r}");
    }
    for name in ["good-web", "good-plain"] {
        let r = d.cli_json(&["vm", "stop", name, "--grace-secs", "10"]);
        assert_eq!(r["exit_status"], 0, "{name}: {r}");
        assert_eq!(r["guest"]["mismatches"], 0, "{name}: {r}");
    }
    d.terminate();
}
