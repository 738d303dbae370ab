//! warmvm's fleet: many hosts' daemons coordinated through etcd.
//!
//! Owns: the fleet's records in etcd (`records`) and their layout (`keys`), the connection to etcd
//! with its TLS (`connect`), a host's membership record under its lease (`membership`), the
//! daemon's agent thread that keeps it (`agent`), and the errors of all (`error`).
//!
//! Must never: touch a VM or the daemon's state directly (a host's daemon acts on what it
//! reads here), or write as a coordinator without comparing its own election key's
//! revision in the same transaction (a paused leader past its lease must make no write
//! that lands).

pub mod agent;
pub mod connect;
pub mod error;
pub mod keys;
pub mod membership;
pub mod records;
pub mod view;

pub use agent::{Agent, AgentConfig, AgentStatus};
pub use connect::{EtcdOptions, EtcdTls};
pub use error::FleetError;
