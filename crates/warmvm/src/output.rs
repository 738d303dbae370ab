//! Tables for people, one JSON document for scripts.

use warmvm_vmm::VmReport;

pub use warmvm_cli_common::output::{print_json, table};

/// The per-VM table of `run` and `demo`.
pub fn print_vm_table(reports: &[VmReport]) {
    let mut rows = Vec::new();
    for r in reports {
        rows.push(vm_row(r));
        // With several vCPUs each one verifies its own share of the RAM and reports its
        // own figures: a vCPU that stopped shows here even while the VM's sums grow.
        if let Some(g) = r.guest.as_ref().filter(|g| g.vcpus.len() > 1) {
            rows.extend(g.vcpus.iter().enumerate().map(|(i, v)| {
                vec![
                    format!("  vcpu {i}"),
                    String::new(),
                    String::new(),
                    v.phase.clone(),
                    v.pages_verified.to_string(),
                    v.mismatches.to_string(),
                    v.counter.to_string(),
                    v.passes.to_string(),
                ]
            }));
        }
    }
    println!(
        "{}",
        table(
            &[
                "VM",
                "RAM MiB",
                "vCPU",
                "STATE",
                "PAGES VERIFIED",
                "MISMATCHES",
                "COUNTER",
                "PASSES"
            ],
            rows,
            &[1, 2, 4, 5, 6, 7],
        )
    );
}

/// One VM's row: its state and the guest's figures summed over its vCPUs (PASSES is the
/// fewest any vCPU has made).
fn vm_row(r: &VmReport) -> Vec<String> {
    let state = match &r.lifecycle {
        warmvm_vmm::Lifecycle::PoweredOff { exit_status } => format!("off({exit_status})"),
        other => other.name().to_string(),
    };
    let mut row = vec![
        r.name.clone(),
        r.memory_mib.to_string(),
        r.vcpus.to_string(),
        state,
    ];
    match &r.guest {
        Some(g) => row.extend([
            g.pages_verified.to_string(),
            g.mismatches.to_string(),
            g.counter.to_string(),
            g.min_passes.to_string(),
        ]),
        None => row.extend(["-", "-", "-", "-"].map(String::from)),
    }
    row
}

/// The per-VM blackout and phase times of a warm reboot.
pub fn print_reboot_report(r: &warmvm_vmm::handover::RebootReport) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "warm reboot: {} -> {} (pid {}), host-wide blackout {:.3} ms, state {} bytes",
        r.from_build,
        r.to_build,
        r.new_pid,
        ms(r.host_blackout_us),
        r.state_bytes
    );
    let p = &r.phases;
    println!(
        "  phases (ms): stage {:.3} (before the pause) | quiesce {:.3}  capture {:.3}  transfer {:.3}  restore {:.3}  commit {:.3}  resume {:.3}",
        ms(p.stage_us),
        ms(p.quiesce_us),
        ms(p.capture_us),
        ms(p.transfer_us),
        ms(p.restore_us),
        ms(p.commit_us),
        ms(p.resume_us)
    );
    print_binaries(r.from_binary.as_ref(), r.to_binary.as_ref());
    for vm in &r.vms {
        println!("  {} blackout {:.3} ms", vm.name, ms(vm.blackout_us));
    }
    // The VMs moved, but the figures above are no measurement.
    for e in &r.errors {
        println!("  NOT MEASURED: {e}");
    }
}

/// The executables on either side of a reboot, one line each ("-" where an older build
/// did not report it).
pub fn print_binaries(
    from: Option<&warmvm_vmm::executable::BinaryInfo>,
    to: Option<&warmvm_vmm::executable::BinaryInfo>,
) {
    for (side, b) in [("from", from), ("to", to)] {
        match b {
            Some(b) => println!("  {side:<4} {}", binary_line(b)),
            None => println!("  {side:<4} - (not reported: an older build)"),
        }
    }
}

/// One executable on one line: path, version, commit, sha256.
pub fn binary_line(b: &warmvm_vmm::executable::BinaryInfo) -> String {
    format!(
        "{}  version {}  commit {}  sha256 {}",
        b.path,
        b.version,
        b.commit.get(..12).unwrap_or(&b.commit),
        b.sha256
    )
}

/// A saved or cold reboot, as the new daemon reports it.
pub fn print_mode_report(r: &warmvm_api::modes::ModeReboot) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "{} reboot: from pid {}, host-wide downtime {:.1} ms",
        r.mode,
        r.previous_pid,
        ms(r.host_downtime_us)
    );
    let (prep, back) = if r.mode == "saved" {
        ("save", "restore")
    } else {
        ("shut down", "boot until ready")
    };
    println!(
        "  phases (ms): {prep} {:.1} | replace the daemon {:.1} | {back} {:.1}",
        ms(r.prepare_us),
        ms(r.replace_us),
        ms(r.bring_back_us)
    );
    if r.mode == "saved" {
        println!(
            "  RAM written {:.1} MiB, read {:.1} MiB",
            r.bytes_written as f64 / f64::from(1 << 20),
            r.bytes_read as f64 / f64::from(1 << 20)
        );
    }
    for vm in &r.vms {
        match &vm.error {
            None => println!(
                "  {} downtime {:.1} ms ({prep} {:.1}, {back} {:.1})",
                vm.name,
                ms(vm.downtime_us),
                ms(vm.prepare_us),
                ms(vm.bring_back_us)
            ),
            Some(e) => println!("  {} NOT BACK: {e}", vm.name),
        }
    }
}

/// How a VM in doubt was resolved, one line.
pub fn migration_resolution(r: &warmvm_api::types::MigrationResolution) -> String {
    use warmvm_api::types::Resolved;
    match r.resolved {
        Resolved::RunsThere => format!(
            "{}: runs at {} (migration {} committed there); the copy here is freed\n",
            r.vm, r.to, r.migration_id
        ),
        Resolved::ResumedHere => format!(
            "{}: {} never committed migration {}; it runs here again\n",
            r.vm, r.to, r.migration_id
        ),
    }
}

/// A migration's report for a terminal: how it ended, the time and the pause split into
/// its parts, then one line per round.
pub fn migration_report(to: &str, r: &warmvm_api::types::MigrationReport) -> String {
    use warmvm_api::types::EndReason;
    let ms = |us: u64| us as f64 / 1000.0;
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    let end = match &r.end {
        EndReason::Converged => "converged".to_string(),
        EndReason::Forced => "forced (stopped and copied at the limits)".to_string(),
        EndReason::Cancelled { why } => format!("cancelled: {why}"),
        EndReason::Failed { step, error } => format!("failed at {step}: {error}"),
        EndReason::Unfinished => "unfinished".to_string(),
    };
    let mut out = format!(
        "{}: migrated to {to} ({end}) in {:.1} ms; paused {:.2} ms (final round {:.2}, state {:.2}, commit {:.2}, resume {:.2})\n",
        r.vm,
        ms(r.total_us),
        ms(r.downtime_us),
        ms(r.final_round_us),
        ms(r.state_us),
        ms(r.commit_us),
        ms(r.resume_us),
    );
    out += &format!(
        "  {} rounds, {:.1} MiB sent of {:.0} MiB RAM ({:.1} MiB state), {:.0} MiB/s\n",
        r.rounds.len(),
        mib(r.bytes_total),
        mib(r.ram_bytes),
        mib(r.state_bytes),
        mib(r.bandwidth_bps),
    );
    for round in &r.rounds {
        out += &format!(
            "  round {}: {} pages ({} zero), {:.1} MiB in {:.1} ms, dirty rate {:.1} MiB/s\n",
            round.round,
            round.pages,
            round.zero_pages,
            mib(round.bytes),
            ms(round.duration_us),
            mib(round.dirty_rate_bps),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_columns_fit_long_names() {
        let long = "v".repeat(64);
        let t = super::table(
            &["NAME", "STATE", "RAM MiB"],
            vec![
                vec![long.clone(), "running".into(), "64".into()],
                vec!["a".into(), "paused".into(), "1024".into()],
            ],
            &[2],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        // Every column starts at the same offset on every line, past the longest name.
        let state_at = lines[1].find("running").unwrap();
        assert!(state_at > 64, "{t}");
        assert_eq!(lines[0].find("STATE"), Some(state_at), "{t}");
        assert_eq!(lines[2].find("paused"), Some(state_at), "{t}");
        // Right-aligned numbers end together.
        assert_eq!(lines[1].len(), lines[2].len(), "{t}");
        assert!(lines[1].starts_with(&long));
    }

    #[test]
    fn a_migration_report_says_how_it_ended_what_it_cost_and_each_round() {
        use warmvm_api::types::{EndReason, MigrationReport, RoundReport};
        let r = MigrationReport {
            vm: "web-1".into(),
            ram_bytes: 64 << 20,
            end: EndReason::Converged,
            total_us: 812_300,
            downtime_us: 13_700,
            final_round_us: 4_000,
            state_us: 1_600,
            commit_us: 8_000,
            resume_us: 5_800,
            rounds: vec![
                RoundReport {
                    round: 0,
                    pages: 16384,
                    zero_pages: 265,
                    bytes: 64 << 20,
                    duration_us: 600_000,
                    dirty_rate_bps: 0,
                },
                RoundReport {
                    round: 1,
                    pages: 12,
                    zero_pages: 0,
                    bytes: 12 << 12,
                    duration_us: 300,
                    dirty_rate_bps: 3 << 20,
                },
            ],
            bandwidth_bps: 100 << 20,
            state_cost_estimate_us: 7_000,
            bytes_total: (64 << 20) + (12 << 12),
            state_bytes: 1 << 20,
        };
        let text = super::migration_report("192.0.2.8:7000", &r);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].starts_with("web-1: migrated to 192.0.2.8:7000 (converged) in 812.3 ms; paused 13.70 ms (final round 4.00, state 1.60, commit 8.00, resume 5.80)"),
            "{text}"
        );
        assert!(
            lines[1].contains("2 rounds, 64.0 MiB sent of 64 MiB RAM (1.0 MiB state), 100 MiB/s"),
            "{text}"
        );
        assert!(
            lines[2].contains("round 0: 16384 pages (265 zero)"),
            "{text}"
        );
        assert!(
            lines[3].contains("round 1: 12 pages (0 zero)")
                && lines[3].contains("dirty rate 3.0 MiB/s"),
            "{text}"
        );
    }
}
