//! The API's requests and answers: one set of serde types, shared by the daemon's
//! operations ([`crate::ops`]), the HTTP router, the client and the OpenAPI test, so that
//! what is sent, what is read and what the document describes cannot drift apart.
//!
//! Requests are decoded strictly (unknown fields refused, `null` only where the document
//! allows it); a mode is a [`Mode`] from the moment a request is read.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use warmvm_vmm::VmReport;

/// How long the new daemon waits by default for a cold-booted guest to say it is up.
pub const DEFAULT_BOOT_WAIT: Duration = Duration::from_secs(120);
/// Bounds of the boot wait a reboot request may set (`boot_wait_secs`).
pub const BOOT_WAIT_SECS: std::ops::RangeInclusive<u64> = 1..=3600;

/// How to reboot the daemon. Read from its name (`warm`, `saved`, `cold`), refusing any
/// other with [`Mode::UNSUPPORTED`]'s message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Mode {
    Warm,
    Saved,
    Cold,
}

/// A mode name that is none of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("reboot mode {0:?} is not supported: use \"warm\", \"saved\" or \"cold\"")]
pub struct UnsupportedMode(pub String);

impl TryFrom<String> for Mode {
    type Error = UnsupportedMode;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Mode::parse(&s).ok_or(UnsupportedMode(s))
    }
}

impl std::str::FromStr for Mode {
    type Err = UnsupportedMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::parse(s).ok_or_else(|| UnsupportedMode(s.to_string()))
    }
}

impl Mode {
    /// The start of the message that refuses another mode.
    pub const UNSUPPORTED: &'static str = "reboot mode ";

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "warm" => Some(Mode::Warm),
            "saved" => Some(Mode::Saved),
            "cold" => Some(Mode::Cold),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Warm => "warm",
            Mode::Saved => "saved",
            Mode::Cold => "cold",
        }
    }
}

/// How a saved or cold reboot went, as the new daemon reports it (`last_reboot` in
/// `GET /v1/status`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModeReboot {
    pub mode: String,
    pub previous_pid: u32,
    /// From the first guest stopping in the old daemon to the last one back in the new.
    pub host_downtime_us: u64,
    /// Saving (saved) or shutting down (cold) every VM, in the old daemon.
    pub prepare_us: u64,
    /// From the end of that to the new daemon starting to bring the VMs back (starting
    /// the new daemon, handing the socket over, the old daemon exiting).
    pub replace_us: u64,
    /// Restoring (saved) or booting until ready (cold) every VM, in the new daemon.
    pub bring_back_us: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub vms: Vec<ModeRebootVm>,
    /// Brought back by a daemon started after the reboot was interrupted (the new daemon
    /// died before every VM ran again), from the bring-back manifest.
    #[serde(default)]
    pub recovered: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModeRebootVm {
    pub name: String,
    /// From its guest stopping to it running again (saved) or saying it is up (cold).
    pub downtime_us: u64,
    pub prepare_us: u64,
    pub bring_back_us: u64,
    pub bytes: u64,
    /// Why it could not be brought back (its snapshot, if any, is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The body of `PUT /v1/reboot`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RebootRequest {
    /// `warm`: every VM is handed to a new daemon process without stopping; `saved`: every
    /// VM is snapshotted to disk and restored by the new daemon; `cold`: every guest is
    /// powered off and booted again by the new daemon.
    pub mode: Mode,
    /// The new daemon's binary (absolute path); default: this daemon's own binary. When
    /// present it must be a string: `null` is refused, as the document says.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "warmvm_vmm::config::present"
    )]
    pub binary: Option<PathBuf>,
    /// How long starting the new daemon and preparing every VM may take (the guests run
    /// meanwhile); default: the daemon's `--stage-timeout-ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_timeout_ms: Option<u64>,
    /// How long the guests may be frozen before the new daemon is ready; past it the
    /// reboot is aborted and the VMs run on here. Default: the daemon's `--ready-budget-ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_budget_ms: Option<u64>,
    /// Cold reboot: seconds each guest gets to power off before it is forced (default 10).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "warmvm_vmm::config::present"
    )]
    pub grace_secs: Option<u64>,
    /// Cold reboot: seconds the new daemon waits for each guest to say it is up (default
    /// 120); a guest that has not by then is reported with an error in `last_reboot`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "warmvm_vmm::config::present"
    )]
    pub boot_wait_secs: Option<u64>,
}

impl RebootRequest {
    /// A reboot in `mode` with every default.
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            binary: None,
            stage_timeout_ms: None,
            ready_budget_ms: None,
            grace_secs: None,
            boot_wait_secs: None,
        }
    }
}

/// Bounds of the reboot timeouts a request or a flag may set.
pub const STAGE_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 100..=600_000;
pub const READY_BUDGET_MS: std::ops::RangeInclusive<u64> = 10..=60_000;

/// How long a client waits for a warm reboot's answer, at the least: the longest staging
/// the daemon allows plus the longest budget and the time to answer.
pub const REBOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// Seconds a guest gets to power off when `stop` names none.
pub const DEFAULT_STOP_GRACE_SECS: u64 = 10;
/// The longest grace a `stop` may ask for.
pub const MAX_STOP_GRACE_SECS: u64 = 3600;

/// `GET /v1/status`. The CLI may ask an older daemon (during an upgrade): the fields such a
/// daemon lacks are optional, each noted with the commit that added it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DaemonStatus {
    pub version: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub vm_count: usize,
    /// VMs per lifecycle state.
    pub vms_running: usize,
    pub vms_paused: usize,
    pub state_dir: String,
    /// This build (the version, and the build id a packager set). Added by commit c060f0e
    /// (handover format 3): empty from an older daemon.
    #[serde(default)]
    pub build: String,
    /// How this daemon took its VMs over by a warm reboot, if it did. Added by commit
    /// c060f0e (handover format 3).
    #[serde(default)]
    pub last_takeover: Option<TakeoverInfo>,
    /// How the saved or cold reboot that started this daemon went, if one did. Added by
    /// commit 2f09096 (saved and cold reboots).
    #[serde(default)]
    pub last_reboot: Option<ModeReboot>,
    /// What the daemon runs as: uid, gid, groups, capabilities, no_new_privs, seccomp.
    /// Added by commit 27d3235: absent from an older daemon (this one always sends it).
    #[serde(default)]
    pub privileges: Option<crate::running_as::DaemonPrivileges>,
    /// The executable this daemon runs: the path it was started from (what a warm reboot
    /// runs next), version, git commit, and the sha256 of the running image. Added by
    /// commit 853d824: absent from older daemons.
    #[serde(default)]
    pub binary: Option<warmvm_vmm::executable::BinaryInfo>,
    /// A reboot under way in this daemon (or the new daemon bringing a saved or cold
    /// reboot's VMs back), and how far it is. Added by commit c3dc4c5.
    #[serde(default)]
    pub reboot_in_progress: Option<crate::progress::RebootInProgress>,
    /// The daemon's membership in a fleet (`--fleet-etcd`): whether it reaches etcd and
    /// holds its record, since when, and why not. Null when it joins no fleet. Added with
    /// the fleet's membership: absent from older daemons.
    #[serde(default)]
    pub fleet: Option<warmvm_fleet::AgentStatus>,
}

/// How a daemon took its VMs over from the one before it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TakeoverInfo {
    pub previous_pid: Option<u64>,
    pub from_build: String,
    pub to_build: String,
    /// The state format the old daemon wrote and this one read.
    pub state_format: u32,
    /// False when an older build without the commit step handed over.
    pub commit_protocol: bool,
    pub host_blackout_us: u64,
    /// The executables of the daemon before and of this one (absent when an older build
    /// was one of them).
    #[serde(default)]
    pub from_binary: Option<warmvm_vmm::executable::BinaryInfo>,
    #[serde(default)]
    pub to_binary: Option<warmvm_vmm::executable::BinaryInfo>,
}

/// `GET /v1/vms`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmList {
    pub vms: Vec<VmReport>,
}

/// The optional body of `PUT /v1/vms/{name}/stop`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds the guest gets to power off before it is forced (default 10); not `null`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "warmvm_vmm::config::present"
    )]
    pub grace_secs: Option<u64>,
}

/// The body of `PUT /v1/vms/{name}/snapshot`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// An absolute directory on the daemon's host, created if missing; it must not hold a
    /// snapshot already.
    pub dir: PathBuf,
    /// Leave the VM paused after the snapshot instead of letting it run on.
    #[serde(default)]
    pub leave_paused: bool,
}

/// The body of `POST /v1/restore`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The snapshot's directory (absolute).
    pub dir: PathBuf,
    /// The new VM's name; default: the name of the VM the snapshot was taken of.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "warmvm_vmm::config::present"
    )]
    pub name: Option<String>,
    /// Disk images to use instead of those the snapshot recorded, by position (absolute
    /// paths): a copy restored beside its original needs disks of its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<PathBuf>,
    /// TAPs to attach instead of those the snapshot recorded, by position: a copy restored
    /// beside its original needs TAPs of its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taps: Vec<String>,
}

/// The most pre-copy rounds a migration request may allow (`max_rounds`).
pub const MIGRATE_MAX_ROUNDS: u32 = 1000;
/// The longest a migration request may allow (`timeout_secs`): a day.
pub const MIGRATE_MAX_TIMEOUT_SECS: u64 = 86_400;

fn default_downtime_ms() -> u64 {
    300
}
fn default_max_rounds() -> u32 {
    30
}
fn default_migrate_timeout_secs() -> u64 {
    600
}

/// The body of `POST /v1/vms/{name}/migrate`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination daemon's migration listener, `ADDR:PORT` (an IP address: the
    /// destination's certificate must name it).
    pub to: String,
    /// Pre-copy stops once what is left would take at most this long with the VM paused.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Pre-copy rounds after which the migration is cancelled (or, with `force`, the VM
    /// is stopped and copied).
    #[serde(default = "default_max_rounds")]
    pub max_rounds: u32,
    /// Seconds after which the same happens.
    #[serde(default = "default_migrate_timeout_secs")]
    pub timeout_secs: u64,
    /// At the limits, stop and copy instead of cancelling.
    #[serde(default)]
    pub force: bool,
}

impl MigrateRequest {
    /// A request with the defaults.
    pub fn to(to: impl Into<String>) -> Self {
        MigrateRequest {
            to: to.into(),
            downtime_ms: default_downtime_ms(),
            max_rounds: default_max_rounds(),
            timeout_secs: default_migrate_timeout_secs(),
            force: false,
        }
    }
}

/// The answer of `POST /v1/vms/{name}/migrate/resolve`: what became of a VM in doubt.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MigrationResolution {
    pub vm: String,
    /// The destination asked.
    pub to: String,
    /// The migration asked about.
    pub migration_id: String,
    pub resolved: Resolved,
}

/// How a VM in doubt was resolved.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Resolved {
    /// The destination committed and runs it: the copy here was freed.
    RunsThere,
    /// The destination never committed: the VM runs here again.
    ResumedHere,
}

/// The answer of `POST /v1/vms/{name}/migrate`.
pub use warmvm_vmm::migration::{EndReason, MigrationReport, RoundReport};
