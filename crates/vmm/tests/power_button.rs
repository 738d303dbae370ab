//! `Vm::stop` presses the ACPI power button: a guest that watches it powers off cleanly
//! through ACPI S5, one that ignores it is forced off once the grace period has passed.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use warmvm_vmm::testing::{kvm_available, wait_verified, ScratchDir};
use warmvm_vmm::{Host, Lifecycle, Pausable, VmConfig};

fn started(host: &mut Host, name: &str, cmdline: &str) -> std::sync::Arc<warmvm_vmm::Vm> {
    let mut c = VmConfig::reference(name, 64, 2);
    c.cmdline = Some(cmdline.into());
    let vm = host.create_vm(&c).expect("VM created");
    vm.start().expect("VM starts");
    wait_verified(&vm, 1);
    vm
}

#[test]
fn a_guest_that_watches_the_power_button_powers_off_through_acpi_s5() {
    if !kvm_available("a_guest_that_watches_the_power_button_powers_off_through_acpi_s5") {
        return;
    }
    let dir = ScratchDir::new("power-button-clean");
    let mut host = Host::open(&dir).expect("KVM opens");
    // A long wait between passes: the press must wake the guest, not its timeout.
    let vm = started(&mut host, "button-clean", "quiet interval_ms=600000");
    let end = vm.stop(Duration::from_secs(60));
    assert_eq!(end, Lifecycle::PoweredOff { exit_status: 0 });
    let c = &vm.shared().devices.counters;
    assert_eq!(c.power_button_presses.load(Relaxed), 1);
    assert_eq!(c.acpi_power_offs.load(Relaxed), 1, "S5 through PM1 control");
    assert_eq!(c.power_requests.load(Relaxed), 0, "not the power port");
    let log = std::fs::read_to_string(&vm.report().console_log).expect("console log");
    assert!(log.contains("power off (power button)"), "{log}");
}

#[test]
fn a_guest_that_ignores_the_power_button_is_forced_off_after_the_grace_period() {
    if !kvm_available("a_guest_that_ignores_the_power_button_is_forced_off_after_the_grace_period")
    {
        return;
    }
    let dir = ScratchDir::new("power-button-forced");
    let mut host = Host::open(&dir).expect("KVM opens");
    let vm = started(
        &mut host,
        "button-ignored",
        "quiet interval_ms=10 power_button=ignore",
    );
    let grace = Duration::from_secs(2);
    let t0 = Instant::now();
    let end = vm.stop(grace);
    assert_eq!(end, Lifecycle::Stopped);
    assert!(
        t0.elapsed() >= grace,
        "forced before the grace period ended"
    );
    let c = &vm.shared().devices.counters;
    assert_eq!(c.power_button_presses.load(Relaxed), 1);
    assert_eq!(c.acpi_power_offs.load(Relaxed), 0);
    assert_eq!(c.power_requests.load(Relaxed), 0);
}

/// A press the guest has not seen yet travels with the VM: pressed while the VM is paused,
/// snapshotted, restored under a new name and started, the copy finds the button pressed
/// and powers off through S5 though nobody pressed its own. The i8042's typed keys travel
/// the same way.
#[test]
fn a_pending_press_and_typed_keys_survive_a_snapshot() {
    if !kvm_available("a_pending_press_and_typed_keys_survive_a_snapshot") {
        return;
    }
    let dir = ScratchDir::new("power-button-snapshot");
    let mut host = Host::open(&dir).expect("KVM opens");
    let orig = started(&mut host, "button-orig", "quiet interval_ms=10");
    orig.pause().expect("VM pauses");
    orig.shared().devices.press_power_button();
    assert!(orig.shared().devices.press_ctrl_alt_del());
    let pm1 = orig.shared().devices.acpi_pm_state();
    let i8042 = orig.shared().devices.i8042_state();
    assert_ne!(pm1.pm1_sts & warmvm_abi::PM1_STS_PWRBTN, 0);
    assert!(!i8042.buffer.is_empty());
    warmvm_vmm::snapshot::save(&orig, &dir.join("snap"), false).expect("snapshot taken");
    let restored = warmvm_vmm::snapshot::restore(
        host.hypervisor(),
        &dir.join("snap"),
        Some("button-copy"),
        &Default::default(),
        &dir,
    )
    .expect("snapshot restored");
    assert_eq!(restored.vm.shared().devices.acpi_pm_state(), pm1);
    assert_eq!(restored.vm.shared().devices.i8042_state(), i8042);
    let copy = restored.start();
    // Snapshotted paused, it comes back paused.
    assert_eq!(copy.lifecycle(), Lifecycle::Paused);
    copy.resume().expect("the copy resumes");
    assert!(
        copy.wait_finished(Duration::from_secs(60)),
        "the copy did not act on the press it inherited"
    );
    assert_eq!(copy.lifecycle(), Lifecycle::PoweredOff { exit_status: 0 });
    let c = &copy.shared().devices.counters;
    assert_eq!(
        c.power_button_presses.load(Relaxed),
        0,
        "never pressed itself"
    );
    assert_eq!(c.acpi_power_offs.load(Relaxed), 1);
    orig.stop(Duration::from_secs(60));
}

/// The Linux kernel the boot test uses (`scripts/fetch-linux-kernel.sh`).
fn linux_kernel() -> Option<std::path::PathBuf> {
    let path = match std::env::var_os("WARMVM_LINUX_KERNEL") {
        Some(p) => p.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/linux/vmlinux"),
    };
    if path.is_file() {
        return Some(path);
    }
    warmvm_vmm::testing::skip_or_fail(
        "a_linux_guest_told_acpi_off_is_sent_ctrl_alt_del_instead_of_the_acpi_button",
        &format!(
            "no Linux kernel at {} (run scripts/fetch-linux-kernel.sh)",
            path.display()
        ),
    );
    None
}

/// Which button a stop presses on a real Linux guest: the ACPI button, or Ctrl-Alt-Del on
/// the i8042 when its command line has `acpi=off`. (The kernel does not get far enough
/// here to act on either: both are forced after their grace period.)
#[test]
fn a_linux_guest_told_acpi_off_is_sent_ctrl_alt_del_instead_of_the_acpi_button() {
    if !kvm_available("a_linux_guest_told_acpi_off_is_sent_ctrl_alt_del_instead_of_the_acpi_button")
    {
        return;
    }
    let Some(kernel) = linux_kernel() else {
        return;
    };
    let dir = ScratchDir::new("power-button-linux");
    let mut host = Host::open(&dir).expect("KVM opens");
    for (name, cmdline, acpi_presses, keys_typed) in [
        ("linux-acpi", "console=ttyS0 panic=1", 1, 0),
        ("linux-noacpi", "console=ttyS0 panic=1 acpi=off", 0, 1),
    ] {
        let mut c = VmConfig::reference(name, 256, 1);
        c.kernel = Some(kernel.clone());
        c.cmdline = Some(cmdline.into());
        let vm = host.create_vm(&c).expect("Linux VM created");
        vm.start().expect("VM starts");
        vm.stop(Duration::from_secs(1));
        let c = &vm.shared().devices.counters;
        assert_eq!(c.power_button_presses.load(Relaxed), acpi_presses, "{name}");
        assert_eq!(c.ctrl_alt_dels.load(Relaxed), keys_typed, "{name}");
    }
}
