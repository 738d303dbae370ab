//! The one judge of guest integrity after a warm reboot (or anything else that moves
//! VMs): are the VMs there, running, every vCPU's verified pages advancing, with no
//! mismatch, no register check failure and no crash? The reference guest rewrites and
//! re-verifies its memory; any RAM or vCPU state that was lost or touched by the wrong
//! VMM shows up in its figures.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use warmvm_api::{Client, ClientError};

/// One VM's state and guest figures, from `GET /v1/vms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmFigures {
    pub state: String,
    /// Pages each vCPU has verified.
    pub verified: Vec<u64>,
    pub mismatches: u64,
    pub register_check_failures: u64,
}

/// Every VM's state and guest figures, by name, from `GET /v1/vms`.
pub fn sample(client: &Client) -> Result<BTreeMap<String, VmFigures>, ClientError> {
    let list = client.list()?;
    let mut out = BTreeMap::new();
    for vm in list["vms"].as_array().into_iter().flatten() {
        let g = &vm["guest"];
        let n = |k: &str| g[k].as_u64().unwrap_or(0);
        out.insert(
            vm["name"].as_str().unwrap_or_default().to_string(),
            VmFigures {
                state: vm["state"].as_str().unwrap_or_default().to_string(),
                verified: crate::verified(vm),
                mismatches: n("mismatches"),
                register_check_failures: n("register_check_failures"),
            },
        );
    }
    Ok(out)
}

/// Why the VMs failed the judge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// A VM saw a mismatch or a register check failure, or crashed.
    Corrupted(String),
    /// A VM is gone, not running, or not verifying any more (or the daemon does not answer).
    Lost(String),
}

/// Every vCPU verified more pages in `now` than in `first`, and none went missing (a vCPU
/// whose state was lost stops while the others go on).
pub fn every_vcpu_advanced(first: &[u64], now: &[u64]) -> bool {
    !now.is_empty() && first.len() == now.len() && first.iter().zip(now).all(|(a, b)| b > a)
}

/// Judge the VMs `names` of the daemon `client` talks to: within 10 s, every one of them
/// is listed, running, and every vCPU's verified pages advance; no VM of the daemon has
/// a mismatch, a register check failure or crashed.
pub fn judge(client: &Client, names: &[String]) -> Result<(), Judgement> {
    let list =
        |c: &Client| sample(c).map_err(|e| Judgement::Lost(format!("cannot list the VMs: {e}")));
    let first = list(client)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = list(client)?;
        for (name, f) in &now {
            if f.mismatches > 0 || f.register_check_failures > 0 || f.state == "crashed" {
                return Err(Judgement::Corrupted(format!("{name}: {f:?}")));
            }
        }
        let missing: Vec<&String> = names.iter().filter(|n| !now.contains_key(*n)).collect();
        if !missing.is_empty() {
            return Err(Judgement::Lost(format!("VMs {missing:?} are gone")));
        }
        let stalled: Vec<(&String, &VmFigures)> = names
            .iter()
            .filter_map(|name| now.get_key_value(name))
            .filter(|(name, f)| {
                let before = first
                    .get(*name)
                    .map(|f| f.verified.as_slice())
                    .unwrap_or_default();
                f.state != "running" || !every_vcpu_advanced(before, &f.verified)
            })
            .collect();
        if stalled.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Judgement::Lost(format!(
                "not running or not verifying: {stalled:?}"
            )));
        }
    }
}

/// How a warm reboot ended, once settled ([`crate::Daemon::settle_and_judge`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// One daemon serves and runs every VM, verified; `true` if it is the old one.
    Running { in_old: bool },
    /// No daemon runs the VMs (none serves, or the VMs are gone or stalled).
    Lost(String),
    /// A VM saw a mismatch, a register check failure, or crashed.
    Corrupted(String),
    /// More than one daemon of the test is still alive.
    BothAlive(Vec<u32>),
    /// One daemon is left that does not serve the socket (it should have exited).
    Stray(Vec<u32>),
}

#[cfg(test)]
mod tests {
    use super::every_vcpu_advanced;

    #[test]
    fn only_every_vcpu_going_on_counts_as_advancing() {
        assert!(every_vcpu_advanced(&[1, 2], &[2, 3]));
        // One vCPU stopped, one went missing, none reported at all.
        assert!(!every_vcpu_advanced(&[1, 2], &[2, 2]));
        assert!(!every_vcpu_advanced(&[1, 2], &[2]));
        assert!(!every_vcpu_advanced(&[], &[]));
        // A VM the first sample did not list has nothing to advance from.
        assert!(!every_vcpu_advanced(&[], &[5]));
    }
}
