//! The daemon's own rejuvenation triggers: a panic outside the vCPUs (the process can no
//! longer be trusted) and the aging monitor's policy; both move every VM to a fresh daemon
//! by a warm reboot.

use std::sync::Arc;

use warmvm_vmm::AgingConfig;

use crate::aging::carry::decode_configured;
use crate::aging::{AgingCarry, Monitor, SettingsSource};
use crate::state::{ApiState, TakeoverInfo};

/// Rejuvenate on a bug: a panic on any thread but a vCPU's means this process can no
/// longer be trusted, so its VMs move to a fresh daemon by a warm reboot (on success this
/// process exits). A failed attempt is retried after [`RETRY_BACKOFF`]'s waits, panics that
/// arrive meanwhile counting as one; after the last, the VMs run on here until the next
/// panic starts the sequence again. Without the waits a panic storm would start new daemons
/// back to back, each failing the same way.
pub(crate) fn start_rejuvenator(state: Arc<ApiState>) {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    warmvm_vmm::panic::install_hook(move |what| {
        let _ = tx.send(what.to_string());
    });
    let rejuvenate = move || {
        warmvm_sandbox::enter_or_log(warmvm_sandbox::ThreadKind::Handover);
        while let Ok(what) = rx.recv() {
            tracing::error!(panic = %what, "the VMM hit a bug: emergency warm reboot into a fresh process");
            for (attempt, wait) in std::iter::once(None)
                .chain(RETRY_BACKOFF.iter().copied().map(Some))
                .enumerate()
            {
                if let Some(wait) = wait {
                    std::thread::sleep(wait);
                    let coalesced = rx.try_iter().count();
                    tracing::warn!(attempt, coalesced, "retrying the emergency warm reboot");
                }
                match state.emergency_reboot() {
                    Ok(report) => {
                        tracing::info!(
                            new_pid = report.new_pid,
                            host_blackout_us = report.host_blackout_us,
                            "emergency warm reboot done: a fresh daemon runs every VM; this one exits"
                        );
                        std::process::exit(0);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, attempt, "emergency warm reboot failed; the VMs run on here")
                    }
                }
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("warmvm-rejuvenate".into())
        .spawn(rejuvenate)
    {
        tracing::error!(error = %e, "cannot start the rejuvenation thread; a panic will not move the VMs");
    }
}

/// The waits before each retry of a failed emergency warm reboot (about half a minute in
/// all), doubling so that a lasting cause costs a few attempts, not a storm of daemons.
pub(crate) const RETRY_BACKOFF: [std::time::Duration; 5] = [
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(2),
    std::time::Duration::from_secs(4),
    std::time::Duration::from_secs(8),
    std::time::Duration::from_secs(16),
];

/// The aging monitor: the config's settings on a fresh start; after a takeover, the
/// settings and history the previous daemon handed over. If those are unreadable (a takeover
/// from an older build), the configured settings the previous daemon passed on and an empty
/// history; and if it passed none either, a dry run (it alerts but never reboots by itself),
/// since the configuration may forbid what the defaults would do. The log and the report say
/// which settings are in force and where they came from.
pub(crate) fn aging_monitor(
    configured: Option<AgingConfig>,
    aging: Option<&serde_json::Value>,
    aging_configured: Option<&serde_json::Value>,
    takeover: Option<&TakeoverInfo>,
    mode_reboot: Option<&crate::reboot::modes::ModeReboot>,
) -> Monitor {
    let Some(takeover) = takeover else {
        let m = Monitor::new(configured.unwrap_or_default(), None, None);
        log_settings(&m);
        return m;
    };
    #[cfg(feature = "fault-injection")]
    let (aging, aging_configured) = fault_aging_handover(aging, aging_configured);
    #[cfg(feature = "fault-injection")]
    let (aging, aging_configured) = (aging.as_ref(), aging_configured.as_ref());
    let from = takeover
        .previous_pid
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or(0);
    // What the operator configured, as the previous daemon passed it on.
    let passed_on = aging_configured.and_then(|v| {
        decode_configured(v)
            .map_err(|e| tracing::warn!(error = %e, "the configured aging settings passed on are unusable"))
            .ok()
    });
    let m = match AgingCarry::decode(aging) {
        Ok(carry) => {
            tracing::info!(
                samples = carry.history.len(),
                reboots = carry.reboots.len(),
                reason = %carry.reason,
                "aging history taken over"
            );
            // A saved or cold reboot hands no VM over (its blackout is 0): its record
            // carries the guests' downtime instead.
            let (mode, downtime_us) = match mode_reboot {
                Some(r) => (
                    crate::reboot::modes::Mode::parse(&r.mode)
                        .unwrap_or(crate::reboot::modes::Mode::Warm),
                    Some(r.host_downtime_us),
                ),
                None => (crate::reboot::modes::Mode::Warm, None),
            };
            Monitor::new(
                carry.config.clone(),
                Some(carry),
                Some(crate::aging::monitor::Arrival {
                    from_pid: from,
                    host_blackout_us: takeover.host_blackout_us,
                    mode,
                    downtime_us,
                }),
            )
            .with_origin(SettingsSource::Inherited, Some(from), passed_on)
        }
        Err(e) => match passed_on {
            Some(cfg) => {
                tracing::warn!(error = %e, "the previous daemon's aging state is unusable; starting with an empty history");
                Monitor::new(cfg.clone(), None, None).with_origin(
                    SettingsSource::Configured,
                    None,
                    Some(cfg),
                )
            }
            None => {
                tracing::warn!(error = %e, from_pid = from, "the previous daemon handed over neither a readable aging state nor the configured settings; starting with an empty history and a dry run, which never reboots by itself, until a daemon started with the configuration runs");
                let safe = AgingConfig {
                    dry_run: true,
                    ..AgingConfig::default()
                };
                Monitor::new(safe, None, None).with_origin(SettingsSource::Unknown, None, None)
            }
        },
    };
    log_settings(&m);
    m
}

/// Say in the log which aging settings are in force and where they came from.
fn log_settings(m: &Monitor) {
    let (source, from_pid) = m.settings_source();
    let cfg = m.config();
    tracing::info!(
        enabled = cfg.enabled,
        dry_run = cfg.dry_run,
        period_ms = cfg.period_ms,
        source = %source.describe(from_pid),
        "aging monitor settings"
    );
}

/// Test builds: stand in for a previous daemon whose aging state this one cannot read
/// (`WARMVM_FAULT_AGING_HANDOVER=unreadable`: another format), or for an older build that
/// also passed on no configured settings (`=old-build`).
#[cfg(feature = "fault-injection")]
fn fault_aging_handover(
    aging: Option<&serde_json::Value>,
    configured: Option<&serde_json::Value>,
) -> (Option<serde_json::Value>, Option<serde_json::Value>) {
    let fault = std::env::var("WARMVM_FAULT_AGING_HANDOVER").unwrap_or_default();
    match fault.as_str() {
        "unreadable" | "old-build" => {
            tracing::warn!(fault = %fault, "fault injected: the handed-over aging state is unreadable");
            let configured = configured.filter(|_| fault != "old-build").cloned();
            (Some(serde_json::json!({ "format": 0 })), configured)
        }
        _ => (aging.cloned(), configured.cloned()),
    }
}

/// Sample every period; when the policy says so, rejuvenate by a warm reboot into a fresh
/// copy of this binary (on success this process exits; on failure the VMs run on here, the
/// failure is recorded and the trigger may fire again).
pub(crate) fn start_aging_monitor(state: Arc<ApiState>, monitor: Arc<Monitor>) {
    let watch = move || loop {
        std::thread::sleep(monitor.period());
        if state.rebooting() || state.handed_over() {
            continue;
        }
        let vms = u32::try_from(state.vms().len()).unwrap_or(u32::MAX);
        let Some(decision) = monitor.tick(vms) else {
            continue;
        };
        match state.rejuvenate(decision.reason.clone()) {
            Ok(report) => {
                tracing::info!(
                    new_pid = report.new_pid,
                    host_blackout_us = report.host_blackout_us,
                    reason = %decision.reason,
                    "rejuvenated: a fresh daemon runs every VM; this one exits"
                );
                std::process::exit(0);
            }
            Err(e) => {
                tracing::error!(error = %e, reason = %decision.reason, "rejuvenation failed; the VMs run on here");
                monitor.record_failure(&decision.reason, &e.message);
            }
        }
    };
    // It warm-reboots the daemon, as the handover threads do.
    let run = move || {
        warmvm_sandbox::enter_or_log(warmvm_sandbox::ThreadKind::Handover);
        watch()
    };
    if let Err(e) = std::thread::Builder::new()
        .name("warmvm-aging".into())
        .spawn(run)
    {
        tracing::error!(error = %e, "cannot start the aging monitor");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aging::RebootReason;
    use crate::state::TakeoverInfo;

    fn takeover() -> TakeoverInfo {
        TakeoverInfo {
            previous_pid: Some(41),
            from_build: "a".into(),
            to_build: "b".into(),
            state_format: 3,
            commit_protocol: true,
            host_blackout_us: 700,
            from_binary: None,
            to_binary: None,
        }
    }

    #[test]
    fn a_takeover_continues_the_handed_over_history_and_settings() {
        let cfg = AgingConfig {
            period_ms: 500,
            ..AgingConfig::default()
        };
        let old = Monitor::new(cfg, None, None);
        old.tick(0);
        let carry = old.carry(RebootReason::Manual).encode();
        let new = aging_monitor(None, Some(&carry), None, Some(&takeover()), None);
        let r = new.report();
        assert_eq!(r.settings_source, Some(SettingsSource::Inherited));
        assert_eq!(r.settings_from_pid, Some(41));
        assert_eq!(r.period_ms, 500);
        assert_eq!(r.history_len, 1);
        assert_eq!(r.reboots.len(), 1);
        assert_eq!(r.reboots[0].from_pid, 41);
        assert_eq!(r.reboots[0].host_blackout_us, 700);
        assert_eq!(r.reboots[0].mode, Some(crate::reboot::modes::Mode::Warm));
        assert_eq!(r.reboots[0].downtime_us, None);
    }

    #[test]
    fn a_saved_reboot_is_recorded_with_its_downtime_not_a_zero_blackout() {
        let old = Monitor::new(AgingConfig::default(), None, None);
        let carry = old.carry(RebootReason::Manual).encode();
        let saved = crate::reboot::modes::ModeReboot {
            mode: "saved".into(),
            host_downtime_us: 812_000,
            ..Default::default()
        };
        let takeover = TakeoverInfo {
            host_blackout_us: 0,
            ..takeover()
        };
        let r = aging_monitor(None, Some(&carry), None, Some(&takeover), Some(&saved)).report();
        assert_eq!(r.reboots[0].mode, Some(crate::reboot::modes::Mode::Saved));
        assert_eq!(r.reboots[0].downtime_us, Some(812_000));
    }

    /// An older build hands over neither state this build reads nor the configured settings:
    /// the new daemon must not run with settings that may differ from the configuration (the
    /// defaults reboot by themselves; the operator may have said dry_run or enabled = false).
    #[test]
    fn unreadable_aging_state_and_no_configured_settings_mean_a_dry_run_from_an_empty_history() {
        let old = Monitor::new(AgingConfig::default(), None, None);
        old.tick(0);
        let mut carry = old.carry(RebootReason::Panic).encode();
        carry.as_object_mut().unwrap().remove("history");
        // The state without a field, or none at all (an older build's settings).
        for aging in [Some(&carry), None] {
            let extra = format!("{aging:?}");
            let m = aging_monitor(None, aging, None, Some(&takeover()), None);
            let r = m.report();
            assert_eq!(r.history_len, 0, "{extra}");
            assert!(r.reboots.is_empty());
            assert!(r.config.dry_run, "{extra}");
            assert_eq!(
                r.config,
                AgingConfig {
                    dry_run: true,
                    ..AgingConfig::default()
                }
            );
            assert_eq!(r.settings_source, Some(SettingsSource::Unknown));
            assert!(r.next_action.contains("dry run"), "{}", r.next_action);
            // Nor does it claim to know them to its own successor.
            assert!(m.configured().is_none());
        }
    }

    /// The configured settings a current build passes on win over the defaults when the
    /// aging state itself cannot be read.
    #[test]
    fn unreadable_aging_state_falls_back_to_the_configured_settings_passed_on() {
        for cfg in [
            AgingConfig {
                dry_run: true,
                ..AgingConfig::default()
            },
            AgingConfig {
                enabled: false,
                ..AgingConfig::default()
            },
        ] {
            let unreadable = serde_json::json!({ "format": 0 });
            let configured = serde_json::to_value(&cfg).unwrap();
            let m = aging_monitor(
                None,
                Some(&unreadable),
                Some(&configured),
                Some(&takeover()),
                None,
            );
            let r = m.report();
            assert_eq!(r.config, cfg);
            assert_eq!(r.history_len, 0);
            assert_eq!(r.settings_source, Some(SettingsSource::Configured));
            assert_eq!(m.configured(), Some(&cfg));
        }
        // Passed on but unusable (a setting missing): not trusted, so a dry run.
        let mut short = serde_json::to_value(AgingConfig::default()).unwrap();
        short.as_object_mut().unwrap().remove("enabled");
        let unreadable = serde_json::json!({ "format": 0 });
        let r = aging_monitor(
            None,
            Some(&unreadable),
            Some(&short),
            Some(&takeover()),
            None,
        )
        .report();
        assert!(r.config.dry_run);
        assert_eq!(r.settings_source, Some(SettingsSource::Unknown));
    }

    #[test]
    fn a_fresh_daemon_takes_the_configured_settings() {
        let cfg = AgingConfig {
            dry_run: true,
            ..AgingConfig::default()
        };
        let m = aging_monitor(Some(cfg.clone()), None, None, None, None);
        assert_eq!(m.config(), cfg);
        assert_eq!(m.configured(), Some(&cfg));
        assert_eq!(m.report().settings_source, Some(SettingsSource::Configured));
    }
}
