//! warmvm's host daemon and its control plane.
//!
//! It owns the daemon process and its API: the HTTP/JSON requests and answers, the
//! operations they run on the VMs of one [`warmvm_vmm::Host`], the daemon's warm, saved and
//! cold reboots (and the settings it hands the next daemon), its aging monitor, its metrics
//! and the client the CLI uses. It must never touch KVM or a device itself (that is
//! `warmvm-vmm`'s, through its `Host` and `Vm`), never let the HTTP layer decide what an
//! operation does, never take untyped JSON from another process (requests and successor
//! settings are typed and strict), and never import a module above its own (see the layers
//! in ARCHITECTURE.md, "The daemon").
//!
//! From the bottom:
//! - [`types`]: the requests and answers, one set for the router, the client and the
//!   OpenAPI test;
//! - [`http`], [`routes`]: the HTTP/1.1 subset the API speaks, and the route table the
//!   router and the OpenAPI test share;
//! - [`limits`], [`overflow`]: per-listener connection budgets, request deadlines, and the
//!   503 (never a reset) for connections over a budget;
//! - [`control`]: the server loop's stop handle;
//! - [`state`]: the daemon's shared state (a [`warmvm_vmm::Host`] behind a mutex, the
//!   operations gate, the reboot's flags) and the mapping of VMM errors to HTTP statuses;
//! - [`aging`]: the aging monitor, its detectors and its rejuvenation policy;
//! - [`reboot`]: the reboot room: the request, the three modes, the bring-back manifest, the
//!   successor settings and the daemon's own rejuvenation;
//! - [`ops`]: the operations, typed, which tests drive without HTTP;
//! - [`metrics`]: the Prometheus text;
//! - [`router`]: HTTP requests to operations and back;
//! - [`server`]: the poll loop over the API socket and the loopback metrics port;
//! - [`socket`]: binding (mode 0600, live/stale detection), adopting an inherited listener fd,
//!   and sd_notify;
//! - [`state_lock`]: one daemon per state directory, the lock handed on by reboots;
//! - [`privileges`], [`running_as`]: dropping to another uid/gid and to the capabilities
//!   still needed, and saying what the daemon runs as;
//! - [`daemon`]: the `warmvm daemon` process;
//! - [`client`]: what the CLI uses to call the API;
//! - [`schema`]: a small JSON Schema checker for the OpenAPI document's schemas (tests).

pub mod aging;
pub mod client;
pub mod control;
pub mod daemon;
pub mod fleet;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod migration;
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
