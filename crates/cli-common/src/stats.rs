//! The p50/p99/max summaries of the demo's reboot chain and of the benches.

/// Fewest samples for which a 99th percentile is more than the maximum.
pub const P99_MIN_SAMPLES: usize = 100;

/// p50, p99 and max, in ms, of values in µs. The p99 is `None` with fewer than
/// [`P99_MIN_SAMPLES`] values: it would be the maximum under another name.
pub fn p50_p99_max(mut us: Vec<u64>) -> (f64, Option<f64>, f64) {
    us.sort_unstable();
    (
        percentile(&us, 0.5),
        (us.len() >= P99_MIN_SAMPLES).then(|| percentile(&us, 0.99)),
        percentile(&us, 1.0),
    )
}

/// The `p` quantile (0 to 1), in ms, of sorted values in µs; 0 for none.
pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}
