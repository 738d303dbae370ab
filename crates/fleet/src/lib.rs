//! warmvm's fleet: many hosts' daemons coordinated through etcd.
//!
//! Owns: the fleet's records in etcd (`records`) and their layout (`keys`), the connection to etcd
//! with its TLS (`connect`), a host's membership record under its lease (`membership`), the
//! daemon's agent thread that keeps it (`agent`), what `warmvm fleet status` reads (`view`),
//! and the errors of all (`error`); plans, their progress and steps
//! (`plan`), the coordinator's election and fenced writes (`lead`), the disruption budget's
//! slots (`slots`), the halt (`halt`), the event history (`events`), and the coordinator's
//! decisions as a pure function of what it reads (`roll`) and its rounds that write them
//! (`coordinate`, with the agent's candidacy and leadership); a host's step executor, which
//! asks its daemon for the reboot and gates it (`executor`).
//!
//! Must never: touch a VM or the daemon's state directly (a host's daemon acts on what it
//! reads here), or write as a coordinator without comparing its own election key's
//! revision in the same transaction (a paused leader past its lease must make no write
//! that lands).

pub mod agent;
pub mod connect;
pub mod coordinate;
pub mod error;
pub mod events;
pub mod executor;
pub mod halt;
pub mod keys;
pub mod kv;
pub mod lead;
pub mod membership;
pub mod plan;
pub mod records;
pub mod roll;
pub mod slots;
pub mod view;

pub use agent::{Agent, AgentConfig, AgentStatus};
pub use connect::{EtcdOptions, EtcdTls};
pub use error::FleetError;
