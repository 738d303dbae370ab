//! The `[aging]` table of the daemon's config: how the daemon watches its own resources for
//! software aging and when it rejuvenates itself by a warm reboot (see warmvm-api's `aging`
//! module and docs/daemon.md). Lives here beside [`crate::Config`] because it is part of the
//! same file, parsed and refused (unknown keys, values out of range) the same way.

use serde::{Deserialize, Serialize};

/// Settings of the aging monitor and its rejuvenation policy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgingConfig {
    /// Sample and evaluate at all.
    pub enabled: bool,
    /// Time between two samples.
    pub period_ms: u64,
    /// Samples kept (and handed over across warm reboots) for the API and the plots.
    pub history: u32,
    /// Most recent samples of this process the trend test looks at.
    pub window: u32,
    /// Samples a trend test needs before it may trigger.
    pub min_samples: u32,
    /// First samples after a (re)start or a change in the VM set that form the baseline of
    /// the change detector.
    pub baseline_samples: u32,
    /// Confidence of the trend test and of the slope's interval (e.g. 0.99).
    pub confidence: f64,
    /// Rejuvenate when a resource is expected to run out within this many seconds.
    pub horizon_secs: u64,
    /// The VMM's own memory (heap and anonymous RSS) may not exceed this; default the
    /// cgroup's `memory.max`, else no memory limit.
    pub memory_budget_mib: Option<u64>,
    /// An API request p99 above this is exhaustion of the latency objective.
    pub latency_objective_ms: Option<u64>,
    /// CUSUM reference value and decision interval, in baseline standard deviations.
    pub cusum_k: f64,
    pub cusum_h: f64,
    /// Consecutive signalling samples before a change counts ("fires and stays").
    pub cusum_persist: u32,
    /// A change counts only once the resource has used this share of its headroom (limit
    /// minus baseline): a small, slow leak is left to the trend test and its time to
    /// exhaustion instead of costing a reboot every time it is noticed. A resource without
    /// a limit never triggers by a change.
    pub change_min_fraction: f64,
    /// Time-based rejuvenation: warm-reboot once the process has run this long.
    pub schedule_secs: Option<u64>,
    /// Most rejuvenations per rolling hour (across warm reboots).
    pub max_per_hour: u32,
    /// UTC windows `"HH:MM-HH:MM"` in which rejuvenation may happen; empty: any time.
    /// Outside them only a resource about to run out (within a quarter of the horizon)
    /// triggers one.
    pub maintenance_windows: Vec<String>,
    /// Only alert: log, count and record the decision, never reboot.
    pub dry_run: bool,
    /// Start with rejuvenation on hold (the API can lift it).
    pub hold: bool,
}

impl Default for AgingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            period_ms: 10_000,
            history: 720,
            window: 60,
            min_samples: 20,
            baseline_samples: 10,
            confidence: 0.99,
            horizon_secs: 3600,
            memory_budget_mib: None,
            latency_objective_ms: None,
            cusum_k: 0.5,
            cusum_h: 10.0,
            cusum_persist: 5,
            change_min_fraction: 0.25,
            schedule_secs: None,
            max_per_hour: 2,
            maintenance_windows: Vec::new(),
            dry_run: false,
            hold: false,
        }
    }
}

/// A bad `[aging]` setting.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("[aging] {0}")]
pub struct AgingConfigError(pub String);

/// A maintenance window, minutes after UTC midnight; `start > end` wraps past midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start_min: u32,
    pub end_min: u32,
}

impl Window {
    pub fn parse(s: &str) -> Result<Self, AgingConfigError> {
        let bad = || {
            AgingConfigError(format!(
                "maintenance window {s:?}: use \"HH:MM-HH:MM\" (UTC)"
            ))
        };
        let hm = |t: &str| -> Result<u32, AgingConfigError> {
            let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
            let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if h > 23 || m > 59 {
                return Err(bad());
            }
            Ok(h * 60 + m)
        };
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let w = Self {
            start_min: hm(a)?,
            end_min: hm(b)?,
        };
        if w.start_min == w.end_min {
            return Err(AgingConfigError(format!(
                "maintenance window {s:?} is empty"
            )));
        }
        Ok(w)
    }

    pub fn contains(&self, minute_of_day: u32) -> bool {
        if self.start_min < self.end_min {
            (self.start_min..self.end_min).contains(&minute_of_day)
        } else {
            minute_of_day >= self.start_min || minute_of_day < self.end_min
        }
    }
}

impl AgingConfig {
    /// Check every value; the daemon refuses to start (or the handover's copy is dropped)
    /// on any error.
    pub fn validate(&self) -> Result<(), AgingConfigError> {
        let range = |name: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(AgingConfigError(format!(
                    "{name} = {v} is out of range: use {lo} to {hi}"
                )))
            }
        };
        range("period_ms", self.period_ms, 50, 3_600_000)?;
        range("history", self.history.into(), 16, 100_000)?;
        range("window", self.window.into(), 8, 400)?;
        range(
            "min_samples",
            self.min_samples.into(),
            8,
            self.window.into(),
        )?;
        range("baseline_samples", self.baseline_samples.into(), 3, 1000)?;
        range("horizon_secs", self.horizon_secs, 1, 365 * 86_400)?;
        range("cusum_persist", self.cusum_persist.into(), 1, 1000)?;
        range("max_per_hour", self.max_per_hour.into(), 0, 60)?;
        if let Some(m) = self.memory_budget_mib {
            range("memory_budget_mib", m, 16, 1 << 30)?;
        }
        if let Some(l) = self.latency_objective_ms {
            range("latency_objective_ms", l, 1, 600_000)?;
        }
        if let Some(s) = self.schedule_secs {
            range("schedule_secs", s, 10, 365 * 86_400)?;
        }
        if !(0.5..1.0).contains(&self.confidence) {
            return Err(AgingConfigError(format!(
                "confidence = {} is out of range: use 0.5 to 0.999...",
                self.confidence
            )));
        }
        if !(self.change_min_fraction.is_finite()
            && (0.0..=10.0).contains(&self.change_min_fraction))
        {
            return Err(AgingConfigError(format!(
                "change_min_fraction = {} is out of range: use 0 to 10",
                self.change_min_fraction
            )));
        }
        for (name, v) in [("cusum_k", self.cusum_k), ("cusum_h", self.cusum_h)] {
            if !(v.is_finite() && (0.0..=100.0).contains(&v)) {
                return Err(AgingConfigError(format!(
                    "{name} = {v} is out of range: use 0 to 100"
                )));
            }
        }
        if self.maintenance_windows.len() > 24 {
            return Err(AgingConfigError(
                "at most 24 maintenance windows".to_string(),
            ));
        }
        for w in &self.maintenance_windows {
            Window::parse(w)?;
        }
        Ok(())
    }

    pub fn windows(&self) -> Vec<Window> {
        self.maintenance_windows
            .iter()
            .filter_map(|w| Window::parse(w).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unknown_keys_refused() {
        AgingConfig::default().validate().unwrap();
        let c: AgingConfig = toml::from_str("period_ms = 500\ndry_run = true").unwrap();
        assert_eq!(c.period_ms, 500);
        assert!(c.dry_run);
        assert!(toml::from_str::<AgingConfig>("perod_ms = 500").is_err());
    }

    #[test]
    fn bad_values_are_refused_with_their_name() {
        let bad = |c: AgingConfig| c.validate().unwrap_err().0;
        let d = AgingConfig::default;
        assert!(bad(AgingConfig {
            period_ms: 1,
            ..d()
        })
        .contains("period_ms"));
        assert!(bad(AgingConfig {
            confidence: 1.0,
            ..d()
        })
        .contains("confidence"));
        assert!(bad(AgingConfig {
            min_samples: 100,
            ..d()
        })
        .contains("min_samples"));
        assert!(bad(AgingConfig {
            cusum_h: f64::NAN,
            ..d()
        })
        .contains("cusum_h"));
        assert!(bad(AgingConfig {
            maintenance_windows: vec!["25:00-01:00".into()],
            ..d()
        })
        .contains("HH:MM"));
    }

    #[test]
    fn windows_wrap_past_midnight() {
        let w = Window::parse("22:30-02:00").unwrap();
        assert!(w.contains(23 * 60));
        assert!(w.contains(60));
        assert!(!w.contains(12 * 60));
        let w = Window::parse("02:00-04:00").unwrap();
        assert!(w.contains(3 * 60));
        assert!(!w.contains(4 * 60));
    }
}
