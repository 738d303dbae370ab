//! The global flags both binaries take, so that `warmvm bench ...` can hand its whole
//! command line to `warmvm-bench`, and their logging.

use std::path::PathBuf;

use clap::ValueEnum;

#[derive(clap::Args, Debug)]
pub struct GlobalArgs {
    /// Log verbosity (error, warn, info, debug, trace), or a tracing filter
    /// [default: info for `daemon`, warn otherwise].
    #[arg(long, global = true, env = "WARMVM_LOG")]
    pub log_level: Option<String>,
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// The daemon's API socket: where `daemon` listens and the API commands connect
    /// [default: /run/warmvm/warmvm.sock as root; for `daemon` with --state-dir,
    /// <state dir>/warmvm.sock].
    #[arg(long, global = true, env = "WARMVM_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print one JSON document (the daemon's answer, or the results) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Log to standard error at `global`'s level (`default` without one) and in its format.
pub fn init_logging(global: &GlobalArgs, default: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(global.log_level.as_deref().unwrap_or(default))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match global.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
