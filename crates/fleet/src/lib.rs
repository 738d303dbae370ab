//! warmvm's fleet: many hosts' daemons coordinated through etcd.
//!
//! Owns: the fleet's records in etcd (`records`) and their layout (`keys`), the connection to etcd
//! with its TLS (`connect`), and the errors of both (`error`).
//!
//! Must never: touch a VM or the daemon's state directly (a host's daemon acts on what it
//! reads here), or write as a coordinator without comparing its own election key's
//! revision in the same transaction (a paused leader past its lease must make no write
//! that lands).

pub mod connect;
pub mod error;
pub mod keys;
pub mod records;

pub use connect::{EtcdOptions, EtcdTls};
pub use error::FleetError;
