//! `warmvm fleet status`: the hosts and the fleet-wide keys as etcd holds them.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use warmvm_fleet::events::Event;
use warmvm_fleet::records::{Health, HostRecord};
use warmvm_fleet::view::{FleetView, PlanView};
use warmvm_fleet::AgentStatus;

use super::etcd::{fleet_failure, EtcdArgs};
use crate::failure::Failure;

pub fn status(etcd: &EtcdArgs, events: u32, json: bool) -> Result<ExitCode, Failure> {
    let options = etcd.options()?;
    let view = warmvm_fleet::view::read(&options, events).map_err(fleet_failure)?;
    if json {
        crate::output::print_json(&serde_json::to_value(&view).unwrap_or_default());
    } else {
        print!("{}", table(&view, now_ms()));
    }
    Ok(ExitCode::SUCCESS)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn health(h: &Health) -> String {
    match h {
        Health::Ok => "ok".into(),
        Health::Busy => "busy".into(),
        Health::Degraded(why) => format!("degraded: {why}"),
    }
}

/// `running/total`, and `verified/with figures` of the reference guests.
fn vm_counts(h: &HostRecord) -> (String, String) {
    let running = h.vms.iter().filter(|v| v.lifecycle == "running").count();
    let guests: Vec<_> = h.vms.iter().filter_map(|v| v.guest.as_ref()).collect();
    let verified = guests.iter().filter(|g| g.verified_clean).count();
    (
        format!("{running}/{}", h.vms.len()),
        format!("{verified}/{}", guests.len()),
    )
}

/// Seconds since the record was written, e.g. `0.4s`.
fn age(updated_ms: u64, now_ms: u64) -> String {
    format!("{:.1}s", now_ms.saturating_sub(updated_ms) as f64 / 1000.0)
}

fn table(view: &FleetView, now_ms: u64) -> String {
    let mut out = String::new();
    let mut rows = vec![[
        "HOST".to_string(),
        "BUILD".into(),
        "PID".into(),
        "VMS".into(),
        "VERIFIED".into(),
        "UPDATED".into(),
        "HEALTH".into(),
    ]];
    for h in &view.hosts {
        let (vms, verified) = vm_counts(h);
        rows.push([
            h.name.clone(),
            h.build.sha256.chars().take(12).collect(),
            h.pid.to_string(),
            vms,
            verified,
            age(h.updated_unix_ms, now_ms),
            health(&h.health),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 6 {
                    c.clone()
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if view.hosts.is_empty() {
        out.push_str("(no host is registered)\n");
    }
    for u in &view.unreadable {
        out.push_str(&format!("unreadable: {}: {}\n", u.key, u.error));
    }
    if let Some(h) = &view.halt {
        out.push_str(&format!("halt: {h}\n"));
    }
    for s in &view.slots {
        out.push_str(&format!("slot {}: {}\n", s.key, s.value));
    }
    if let Some(p) = &view.plan {
        out.push_str(&plan_lines(p));
    }
    if !view.events.is_empty() {
        out.push_str("events:\n");
        for e in &view.events {
            out.push_str(&event_line(e));
        }
    }
    out
}

/// The plan: its id, status, wave and target, then a line per step.
fn plan_lines(p: &PlanView) -> String {
    let target = p.spec.target.as_ref().map_or_else(
        || "rejuvenation (same build)".to_string(),
        |t| format!("to {}", t.sha256.chars().take(12).collect::<String>()),
    );
    let soak = p
        .progress
        .soak_until_unix_ms
        .map_or(String::new(), |t| format!(", soak until {t}"));
    let mut out = format!(
        "plan {}: {}, wave {}{soak}, {} {target}, at most {} at a time\n",
        p.spec.id,
        serde_plain(&p.progress.status),
        p.progress.wave,
        serde_plain(&p.spec.mode),
        p.spec.max_unavailable,
    );
    for s in &p.steps {
        let blackout = s.blackout_p99_us.map_or(String::new(), |b| {
            format!(", blackout p99 {:.1} ms", b as f64 / 1000.0)
        });
        let failed: Vec<&str> = s
            .gates
            .iter()
            .filter(|g| !g.passed)
            .map(|g| g.gate.as_str())
            .collect();
        let failed = if failed.is_empty() {
            String::new()
        } else {
            format!(", failed gates: {}", failed.join(", "))
        };
        let detail = s
            .detail
            .as_ref()
            .map_or(String::new(), |d| format!(" ({d})"));
        out.push_str(&format!(
            "  step {}: {}{blackout}{failed}{detail}\n",
            s.host,
            s.state.as_str()
        ));
    }
    out
}

fn event_line(e: &Event) -> String {
    let mut parts = vec![format!(
        "  #{} {} {}",
        e.seq,
        e.at_unix_ms,
        serde_plain(&e.kind)
    )];
    if let Some(h) = &e.host {
        parts.push(format!("host {h}"));
    }
    if let Some(p) = &e.plan {
        parts.push(format!("plan {p}"));
    }
    if !e.detail.is_empty() {
        parts.push(e.detail.clone());
    }
    format!("{}\n", parts.join(" "))
}

/// A unit enum's name as its records spell it (kebab-case).
fn serde_plain<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// `warmvm status`'s fleet line: connected or not, since when, and why not.
pub fn membership_line(f: &AgentStatus) -> String {
    let since = age(f.since_unix_ms, now_ms());
    let lease = f.lease.as_deref().unwrap_or("none");
    match (&f.connected, &f.error) {
        (true, _) => format!(
            "host {}: connected for {since} (lease {lease})",
            f.host_name
        ),
        (false, e) => format!(
            "host {}: NOT connected for {since}: {}",
            f.host_name,
            e.as_deref().unwrap_or("unknown")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warmvm_fleet::records::{Build, GuestProgress, HostVm, FORMAT};

    fn host(name: &str, clean: bool) -> HostRecord {
        HostRecord {
            format: FORMAT,
            name: name.into(),
            build: Build {
                version: "0.1.0".into(),
                git_commit: "abc".into(),
                sha256: "0123456789abcdef".repeat(4),
                path: "/usr/bin/warmvm".into(),
            },
            pid: 42,
            updated_unix_ms: 1_000,
            health: Health::Ok,
            vms: vec![
                HostVm {
                    name: "a".into(),
                    lifecycle: "running".into(),
                    memory_mib: 64,
                    vcpus: 1,
                    group: None,
                    guest: Some(GuestProgress {
                        counter: 1,
                        pages_verified: 1,
                        mismatches: 0,
                        register_check_failures: 0,
                        verified_clean: clean,
                    }),
                },
                HostVm {
                    name: "b".into(),
                    lifecycle: "paused".into(),
                    memory_mib: 64,
                    vcpus: 1,
                    group: None,
                    guest: None,
                },
            ],
            aging: None,
            migration_addr: None,
            last_reboot: None,
        }
    }

    #[test]
    fn the_table_shows_each_host_and_the_raw_fleet_keys() {
        let view = FleetView {
            revision: 7,
            hosts: vec![host("h1", true), host("h2", false)],
            unreadable: vec![],
            halt: Some("gate failed on h2".into()),
            slots: vec![warmvm_fleet::view::RawKey {
                key: "/warmvm/slots/0".into(),
                value: "h1".into(),
            }],
            plan: None,
            events: vec![],
        };
        let t = table(&view, 3_500);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("HOST"), "{t}");
        assert!(lines[1].starts_with("h1"), "{t}");
        for cell in ["0123456789ab", "42", "1/2", "2.5s", "ok"] {
            assert!(lines[1].contains(cell), "{cell}: {t}");
        }
        assert!(
            !lines[1].contains("0123456789abc"),
            "sha256 prefix only: {t}"
        );
        assert!(lines[1].contains(" 1/1 "), "{t}");
        assert!(lines[2].contains(" 0/1 "), "{t}");
        assert!(t.contains("halt: gate failed on h2"), "{t}");
        assert!(t.contains("slot /warmvm/slots/0: h1"), "{t}");
    }

    #[test]
    fn the_plan_its_steps_and_the_events_are_one_line_each() {
        use warmvm_fleet::events::{Event, EventKind};
        use warmvm_fleet::plan::{
            GateResult, PlanProgress, PlanSpec, PlanStatus, StepRecord, StepState,
        };
        let spec: PlanSpec = serde_json::from_value(serde_json::json!({
            "format": FORMAT, "id": "plan-abc", "mode": "warm",
            "target": {"path": "/usr/bin/warmvm.new", "sha256": "ab".repeat(32)},
            "canary": 1, "max_unavailable": 2, "soak_secs": 5, "hosts": ["h1", "h2"],
            "blackout_p99_limit_us": 50000, "on_missing_host": "halt",
            "created_unix_ms": 1, "created_by": "op@box"
        }))
        .unwrap_or_else(|e| panic!("a spec: {e}"));
        let mut progress = PlanProgress::new("plan-abc", 1);
        progress.status = PlanStatus::Halted;
        progress.wave = 1;
        let mut failed = StepRecord::assigned("plan-abc", "h2", 1, 2);
        failed.state = StepState::Failed;
        failed.blackout_p99_us = Some(2_500);
        failed.gates = vec![GateResult {
            gate: "blackout".into(),
            passed: false,
            detail: "2500 us over 1 us".into(),
        }];
        failed.detail = Some("gate failed".into());
        let mut view = FleetView {
            revision: 1,
            hosts: vec![],
            unreadable: vec![],
            halt: None,
            slots: vec![],
            plan: Some(PlanView {
                spec,
                progress,
                steps: vec![StepRecord::assigned("plan-abc", "h1", 1, 2), failed],
            }),
            events: vec![],
        };
        let mut e = Event::new(EventKind::GateFailed, 9);
        e.seq = 4;
        e.host = Some("h2".into());
        e.plan = Some("plan-abc".into());
        e.detail = "blackout".into();
        view.events.push(e);
        let t = table(&view, 10);
        assert!(
            t.contains("plan plan-abc: halted, wave 1, warm to abababababab, at most 2 at a time"),
            "{t}"
        );
        assert!(t.contains("  step h1: assigned\n"), "{t}");
        assert!(
            t.contains(
                "  step h2: failed, blackout p99 2.5 ms, failed gates: blackout (gate failed)"
            ),
            "{t}"
        );
        assert!(
            t.contains("  #4 9 gate-failed host h2 plan plan-abc blackout"),
            "{t}"
        );
    }
}
