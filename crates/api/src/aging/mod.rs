//! Software aging: the daemon watches its own resources and rejuvenates itself by a warm
//! reboot before one runs out (Garg et al., ISSRE 1998; Machida et al., ISSRE-W 2013; Matias
//! et al., ISSRE-W 2016).
//!
//! - [`sample`]: what is measured (heap in use and held, anonymous RSS, fds, threads,
//!   mappings, API request p99) and the limits each runs out against;
//! - [`stats`]: Mann-Kendall with the Hamed-Rao correction, Sen's slope, CUSUM;
//! - [`detect`]: per-metric trend and change detectors over one process's samples;
//! - [`policy`]: the decision (reboot, alert, skip and why);
//! - [`monitor`]: the daemon's monitor, its history and its report;
//! - [`carry`]: the typed state a warm reboot hands to the next daemon;
//! - `inject`: injected aging (fault-injection builds only).

pub mod carry;
pub mod detect;
#[cfg(feature = "fault-injection")]
pub mod inject;
pub mod monitor;
pub mod policy;
pub mod sample;
pub mod stats;

pub use carry::{AgingCarry, Event, RebootRecord};
pub use detect::Assessment;
pub use monitor::{AgingHistory, AgingReport, HoldRequest, Monitor, SettingsSource};
pub use policy::{Detector, RebootReason};
pub use sample::{Metric, Sample};
