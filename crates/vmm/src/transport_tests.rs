//! One saved [`VmRecord`] of a VM with every kind of device, restored through each
//! transport: a warm handover to a new VMM (here on a thread of this process, over the real
//! control channel and the real take-over) and a snapshot on disk.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use warmvm_devices::Pausable;

use warmvm_devices::virtio::status::DRIVER_OK;
use warmvm_devices::{DevicesState, Persist};

use crate::channel::Channel;
use crate::config::{DiskConfig, NetConfig};
use crate::handover::commit_flag::CommitFlag;
use crate::handover::messages::{HandoverState, Msg};
use crate::handover::{outgoing, Adopted, RebootOptions};
use crate::state::{envelope, LifecycleState, VmRecord};
use crate::testing::{kvm_available, noise, ustar_entries, wait_verified, Netns, ScratchDir};
use crate::{Host, Lifecycle, Vm, VmConfig};

const TAP: &str = "wvtapST";

/// A reference guest with a disk and a network interface beside its console, paravirtual
/// ports, ACPI power button and i8042. It ignores the power button (a press stays pending,
/// and the guest runs on), re-reads its disk every 50 ms and sets its network device up.
fn config(image: &Path) -> VmConfig {
    let mut c = VmConfig::reference("every", 96, 2);
    c.cmdline =
        Some("quiet interval_ms=10 power_button=ignore disk_check_ms=50 ip=10.79.0.2/24".into());
    c.disks = vec![DiskConfig {
        path: image.to_path_buf(),
        read_only: true,
        cache: Default::default(),
    }];
    c.nets = vec![NetConfig {
        tap: Some(TAP.into()),
        tap_fd: None,
        mac: None,
    }];
    c
}

/// Wait until the VM's disk has completed requests, with no protocol failure on any device.
fn wait_disk_served(vm: &Vm) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counters = vm.shared.devices.virtio_counters();
        assert!(
            counters.iter().all(|c| c.1 == 0),
            "VM {}: a device failed: {counters:?}",
            vm.name()
        );
        let disk = counters.iter().find(|c| c.0 == "disk0").expect("a disk");
        if disk.2 > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "VM {}: the disk never served: {counters:?}",
            vm.name()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The old VMM's side of a warm reboot of `vm`, with `record` as the state it hands over;
/// the new VMM's side is [`crate::handover::take_over`] on another thread.
fn hand_over(host: &Host, vm: &Arc<Vm>, record: VmRecord, captured_at_ns: u64) -> Adopted {
    let state_dir = std::env::temp_dir();
    let (channel, theirs) = Channel::pair().expect("a channel");
    let new = std::thread::spawn(move || crate::handover::take_over(theirs, &state_dir));
    let flag = CommitFlag::create().expect("a commit flag");
    let opts = RebootOptions::new(PathBuf::new(), Vec::new());
    outgoing::stage(
        &channel,
        std::slice::from_ref(vm),
        &opts,
        &flag,
        host.hypervisor().raw_fd(),
    )
    .expect("staged");
    let next = || channel.recv::<Msg>().expect("an answer").0;
    assert!(matches!(next(), Msg::Prepared { .. }));
    let state = HandoverState {
        sender: crate::build(),
        captured_at_ns,
        host_first_stop_ns: captured_at_ns,
        vms: vec![record],
        quiesce_us: 0,
        capture_us: 0,
        stage_us: 0,
    };
    let bytes = envelope::encode(&state, envelope::FORMAT_VERSION).expect("encoded");
    let memfd = envelope::to_sealed_memfd(&bytes).expect("sealed");
    channel
        .send(&Msg::State, &[memfd.as_raw_fd()])
        .expect("state sent");
    let ready = next();
    assert!(matches!(ready, Msg::Ready), "{ready:?}");
    channel.send(&Msg::Commit, &[]).expect("committed");
    *vm.shared.lifecycle() = Lifecycle::HandedOver;
    let resumed = next();
    assert!(matches!(resumed, Msg::Resumed(_)), "{resumed:?}");
    new.join()
        .expect("the take-over did not panic")
        .expect("taken over")
}

/// What the guest cannot have changed since: it ignores the power button and the i8042.
fn assert_platform_kept(vm: &Vm, saved: &DevicesState) {
    assert_eq!(
        vm.shared.devices.acpi_pm_state(),
        saved.acpi_pm,
        "the press"
    );
    assert_eq!(
        vm.shared.devices.i8042_state(),
        saved.i8042,
        "the typed keys"
    );
}

#[test]
fn one_saved_state_restores_through_the_handover_and_a_snapshot() {
    if !kvm_available("one_saved_state_restores_through_the_handover_and_a_snapshot") {
        return;
    }
    let dir = ScratchDir::new("state-transports");
    let ns = Netns::new("statetr");
    ns.add_tap(TAP, Some("10.79.0.1/24"));
    ns.enter();
    let image = dir.join("disk.img");
    let mut bytes = ustar_entries(&[("a.bin", noise(256 << 10, 5))]);
    bytes.resize(2048 * 512, 0);
    std::fs::write(&image, &bytes).expect("disk image");

    let mut host = Host::open(&dir).expect("KVM opens");
    let vm = host.create_vm(&config(&image)).expect("VM created");
    vm.start().expect("VM starts");
    wait_verified(&vm, 1);
    wait_disk_served(&vm);
    vm.pause().expect("VM pauses");
    // State in the platform devices too: a pending press, keys typed on the i8042.
    vm.shared.devices.press_power_button();
    assert!(vm.shared.devices.press_ctrl_alt_del());

    // The one state both transports carry, as it would cross a process.
    vm.save_parked_vcpus().expect("vCPUs save");
    let mut record = vm
        .save(Instant::now() + Duration::from_secs(5))
        .expect("state saved");
    let captured_at_ns = crate::monotonic_ns();
    record.lifecycle = LifecycleState::Running;
    let saved = rmp_serde::to_vec_named(&record).expect("encoded");
    let decoded = || -> VmRecord { rmp_serde::from_slice(&saved).expect("decoded") };
    let devices = decoded()
        .runtime
        .expect("a live VM's runtime")
        .take_devices();
    assert_eq!(devices.virtio.len(), 2, "a disk and a network interface");
    for (i, v) in devices.virtio.iter().enumerate() {
        assert_ne!(v.status & DRIVER_OK, 0, "the guest drove virtio device {i}");
    }
    assert_ne!(devices.acpi_pm, Default::default());
    assert!(!devices.i8042.buffer.is_empty());

    // To files, from the state (the VM stays paused while its RAM is written).
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).expect("snapshot dir");
    crate::snapshot::write_record(&vm, decoded(), captured_at_ns, &snap, None)
        .expect("snapshot written");

    // Through a warm handover, from the same state.
    let adopted = hand_over(&host, &vm, decoded(), captured_at_ns);
    let new = adopted.host.find("every").expect("the VM was taken over");
    assert_eq!(new.lifecycle(), Lifecycle::Running);
    wait_verified(&new, 2);
    wait_disk_served(&new);
    assert_platform_kept(&new, &devices);
    // Free the TAP and the VM's name for the snapshot's copy.
    new.stop(Duration::from_millis(100));
    drop((new, adopted));
    host.detach(vm.name());
    drop(vm);

    // From the files: every device holds exactly the saved state before the VM runs.
    let restored =
        crate::snapshot::restore(host.hypervisor(), &snap, None, &Default::default(), &dir)
            .expect("snapshot restored");
    assert_eq!(Persist::save(&&restored.vm.shared.devices), devices);
    let copy = restored.start();
    assert_eq!(copy.lifecycle(), Lifecycle::Running);
    wait_verified(&copy, 2);
    wait_disk_served(&copy);
    assert_platform_kept(&copy, &devices);
    copy.stop(Duration::from_millis(100));
}
