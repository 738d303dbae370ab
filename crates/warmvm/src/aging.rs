//! `warmvm aging`: the daemon's aging monitor (trends, slopes, time-to-exhaustion estimates,
//! the last and the next action), and `warmvm aging hold|release`.

use std::process::ExitCode;

use serde_json::Value;

use crate::args::{AgingAction, ApiArgs};
use crate::failure::Failure;
use crate::output;

pub fn aging(action: Option<AgingAction>, api: &ApiArgs) -> Result<ExitCode, Failure> {
    let c = crate::client::client(api);
    let report = match action {
        None => c.call("GET", "/v1/aging", None)?,
        Some(a) => {
            let hold = matches!(a, AgingAction::Hold);
            let body = serde_json::json!({ "hold": hold }).to_string();
            c.call("PUT", "/v1/aging/hold", Some(body.as_bytes()))?
        }
    };
    if api.json {
        output::print_json(&report);
    } else {
        print!("{}", render(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// A figure in the unit people read: MiB for bytes, plain otherwise.
fn figure(metric: &str, v: &Value) -> String {
    match v.as_f64() {
        None => "-".into(),
        Some(x) if metric.ends_with("_bytes") => format!("{:.1}M", x / (1u64 << 20) as f64),
        Some(x) if x.abs() >= 100.0 || x == x.trunc() => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn secs(v: &Value) -> String {
    match v.as_f64() {
        None => "never".into(),
        Some(s) if s >= 86_400.0 => format!("{:.1}d", s / 86_400.0),
        Some(s) if s >= 3600.0 => format!("{:.1}h", s / 3600.0),
        Some(s) => format!("{s:.0}s"),
    }
}

fn reason(r: &Value) -> String {
    match r["kind"].as_str() {
        Some("aging") => format!(
            "aging ({}, {})",
            r["metric"].as_str().unwrap_or("?"),
            r["detector"].as_str().unwrap_or("?")
        ),
        Some(k) => k.to_string(),
        None => "?".into(),
    }
}

pub fn render(r: &Value) -> String {
    let yes = |v: &Value| {
        if v.as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        }
    };
    let mut out = format!(
        "aging monitor: {}, every {} ms, horizon {} s, dry run {}, hold {}; {} samples kept\n",
        if r["enabled"].as_bool() == Some(true) {
            "on"
        } else {
            "off"
        },
        r["period_ms"],
        r["horizon_secs"],
        yes(&r["dry_run"]),
        yes(&r["hold"]),
        r["history_len"],
    );
    out.push_str(&format!("settings: {}\n", settings_source(r)));
    let rows = r["metrics"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let name = m["metric"].as_str().unwrap_or("?");
                    let slope = match m["slope_per_sec"].as_f64() {
                        Some(s) if name.ends_with("_bytes") => {
                            format!("{:.1}K", s / 1024.0)
                        }
                        Some(s) => format!("{s:.3}"),
                        None => "-".into(),
                    };
                    let state = if m["exhausting"].as_bool() == Some(true) {
                        "EXHAUSTING"
                    } else if m["changed"].as_bool() == Some(true) {
                        "CHANGED"
                    } else {
                        "ok"
                    };
                    vec![
                        name.to_string(),
                        figure(name, &m["value"]),
                        figure(name, &m["baseline"]),
                        figure(name, &m["limit"]),
                        slope,
                        m["trend_p"]
                            .as_f64()
                            .map_or("-".into(), |p| format!("{p:.1e}")),
                        secs(&m["exhaustion_secs_conservative"]),
                        m["cusum"]
                            .as_f64()
                            .map_or("-".into(), |c| format!("{c:.1}")),
                        state.to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
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
    match r["last_action"].as_object() {
        Some(e) => out.push_str(&format!(
            "last action: {} for {} ({} ago): {}\n",
            e["action"].as_str().unwrap_or("?"),
            reason(&e["reason"]),
            ago(e["t_ms"].as_u64().unwrap_or(0)),
            e["detail"].as_str().unwrap_or(""),
        )),
        None => out.push_str("last action: none\n"),
    }
    out.push_str(&format!(
        "next action: {}\n",
        r["next_action"].as_str().unwrap_or("?")
    ));
    if let Some(rb) = r["reboots"].as_array().filter(|a| !a.is_empty()) {
        out.push_str(&format!("warm reboots recorded: {}\n", rb.len()));
        for b in rb.iter().rev().take(5) {
            out.push_str(&format!(
                "  {} ago  {}  pid {} -> {}  {}\n",
                ago(b["t_ms"].as_u64().unwrap_or(0)),
                reason(&b["reason"]),
                b["from_pid"],
                b["to_pid"],
                pause(b)
            ));
        }
    }
    out
}

/// A recorded reboot's mode and how long the guests were paused: a warm reboot's blackout;
/// a saved or cold one hands no VM over, so its guests' downtime (or "-" if unknown), never
/// a blackout of 0.
/// Where the settings came from, as the daemon says (older daemons do not).
fn settings_source(r: &Value) -> String {
    let source = match r["settings_source"].as_str() {
        Some(s) => serde_json::from_value::<warmvm_api::aging::SettingsSource>(s.into()).ok(),
        None => None,
    };
    match source {
        Some(s) => s.describe(
            r["settings_from_pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok()),
        ),
        None => "source not reported (an older daemon)".into(),
    }
}

fn pause(b: &Value) -> String {
    let ms = |v: &Value| v.as_f64().map(|us| format!("{:.3} ms", us / 1000.0));
    match b["mode"].as_str() {
        Some(mode @ ("saved" | "cold")) => format!(
            "{mode}  downtime {}",
            ms(&b["downtime_us"]).unwrap_or_else(|| "-".into())
        ),
        Some(mode) => format!(
            "{mode}  blackout {}",
            ms(&b["host_blackout_us"]).unwrap_or_else(|| "-".into())
        ),
        // An older build's record: warm, saved or cold, it does not say.
        None => format!(
            "blackout {}",
            ms(&b["host_blackout_us"]).unwrap_or_else(|| "-".into())
        ),
    }
}

fn ago(t_ms: u64) -> String {
    let now = warmvm_api::aging::sample::now_ms();
    secs(&Value::from(now.saturating_sub(t_ms) as f64 / 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn saved_and_cold_reboots_show_their_downtime_not_a_blackout() {
        let warm = json!({ "mode": "warm", "host_blackout_us": 1234, "downtime_us": null });
        assert_eq!(pause(&warm), "warm  blackout 1.234 ms");
        let saved = json!({ "mode": "saved", "host_blackout_us": 0, "downtime_us": 812000 });
        assert_eq!(pause(&saved), "saved  downtime 812.000 ms");
        let cold = json!({ "mode": "cold", "host_blackout_us": 0, "downtime_us": null });
        assert_eq!(pause(&cold), "cold  downtime -");
        let older = json!({ "host_blackout_us": 900 });
        assert_eq!(pause(&older), "blackout 0.900 ms");
    }

    #[test]
    fn the_settings_say_where_they_came_from() {
        let line = |v: Value| settings_source(&v);
        assert_eq!(
            line(json!({ "settings_source": "configured" })),
            "configured"
        );
        assert_eq!(
            line(json!({ "settings_source": "inherited", "settings_from_pid": 41 })),
            "inherited from pid 41"
        );
        assert!(line(json!({ "settings_source": "unknown" })).ends_with("dry run"));
        assert!(line(json!({})).contains("not reported"));
    }
}
