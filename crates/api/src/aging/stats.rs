//! The statistics behind aging detection: the Mann-Kendall trend test with Hamed and Rao's
//! variance correction for autocorrelated series, Sen's slope with its confidence interval,
//! and Page's one-sided CUSUM.
//!
//! Written here because no maintained Rust crate implements them (the crates.io candidates
//! for "mann-kendall" are unmaintained single-release crates without the Hamed-Rao
//! correction); the normal distribution comes from `libm`'s erfc. The formulas follow
//! pymannkendall 1.4.3 (`hamed_rao_modification_test`, `sens_slope`), scipy's `theilslopes`
//! for the slope's interval, and Montgomery's tabular CUSUM; the tests compare with their
//! outputs.

/// The standard normal CDF.
pub fn normal_cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
}

/// The standard normal quantile, by bisection on the CDF (monotone, and called rarely:
/// once per configuration).
pub fn normal_quantile(p: f64) -> f64 {
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let (mut lo, mut hi) = (-40.0f64, 40.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if normal_cdf(mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Mann-Kendall's S: the sum of sign(x_j - x_i) over every pair i < j.
pub fn mk_score(x: &[f64]) -> f64 {
    let mut s = 0i64;
    for (i, a) in x.iter().enumerate() {
        for b in &x[i + 1..] {
            s += match b.partial_cmp(a) {
                Some(std::cmp::Ordering::Greater) => 1,
                Some(std::cmp::Ordering::Less) => -1,
                _ => 0,
            };
        }
    }
    s as f64
}

/// The sizes of the groups of equal values (ties), groups of one included.
fn tie_groups(x: &[f64]) -> Vec<f64> {
    let mut sorted = x.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut groups = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i + 1;
        while j < sorted.len() && sorted[j] == sorted[i] {
            j += 1;
        }
        groups.push((j - i) as f64);
        i = j;
    }
    groups
}

/// Var(S) under independence, corrected for ties.
pub fn mk_variance(x: &[f64]) -> f64 {
    let n = x.len() as f64;
    let ties: f64 = tie_groups(x)
        .iter()
        .map(|t| t * (t - 1.0) * (2.0 * t + 5.0))
        .sum();
    (n * (n - 1.0) * (2.0 * n + 5.0) - ties) / 18.0
}

/// Ranks from 1, ties getting their average rank (scipy's `rankdata`).
pub fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i + 1;
        while j < order.len() && x[order[j]] == x[order[i]] {
            j += 1;
        }
        let avg = (i + j + 1) as f64 / 2.0;
        for &k in &order[i..j] {
            r[k] = avg;
        }
        i = j;
    }
    r
}

/// The sample autocorrelation at lags 0..n (the biased estimator: autocovariances divided
/// by n, as statsmodels' and pymannkendall's `acf`).
pub fn autocorrelation(x: &[f64]) -> Vec<f64> {
    let n = x.len();
    let mean = x.iter().sum::<f64>() / n as f64;
    let y: Vec<f64> = x.iter().map(|v| v - mean).collect();
    let c0: f64 = y.iter().map(|v| v * v).sum();
    (0..n)
        .map(|lag| {
            if c0 == 0.0 {
                return if lag == 0 { 1.0 } else { 0.0 };
            }
            y.iter().zip(&y[lag..]).map(|(a, b)| a * b).sum::<f64>() / c0
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Every pairwise slope (x_j - x_i) / (j - i), i < j, sorted.
fn pairwise_slopes(x: &[f64]) -> Vec<f64> {
    let mut d = Vec::with_capacity(x.len() * x.len().saturating_sub(1) / 2);
    for i in 0..x.len() {
        for j in i + 1..x.len() {
            d.push((x[j] - x[i]) / (j - i) as f64);
        }
    }
    d.sort_by(f64::total_cmp);
    d
}

/// Sen's slope (per sample) and pymannkendall's intercept: median(x) - median(0..n) * slope.
pub fn sens_slope(x: &[f64]) -> (f64, f64) {
    sens_slope_sorted(x, &mut pairwise_slopes(x))
}

fn sens_slope_sorted(x: &[f64], sorted_slopes: &mut [f64]) -> (f64, f64) {
    let slope = median(sorted_slopes);
    let mut xs = x.to_vec();
    let mid = (x.len() as f64 - 1.0) / 2.0;
    (slope, median(&mut xs) - mid * slope)
}

/// The confidence interval of Sen's slope (Gilbert 1987; scipy's `theilslopes` ranks):
/// the order statistics of the pairwise slopes at (N ∓ z·sqrt(var_s))/2, with `var_s` the
/// variance of S the caller trusts (corrected for autocorrelation or not).
pub fn sens_slope_interval(x: &[f64], var_s: f64, confidence: f64) -> (f64, f64) {
    interval_of(&pairwise_slopes(x), var_s, confidence)
}

fn interval_of(d: &[f64], var_s: f64, confidence: f64) -> (f64, f64) {
    if d.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let z = normal_quantile(1.0 - (1.0 - confidence) / 2.0);
    let nt = d.len() as f64;
    let sigma = var_s.max(0.0).sqrt();
    let upper = (((nt + z * sigma) / 2.0).round_ties_even() as i64).clamp(0, nt as i64 - 1);
    let lower = (((nt - z * sigma) / 2.0).round_ties_even() as i64 - 1).clamp(0, nt as i64 - 1);
    (d[lower as usize], d[upper as usize])
}

/// The result of a trend test on one window of samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trend {
    pub s: f64,
    /// Var(S) after the correction for autocorrelation.
    pub var_s: f64,
    pub z: f64,
    /// Two-sided p-value.
    pub p: f64,
    pub tau: f64,
    /// Sen's slope and intercept, per sample.
    pub slope: f64,
    pub intercept: f64,
    /// The interval of Sen's slope at the confidence asked for, from the corrected Var(S)
    /// ([`sens_slope_interval`]).
    pub slope_low: f64,
    pub slope_high: f64,
}

/// Mann-Kendall with Hamed and Rao's (1998) variance correction: the series is detrended by
/// Sen's slope, its ranks' significant autocorrelations (outside ±z/sqrt(n) at `alpha`)
/// inflate Var(S) by n/n*. As pymannkendall's `hamed_rao_modification_test(x, alpha)`,
/// all lags. None below 3 samples. The slope's interval is at confidence 1 - alpha.
pub fn hamed_rao(x: &[f64], alpha: f64) -> Option<Trend> {
    let n = x.len();
    if n < 3 {
        return None;
    }
    let nf = n as f64;
    let s = mk_score(x);
    let mut var_s = mk_variance(x);
    let tau = s / (0.5 * nf * (nf - 1.0));
    let mut slopes = pairwise_slopes(x);
    let (slope, intercept) = sens_slope_sorted(x, &mut slopes);
    let detrended: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, v)| v - (i + 1) as f64 * slope)
        .collect();
    let acf = autocorrelation(&ranks(&detrended));
    let bound = normal_quantile(1.0 - alpha / 2.0) / nf.sqrt();
    let mut sni = 0.0;
    for (i, r) in acf.iter().enumerate().skip(1) {
        if r.abs() > bound {
            let k = (n - i) as f64;
            sni += k * (k - 1.0) * (k - 2.0) * r;
        }
    }
    let n_ns = 1.0 + 2.0 / (nf * (nf - 1.0) * (nf - 2.0)) * sni;
    var_s *= n_ns;
    let z = if var_s <= 0.0 || s == 0.0 {
        0.0
    } else if s > 0.0 {
        (s - 1.0) / var_s.sqrt()
    } else {
        (s + 1.0) / var_s.sqrt()
    };
    let p = 2.0 * (1.0 - normal_cdf(z.abs()));
    let (slope_low, slope_high) = interval_of(&slopes, var_s, 1.0 - alpha);
    Some(Trend {
        s,
        var_s,
        z,
        p,
        tau,
        slope,
        intercept,
        slope_low,
        slope_high,
    })
}

/// Page's one-sided (upper) tabular CUSUM in standardised units: C_t = max(0, C_{t-1} +
/// (x_t - target)/sigma - k); it signals while C_t > h. `run` counts the samples since C
/// last was 0 (Montgomery's N+), so target + sigma·(k + C/run) estimates the shifted mean.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cusum {
    pub target: f64,
    pub sigma: f64,
    pub k: f64,
    pub h: f64,
    pub c: f64,
    pub run: u32,
}

impl Cusum {
    pub fn new(target: f64, sigma: f64, k: f64, h: f64) -> Self {
        Self {
            target,
            sigma,
            k,
            h,
            c: 0.0,
            run: 0,
        }
    }

    /// Add one sample; true while the chart signals.
    pub fn push(&mut self, x: f64) -> bool {
        self.c = (self.c + (x - self.target) / self.sigma - self.k).max(0.0);
        self.run = if self.c > 0.0 { self.run + 1 } else { 0 };
        self.c > self.h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1.0)
    }

    /// A short, autocorrelated, rising series with ties (a leak whose allocations come in
    /// bursts).
    const SERIES_A: [f64; 20] = [
        10.0, 11.0, 10.5, 12.0, 12.0, 11.8, 13.1, 12.9, 14.2, 13.7, 13.7, 15.0, 14.1, 16.3, 15.9,
        17.2, 16.8, 16.8, 18.4, 17.9,
    ];
    /// Noise with a wave and no trend: 30 samples of 5 + sin(i/2) + ((i*7) % 5)/10.
    fn series_b() -> Vec<f64> {
        (0..30)
            .map(|i| 5.0 + (i as f64 / 2.0).sin() + ((i * 7) % 5) as f64 / 10.0)
            .collect()
    }

    // Expected values: pymannkendall 1.4.3 (PyPI) under Python 3.11 with numpy 2.4.6 and scipy 1.17.1,
    // run once:
    //   import pymannkendall as mk; r = mk.hamed_rao_modification_test(x, alpha=0.05)
    // printing r.s, r.var_s, r.z, r.p, r.Tau, r.slope, r.intercept with repr().
    #[test]
    fn hamed_rao_matches_pymannkendall_on_a_rising_series() {
        let t = hamed_rao(&SERIES_A, 0.05).unwrap();
        assert_eq!(t.s, 163.0);
        // Plain Var(S) with ties is 947; the ranks' autocorrelation shrinks it.
        assert!(close(mk_variance(&SERIES_A), 947.0, 1e-12));
        assert!(close(t.var_s, 77.07774675590406, 1e-9), "{t:?}");
        assert!(close(t.z, 18.452300110322494, 1e-9), "{t:?}");
        assert!(t.p < 1e-15, "{t:?}");
        assert!(close(t.tau, 0.8578947368421053, 1e-12), "{t:?}");
        assert!(close(t.slope, 0.42000000000000015, 1e-12), "{t:?}");
        assert!(close(t.intercept, 9.909999999999997, 1e-12), "{t:?}");
    }

    #[test]
    fn hamed_rao_matches_pymannkendall_on_a_wave_without_trend() {
        let t = hamed_rao(&series_b(), 0.05).unwrap();
        assert_eq!(t.s, -9.0);
        assert!(close(mk_variance(&series_b()), 3141.6666666666665, 1e-12));
        assert!(close(t.var_s, 3802.804427066777, 1e-9), "{t:?}");
        assert!(close(t.z, -0.1297292751689993, 1e-9), "{t:?}");
        assert!(close(t.p, 0.8967806200498294, 1e-9), "{t:?}");
        assert!(close(t.tau, -0.020689655172413793, 1e-12), "{t:?}");
        assert!(close(t.slope, -0.0008315626309377458, 1e-9), "{t:?}");
        assert!(close(t.intercept, 5.340177656222439, 1e-9), "{t:?}");
    }

    // scipy 1.17.1 `scipy.stats.theilslopes(x, alpha=0.90)` on SERIES_A: (slope, intercept,
    // low_slope, high_slope); its variance is the plain tie-corrected one.
    #[test]
    fn sens_slope_interval_matches_scipy_theilslopes() {
        let (lo, hi) = sens_slope_interval(&SERIES_A, mk_variance(&SERIES_A), 0.90);
        assert!(close(lo, 0.37692307692307697, 1e-12), "{lo}");
        assert!(close(hi, 0.45454545454545453, 1e-12), "{hi}");
        // The trend test's own interval is the same computation over its corrected Var(S).
        let t = hamed_rao(&SERIES_A, 0.10).unwrap();
        assert_eq!(
            (t.slope_low, t.slope_high),
            sens_slope_interval(&SERIES_A, t.var_s, 0.90)
        );
    }

    #[test]
    fn normal_distribution() {
        assert!(close(normal_cdf(1.96), 0.9750021048517795, 1e-12));
        assert!(close(normal_quantile(0.975), 1.959963984540054, 1e-9));
        assert!(close(normal_quantile(0.5), 0.0, 1e-12));
    }

    #[test]
    fn ranks_average_ties() {
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
    }

    // Montgomery, Introduction to Statistical Quality Control (6th ed.), Example 9.1 and
    // Table 9.2: 30 samples, mu0 = 10, sigma = 1, k = 0.5, h = 5. The upper CUSUM first
    // exceeds h at sample 29 with C+ = 5.28 and N+ = 7, and the new mean is estimated at
    // 10 + 0.5 + 5.28/7 = 11.25.
    #[test]
    fn cusum_reproduces_montgomery_example_9_1() {
        let x = [
            9.45, 7.99, 9.29, 11.66, 12.16, 10.18, 8.04, 11.46, 9.20, 10.34, 9.03, 11.47, 10.51,
            9.40, 10.08, 9.37, 10.62, 10.31, 8.52, 10.84, 10.90, 9.33, 12.29, 11.50, 10.60, 11.08,
            10.38, 11.62, 11.31, 10.52,
        ];
        let mut c = Cusum::new(10.0, 1.0, 0.5, 5.0);
        let signals: Vec<bool> = x.iter().map(|&v| c.push(v)).collect();
        let first = signals.iter().position(|&s| s).map(|i| i + 1);
        assert_eq!(first, Some(29));
        let mut c = Cusum::new(10.0, 1.0, 0.5, 5.0);
        for &v in &x[..29] {
            c.push(v);
        }
        assert!(close(c.c, 5.28, 1e-9), "{c:?}");
        assert_eq!(c.run, 7);
        let shifted = c.target + c.sigma * (c.k + c.c / c.run as f64);
        assert!((shifted - 11.25).abs() < 0.005, "{shifted}");
    }
}
