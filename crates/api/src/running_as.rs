//! What the daemon runs as, for `GET /v1/status`: its uid, gid and groups, the capabilities
//! it keeps, `no_new_privs` and its seccomp mode, so an operator can see that a configured
//! privilege drop (and the sandbox) took effect without reading /proc themselves.
//!
//! Read from the kernel's account of the serving thread (`/proc/thread-self/status`), not
//! from the configuration: capabilities and `no_new_privs` are per thread, and every
//! thread of the daemon inherits the main thread's, set before it creates any. Reading a
//! file needs no system call the API thread's seccomp filter does not already allow
//! (`capget` is not on it).

use serde::{Deserialize, Serialize};

/// `GET /v1/status`'s `privileges`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DaemonPrivileges {
    /// The effective uid and gid.
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, ascending.
    pub groups: Vec<u32>,
    /// The permitted capabilities (what the daemon can still use), by name, ascending;
    /// one the `caps` crate does not know yet is named by its number (`CAP_63`).
    pub capabilities: Vec<String>,
    pub no_new_privs: bool,
    /// The `--seccomp` mode: `true`, `log` or `false`.
    pub seccomp: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RunningAsError {
    #[error("cannot read /proc/thread-self/status: {0}")]
    Read(#[source] std::io::Error),
    #[error("/proc/thread-self/status: {0}")]
    Parse(String),
}

/// The calling thread's privileges, with the process's seccomp mode.
pub fn current() -> Result<DaemonPrivileges, RunningAsError> {
    let status =
        std::fs::read_to_string("/proc/thread-self/status").map_err(RunningAsError::Read)?;
    parse(&status, warmvm_sandbox::mode().as_str()).map_err(RunningAsError::Parse)
}

/// Parse a `/proc/<pid>/status` text.
fn parse(status: &str, seccomp: &str) -> Result<DaemonPrivileges, String> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .ok_or_else(|| format!("no {name} line"))
    };
    let numbers = |name: &str| -> Result<Vec<u32>, String> {
        field(name)?
            .split_whitespace()
            .map(|n| {
                n.parse()
                    .map_err(|_| format!("{name}: {n:?} is not a number"))
            })
            .collect()
    };
    // Uid and Gid: real, effective, saved, filesystem.
    let effective = |name: &str| -> Result<u32, String> {
        numbers(name)?
            .get(1)
            .copied()
            .ok_or_else(|| format!("{name}: no effective id"))
    };
    let mut groups = numbers("Groups")?;
    groups.sort_unstable();
    let permitted = field("CapPrm")?;
    let mask = u64::from_str_radix(permitted, 16)
        .map_err(|_| format!("CapPrm: {permitted:?} is not a hexadecimal mask"))?;
    let no_new_privs = match field("NoNewPrivs")? {
        "0" => false,
        "1" => true,
        other => return Err(format!("NoNewPrivs: {other:?} is neither 0 nor 1")),
    };
    Ok(DaemonPrivileges {
        uid: effective("Uid")?,
        gid: effective("Gid")?,
        groups,
        capabilities: capability_names(mask),
        no_new_privs,
        seccomp: seccomp.to_string(),
    })
}

/// The names of the capabilities set in `mask`, in the order of their numbers.
fn capability_names(mask: u64) -> Vec<String> {
    let known = caps::all();
    (0..64u8)
        .filter(|bit| mask & (1u64 << bit) != 0)
        .map(|bit| {
            known
                .iter()
                .find(|c| c.index() == bit)
                .map_or_else(|| format!("CAP_{bit}"), |c| c.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DROPPED: &str = "Name:\twarmvm\nUmask:\t0022\nState:\tS (sleeping)\n\
        Uid:\t65534\t65534\t65534\t65534\nGid:\t992\t992\t992\t992\nFDSize:\t64\n\
        Groups:\t992 65534 \nNoNewPrivs:\t1\nCapInh:\t0000000000001000\n\
        CapPrm:\t0000000000001000\nCapEff:\t0000000000001000\nCapBnd:\t0000000000001000\n\
        CapAmb:\t0000000000001000\nSeccomp:\t2\n";

    #[test]
    fn a_dropped_daemons_status_reads_as_what_it_runs_as() {
        let p = parse(DROPPED, "true").unwrap();
        assert_eq!(
            p,
            DaemonPrivileges {
                uid: 65534,
                gid: 992,
                groups: vec![992, 65534],
                capabilities: vec!["CAP_NET_ADMIN".into()],
                no_new_privs: true,
                seccomp: "true".into(),
            }
        );
    }

    #[test]
    fn every_capability_bit_is_named_and_unknown_ones_by_number() {
        let names = capability_names(u64::MAX);
        assert_eq!(names.len(), 64);
        assert_eq!(names[0], "CAP_CHOWN");
        assert_eq!(names[21], "CAP_SYS_ADMIN");
        assert_eq!(names[63], "CAP_63");
        assert!(capability_names(0).is_empty());
    }

    #[test]
    fn a_malformed_status_is_refused_by_field() {
        let e = parse(
            &DROPPED.replace("CapPrm:\t0000000000001000", "CapPrm:\tzz"),
            "true",
        )
        .unwrap_err();
        assert!(e.starts_with("CapPrm:"), "{e}");
        let e = parse(&DROPPED.replace("NoNewPrivs:\t1\n", ""), "true").unwrap_err();
        assert_eq!(e, "no NoNewPrivs line");
        let e = parse(
            &DROPPED.replace("Uid:\t65534\t65534\t65534\t65534", "Uid:\t65534"),
            "true",
        )
        .unwrap_err();
        assert_eq!(e, "Uid: no effective id");
    }

    #[test]
    fn this_threads_own_status_parses() {
        let p = current().unwrap();
        // SAFETY: geteuid and getegid only read this process's ids.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        assert_eq!((p.uid, p.gid), (uid, gid));
        assert_eq!(p.seccomp, "false", "no mode set in a unit test");
    }
}
