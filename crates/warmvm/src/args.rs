//! The `warmvm` command line: every subcommand's arguments and their checks. Parsing only:
//! what each subcommand does is its own module's, reached through [`crate::cli`].

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

pub use warmvm_cli_common::bench_args::{BenchCommand, RebootMode};
use warmvm_cli_common::globals::GlobalArgs;

#[derive(Parser, Debug)]
#[command(
    name = "warmvm",
    version,
    about = "A KVM VMM whose VMs survive a restart of the VMM itself"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per run: the daemon's many flags make its variant large, which costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot the VMs a TOML config file describes and wait until they all power off
    /// (Ctrl-C asks them to power off).
    Run {
        config: PathBuf,
        /// Directory for console logs (default: /var/lib/warmvm as root).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Seconds a guest gets to power off after being asked, before it is forced.
        #[arg(long, default_value_t = 10)]
        grace_secs: u64,
    },
    /// Boot built-in reference-guest VMs, let them verify their memory, and report.
    /// Needs no files.
    Demo(crate::demo::DemoArgs),
    /// Benchmarks that print figures (see docs/benchmarks.md).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// (internal) Write one snapshot for the daemon that started this process, which
    /// passes the RAM and the state over the channel on this fd.
    #[command(hide = true)]
    SnapshotWriter {
        #[arg(long)]
        fd: i32,
        /// The daemon's --seccomp mode, for the writer's own filter.
        #[arg(long, default_value = "true", value_parser = ["true", "false", "log"])]
        seccomp: String,
    },
    /// Run the host daemon: it holds VMs and serves the HTTP/JSON API on a Unix socket
    /// (--socket) until SIGTERM or SIGINT, which power every VM off. See docs/daemon.md.
    Daemon {
        /// Directory for console logs, snapshots of saved reboots and the lock that keeps a
        /// second daemon off [default: /var/lib/warmvm as root, $XDG_STATE_HOME/warmvm,
        /// ~/.local/state/warmvm or /tmp/warmvm-<uid> otherwise].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Also serve GET /metrics on this loopback TCP address, e.g. 127.0.0.1:9464.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// A TOML config (as for `run`) whose VMs are created and started at start-up.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Seconds each guest gets to power off when the daemon stops, before it is forced.
        #[arg(long, default_value_t = 10)]
        stop_grace_secs: u64,
        /// Serve on this inherited, already listening Unix socket instead of binding one
        /// (for a warm reboot's handover).
        #[arg(long, hide = true)]
        listen_fd: Option<i32>,
        /// (internal) Take the VMs over from the daemon that started this one, on this fd.
        #[arg(long, hide = true)]
        takeover_fd: Option<i32>,
        /// Connections served at once on the API socket; more get a 503.
        #[arg(long, default_value_t = warmvm_api::limits::DEFAULT_API_CONNECTIONS)]
        max_connections: usize,
        /// Connections served at once on the metrics port, apart from the API socket's.
        #[arg(long, default_value_t = warmvm_api::limits::DEFAULT_METRICS_CONNECTIONS)]
        max_metrics_connections: usize,
        /// Milliseconds a client has to send its whole request (head and body).
        #[arg(long, default_value_t = warmvm_api::limits::DEFAULT_REQUEST_TIMEOUT_MS)]
        request_timeout_ms: u64,
        /// The longest a warm reboot waits for API requests under way, in milliseconds.
        #[arg(long, default_value_t = warmvm_api::limits::DEFAULT_REBOOT_GRACE_MS)]
        reboot_grace_ms: u64,
        /// A VM's console log is rotated to <log>.1 past this size (so at most twice it on disk).
        #[arg(long, default_value_t = CONSOLE.max_log_bytes)]
        console_log_max_bytes: u64,
        /// Console output a guest may sustain, in bytes per second; more is dropped and counted.
        #[arg(long, default_value_t = CONSOLE.rate_bytes_per_sec)]
        console_rate: u64,
        /// Console output let through at once above the rate, in bytes.
        #[arg(long, default_value_t = CONSOLE.burst_bytes)]
        console_burst: u64,
        /// Seccomp filters per thread kind: true (a forbidden system call kills the daemon),
        /// log (it is logged by the kernel and allowed) or false.
        #[arg(long, env = "WARMVM_SECCOMP", default_value = "true",
              value_parser = ["true", "false", "log"])]
        seccomp: String,
        /// After opening KVM and the sockets, run as this user (name or uid); see
        /// "Least privilege" in docs/daemon.md.
        #[arg(long)]
        user: Option<String>,
        /// ... and this group (name or gid) [default: the user's primary group].
        #[arg(long)]
        group: Option<String>,
        /// Capabilities kept after dropping to --user, e.g. CAP_NET_ADMIN to create TAPs
        /// [default: none].
        #[arg(long, value_delimiter = ',')]
        keep_caps: Vec<String>,
        /// Accept live migrations from other daemons on this address, e.g. 192.0.2.7:7000
        /// (off by default). Needs --migration-cert, --migration-key and --migration-ca.
        #[arg(long, value_name = "ADDR:PORT")]
        migration_listen: Option<std::net::SocketAddr>,
        /// This daemon's certificate (PEM, with its chain), shown to migration peers both
        /// ways; it must name the --migration-listen address (an IP SAN).
        #[arg(long, value_name = "FILE")]
        migration_cert: Option<PathBuf>,
        /// The key of --migration-cert (PEM).
        #[arg(long, value_name = "FILE")]
        migration_key: Option<PathBuf>,
        /// The CA (PEM) whose certificates this daemon trusts for migration peers.
        #[arg(long, value_name = "FILE")]
        migration_ca: Option<PathBuf>,
        /// Migrate over plain TCP, without authentication: only on loopback addresses.
        #[arg(long)]
        migration_insecure: bool,
        /// How long one read or write on a migration stream (in or out) waits for the
        /// peer before the migration fails at this end, 1..=600 seconds [default: 60].
        /// A switchover's pause can last up to about twice this when the peer stalls.
        #[arg(long, value_name = "SECS")]
        migration_io_timeout: Option<u64>,
        /// Join the fleet whose etcd members these are (http(s)://HOST:PORT, comma
        /// separated): the daemon keeps its host record /warmvm/hosts/NAME there under a
        /// lease. Needs --host-name. etcd unreachable is not fatal: the daemon retries.
        #[arg(long, value_name = "URL[,URL...]")]
        fleet_etcd: Option<String>,
        /// This host's name in the fleet (1-63 of a-z, 0-9 and '-').
        #[arg(long, value_name = "NAME")]
        host_name: Option<String>,
        /// The CA (PEM) that signed the etcd members' certificates (https endpoints).
        #[arg(long, value_name = "FILE")]
        fleet_etcd_ca: Option<PathBuf>,
        /// This daemon's client certificate (PEM) for etcd, as clusters with client
        /// authentication require; with --fleet-etcd-key.
        #[arg(long, value_name = "FILE")]
        fleet_etcd_cert: Option<PathBuf>,
        /// The key of --fleet-etcd-cert (PEM).
        #[arg(long, value_name = "FILE")]
        fleet_etcd_key: Option<PathBuf>,
    },
    /// Reboot the daemon: a new daemon process (the binary at the daemon's path, which a new
    /// build installed there upgrades, or --binary)
    /// replaces it and serves on the same socket. warm: it takes over every VM without
    /// stopping it; saved: every VM is snapshotted to disk and restored by it; cold: every
    /// guest powers off and is booted again by it. Prints each VM's downtime and the time
    /// of each phase.
    Reboot {
        /// How to reboot.
        #[arg(long, value_enum)]
        mode: RebootMode,
        /// The new daemon's binary [default: the path the daemon was started from, so a
        /// build installed there since runs next].
        #[arg(long)]
        binary: Option<PathBuf>,
        /// cold: seconds each guest gets to power off before it is forced [default: 10].
        #[arg(long)]
        grace_secs: Option<u64>,
        /// cold: seconds the new daemon waits for each guest to say it is up [default: 120].
        #[arg(long)]
        boot_wait_secs: Option<u64>,
        /// Milliseconds the new daemon may take to start and prepare every VM while the
        /// guests run; past it the reboot fails and the VMs run on [default: the daemon's,
        /// 30000].
        #[arg(long)]
        stage_timeout_ms: Option<u64>,
        /// Seconds to wait for the whole reboot, the VMs of a saved or cold reboot coming
        /// back included [default: warm 90; cold the grace, stage timeout and boot wait plus
        /// 60; saved 1800]. Past it the command says how far the reboot is and exits 3; the
        /// reboot goes on (`warmvm status` shows it).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Manage the daemon's VMs through its API.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Show the daemon's version, pid, uptime and VM count.
    Status,
    /// The fleet of hosts coordinated through etcd: its status, rolling plans, resuming
    /// after a halt (see docs/fleet.md).
    Fleet {
        #[command(subcommand)]
        what: crate::fleet::FleetCommand,
    },
    /// Show the daemon's aging monitor: each resource's trend, slope and estimated time to
    /// exhaustion, the last and the next action, the warm reboots and their reasons; or
    /// hold or release rejuvenation.
    Aging {
        #[command(subcommand)]
        action: Option<AgingAction>,
    },
    /// Print a shell completion script for warmvm on standard output, e.g.
    /// `warmvm completions bash > /etc/bash_completion.d/warmvm`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write warmvm's man pages (warmvm.1, warmvm-vm-create.1, ...) into DIR, e.g.
    /// `warmvm man /usr/local/share/man/man1`.
    Man {
        /// The directory to write to (created if missing).
        dir: PathBuf,
    },
}

const CONSOLE: warmvm_vmm::devices::ConsoleLimits = warmvm_vmm::devices::console::DEFAULT_LIMITS;

/// How the CLI reaches the daemon: the global options.
#[derive(Debug, Clone)]
pub struct ApiArgs {
    pub socket: Option<PathBuf>,
    pub json: bool,
}

/// A VM name as an argument: checked by the rule VM creation applies, before anything is
/// sent to the daemon.
fn vm_name(s: &str) -> Result<String, String> {
    warmvm_vmm::config::validate_name(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

/// `vm restore --net tap=NAME`.
fn tap_override(s: &str) -> Result<String, String> {
    let name = s
        .strip_prefix("tap=")
        .ok_or_else(|| format!("expected tap=NAME, not {s:?}"))?;
    if !warmvm_vmm::devices::virtio::tap::valid_name(name) {
        return Err(format!(
            "TAP name {name:?} is invalid: 1-15 characters from A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(name.to_string())
}

/// `vm restore --disk path=PATH` (made absolute: the daemon runs elsewhere).
fn disk_override(s: &str) -> Result<PathBuf, String> {
    let path = s
        .strip_prefix("path=")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| format!("expected path=PATH, not {s:?}"))?;
    std::path::absolute(path).map_err(|e| format!("{path}: {e}"))
}

/// `vm create`'s inline VM definition (used when no file is given).
#[derive(clap::Args, Debug, Default)]
pub struct VmFlags {
    /// The VM's name (1-64 of A-Z a-z 0-9 . _ -, not starting with . or -).
    #[arg(long, value_parser = vm_name, required_unless_present = "config")]
    pub name: Option<String>,
    /// Guest RAM in MiB.
    #[arg(
        long = "memory",
        value_name = "MIB",
        required_unless_present = "config"
    )]
    pub memory_mib: Option<u64>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Kernel image (bzImage, ELF vmlinux, PVH ELF) [default: the built-in reference guest].
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (needs --kernel).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel (or reference guest) command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Boot protocol.
    #[arg(long, value_enum)]
    pub boot: Option<BootArg>,
    /// Back guest RAM with 2 MiB huge pages (the host must have them reserved).
    #[arg(long)]
    pub hugepages: bool,
    /// Console log file [default: <state dir>/<name>/console.log].
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// A virtio-blk disk: a raw image, optionally `,ro` and `,cache=none|writeback`
    /// (default none: O_DIRECT). Repeat for more disks.
    #[arg(long = "disk", value_name = "PATH[,ro][,cache=MODE]", value_parser = disk_arg)]
    pub disks: Vec<warmvm_vmm::config::DiskConfig>,
    /// A virtio-net interface on TAP device NAME (created, or a persistent one attached),
    /// or on a TAP this command has open as fd N (`tap-fd=N`: the fd is passed to the
    /// daemon), optionally `,mac=xx:xx:xx:xx:xx:xx`. Repeat for more interfaces.
    #[arg(long = "net", value_name = "TAP|tap-fd=N[,mac=MAC]", value_parser = net_arg)]
    pub nets: Vec<warmvm_vmm::config::NetConfig>,
}

/// `--net TAP|tap-fd=N[,mac=xx:xx:xx:xx:xx:xx]`.
fn net_arg(s: &str) -> Result<warmvm_vmm::config::NetConfig, String> {
    let mut parts = s.split(',');
    let tap = parts
        .next()
        .filter(|t| !t.is_empty())
        .ok_or("no TAP name")?;
    let mut net = warmvm_vmm::config::NetConfig {
        tap: Some(tap.to_string()),
        tap_fd: None,
        mac: None,
    };
    if let Some(fd) = tap.strip_prefix("tap-fd=") {
        let fd: i32 = fd
            .parse()
            .ok()
            .filter(|&fd| fd > 2)
            .ok_or_else(|| format!("tap-fd={fd}: not an fd number above 2"))?;
        net.tap = None;
        net.tap_fd = Some(fd);
    }
    for opt in parts {
        match opt.strip_prefix("mac=") {
            Some(mac) if warmvm_vmm::config::parse_mac(mac).is_some() => {
                net.mac = Some(mac.to_string())
            }
            _ => {
                return Err(format!(
                    "bad network option {opt:?} (use mac=02:xx:xx:xx:xx:xx)"
                ))
            }
        }
    }
    Ok(net)
}

/// `--disk PATH[,ro][,cache=none|writeback]`.
fn disk_arg(s: &str) -> Result<warmvm_vmm::config::DiskConfig, String> {
    use warmvm_vmm::config::{CacheMode, DiskConfig};
    let mut parts = s.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("no image path")?;
    let mut disk = DiskConfig {
        path: path.into(),
        read_only: false,
        cache: CacheMode::None,
    };
    for opt in parts {
        match opt {
            "ro" => disk.read_only = true,
            "cache=none" => disk.cache = CacheMode::None,
            "cache=writeback" => disk.cache = CacheMode::Writeback,
            other => {
                return Err(format!(
                    "unknown disk option {other:?} (use ro, cache=none or cache=writeback)"
                ))
            }
        }
    }
    Ok(disk)
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BootArg {
    Auto,
    Ring3,
    Pvh,
    Linux,
}

impl From<BootArg> for warmvm_vmm::config::BootKind {
    fn from(b: BootArg) -> Self {
        match b {
            BootArg::Auto => Self::Auto,
            BootArg::Ring3 => Self::Ring3,
            BootArg::Pvh => Self::Pvh,
            BootArg::Linux => Self::Linux,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Create a VM and start it: from inline flags (--name, --memory, ...), from a file
    /// holding one VM's config (TOML with the VM's keys at the top level, or .json), or from
    /// standard input with `-` (TOML or JSON).
    Create {
        /// The VM's config file, or `-` for standard input.
        #[arg(conflicts_with_all = ["name", "memory_mib", "vcpus", "kernel", "initrd", "cmdline", "boot", "hugepages", "console_log", "disks", "nets"])]
        config: Option<PathBuf>,
        #[command(flatten)]
        flags: VmFlags,
    },
    /// List the daemon's VMs.
    List,
    /// Show one VM: state, RAM, vCPUs, uptime, exits, the reference guest's figures.
    Show {
        #[arg(value_parser = vm_name)]
        name: String,
    },
    /// Pause a running VM (every vCPU stops between two instructions).
    Pause {
        #[arg(value_parser = vm_name)]
        name: String,
    },
    /// Resume a paused VM.
    Resume {
        #[arg(value_parser = vm_name)]
        name: String,
    },
    /// Ask a VM's guest to power off, and force it off after the grace period.
    Stop {
        #[arg(value_parser = vm_name)]
        name: String,
        /// Seconds the guest gets before it is forced off.
        #[arg(long)]
        grace_secs: Option<u64>,
    },
    /// Delete a VM that is not running (stop it first), and its state directory with its
    /// console log.
    Delete {
        #[arg(value_parser = vm_name)]
        name: String,
        /// Keep the VM's state directory (its console log).
        #[arg(long)]
        keep_logs: bool,
    },
    /// Snapshot a running or paused VM into DIR on the daemon's host: its RAM and its
    /// vCPU, VM and device state, synced. The VM runs on afterwards unless --leave-paused.
    Snapshot {
        #[arg(value_parser = vm_name)]
        name: String,
        /// The directory (created if missing; it must not hold a snapshot).
        dir: PathBuf,
        /// Leave the VM paused afterwards.
        #[arg(long)]
        leave_paused: bool,
    },
    /// Move a running VM to another warmvm daemon while it runs (live migration): pre-copy
    /// of its RAM, then a short pause. On success it runs there and is gone from here; on
    /// a failure it runs on here. Prints the report (total time, the pause and its parts,
    /// rounds, bytes, how it ended). With --resolve, settles a VM left paused and in doubt
    /// by a migration whose stream broke after the commit: the destination it went to is
    /// asked whether it runs the VM; yes frees the copy here, no resumes it here, no answer
    /// leaves it paused.
    Migrate {
        #[arg(value_parser = vm_name)]
        name: String,
        /// The destination daemon's migration listener, ADDR:PORT (its --migration-listen).
        #[arg(long, value_name = "ADDR:PORT", required_unless_present = "resolve")]
        to: Option<String>,
        /// Resolve the VM in doubt instead of migrating it (the destination is the one it
        /// was migrating to).
        #[arg(long, conflicts_with_all = ["to", "force"])]
        resolve: bool,
        /// The pause the switchover may take, in milliseconds: pre-copy goes on until what
        /// is left fits it.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u64,
        /// Pre-copy rounds after which the migration is cancelled (or forced).
        #[arg(long, default_value_t = 30)]
        max_rounds: u32,
        /// Seconds after which the migration is cancelled (or forced).
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        timeout: u64,
        /// At the limits, pause the VM and copy what is left instead of cancelling.
        #[arg(long)]
        force: bool,
    },
    /// Create a VM from the snapshot in DIR and let it run as it was.
    Restore {
        dir: PathBuf,
        /// The new VM's name [default: the snapshotted VM's].
        #[arg(long, value_parser = vm_name)]
        name: Option<String>,
        /// Attach TAP NAME instead of the one the snapshot recorded, for interfaces in
        /// order (repeat for more): a copy beside its original needs its own.
        #[arg(long = "net", value_name = "tap=NAME", value_parser = tap_override)]
        taps: Vec<String>,
        /// Serve disk image PATH instead of the one the snapshot recorded, for disks in
        /// order (repeat for more): a copy beside its original needs its own.
        #[arg(long = "disk", value_name = "path=PATH", value_parser = disk_override)]
        disks: Vec<PathBuf>,
    },
    /// Print a VM's console log and follow it live until the VM ends (or Ctrl-C).
    Console {
        #[arg(value_parser = vm_name)]
        name: String,
        /// Start with the last N lines of the log [default: all of it].
        #[arg(long, short = 'n', value_name = "N")]
        lines: Option<usize>,
        /// Print what the log holds and exit, without following it.
        #[arg(long)]
        no_follow: bool,
    },
}

#[derive(clap::Subcommand, Debug, Clone, Copy)]
pub enum AgingAction {
    /// Put rejuvenation on hold: triggers are recorded as skipped until `release`.
    Hold,
    /// Lift the hold.
    Release,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrate_needs_to_unless_it_resolves_and_resolve_takes_no_migration_flags() {
        use clap::Parser;
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["warmvm", "vm", "migrate"].iter().chain(args))
                .map_err(|e| e.kind())
        };
        assert!(parse(&["--resolve", "web-1"]).is_ok());
        assert!(parse(&["web-1", "--to", "192.0.2.8:7000"]).is_ok());
        assert_eq!(
            parse(&["web-1"]).unwrap_err(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        for both in [
            &["--resolve", "web-1", "--to", "192.0.2.8:7000"][..],
            &["--resolve", "web-1", "--force"],
        ] {
            assert_eq!(
                parse(both).unwrap_err(),
                clap::error::ErrorKind::ArgumentConflict,
                "{both:?}"
            );
        }
    }

    #[test]
    fn the_fleet_group_takes_its_etcd_flags_and_json() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "warmvm",
            "fleet",
            "status",
            "--etcd",
            "https://a:1",
            "--etcd-ca",
            "/ca",
            "--json",
        ])
        .unwrap();
        assert!(cli.global.json);
        let Command::Fleet {
            what: crate::fleet::FleetCommand::Status { etcd, events },
        } = cli.command
        else {
            panic!("not fleet status");
        };
        assert_eq!(events, None, "no events unless asked");
        assert_eq!(etcd.etcd, "https://a:1");
        assert_eq!(etcd.etcd_ca.as_deref(), Some(std::path::Path::new("/ca")));
        // --events alone means the last 20; --events N the last N.
        for (extra, want) in [
            (vec!["--events"], Some(20)),
            (vec!["--events", "5"], Some(5)),
        ] {
            let mut args = vec!["warmvm", "fleet", "status", "--etcd", "http://a:1"];
            args.extend(extra);
            let Command::Fleet {
                what: crate::fleet::FleetCommand::Status { events, .. },
            } = Cli::try_parse_from(args).unwrap().command
            else {
                panic!("not fleet status");
            };
            assert_eq!(events, want);
        }
        // --etcd is required.
        assert!(Cli::try_parse_from(["warmvm", "fleet", "status"]).is_err());
        let daemon = Cli::try_parse_from([
            "warmvm",
            "daemon",
            "--fleet-etcd",
            "http://a:1",
            "--host-name",
            "h1",
        ])
        .unwrap();
        assert!(matches!(
            daemon.command,
            Command::Daemon {
                fleet_etcd: Some(_),
                host_name: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn restore_overrides_are_checked_before_any_request() {
        assert_eq!(tap_override("tap=wvtap1").unwrap(), "wvtap1");
        assert!(tap_override("wvtap1").unwrap_err().contains("tap=NAME"));
        assert!(tap_override("tap=a/b").unwrap_err().contains("invalid"));
        assert!(tap_override("tap=").unwrap_err().contains("invalid"));
        assert_eq!(
            disk_override("path=/x/d.img").unwrap(),
            PathBuf::from("/x/d.img")
        );
        assert!(disk_override("path=rel.img").unwrap().is_absolute());
        assert!(disk_override("path=").is_err());
        assert!(disk_override("/x/d.img").unwrap_err().contains("path=PATH"));
    }
}
