use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;
use warmvm_vmm::{Config, Host, Lifecycle, VmConfig, VmReport};

use crate::cli::{Failure, EXIT_VM_FAILED};
use crate::output;

pub struct DemoArgs {
    pub json: bool,
    pub vms: u32,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub seconds: u64,
    pub state_dir: Option<PathBuf>,
}

/// The longest the demo waits for every guest to complete a full verification pass.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Serialize)]
struct DemoResult<'a> {
    ok: bool,
    seconds: f64,
    vms: &'a [VmReport],
}

pub fn demo(args: &DemoArgs) -> Result<ExitCode, Failure> {
    let config = Config {
        state_dir: Some(args.state_dir.clone().unwrap_or_else(|| {
            warmvm_vmm::config::default_state_dir().join(format!("demo-{}", std::process::id()))
        })),
        vms: (0..args.vms)
            .map(|i| {
                let mut vm = VmConfig::reference(&format!("demo-{i}"), args.memory_mib, args.vcpus);
                vm.cmdline = Some("quiet interval_ms=20".into());
                vm
            })
            .collect(),
    };
    config
        .validate(warmvm_vmm::HostLimits::probe())
        .map_err(Failure::from)?;
    let stop = crate::run::termination_flag()?;
    let started = Instant::now();
    let mut host = Host::open(&config.state_dir())?;
    host.create_all(&config)?;
    host.start_all()?;
    if !args.json {
        eprintln!(
            "warmvm demo: {} VMs of {} MiB with {} vCPU each; verifying their memory for at least {} s",
            args.vms, args.memory_mib, args.vcpus, args.seconds
        );
    }
    let min_run = Duration::from_secs(args.seconds);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let elapsed = started.elapsed();
        let all_verified = host.vms().iter().all(|vm| {
            vm.guest_figures()
                .is_some_and(|g| g.all_verified_clean())
        });
        let any_ended = host.vms().iter().any(|vm| vm.lifecycle().is_finished());
        if (elapsed >= min_run && all_verified)
            || any_ended
            || elapsed >= VERIFY_TIMEOUT
            || stop.load(Ordering::Relaxed)
        {
            break;
        }
    }
    host.stop_all(Duration::from_secs(10));
    let reports: Vec<VmReport> = host.vms().iter().map(|vm| vm.report()).collect();
    let ok = reports.iter().all(|r| {
        r.lifecycle == Lifecycle::PoweredOff { exit_status: 0 }
            && r.guest.as_ref().is_some_and(|g| g.all_verified_clean())
    });
    if args.json {
        output::print_json(&DemoResult {
            ok,
            seconds: started.elapsed().as_secs_f64(),
            vms: &reports,
        });
    } else {
        output::print_vm_table(&reports);
        println!(
            "{}: {} of {} VMs verified all their memory with no mismatch",
            if ok { "PASS" } else { "FAIL" },
            reports
                .iter()
                .filter(|r| r.guest.as_ref().is_some_and(|g| g.all_verified_clean()))
                .count(),
            reports.len()
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VM_FAILED)
    })
}
