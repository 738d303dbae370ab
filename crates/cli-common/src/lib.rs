//! What the `warmvm` CLI and the `warmvm-bench` binary share, so that neither depends on the
//! other:
//!
//! - [`bench_args`]: the `bench` subcommands' arguments, defined once: `warmvm` parses them
//!   (its help, man pages and completions list them) and hands the command line to
//!   `warmvm-bench`, which parses them again and runs the benchmark;
//! - [`globals`]: the global flags (`--json`, `--socket`, logging) both binaries take;
//! - [`exit`]: the exit statuses both binaries use;
//! - [`failure`]: how a subcommand of either fails (one line and an exit status);
//! - [`output`]: plain tables and JSON documents on standard output;
//! - [`stats`]: the p50/p99/max summaries the demo and the benches print.
//!
//! It holds no benchmark's work and must never pull in the VMM, plotters or a font: the
//! daemon binary links it.

pub mod bench_args;
pub mod exit;
pub mod failure;
pub mod globals;
pub mod output;
pub mod stats;
