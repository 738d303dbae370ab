//! The records the fleet keeps in etcd, shared by every build in the fleet.
//!
//! During a roll, hosts on the old and the new build read each other's records, so the
//! rules are: a record carries its `format`; a reader refuses a format newer than
//! [`FORMAT`] (an incompatible change bumps it); within a format, fields are only ever
//! added, each with `#[serde(default)]` and a comment naming when, and a reader skips
//! fields it does not know (a newer build's additions). Nothing else defaults.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::FleetError;

/// The records' format this build writes and the newest it reads.
pub const FORMAT: u32 = 1;

/// A host's membership record (`keys::host`), written by its daemon under the daemon's
/// lease and refreshed while it runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub format: u32,
    pub name: String,
    /// The build the daemon runs.
    pub build: Build,
    /// The daemon's process id on its host (changes with every warm reboot).
    pub pid: u32,
    /// When the record was last written, Unix milliseconds (the host's clock).
    pub updated_unix_ms: u64,
    pub health: Health,
    pub vms: Vec<HostVm>,
    /// The daemon's own aging figures at the last refresh.
    pub aging: Option<AgingFigures>,
    /// `HOST:PORT` of the daemon's migration listener, if it has one.
    pub migration_addr: Option<String>,
    /// The last reboot of this daemon, if any since it (or its predecessors) started.
    pub last_reboot: Option<LastReboot>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub version: String,
    pub git_commit: String,
    /// sha256 of the executable file that runs, lower-case hex.
    pub sha256: String,
    /// The path the daemon was started from.
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// Serving, every VM running or deliberately paused.
    Ok,
    /// A reboot or migration is under way.
    Busy,
    /// Something needs an operator (a VM failed, is in doubt, ...): the text says what.
    Degraded(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostVm {
    pub name: String,
    /// The VM's lifecycle as the daemon's API names it (`running`, `paused`, ...).
    pub lifecycle: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// The disruption group the VM belongs to, if any (drains respect its budget).
    pub group: Option<String>,
    /// The reference guest's own figures, when the guest reports them.
    pub guest: Option<GuestProgress>,
}

/// What a guest says of itself: a gate needs its counter advancing and no mismatch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestProgress {
    pub counter: u64,
    pub pages_verified: u64,
    pub mismatches: u64,
    pub register_check_failures: u64,
    /// Every vCPU verified all its pages at least once and nothing was ever wrong.
    pub verified_clean: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgingFigures {
    pub rss_bytes: u64,
    pub open_fds: u64,
    pub threads: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReboot {
    /// `warm`, `saved` or `cold`.
    pub mode: String,
    pub finished_unix_ms: u64,
    /// The longest guest blackout of that reboot, microseconds (the p99 over its VMs when
    /// there are many).
    pub blackout_p99_us: u64,
    pub from_sha256: String,
    pub to_sha256: String,
}

/// A record as stored: JSON.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail (no maps with non-string keys).
    serde_json::to_vec(record).unwrap_or_default()
}

/// Read a record of `kind` at `key`, refusing a format this build does not know.
pub fn decode<T: DeserializeOwned>(
    key: &str,
    kind: &'static str,
    bytes: &[u8],
) -> Result<T, FleetError> {
    #[derive(Deserialize)]
    struct Format {
        format: u32,
    }
    let record = |source| FleetError::Record {
        key: key.into(),
        kind,
        source,
    };
    let Format { format } = serde_json::from_slice(bytes).map_err(record)?;
    if format > FORMAT {
        return Err(FleetError::NewerFormat {
            key: key.into(),
            kind,
            format,
            known: FORMAT,
        });
    }
    serde_json::from_slice(bytes).map_err(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostRecord {
        HostRecord {
            format: FORMAT,
            name: "h1".into(),
            build: Build {
                version: "0.1.0".into(),
                git_commit: "abc".into(),
                sha256: "00".repeat(32),
                path: "/usr/bin/warmvm".into(),
            },
            pid: 42,
            updated_unix_ms: 1,
            health: Health::Degraded("vm a failed".into()),
            vms: vec![HostVm {
                name: "a".into(),
                lifecycle: "running".into(),
                memory_mib: 64,
                vcpus: 2,
                group: Some("web".into()),
                guest: Some(GuestProgress {
                    counter: 7,
                    pages_verified: 9,
                    mismatches: 0,
                    register_check_failures: 0,
                    verified_clean: true,
                }),
            }],
            aging: Some(AgingFigures {
                rss_bytes: 1,
                open_fds: 2,
                threads: 3,
            }),
            migration_addr: Some("10.0.0.1:7000".into()),
            last_reboot: None,
        }
    }

    #[test]
    fn a_host_record_round_trips() {
        let r = host();
        let back: HostRecord = decode("k", "host record", &encode(&r)).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_newer_builds_added_field_is_skipped_but_a_newer_format_is_refused() {
        let mut v = serde_json::to_value(host()).unwrap();
        v["added_later"] = serde_json::json!(1);
        let back: HostRecord = decode("k", "host record", v.to_string().as_bytes()).unwrap();
        assert_eq!(back, host());
        v["format"] = serde_json::json!(FORMAT + 1);
        let e = decode::<HostRecord>("k", "host record", v.to_string().as_bytes()).unwrap_err();
        assert!(matches!(e, FleetError::NewerFormat { .. }), "{e}");
    }

    #[test]
    fn a_missing_field_is_refused_not_defaulted() {
        let mut v = serde_json::to_value(host()).unwrap();
        v.as_object_mut().unwrap().remove("pid");
        assert!(decode::<HostRecord>("k", "host record", v.to_string().as_bytes()).is_err());
    }
}
