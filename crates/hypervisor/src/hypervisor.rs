use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::fs::FileTypeExt;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

use crate::{Error, Result, Vm};

/// An open `/dev/kvm` with the capabilities warmvm relies on checked once.
pub struct Hypervisor {
    kvm: Kvm,
    supported_cpuid: CpuId,
    vcpu_mmap_size: usize,
}

impl Hypervisor {
    /// The KVM device [`Hypervisor::open`] opens: `/dev/kvm`, or `WARMVM_KVM_DEVICE`.
    pub fn device_path() -> std::path::PathBuf {
        std::env::var_os("WARMVM_KVM_DEVICE")
            .unwrap_or_else(|| "/dev/kvm".into())
            .into()
    }

    /// Open `/dev/kvm` (or the device named by `WARMVM_KVM_DEVICE`) and check what warmvm
    /// needs. The errors tell an operator what to fix.
    pub fn open() -> Result<Self> {
        let path = Self::device_path();
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::KvmOpen(kvm_ioctls::Error::new(libc::EINVAL)))?;
        let kvm = Kvm::new_with_path(cpath.as_c_str()).map_err(|e| match e.errno() {
            libc::ENOENT | libc::ENXIO | libc::ENODEV => Error::KvmMissing,
            libc::EACCES | libc::EPERM => Error::KvmPermission,
            _ => Error::KvmOpen(e),
        })?;
        Self::checked(kvm)
    }

    /// Adopt a KVM device fd another process opened (the previous daemon of a warm
    /// reboot, which hands its own over so that this process need not be allowed to open
    /// `/dev/kvm`). Anything but a character device that answers as KVM API 12 with the
    /// capabilities [`Hypervisor::open`] checks is refused.
    pub fn from_file(file: std::fs::File) -> Result<Self> {
        let is_char = file
            .metadata()
            .map(|m| m.file_type().is_char_device())
            .unwrap_or(false);
        if !is_char {
            return Err(Error::NotKvm);
        }
        // SAFETY: `file` is an open fd we own; `Kvm` takes it over and closes it.
        let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
        match Self::checked(kvm) {
            Err(Error::KvmApiVersion(_)) => Err(Error::NotKvm),
            other => other,
        }
    }

    /// A second handle on the same KVM device (its fd duplicated), for a thread that
    /// creates VMs while the first handle's owner is busy (the migration receiver beside
    /// the daemon's Host).
    pub fn try_clone(&self) -> Result<Self> {
        // SAFETY: the fd is `self.kvm`'s and stays open while it is borrowed here.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.kvm.as_raw_fd()) };
        let owned = fd.try_clone_to_owned().map_err(|e| {
            Error::KvmOpen(kvm_ioctls::Error::new(
                e.raw_os_error().unwrap_or(libc::EBADF),
            ))
        })?;
        Self::from_file(std::fs::File::from(owned))
    }

    /// Check what warmvm needs of an open KVM device and read what it offers.
    fn checked(kvm: Kvm) -> Result<Self> {
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(Error::KvmApiVersion(version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCapability(name));
            }
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::GetSupportedCpuid)?;
        let vcpu_mmap_size = kvm
            .get_vcpu_mmap_size()
            .map_err(|e| Error::CreateVcpu { id: 0, err: e })?;
        let msr_list = kvm.get_msr_index_list().map_err(Error::MsrIndexList)?;
        crate::state::init_saveable_msrs(msr_list.as_slice().to_vec());
        Ok(Self {
            kvm,
            supported_cpuid,
            vcpu_mmap_size,
        })
    }

    /// Create an empty VM. Memory slots should be added before [`Vm::create_irqchip`]:
    /// on some KVMs (PVM) each slot costs 5-8 ms once an in-kernel irqchip exists.
    pub fn create_vm(&self) -> Result<Vm> {
        let fd = self.kvm.create_vm().map_err(Error::CreateVm)?;
        Ok(Vm::new(
            fd,
            self.supported_cpuid.clone(),
            self.max_memslots(),
        ))
    }

    /// The CPUID KVM can offer a guest.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Whether the host CPU (as KVM exposes it) has RDFSBASE/WRFSBASE.
    pub fn has_fsgsbase(&self) -> bool {
        self.supported_cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == 7 && e.index == 0 && e.ebx & 1 != 0)
    }

    pub fn max_memslots(&self) -> usize {
        self.kvm.get_nr_memslots()
    }

    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    pub fn vcpu_mmap_size(&self) -> usize {
        self.vcpu_mmap_size
    }

    pub fn raw_fd(&self) -> i32 {
        self.kvm.as_raw_fd()
    }
}

// The test kit's KVM gate (crates/testkit), compiled in: the kit depends on this crate.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../../testkit/src/kvm.rs"]
pub(crate) mod kvm;

#[cfg(test)]
mod tests {
    use super::*;

    fn open_rw(path: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn only_a_kvm_device_is_adopted() {
        // A regular file, and a character device that does not answer as KVM.
        for file in [
            std::fs::File::open("/proc/self/status").unwrap(),
            open_rw("/dev/null"),
        ] {
            assert!(matches!(Hypervisor::from_file(file), Err(Error::NotKvm)));
        }
        // Without KVM only the refusals are tried, unless KVM is required (CI).
        if super::kvm::kvm_available("only_a_kvm_device_is_adopted") {
            let hv = Hypervisor::from_file(open_rw("/dev/kvm")).unwrap();
            assert!(hv.vcpu_mmap_size() > 0);
            hv.create_vm().unwrap();
        }
    }
}
