use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use warmvm_vmm::{Config, Host, Lifecycle};

use crate::failure::{self, Failure, EXIT_BAD_INPUT, EXIT_HOST, EXIT_VM_FAILED};
use crate::output;

/// Flags set by SIGINT/SIGTERM.
pub fn termination_flag() -> Result<Arc<AtomicBool>, Failure> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone())
            .map_err(|e| Failure::new(EXIT_HOST, format!("cannot install signal handler: {e}")))?;
    }
    Ok(flag)
}

pub fn run(
    config_path: &Path,
    json: bool,
    state_dir: Option<PathBuf>,
    grace_secs: u64,
) -> Result<ExitCode, Failure> {
    let mut config = Config::from_toml_file(config_path).map_err(failure::config)?;
    if state_dir.is_some() {
        config.state_dir = state_dir;
    }
    // Validate before touching KVM, so config mistakes are reported as such on any host.
    config
        .validate(warmvm_vmm::HostLimits::probe())
        .map_err(failure::config)?;
    let given_taps = warmvm_vmm::take_inherited_taps(&config)
        .map_err(|e| Failure::new(crate::failure::EXIT_BAD_INPUT, e.to_string()))?;
    let stop = termination_flag()?;
    // One warmvm per state directory, as for daemons: a `run` beside a daemon on the same
    // directory would write the same console logs and snapshots. Held until we exit.
    let state_dir = config.state_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&state_dir)
        .map_err(|e| {
            Failure::new(
                EXIT_HOST,
                format!(
                    "cannot create the state directory {}: {e}",
                    state_dir.display()
                ),
            )
        })?;
    let _lock = warmvm_api::state_lock::StateLock::take(&state_dir)
        .map_err(|e| Failure::new(EXIT_HOST, e.to_string()))?;
    let mut host = Host::open(&state_dir).map_err(failure::host)?;
    host.create_all_with(&config, given_taps)
        .map_err(failure::host)?;
    host.start_all().map_err(failure::host)?;
    if !json {
        for vm in host.vms() {
            eprintln!(
                "warmvm: {} started ({} MiB, {} vCPU); console log {}",
                vm.name(),
                vm.config.memory_mib,
                vm.config.vcpus,
                vm.report().console_log.display()
            );
        }
    }
    loop {
        if host.vms().iter().all(|vm| vm.lifecycle().is_finished()) {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            if !json {
                eprintln!("warmvm: asking every guest to power off");
            }
            host.stop_all(Duration::from_secs(grace_secs));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let reports: Vec<_> = host.vms().iter().map(|vm| vm.report()).collect();
    let clean = reports
        .iter()
        .all(|r| r.lifecycle == Lifecycle::PoweredOff { exit_status: 0 });
    if json {
        output::print_json(&serde_json::json!({ "vms": reports, "ok": clean }));
    } else {
        output::print_vm_table(&reports);
        for r in &reports {
            if let Lifecycle::Crashed { reason } = &r.lifecycle {
                eprintln!("warmvm: {} crashed: {reason}", r.name);
            }
        }
    }
    let _ = EXIT_BAD_INPUT;
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VM_FAILED)
    })
}
