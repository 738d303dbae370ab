//! `warmvm aging`: the daemon's aging monitor (trends, slopes, time-to-exhaustion estimates,
//! the last and the next action), and `warmvm aging hold|release`.

use std::process::ExitCode;

use warmvm_api::aging::{AgingReport, RebootReason, RebootRecord, SettingsSource};
use warmvm_api::types::Mode;

use crate::args::{AgingAction, ApiArgs};
use crate::failure::{self, Failure};
use crate::output;

pub fn aging(action: Option<AgingAction>, api: &ApiArgs) -> Result<ExitCode, Failure> {
    let c = crate::client::client(api);
    let report = match action {
        None => c.typed().aging().map_err(failure::api)?,
        Some(a) => c
            .typed()
            .hold(matches!(a, AgingAction::Hold))
            .map_err(failure::api)?,
    };
    if api.json {
        output::print_json(&report.json);
    } else {
        print!("{}", render(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// A figure in the unit people read: MiB for bytes, plain otherwise.
fn figure(metric: &str, v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if metric.ends_with("_bytes") => format!("{:.1}M", x / (1u64 << 20) as f64),
        Some(x) if x.abs() >= 100.0 || x == x.trunc() => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn secs(v: Option<f64>) -> String {
    match v {
        None => "never".into(),
        Some(s) if s >= 86_400.0 => format!("{:.1}d", s / 86_400.0),
        Some(s) if s >= 3600.0 => format!("{:.1}h", s / 3600.0),
        Some(s) => format!("{s:.0}s"),
    }
}

pub fn render(r: &AgingReport) -> String {
    let yes = |v: bool| if v { "yes" } else { "no" };
    let mut out = format!(
        "aging monitor: {}, every {} ms, horizon {} s, dry run {}, hold {}; {} samples kept\n",
        if r.enabled { "on" } else { "off" },
        r.period_ms,
        r.horizon_secs,
        yes(r.dry_run),
        yes(r.hold),
        r.history_len,
    );
    out.push_str(&format!(
        "settings: {}\n",
        settings_source(r.settings_source, r.settings_from_pid)
    ));
    let rows = r
        .metrics
        .iter()
        .map(|m| {
            let name = m.metric.name();
            let slope = match m.slope_per_sec {
                Some(s) if name.ends_with("_bytes") => format!("{:.1}K", s / 1024.0),
                Some(s) => format!("{s:.3}"),
                None => "-".into(),
            };
            let state = if m.exhausting {
                "EXHAUSTING"
            } else if m.changed {
                "CHANGED"
            } else {
                "ok"
            };
            vec![
                name.to_string(),
                figure(name, Some(m.value)),
                figure(name, m.baseline),
                figure(name, m.limit),
                slope,
                m.trend_p.map_or("-".into(), |p| format!("{p:.1e}")),
                secs(m.exhaustion_secs_conservative),
                m.cusum.map_or("-".into(), |c| format!("{c:.1}")),
                state.to_string(),
            ]
        })
        .collect();
    out.push_str(&output::table(
        &[
            "METRIC",
            "VALUE",
            "BASELINE",
            "LIMIT",
            "SLOPE/S",
            "TREND P",
            "EXHAUSTED IN",
            "CUSUM",
            "STATE",
        ],
        rows,
        &[1, 2, 3, 4, 5, 6, 7],
    ));
    out.push('\n');
    match &r.last_action {
        Some(e) => out.push_str(&format!(
            "last action: {} for {} ({} ago): {}\n",
            e.action.name(),
            reason(&e.reason),
            ago(e.t_ms),
            e.detail,
        )),
        None => out.push_str("last action: none\n"),
    }
    out.push_str(&format!("next action: {}\n", r.next_action));
    if !r.reboots.is_empty() {
        out.push_str(&format!("warm reboots recorded: {}\n", r.reboots.len()));
        for b in r.reboots.iter().rev().take(5) {
            out.push_str(&format!(
                "  {} ago  {}  pid {} -> {}  {}\n",
                ago(b.t_ms),
                reason(&b.reason),
                b.from_pid,
                b.to_pid,
                pause(b)
            ));
        }
    }
    out
}

/// Why a reboot happened or was asked for: `manual`, `aging (open_fds, trend)`, ...
fn reason(r: &RebootReason) -> String {
    r.to_string()
}

/// Where the settings came from, as the daemon says (older daemons do not).
fn settings_source(source: Option<SettingsSource>, from_pid: Option<u32>) -> String {
    match source {
        Some(s) => s.describe(from_pid),
        None => "source not reported (an older daemon)".into(),
    }
}

/// A recorded reboot's mode and how long the guests were paused: a warm reboot's blackout;
/// a saved or cold one hands no VM over, so its guests' downtime (or "-" if unknown), never
/// a blackout of 0.
fn pause(b: &RebootRecord) -> String {
    let ms = |us: u64| format!("{:.3} ms", us as f64 / 1000.0);
    match b.mode {
        Some(mode @ (Mode::Saved | Mode::Cold)) => format!(
            "{}  downtime {}",
            mode.name(),
            b.downtime_us.map_or_else(|| "-".into(), ms)
        ),
        Some(mode) => format!("{}  blackout {}", mode.name(), ms(b.host_blackout_us)),
        // An older build's record: warm, saved or cold, it does not say.
        None => format!("blackout {}", ms(b.host_blackout_us)),
    }
}

fn ago(t_ms: u64) -> String {
    let now = warmvm_api::aging::sample::now_ms();
    secs(Some(now.saturating_sub(t_ms) as f64 / 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mode: Option<Mode>, host_blackout_us: u64, downtime_us: Option<u64>) -> RebootRecord {
        RebootRecord {
            t_ms: 0,
            reason: RebootReason::Manual,
            from_pid: 1,
            to_pid: 2,
            host_blackout_us,
            mode,
            downtime_us,
        }
    }

    #[test]
    fn saved_and_cold_reboots_show_their_downtime_not_a_blackout() {
        let warm = record(Some(Mode::Warm), 1234, None);
        assert_eq!(pause(&warm), "warm  blackout 1.234 ms");
        let saved = record(Some(Mode::Saved), 0, Some(812000));
        assert_eq!(pause(&saved), "saved  downtime 812.000 ms");
        let cold = record(Some(Mode::Cold), 0, None);
        assert_eq!(pause(&cold), "cold  downtime -");
        let older = record(None, 900, None);
        assert_eq!(pause(&older), "blackout 0.900 ms");
    }

    #[test]
    fn the_settings_say_where_they_came_from() {
        assert_eq!(
            settings_source(Some(SettingsSource::Configured), None),
            "configured"
        );
        assert_eq!(
            settings_source(Some(SettingsSource::Inherited), Some(41)),
            "inherited from pid 41"
        );
        assert!(settings_source(Some(SettingsSource::Unknown), None).ends_with("dry run"));
        assert!(settings_source(None, None).contains("not reported"));
    }

    /// An aging reason reads as the CLI always showed it: its metric and its detector.
    #[test]
    fn reasons_name_their_metric_and_detector() {
        let r = RebootReason::Aging {
            metric: warmvm_api::aging::sample::Metric::OpenFds,
            detector: warmvm_api::aging::policy::Detector::Trend,
        };
        assert_eq!(reason(&r), "aging (open_fds, trend)");
        assert_eq!(reason(&RebootReason::Schedule), "schedule");
    }
}
