//! `warmvm fleet status`: the hosts and the fleet-wide keys as etcd holds them.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use warmvm_fleet::records::{Health, HostRecord};
use warmvm_fleet::view::FleetView;
use warmvm_fleet::AgentStatus;

use super::etcd::{fleet_failure, EtcdArgs};
use crate::failure::Failure;

pub fn status(etcd: &EtcdArgs, json: bool) -> Result<ExitCode, Failure> {
    let options = etcd.options()?;
    let view = warmvm_fleet::view::read(&options).map_err(fleet_failure)?;
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
    out
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
}
