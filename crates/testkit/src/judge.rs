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
    /// Times a vCPU saw its clock go back: a restored TSC that was wrong.
    pub time_went_backwards: u64,
}

/// Every VM's figures at one instant, by name.
pub type Sample = BTreeMap<String, VmFigures>;

/// Every VM's state and guest figures, by name, from `GET /v1/vms`.
pub fn sample(client: &Client) -> Result<Sample, ClientError> {
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
                time_went_backwards: n("time_went_backwards"),
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
/// a mismatch, a register check failure, a clock that went back, or crashed.
pub fn judge(client: &Client, names: &[String]) -> Result<(), Judgement> {
    let first = sample(client).map_err(cannot_list)?;
    advanced_since(
        client,
        names,
        &first,
        Duration::from_secs(10),
        Duration::from_millis(300),
    )
    .map(drop)
}

/// Sample every `every` until, within `within`, every VM of `names` runs and every vCPU
/// verified more than in `before`; the sample that shows it is returned (the next
/// `before` of a test that judges step after step).
pub fn advanced_since(
    client: &Client,
    names: &[String],
    before: &Sample,
    within: Duration,
    every: Duration,
) -> Result<Sample, Judgement> {
    let deadline = Instant::now() + within;
    loop {
        std::thread::sleep(every);
        let now = sample(client).map_err(cannot_list)?;
        match stalled(names, before, &now) {
            Ok(stalled) if stalled.is_empty() => return Ok(now),
            Ok(stalled) if Instant::now() > deadline => {
                return Err(Judgement::Lost(format!(
                    "not running or not verifying within {} s: {stalled:?}",
                    within.as_secs_f64()
                )))
            }
            Ok(_) => {}
            Err(judged) => return Err(judged),
        }
    }
}

fn cannot_list(e: ClientError) -> Judgement {
    Judgement::Lost(format!("cannot list the VMs: {e}"))
}

/// One look at `now` against `before`: the VMs of `names` not yet running or not yet
/// past `before` on every vCPU (empty when all are), or why the VMs failed outright: one
/// of the daemon's VMs is corrupted or crashed, or one of `names` is gone.
pub fn stalled<'a>(
    names: &'a [String],
    before: &Sample,
    now: &'a Sample,
) -> Result<Vec<(&'a String, &'a VmFigures)>, Judgement> {
    for (name, f) in now {
        if f.mismatches > 0
            || f.register_check_failures > 0
            || f.time_went_backwards > 0
            || f.state == "crashed"
        {
            return Err(Judgement::Corrupted(format!("{name}: {f:?}")));
        }
    }
    let missing: Vec<&String> = names.iter().filter(|n| !now.contains_key(*n)).collect();
    if !missing.is_empty() {
        return Err(Judgement::Lost(format!("VMs {missing:?} are gone")));
    }
    Ok(names
        .iter()
        .filter_map(|name| now.get_key_value(name))
        .filter(|(name, f)| {
            let before = before
                .get(*name)
                .map(|f| f.verified.as_slice())
                .unwrap_or_default();
            f.state != "running" || !every_vcpu_advanced(before, &f.verified)
        })
        .collect())
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
    use super::*;

    fn vm(state: &str, verified: &[u64], mismatches: u64, backwards: u64) -> VmFigures {
        VmFigures {
            state: state.into(),
            verified: verified.to_vec(),
            mismatches,
            register_check_failures: 0,
            time_went_backwards: backwards,
        }
    }

    #[test]
    fn a_look_waits_for_every_vcpu_and_fails_on_corruption_or_a_lost_vm() {
        let names = ["a".to_string()];
        let before: Sample = [("a".to_string(), vm("running", &[5, 5], 0, 0))].into();
        let look = |now: Sample| stalled(&names, &before, &now).map(|s| s.len());
        assert_eq!(
            look([("a".into(), vm("running", &[6, 7], 0, 0))].into()),
            Ok(0)
        );
        // One vCPU still, a vCPU gone, the VM paused: not yet.
        assert_eq!(
            look([("a".into(), vm("running", &[6, 5], 0, 0))].into()),
            Ok(1)
        );
        assert_eq!(
            look([("a".into(), vm("running", &[9], 0, 0))].into()),
            Ok(1)
        );
        assert_eq!(
            look([("a".into(), vm("paused", &[6, 7], 0, 0))].into()),
            Ok(1)
        );
        // A mismatch, a clock gone back, a crash (of any VM listed): corrupted.
        for bad in [
            vm("running", &[6, 7], 1, 0),
            vm("running", &[6, 7], 0, 1),
            vm("crashed", &[6, 7], 0, 0),
        ] {
            assert!(matches!(
                look([("a".into(), bad.clone())].into()),
                Err(Judgement::Corrupted(_))
            ));
            assert!(matches!(
                look(
                    [
                        ("a".into(), vm("running", &[6, 7], 0, 0)),
                        ("b".into(), bad)
                    ]
                    .into()
                ),
                Err(Judgement::Corrupted(_))
            ));
        }
        assert!(matches!(look(Sample::new()), Err(Judgement::Lost(_))));
    }

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
