//! What one client may take from the daemon: connections per listener, the time to send a
//! request, and how long a warm reboot waits for requests under way.
//!
//! Each listener has its own connection budget, so the unauthenticated loopback metrics port
//! (any local user can connect) can never use up the API socket's (root's). A request must
//! arrive whole (head and body) within `request_timeout_ms`, however its bytes trickle in:
//! a deadline per request, not a timeout per read, so a client sending one byte every few
//! seconds cannot hold a connection for long.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Connections served at once on the API socket, by default.
pub const DEFAULT_API_CONNECTIONS: usize = 64;
/// Connections served at once on the metrics port, by default: scrapers need one or two.
pub const DEFAULT_METRICS_CONNECTIONS: usize = 8;
/// The time a client has to send its whole request, by default.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 10_000;
/// The longest a warm reboot waits for the requests under way, by default.
pub const DEFAULT_REBOOT_GRACE_MS: u64 = 5_000;

/// Bounds a flag may set.
pub const CONNECTIONS: std::ops::RangeInclusive<usize> = 1..=4096;
pub const REQUEST_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 100..=600_000;
pub const REBOOT_GRACE_MS: std::ops::RangeInclusive<u64> = 0..=60_000;

/// The daemon's limits on its clients. Crosses a warm reboot in the handover's settings
/// (JSON), so the new daemon keeps them; every field has a default there, because a daemon
/// of an older build passes none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_api_connections")]
    pub api_connections: usize,
    #[serde(default = "default_metrics_connections")]
    pub metrics_connections: usize,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_reboot_grace_ms")]
    pub reboot_grace_ms: u64,
}

fn default_api_connections() -> usize {
    DEFAULT_API_CONNECTIONS
}
fn default_metrics_connections() -> usize {
    DEFAULT_METRICS_CONNECTIONS
}
fn default_request_timeout_ms() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_MS
}
fn default_reboot_grace_ms() -> u64 {
    DEFAULT_REBOOT_GRACE_MS
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            api_connections: DEFAULT_API_CONNECTIONS,
            metrics_connections: DEFAULT_METRICS_CONNECTIONS,
            request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            reboot_grace_ms: DEFAULT_REBOOT_GRACE_MS,
        }
    }
}

impl Limits {
    /// Refuse values outside the bounds above, naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, flag: &str, value: String, range: String| {
            if ok {
                Ok(())
            } else {
                Err(format!("--{flag} {value}: must be within {range}"))
            }
        };
        check(
            CONNECTIONS.contains(&self.api_connections),
            "max-connections",
            self.api_connections.to_string(),
            format!("{CONNECTIONS:?}"),
        )?;
        check(
            CONNECTIONS.contains(&self.metrics_connections),
            "max-metrics-connections",
            self.metrics_connections.to_string(),
            format!("{CONNECTIONS:?}"),
        )?;
        check(
            REQUEST_TIMEOUT_MS.contains(&self.request_timeout_ms),
            "request-timeout-ms",
            self.request_timeout_ms.to_string(),
            format!("{REQUEST_TIMEOUT_MS:?}"),
        )?;
        check(
            REBOOT_GRACE_MS.contains(&self.reboot_grace_ms),
            "reboot-grace-ms",
            self.reboot_grace_ms.to_string(),
            format!("{REBOOT_GRACE_MS:?}"),
        )
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn reboot_grace(&self) -> Duration {
        Duration::from_millis(self.reboot_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_out_of_range_values_name_their_flag() {
        Limits::default().validate().unwrap();
        let e = Limits {
            metrics_connections: 0,
            ..Limits::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("--max-metrics-connections 0"), "{e}");
        let e = Limits {
            request_timeout_ms: 5,
            ..Limits::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.contains("--request-timeout-ms"), "{e}");
    }

    #[test]
    fn limits_round_trip_and_an_older_daemon_passing_none_gets_the_defaults() {
        let l = Limits {
            api_connections: 3,
            metrics_connections: 2,
            request_timeout_ms: 700,
            reboot_grace_ms: 0,
        };
        let json = serde_json::to_value(l).unwrap();
        assert_eq!(serde_json::from_value::<Limits>(json).unwrap(), l);
        let none: Limits = serde_json::from_str("{}").unwrap();
        assert_eq!(none, Limits::default());
        assert!(serde_json::from_str::<Limits>(r#"{"x": 1}"#).is_err());
    }
}
