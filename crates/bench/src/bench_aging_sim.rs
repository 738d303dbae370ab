//! The accelerated-time half of `warmvm bench aging`: the daemon's own detectors and policy
//! (warmvm-api's `aging::detect` and `aging::policy`, the very code that runs) fed with noise
//! recorded from a live daemon and replayed by a circular block bootstrap (blocks keep the
//! real series' autocorrelation), with or without a leak added.

use std::collections::BTreeMap;

use serde::Serialize;
use warmvm_api::aging::detect::Detectors;
use warmvm_api::aging::policy::{self, Action, Context};
use warmvm_api::aging::sample::Values;
use warmvm_api::aging::{Metric, RebootReason, Sample};
use warmvm_vmm::AgingConfig;

/// Samples of a live daemon, one series per metric, all of the same length.
#[derive(Clone, Debug, Serialize)]
pub struct Recording {
    pub period_ms: u64,
    pub samples: usize,
    pub series: BTreeMap<Metric, Vec<f64>>,
}

impl Recording {
    pub fn from_samples(samples: &[Sample], period_ms: u64) -> Option<Self> {
        let metrics: Vec<Metric> = Metric::ALL
            .into_iter()
            .filter(|m| samples.iter().all(|s| s.values.contains_key(m)))
            .collect();
        if samples.len() < 20 || metrics.is_empty() {
            return None;
        }
        let series = metrics
            .into_iter()
            .map(|m| {
                (
                    m,
                    samples
                        .iter()
                        .filter_map(|s| s.values.get(&m).copied())
                        .collect(),
                )
            })
            .collect();
        Some(Self {
            period_ms,
            samples: samples.len(),
            series,
        })
    }

    pub fn mean(&self, m: Metric) -> Option<f64> {
        let s = self.series.get(&m)?;
        Some(s.iter().sum::<f64>() / s.len() as f64)
    }
}

/// splitmix64: a small, well-known generator; the bench needs reproducible draws, not
/// cryptography, so no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// The recorded noise, replayed in blocks of consecutive samples (all metrics from the same
/// instants, so their cross-correlation stays too).
pub struct Replay<'a> {
    rec: &'a Recording,
    rng: Rng,
    block: usize,
    at: usize,
    left: usize,
}

impl<'a> Replay<'a> {
    pub fn new(rec: &'a Recording, seed: u64, block: usize) -> Self {
        Self {
            rec,
            rng: Rng::new(seed),
            block: block.max(1),
            at: 0,
            left: 0,
        }
    }

    pub fn next(&mut self) -> Values {
        if self.left == 0 {
            self.at = self.rng.below(self.rec.samples);
            self.left = self.block;
        }
        let i = self.at % self.rec.samples;
        self.at += 1;
        self.left -= 1;
        self.rec.series.iter().map(|(m, s)| (*m, s[i])).collect()
    }
}

/// A leak: `per_hour` added to `metric` (and to the memory figures that follow it).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Leak {
    pub metric: Metric,
    pub per_hour: f64,
}

impl Leak {
    /// The figures a leak of this kind raises: a touched heap leak shows in the heap in use,
    /// what the allocator holds and the anonymous RSS alike.
    fn raises(&self) -> &'static [Metric] {
        match self.metric {
            Metric::HeapInUseBytes | Metric::HeapResidentBytes | Metric::RssAnonBytes => &[
                Metric::HeapInUseBytes,
                Metric::HeapResidentBytes,
                Metric::RssAnonBytes,
            ],
            Metric::OpenFds => &[Metric::OpenFds],
            Metric::Threads => &[Metric::Threads],
            Metric::Mappings => &[Metric::Mappings],
            Metric::ApiLatencyP99Ms => &[Metric::ApiLatencyP99Ms],
        }
    }
}

/// One simulated trigger.
#[derive(Clone, Debug, Serialize)]
pub struct Trigger {
    pub t_hours: f64,
    pub action: String,
    pub reason: String,
}

/// What a simulated run saw.
#[derive(Clone, Debug, Serialize)]
pub struct SimRun {
    pub hours: f64,
    /// Warm reboots the policy ordered.
    pub reboots: Vec<Trigger>,
    /// Times a resource reached its limit before a rejuvenation (each would be a failure of
    /// the process and of every VM in it).
    pub exhaustions: u32,
    /// The leaking resource over time (hours, value), thinned for plots.
    pub trace: Vec<(f64, f64)>,
    /// The first warm reboot: when, with how much time left, and why.
    pub first_trigger: Option<FirstTrigger>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FirstTrigger {
    /// Hours from the start of the leak to the warm reboot.
    pub delay_hours: f64,
    /// Hours the resource still had before its limit at the leak's rate.
    pub lead_hours: f64,
    pub value: f64,
    pub reason: String,
}

/// Simulate `hours` of a daemon sampled every `cfg.period_ms`, with `leak` from `leak_from`
/// hours on (and again in every new process: the bug that leaks is in the code).
pub fn simulate(
    cfg: &AgingConfig,
    limits: &BTreeMap<Metric, f64>,
    rec: &Recording,
    leak: Option<Leak>,
    leak_from_hours: f64,
    hours: f64,
    seed: u64,
) -> SimRun {
    let period_h = cfg.period_ms as f64 / 3_600_000.0;
    let steps = (hours / period_h).ceil() as u64;
    let mut replay = Replay::new(rec, seed, 20);
    let mut det = Detectors::new(cfg);
    let mut pid = 1u32;
    let mut process_start = 0.0f64;
    let mut reboot_times: Vec<f64> = Vec::new();
    let mut run = SimRun {
        hours,
        reboots: Vec::new(),
        exhaustions: 0,
        trace: Vec::new(),
        first_trigger: None,
    };
    let trace_every = (steps / 2000).max(1);
    for step in 0..steps {
        let t = step as f64 * period_h;
        let mut values = replay.next();
        let leaked = leak.map_or(0.0, |l| {
            l.per_hour * (t - leak_from_hours.max(process_start)).max(0.0)
        });
        if let Some(l) = leak {
            for m in l.raises() {
                if let Some(v) = values.get(m).copied() {
                    values.insert(*m, v + leaked);
                }
            }
        }
        let watched = leak.map_or(Metric::HeapInUseBytes, |l| l.metric);
        if step % trace_every == 0 {
            if let Some(v) = values.get(&watched) {
                run.trace.push((t, *v));
            }
        }
        let exhausted = values
            .iter()
            .any(|(m, v)| limits.get(&m).is_some_and(|l| v >= *l));
        let sample = Sample {
            t_ms: (t * 3_600_000.0) as u64,
            pid,
            vms: 2,
            values,
        };
        let assessments = det.push(&sample, limits);
        if exhausted {
            // The process dies of it, with its VMs; a new one starts from scratch.
            run.exhaustions += 1;
            pid += 1;
            process_start = t;
            continue;
        }
        let ctx = Context {
            uptime_secs: (t - process_start) * 3600.0,
            minute_of_day: ((t * 60.0) as u64 % 1440) as u32,
            reboots_last_hour: reboot_times.iter().filter(|r| t - **r < 1.0).count() as u32,
            hold: false,
        };
        let Some(d) = policy::decide(cfg, &assessments, ctx) else {
            continue;
        };
        if d.action != Action::Reboot {
            continue;
        }
        if run.first_trigger.is_none() {
            let value = sample.values.get(&watched).copied().unwrap_or(0.0);
            let lead_hours = match (leak, limits.get(&watched)) {
                (Some(l), Some(limit)) if l.per_hour > 0.0 => (limit - value) / l.per_hour,
                _ => f64::INFINITY,
            };
            run.first_trigger = Some(FirstTrigger {
                delay_hours: t - leak_from_hours,
                lead_hours,
                value,
                reason: d.reason.to_string(),
            });
        }
        run.reboots.push(Trigger {
            t_hours: t,
            action: "reboot".into(),
            reason: match &d.reason {
                RebootReason::Aging { metric, detector } => {
                    format!("{metric} ({})", detector.name())
                }
                other => other.to_string(),
            },
        });
        reboot_times.push(t);
        pid += 1;
        process_start = t;
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat_recording() -> Recording {
        let samples: Vec<Sample> = (0..50)
            .map(|i| Sample {
                t_ms: i * 100,
                pid: 1,
                vms: 2,
                values: [
                    (Metric::HeapInUseBytes, 300_000.0 + (i % 5) as f64 * 1000.0),
                    (Metric::OpenFds, 22.0),
                ]
                .into_iter()
                .collect(),
            })
            .collect();
        Recording::from_samples(&samples, 100).unwrap()
    }

    fn cfg() -> AgingConfig {
        AgingConfig {
            period_ms: 60_000,
            ..AgingConfig::default()
        }
    }

    #[test]
    fn a_leak_is_caught_with_the_horizon_ahead_and_noise_alone_is_not() {
        let rec = flat_recording();
        let limits: BTreeMap<Metric, f64> = [(Metric::OpenFds, 1024.0)].into_iter().collect();
        let leak = Leak {
            metric: Metric::OpenFds,
            per_hour: 100.0,
        };
        let run = simulate(&cfg(), &limits, &rec, Some(leak), 1.0, 24.0, 1);
        let first = run.first_trigger.expect("the leak is caught");
        assert_eq!(run.exhaustions, 0);
        assert!(first.lead_hours >= 1.0, "{first:?}");
        let quiet = simulate(&cfg(), &limits, &rec, None, 0.0, 48.0, 2);
        assert!(quiet.reboots.is_empty(), "{:?}", quiet.reboots);
    }

    #[test]
    fn replay_draws_recorded_values_in_blocks() {
        let rec = flat_recording();
        let mut r = Replay::new(&rec, 7, 5);
        let a: Vec<f64> = (0..5)
            .map(|_| *r.next().get(&Metric::HeapInUseBytes).unwrap())
            .collect();
        // Consecutive recorded samples step by 1000 within a block (mod the wave of 5).
        let series = &rec.series[&Metric::HeapInUseBytes];
        let start = series.iter().position(|v| *v == a[0]).unwrap();
        for (k, v) in a.iter().enumerate() {
            assert_eq!(*v, series[(start + k) % series.len()], "{a:?}");
        }
    }
}
