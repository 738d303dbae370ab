//! virtio-blk end to end: the reference guest's polling driver reads a tar archive from its
//! disk (O_DIRECT image) through the daemon's VMM, keeps re-reading and re-checking it, and
//! goes on doing so across a warm reboot that hands the disk fd and the queue state over.

use warmvm_testkit::*;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The highest `disk check N` in the console log.
fn disk_checks(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| l.split("disk check ").nth(1))
        .filter_map(|rest| rest.split(':').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// `warmvm vm create --name NAME --memory MIB --cmdline CMDLINE --disk IMAGE`; the VM's
/// console log.
fn create_disk_vm(
    d: &Daemon,
    name: &str,
    memory_mib: &str,
    cmdline: &str,
    image: &std::path::Path,
) -> std::path::PathBuf {
    let created = d.cli_json(&[
        "vm",
        "create",
        "--name",
        name,
        "--memory",
        memory_mib,
        "--cmdline",
        cmdline,
        "--disk",
        image.to_str().unwrap(),
    ]);
    std::path::PathBuf::from(created["console_log"].as_str().unwrap())
}

#[test]
fn the_reference_guest_reads_its_disk_across_a_warm_reboot() {
    if !warmvm_testkit::kvm_available("the_reference_guest_reads_its_disk_across_a_warm_reboot") {
        return;
    }
    let dir = scratch("blk");
    let files = vec![
        ("index.html", b"<html><body>warmvm</body></html>\n".to_vec()),
        ("data/noise.bin", warmvm_vmm::testing::noise(300_000, 7)),
        ("data/small.txt", warmvm_vmm::testing::noise(513, 9)),
    ];
    let image = dir.join("disk.img");
    std::fs::write(&image, tar_image(&files, 2048)).unwrap();
    let before_image = std::fs::read(&image).unwrap();

    let mut d = Daemon::start(&dir, &[]);
    let console = create_disk_vm(
        &d,
        "disk-1",
        "64",
        "interval_ms=20 disk_check_ms=200",
        &image,
    );
    assert!(
        wait_until(60, || disk_checks(&read(&console)) >= 2),
        "the guest never checked its disk twice\n{}\n{}",
        read(&console),
        d.log()
    );
    let log = read(&console);
    assert!(
        log.contains("disk0: 2048 sectors, tar archive of 3 files"),
        "{log}"
    );
    for (name, data) in &files {
        let line = format!(
            "disk0: file {name} {} bytes fnv1a {:016x}",
            data.len(),
            fnv1a(data)
        );
        assert!(log.contains(&line), "missing {line:?}\n{log}");
    }

    let checks_before = disk_checks(&read(&console));
    let report = d.cli_json(&["reboot", "--mode", "warm"]);
    let new_pid = report["new_pid"].as_u64().unwrap() as u32;
    d.follow_reboot(new_pid);
    assert!(
        wait_until(60, || disk_checks(&read(&console)) >= checks_before + 3),
        "the guest stopped reading its disk after the warm reboot\n{}\n{}",
        read(&console),
        d.log()
    );
    // Paused (devices too), handed over while paused, resumed: the disk serves again.
    d.cli_json(&["vm", "pause", "disk-1"]);
    let report = d.cli_json(&["reboot", "--mode", "warm"]);
    d.follow_reboot(report["new_pid"].as_u64().unwrap() as u32);
    d.cli_json(&["vm", "resume", "disk-1"]);
    let checks = disk_checks(&read(&console));
    assert!(
        wait_until(60, || disk_checks(&read(&console)) >= checks + 3),
        "the disk did not serve after a pause across a warm reboot\n{}\n{}",
        read(&console),
        d.log()
    );
    let log = read(&console);
    assert!(!log.contains("MISMATCH"), "{log}");
    assert!(!log.contains("read failed"), "{log}");
    assert!(!d.log().contains("virtio protocol"), "{}", d.log());

    let r = d.cli_json(&["vm", "stop", "disk-1", "--grace-secs", "10"]);
    assert_eq!(r["state"], "powered-off", "{r}");
    assert_eq!(r["exit_status"], 0, "{r}");
    d.terminate_adopted();
    // The guest only read: the image is as it was.
    assert_eq!(std::fs::read(&image).unwrap(), before_image);
}

/// Guests that break the virtio protocol in each way fail only their own disk: the
/// device is marked DEVICE_NEEDS_RESET (and counted), their image is untouched, the
/// daemon answers, and a healthy VM beside them keeps verifying its RAM and its disk.
#[test]
fn hostile_guests_fail_only_their_own_disk() {
    if !warmvm_testkit::kvm_available("hostile_guests_fail_only_their_own_disk") {
        return;
    }
    let dir = scratch("hostile");
    let files = vec![("index.html", warmvm_vmm::testing::noise(5000, 3))];
    let image = tar_image(&files, 256);
    let d = Daemon::start(&dir, &[]);
    let good_img = dir.join("good.img");
    std::fs::write(&good_img, &image).unwrap();
    let good_console = create_disk_vm(
        &d,
        "good",
        "32",
        "interval_ms=20 disk_check_ms=100",
        &good_img,
    );
    let kinds = ["loop", "addr", "len", "index", "status"];
    let mut consoles = Vec::new();
    for kind in kinds {
        let img = dir.join(format!("{kind}.img"));
        std::fs::write(&img, &image).unwrap();
        let console = create_disk_vm(
            &d,
            &format!("bad-{kind}"),
            "32",
            &format!("quiet interval_ms=20 disk_check_ms=0 hostile={kind}"),
            &img,
        );
        consoles.push((kind, img, console));
    }
    for (kind, _, console) in &consoles {
        assert!(
            wait_until(60, || read(console).contains("the disk needs a reset")),
            "{kind}: the device did not fail\n{}\n{}",
            read(console),
            d.log()
        );
    }
    let metrics = d.client().raw("GET", "/metrics", None).unwrap();
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    for (kind, img, _) in &consoles {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("warmvm_virtio_device_failures_total")
                    && l.contains(&format!("vm=\"bad-{kind}\""))
            })
            .unwrap_or_else(|| panic!("no failure metric for {kind}\n{metrics}"));
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 1, "{line}");
        assert_eq!(
            std::fs::read(img).unwrap(),
            image,
            "{kind}: the image changed"
        );
    }
    assert!(
        metrics.contains("warmvm_virtio_device_failures_total{device=\"disk0\",vm=\"good\"} 0"),
        "{metrics}"
    );
    // The VMs' reports show which disk failed, and what backs it.
    for (kind, img, _) in &consoles {
        let disk = &d.cli_json(&["vm", "show", &format!("bad-{kind}")])["devices"][0];
        assert_eq!(disk["status"], "needs-reset", "{kind}: {disk}");
        assert_eq!(disk["path"], img.to_str().unwrap(), "{kind}: {disk}");
        assert_eq!(disk["cache"], "none", "{kind}: {disk}");
        assert!(disk["failures"].as_u64().unwrap() >= 1, "{kind}: {disk}");
    }
    let good_disk = &d.cli_json(&["vm", "show", "good"])["devices"][0];
    assert_eq!(good_disk["status"], "ok", "{good_disk}");
    assert_eq!(good_disk["failures"], 0, "{good_disk}");
    let shown = d.cli(&["vm", "show", "bad-loop"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("disk0") && shown.contains("needs-reset") && shown.contains("0xd0000000"),
        "{shown}"
    );
    // The healthy VM goes on checking its disk, and every VM goes on verifying its RAM.
    let checks = disk_checks(&read(&good_console));
    assert!(
        wait_until(30, || disk_checks(&read(&good_console)) >= checks + 3),
        "the healthy VM stopped checking its disk\n{}",
        read(&good_console)
    );
    let list = d.cli_json(&["vm", "list"]);
    for vm in list["vms"].as_array().unwrap() {
        assert_eq!(vm["state"], "running", "{vm}");
    }
    for name in [
        "good",
        "bad-loop",
        "bad-addr",
        "bad-len",
        "bad-index",
        "bad-status",
    ] {
        let r = d.cli_json(&["vm", "stop", name, "--grace-secs", "10"]);
        assert_eq!(r["exit_status"], 0, "{name}: {r}");
        assert_eq!(r["guest"]["mismatches"], 0, "{name}: {r}");
    }
    assert!(!read(&good_console).contains("MISMATCH"));
}

/// A warm reboot that fails after the devices were paused for the capture (the new VMM is
/// killed while restoring) leaves the disk serving in the old daemon: its worker resumes with
/// the VM, and the guest's disk checks go on.
#[test]
fn a_failed_warm_reboot_resumes_the_disk() {
    if !warmvm_testkit::kvm_available("a_failed_warm_reboot_resumes_the_disk") {
        return;
    }
    let dir = scratch("blkfail");
    let image = dir.join("disk.img");
    std::fs::write(
        &image,
        tar_image(&[("a.txt", warmvm_vmm::testing::noise(3000, 5))], 64),
    )
    .unwrap();
    let d = Daemon::start_with_env(&dir, &[], &[("WARMVM_FAULT", "new:state:kill")]);
    let console = create_disk_vm(
        &d,
        "disk-1",
        "32",
        "interval_ms=20 disk_check_ms=100",
        &image,
    );
    assert!(wait_until(60, || disk_checks(&read(&console)) >= 2));
    let out = d.cli(&["reboot", "--mode", "warm"]);
    assert!(!out.status.success(), "the reboot was meant to fail");
    assert_eq!(
        d.cli_json(&["status"])["pid"],
        d.pid,
        "the old daemon serves on"
    );
    let checks = disk_checks(&read(&console));
    assert!(
        wait_until(30, || disk_checks(&read(&console)) >= checks + 3),
        "the disk stopped after the failed reboot\n{}\n{}",
        read(&console),
        d.log()
    );
    assert!(!read(&console).contains("MISMATCH"));
}
