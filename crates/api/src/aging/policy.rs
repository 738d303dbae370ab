//! When to rejuvenate: the decision from the detectors' assessments, the schedule, the rate
//! limit, the maintenance windows, dry-run and the manual hold. Pure (time comes in), so the
//! bench replays it in accelerated time.

use serde::{Deserialize, Serialize};
use warmvm_vmm::AgingConfig;

use super::detect::Assessment;
use super::sample::Metric;

/// Which detector asked for a rejuvenation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// The trend test: the resource runs out within the horizon.
    Trend,
    /// The change detector fired and stayed.
    Change,
}

/// Why a warm reboot happened (or was asked for): the typed reason every reboot records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RebootReason {
    /// An operator asked (`PUT /v1/reboot`).
    Manual,
    /// The VMM panicked off a vCPU thread.
    Panic,
    /// The aging monitor saw a resource age.
    Aging { metric: Metric, detector: Detector },
    /// Time-based rejuvenation.
    Schedule,
}

impl std::fmt::Display for RebootReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RebootReason::Manual => f.write_str("manual"),
            RebootReason::Panic => f.write_str("panic"),
            RebootReason::Aging { metric, detector } => {
                write!(f, "aging ({metric}, {})", detector.name())
            }
            RebootReason::Schedule => f.write_str("schedule"),
        }
    }
}

impl Detector {
    pub fn name(self) -> &'static str {
        match self {
            Detector::Trend => "trend",
            Detector::Change => "change",
        }
    }
}

/// What the policy decided after one sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Warm-reboot now.
    Reboot,
    /// Dry-run: only alert.
    Alert,
    /// A trigger, not acted on (the reason says why).
    Skip,
}

impl Action {
    /// The name the reports use.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Reboot => "reboot",
            Action::Alert => "alert",
            Action::Skip => "skip",
        }
    }
}

/// A decision with its trigger and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub action: Action,
    pub reason: RebootReason,
    /// One line: what triggered, and why it was skipped if it was.
    pub detail: String,
    /// Short, stable label of a skip (for the metric): hold, rate_limit, maintenance_window.
    pub skip: Option<&'static str>,
}

/// What the policy needs besides the assessments.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    /// Seconds this process has run.
    pub uptime_secs: f64,
    /// Minutes after UTC midnight.
    pub minute_of_day: u32,
    /// Rejuvenations in the past hour (from the reboot history, across processes).
    pub reboots_last_hour: u32,
    pub hold: bool,
}

/// The trigger, if any: the resource nearest to running out, then a persistent change,
/// then the schedule.
fn trigger(
    cfg: &AgingConfig,
    assessments: &[Assessment],
    uptime: f64,
) -> Option<(RebootReason, String, bool)> {
    let exhausting = assessments.iter().filter(|a| a.exhausting).min_by(|a, b| {
        let t = |a: &Assessment| a.exhaustion_secs_conservative.unwrap_or(f64::INFINITY);
        t(a).total_cmp(&t(b))
    });
    if let Some(a) = exhausting {
        let secs = a.exhaustion_secs_conservative.unwrap_or(0.0);
        let urgent = secs < cfg.horizon_secs as f64 / 4.0;
        return Some((
            RebootReason::Aging {
                metric: a.metric,
                detector: Detector::Trend,
            },
            format!(
                "{} = {:.0} reaches its limit {:.0} in {:.0} s at the least (horizon {} s; Sen's slope {:.3}/s, p = {:.2e})",
                a.metric,
                a.value,
                a.limit.unwrap_or(f64::NAN),
                secs,
                cfg.horizon_secs,
                a.slope_per_sec.unwrap_or(f64::NAN),
                a.trend_p.unwrap_or(f64::NAN),
            ),
            urgent,
        ));
    }
    if let Some(a) = assessments.iter().find(|a| a.changed) {
        return Some((
            RebootReason::Aging {
                metric: a.metric,
                detector: Detector::Change,
            },
            format!(
                "{} = {:.0} has moved up from its baseline {:.0} for {} samples (CUSUM {:.1} > {})",
                a.metric,
                a.value,
                a.baseline.unwrap_or(f64::NAN),
                a.change_samples,
                a.cusum.unwrap_or(f64::NAN),
                cfg.cusum_h
            ),
            false,
        ));
    }
    match cfg.schedule_secs {
        Some(s) if uptime >= s as f64 => Some((
            RebootReason::Schedule,
            format!("the process has run {uptime:.0} s (schedule: every {s} s)"),
            false,
        )),
        _ => None,
    }
}

/// Decide after one sample; None when nothing triggers.
pub fn decide(cfg: &AgingConfig, assessments: &[Assessment], ctx: Context) -> Option<Decision> {
    let (reason, detail, urgent) = trigger(cfg, assessments, ctx.uptime_secs)?;
    let windows = cfg.windows();
    let skip = if ctx.hold {
        Some(("hold", "rejuvenation is on hold".to_string()))
    } else if ctx.reboots_last_hour >= cfg.max_per_hour {
        Some((
            "rate_limit",
            format!(
                "{} rejuvenations in the past hour (at most {})",
                ctx.reboots_last_hour, cfg.max_per_hour
            ),
        ))
    } else if !urgent
        && !windows.is_empty()
        && !windows.iter().any(|w| w.contains(ctx.minute_of_day))
    {
        Some((
            "maintenance_window",
            "outside every maintenance window".to_string(),
        ))
    } else {
        None
    };
    Some(match skip {
        Some((label, why)) => Decision {
            action: Action::Skip,
            reason,
            detail: format!("{detail}; skipped: {why}"),
            skip: Some(label),
        },
        None if cfg.dry_run => Decision {
            action: Action::Alert,
            reason,
            detail: format!("{detail}; dry run: alert only"),
            skip: None,
        },
        None => Decision {
            action: Action::Reboot,
            reason,
            detail,
            skip: None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exhausting(metric: Metric, secs: f64) -> Assessment {
        Assessment {
            metric,
            value: 100.0,
            baseline: Some(50.0),
            limit: Some(1000.0),
            window: 30,
            trend_z: Some(5.0),
            trend_p: Some(1e-6),
            slope_per_sec: Some(1.0),
            slope_low_per_sec: Some(0.9),
            exhaustion_secs: Some(secs * 0.9),
            exhaustion_secs_conservative: Some(secs),
            cusum: Some(0.0),
            change_samples: 0,
            exhausting: true,
            changed: false,
        }
    }

    fn ctx() -> Context {
        Context {
            uptime_secs: 100.0,
            minute_of_day: 12 * 60,
            reboots_last_hour: 0,
            hold: false,
        }
    }

    #[test]
    fn the_nearest_exhaustion_reboots() {
        let cfg = AgingConfig {
            horizon_secs: 600,
            ..AgingConfig::default()
        };
        let a = [
            exhausting(Metric::OpenFds, 500.0),
            exhausting(Metric::HeapInUseBytes, 300.0),
        ];
        let d = decide(&cfg, &a, ctx()).unwrap();
        assert_eq!(d.action, Action::Reboot);
        assert_eq!(
            d.reason,
            RebootReason::Aging {
                metric: Metric::HeapInUseBytes,
                detector: Detector::Trend
            }
        );
        assert!(decide(&cfg, &[], ctx()).is_none());
    }

    #[test]
    fn hold_rate_limit_windows_and_dry_run() {
        let a = [exhausting(Metric::OpenFds, 500.0)];
        let cfg = AgingConfig {
            horizon_secs: 600,
            max_per_hour: 1,
            maintenance_windows: vec!["02:00-04:00".into()],
            ..AgingConfig::default()
        };
        let d = |cfg: &AgingConfig, c: Context| decide(cfg, &a, c).unwrap();
        assert_eq!(
            d(
                &cfg,
                Context {
                    hold: true,
                    ..ctx()
                }
            )
            .skip,
            Some("hold")
        );
        assert_eq!(
            d(
                &cfg,
                Context {
                    reboots_last_hour: 1,
                    ..ctx()
                }
            )
            .skip,
            Some("rate_limit")
        );
        assert_eq!(d(&cfg, ctx()).skip, Some("maintenance_window"));
        assert_eq!(
            d(
                &cfg,
                Context {
                    minute_of_day: 180,
                    ..ctx()
                }
            )
            .action,
            Action::Reboot
        );
        // About to run out: the window does not hold it back.
        let urgent = [exhausting(Metric::OpenFds, 100.0)];
        assert_eq!(decide(&cfg, &urgent, ctx()).unwrap().action, Action::Reboot);
        let dry = AgingConfig {
            dry_run: true,
            maintenance_windows: vec![],
            ..cfg
        };
        assert_eq!(d(&dry, ctx()).action, Action::Alert);
    }

    #[test]
    fn the_schedule_triggers_when_nothing_ages() {
        let cfg = AgingConfig {
            schedule_secs: Some(60),
            ..AgingConfig::default()
        };
        assert_eq!(
            decide(&cfg, &[], ctx()).unwrap().reason,
            RebootReason::Schedule
        );
        assert!(decide(
            &cfg,
            &[],
            Context {
                uptime_secs: 10.0,
                ..ctx()
            }
        )
        .is_none());
    }

    #[test]
    fn reasons_round_trip_strictly() {
        let r = RebootReason::Aging {
            metric: Metric::OpenFds,
            detector: Detector::Change,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"aging","metric":"open_fds","detector":"change"}"#
        );
        assert_eq!(serde_json::from_str::<RebootReason>(&json).unwrap(), r);
        assert!(
            serde_json::from_str::<RebootReason>(r#"{"kind":"aging","metric":"open_fds"}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<RebootReason>(r#"{"kind":"reboot"}"#).is_err());
    }
}
