//! What a daemon hands the daemon a reboot starts, beside the VMs: its own identity, the
//! settings that outlive the reboot (timeouts, client limits, whether the state directory's
//! lock comes along), and, for this reboot, the aging state, the boot wait and the VMs to
//! bring back. It travels as the handover's `extra` value.
//!
//! Typed, versioned and decoded strictly, like the VMs' own state: version
//! [`SUCCESSOR_VERSION`] names every field, an unknown or missing one is an error, and it
//! grows only by added fields with `#[serde(default)]`; any other change is a new version.
//! Builds before versioning wrote an untyped object without [`VERSION_KEY`]: it is read as
//! the legacy version ([`Legacy`]), whose keys were all optional. A version this build does
//! not read is refused as incompatible while the new daemon stages, so the old daemon keeps
//! (warm: resumes nothing, the guests never paused) its VMs and answers 409.
//!
//! The wire keys are those the untyped settings had, so an older build started by this one
//! (a downgrade) still finds what it looks for and ignores the rest.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use warmvm_vmm::executable::BinaryInfo;

use crate::limits::Limits;
use crate::reboot::bring_back::{BringBack, BRING_BACK_VERSION};
use crate::types::{BOOT_WAIT_SECS, DEFAULT_BOOT_WAIT};

/// The settings' version; bump it for any change but an added field with a default.
pub const SUCCESSOR_VERSION: u32 = 1;
/// The key that holds the version; absent in the legacy (untyped) settings.
pub const VERSION_KEY: &str = "successor_version";

/// The settings a daemon hands its successor (version 1).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Successor {
    /// [`SUCCESSOR_VERSION`] when written.
    pub successor_version: u32,
    /// The daemon handing over.
    pub previous_pid: u32,
    /// Its package version.
    pub previous_version: String,
    /// Its executable; `null` only when read from a legacy build that did not say.
    #[serde(deserialize_with = "required")]
    pub previous_binary: Option<BinaryInfo>,
    /// The daemon's default stage timeout and ready budget (`--stage-timeout-ms`,
    /// `--ready-budget-ms`): a reboot's request may set its own, for that reboot only.
    pub stage_timeout_ms: u64,
    pub ready_budget_ms: u64,
    /// What one client may take.
    pub limits: Limits,
    /// True if the old daemon hands the state directory's lock over (as the fd
    /// `state-lock`); builds that hold none say false.
    pub state_lock: bool,
    /// Cold reboot: how long the new daemon waits for each guest to say it is up; absent:
    /// the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_wait_ms: Option<u64>,
    /// Saved or cold reboot: the VMs to bring back (decoded strictly; its own version is
    /// checked by [`Successor::check`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bring_back: Option<BringBack>,
    /// The aging monitor's state, in its own versioned format (`aging::carry`). Kept as
    /// JSON here on purpose: a successor that cannot read it starts with an empty history
    /// instead of refusing the VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aging: Option<serde_json::Value>,
    /// The operator's configured aging settings, so that a successor which cannot read
    /// `aging` still knows them (`aging::carry::decode_configured`); JSON for that reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aging_configured: Option<serde_json::Value>,
    /// The fleet membership lease (etcd's id) the new daemon keeps alive instead of
    /// granting its own, so that the host's record stays through the reboot. Added with
    /// the fleet's membership; absent when the daemon joins no fleet, so that an older
    /// build, which refuses keys it does not know, can still follow such a daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_lease: Option<i64>,
}

/// The settings of a build before versioning: the untyped object those builds wrote. Every
/// one wrote `previous_pid` and `previous_version` (the oldest only those); the rest is
/// optional. Unknown keys
/// are refused here too: these are every key any such build wrote.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Legacy {
    pub previous_pid: u32,
    pub previous_version: String,
    pub stage_timeout_ms: Option<u64>,
    pub ready_budget_ms: Option<u64>,
    /// Validated on reading; unusable limits gave way to the flags' (those builds' rule).
    pub limits: Option<serde_json::Value>,
    pub state_lock: Option<bool>,
    /// Read leniently, as those builds did: it is only reported.
    pub previous_binary: Option<serde_json::Value>,
    pub boot_wait_ms: Option<u64>,
    pub bring_back: Option<BringBack>,
    pub aging: Option<serde_json::Value>,
    pub aging_configured: Option<serde_json::Value>,
    /// Written by a few builds, and read by none since: ignored.
    #[serde(rename = "console")]
    pub _console: Option<serde_json::Value>,
}

/// What the receiving daemon uses where legacy settings say nothing: its own flags.
#[derive(Clone, Copy, Debug)]
pub struct Fallbacks {
    pub stage_timeout: Duration,
    pub ready_budget: Duration,
    pub limits: Limits,
}

/// Why the settings handed over were refused.
#[derive(Debug, thiserror::Error)]
pub enum SuccessorError {
    /// Another version: the old daemon is of a build this one cannot follow.
    #[error("the successor settings are version {found}; this build reads {SUCCESSOR_VERSION} and the unversioned settings of older builds")]
    Version { found: u64 },
    #[error("the successor settings are not a JSON object")]
    NotAnObject,
    #[error("the successor settings (version {version}) are malformed")]
    Malformed {
        version: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the successor settings' limits are out of range: {0}")]
    Limits(String),
    #[error("the VMs to bring back are in format {found}, this daemon reads {BRING_BACK_VERSION}")]
    BringBackFormat { found: u32 },
    #[error("cannot encode the successor settings")]
    Encode(#[source] serde_json::Error),
}

impl SuccessorError {
    /// The error and its causes on one line, for the old daemon's answer and the log.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            text.push_str(&format!(": {e}"));
            source = e.source();
        }
        text
    }

    /// True when the settings are of a version this build does not read (rather than
    /// broken): the reboot is refused as incompatible (409), not failed.
    pub fn is_incompatible(&self) -> bool {
        matches!(self, SuccessorError::Version { .. })
    }
}

/// A key that must be present, `null` allowed (serde would take a missing `Option` for
/// `None`).
fn required<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)
}

impl Successor {
    /// This daemon's settings for its successor: what outlives every reboot. What a given
    /// reboot adds (aging, boot wait, VMs to bring back, the executable) is set by it.
    pub fn new(
        stage_timeout: Duration,
        ready_budget: Duration,
        limits: Limits,
        hands_lock: bool,
    ) -> Self {
        Self {
            successor_version: SUCCESSOR_VERSION,
            previous_pid: std::process::id(),
            previous_version: env!("CARGO_PKG_VERSION").to_string(),
            previous_binary: None,
            stage_timeout_ms: u64::try_from(stage_timeout.as_millis()).unwrap_or(u64::MAX),
            ready_budget_ms: u64::try_from(ready_budget.as_millis()).unwrap_or(u64::MAX),
            limits,
            state_lock: hands_lock,
            boot_wait_ms: None,
            bring_back: None,
            aging: None,
            aging_configured: None,
            fleet_lease: None,
        }
    }

    /// The handover's `extra` value.
    pub fn encode(&self) -> Result<serde_json::Value, SuccessorError> {
        serde_json::to_value(self).map_err(SuccessorError::Encode)
    }

    /// Read what the old daemon handed over: this version strictly, legacy settings as the
    /// legacy version (filling what they lack from `fallbacks`), anything else refused.
    pub fn decode(v: &serde_json::Value, fallbacks: &Fallbacks) -> Result<Self, SuccessorError> {
        let obj = v.as_object().ok_or(SuccessorError::NotAnObject)?;
        let version = match obj.get(VERSION_KEY) {
            None => return Self::from_legacy(v, fallbacks),
            Some(n) => n.as_u64(),
        };
        if version != Some(u64::from(SUCCESSOR_VERSION)) {
            return Err(SuccessorError::Version {
                found: version.unwrap_or(u64::MAX),
            });
        }
        // From the borrowed tree: the aging history in it may be large.
        let s = Self::deserialize(v).map_err(|source| SuccessorError::Malformed {
            version: SUCCESSOR_VERSION.to_string(),
            source,
        })?;
        s.limits.validate().map_err(SuccessorError::Limits)?;
        Ok(s)
    }

    fn from_legacy(v: &serde_json::Value, fallbacks: &Fallbacks) -> Result<Self, SuccessorError> {
        let l = Legacy::deserialize(v).map_err(|source| SuccessorError::Malformed {
            version: "legacy".into(),
            source,
        })?;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        // Those builds' rule: limits that do not read or are out of range give way to the
        // new daemon's flags.
        let limits = match &l.limits {
            None => fallbacks.limits,
            Some(v) => match serde_json::from_value::<Limits>(v.clone()) {
                Ok(limits) if limits.validate().is_ok() => limits,
                _ => {
                    tracing::warn!(limits = %v, "ignoring unusable limits handed over; using the flags'");
                    fallbacks.limits
                }
            },
        };
        Ok(Self {
            successor_version: SUCCESSOR_VERSION,
            previous_pid: l.previous_pid,
            previous_version: l.previous_version,
            previous_binary: l
                .previous_binary
                .and_then(|b| serde_json::from_value(b).ok()),
            stage_timeout_ms: l
                .stage_timeout_ms
                .unwrap_or_else(|| ms(fallbacks.stage_timeout)),
            ready_budget_ms: l
                .ready_budget_ms
                .unwrap_or_else(|| ms(fallbacks.ready_budget)),
            limits,
            state_lock: l.state_lock.unwrap_or(false),
            boot_wait_ms: l.boot_wait_ms,
            bring_back: l.bring_back,
            aging: l.aging,
            aging_configured: l.aging_configured,
            fleet_lease: None,
        })
    }

    /// What must hold before the VMs are taken over: VMs to bring back in the format this
    /// build reads.
    pub fn check(&self) -> Result<(), SuccessorError> {
        match &self.bring_back {
            Some(bb) if bb.version != BRING_BACK_VERSION => {
                Err(SuccessorError::BringBackFormat { found: bb.version })
            }
            _ => Ok(()),
        }
    }

    pub fn stage_timeout(&self) -> Duration {
        Duration::from_millis(self.stage_timeout_ms)
    }

    pub fn ready_budget(&self) -> Duration {
        Duration::from_millis(self.ready_budget_ms)
    }

    /// How long a cold reboot's guests have to say they are up: what the old daemon passed
    /// on if within bounds, else the default.
    pub fn boot_wait(&self) -> Duration {
        match self.boot_wait_ms {
            None => DEFAULT_BOOT_WAIT,
            Some(ms) if BOOT_WAIT_SECS.contains(&ms.div_ceil(1000)) => Duration::from_millis(ms),
            Some(ms) => {
                tracing::warn!(
                    boot_wait_ms = ms,
                    "ignoring an unusable boot wait handed over; using the default"
                );
                DEFAULT_BOOT_WAIT
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fallbacks() -> Fallbacks {
        Fallbacks {
            stage_timeout: Duration::from_millis(1234),
            ready_budget: Duration::from_millis(56),
            limits: Limits::default(),
        }
    }

    fn ours() -> Successor {
        let limits = Limits {
            api_connections: 3,
            ..Limits::default()
        };
        let mut s = Successor::new(
            Duration::from_millis(7000),
            Duration::from_millis(900),
            limits,
            true,
        );
        s.previous_binary = Some(warmvm_vmm::executable::info());
        s.boot_wait_ms = Some(5000);
        s.aging = Some(json!({ "format": 1 }));
        s
    }

    #[test]
    fn this_versions_settings_round_trip() {
        let s = ours();
        let v = s.encode().unwrap();
        assert_eq!(v[VERSION_KEY], SUCCESSOR_VERSION);
        let back = Successor::decode(&v, &fallbacks()).unwrap();
        assert_eq!(back.encode().unwrap(), v);
        assert_eq!(back.limits.api_connections, 3);
        assert_eq!(back.stage_timeout(), Duration::from_millis(7000));
    }

    #[test]
    fn the_fleet_lease_travels_only_when_there_is_one() {
        // No fleet: the key is not written, so an older build (which refuses keys it does
        // not know) still reads the settings.
        let v = ours().encode().unwrap();
        assert!(v.get("fleet_lease").is_none(), "{v}");
        assert_eq!(
            Successor::decode(&v, &fallbacks()).unwrap().fleet_lease,
            None
        );
        let mut s = ours();
        s.fleet_lease = Some(0x694d_8f3c_2b1a_0e07);
        let v = s.encode().unwrap();
        let back = Successor::decode(&v, &fallbacks()).unwrap();
        assert_eq!(back.fleet_lease, Some(0x694d_8f3c_2b1a_0e07));
        let mut bad = v;
        bad["fleet_lease"] = json!("not a lease");
        assert!(Successor::decode(&bad, &fallbacks()).is_err());
    }

    #[test]
    fn unknown_or_missing_fields_are_refused() {
        let v = ours().encode().unwrap();
        let mut unknown = v.clone();
        unknown["surprise"] = json!(1);
        let e = Successor::decode(&unknown, &fallbacks()).unwrap_err();
        assert!(matches!(e, SuccessorError::Malformed { .. }), "{e}");
        for key in [
            "previous_pid",
            "stage_timeout_ms",
            "limits",
            "previous_binary",
            "state_lock",
        ] {
            let mut missing = v.clone();
            missing.as_object_mut().unwrap().remove(key);
            let e = Successor::decode(&missing, &fallbacks()).unwrap_err();
            assert!(!e.is_incompatible(), "{key}: {e}");
            assert!(e.chain().contains(key), "{key}: {}", e.chain());
            assert!(
                std::error::Error::source(&e).is_some_and(|s| s.to_string().contains(key)),
                "{key}: {e}"
            );
        }
        // Added fields have defaults.
        let mut short = v.clone();
        short.as_object_mut().unwrap().remove("boot_wait_ms");
        assert_eq!(
            Successor::decode(&short, &fallbacks())
                .unwrap()
                .boot_wait_ms,
            None
        );
        let mut bad = v;
        bad["limits"]["api_connections"] = json!(0);
        assert!(matches!(
            Successor::decode(&bad, &fallbacks()),
            Err(SuccessorError::Limits(_))
        ));
    }

    #[test]
    fn another_version_is_refused_as_incompatible() {
        for version in [json!(SUCCESSOR_VERSION + 1), json!(0), json!("1")] {
            let mut v = ours().encode().unwrap();
            v[VERSION_KEY] = version.clone();
            // Even with fields this build does not know: the version is read first.
            v["from_the_future"] = json!(true);
            let e = Successor::decode(&v, &fallbacks()).unwrap_err();
            assert!(e.is_incompatible(), "{version}: {e}");
            assert!(e.to_string().contains("this build reads 1"), "{e}");
        }
        assert!(matches!(
            Successor::decode(&json!(null), &fallbacks()),
            Err(SuccessorError::NotAnObject)
        ));
    }

    /// What the builds before versioning wrote (that of the last one, and of the oldest one
    /// this build takes over from) is read as the legacy version.
    #[test]
    fn legacy_settings_are_read_with_the_flags_for_what_they_lack() {
        let last = json!({
            "previous_pid": 41,
            "previous_version": "0.1.0",
            "stage_timeout_ms": 9000,
            "ready_budget_ms": 800,
            "limits": { "api_connections": 2, "metrics_connections": 8,
                        "request_timeout_ms": 10000, "reboot_grace_ms": 5000 },
            "state_lock": true,
            "previous_binary": { "path": "/x", "version": "0.1.0", "commit": "c", "sha256": "s" },
            "boot_wait_ms": 6000,
            "aging": { "format": 1 },
        });
        let s = Successor::decode(&last, &fallbacks()).unwrap();
        assert_eq!(s.previous_pid, 41);
        assert_eq!(s.stage_timeout(), Duration::from_millis(9000));
        assert_eq!(s.ready_budget(), Duration::from_millis(800));
        assert_eq!(s.limits.api_connections, 2);
        assert!(s.state_lock);
        assert_eq!(s.previous_binary.as_ref().unwrap().path, "/x");
        assert_eq!(s.boot_wait(), Duration::from_secs(6));
        assert_eq!(s.aging, Some(json!({ "format": 1 })));

        let oldest = json!({ "previous_pid": 7, "previous_version": "0.1.0" });
        let s = Successor::decode(&oldest, &fallbacks()).unwrap();
        assert_eq!(s.previous_pid, 7);
        assert_eq!(s.stage_timeout(), Duration::from_millis(1234));
        assert_eq!(s.ready_budget(), Duration::from_millis(56));
        assert_eq!(s.limits, Limits::default());
        assert!(!s.state_lock);
        assert_eq!(s.previous_binary, None);

        // Unusable limits give way to the flags', as those builds had it.
        let mut bad = last.clone();
        bad["limits"]["api_connections"] = json!(0);
        assert_eq!(
            Successor::decode(&bad, &fallbacks()).unwrap().limits,
            Limits::default()
        );
        // A key no build wrote, or a value of the wrong type, is not guessed at.
        let mut unknown = last.clone();
        unknown["surprise"] = json!(1);
        assert!(Successor::decode(&unknown, &fallbacks()).is_err());
        let mut wrong = last;
        wrong["stage_timeout_ms"] = json!("9000");
        assert!(Successor::decode(&wrong, &fallbacks()).is_err());
    }

    #[test]
    fn the_boot_wait_handed_over_is_used_only_within_its_bounds() {
        let wait = |ms: Option<u64>| {
            let mut s = ours();
            s.boot_wait_ms = ms;
            s.boot_wait()
        };
        assert_eq!(wait(Some(6000)), Duration::from_secs(6));
        assert_eq!(wait(None), DEFAULT_BOOT_WAIT);
        for bad in [0, 3_601_000] {
            assert_eq!(wait(Some(bad)), DEFAULT_BOOT_WAIT);
        }
    }

    #[test]
    fn vms_to_bring_back_in_another_format_are_refused() {
        let mut s = ours();
        assert!(s.check().is_ok());
        s.bring_back = Some(BringBack {
            version: BRING_BACK_VERSION + 1,
            mode: crate::reboot::modes::Mode::Saved,
            previous_pid: 1,
            claimed_by: None,
            prepare_us: 0,
            prepared_ns: 0,
            vms: Vec::new(),
        });
        let e = s.check().unwrap_err();
        assert!(e.to_string().contains("format 3"), "{e}");
    }
}
