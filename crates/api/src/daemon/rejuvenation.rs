//! The daemon's own rejuvenation triggers: a panic outside the vCPUs (the process can no
//! longer be trusted) and the aging monitor's policy; both move every VM to a fresh daemon
//! by a warm reboot.

use std::sync::Arc;

use warmvm_vmm::AgingConfig;

use crate::aging::{AgingCarry, Monitor};
use crate::state::{ApiState, TakeoverInfo};

/// Rejuvenate on a bug: a panic on any thread but a vCPU's means this process can no
/// longer be trusted, so its VMs move to a fresh daemon by a warm reboot (on success this
/// process exits; on failure they run on here, and the next panic tries again).
pub(super) fn start_rejuvenator(state: Arc<ApiState>) {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    warmvm_vmm::panic::install_hook(move |what| {
        let _ = tx.send(what.to_string());
    });
    let rejuvenate = move || {
        warmvm_sandbox::enter_or_log(warmvm_sandbox::ThreadKind::Handover);
        for what in rx {
            tracing::error!(panic = %what, "the VMM hit a bug: emergency warm reboot into a fresh process");
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
                    tracing::error!(error = %e, "emergency warm reboot failed; the VMs run on here")
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

/// The aging monitor: the config's settings on a fresh start; after a warm reboot, the
/// settings and history the previous daemon handed over, or (if they are unreadable) the
/// defaults and an empty history, said in the log: the VMs matter more than the history.
pub(super) fn aging_monitor(
    configured: Option<AgingConfig>,
    inherited: &serde_json::Value,
    takeover: Option<&TakeoverInfo>,
    mode_reboot: Option<&crate::modes::ModeReboot>,
) -> Monitor {
    let Some(takeover) = takeover else {
        return Monitor::new(configured.unwrap_or_default(), None, None);
    };
    let from = takeover
        .previous_pid
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or(0);
    match AgingCarry::decode(inherited.get("aging")) {
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
                    crate::modes::Mode::parse(&r.mode).unwrap_or(crate::modes::Mode::Warm),
                    Some(r.host_downtime_us),
                ),
                None => (crate::modes::Mode::Warm, None),
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
        }
        Err(e) => {
            tracing::warn!(error = %e, "the previous daemon's aging state is unusable; starting with default settings and an empty history");
            Monitor::new(AgingConfig::default(), None, None)
        }
    }
}

/// Sample every period; when the policy says so, rejuvenate by a warm reboot into a fresh
/// copy of this binary (on success this process exits; on failure the VMs run on here, the
/// failure is recorded and the trigger may fire again).
pub(super) fn start_aging_monitor(state: Arc<ApiState>, monitor: Arc<Monitor>) {
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
        let extra = serde_json::json!({ "aging": old.carry(RebootReason::Manual).encode() });
        let new = aging_monitor(None, &extra, Some(&takeover()), None);
        let r = new.report();
        assert_eq!(r.period_ms, 500);
        assert_eq!(r.history_len, 1);
        assert_eq!(r.reboots.len(), 1);
        assert_eq!(r.reboots[0].from_pid, 41);
        assert_eq!(r.reboots[0].host_blackout_us, 700);
        assert_eq!(r.reboots[0].mode, Some(crate::modes::Mode::Warm));
        assert_eq!(r.reboots[0].downtime_us, None);
    }

    #[test]
    fn a_saved_reboot_is_recorded_with_its_downtime_not_a_zero_blackout() {
        let old = Monitor::new(AgingConfig::default(), None, None);
        let extra = serde_json::json!({ "aging": old.carry(RebootReason::Manual).encode() });
        let saved = crate::modes::ModeReboot {
            mode: "saved".into(),
            host_downtime_us: 812_000,
            ..Default::default()
        };
        let takeover = TakeoverInfo {
            host_blackout_us: 0,
            ..takeover()
        };
        let r = aging_monitor(None, &extra, Some(&takeover), Some(&saved)).report();
        assert_eq!(r.reboots[0].mode, Some(crate::modes::Mode::Saved));
        assert_eq!(r.reboots[0].downtime_us, Some(812_000));
    }

    #[test]
    fn unreadable_aging_state_means_defaults_and_an_empty_history_not_a_failed_takeover() {
        let old = Monitor::new(AgingConfig::default(), None, None);
        old.tick(0);
        let mut carry = old.carry(RebootReason::Panic).encode();
        carry.as_object_mut().unwrap().remove("history");
        for extra in [
            serde_json::json!({ "aging": carry }),
            serde_json::json!({ "previous_pid": 41 }),
            serde_json::Value::Null,
        ] {
            let m = aging_monitor(None, &extra, Some(&takeover()), None);
            let r = m.report();
            assert_eq!(r.history_len, 0, "{extra}");
            assert!(r.reboots.is_empty());
            assert_eq!(r.config, AgingConfig::default());
        }
    }

    #[test]
    fn a_fresh_daemon_takes_the_configured_settings() {
        let cfg = AgingConfig {
            dry_run: true,
            ..AgingConfig::default()
        };
        let m = aging_monitor(Some(cfg.clone()), &serde_json::Value::Null, None, None);
        assert_eq!(m.config(), cfg);
    }
}
