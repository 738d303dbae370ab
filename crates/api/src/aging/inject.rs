//! Injected aging, for tests and demos only (the `fault-injection` build's
//! `PUT /v1/debug/aging`): leak heap, fds or threads, fragment the heap, or slow every API
//! request, at set rates. The leaks stay in this process: a warm reboot sheds them, which is
//! the point.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;

/// Added to every API request's handling time.
static LATENCY_MS: AtomicU64 = AtomicU64::new(0);

/// Rates of injected aging; each field is optional and 0 means none.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Injection {
    pub heap_bytes_per_sec: u64,
    pub fds_per_sec: u64,
    pub threads_per_sec: u64,
    /// Heap allocated in small blocks of which every other one is freed, in holes no later
    /// request fits: the allocator holds about half of this per second unused.
    pub fragment_bytes_per_sec: u64,
    pub latency_ms: u64,
    /// Fill the monitor's history, events and reboot history to their bounds at once (see
    /// `Monitor::fill_to_bounds`).
    pub fill_to_bounds: bool,
}

/// Caps, so that a typo cannot take the test machine down.
const MAX_HEAP_PER_SEC: u64 = 256 << 20;
const MAX_FDS_PER_SEC: u64 = 10_000;
const MAX_THREADS_PER_SEC: u64 = 100;
const MAX_LATENCY_MS: u64 = 1000;

impl Injection {
    pub fn check(&self) -> Result<(), String> {
        for (name, v, max) in [
            (
                "heap_bytes_per_sec",
                self.heap_bytes_per_sec,
                MAX_HEAP_PER_SEC,
            ),
            (
                "fragment_bytes_per_sec",
                self.fragment_bytes_per_sec,
                MAX_HEAP_PER_SEC,
            ),
            ("fds_per_sec", self.fds_per_sec, MAX_FDS_PER_SEC),
            ("threads_per_sec", self.threads_per_sec, MAX_THREADS_PER_SEC),
            ("latency_ms", self.latency_ms, MAX_LATENCY_MS),
        ] {
            if v > max {
                return Err(format!("{name} = {v} exceeds {max}"));
            }
        }
        Ok(())
    }
}

/// The delay every API request takes now.
pub fn request_delay() -> Duration {
    Duration::from_millis(LATENCY_MS.load(Ordering::Relaxed))
}

/// Start leaking at these rates (in addition to any leak already started).
pub fn start(inj: Injection) -> std::io::Result<()> {
    LATENCY_MS.store(inj.latency_ms, Ordering::Relaxed);
    if inj.heap_bytes_per_sec == 0
        && inj.fds_per_sec == 0
        && inj.threads_per_sec == 0
        && inj.fragment_bytes_per_sec == 0
    {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("warmvm-inject-aging".into())
        .spawn(move || leak(inj))
        .map(drop)
}

fn leak(inj: Injection) {
    const TICKS_PER_SEC: u64 = 10;
    let mut kept: Vec<Box<[u8]>> = Vec::new();
    let mut fds: Vec<std::fs::File> = Vec::new();
    let mut tick = 0u64;
    // Rates spread over ticks without losing the remainder.
    let due =
        |rate: u64, tick: u64| rate * (tick + 1) / TICKS_PER_SEC - rate * tick / TICKS_PER_SEC;
    loop {
        std::thread::sleep(Duration::from_millis(1000 / TICKS_PER_SEC));
        let heap = due(inj.heap_bytes_per_sec, tick) as usize;
        if heap > 0 {
            // Touched, so it is resident as well as allocated.
            kept.push(vec![0xa5u8; heap].into_boxed_slice());
        }
        let frag = due(inj.fragment_bytes_per_sec, tick) as usize;
        if frag > 0 {
            // Every other block is freed; the blocks grow from tick to tick, so no later
            // request fits a hole left before and the holes never coalesce (a kept block
            // sits between any two): half of it stays held by the allocator, unused.
            let size = 256 + 32 * (tick % 2000) as usize;
            let blocks: Vec<Box<[u8]>> = (0..frag / size)
                .map(|i| vec![i as u8; size].into_boxed_slice())
                .collect();
            kept.extend(blocks.into_iter().step_by(2));
        }
        for _ in 0..due(inj.fds_per_sec, tick) {
            match std::fs::File::open("/dev/null") {
                Ok(f) => fds.push(f),
                Err(e) => {
                    tracing::warn!(error = %e, "injected fd leak: cannot open more");
                    break;
                }
            }
        }
        for _ in 0..due(inj.threads_per_sec, tick) {
            let spawned = std::thread::Builder::new()
                .name("warmvm-leaked".into())
                .stack_size(64 << 10)
                .spawn(|| loop {
                    std::thread::park();
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "injected thread leak: cannot start more");
                break;
            }
        }
        tick += 1;
    }
}
