use kvm_ioctls::Error as KvmError;

/// Errors of the KVM layer: one variant per operation, so a failure names what failed. The
/// ioctl's own error is kept as the source (and shown in the message, which the API passes
/// on as one line).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("/dev/kvm does not exist: this host has no KVM (enable virtualisation and load the kvm module)")]
    KvmMissing,
    #[error("no permission to open /dev/kvm: run as root or add this user to the kvm group")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] KvmError),
    #[error("the KVM fd handed over is not a KVM device")]
    NotKvm,
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCapability(&'static str),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(#[source] KvmError),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    SetTssAddr(#[source] KvmError),
    #[error("KVM_SET_USER_MEMORY_REGION (slot {slot}) failed: {err}")]
    SetMemoryRegion {
        slot: u32,
        #[source]
        err: KvmError,
    },
    #[error("KVM_ENABLE_CAP {0} failed: {1}")]
    EnableCap(&'static str, #[source] KvmError),
    #[error("memory slot {0} is not registered")]
    NoSuchSlot(u32),
    #[error("KVM_GET_DIRTY_LOG (slot {slot}) failed: {err}")]
    GetDirtyLog {
        slot: u32,
        #[source]
        err: KvmError,
    },
    #[error("KVM_CLEAR_DIRTY_LOG (slot {slot}) failed: {err}")]
    ClearDirtyLog {
        slot: u32,
        #[source]
        err: KvmError,
    },
    #[error("KVM_CREATE_IRQCHIP failed: {0}")]
    CreateIrqchip(#[source] KvmError),
    #[error("KVM_CREATE_PIT2 failed: {0}")]
    CreatePit(#[source] KvmError),
    #[error("KVM_IRQFD failed: {0}")]
    RegisterIrqfd(#[source] KvmError),
    #[error("KVM_IOEVENTFD at {addr:#x} failed: {err}")]
    RegisterIoevent {
        addr: u64,
        #[source]
        err: KvmError,
    },
    #[error("eventfd failed: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("KVM_CREATE_VCPU {id} failed: {err}")]
    CreateVcpu {
        id: u32,
        #[source]
        err: KvmError,
    },
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    GetSupportedCpuid(#[source] KvmError),
    #[error("KVM_SET_CPUID2 failed: {0}")]
    SetCpuid(#[source] KvmError),
    #[error("KVM_GET_SREGS failed: {0}")]
    GetSregs(#[source] KvmError),
    #[error("KVM_SET_SREGS failed: {0}")]
    SetSregs(#[source] KvmError),
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(#[source] KvmError),
    #[error("KVM_GET_REGS failed: {0}")]
    GetRegs(#[source] KvmError),
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(#[source] KvmError),
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrs(#[source] KvmError),
    #[error("KVM_SET_MSRS wrote {written} of {wanted} MSRs")]
    PartialMsrWrite { written: usize, wanted: usize },
    #[error("KVM_SET_LAPIC failed: {0}")]
    SetLapic(#[source] KvmError),
    #[error("KVM_GET_LAPIC failed: {0}")]
    GetLapic(#[source] KvmError),
    #[error("KVM_GET_TSC_KHZ failed: {0}")]
    GetTscKhz(#[source] KvmError),
    #[error("KVM_RUN failed: {0}")]
    Run(#[source] KvmError),
    #[error("KVM_GET_{0} failed: {1}")]
    GetStateFailed(&'static str, #[source] KvmError),
    #[error("KVM_SET_{0} failed: {1}")]
    SetStateFailed(&'static str, #[source] KvmError),
    #[error("the MSR list does not fit KVM's limits")]
    MsrList,
    #[error("KVM_GET_MSR_INDEX_LIST failed: {0}")]
    MsrIndexList(#[source] KvmError),
    #[error("saved state is invalid: {0}")]
    BadState(&'static str),
    #[error("installing the vCPU kick signal handler failed: {0}")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("sending the kick signal to a vCPU thread failed: {0}")]
    Kick(#[source] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

#[allow(non_snake_case)]
impl Error {
    /// `map_err(Error::GetState("XSAVE"))`: which state a failing KVM_GET_* was for.
    pub(crate) fn GetState(what: &'static str) -> impl Fn(KvmError) -> Error {
        move |e| Error::GetStateFailed(what, e)
    }

    pub(crate) fn SetState(what: &'static str) -> impl Fn(KvmError) -> Error {
        move |e| Error::SetStateFailed(what, e)
    }
}
