//! One sample of the VMM's own resources, and where each figure comes from.
//!
//! The heap figures come from glibc's `mallinfo2()`, the allocator this binary already uses:
//! in use (`uordblks + hblkhd`) and held from the system (`arena + hblkhd`), whose gap is
//! fragmentation. jemalloc (tikv-jemallocator) would give the same two figures through its
//! ctl interface, but only by replacing the allocator of every thread (vCPU threads
//! included) and compiling jemalloc's C sources into every build, for two numbers glibc
//! already keeps; `mallinfo2` walks each arena's free lists, which at one call per period
//! (seconds) costs microseconds. RSS is `RssAnon` (guest RAM is shared memfd memory, which
//! `RssShmem` counts, so the VMM's own growth is not drowned in it).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A resource the monitor watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Bytes the allocator has handed out and not got back.
    HeapInUseBytes,
    /// Bytes the allocator holds from the system (in use plus fragmentation).
    HeapResidentBytes,
    /// Anonymous resident memory of the process (not guest RAM).
    RssAnonBytes,
    OpenFds,
    Threads,
    /// Entries of /proc/self/maps.
    Mappings,
    /// The p99 of the last API requests' handling time (only from 100 requests on).
    ApiLatencyP99Ms,
}

impl Metric {
    pub const ALL: [Metric; 7] = [
        Metric::HeapInUseBytes,
        Metric::HeapResidentBytes,
        Metric::RssAnonBytes,
        Metric::OpenFds,
        Metric::Threads,
        Metric::Mappings,
        Metric::ApiLatencyP99Ms,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::HeapInUseBytes => "heap_in_use_bytes",
            Metric::HeapResidentBytes => "heap_resident_bytes",
            Metric::RssAnonBytes => "rss_anon_bytes",
            Metric::OpenFds => "open_fds",
            Metric::Threads => "threads",
            Metric::Mappings => "mappings",
            Metric::ApiLatencyP99Ms => "api_latency_p99_ms",
        }
    }

    /// The smallest standard deviation the change detector assumes: below it, a quiet
    /// baseline (a constant fd count) would make any legitimate step an alarm.
    pub fn sigma_floor(self, baseline: f64) -> f64 {
        let relative = 0.02 * baseline.abs();
        let absolute = match self {
            Metric::HeapInUseBytes | Metric::HeapResidentBytes | Metric::RssAnonBytes => {
                (1u64 << 20) as f64
            }
            Metric::OpenFds | Metric::Threads => 2.0,
            Metric::Mappings => 8.0,
            Metric::ApiLatencyP99Ms => 1.0,
        };
        relative.max(absolute)
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One sample: when, which process, how many VMs it held, and each figure it could read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub t_ms: u64,
    pub pid: u32,
    pub vms: u32,
    pub values: Values,
}

/// The figures of one sample, each absent when it could not be read. Inline fields rather
/// than a map: the history is a preallocated ring of these, so the monitor's own memory does
/// not grow with it (it would look like a leak of the process it watches).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Values {
    // Absent means "not measured" (e.g. the latency before 100 requests), not a default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    heap_in_use_bytes: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    heap_resident_bytes: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rss_anon_bytes: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    open_fds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    threads: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mappings: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_latency_p99_ms: Option<f64>,
}

impl Values {
    fn slot(&mut self, m: Metric) -> &mut Option<f64> {
        match m {
            Metric::HeapInUseBytes => &mut self.heap_in_use_bytes,
            Metric::HeapResidentBytes => &mut self.heap_resident_bytes,
            Metric::RssAnonBytes => &mut self.rss_anon_bytes,
            Metric::OpenFds => &mut self.open_fds,
            Metric::Threads => &mut self.threads,
            Metric::Mappings => &mut self.mappings,
            Metric::ApiLatencyP99Ms => &mut self.api_latency_p99_ms,
        }
    }

    pub fn get(&self, m: &Metric) -> Option<&f64> {
        match m {
            Metric::HeapInUseBytes => self.heap_in_use_bytes.as_ref(),
            Metric::HeapResidentBytes => self.heap_resident_bytes.as_ref(),
            Metric::RssAnonBytes => self.rss_anon_bytes.as_ref(),
            Metric::OpenFds => self.open_fds.as_ref(),
            Metric::Threads => self.threads.as_ref(),
            Metric::Mappings => self.mappings.as_ref(),
            Metric::ApiLatencyP99Ms => self.api_latency_p99_ms.as_ref(),
        }
    }

    pub fn insert(&mut self, m: Metric, v: f64) {
        *self.slot(m) = Some(v);
    }

    pub fn contains_key(&self, m: &Metric) -> bool {
        self.get(m).is_some()
    }

    /// The figures present, in [`Metric::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Metric, f64)> + '_ {
        Metric::ALL
            .into_iter()
            .filter_map(|m| self.get(&m).map(|v| (m, *v)))
    }
}

impl FromIterator<(Metric, f64)> for Values {
    fn from_iter<I: IntoIterator<Item = (Metric, f64)>>(iter: I) -> Self {
        let mut v = Values::default();
        for (m, x) in iter {
            v.insert(m, x);
        }
        v
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The allocator's view: (in use, held from the system), in bytes.
pub fn heap() -> (u64, u64) {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct; glibc locks each
    // arena while it reads it.
    let m = unsafe { libc::mallinfo2() };
    ((m.uordblks + m.hblkhd) as u64, (m.arena + m.hblkhd) as u64)
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Read every figure of this process now; `api_p99_ms` comes from the server's timings.
pub fn read(vms: u32, api_p99_ms: Option<f64>) -> Sample {
    let mut values = Values::default();
    let (in_use, resident) = heap();
    values.insert(Metric::HeapInUseBytes, in_use as f64);
    values.insert(Metric::HeapResidentBytes, resident as f64);
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(kib) = status_kib(&status, "RssAnon:") {
            values.insert(Metric::RssAnonBytes, (kib * 1024) as f64);
        }
        if let Some(t) = status_kib(&status, "Threads:") {
            values.insert(Metric::Threads, t as f64);
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The directory's own fd is listed while it is read.
        values.insert(Metric::OpenFds, dir.count().saturating_sub(1) as f64);
    }
    if let Ok(maps) = std::fs::read("/proc/self/maps") {
        values.insert(
            Metric::Mappings,
            maps.iter().filter(|&&b| b == b'\n').count() as f64,
        );
    }
    if let Some(p) = api_p99_ms {
        values.insert(Metric::ApiLatencyP99Ms, p);
    }
    Sample {
        t_ms: now_ms(),
        pid: std::process::id(),
        vms,
        values,
    }
}

/// The limits a resource runs out against, read from the process and its cgroup.
pub fn limits(
    memory_budget_mib: Option<u64>,
    latency_objective_ms: Option<u64>,
) -> BTreeMap<Metric, f64> {
    let mut limits = BTreeMap::new();
    let memory = memory_budget_mib
        .map(|m| (m << 20) as f64)
        .or_else(|| cgroup_value("memory.max"));
    if let Some(m) = memory {
        for metric in [
            Metric::HeapInUseBytes,
            Metric::HeapResidentBytes,
            Metric::RssAnonBytes,
        ] {
            limits.insert(metric, m);
        }
    }
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0
        && rl.rlim_cur != libc::RLIM_INFINITY
    {
        limits.insert(Metric::OpenFds, rl.rlim_cur as f64);
    }
    // The cgroup's pids.max, else the kernel's threads-max.
    let threads = cgroup_value("pids.max").or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/threads-max")
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
    });
    if let Some(t) = threads {
        limits.insert(Metric::Threads, t);
    }
    if let Some(m) = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
    {
        limits.insert(Metric::Mappings, m);
    }
    if let Some(l) = latency_objective_ms {
        limits.insert(Metric::ApiLatencyP99Ms, l as f64);
    }
    limits
}

/// A numeric file of this process's cgroup (v2); None for "max" or no cgroup v2.
fn cgroup_value(file: &str) -> Option<f64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let text = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/{file}")).ok()?;
    text.trim().parse().ok()
}

/// The p99 of request handling times, from 100 samples on (below that it would be the
/// maximum under another name).
pub fn p99(samples: &mut [f64]) -> Option<f64> {
    if samples.len() < 100 {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let rank = (0.99 * samples.len() as f64).ceil() as usize;
    Some(samples[rank.clamp(1, samples.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_reads_every_process_figure() {
        let s = read(0, None);
        for m in [
            Metric::HeapInUseBytes,
            Metric::HeapResidentBytes,
            Metric::RssAnonBytes,
            Metric::OpenFds,
            Metric::Threads,
            Metric::Mappings,
        ] {
            assert!(s.values.get(&m).is_some_and(|v| *v > 0.0), "{m}: {s:?}");
        }
        assert!(!s.values.contains_key(&Metric::ApiLatencyP99Ms));
    }

    #[test]
    fn heap_in_use_follows_allocations() {
        let before = heap().0;
        let block = vec![1u8; 8 << 20];
        let during = heap().0;
        // Other tests allocate and free meanwhile: a margin of 1 MiB.
        assert!(during >= before + (7 << 20), "{before} -> {during}");
        assert_eq!(block[12345], 1);
        drop(block);
        let after = heap().0;
        assert!(after + (7 << 20) <= during, "{during} -> {after}");
    }

    #[test]
    fn sample_state_round_trips_and_is_strict() {
        let s = read(2, Some(3.5));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Sample>(&json).unwrap(), s);
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v.as_object_mut().unwrap().remove("vms");
        assert!(serde_json::from_value::<Sample>(v).is_err());
    }

    #[test]
    fn p99_needs_100_samples() {
        let mut few: Vec<f64> = (1..=99).map(f64::from).collect();
        assert_eq!(p99(&mut few), None);
        let mut many: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(p99(&mut many), Some(198.0));
    }
}
