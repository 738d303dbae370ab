//! VM configuration: the TOML file of `warmvm run`, and the same schema as JSON for the API.
//! Parsing rejects unknown keys; [`Config::validate`] checks everything that can be checked
//! before any VM is touched, so a bad config changes nothing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
pub use warmvm_devices::virtio::block::CacheMode;

/// Most vCPUs one VM may have (KVM's own limit may be lower).
pub const MAX_VCPUS: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("config file {path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("the config defines no VM (add a [[vm]] table)")]
    NoVms,
    #[error("VM name {0:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -, not starting with . or -")]
    BadName(String),
    #[error("VM name {0:?} is used twice")]
    DuplicateName(String),
    #[error("VM {vm}: memory_mib must be at least {min}")]
    MemoryTooSmall { vm: String, min: u64 },
    #[error("VM {vm}: memory_mib = {mib} exceeds this host's memory ({host_mib} MiB)")]
    MemoryTooLarge { vm: String, mib: u64, host_mib: u64 },
    #[error("VMs need {total_mib} MiB of RAM together, more than this host's {host_mib} MiB")]
    TotalMemoryTooLarge { total_mib: u64, host_mib: u64 },
    #[error("VM {vm}: memory_mib must be even with hugepages = true (2 MiB pages)")]
    HugeMemoryOdd { vm: String },
    #[error("VM {vm}: vcpus must be between 1 and {max}")]
    BadVcpus { vm: String, max: u32 },
    #[error("VM {vm}: kernel {path}: {err}")]
    Kernel {
        vm: String,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("VM {vm}: initrd {path}: {err}")]
    Initrd {
        vm: String,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("VM {vm}: initrd needs a kernel (the built-in reference guest takes none)")]
    InitrdWithoutKernel { vm: String },
    #[error("VM {vm}: boot = \"ring3\" is only for the built-in reference guest; use auto, pvh or linux for a kernel file")]
    Ring3WithKernel { vm: String },
    #[error("VM {vm}: the command line is longer than {max} bytes or contains a NUL")]
    BadCmdline { vm: String, max: usize },
    #[error("VM {vm}: at most {MAX_DISKS} disks")]
    TooManyDisks { vm: String },
    #[error("VM {vm}: disk {path}: {err}")]
    Disk {
        vm: String,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("VM {vm}: disk {path} is listed twice")]
    DuplicateDisk { vm: String, path: PathBuf },
    #[error("VM {vm}: at most {MAX_NETS} network interfaces")]
    TooManyNets { vm: String },
    #[error("VM {vm}: TAP name {tap:?} is invalid: 1-15 characters from A-Z a-z 0-9 . _ -")]
    BadTap { vm: String, tap: String },
    #[error("VM {vm}: a network interface needs exactly one of tap and tap_fd")]
    TapOrFd { vm: String },
    #[error("VM {vm}: tap_fd {fd} is negative")]
    BadTapFd { vm: String, fd: i32 },
    #[error("VM {vm}: MAC {mac:?} is not a unicast address like 02:00:00:00:00:01")]
    BadMac { vm: String, mac: String },
    #[error("VM {vm}: {what} must be a path, not empty")]
    EmptyPath { vm: String, what: &'static str },
    #[error("VM {vm}: {what} {path:?} must be an absolute path")]
    RelativePath {
        vm: String,
        what: &'static str,
        path: PathBuf,
    },
    #[error("config file {file}: state_dir {path:?} must be an absolute path")]
    RelativeStateDir { file: PathBuf, path: PathBuf },
}

/// A host's set of VMs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where each VM's console log goes (`<state_dir>/<vm>/console.log`) unless the VM
    /// says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmConfig>,
    /// The daemon's aging monitor and rejuvenation policy (`warmvm daemon` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aging: Option<crate::aging_config::AgingConfig>,
    /// Whom the daemon runs as once its privileged set-up is done (`warmvm daemon` only;
    /// its `--user`, `--group` and `--keep-caps` flags win).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privileges: Option<PrivilegesConfig>,
    /// The fleet this daemon joins through etcd (`warmvm daemon` only; its `--fleet-etcd`,
    /// `--host-name` and `--fleet-etcd-*` flags win, each over its key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetConfig>,
}

/// `[fleet]`: the etcd cluster and this host's name in it (checked by the daemon).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// `http(s)://HOST:PORT` of each etcd member.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etcd: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_name: Option<String>,
    /// mTLS: the CA of etcd's certificates, and this daemon's client certificate and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_key: Option<PathBuf>,
}

/// `[privileges]`: the uid/gid and capabilities the daemon drops to after opening KVM and
/// its sockets (checked and applied by the daemon, which says what is wrong).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PrivilegesConfig {
    /// A user name or a numeric uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A group name or a numeric gid; default the user's primary group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Capabilities kept after the drop, e.g. `["CAP_NET_ADMIN"]`; default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_caps: Vec<String>,
}

/// How a kernel image is entered.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BootKind {
    /// Reference guest: ring3; ELF with a PVH note: pvh; bzImage or other ELF: linux.
    #[default]
    Auto,
    Ring3,
    Pvh,
    Linux,
}

/// One VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: String,
    pub memory_mib: u64,
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Back RAM with 2 MiB huge pages (the host must have them reserved).
    #[serde(default)]
    pub hugepages: bool,
    /// Kernel image (bzImage, ELF vmlinux, PVH ELF). Omitted: the built-in reference guest.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub boot: BootKind,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub cmdline: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub initrd: Option<PathBuf>,
    /// Console log file; default `<state_dir>/<name>/console.log`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub console_log: Option<PathBuf>,
    /// Also copy the console to the VMM's standard output.
    #[serde(default)]
    pub console_stdout: bool,
    /// Hide CMPXCHG16B from the guest's CPUID (helps Linux under instruction-emulating KVMs).
    #[serde(default)]
    pub hide_cx16: bool,
    /// virtio-blk disks, in the order the guest sees them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces, each on a TAP device of the daemon's network namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
}

/// Most network interfaces one VM may have.
pub const MAX_NETS: usize = 4;

/// A virtio-net interface backed by a TAP device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The TAP's name: created if missing, or a persistent one (`ip tuntap add`) attached.
    /// Exactly one of `tap` and `tap_fd`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub tap: Option<String>,
    /// A TAP the caller opened and hands over: in a daemon's config file, an fd the daemon
    /// inherited; in the API, the position of the fd among those the request passed with
    /// SCM_RIGHTS (0 for the first). Once the VM exists, `tap` holds the TAP's name.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub tap_fd: Option<i32>,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx`; default: derived from the VM's name.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub mac: Option<String>,
}

/// Parse `xx:xx:xx:xx:xx:xx` into a unicast MAC address.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// A locally administered MAC for interface `index` of VM `name`, stable across reboots.
pub fn default_mac(name: &str, index: usize) -> [u8; 6] {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x02, b[0], b[1], b[2], b[3], index as u8]
}

impl NetConfig {
    pub fn mac_for(&self, vm: &str, index: usize) -> [u8; 6] {
        self.mac
            .as_deref()
            .and_then(parse_mac)
            .unwrap_or_else(|| default_mac(vm, index))
    }
}

/// Most disks one VM may have.
pub const MAX_DISKS: usize = 8;

/// A virtio-blk disk backed by a raw image file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// A raw image whose size is a multiple of 512 bytes.
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// `none` (O_DIRECT, the default) or `writeback` (the host's page cache).
    #[serde(default)]
    pub cache: CacheMode,
}

/// An optional field that, when present, must hold a value: JSON `null` is refused (the API's
/// document says string, not nullable). Absent fields take their default as usual.
pub fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

fn one() -> u32 {
    1
}

/// What [`Config::validate`] needs to know about the host.
#[derive(Clone, Copy, Debug)]
pub struct HostLimits {
    pub memory_mib: u64,
    pub max_vcpus: u32,
}

impl HostLimits {
    pub fn probe() -> Self {
        Self {
            memory_mib: warmvm_memory::host_memory_bytes() >> 20,
            max_vcpus: MAX_VCPUS,
        }
    }
}

pub const CMDLINE_MAX: usize = 4095;
/// Smallest RAM a VM can have: the reference guest's image and boot area fit in 4 MiB.
pub const MIN_MEMORY_MIB: u64 = 4;

impl Config {
    /// Read and parse a TOML config file (not yet validated).
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: path.to_path_buf(),
            err,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            msg: one_line(&e.to_string()),
        })?;
        // A relative path would depend on the working directory of whoever runs the
        // config (a daemon's is not the operator's): refused, whatever else is wrong.
        if let Some(dir) = config.state_dir.as_ref().filter(|d| !d.is_absolute()) {
            return Err(ConfigError::RelativeStateDir {
                file: path.to_path_buf(),
                path: dir.clone(),
            });
        }
        for vm in &config.vms {
            vm.validate_paths()?;
        }
        Ok(config)
    }

    /// Check every VM and the whole set against the host.
    pub fn validate(&self, host: HostLimits) -> Result<(), ConfigError> {
        if self.vms.is_empty() {
            return Err(ConfigError::NoVms);
        }
        let mut names = HashSet::new();
        let mut total = 0u64;
        for vm in &self.vms {
            vm.validate(host)?;
            if !names.insert(vm.name.as_str()) {
                return Err(ConfigError::DuplicateName(vm.name.clone()));
            }
            total = total.saturating_add(vm.memory_mib);
        }
        if host.memory_mib > 0 && total > host.memory_mib {
            return Err(ConfigError::TotalMemoryTooLarge {
                total_mib: total,
                host_mib: host.memory_mib,
            });
        }
        Ok(())
    }

    /// The state directory: the config's, or a per-user default.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(default_state_dir)
    }
}

/// Where snapshots, saved reboots and console logs go by default: persistent storage,
/// never a RAM-backed `/run` (a saved reboot writes every VM's RAM there).
/// `/var/lib/warmvm` for root; `$XDG_STATE_HOME/warmvm`, `~/.local/state/warmvm` or
/// `/tmp/warmvm-<uid>` otherwise.
pub fn default_state_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/var/lib/warmvm");
    }
    let abs = |v: Option<std::ffi::OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(dir) = abs(std::env::var_os("XDG_STATE_HOME")) {
        return dir.join("warmvm");
    }
    if let Some(home) = abs(std::env::var_os("HOME")) {
        return home.join(".local/state/warmvm");
    }
    PathBuf::from(format!("/tmp/warmvm-{uid}"))
}

/// Where the API socket goes by default, and what lives only as long as the host is up
/// (the demo's console logs): `/run/warmvm` for root; `$XDG_RUNTIME_DIR/warmvm` or
/// `/tmp/warmvm-<uid>` otherwise.
pub fn default_runtime_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/warmvm");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("warmvm"),
        _ => PathBuf::from(format!("/tmp/warmvm-{uid}")),
    }
}

impl VmConfig {
    /// A reference-guest VM with defaults, as the demo and tests use.
    pub fn reference(name: &str, memory_mib: u64, vcpus: u32) -> Self {
        Self {
            name: name.to_string(),
            memory_mib,
            vcpus,
            hugepages: false,
            kernel: None,
            boot: BootKind::Auto,
            cmdline: None,
            initrd: None,
            console_log: None,
            console_stdout: false,
            hide_cx16: false,
            disks: Vec::new(),
            nets: Vec::new(),
        }
    }

    pub fn validate(&self, host: HostLimits) -> Result<(), ConfigError> {
        validate_name(&self.name)?;
        self.validate_shape(host)?;
        self.validate_paths()?;
        self.validate_files()
    }

    /// This config with any relative path made absolute against this process's working
    /// directory, which is what it was opened against: a VM that a build accepting relative
    /// paths created keeps its files when it is booted again (a cold reboot), now that
    /// [`VmConfig::validate`] refuses them.
    pub fn with_absolute_paths(&self) -> VmConfig {
        let mut c = self.clone();
        let fix = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && !p.is_absolute() {
                if let Ok(abs) = std::path::absolute(&*p) {
                    *p = abs;
                }
            }
        };
        for p in [&mut c.kernel, &mut c.initrd, &mut c.console_log]
            .into_iter()
            .flatten()
        {
            fix(p);
        }
        for d in &mut c.disks {
            fix(&mut d.path);
        }
        c
    }

    /// Every path is absolute: a relative one would be resolved against the working
    /// directory of the daemon, not of whoever wrote it. Not part of
    /// [`VmConfig::validate_shape`]: a VM an older build runs is taken over as it is.
    pub fn validate_paths(&self) -> Result<(), ConfigError> {
        let paths = [
            ("kernel", self.kernel.as_ref()),
            ("initrd", self.initrd.as_ref()),
            ("console_log", self.console_log.as_ref()),
        ]
        .into_iter()
        .chain(self.disks.iter().map(|d| ("disk", Some(&d.path))));
        for (what, path) in paths {
            if let Some(p) = path.filter(|p| !p.as_os_str().is_empty() && !p.is_absolute()) {
                return Err(ConfigError::RelativePath {
                    vm: self.name.clone(),
                    what,
                    path: p.clone(),
                });
            }
        }
        Ok(())
    }

    /// Everything but the files: what a VM handed over by another VMM must satisfy (its
    /// kernel is already in its RAM, so the file need not exist any more).
    pub fn validate_shape(&self, host: HostLimits) -> Result<(), ConfigError> {
        let vm = || self.name.clone();
        // Adopted VMs keep the rule of older versions (a leading `-` was allowed), so that a
        // warm reboot never refuses VMs that are already running.
        if !name_is_safe(&self.name) {
            return Err(ConfigError::BadName(self.name.clone()));
        }
        for (what, path) in [
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
            ("console_log", &self.console_log),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(ConfigError::EmptyPath { vm: vm(), what });
            }
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall {
                vm: vm(),
                min: MIN_MEMORY_MIB,
            });
        }
        if host.memory_mib > 0 && self.memory_mib > host.memory_mib {
            return Err(ConfigError::MemoryTooLarge {
                vm: vm(),
                mib: self.memory_mib,
                host_mib: host.memory_mib,
            });
        }
        if self.hugepages && !self.memory_mib.is_multiple_of(2) {
            return Err(ConfigError::HugeMemoryOdd { vm: vm() });
        }
        let max_vcpus = if self.kernel.is_none() {
            warmvm_abi::MAX_VCPUS as u32
        } else {
            host.max_vcpus.min(MAX_VCPUS)
        };
        if self.vcpus == 0 || self.vcpus > max_vcpus {
            return Err(ConfigError::BadVcpus {
                vm: vm(),
                max: max_vcpus,
            });
        }
        if let Some(cmdline) = &self.cmdline {
            if cmdline.len() > CMDLINE_MAX || cmdline.contains('\0') {
                return Err(ConfigError::BadCmdline {
                    vm: vm(),
                    max: CMDLINE_MAX,
                });
            }
        }
        if self.kernel.is_some() && self.boot == BootKind::Ring3 {
            return Err(ConfigError::Ring3WithKernel { vm: vm() });
        }
        if self.kernel.is_none() && self.initrd.is_some() {
            return Err(ConfigError::InitrdWithoutKernel { vm: vm() });
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks { vm: vm() });
        }
        let mut seen = HashSet::new();
        for d in &self.disks {
            if d.path.as_os_str().is_empty() {
                return Err(ConfigError::EmptyPath {
                    vm: vm(),
                    what: "disk path",
                });
            }
            if !seen.insert(&d.path) {
                return Err(ConfigError::DuplicateDisk {
                    vm: vm(),
                    path: d.path.clone(),
                });
            }
        }
        if self.nets.len() > MAX_NETS {
            return Err(ConfigError::TooManyNets { vm: vm() });
        }
        for n in &self.nets {
            match (&n.tap, n.tap_fd) {
                (Some(tap), None) if !warmvm_devices::virtio::tap::valid_name(tap) => {
                    return Err(ConfigError::BadTap {
                        vm: vm(),
                        tap: tap.clone(),
                    });
                }
                (None, Some(fd)) if fd < 0 => {
                    return Err(ConfigError::BadTapFd { vm: vm(), fd });
                }
                (Some(_), None) | (None, Some(_)) => {}
                _ => return Err(ConfigError::TapOrFd { vm: vm() }),
            }
            if let Some(mac) = &n.mac {
                if parse_mac(mac).is_none() {
                    return Err(ConfigError::BadMac {
                        vm: vm(),
                        mac: mac.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    fn validate_files(&self) -> Result<(), ConfigError> {
        let vm = || self.name.clone();
        if let Some(path) = &self.kernel {
            check_readable_file(path).map_err(|err| ConfigError::Kernel {
                vm: vm(),
                path: path.clone(),
                err,
            })?;
        }
        if let Some(path) = &self.initrd {
            check_readable_file(path).map_err(|err| ConfigError::Initrd {
                vm: vm(),
                path: path.clone(),
                err,
            })?;
        }
        for d in &self.disks {
            check_disk_image(&d.path).map_err(|err| ConfigError::Disk {
                vm: vm(),
                path: d.path.clone(),
                err,
            })?;
        }
        Ok(())
    }
}

/// Names that are safe as a path component and in a URL path.
fn name_is_safe(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('.')
}

/// The rule for a new VM's name, the same in the CLI, the API and config files: 1-64
/// characters from A-Z a-z 0-9 . _ -, not starting with `.` (a hidden or parent directory)
/// nor `-` (a command-line option, so the CLI could not address the VM).
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    if name_is_safe(name) && !name.starts_with('-') {
        Ok(())
    } else {
        Err(ConfigError::BadName(name.to_string()))
    }
}

fn check_readable_file(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() == 0 {
        return Err(std::io::Error::other("the file is empty"));
    }
    std::fs::File::open(path).map(drop)
}

fn check_disk_image(path: &Path) -> std::io::Result<()> {
    check_readable_file(path)?;
    let len = std::fs::metadata(path)?.len();
    if !len.is_multiple_of(512) {
        return Err(std::io::Error::other(format!(
            "its size ({len} bytes) is not a multiple of 512"
        )));
    }
    Ok(())
}

/// toml's errors span several lines with a source excerpt; an operator gets one line.
fn one_line(msg: &str) -> String {
    let mut parts = msg.lines().map(str::trim).filter(|l| {
        !l.is_empty()
            && !l.starts_with('|')
            && !l.chars().next().is_some_and(|c| c.is_ascii_digit())
    });
    let first = parts.next().unwrap_or("invalid TOML").to_string();
    match parts.next() {
        Some(detail) => format!("{first} {detail}"),
        None => first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostLimits = HostLimits {
        memory_mib: 4096,
        max_vcpus: 64,
    };

    fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| one_line(&e.to_string()))
    }

    #[test]
    fn minimal_vm_gets_defaults() {
        let c = parse("[[vm]]\nname = \"a\"\nmemory_mib = 64\n").unwrap();
        assert_eq!(c.vms[0].vcpus, 1);
        assert_eq!(c.vms[0].boot, BootKind::Auto);
        c.validate(HOST).unwrap();
    }

    #[test]
    fn relative_paths_are_refused_in_vms_and_config_files() {
        let check = |toml: &str| parse(toml).unwrap().validate(HOST).unwrap_err().to_string();
        let vm = "[[vm]]\nname=\"a\"\nmemory_mib=64\n";
        for (extra, what) in [
            ("kernel=\"boot/k\"\n", "kernel \"boot/k\""),
            ("kernel=\"/k\"\ninitrd=\"i.img\"\n", "initrd \"i.img\""),
            ("console_log=\"c.log\"\n", "console_log \"c.log\""),
            ("[[vm.disks]]\npath=\"./d.img\"\n", "disk \"./d.img\""),
        ] {
            let e = check(&format!("{vm}{extra}"));
            assert_eq!(e, format!("VM a: {what} must be an absolute path"));
        }
        // A config file: refused as it is read, before anything is checked or created.
        let dir = std::env::temp_dir().join(format!("warmvm-relcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, format!("state_dir = \"state\"\n{vm}")).unwrap();
        let e = Config::from_toml_file(&file).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "config file {}: state_dir \"state\" must be an absolute path",
                file.display()
            )
        );
        std::fs::write(&file, format!("{vm}console_log=\"c.log\"\n")).unwrap();
        let e = Config::from_toml_file(&file).unwrap_err().to_string();
        assert_eq!(e, "VM a: console_log \"c.log\" must be an absolute path");
        let _ = std::fs::remove_dir_all(&dir);
        // A VM an older build created with relative paths is booted again with them
        // resolved where they were opened.
        let old = parse(&format!(
            "{vm}console_log=\"c.log\"\n[[vm.disks]]\npath=\"d.img\"\n"
        ))
        .unwrap()
        .vms
        .remove(0);
        let cwd = std::env::current_dir().unwrap();
        let fixed = old.with_absolute_paths();
        assert_eq!(fixed.console_log, Some(cwd.join("c.log")));
        assert_eq!(fixed.disks[0].path, cwd.join("d.img"));
        fixed.validate_paths().unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected_on_one_line() {
        let e = parse("[[vm]]\nname = \"a\"\nmemory_mib = 64\nmemroy = 1\n").unwrap_err();
        assert!(e.contains("unknown field `memroy`"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn bad_values_are_rejected() {
        let check = |toml: &str| parse(toml).unwrap().validate(HOST).unwrap_err().to_string();
        assert!(check("[[vm]]\nname=\"a\"\nmemory_mib=0\n").contains("at least"));
        assert!(check("[[vm]]\nname=\"a\"\nmemory_mib=9999999\n").contains("exceeds"));
        assert!(check("[[vm]]\nname=\"a b\"\nmemory_mib=64\n").contains("invalid"));
        assert!(check("[[vm]]\nname=\"-dash\"\nmemory_mib=64\n").contains("invalid"));
        assert!(check("[[vm]]\nname=\"a\"\nmemory_mib=64\nkernel=\"\"\n").contains("not empty"));
        assert!(check("[[vm]]\nname=\".dot\"\nmemory_mib=64\n").contains("invalid"));
        let long = "a".repeat(64);
        assert!(validate_name(&long).is_ok());
        assert!(validate_name(&format!("{long}a")).is_err());
        assert!(validate_name("a-b_c.d").is_ok());
        assert!(check("[[vm]]\nname=\"a\"\nmemory_mib=64\nvcpus=0\n").contains("vcpus"));
        assert!(
            check("[[vm]]\nname=\"a\"\nmemory_mib=64\nkernel=\"/nonexistent/k\"\n")
                .contains("/nonexistent/k")
        );
        assert!(
            check("[[vm]]\nname=\"a\"\nmemory_mib=64\n[[vm]]\nname=\"a\"\nmemory_mib=64\n")
                .contains("twice")
        );
        assert!(check("").contains("no VM"));
        assert!(check(
            "[[vm]]\nname=\"a\"\nmemory_mib=64\n[[vm.disks]]\npath=\"/nonexistent/d\"\n"
        )
        .contains("disk /nonexistent/d"));
        let odd = std::env::temp_dir().join(format!("warmvm-odd-{}.img", std::process::id()));
        std::fs::write(&odd, [0u8; 100]).unwrap();
        let e = check(&format!(
            "[[vm]]\nname=\"a\"\nmemory_mib=64\n[[vm.disks]]\npath={odd:?}\n"
        ));
        std::fs::remove_file(&odd).unwrap();
        assert!(e.contains("multiple of 512"), "{e}");
        let e =
            parse("[[vm]]\nname=\"a\"\nmemory_mib=64\n[[vm.disks]]\npath=\"x\"\ncache=\"fast\"\n")
                .unwrap_err();
        assert!(e.contains("unknown variant"), "{e}");
        let net = |extra: &str| {
            check(&format!(
                "[[vm]]\nname=\"a\"\nmemory_mib=64\n[[vm.nets]]\n{extra}\n"
            ))
        };
        assert!(net("tap=\"a/b\"").contains("TAP name"));
        assert!(net("tap=\"tap0\"\nmac=\"01:00:00:00:00:01\"").contains("unicast"));
        assert!(net("tap=\"tap0\"\nmac=\"02:00:00:00:00\"").contains("MAC"));
        assert!(net("tap=\"tap0\"\ntap_fd=3").contains("exactly one of tap and tap_fd"));
        assert!(net("mac=\"02:00:00:00:00:01\"").contains("exactly one of tap and tap_fd"));
        assert!(net("tap_fd=-1").contains("negative"));
        assert_eq!(parse_mac("02:ab:00:00:00:01"), Some([2, 0xab, 0, 0, 0, 1]));
    }
}
