//! What the aging monitor hands to the daemon a warm reboot starts (`aging` in the
//! successor settings, [`crate::reboot::successor::Successor`]): its settings, hold, sample
//! history, decisions and the reboot history, plus why this reboot happens. Typed, versioned and decoded strictly: a missing
//! field, an unknown one, another format or a value out of range is an error, and the new
//! daemon then starts with an empty history (and default settings) rather than guess.

use serde::{Deserialize, Serialize};
use warmvm_vmm::AgingConfig;

use super::policy::{Action, RebootReason};
use super::sample::Sample;

/// The carried state's format; bump it for any change but an added field with a default.
pub const CARRY_FORMAT: u32 = 1;

/// One decision of the policy, as the API and the handover keep it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub t_ms: u64,
    pub pid: u32,
    pub action: Action,
    pub reason: RebootReason,
    pub detail: String,
}

/// One warm reboot, recorded by the daemon that came out of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebootRecord {
    pub t_ms: u64,
    pub reason: RebootReason,
    pub from_pid: u32,
    pub to_pid: u32,
    /// The guests' pause in a warm reboot; 0 in a saved or cold one (no VM was handed over:
    /// see `downtime_us`).
    pub host_blackout_us: u64,
    /// How the daemon was rebooted; absent from records of builds before commit 742695a
    /// (then it may have been any).
    #[serde(default)]
    pub mode: Option<crate::types::Mode>,
    /// Saved or cold: from the first guest stopping to the last one back, if known (added
    /// by commit 742695a).
    #[serde(default)]
    pub downtime_us: Option<u64>,
}

/// The handed-over state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgingCarry {
    pub format: u32,
    pub config: AgingConfig,
    pub hold: bool,
    pub history: Vec<Sample>,
    pub events: Vec<Event>,
    pub reboots: Vec<RebootRecord>,
    /// Why the daemon that wrote this is being replaced.
    pub reason: RebootReason,
}

/// Bounds of the carried lists, whatever the settings say.
pub const MAX_EVENTS: usize = 200;
pub const MAX_REBOOTS: usize = 200;

/// Why carried state was refused.
#[derive(Debug, thiserror::Error)]
pub enum CarryError {
    #[error("no aging state was handed over")]
    Missing,
    #[error("aging state format {0:?} is not readable (this build reads {CARRY_FORMAT})")]
    Format(Option<u64>),
    #[error("aging state: the settings lack {0:?}")]
    MissingSetting(String),
    #[error("aging state: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("aging state: {0}")]
    Invalid(String),
}

/// AgingConfig fills absent keys with defaults (it is also the config file's table); settings
/// from another process must name every one.
fn require_every_setting(config: &serde_json::Value) -> Result<(), CarryError> {
    let keys = serde_json::to_value(AgingConfig::default()).map_err(CarryError::Decode)?;
    if let (Some(want), Some(got)) = (keys.as_object(), config.as_object()) {
        if let Some(k) = want.keys().find(|k| !got.contains_key(*k)) {
            return Err(CarryError::MissingSetting(k.clone()));
        }
    }
    Ok(())
}

/// Decode the configured settings a handover passed on (`aging_configured` in
/// [`crate::reboot::successor::Successor`]), strictly.
pub fn decode_configured(v: &serde_json::Value) -> Result<AgingConfig, CarryError> {
    require_every_setting(v)?;
    let config: AgingConfig = serde_json::from_value(v.clone()).map_err(CarryError::Decode)?;
    config
        .validate()
        .map_err(|e| CarryError::Invalid(e.to_string()))?;
    Ok(config)
}

impl AgingCarry {
    pub fn encode(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Decode the `aging` value of a handover's extra, strictly.
    pub fn decode(v: Option<&serde_json::Value>) -> Result<Self, CarryError> {
        let v = v.ok_or(CarryError::Missing)?;
        match v.get("format").and_then(|f| f.as_u64()) {
            Some(f) if f == u64::from(CARRY_FORMAT) => {}
            other => return Err(CarryError::Format(other)),
        }
        if let Some(config) = v.get("config") {
            require_every_setting(config)?;
        }
        let carry: Self = serde_json::from_value(v.clone()).map_err(CarryError::Decode)?;
        carry
            .config
            .validate()
            .map_err(|e| CarryError::Invalid(e.to_string()))?;
        if carry.history.len() > carry.config.history as usize
            || carry.events.len() > MAX_EVENTS
            || carry.reboots.len() > MAX_REBOOTS
        {
            return Err(CarryError::Invalid(
                "more history than its settings allow".into(),
            ));
        }
        Ok(carry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aging::policy::Detector;
    use crate::aging::sample::{self, Metric};

    fn carry() -> AgingCarry {
        AgingCarry {
            format: CARRY_FORMAT,
            config: AgingConfig::default(),
            hold: true,
            history: vec![sample::read(1, None)],
            events: vec![Event {
                t_ms: 5,
                pid: 7,
                action: Action::Alert,
                reason: RebootReason::Aging {
                    metric: Metric::OpenFds,
                    detector: Detector::Trend,
                },
                detail: "x".into(),
            }],
            reboots: vec![RebootRecord {
                t_ms: 6,
                reason: RebootReason::Panic,
                from_pid: 1,
                to_pid: 2,
                host_blackout_us: 900,
                mode: Some(crate::types::Mode::Saved),
                downtime_us: Some(5000),
            }],
            reason: RebootReason::Schedule,
        }
    }

    #[test]
    fn round_trips() {
        let c = carry();
        assert_eq!(AgingCarry::decode(Some(&c.encode())).unwrap(), c);
    }

    #[test]
    fn decoding_is_strict() {
        let drop_key = |path: &[&str]| {
            let mut v = carry().encode();
            let mut o = &mut v;
            for p in &path[..path.len() - 1] {
                o = o.get_mut(*p).unwrap();
            }
            o.as_object_mut().unwrap().remove(path[path.len() - 1]);
            AgingCarry::decode(Some(&v)).unwrap_err().to_string()
        };
        assert!(drop_key(&["hold"]).contains("hold"));
        assert!(drop_key(&["config", "period_ms"]).contains("period_ms"));
        assert!(drop_key(&["reason"]).contains("reason"));
        assert!(drop_key(&["format"]).contains("format"));
        let mut v = carry().encode();
        v["format"] = 2.into();
        assert!(matches!(
            AgingCarry::decode(Some(&v)),
            Err(CarryError::Format(Some(2)))
        ));
        let mut v = carry().encode();
        v["config"]["period_ms"] = 1.into();
        assert!(matches!(
            AgingCarry::decode(Some(&v)),
            Err(CarryError::Invalid(_))
        ));
        let mut v = carry().encode();
        v["surprise"] = 1.into();
        assert!(AgingCarry::decode(Some(&v)).is_err());
        assert!(matches!(AgingCarry::decode(None), Err(CarryError::Missing)));
    }

    #[test]
    fn configured_settings_are_decoded_strictly() {
        let cfg = AgingConfig {
            dry_run: true,
            ..AgingConfig::default()
        };
        let v = serde_json::to_value(&cfg).unwrap();
        assert_eq!(decode_configured(&v).unwrap(), cfg);
        let mut short = v.clone();
        short.as_object_mut().unwrap().remove("dry_run");
        assert!(matches!(
            decode_configured(&short),
            Err(CarryError::MissingSetting(k)) if k == "dry_run"
        ));
        let mut unknown = v.clone();
        unknown["bogus"] = 1.into();
        assert!(decode_configured(&unknown).is_err());
        assert!(decode_configured(&serde_json::json!("x")).is_err());
    }
}
