//! The daemon's side of the fleet: its `--fleet-*` flags (and the config's `[fleet]`),
//! checked at start, and the host record its fleet agent (`warmvm_fleet::Agent`) writes,
//! read from the daemon's state. What talks to etcd is the fleet crate's, on its own
//! thread.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use warmvm_fleet::executor::RebootAsk;
use warmvm_fleet::records::{
    AgingFigures, Build, GuestProgress, Health, HostRecord, HostVm, LastReboot, FORMAT,
};
use warmvm_fleet::{Agent, AgentConfig, EtcdOptions, FleetError};
use warmvm_vmm::FleetConfig;

use crate::state::ApiState;

/// The fleet flags of `warmvm daemon`, as given (each over the config's key).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetOptions {
    /// `--fleet-etcd URL[,URL...]`.
    pub etcd: Option<String>,
    pub host_name: Option<String>,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
}

/// The fleet settings, checked: what the agent is started with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetSetup {
    pub etcd: EtcdOptions,
    pub host_name: String,
    /// The options again, resolved (paths absolute): what a warm reboot's new daemon gets.
    pub options: FleetOptions,
}

impl FleetOptions {
    /// These flags over the config's `[fleet]`, key by key.
    pub fn over(&self, config: Option<&FleetConfig>) -> FleetOptions {
        let Some(c) = config else {
            return self.clone();
        };
        let etcd = (!c.etcd.is_empty()).then(|| c.etcd.join(","));
        FleetOptions {
            etcd: self.etcd.clone().or(etcd),
            host_name: self.host_name.clone().or(c.host_name.clone()),
            etcd_ca: self.etcd_ca.clone().or(c.etcd_ca.clone()),
            etcd_cert: self.etcd_cert.clone().or(c.etcd_cert.clone()),
            etcd_key: self.etcd_key.clone().or(c.etcd_key.clone()),
        }
    }

    /// Check every rule and read the TLS files; `None` when the daemon joins no fleet.
    pub fn setup(&self) -> Result<Option<FleetSetup>, FleetError> {
        let invalid = |m: &str| Err(FleetError::Invalid(m.into()));
        let Some(endpoints) = &self.etcd else {
            if self.host_name.is_some() {
                return invalid("--host-name needs --fleet-etcd (the fleet's etcd endpoints)");
            }
            if self.etcd_ca.is_some() || self.etcd_cert.is_some() || self.etcd_key.is_some() {
                return invalid(
                    "--fleet-etcd-ca, --fleet-etcd-cert and --fleet-etcd-key need --fleet-etcd",
                );
            }
            return Ok(None);
        };
        let Some(host_name) = &self.host_name else {
            return invalid("--fleet-etcd needs --host-name (this host's name in the fleet)");
        };
        warmvm_fleet::keys::check_name("--host-name", host_name).map_err(FleetError::Invalid)?;
        let absolute = |p: &Option<PathBuf>| -> Result<Option<PathBuf>, FleetError> {
            p.as_deref()
                .map(|p| {
                    std::path::absolute(p).map_err(|source| FleetError::ReadFile {
                        what: "etcd TLS file",
                        path: p.to_path_buf(),
                        source,
                    })
                })
                .transpose()
        };
        let options = FleetOptions {
            etcd: Some(endpoints.clone()),
            host_name: Some(host_name.clone()),
            etcd_ca: absolute(&self.etcd_ca)?,
            etcd_cert: absolute(&self.etcd_cert)?,
            etcd_key: absolute(&self.etcd_key)?,
        };
        let etcd = EtcdOptions::new(
            endpoints,
            options.etcd_ca.clone(),
            options.etcd_cert.clone(),
            options.etcd_key.clone(),
        )?;
        // The files are read now: a missing or unreadable one stops the daemon here.
        etcd.connect_options()?;
        Ok(Some(FleetSetup {
            etcd,
            host_name: host_name.clone(),
            options,
        }))
    }

    /// The flags a warm reboot's new daemon gets to join the same way (none when this
    /// daemon joins no fleet, so an older build without them can still follow).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(e) = &self.etcd {
            args.extend(["--fleet-etcd".into(), e.into()]);
        }
        if let Some(n) = &self.host_name {
            args.extend(["--host-name".into(), n.into()]);
        }
        for (flag, p) in [
            ("--fleet-etcd-ca", &self.etcd_ca),
            ("--fleet-etcd-cert", &self.etcd_cert),
            ("--fleet-etcd-key", &self.etcd_key),
        ] {
            if let Some(p) = p {
                args.extend([flag.into(), p.clone().into_os_string()]);
            }
        }
        args
    }
}

/// Start the fleet agent for `state`; `adopt_lease` is the lease a warm reboot's old
/// daemon handed over. `thread_setup` runs first on the agent's thread.
pub fn start(
    state: &Arc<ApiState>,
    setup: &FleetSetup,
    adopt_lease: Option<i64>,
    thread_setup: Box<dyn FnOnce() + Send>,
) -> Result<(), FleetError> {
    let weak = Arc::downgrade(state);
    let name = setup.host_name.clone();
    let reboots = start_reboots(state)?;
    let agent = Agent::start(AgentConfig {
        etcd: setup.etcd.clone(),
        host_name: setup.host_name.clone(),
        adopt_lease,
        record: Box::new(move || weak.upgrade().and_then(|s| record(&s, &name))),
        thread_setup,
        reboots: Some(reboots),
    })?;
    state.set_fleet(agent);
    Ok(())
}

/// The daemon's side of a fleet step's reboot: a thread that takes the agent's requests
/// and runs the same reboot as `PUT /v1/reboot` (the agent never touches a VM). On
/// success this process has handed everything to the new daemon and exits at once, as
/// after an emergency rejuvenation; on failure the VMs run on here and the agent hears why.
fn start_reboots(state: &Arc<ApiState>) -> Result<std::sync::mpsc::Sender<RebootAsk>, FleetError> {
    let (tx, rx) = std::sync::mpsc::channel::<RebootAsk>();
    let weak = Arc::downgrade(state);
    std::thread::Builder::new()
        .name("warmvm-fleet-reboot".into())
        .spawn(move || {
            // The thread kind that runs an operator's reboot.
            warmvm_sandbox::enter_or_log(warmvm_sandbox::ThreadKind::Api);
            while let Ok(ask) = rx.recv() {
                let Some(state) = weak.upgrade() else {
                    ask.busy.store(false, std::sync::atomic::Ordering::SeqCst);
                    return;
                };
                let mode = match ask.mode {
                    warmvm_fleet::plan::Mode::Warm => crate::types::Mode::Warm,
                    warmvm_fleet::plan::Mode::Saved => crate::types::Mode::Saved,
                    warmvm_fleet::plan::Mode::Cold => crate::types::Mode::Cold,
                };
                let mut req = crate::types::RebootRequest::new(mode);
                req.binary = ask.binary.clone();
                tracing::info!(why = ask.why, binary = ?ask.binary, "fleet: rebooting for a plan step");
                match state.reboot_for(&req, crate::aging::RebootReason::Manual) {
                    Ok(report) => {
                        tracing::info!(
                            new_pid = report.new_pid,
                            host_blackout_us = report.host_blackout_us,
                            "fleet: the plan step's reboot is done: the new daemon runs every VM; this one exits"
                        );
                        std::process::exit(0);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "fleet: the plan step's reboot failed; the VMs run on here");
                        ask.busy.store(false, std::sync::atomic::Ordering::SeqCst);
                        let _ = ask.done.send(Err(e.to_string()));
                    }
                }
            }
        })
        .map_err(FleetError::Runtime)?;
    Ok(tx)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The host's record as the daemon stands now; `None` while it hands its VMs to a new
/// daemon (which writes the record from then on) or stops.
pub fn record(state: &ApiState, host_name: &str) -> Option<HostRecord> {
    if state.handing_over()
        || state.handed_over()
        || state
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst)
    {
        return None;
    }
    let vms: Vec<HostVm> = state
        .vms()
        .iter()
        .map(|vm| {
            let lifecycle = vm.lifecycle();
            HostVm {
                name: vm.name().to_string(),
                lifecycle: lifecycle.name().to_string(),
                memory_mib: vm.config.memory_mib,
                vcpus: vm.config.vcpus,
                group: None,
                guest: vm.guest_figures().map(|g| GuestProgress {
                    counter: g.counter,
                    pages_verified: g.pages_verified,
                    mismatches: g.mismatches,
                    register_check_failures: g.register_check_failures,
                    verified_clean: g.all_verified_clean(),
                }),
            }
        })
        .collect();
    let binary = warmvm_vmm::executable::info();
    let busy = state.rebooting() || state.migrations.any().is_some();
    let aging = state.aging().and_then(|m| m.latest()).map(|s| {
        use crate::aging::sample::Metric;
        let get = |m: Metric| s.values.get(&m).map_or(0, |v| *v as u64);
        AgingFigures {
            rss_bytes: get(Metric::RssAnonBytes),
            open_fds: get(Metric::OpenFds),
            threads: get(Metric::Threads),
        }
    });
    let started_ms = now_ms().saturating_sub(state.uptime().as_millis() as u64);
    let last_reboot = last_reboot(state, started_ms, &binary.sha256);
    Some(HostRecord {
        format: FORMAT,
        name: host_name.to_string(),
        health: health(&vms, busy),
        vms,
        build: Build {
            version: binary.version,
            git_commit: binary.commit,
            sha256: binary.sha256,
            path: binary.path,
        },
        pid: std::process::id(),
        updated_unix_ms: now_ms(),
        aging,
        migration_addr: state
            .migration
            .get()
            .and_then(|(_, addr)| addr.map(|a| a.to_string())),
        last_reboot,
    })
}

/// Ok, busy (a reboot or migration under way), or degraded with what is wrong: VMs that
/// crashed, are in doubt, or whose guest found a mismatch.
fn health(vms: &[HostVm], busy: bool) -> Health {
    let bad: Vec<String> = vms
        .iter()
        .filter_map(|v| {
            if matches!(v.lifecycle.as_str(), "crashed" | "in-doubt") {
                return Some(format!("VM {} is {}", v.name, v.lifecycle));
            }
            let g = v.guest.as_ref()?;
            (g.mismatches > 0 || g.register_check_failures > 0).then(|| {
                format!(
                    "VM {}'s guest found {} mismatches and {} register check failures",
                    v.name, g.mismatches, g.register_check_failures
                )
            })
        })
        .collect();
    if !bad.is_empty() {
        Health::Degraded(bad.join("; "))
    } else if busy {
        Health::Busy
    } else {
        Health::Ok
    }
}

/// The reboot that started this daemon, if one did: a warm one's host blackout, or the p99
/// of a saved or cold one's VM downtimes.
fn last_reboot(state: &ApiState, started_ms: u64, sha256: &str) -> Option<LastReboot> {
    if let Some(r) = state.last_reboot() {
        let mut downtimes: Vec<u64> = r.vms.iter().map(|v| v.downtime_us).collect();
        return Some(LastReboot {
            mode: r.mode.clone(),
            finished_unix_ms: started_ms,
            blackout_p99_us: p99(&mut downtimes).unwrap_or(r.host_downtime_us),
            from_sha256: String::new(),
            to_sha256: sha256.to_string(),
        });
    }
    let t = state.last_takeover.get()?;
    Some(LastReboot {
        mode: "warm".into(),
        finished_unix_ms: started_ms,
        blackout_p99_us: t.host_blackout_us,
        from_sha256: t
            .from_binary
            .as_ref()
            .map_or_else(String::new, |b| b.sha256.clone()),
        to_sha256: sha256.to_string(),
    })
}

/// The 99th percentile (nearest rank) of `v`, `None` when it is empty.
fn p99(v: &mut [u64]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let rank = (v.len() * 99).div_ceil(100);
    v.get(rank.saturating_sub(1)).copied()
}

/// Stop the agent when the daemon stops for good: the lease is revoked, so the record
/// goes at once (at most `wait`).
pub fn leave(state: &ApiState, wait: Duration) {
    if let Some(agent) = state.fleet() {
        agent.stop(true, wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(etcd: Option<&str>, name: Option<&str>) -> FleetOptions {
        FleetOptions {
            etcd: etcd.map(Into::into),
            host_name: name.map(Into::into),
            ..Default::default()
        }
    }

    fn err(o: &FleetOptions) -> String {
        o.setup().unwrap_err().to_string()
    }

    #[test]
    fn the_flags_are_checked_whole_at_start() {
        assert_eq!(opts(None, None).setup().unwrap(), None);
        assert!(err(&opts(Some("http://10.0.0.1:2379"), None)).contains("needs --host-name"));
        assert!(err(&opts(None, Some("h1"))).contains("needs --fleet-etcd"));
        assert!(err(&opts(Some("http://10.0.0.1:2379"), Some("H/1"))).contains("--host-name"));
        assert!(err(&opts(Some("10.0.0.1:2379"), Some("h1"))).contains("http://"));
        let mut tls_alone = opts(None, None);
        tls_alone.etcd_ca = Some("/ca.pem".into());
        assert!(err(&tls_alone).contains("need --fleet-etcd"));
        let mut missing = opts(Some("https://10.0.0.1:2379"), Some("h1"));
        missing.etcd_ca = Some("/nonexistent/ca.pem".into());
        assert!(err(&missing).contains("/nonexistent/ca.pem"));
        let ok = opts(
            Some("http://10.0.0.1:2379,http://10.0.0.2:2379"),
            Some("h1"),
        )
        .setup()
        .unwrap()
        .unwrap();
        assert_eq!(ok.etcd.endpoints.len(), 2);
        assert_eq!(ok.host_name, "h1");
    }

    #[test]
    fn flags_win_over_the_config_key_by_key_and_reach_the_successor_as_flags() {
        let config = FleetConfig {
            etcd: vec!["http://a:1".into(), "http://b:2".into()],
            host_name: Some("from-config".into()),
            ..Default::default()
        };
        let merged = opts(None, Some("from-flag")).over(Some(&config));
        assert_eq!(merged.etcd.as_deref(), Some("http://a:1,http://b:2"));
        assert_eq!(merged.host_name.as_deref(), Some("from-flag"));
        let mut tls = opts(Some("https://a:1"), Some("h1"));
        tls.etcd_ca = Some("rel/ca.pem".into());
        // The CA does not exist, so check the args before reading.
        let args = tls.to_args();
        assert_eq!(
            args,
            [
                "--fleet-etcd",
                "https://a:1",
                "--host-name",
                "h1",
                "--fleet-etcd-ca",
                "rel/ca.pem"
            ]
            .map(OsString::from)
        );
        // No fleet: no flags at all, so an older build can still be the successor.
        assert!(FleetOptions::default().to_args().is_empty());
    }

    #[test]
    fn the_configs_fleet_table_is_read_strictly() {
        let dir = std::env::temp_dir().join(format!("warmvm-fleet-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "[fleet]\netcd = [\"http://10.0.0.1:2379\"]\nhost_name = \"h1\"\n",
        )
        .unwrap();
        let c = warmvm_vmm::Config::from_toml_file(&path).unwrap();
        let setup = FleetOptions::default()
            .over(c.fleet.as_ref())
            .setup()
            .unwrap()
            .unwrap();
        assert_eq!(setup.host_name, "h1");
        assert_eq!(setup.etcd.endpoints, ["http://10.0.0.1:2379"]);
        std::fs::write(&path, "[fleet]\netcd_endpoints = []\n").unwrap();
        assert!(warmvm_vmm::Config::from_toml_file(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The record read from a real daemon state with a reference VM (needs /dev/kvm).
    #[test]
    fn the_record_is_read_from_the_daemons_state() {
        if !warmvm_vmm::testing::kvm_available("the_record_is_read_from_the_daemons_state") {
            return;
        }
        let dir = std::env::temp_dir().join(format!("warmvm-fleet-rec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let state = ApiState::new(warmvm_vmm::Host::open(&dir).unwrap());
        assert_eq!(
            state.fleet_connected(),
            None,
            "no fleet without --fleet-etcd"
        );
        let empty = record(&state, "h1").unwrap();
        assert_eq!(empty.name, "h1");
        assert_eq!(empty.format, FORMAT);
        assert_eq!(empty.pid, std::process::id());
        assert!(empty.vms.is_empty());
        assert_eq!(empty.health, Health::Ok);
        assert_eq!(empty.last_reboot, None);
        assert_eq!(empty.migration_addr, None);
        assert_eq!(empty.build.sha256, warmvm_vmm::executable::sha256());

        let mut vm = warmvm_vmm::VmConfig::reference("r1", 64, 2);
        vm.cmdline = Some("quiet interval_ms=20".into());
        state.create_config(&vm).unwrap();
        let verified = || {
            record(&state, "h1")
                .unwrap()
                .vms
                .first()
                .and_then(|v| v.guest.clone())
                .is_some_and(|g| g.verified_clean && g.counter > 0)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !verified() {
            assert!(
                std::time::Instant::now() < deadline,
                "the guest never verified"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let r = record(&state, "h1").unwrap();
        assert_eq!(r.vms.len(), 1);
        let v = &r.vms[0];
        assert_eq!((v.name.as_str(), v.lifecycle.as_str()), ("r1", "running"));
        assert_eq!((v.memory_mib, v.vcpus), (64, 2));
        assert_eq!(r.health, Health::Ok);
        state.pause("r1").unwrap();
        assert_eq!(record(&state, "h1").unwrap().vms[0].lifecycle, "paused");
        // While the VMs are handed to a new daemon, this one writes nothing.
        state
            .handing_over
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(record(&state, "h1"), None);
        state
            .handing_over
            .store(false, std::sync::atomic::Ordering::SeqCst);
        state.shutdown(Duration::from_secs(1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn vm(name: &str, lifecycle: &str, mismatches: u64) -> HostVm {
        HostVm {
            name: name.into(),
            lifecycle: lifecycle.into(),
            memory_mib: 64,
            vcpus: 1,
            group: None,
            guest: Some(GuestProgress {
                counter: 1,
                pages_verified: 1,
                mismatches,
                register_check_failures: 0,
                verified_clean: mismatches == 0,
            }),
        }
    }

    #[test]
    fn health_names_what_is_wrong_and_busy_gives_way_to_it() {
        assert_eq!(health(&[vm("a", "running", 0)], false), Health::Ok);
        assert_eq!(health(&[vm("a", "running", 0)], true), Health::Busy);
        let Health::Degraded(why) = health(&[vm("a", "running", 2), vm("b", "crashed", 0)], true)
        else {
            panic!("not degraded")
        };
        assert!(why.contains("VM a's guest found 2 mismatches"), "{why}");
        assert!(why.contains("VM b is crashed"), "{why}");
    }

    #[test]
    fn p99_is_the_nearest_rank() {
        assert_eq!(p99(&mut []), None);
        assert_eq!(p99(&mut [5]), Some(5));
        let mut v: Vec<u64> = (1..=200).rev().collect();
        assert_eq!(p99(&mut v), Some(198));
    }
}
