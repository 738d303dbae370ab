//! `warmvm daemon`, `warmvm vm ...` and `warmvm status`: the daemon, and the CLI that calls
//! its API. The CLI prints tables for people and the daemon's JSON answer with `--json`:
//! each answer is read as the type the daemon sent it as (`warmvm_api::types` and the
//! VMM's reports), and keeps its JSON for `--json`.

use std::path::Path;
use std::process::ExitCode;

use warmvm_api::client::Answer;
use warmvm_api::running_as::DaemonPrivileges;
use warmvm_api::types::{
    Mode, ModeReboot, ModeRebootVm, RebootRequest, RestoreRequest, SnapshotRequest, TakeoverInfo,
};
use warmvm_api::{Client, ClientError, DaemonOptions};
use warmvm_vmm::status::GuestFigures;
use warmvm_vmm::{Config, DeviceKind, Lifecycle, VmConfig, VmReport};

use crate::args::{ApiArgs, RebootMode, VmCommand, VmFlags};
use crate::failure::{self, Failure, EXIT_BAD_INPUT, EXIT_HOST};
use crate::output;
pub fn daemon(opts: DaemonOptions) -> Result<ExitCode, Failure> {
    match warmvm_api::daemon::run(&opts) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(failure::daemon(e)),
    }
}

pub fn client(api: &ApiArgs) -> Client {
    let socket = api
        .socket
        .clone()
        .unwrap_or_else(warmvm_api::daemon::default_socket);
    Client::new(&socket)
}

pub fn status(api: &ApiArgs) -> Result<ExitCode, Failure> {
    let c = client(api);
    let s = c.typed().status().map_err(failure::api)?;
    if api.json {
        output::print_json(&s.json);
    } else {
        println!(
            "warmvm daemon {}, pid {}, up {}",
            s.version,
            s.pid,
            duration(s.uptime_ms)
        );
        println!(
            "VMs: {} ({} running, {} paused)",
            s.vm_count, s.vms_running, s.vms_paused
        );
        println!("socket: {}", c.socket().display());
        println!("state directory: {}", s.state_dir);
        // An older daemon does not say.
        if let Some(p) = &s.privileges {
            println!("runs as: {}", runs_as(p));
        }
        if let Some(b) = &s.binary {
            println!("binary: {}", output::binary_line(b));
        }
        if let Some(p) = &s.reboot_in_progress {
            println!("reboot in progress: {p}");
        }
        if let Some(t) = &s.last_takeover {
            println!("last takeover: {}", takeover(t));
            output::print_binaries(t.from_binary.as_ref(), t.to_binary.as_ref());
        }
        if let Some(r) = &s.last_reboot {
            println!("last reboot: {}", last_reboot(r));
        }
        if let Some(f) = &s.fleet {
            println!("fleet: {}", crate::fleet::membership_line(f));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `GET /v1/status`'s `privileges` on one line.
fn runs_as(p: &DaemonPrivileges) -> String {
    fn list<T: ToString>(items: &[T]) -> String {
        if items.is_empty() {
            "none".to_string()
        } else {
            items.iter().map(T::to_string).collect::<Vec<_>>().join(" ")
        }
    }
    format!(
        "uid {} gid {}, groups: {}; capabilities: {}; no_new_privs: {}; seccomp: {}",
        p.uid,
        p.gid,
        list(&p.groups),
        list(&p.capabilities),
        if p.no_new_privs { "yes" } else { "no" },
        p.seccomp
    )
}

/// `warmvm reboot`'s flags.
pub struct RebootArgs {
    pub mode: RebootMode,
    pub binary: Option<std::path::PathBuf>,
    pub grace_secs: Option<u64>,
    pub boot_wait_secs: Option<u64>,
    pub stage_timeout_ms: Option<u64>,
    pub timeout: Option<u64>,
}

impl RebootArgs {
    /// How long to wait for the whole reboot unless `--timeout` says: what the daemon's
    /// limits allow it (shutting the guests down, preparing the new daemon, booting the
    /// guests), with a minute to spare; saving RAM to disk has no such bound.
    fn wait(&self) -> std::time::Duration {
        let stage_secs = self
            .stage_timeout_ms
            .unwrap_or(warmvm_vmm::handover::outgoing::DEFAULT_STAGE_TIMEOUT.as_millis() as u64)
            .div_ceil(1000);
        let secs = self.timeout.unwrap_or(match self.mode.name() {
            "warm" => stage_secs + 60,
            "cold" => {
                self.grace_secs
                    .unwrap_or(warmvm_api::state::DEFAULT_STOP_GRACE_SECS)
                    + stage_secs
                    + self
                        .boot_wait_secs
                        .unwrap_or(warmvm_api::modes::DEFAULT_BOOT_WAIT.as_secs())
                    + 60
            }
            _ => 1800,
        });
        std::time::Duration::from_secs(secs)
    }
}

/// `warmvm reboot`: ask the daemon for a reboot, wait for it (for saved and cold, until the
/// new daemon has brought every VM back) and print its report. If the answer is lost (the
/// connection fails, or `--timeout` passes), the daemon's status tells what became of it.
/// `warmvm reboot`: ask the daemon for a reboot, wait for it (for saved and cold, until the
/// new daemon has brought every VM back) and print its report. If the answer is lost (the
/// connection fails, or `--timeout` passes), the daemon's status tells what became of it.
pub fn reboot(args: RebootArgs, api: &ApiArgs) -> Result<ExitCode, Failure> {
    let mode = args.mode.name();
    if args.timeout == Some(0) {
        return Err(Failure::new(
            EXIT_BAD_INPUT,
            "--timeout must be at least 1 second",
        ));
    }
    // The daemon runs elsewhere: a relative path means nothing to it.
    let binary =
        match &args.binary {
            Some(b) if b.is_relative() => Some(std::path::absolute(b).map_err(|e| {
                Failure::new(EXIT_BAD_INPUT, format!("--binary {}: {e}", b.display()))
            })?),
            other => other.clone(),
        };
    let wait = args.wait();
    let started = std::time::Instant::now();
    let left = || wait.saturating_sub(started.elapsed());
    let c = client(api);
    let typed = c.typed();
    let before = typed.status().map_err(failure::api)?;
    let old_pid = before.pid;
    // Saved: show each VM's snapshot growing.
    let progress = if mode == "saved" && !api.json {
        let vms = typed
            .list()
            .map_err(failure::api)?
            .value
            .vms
            .into_iter()
            .filter(|v| matches!(v.lifecycle, Lifecycle::Running | Lifecycle::Paused))
            .map(|v| (v.name, v.ram_resident_mib << 20))
            .collect();
        Some(crate::reboot_progress::SaveProgress::start(
            Path::new(&before.state_dir),
            vms,
        ))
    } else {
        None
    };
    let req = RebootRequest {
        binary,
        grace_secs: args.grace_secs,
        boot_wait_secs: args.boot_wait_secs,
        stage_timeout_ms: args.stage_timeout_ms,
        ..RebootRequest::new(match args.mode {
            RebootMode::Warm => Mode::Warm,
            RebootMode::Saved => Mode::Saved,
            RebootMode::Cold => Mode::Cold,
        })
    };
    let still_under_way = |e: ClientError| match e {
        ClientError::RebootUnderWay { status, .. } => {
            let p = status
                .reboot_in_progress
                .as_ref()
                .map_or_else(|| "-".to_string(), ToString::to_string);
            Failure::new(
                EXIT_HOST,
                format!(
                    "{mode} reboot: still under way after {} s ({p}); it goes on: `warmvm status` shows it",
                    wait.as_secs(),
                ),
            )
        }
        other => Failure::new(
            EXIT_HOST,
            format!("cannot tell how the {mode} reboot ended: {other}"),
        ),
    };
    let (report, after) = match typed.reboot(&req, left()) {
        Ok(r) => {
            let after = typed
                .wait_reboot_done(Some(u64::from(r.new_pid)), left())
                .map_err(still_under_way)?;
            (Some(r), after)
        }
        // The daemon refused the reboot or it failed there: its reason.
        Err(e @ ClientError::Api { .. }) => return Err(failure::api(e)),
        Err(lost) => {
            // The answer never came (the connection failed, or the time ran out): ask the
            // daemon on the socket what became of the reboot.
            tracing::debug!(error = %lost, "the reboot's answer was lost; asking the daemon");
            let after = typed
                .wait_reboot_done(None, left().max(std::time::Duration::from_secs(10)))
                .map_err(still_under_way)?;
            if after.pid == old_pid {
                return Err(Failure::new(
                    EXIT_HOST,
                    format!(
                        "{mode} reboot failed: the daemon (pid {}) runs on with its VMs; its log says why (the answer was lost: {lost})",
                        after.pid
                    ),
                ));
            }
            (None, after)
        }
    };
    drop(progress);
    if mode != "warm" {
        let back = after.value.last_reboot;
        if api.json {
            output::print_json(&serde_json::json!({
                "handover": report.as_ref().map(|r| &r.json),
                "reboot": back,
            }));
        } else {
            let back_report = back.as_ref().ok_or_else(|| {
                Failure::new(
                    EXIT_HOST,
                    "the new daemon's report is malformed: its status has no last_reboot",
                )
            })?;
            output::print_mode_report(back_report);
            if let Some(h) = &report {
                output::print_binaries(h.from_binary.as_ref(), h.to_binary.as_ref());
            }
        }
        let failed = not_back(back.as_ref().map_or(&[], |b| &b.vms));
        if !failed.is_empty() {
            return Err(Failure::new(
                EXIT_HOST,
                format!(
                    "{mode} reboot: not every VM came back: {}",
                    failed.join("; ")
                ),
            ));
        }
        return Ok(ExitCode::SUCCESS);
    }
    match report {
        Some(r) if api.json => output::print_json(&r.json),
        Some(r) => output::print_reboot_report(&r),
        // Only the new daemon's account is left.
        None if api.json => output::print_json(&serde_json::json!({
            "handover": null,
            "takeover": after.last_takeover,
        })),
        None => println!(
            "warm reboot: new daemon pid {}, {} (its answer was lost; from its status)",
            after.pid,
            after
                .last_takeover
                .as_ref()
                .map_or_else(|| "-".to_string(), takeover)
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// The VMs a saved or cold reboot did not bring back, as `name: why`.
fn not_back(vms: &[ModeRebootVm]) -> Vec<String> {
    vms.iter()
        .filter_map(|v| Some(format!("{}: {}", v.name, v.error.as_ref()?)))
        .collect()
}

/// `last_takeover` of `GET /v1/status` on one line.
fn takeover(t: &TakeoverInfo) -> String {
    format!(
        "from pid {} ({} to {}), state format {}, {}, host-wide blackout {:.3} ms",
        t.previous_pid
            .map_or_else(|| "-".to_string(), |p| p.to_string()),
        t.from_build,
        t.to_build,
        t.state_format,
        if t.commit_protocol {
            "with a commit point"
        } else {
            "without a commit point (an older build)"
        },
        t.host_blackout_us as f64 / 1000.0
    )
}

/// `last_reboot` of `GET /v1/status` on one line.
fn last_reboot(r: &ModeReboot) -> String {
    let failed = not_back(&r.vms);
    let mut s = format!(
        "{} reboot from pid {}{}, host-wide downtime {:.1} ms, {} of {} VMs back",
        r.mode,
        r.previous_pid,
        if r.recovered {
            " (recovered after an interruption)"
        } else {
            ""
        },
        r.host_downtime_us as f64 / 1000.0,
        r.vms.len() - failed.len(),
        r.vms.len()
    );
    if !failed.is_empty() {
        s.push_str(&format!("; NOT BACK: {}", failed.join("; ")));
    }
    s
}

pub fn vm(cmd: VmCommand, api: &ApiArgs) -> Result<ExitCode, Failure> {
    match cmd {
        VmCommand::Create { config, flags } => {
            let vm = match config {
                Some(path) if path.as_os_str() == "-" => read_vm_stdin()?,
                Some(path) => read_vm_config(&path)?,
                None => vm_from_flags(flags)?,
            };
            for fd in vm.nets.iter().filter_map(|n| n.tap_fd) {
                // SAFETY: F_GETFD only reads the flags of fd `fd`, if it is open.
                if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                    return Err(Failure::new(
                        EXIT_BAD_INPUT,
                        format!("tap-fd={fd}: this command has no open fd {fd} to pass"),
                    ));
                }
            }
            let r = client(api)
                .typed()
                .create_passing_taps(&vm)
                .map_err(failure::api)?;
            if api.json {
                output::print_json(&r.json);
            } else {
                println!(
                    "{}: created and started ({} MiB, {} vCPU); console log {}",
                    r.name,
                    r.memory_mib,
                    r.vcpus,
                    r.console_log.display()
                );
            }
        }
        VmCommand::List => {
            let r = client(api).typed().list().map_err(failure::api)?;
            if api.json {
                output::print_json(&r.json);
            } else {
                print_list(&r.vms);
            }
        }
        VmCommand::Show { name } => {
            let r = client(api).typed().show(&name).map_err(failure::api)?;
            if api.json {
                output::print_json(&r.json);
            } else {
                print_show(&r);
            }
        }
        VmCommand::Pause { name } => {
            let r = client(api).typed().pause(&name).map_err(failure::api)?;
            done(api, &r, "paused");
        }
        VmCommand::Resume { name } => {
            let r = client(api).typed().resume(&name).map_err(failure::api)?;
            done(api, &r, "resumed");
        }
        VmCommand::Stop { name, grace_secs } => {
            let r = client(api)
                .typed()
                .stop(&name, grace_secs)
                .map_err(failure::api)?;
            done(api, &r, &format!("stopped: {}", state(&r)));
        }
        VmCommand::Delete { name, keep_logs } => {
            let r = client(api)
                .typed()
                .delete(&name, keep_logs)
                .map_err(failure::api)?;
            let what = if keep_logs {
                format!("deleted; console log kept in {}", r.console_log.display())
            } else {
                "deleted, with its state directory".to_string()
            };
            done(api, &r, &what);
        }
        VmCommand::Snapshot {
            name,
            dir,
            leave_paused,
        } => {
            let dir = absolute(&dir)?;
            let req = SnapshotRequest {
                dir: dir.clone(),
                leave_paused,
            };
            let r = client(api)
                .typed()
                .snapshot(&name, &req)
                .map_err(failure::api)?;
            if api.json {
                output::print_json(&r.json);
            } else {
                let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
                let ms = |us: u64| us as f64 / 1000.0;
                println!(
                    "{name}: snapshot in {}: {:.1} MiB of {:.0} MiB RAM written in {:.1} ms ({:.0} MiB/s{}), {}",
                    dir.display(),
                    mib(r.written_bytes),
                    mib(r.ram_bytes),
                    ms(r.ram_us),
                    mib(r.written_bytes) / (ms(r.ram_us) / 1000.0).max(1e-6),
                    if r.direct_io { ", direct I/O" } else { "" },
                    if r.resumed {
                        format!("running again after {:.1} ms", ms(r.downtime_us))
                    } else {
                        "left paused".to_string()
                    }
                );
            }
        }
        VmCommand::Migrate {
            name,
            resolve: true,
            ..
        } => {
            let r = client(api)
                .typed()
                .resolve_migration(&name)
                .map_err(failure::api)?;
            if api.json {
                output::print_json(&r.json);
            } else {
                print!("{}", output::migration_resolution(&r));
            }
        }
        VmCommand::Migrate {
            name,
            to,
            downtime_ms,
            max_rounds,
            timeout,
            force,
            resolve: false,
        } => {
            // clap requires --to without --resolve.
            let to = to.ok_or_else(|| {
                failure::Failure::new(failure::EXIT_BAD_INPUT, "vm migrate needs --to ADDR:PORT")
            })?;
            let req = warmvm_api::types::MigrateRequest {
                to,
                downtime_ms,
                max_rounds,
                timeout_secs: timeout,
                force,
            };
            let r = client(api)
                .typed()
                .migrate(&name, &req)
                .map_err(failure::api)?;
            if api.json {
                output::print_json(&r.json);
            } else {
                print!("{}", output::migration_report(&req.to, &r));
            }
        }
        VmCommand::Restore {
            dir,
            name,
            taps,
            disks,
        } => {
            let dir = absolute(&dir)?;
            let req = RestoreRequest {
                dir: dir.clone(),
                name,
                disks,
                taps,
            };
            let r = client(api).typed().restore(&req).map_err(failure::api)?;
            done(
                api,
                &r,
                &format!("restored from {}: {}", dir.display(), state(&r)),
            );
        }
        VmCommand::Console {
            name,
            lines,
            no_follow,
        } => crate::console::follow(&client(api), &name, lines, !no_follow)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The daemon runs elsewhere: a relative path means nothing to it.
fn absolute(p: &Path) -> Result<std::path::PathBuf, Failure> {
    std::path::absolute(p)
        .map_err(|e| Failure::new(EXIT_BAD_INPUT, format!("{}: {e}", p.display())))
}

fn done(api: &ApiArgs, report: &Answer<VmReport>, what: &str) {
    if api.json {
        output::print_json(&report.json);
    } else {
        println!("{}: {what}", report.name);
    }
}

/// Relative paths mean nothing to the daemon, which runs elsewhere: make them absolute
/// against the directory the CLI runs in.
fn absolute_paths(vm: &mut VmConfig) {
    let disks = vm.disks.iter_mut().map(|d| &mut d.path);
    for p in [&mut vm.kernel, &mut vm.initrd, &mut vm.console_log]
        .into_iter()
        .flatten()
        .chain(disks)
    {
        if p.is_relative() {
            *p = std::path::absolute(&*p).unwrap_or_else(|_| p.clone());
        }
    }
}

/// `vm create --name ... --memory ...`.
fn vm_from_flags(f: VmFlags) -> Result<VmConfig, Failure> {
    let missing = |flag: &str| {
        Failure::new(
            EXIT_BAD_INPUT,
            format!("vm create needs {flag} (or a config file)"),
        )
    };
    let mut vm = VmConfig::reference(
        &f.name.ok_or_else(|| missing("--name"))?,
        f.memory_mib.ok_or_else(|| missing("--memory"))?,
        f.vcpus.unwrap_or(1),
    );
    vm.kernel = f.kernel;
    vm.initrd = f.initrd;
    vm.cmdline = f.cmdline;
    if let Some(b) = f.boot {
        vm.boot = b.into();
    }
    vm.hugepages = f.hugepages;
    vm.console_log = f.console_log;
    vm.disks = f.disks;
    vm.nets = f.nets;
    absolute_paths(&mut vm);
    Ok(vm)
}

/// `vm create -`: one VM as TOML or JSON on standard input.
fn read_vm_stdin() -> Result<VmConfig, Failure> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|e| {
        Failure::new(
            EXIT_BAD_INPUT,
            format!("cannot read a VM config from standard input: {e}"),
        )
    })?;
    // JSON is an object; a TOML document never starts with `{`.
    let json = text.trim_start().starts_with('{');
    parse_vm_config(&text, json, "standard input")
}

/// Read a file holding one VM: TOML with the VM's keys at the top level (or a single
/// `[[vm]]` table, as `warmvm run` takes), or JSON.
fn read_vm_config(path: &Path) -> Result<VmConfig, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::new(
            EXIT_BAD_INPUT,
            format!("cannot read VM config {}: {e}", path.display()),
        )
    })?;
    let json = path.extension().is_some_and(|e| e == "json");
    parse_vm_config(&text, json, &path.display().to_string())
}

fn parse_vm_config(text: &str, json: bool, origin: &str) -> Result<VmConfig, Failure> {
    let bad = |msg: String| {
        Failure::new(
            EXIT_BAD_INPUT,
            format!("VM config {origin}: {}", one_line(&msg)),
        )
    };
    let mut vm: VmConfig = if json {
        serde_json::from_str(text).map_err(|e| bad(e.to_string()))?
    } else {
        match toml::from_str::<VmConfig>(text) {
            Ok(vm) => vm,
            Err(e) => match toml::from_str::<Config>(text) {
                Ok(c) if c.vms.len() == 1 && c.state_dir.is_none() => {
                    c.vms.into_iter().next().unwrap_or_else(|| unreachable!())
                }
                _ => return Err(bad(e.to_string())),
            },
        }
    };
    warmvm_vmm::config::validate_name(&vm.name).map_err(|e| bad(e.to_string()))?;
    absolute_paths(&mut vm);
    Ok(vm)
}

fn one_line(msg: &str) -> String {
    let mut lines = msg.lines().map(str::trim).filter(|l| {
        !l.is_empty() && !l.starts_with('|') && !l.starts_with(|c: char| c.is_ascii_digit())
    });
    let first = lines.next().unwrap_or("invalid").to_string();
    match lines.next() {
        Some(more) => format!("{first} {more}"),
        None => first,
    }
}

/// `running`, `powered-off (exit 0)`, `crashed: reason`.
fn state(r: &VmReport) -> String {
    let s = r.lifecycle.name();
    match &r.lifecycle {
        Lifecycle::PoweredOff { exit_status } => format!("{s} (exit {exit_status})"),
        Lifecycle::Crashed { reason } => format!("{s}: {reason}"),
        _ => s.to_string(),
    }
}

fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{}.{}s", s, (ms % 1000) / 100),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A figure the reference guest reports, or `-` for a guest that reports none.
fn guest_figure(r: &VmReport, figure: impl Fn(&GuestFigures) -> u64) -> String {
    r.guest
        .as_ref()
        .map_or_else(|| "-".to_string(), |g| figure(g).to_string())
}

fn print_list(vms: &[VmReport]) {
    if vms.is_empty() {
        println!("no VMs");
        return;
    }
    let rows = vms
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.lifecycle.name().to_string(),
                r.memory_mib.to_string(),
                r.vcpus.to_string(),
                duration(r.uptime_ms),
                guest_figure(r, |g| g.counter),
                guest_figure(r, |g| g.pages_verified),
                guest_figure(r, |g| g.mismatches),
            ]
        })
        .collect();
    println!(
        "{}",
        output::table(
            &[
                "NAME",
                "STATE",
                "RAM MiB",
                "vCPU",
                "UPTIME",
                "COUNTER",
                "PAGES VERIFIED",
                "MISMATCHES"
            ],
            rows,
            &[2, 3, 4, 5, 6, 7],
        )
    );
}

/// The VM's virtio devices, one line each: where the guest finds it, its host backing,
/// its standing and its counters.
fn print_devices(r: &VmReport) {
    if r.devices.is_empty() {
        return;
    }
    let or_dash = |s: Option<&str>| s.unwrap_or("-").to_string();
    let rows = r
        .devices
        .iter()
        .map(|d| {
            let backing = if d.kind == DeviceKind::VirtioBlk {
                format!(
                    "{}{} cache={}",
                    d.path
                        .as_ref()
                        .map_or_else(|| "-".to_string(), |p| p.display().to_string()),
                    if d.read_only == Some(true) { " ro" } else { "" },
                    or_dash(d.cache.map(|c| c.name()))
                )
            } else {
                format!(
                    "TAP {} mac {}",
                    or_dash(d.tap.as_deref()),
                    or_dash(d.mac.as_deref())
                )
            };
            vec![
                d.name.clone(),
                d.kind.name().to_string(),
                format!("{:#x}", d.mmio_base),
                d.irq.map_or("-".into(), |i| i.to_string()),
                backing,
                d.status.name().to_string(),
                d.requests.to_string(),
                d.failures.to_string(),
            ]
        })
        .collect();
    println!();
    println!(
        "{}",
        output::table(
            &["DEVICE", "KIND", "MMIO", "IRQ", "HOST", "STATUS", "REQUESTS", "FAILURES"],
            rows,
            &[6, 7],
        )
    );
}

/// How long a kernel may run with nothing on its console before `vm show` says so.
const SILENT_HINT_AFTER_MS: u64 = 10_000;

/// A hint for a kernel (not the reference guest, which reports its own figures) that has
/// run for a while without writing a byte to its console: "running" alone says nothing
/// about whether it got anywhere.
fn silent_guest_hint(r: &VmReport, console_bytes: Option<u64>) -> Option<String> {
    if r.lifecycle != Lifecycle::Running
        || r.boot == "ring3"
        || console_bytes != Some(0)
        || r.uptime_ms < SILENT_HINT_AFTER_MS
    {
        return None;
    }
    let exits: u64 = r.exits.iter().map(|e| e.io_exits + e.mmio_exits).sum();
    Some(format!(
        "no console output in {} s of running{}: the kernel may be stuck before its serial console starts, or print elsewhere (its cmdline needs console=ttyS0)",
        r.uptime_ms / 1000,
        if exits == 0 {
            " and no I/O or MMIO exit"
        } else {
            ""
        }
    ))
}

fn print_show(r: &VmReport) {
    let field = |k: &str, v: String| println!("{k:<18} {v}");
    field("name", r.name.clone());
    field("state", state(r));
    field(
        "memory",
        format!("{} MiB ({} MiB resident)", r.memory_mib, r.ram_resident_mib),
    );
    field("vcpus", r.vcpus.to_string());
    field("boot", r.boot.clone());
    field("uptime", duration(r.uptime_ms));
    field("console log", r.console_log.display().to_string());
    // The log is on this host when the daemon is (as `vm console` assumes); else no hint.
    let console_bytes = std::fs::metadata(&r.console_log).ok().map(|m| m.len());
    if let Some(hint) = silent_guest_hint(r, console_bytes) {
        field("hint", hint);
    }
    let u = &r.unknown_accesses;
    field(
        "unknown accesses",
        format!(
            "pio {}r/{}w, mmio {}r/{}w",
            u.pio_reads, u.pio_writes, u.mmio_reads, u.mmio_writes
        ),
    );
    println!();
    let exits = r
        .exits
        .iter()
        .map(|e| {
            [
                u64::from(e.id),
                e.io_exits,
                e.mmio_exits,
                e.other_exits,
                e.kicks,
                e.waits,
                e.wait_ms,
            ]
            .iter()
            .map(u64::to_string)
            .collect()
        })
        .collect();
    println!(
        "{}",
        output::table(
            &[
                "vCPU",
                "IO EXITS",
                "MMIO EXITS",
                "OTHER EXITS",
                "KICKS",
                "WAITS",
                "WAIT ms"
            ],
            exits,
            &[0, 1, 2, 3, 4, 5, 6],
        )
    );
    print_devices(r);
    println!();
    let Some(g) = &r.guest else {
        println!(
            "no reference-guest figures (not the reference guest, or it has not reported yet)"
        );
        return;
    };
    field("pages verified", g.pages_verified.to_string());
    field("mismatches", g.mismatches.to_string());
    field("counter", g.counter.to_string());
    field("min passes", g.min_passes.to_string());
    field("register failures", g.register_check_failures.to_string());
    field("time backwards", g.time_went_backwards.to_string());
    println!();
    let vcpus = g
        .vcpus
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut row = vec![i.to_string(), v.phase.clone()];
            row.extend(
                [
                    v.pages_owned,
                    v.pages_verified,
                    v.mismatches,
                    v.passes,
                    v.counter,
                ]
                .iter()
                .map(u64::to_string),
            );
            row
        })
        .collect();
    println!(
        "{}",
        output::table(
            &[
                "vCPU",
                "PHASE",
                "PAGES OWNED",
                "PAGES VERIFIED",
                "MISMATCHES",
                "PASSES",
                "COUNTER"
            ],
            vcpus,
            &[0, 2, 3, 4, 5, 6],
        )
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn a_kernel_silent_for_a_while_gets_a_hint() {
        let vm = |boot: &str, state: &str, uptime_ms: u64, io: u64| VmReport {
            name: "k".into(),
            lifecycle: match state {
                "running" => Lifecycle::Running,
                _ => Lifecycle::Paused,
            },
            memory_mib: 64,
            vcpus: 1,
            boot: boot.into(),
            uptime_ms,
            console_log: PathBuf::from("/nonexistent/console.log"),
            ram_resident_mib: 1,
            exits: vec![warmvm_vmm::VcpuStats {
                io_exits: io,
                ..Default::default()
            }],
            unknown_accesses: Default::default(),
            devices: Vec::new(),
            guest: None,
        };
        let hint = silent_guest_hint(&vm("linux", "running", 12_000, 0), Some(0)).unwrap();
        assert!(hint.contains("no console output in 12 s"), "{hint}");
        assert!(hint.contains("no I/O or MMIO exit"), "{hint}");
        let hint = silent_guest_hint(&vm("pvh", "running", 12_000, 5), Some(0)).unwrap();
        assert!(!hint.contains("no I/O"), "{hint}");
        // It printed, it has not run long, it is not running, it is the reference guest,
        // or its log is not on this host: no hint.
        assert_eq!(
            silent_guest_hint(&vm("linux", "running", 12_000, 0), Some(1)),
            None
        );
        assert_eq!(
            silent_guest_hint(&vm("linux", "running", 9_000, 0), Some(0)),
            None
        );
        assert_eq!(
            silent_guest_hint(&vm("linux", "paused", 12_000, 0), Some(0)),
            None
        );
        assert_eq!(
            silent_guest_hint(&vm("ring3", "running", 12_000, 0), Some(0)),
            None
        );
        assert_eq!(
            silent_guest_hint(&vm("linux", "running", 12_000, 0), None),
            None
        );
    }

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("warmvm-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn vm_configs_are_read_from_toml_or_json() {
        let t = read_vm_config(&write(
            "a.toml",
            "name = \"a\"\nmemory_mib = 64\nkernel = \"k\"\n",
        ))
        .unwrap();
        assert_eq!(t.name, "a");
        assert!(t.kernel.unwrap().is_absolute());
        let j = read_vm_config(&write("b.json", r#"{"name": "b", "memory_mib": 64}"#)).unwrap();
        assert_eq!(j.memory_mib, 64);
        let one =
            read_vm_config(&write("c.toml", "[[vm]]\nname = \"c\"\nmemory_mib = 64\n")).unwrap();
        assert_eq!(one.name, "c");
        let e = read_vm_config(&write(
            "d.toml",
            "name = \"d\"\nmemory_mib = 64\nbogus = 1\n",
        ))
        .err()
        .unwrap();
        assert!(
            e.message.contains("bogus") && !e.message.contains('\n'),
            "{}",
            e.message
        );
        assert!(read_vm_config(&write(
            "e.json",
            r#"{"name": "e", "memory_mib": 64, "x": 1}"#
        ))
        .is_err());
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(duration(1500), "1.5s");
        assert_eq!(duration(61_000), "1m01s");
        assert_eq!(duration(3_600_000 + 120_000), "1h02m");
    }
}
