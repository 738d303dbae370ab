//! warmvm's host daemon and its control plane.
//!
//! - [`http`]: the HTTP/1.1 subset the API speaks (one request per connection, capped sizes);
//! - [`routes`]: the route table, the one list that the router and the OpenAPI test share;
//! - [`state`]: the daemon's state (a [`warmvm_vmm::Host`] behind a mutex) and what each
//!   operation does, with the mapping of VMM errors to HTTP statuses;
//! - [`metrics`]: the Prometheus text;
//! - [`reboot`]: warm reboots of the daemon (by request, on a panic, for aging) and why;
//! - [`aging`]: the aging monitor, its detectors and its rejuvenation policy;
//! - [`server`]: the poll loop over the API socket and the loopback metrics port;
//! - [`limits`], [`overflow`]: per-listener connection budgets, request deadlines, and the
//!   503 (never a reset) for connections over a budget;
//! - [`socket`]: binding (mode 0600, live/stale detection), adopting an inherited listener fd,
//!   and sd_notify;
//! - [`daemon`]: the `warmvm daemon` process;
//! - [`state_lock`]: one daemon per state directory, the lock handed on by reboots;
//! - [`privileges`]: dropping to another uid/gid and to the capabilities still needed;
//! - [`client`]: what the CLI uses to call the API;
//! - [`schema`]: a small JSON Schema checker for the OpenAPI document's schemas (tests).

pub mod aging;
pub mod client;
pub mod control;
pub mod daemon;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod overflow;
pub mod privileges;
pub mod progress;
pub mod reboot;
pub mod router;
pub mod routes;
pub mod running_as;
pub mod schema;
pub mod server;
pub mod socket;
pub mod state;
pub mod state_lock;
pub mod types;

pub use client::{Client, ClientError};
pub use daemon::{DaemonError, DaemonOptions};
pub use limits::Limits;
/// The reboot's parts, where they were before the reboot got a module of its own.
pub use reboot::{bring_back, modes, successor};
pub use server::{Server, StopHandle};
pub use state::{ApiError, ApiState, DaemonStatus, StopRequest};
