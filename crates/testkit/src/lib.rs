//! warmvm's test kit: the scaffolding every integration test and bench that drives real
//! VMs shares, in one place.
//!
//! It owns:
//! - [`Daemon`]: a `warmvm daemon` started in a directory of its own ([`Daemon::builder`],
//!   [`Start`]), waited for (sd_notify `READY=1` or its API answering), its API client and
//!   CLI, the daemons that succeed it across warm reboots ([`Daemon::follow_reboot`],
//!   [`Daemon::settle_and_judge`]), and on drop the end of every process it started or
//!   that succeeded it; [`daemon_command`] and [`refused`] for daemons that must refuse
//!   to start;
//! - [`scratch`]: a test's fresh, short directory;
//! - [`judge`]: the one judge of guest integrity (every VM there, running, every vCPU
//!   verifying on, no mismatch, no register check failure, no crash), with the reference
//!   guests' figures it reads ([`sample`], [`verified`], [`figures`]);
//! - the one KVM gate ([`kvm_available`], [`skip_or_fail`], [`kvm_required`]) honouring
//!   `WARMVM_REQUIRE_KVM=1`;
//! - the network-namespace guard ([`Namespace`], and [`Netns`] with a TAP in it);
//! - the fleet's etcd rig ([`EtcdCluster`]): 1 or 3 members in namespaces of their own
//!   joined by a bridge, optionally mTLS only, with faults (kill, stop, link cut), and its
//!   gate [`etcd_available`];
//! - [`pid_alive`] and [`wait_until`].
//!
//! It must never: be a normal dependency of a crate that ships in the daemon (it is for
//! `[dev-dependencies]` and the bench crate); kill a process that does not name its own
//! test's socket; touch the host's network outside the namespaces it made; use anything
//! but the standard library in `kvm.rs` (`warmvm-vmm` and `warmvm-hypervisor` compile
//! that file in, as they cannot depend on the kit); decide a test's result (it waits and
//! reports; the tests assert).
//!
//! The `warmvm` executable it runs is [`warmvm_binary`] (beside the test or bench
//! executable, where cargo builds it), or one a test names with [`Start::binary`].

mod daemon;
mod etcd;
mod guest;
mod judge;
mod kvm;
pub mod module_graph;
mod netns;
mod process;
mod scratch;

pub use daemon::{
    daemon_command, refused, warmvm_binary, Daemon, Ready, Start, StartError, READY_TIMEOUT,
};
pub use etcd::{etcd_available, ClientTls, EtcdCluster, ETCD, ETCDCTL, HEALTHY_TIMEOUT};
pub use guest::{counter, create, figures, reference_vm, show, verified, verifies_on, BUSY};
pub use judge::{
    advanced_since, every_vcpu_advanced, judge, sample, stalled, Judgement, Outcome, Sample,
    VmFigures,
};
pub use kvm::{kvm_available, kvm_required, skip_or_fail};
pub use netns::{connect_http, enter_netns, http_get, in_netns, ip, Namespace, Netns};
pub use process::{kill_all_naming, pid_alive, pids_naming, wait_until};
pub use scratch::{read, scratch, tar_image};
