//! Where a guest's pause in a warm reboot goes: each VM's gap between heartbeats in the KVM
//! trace (`bench_pause`) across the reboot, laid over the reboot's own stamps
//! ([`warmvm_vmm::handover::pause_segments`]) as consecutive segments that add up to it.

use serde_json::{json, Value};
use warmvm_vmm::handover::pause_segments::{pause_segments, PauseSegments, SEGMENTS};
use warmvm_vmm::handover::{RebootReport, RebootStamps};

/// A trace time (CLOCK_MONOTONIC seconds, printed to the µs) in ns.
fn ns(t: f64) -> u64 {
    (t * 1e9).round() as u64
}

/// The guest's last beat before its pause and first beat after, in ns, as the reboot's
/// stamps place them: the beats on either side of the time every vCPU of the VM was stopped
/// (its last vCPU stopping to its first running again). Not the window's longest gap: on a
/// loaded host the guest may stall longer elsewhere in the window.
fn gap_across(beats: &[f64], stamps: &RebootStamps, vm: &str) -> Result<(u64, u64), String> {
    let v = stamps
        .vms
        .iter()
        .find(|v| v.name == vm)
        .ok_or("no stamps of its vCPUs (a build without stamps took part)")?;
    let recorded = |t: &[u64]| !t.is_empty() && !t.contains(&0);
    if !recorded(&v.vcpu_stops_ns) || !recorded(&v.vcpu_runs_ns) {
        return Err("its vCPU stamps are not all recorded".into());
    }
    let last_stop = v.vcpu_stops_ns.iter().copied().max().unwrap_or(0);
    let first_run = v.vcpu_runs_ns.iter().copied().min().unwrap_or(0);
    let beats: Vec<u64> = beats.iter().map(|&t| ns(t)).collect();
    let before = beats.partition_point(|&t| t <= last_stop);
    let after = beats.partition_point(|&t| t < first_run);
    if before == 0 || after >= beats.len() {
        return Err("the trace has no beat before its vCPUs stopped or none after they ran".into());
    }
    if after != before {
        return Err(format!(
            "the guest beat {} times while all its vCPUs were stopped: the trace is not this VM's",
            after - before
        ));
    }
    Ok((beats[before - 1], beats[after]))
}

/// One VM's pause in one reboot (both counted from 1), laid out.
#[derive(Clone, Debug)]
pub struct Sample {
    pub reboot: usize,
    pub vm: String,
    pub pause: PauseSegments,
}

/// Each reboot's pause of each VM as segments: the measured ones, and why the others are
/// not (`reports[i]` is reboot `i`'s report, `None` when it gave none).
pub fn collect(
    per_vm: &[Vec<f64>],
    names: &[String],
    reports: &[Option<RebootReport>],
) -> (Vec<Sample>, Vec<String>) {
    let mut measured = Vec::new();
    let mut not = Vec::new();
    for (i, report) in reports.iter().enumerate() {
        for (beats, name) in per_vm.iter().zip(names) {
            let laid = match report {
                None => Err("no report".to_string()),
                Some(r) if !r.is_measured() => Err(format!(
                    "the report is not a measurement: {}",
                    r.errors.join("; ")
                )),
                Some(r) => gap_across(beats, &r.stamps, name).and_then(|(last, first)| {
                    pause_segments(&r.stamps, name, last, first).map_err(|e| e.to_string())
                }),
            };
            match laid {
                Ok(pause) => measured.push(Sample {
                    reboot: i + 1,
                    vm: name.clone(),
                    pause,
                }),
                Err(why) => not.push(format!("reboot {}, VM {name}: {why}", i + 1)),
            }
        }
    }
    (measured, not)
}

/// Index of the `p` quantile in `n` sorted values (nearest rank), as the demo's figures.
fn rank(n: usize, p: f64) -> usize {
    (((n as f64 - 1.0) * p).round() as usize).min(n.saturating_sub(1))
}

/// Fewest samples for which a p99 is more than the maximum under another name.
const P99_MIN_SAMPLES: usize = warmvm_cli_common::stats::P99_MIN_SAMPLES;

/// The table's figures, µs: the segments of the sample whose pause is the p50 (and the p99)
/// one, which add up to that pause; and each segment's own p50 and p99 over all samples
/// (which do not add up: each comes from another reboot). p99s are null below
/// [`P99_MIN_SAMPLES`] samples; the maximum is given instead. Every sample too, with its
/// reboot and VM, so that the table can be checked against them.
pub fn summary(samples: &[Sample], not_measured: &[String]) -> Value {
    let us = |ns: u64| ns as f64 / 1e3;
    let sample = |s: &Sample| {
        json!({
            "reboot": s.reboot,
            "vm": s.vm,
            "pause_us": us(s.pause.pause_ns),
            "segments_us": s.pause.segments.iter().map(|&x| us(x)).collect::<Vec<_>>(),
        })
    };
    let measured: Vec<&PauseSegments> = samples.iter().map(|s| &s.pause).collect();
    let mut by_pause: Vec<&Sample> = samples.iter().collect();
    by_pause.sort_by_key(|s| s.pause.pause_ns);
    let n = by_pause.len();
    let enough = n >= P99_MIN_SAMPLES;
    let at = |p: f64| -> Value { by_pause.get(rank(n, p)).map_or(Value::Null, |s| sample(s)) };
    let per_segment: Vec<Value> = SEGMENTS
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let mut v: Vec<u64> = measured.iter().map(|s| s.segments[k]).collect();
            v.sort_unstable();
            let q = |p: f64| v.get(rank(v.len(), p)).map(|&x| us(x));
            json!({
                "segment": name,
                "p50_us": q(0.5),
                "p99_us": if enough { q(0.99) } else { None },
                "max_us": v.last().map(|&x| us(x)),
            })
        })
        .collect();
    json!({
        "segments": SEGMENTS,
        "measured": n,
        "p50_reboot": at(0.5),
        "p99_reboot": if enough { at(0.99) } else { Value::Null },
        "max_reboot": at(1.0),
        "per_segment": per_segment,
        "not_measured": not_measured,
        "samples": samples.iter().map(sample).collect::<Vec<_>>(),
    })
}

/// The table of [`summary`], for a cell of `vms` VMs.
pub fn table_text(vms: &Value, s: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |v| format!("{v:.0}"));
    let p99 = if s["p99_reboot"].is_null() {
        "max"
    } else {
        "p99"
    };
    let tail = if s["p99_reboot"].is_null() {
        &s["max_reboot"]
    } else {
        &s["p99_reboot"]
    };
    let mut rows: Vec<Vec<String>> = SEGMENTS
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let seg = &s["per_segment"][k];
            vec![
                name.to_string(),
                f(&s["p50_reboot"]["segments_us"][k]),
                f(&tail["segments_us"][k]),
                f(&seg["p50_us"]),
                f(if p99 == "p99" {
                    &seg["p99_us"]
                } else {
                    &seg["max_us"]
                }),
            ]
        })
        .collect();
    rows.push(vec![
        "= guest pause".into(),
        f(&s["p50_reboot"]["pause_us"]),
        f(&tail["pause_us"]),
        "".into(),
        "".into(),
    ]);
    let _ = writeln!(
        out,
        "warm reboot, {vms} VMs: the guest's pause in segments, us ({} pauses measured, {} not); the {p99} and p50 pauses' own segments add up to them, a segment's own {p99} and p50 are over all pauses:",
        s["measured"],
        s["not_measured"].as_array().map_or(0, Vec::len),
    );
    let col_p = format!("{p99} PAUSE");
    let col_s = format!("SEGMENT {p99}");
    let _ = writeln!(
        out,
        "{}",
        warmvm_cli_common::output::table(
            &["SEGMENT", "p50 PAUSE", &col_p, "SEGMENT p50", &col_s],
            rows,
            &[1, 2, 3, 4],
        )
    );
    if let Some(why) = s["not_measured"].as_array().and_then(|a| a.first()) {
        let _ = writeln!(out, "not measured, e.g.: {}", why.as_str().unwrap_or(""));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use warmvm_vmm::handover::{RebootStamps, VmStamps};

    fn report(base: u64) -> RebootReport {
        RebootReport {
            stamps: RebootStamps {
                pause_requested_ns: base + 1_000,
                captured_ns: base + 5_000,
                state_sent_ns: base + 6_000,
                state_received_ns: base + 7_000,
                restored_ns: base + 9_000,
                commit_ns: base + 10_000,
                vms: vec![VmStamps {
                    name: "a".into(),
                    vcpu_stops_ns: vec![base + 2_000],
                    vcpu_runs_ns: vec![base + 11_000],
                }],
            },
            ..Default::default()
        }
    }

    #[test]
    fn each_reboots_gap_is_laid_over_its_own_report() {
        // Beats every µs (the trace's resolution) with a longer stall before each reboot,
        // then a gap from 2 µs before its pause request to 1 µs after its vCPU ran (13 µs
        // in all); the second reboot gave no report, the third's VM beat while stopped.
        let base = [1_000_000_000u64, 2_000_000_000, 3_000_000_000];
        let mut beats: Vec<f64> = Vec::new();
        for b in base {
            let b = b as f64 / 1e9;
            beats.extend((0..5).map(|i| b - 100e-6 + i as f64 * 1e-6));
            beats.extend((0..20).map(|i| b - 20e-6 + i as f64 * 1e-6));
            beats.extend((0..20).map(|i| b + 12e-6 + i as f64 * 1e-6));
        }
        beats.push(3.000_005);
        beats.sort_by(f64::total_cmp);
        let (m, not) = collect(
            &[beats],
            &["a".into()],
            &[Some(report(base[0])), None, Some(report(base[2]))],
        );
        assert_eq!(not.len(), 2, "{not:?}");
        assert_eq!(not[0], "reboot 2, VM a: no report");
        assert!(
            not[1].contains("beat 1 times while all its vCPUs"),
            "{not:?}"
        );
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].reboot, m[0].vm.as_str()), (1, "a"));
        let p = &m[0].pause;
        assert_eq!(p.pause_ns, 13_000);
        assert_eq!(p.segments.iter().sum::<u64>(), 13_000);
        assert_eq!(p.segments[0], 2_000);
        assert_eq!(p.segments[10], 1_000);
        let s = summary(&m, &not);
        assert_eq!(s["p50_reboot"]["pause_us"], 13.0);
        assert!(s["p99_reboot"].is_null(), "{s:#}");
        let text = table_text(&json!(1), &s);
        assert!(text.contains("= guest pause"), "{text}");
        assert!(text.contains("reboot 2, VM a: no report"), "{text}");
    }

    #[test]
    fn the_p50_and_p99_columns_are_whole_pauses_that_add_up() {
        let seg = |k: u64| Sample {
            reboot: k as usize,
            vm: "a".into(),
            pause: PauseSegments {
                pause_ns: 11 * k * 1_000,
                segments: [k * 1_000; 11],
            },
        };
        let m: Vec<Sample> = (1..=200).rev().map(seg).collect();
        let s = summary(&m, &[]);
        for col in ["p50_reboot", "p99_reboot", "max_reboot"] {
            let sum: f64 = s[col]["segments_us"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .sum();
            assert_eq!(sum, s[col]["pause_us"].as_f64().unwrap(), "{col}");
        }
        // 200 samples: rank round(199 * 0.5) = 100 (k = 101), round(199 * 0.99) = 197.
        assert_eq!(s["p50_reboot"]["pause_us"], 11.0 * 101.0);
        assert_eq!(s["p50_reboot"]["reboot"], 101);
        assert_eq!(s["samples"].as_array().map(Vec::len), Some(200));
        assert_eq!(s["p99_reboot"]["pause_us"], 11.0 * 198.0);
        assert_eq!(s["per_segment"][3]["p99_us"], 198.0);
    }
}
