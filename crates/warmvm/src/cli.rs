//! Dispatch: each parsed subcommand to the module that does it.

use std::process::ExitCode;

use warmvm_cli_common::globals::LogFormat;

use crate::args::*;
use crate::failure::*;

pub fn init_logging(cli: &Cli) {
    // The daemon's log is its operators' record of what happened to each VM.
    let default = match cli.command {
        Command::Daemon { .. } => "info",
        _ => "warn",
    };
    warmvm_cli_common::globals::init_logging(&cli.global, default);
}

/// The global flags again, for a daemon started by a warm reboot.
fn global_args(cli: &Cli) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    if let Some(level) = &cli.global.log_level {
        args.extend(["--log-level".into(), level.into()]);
    }
    let format = match cli.global.log_format {
        LogFormat::Human => "human",
        LogFormat::Json => "json",
    };
    args.extend(["--log-format".into(), format.into()]);
    args
}

/// For the commands that only print what the daemon answered: end quietly, as other Unix
/// tools do, when the reader of stdout has gone (`warmvm status | head -1`), instead of
/// panicking in `println!` on EPIPE. Not for the daemon, benches or reboots, which must see
/// EPIPE as an error and go on, nor for the fleet commands: their etcd connection is a
/// socket too, and a member closing it (a client without a certificate) must be an error,
/// not a silent death by SIGPIPE.
fn quiet_on_closed_stdout() {
    // SAFETY: restoring the default disposition of SIGPIPE installs no handler and touches
    // no memory; this process is a short-lived client with a single thread here.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

pub fn dispatch(cli: Cli) -> Result<ExitCode, Failure> {
    if matches!(
        cli.command,
        Command::Vm(_) | Command::Status | Command::Aging { .. } | Command::Completions { .. }
    ) {
        quiet_on_closed_stdout();
    }
    let successor_args = global_args(&cli);
    let api = ApiArgs {
        socket: cli.global.socket,
        json: cli.global.json,
    };
    match cli.command {
        Command::Run {
            config,
            state_dir,
            grace_secs,
        } => crate::run::run(&config, api.json, state_dir, grace_secs),
        Command::SnapshotWriter { fd, seccomp } => {
            let mode = warmvm_sandbox::Mode::parse(&seccomp)
                .map_err(|e| Failure::new(EXIT_BAD_INPUT, e.to_string()))?;
            warmvm_vmm::snapshot::writer::serve(fd, mode)
                .map_err(|e| Failure::new(EXIT_HOST, e.to_string()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { .. } => crate::external::bench(),
        Command::Demo(mut args) => {
            args.json = api.json;
            crate::demo::demo(&args)
        }
        Command::Daemon {
            state_dir,
            metrics_addr,
            config,
            stop_grace_secs,
            listen_fd,
            takeover_fd,
            max_connections,
            max_metrics_connections,
            request_timeout_ms,
            reboot_grace_ms,
            console_log_max_bytes,
            console_rate,
            console_burst,
            seccomp,
            user,
            group,
            keep_caps,
            migration_listen,
            migration_cert,
            migration_key,
            migration_ca,
            migration_insecure,
            migration_io_timeout,
            fleet_etcd,
            host_name,
            fleet_etcd_ca,
            fleet_etcd_cert,
            fleet_etcd_key,
        } => crate::client::daemon(warmvm_api::DaemonOptions {
            socket: api.socket,
            state_dir,
            metrics_addr,
            config,
            listen_fd,
            stop_grace: std::time::Duration::from_secs(stop_grace_secs),
            takeover_fd,
            successor_args,
            limits: warmvm_api::Limits {
                api_connections: max_connections,
                metrics_connections: max_metrics_connections,
                request_timeout_ms,
                reboot_grace_ms,
            },
            console: warmvm_vmm::devices::ConsoleLimits {
                max_log_bytes: console_log_max_bytes,
                rate_bytes_per_sec: console_rate,
                burst_bytes: console_burst,
            },
            seccomp: warmvm_sandbox::Mode::parse(&seccomp)
                .map_err(|e| Failure::new(EXIT_BAD_INPUT, e.to_string()))?,
            privileges: Some(warmvm_vmm::PrivilegesConfig {
                user,
                group,
                keep_caps,
            }),
            migration: warmvm_api::migration::MigrationOptions {
                listen: migration_listen,
                cert: migration_cert,
                key: migration_key,
                ca: migration_ca,
                insecure: migration_insecure,
                io_timeout_secs: migration_io_timeout,
            },
            fleet: warmvm_api::fleet::FleetOptions {
                etcd: fleet_etcd,
                host_name,
                etcd_ca: fleet_etcd_ca,
                etcd_cert: fleet_etcd_cert,
                etcd_key: fleet_etcd_key,
            },
            ..Default::default()
        }),
        Command::Reboot {
            mode,
            binary,
            grace_secs,
            boot_wait_secs,
            stage_timeout_ms,
            timeout,
        } => crate::client::reboot(
            crate::client::RebootArgs {
                mode,
                binary,
                grace_secs,
                boot_wait_secs,
                stage_timeout_ms,
                timeout,
            },
            &api,
        ),
        Command::Vm(cmd) => crate::client::vm(cmd, &api),
        Command::Status => crate::client::status(&api),
        Command::Fleet { what } => crate::fleet::fleet(what, api.json),
        Command::Aging { action } => crate::aging::aging(action, &api),
        Command::Completions { shell } => {
            let mut cmd = without_hidden(&<Cli as clap::CommandFactory>::command());
            clap_complete::generate(shell, &mut cmd, "warmvm", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => crate::manpages::write(&dir),
    }
}

/// `cmd` without its hidden subcommands and arguments (the internal `snapshot-writer`,
/// `daemon --takeover-fd`, ...), recursively. Help and man pages leave them out already;
/// clap_complete's generators offer them, so completions are generated from this copy.
/// It is made before clap builds `cmd`, so the help subcommand and flags and the global
/// arguments are added to it as to the original.
fn without_hidden(cmd: &clap::Command) -> clap::Command {
    let mut out = clap::Command::new(cmd.get_name().to_string());
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    if let Some(version) = cmd.get_version() {
        out = out.version(version.to_string());
    }
    for alias in cmd.get_visible_aliases() {
        out = out.visible_alias(alias.to_string());
    }
    for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        out = out.arg(arg.clone());
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        out = out.subcommand(without_hidden(sub));
    }
    out
}

#[cfg(test)]
mod restore_override_tests {
    use super::*;

    #[test]
    fn completions_leave_the_internal_commands_and_flags_out() {
        use clap_complete::Shell;
        for shell in [
            Shell::Bash,
            Shell::Zsh,
            Shell::Fish,
            Shell::Elvish,
            Shell::PowerShell,
        ] {
            let mut cmd = without_hidden(&<Cli as clap::CommandFactory>::command());
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "warmvm", &mut out);
            let script = String::from_utf8(out).unwrap();
            for internal in ["snapshot-writer", "takeover-fd", "listen-fd"] {
                assert!(!script.contains(internal), "{shell}: {internal}");
            }
            for public in [
                "daemon",
                "stop-grace-secs",
                "create",
                "log-level",
                "--binary",
            ] {
                assert!(script.contains(public), "{shell}: {public}");
            }
        }
    }
}
