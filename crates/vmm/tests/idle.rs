//! Waiting guests must not cost host CPU: a vCPU in the wait port sleeps in the VMM.

use std::time::{Duration, Instant};

use warmvm_vmm::{Config, Host, VmConfig};

fn process_cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a complete rusage into the pointer it is given.
    let usage = unsafe {
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()), 0);
        usage.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[test]
fn sixteen_waiting_vms_leave_the_host_nearly_idle() {
    if !warmvm_vmm::testing::kvm_available("sixteen_waiting_vms_leave_the_host_nearly_idle") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("warmvm-idle-{}", std::process::id()));
    let config = Config {
        state_dir: Some(dir.clone()),
        vms: (0..16)
            .map(|i| {
                let mut vm = VmConfig::reference(&format!("idle-{i}"), 64, 1);
                // One verification pass, then a long wait in the wait port.
                vm.cmdline = Some("quiet interval_ms=600000".into());
                vm
            })
            .collect(),
        aging: None,
        privileges: None,
        fleet: None,
    };
    let mut host = Host::open(&dir).expect("KVM opens");
    host.create_all(&config)
        .expect("16 VMs of 64 MiB are created");
    host.start_all().expect("VMs start");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !host
        .vms()
        .iter()
        .all(|vm| vm.guest_figures().is_some_and(|g| g.all_verified_clean()))
    {
        assert!(
            Instant::now() < deadline,
            "guests did not verify their RAM in time"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let cpu0 = process_cpu_time();
    let wall0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let busy = (process_cpu_time() - cpu0).as_secs_f64() / wall0.elapsed().as_secs_f64();
    // 16 spinning vCPUs would keep both host cores busy (2.0); sleeping ones cost ~0.
    assert!(busy < 0.25, "waiting guests cost {busy:.2} cores");
    for vm in host.vms() {
        assert!(vm.lifecycle() == warmvm_vmm::Lifecycle::Running);
        assert!(vm.report().exits.iter().all(|e| e.waits >= 1));
    }
    host.stop_all(Duration::from_secs(10));
    for vm in host.vms() {
        assert_eq!(
            vm.lifecycle(),
            warmvm_vmm::Lifecycle::PoweredOff { exit_status: 0 }
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
