//! The host: one KVM handle and every VM this process runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use warmvm_hypervisor::Hypervisor;

use crate::config::{Config, ConfigError, HostLimits};
use crate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{0}")]
    Hypervisor(#[from] warmvm_hypervisor::Error),
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("VM {vm}: {err}")]
    Vm { vm: String, err: VmError },
    #[error("a VM named {0} already exists")]
    Exists(String),
}

/// Every VM of this VMM process.
pub struct Host {
    hv: Hypervisor,
    vms: Vec<Vm>,
    state_dir: PathBuf,
}

impl Host {
    /// Open KVM. Fails with an operator-readable error when KVM is missing or not allowed.
    pub fn open(state_dir: &Path) -> Result<Self, HostError> {
        Ok(Self {
            hv: Hypervisor::open()?,
            vms: Vec::new(),
            state_dir: state_dir.to_path_buf(),
        })
    }

    pub fn hypervisor(&self) -> &Hypervisor {
        &self.hv
    }

    pub fn limits(&self) -> HostLimits {
        let mut limits = HostLimits::probe();
        limits.max_vcpus = limits.max_vcpus.min(self.hv.max_vcpus() as u32);
        limits
    }

    /// Create every VM of `config`, all or none: if one fails, those already created are
    /// torn down again and the error names the VM that failed.
    pub fn create_all(&mut self, config: &Config) -> Result<(), HostError> {
        config.validate(self.limits())?;
        for vm in &config.vms {
            if self.vms.iter().any(|v| v.name() == vm.name) {
                return Err(HostError::Exists(vm.name.clone()));
            }
        }
        let mut created = Vec::new();
        for vm in &config.vms {
            match Vm::create(&self.hv, vm, &self.state_dir) {
                Ok(v) => created.push(v),
                Err(err) => {
                    return Err(HostError::Vm {
                        vm: vm.name.clone(),
                        err,
                    })
                }
            }
        }
        self.vms.extend(created);
        Ok(())
    }

    /// Start every VM that has not started yet.
    pub fn start_all(&self) -> Result<(), HostError> {
        for vm in &self.vms {
            if vm.lifecycle() == crate::Lifecycle::Created {
                vm.start().map_err(|err| HostError::Vm {
                    vm: vm.name().to_string(),
                    err,
                })?;
            }
        }
        Ok(())
    }

    pub fn vms(&self) -> &[Vm] {
        &self.vms
    }

    /// Power every VM off (the guests are asked first, then forced after `grace`).
    pub fn stop_all(&self, grace: Duration) {
        std::thread::scope(|s| {
            for vm in &self.vms {
                s.spawn(move || vm.stop(grace));
            }
        });
    }
}
