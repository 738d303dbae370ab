//! The warm reboot: hand every VM to a fresh VMM process without copying guest RAM.
//!
//! The old VMM starts the new one with one end of a SOCK_SEQPACKET pair and walks it
//! through these steps (the old side is [`outgoing`], the new side [`incoming`]):
//!
//! 1. **stage** (VMs still running): the old VMM sends each VM's config, layout and CPUID,
//!    with its RAM memfds and console log as fds. The new VMM adopts the memfds (checking
//!    size and seals), creates the KVM VMs, registers memory slots, creates irqchips and
//!    vCPUs, and starts parked vCPU threads. It answers `Prepared`.
//! 2. **quiesce**: the old VMM parks every vCPU of every VM (completing any pending port or
//!    MMIO access, waking vCPUs asleep in the wait port). The blackout starts here.
//! 3. **capture**: every vCPU thread reads its own vCPU's state, in parallel; then VM-wide
//!    state (irqchip, PIT, clock) and device state.
//! 4. **transfer**: the state goes as a checksummed, versioned envelope in a sealed memfd.
//! 5. **restore**: the new VMM checks it, restores VM-wide then vCPU state (in parallel, on
//!    the vCPU threads), advancing TSC and clock by the time the guests were suspended.
//!    It restores every VM before it resumes any, so a failure leaves nothing running.
//! 6. **resume**: the new VMM lets the vCPUs run and reports the blackout; the old VMM
//!    drops its VMs without touching the guests and exits. Tearing down its page tables
//!    (tens of ms per GiB here) happens after the guests run again, not in the blackout.
//!
//! If anything fails before the new VMM has resumed (it refuses the state, dies, hangs past
//! the timeout), the old VMM kills it, waits until it is gone, and resumes its own VMs.

mod channel;
pub mod envelope;
pub mod faults;
pub mod incoming;
pub mod outgoing;
mod priority;
mod state;

pub use incoming::{take_over, Adopted};
pub use outgoing::{warm_reboot, RebootOptions};
pub use state::{PhaseTimes, RebootReport, VmBlackout};

/// The binary of this very process, to rejuvenate with: `/proc/self/exe` works even when
/// the file on disk was replaced or deleted since this process started (a package upgrade),
/// where the path `std::env::current_exe` gives would then name nothing or another build.
pub fn this_binary() -> std::path::PathBuf {
    std::path::PathBuf::from("/proc/self/exe")
}

/// Env var naming a fault for the new VMM to inject (tests only): `refuse-state`,
/// `crash-adopt`, `hang-adopt`, `crash-prepare`.
pub const FAULT_ENV: &str = "WARMVM_HANDOVER_FAULT";

/// Env var (tests only): write the state in this older format, as an older warmvm would.
pub const EMIT_FORMAT_ENV: &str = "WARMVM_HANDOVER_EMIT_FORMAT";

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover I/O failed: {0}")]
    Io(String),
    #[error("cannot encode the handover state: {0}")]
    Encode(String),
    #[error("the handover state is invalid: {0}")]
    BadState(String),
    #[error("incompatible handover state: {0}")]
    Incompatible(String),
    #[error("the other VMM did not answer in time")]
    Timeout,
    #[error("the other VMM closed the channel (it exited or crashed)")]
    PeerGone,
    #[error("the new VMM failed: {0}")]
    NewVmmFailed(String),
    #[error("cannot start the new VMM {binary}: {err}")]
    Spawn { binary: String, err: std::io::Error },
    #[error("VM {vm}: {err}")]
    Vm { vm: String, err: crate::VmError },
    #[error("nothing to hand over: {0}")]
    Refused(String),
}

/// How [`HandoverError::Refused`] and [`HandoverError::Incompatible`] begin when the new VMM
/// reports them to the old one (as text, in [`HandoverError::NewVmmFailed`]).
const REFUSAL_PREFIXES: &[&str] = &["nothing to hand over: ", "incompatible handover state: "];

impl HandoverError {
    /// True if a VMM refused the handover (incompatible state, nothing to hand over), on
    /// either side, rather than failed at it.
    pub fn is_refusal(&self) -> bool {
        match self {
            HandoverError::Refused(_) | HandoverError::Incompatible(_) => true,
            HandoverError::NewVmmFailed(why) => REFUSAL_PREFIXES.iter().any(|p| why.starts_with(p)),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_recognised_across_the_channel() {
        for e in [
            HandoverError::Refused("x".into()),
            HandoverError::Incompatible("x".into()),
        ] {
            assert!(e.is_refusal());
            // As the old VMM gets it from the new one.
            assert!(HandoverError::NewVmmFailed(e.to_string()).is_refusal());
        }
        assert!(!HandoverError::NewVmmFailed("VM a: boom".into()).is_refusal());
        assert!(!HandoverError::PeerGone.is_refusal());
    }
}
