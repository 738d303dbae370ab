//! Per-metric detectors over the stream of samples of one process: a trend test with the
//! time to exhaustion, and a change detector against the baseline recorded just after the
//! process (re)started. Shared by the daemon and by `warmvm bench aging`'s simulations, so
//! the bench measures the very code that runs.
//!
//! A "segment" is a run of samples from one process holding one number of VMs: creating or
//! deleting a VM legitimately moves fds, threads and memory, so a new segment starts a new
//! baseline and a new trend window rather than look like aging.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use warmvm_vmm::AgingConfig;

use super::sample::{Metric, Sample};
use super::stats::{self, Cusum};

/// What the detectors make of one metric after the latest sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    pub metric: Metric,
    pub value: f64,
    /// Mean of the segment's first samples.
    pub baseline: Option<f64>,
    pub limit: Option<f64>,
    /// Samples of this segment in the trend window.
    pub window: u32,
    /// Mann-Kendall (Hamed-Rao) z and two-sided p over the window.
    pub trend_z: Option<f64>,
    pub trend_p: Option<f64>,
    /// Sen's slope, and the low end of its interval at the configured confidence, per second.
    pub slope_per_sec: Option<f64>,
    pub slope_low_per_sec: Option<f64>,
    /// Seconds until the limit at Sen's slope, and at the low end of its interval (the
    /// estimate the policy trusts).
    pub exhaustion_secs: Option<f64>,
    pub exhaustion_secs_conservative: Option<f64>,
    /// The upper CUSUM, in baseline standard deviations, and for how many samples it has
    /// signalled.
    pub cusum: Option<f64>,
    pub change_samples: u32,
    /// The trend says the limit comes within the horizon.
    pub exhausting: bool,
    /// The change detector fired and stayed.
    pub changed: bool,
}

#[derive(Clone, Debug)]
struct Chart {
    cusum: Cusum,
    signalling: u32,
}

/// The detectors of one process.
#[derive(Clone, Debug)]
pub struct Detectors {
    cfg: AgingConfig,
    segment: Option<(u32, u32)>,
    window: VecDeque<Sample>,
    baseline_acc: Vec<Sample>,
    baselines: BTreeMap<Metric, f64>,
    charts: BTreeMap<Metric, Chart>,
}

impl Detectors {
    pub fn new(cfg: &AgingConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            segment: None,
            window: VecDeque::new(),
            baseline_acc: Vec::new(),
            baselines: BTreeMap::new(),
            charts: BTreeMap::new(),
        }
    }

    /// The baselines of the current segment, once recorded.
    pub fn baselines(&self) -> &BTreeMap<Metric, f64> {
        &self.baselines
    }

    fn reset(&mut self, segment: (u32, u32)) {
        self.segment = Some(segment);
        self.window.clear();
        self.baseline_acc.clear();
        self.baselines.clear();
        self.charts.clear();
    }

    fn record_baseline(&mut self) {
        let cfg = &self.cfg;
        for m in Metric::ALL {
            let v: Vec<f64> = self
                .baseline_acc
                .iter()
                .filter_map(|s| s.values.get(&m).copied())
                .collect();
            if v.len() < self.baseline_acc.len() || v.is_empty() {
                continue;
            }
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var =
                v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1).max(1) as f64;
            let sigma = var.sqrt().max(m.sigma_floor(mean));
            self.baselines.insert(m, mean);
            self.charts.insert(
                m,
                Chart {
                    cusum: Cusum::new(mean, sigma, cfg.cusum_k, cfg.cusum_h),
                    signalling: 0,
                },
            );
        }
    }

    /// Take one sample; assess every metric it carries.
    pub fn push(&mut self, sample: &Sample, limits: &BTreeMap<Metric, f64>) -> Vec<Assessment> {
        let segment = (sample.pid, sample.vms);
        if self.segment != Some(segment) {
            self.reset(segment);
        }
        self.window.push_back(sample.clone());
        while self.window.len() > self.cfg.window as usize {
            self.window.pop_front();
        }
        if self.baselines.is_empty() {
            self.baseline_acc.push(sample.clone());
            if self.baseline_acc.len() >= self.cfg.baseline_samples as usize {
                self.record_baseline();
            }
        } else {
            for (m, chart) in &mut self.charts {
                if let Some(v) = sample.values.get(m) {
                    if chart.cusum.push(*v) {
                        chart.signalling += 1;
                    } else {
                        chart.signalling = 0;
                    }
                }
            }
        }
        sample
            .values
            .iter()
            .map(|(m, v)| self.assess(m, v, limits.get(&m).copied()))
            .collect()
    }

    fn assess(&self, metric: Metric, value: f64, limit: Option<f64>) -> Assessment {
        let cfg = &self.cfg;
        let xs: Vec<f64> = self
            .window
            .iter()
            .filter_map(|s| s.values.get(&metric).copied())
            .collect();
        let chart = self.charts.get(&metric);
        let mut a = Assessment {
            metric,
            value,
            baseline: self.baselines.get(&metric).copied(),
            limit,
            window: xs.len() as u32,
            trend_z: None,
            trend_p: None,
            slope_per_sec: None,
            slope_low_per_sec: None,
            exhaustion_secs: None,
            exhaustion_secs_conservative: None,
            cusum: chart.map(|c| c.cusum.c),
            change_samples: chart.map_or(0, |c| c.signalling),
            exhausting: false,
            changed: false,
        };
        // A change is material once it has used a share of the headroom; a resource with no
        // limit (the API latency without an objective) is shown, never a trigger: the bench
        // found its p99, autocorrelated over 1024 requests, to be the one source of false
        // rejuvenations.
        if let (Some(c), Some(base), Some(l)) = (chart, a.baseline, limit) {
            let material = value - base >= cfg.change_min_fraction * (l - base);
            a.changed = c.signalling >= cfg.cusum_persist && material;
        }
        if xs.len() < cfg.min_samples as usize {
            return a;
        }
        let alpha = 1.0 - cfg.confidence;
        let Some(t) = stats::hamed_rao(&xs, alpha) else {
            return a;
        };
        let period = cfg.period_ms as f64 / 1000.0;
        let low = t.slope_low;
        a.trend_z = Some(t.z);
        a.trend_p = Some(t.p);
        a.slope_per_sec = Some(t.slope / period);
        a.slope_low_per_sec = Some(low / period);
        if let Some(limit) = limit {
            let fitted = t.intercept + t.slope * (xs.len() - 1) as f64;
            let level = value.max(fitted);
            let left = (limit - level).max(0.0);
            let tte = |slope: f64| (slope > 0.0).then(|| left / (slope / period));
            a.exhaustion_secs = tte(t.slope);
            a.exhaustion_secs_conservative = tte(low);
            a.exhausting = t.z > 0.0
                && t.p < alpha
                && a.exhaustion_secs_conservative
                    .is_some_and(|s| s < cfg.horizon_secs as f64);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AgingConfig {
        AgingConfig {
            period_ms: 1000,
            window: 30,
            min_samples: 15,
            baseline_samples: 10,
            horizon_secs: 180,
            change_min_fraction: 0.1,
            ..AgingConfig::default()
        }
    }

    fn sample(t: u64, vms: u32, fds: f64) -> Sample {
        Sample {
            t_ms: t * 1000,
            pid: 1,
            vms,
            values: [(Metric::OpenFds, fds)].into_iter().collect(),
        }
    }

    fn limits(fds: f64) -> BTreeMap<Metric, f64> {
        [(Metric::OpenFds, fds)].into_iter().collect()
    }

    #[test]
    fn a_steady_leak_is_seen_with_its_time_to_exhaustion() {
        let mut d = Detectors::new(&cfg());
        let mut last = None;
        // One fd a second from 40, with a wobble; the limit is 200.
        for t in 0..30 {
            let wobble = [0.0, 1.0, -1.0][t as usize % 3];
            last = d
                .push(&sample(t, 1, 40.0 + t as f64 + wobble), &limits(200.0))
                .pop();
        }
        let a = last.take().unwrap();
        let slope = a.slope_per_sec.unwrap();
        assert!((slope - 1.0).abs() < 0.05, "{a:?}");
        let tte = a.exhaustion_secs.unwrap();
        // 200 - ~69 fds at one a second.
        assert!((120.0..140.0).contains(&tte), "{a:?}");
        assert!(a.exhaustion_secs_conservative.unwrap() >= tte);
        assert!(a.exhausting, "{a:?}");
        assert!(a.changed, "the CUSUM sees the climb too: {a:?}");
        // The same climb against a far limit is not yet a material change.
        let mut d = Detectors::new(&cfg());
        for t in 0..30 {
            last = d
                .push(&sample(t, 1, 40.0 + t as f64), &limits(2000.0))
                .pop();
        }
        let a = last.unwrap();
        assert!(a.change_samples >= 5 && !a.changed, "{a:?}");
    }

    #[test]
    fn a_far_limit_or_no_trend_does_not_trigger() {
        let mut d = Detectors::new(&cfg());
        let mut last = None;
        for t in 0..30 {
            last = d
                .push(&sample(t, 1, 40.0 + t as f64), &limits(1_000_000.0))
                .pop();
        }
        assert!(!last.take().unwrap().exhausting);
        let mut d = Detectors::new(&cfg());
        for t in 0..60 {
            let noise = [0.0, 1.0, 2.0, 1.0][t as usize % 4];
            last = d.push(&sample(t, 1, 40.0 + noise), &limits(50.0)).pop();
        }
        let a = last.unwrap();
        assert!(!a.exhausting && !a.changed, "{a:?}");
    }

    #[test]
    fn a_new_vm_starts_a_new_baseline() {
        let mut d = Detectors::new(&cfg());
        for t in 0..20 {
            d.push(&sample(t, 1, 40.0), &limits(200.0));
        }
        assert_eq!(d.baselines().get(&Metric::OpenFds), Some(&40.0));
        // Ten more fds with the second VM: not a leak, a new segment.
        let a = d.push(&sample(20, 2, 50.0), &limits(200.0)).pop().unwrap();
        assert!(a.baseline.is_none() && !a.changed && a.window == 1, "{a:?}");
    }
}
