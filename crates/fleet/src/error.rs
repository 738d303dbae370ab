//! The fleet's errors.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A setting given by the operator (flag or config) is unusable.
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read {what} {path}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// etcd refused or failed a call, or could not be reached.
    #[error("etcd: {what}")]
    Etcd {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    /// A record in etcd does not decode into its type (written by something else, or by a
    /// newer format this build cannot read).
    #[error("etcd record {key} is not a valid {kind}")]
    Record {
        key: String,
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("etcd record {key} is a {kind} of format {format}; this build reads up to {known}")]
    NewerFormat {
        key: String,
        kind: &'static str,
        format: u32,
        known: u32,
    },
    #[error("cannot start the fleet's runtime")]
    Runtime(#[source] std::io::Error),
    /// The store refused a change as the fleet stands now (a plan runs, the fleet is
    /// halted, a host is not registered, ...): the text says why; nothing was written.
    #[error("{0}")]
    Refused(String),
    /// This coordinator's election key is gone or is another's: it no longer leads, and
    /// its write did not land.
    #[error("no longer the fleet's coordinator (election key {key} is gone or another's)")]
    NotLeader { key: String },
    /// A plan step was started once already: it is never started again.
    #[error("step {step} is {state}, not assigned: a step is started once only")]
    StepNotAssigned { step: String, state: String },
    /// The lease behind a session or a leadership could not be kept alive.
    #[error("etcd lease {lease:x} expired or could not be kept alive")]
    LeaseLost { lease: i64 },
}

impl FleetError {
    pub(crate) fn etcd(what: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> FleetError {
        let what = what.into();
        move |source| FleetError::Etcd { what, source }
    }
}
