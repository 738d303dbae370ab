//! The host: one KVM handle and every VM this process runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use warmvm_hypervisor::Hypervisor;

use crate::config::{Config, ConfigError, HostLimits, VmConfig};
use crate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{0}")]
    Hypervisor(#[from] warmvm_hypervisor::Error),
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("VM {vm}: {err}")]
    Vm {
        vm: String,
        #[source]
        err: VmError,
    },
    #[error("a VM named {0} already exists")]
    Exists(String),
    #[error("no VM named {0}")]
    NotFound(String),
    #[error("VM {0} is still running: stop it before deleting it")]
    StillRunning(String),
    #[error("{0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// Every VM of this VMM process.
pub struct Host {
    hv: Hypervisor,
    vms: Vec<Arc<Vm>>,
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

    /// A host made of VMs taken over from another VMM process.
    pub fn adopted(hv: Hypervisor, vms: Vec<Arc<Vm>>, state_dir: &Path) -> Self {
        Self {
            hv,
            vms,
            state_dir: state_dir.to_path_buf(),
        }
    }

    /// Forget VMs that were handed over to another VMM.
    pub fn drop_handed_over(&mut self) {
        self.vms
            .retain(|v| v.lifecycle() != crate::Lifecycle::HandedOver);
    }

    /// The KVM device [`Host::open`] opens (a daemon dropping privileges checks it can).
    pub fn kvm_device() -> PathBuf {
        Hypervisor::device_path()
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
        self.create_all_with(config, std::collections::BTreeMap::new())
    }

    /// [`Host::create_all`] with TAPs given by fd, per VM name.
    pub fn create_all_with(
        &mut self,
        config: &Config,
        mut given: std::collections::BTreeMap<String, crate::GivenTaps>,
    ) -> Result<(), HostError> {
        config.validate(self.limits())?;
        for vm in &config.vms {
            if self.vms.iter().any(|v| v.name() == vm.name) {
                return Err(HostError::Exists(vm.name.clone()));
            }
        }
        let mut created = Vec::new();
        for vm in &config.vms {
            let taps = given.remove(&vm.name).unwrap_or_default();
            match Vm::create_with(&self.hv, vm, &self.state_dir, taps) {
                Ok(v) => created.push(v),
                Err(err) => {
                    return Err(HostError::Vm {
                        vm: vm.name.clone(),
                        err,
                    })
                }
            }
        }
        self.vms.extend(created.into_iter().map(Arc::new));
        Ok(())
    }

    /// Create one VM (not started). Nothing changes if it fails.
    pub fn create_vm(&mut self, config: &VmConfig) -> Result<Arc<Vm>, HostError> {
        self.create_vm_with(config, crate::GivenTaps::default())
    }

    /// [`Host::create_vm`] with TAPs given by fd.
    pub fn create_vm_with(
        &mut self,
        config: &VmConfig,
        taps: crate::GivenTaps,
    ) -> Result<Arc<Vm>, HostError> {
        config.validate(self.limits())?;
        if self.find(&config.name).is_some() {
            return Err(HostError::Exists(config.name.clone()));
        }
        let total: u64 =
            self.vms.iter().map(|v| v.config.memory_mib).sum::<u64>() + config.memory_mib;
        let host_mib = self.limits().memory_mib;
        if host_mib > 0 && total > host_mib {
            return Err(HostError::Config(ConfigError::TotalMemoryTooLarge {
                total_mib: total,
                host_mib,
            }));
        }
        let vm = Vm::create_with(&self.hv, config, &self.state_dir, taps).map_err(|err| {
            HostError::Vm {
                vm: config.name.clone(),
                err,
            }
        })?;
        let vm = Arc::new(vm);
        self.vms.push(vm.clone());
        Ok(vm)
    }

    /// Create a VM from the snapshot in `dir`, named `name` (default: the snapshot's), and
    /// let it run as it was. Nothing changes if it fails.
    pub fn restore_snapshot(
        &mut self,
        dir: &Path,
        name: Option<&str>,
        backing: &crate::snapshot::Backing,
    ) -> Result<(Arc<Vm>, crate::snapshot::RestoreReport), HostError> {
        let restored = self.restore_snapshot_unstarted(dir, name, backing)?;
        let report = restored.report.clone();
        Ok((self.start_restored(restored), report))
    }

    /// [`Host::restore_snapshot`] up to the point where the VM would run: the caller
    /// records that it has it (a saved reboot's manifest) before [`Host::start_restored`],
    /// so that no VM runs from a snapshot that something else may still restore. Not yet
    /// part of this host: dropping it discards the VM.
    pub fn restore_snapshot_unstarted(
        &self,
        dir: &Path,
        name: Option<&str>,
        backing: &crate::snapshot::Backing,
    ) -> Result<crate::snapshot::Restored, HostError> {
        let peek = crate::snapshot::peek(dir, backing)?;
        let ram = peek.ram_bytes;
        let name = name.unwrap_or(&peek.name);
        if self.find(name).is_some() {
            return Err(HostError::Exists(name.to_string()));
        }
        self.check_backing_free(name, &peek)?;
        let total: u64 = self.vms.iter().map(|v| v.config.memory_mib).sum::<u64>() + (ram >> 20);
        let host_mib = self.limits().memory_mib;
        if host_mib > 0 && total > host_mib {
            return Err(HostError::Config(ConfigError::TotalMemoryTooLarge {
                total_mib: total,
                host_mib,
            }));
        }
        Ok(crate::snapshot::restore(
            &self.hv,
            dir,
            Some(name),
            backing,
            &self.state_dir,
        )?)
    }

    /// Let a VM from [`Host::restore_snapshot_unstarted`] run (or stay paused) as it was,
    /// as one of this host's.
    pub fn start_restored(&mut self, restored: crate::snapshot::Restored) -> Arc<Vm> {
        let vm = restored.start();
        self.vms.push(vm.clone());
        vm
    }

    /// A restored VM must not share a TAP with a VM of this host (a TAP serves one VM), nor
    /// a disk image that either of them writes (two guests writing one file corrupt it).
    fn check_backing_free(
        &self,
        name: &str,
        peek: &crate::snapshot::Peek,
    ) -> Result<(), HostError> {
        let same_file =
            |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
                (Ok(a), Ok(b)) => a == b,
                _ => a == b,
            };
        for other in self.vms.iter().filter(|v| !v.lifecycle().is_finished()) {
            let in_use = |what: String, hint| {
                Err(HostError::Snapshot(crate::snapshot::SnapshotError::InUse {
                    vm: name.to_string(),
                    other: other.name().to_string(),
                    what,
                    hint,
                }))
            };
            if let Some(tap) = peek.taps.iter().find(|t| {
                other
                    .config
                    .nets
                    .iter()
                    .any(|n| n.tap.as_deref() == Some(t.as_str()))
            }) {
                return in_use(format!("TAP {tap}"), "--net tap=NAME");
            }
            for (path, writes) in &peek.disks {
                if other
                    .config
                    .disks
                    .iter()
                    .any(|d| (*writes || !d.read_only) && same_file(&d.path, path))
                {
                    return in_use(
                        format!("disk image {}", path.display()),
                        "--disk path=IMAGE",
                    );
                }
            }
        }
        Ok(())
    }

    /// Take a VM out of this host whatever its state (a saved or cold reboot holds VMs
    /// aside while the VMM is replaced); [`Host::attach`] puts it back.
    pub fn detach(&mut self, name: &str) -> Option<Arc<Vm>> {
        let idx = self.vms.iter().position(|v| v.name() == name)?;
        Some(self.vms.remove(idx))
    }

    /// Put back a VM [`Host::detach`] took out.
    pub fn attach(&mut self, vm: Arc<Vm>) {
        self.vms.push(vm);
    }

    pub fn find(&self, name: &str) -> Option<Arc<Vm>> {
        self.vms.iter().find(|v| v.name() == name).cloned()
    }

    /// Forget a VM that has ended (or never started). Its RAM is freed once the last
    /// reference to it is dropped.
    pub fn remove(&mut self, name: &str) -> Result<Arc<Vm>, HostError> {
        let idx = self
            .vms
            .iter()
            .position(|v| v.name() == name)
            .ok_or_else(|| HostError::NotFound(name.to_string()))?;
        let state = self.vms[idx].lifecycle();
        if !(state.is_finished() || state == crate::Lifecycle::Created) {
            return Err(HostError::StillRunning(name.to_string()));
        }
        Ok(self.vms.remove(idx))
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
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

    pub fn vms(&self) -> &[Arc<Vm>] {
        &self.vms
    }

    /// Power every VM off (the guests are asked first, then forced after `grace`).
    pub fn stop_all(&self, grace: Duration) {
        std::thread::scope(|s| {
            for vm in &self.vms {
                let vm = vm.clone();
                s.spawn(move || vm.stop(grace));
            }
        });
    }
}
