//! `warmvm bench ...`: the benchmarks live in the `warmvm-bench` binary (crates/bench), so
//! that this one links no plotting library or font. Like git with its subcommands, `warmvm`
//! runs the `warmvm-bench` installed beside it, with the same command line but the word
//! `bench`, in place of itself: its output and exit status are the benchmark's. The
//! arguments were parsed here already (one definition, in warmvm-cli-common), so bad ones
//! are refused before anything runs, and `warmvm bench --help` needs no second binary.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::failure::{Failure, EXIT_HOST};

/// The benchmarks' binary, expected beside `warmvm`.
pub const BENCH_BINARY: &str = "warmvm-bench";

/// The global flags that take a value as the next argument (as `--socket PATH`).
const GLOBALS_WITH_VALUE: &[&str] = &["--log-level", "--log-format", "--socket"];

/// Run `warmvm-bench` with this process's arguments, `bench` left out. Returns only when
/// it cannot be run.
pub fn bench() -> Result<ExitCode, Failure> {
    let exe = std::env::current_exe()
        .map_err(|e| Failure::new(EXIT_HOST, format!("cannot find this executable: {e}")))?;
    let bench = exe.with_file_name(BENCH_BINARY);
    if !bench.is_file() {
        return Err(missing(&bench));
    }
    let args = without_subcommand(std::env::args_os().skip(1));
    let err = std::process::Command::new(&bench).args(args).exec();
    Err(Failure::new(
        EXIT_HOST,
        format!("cannot run {}: {err}", bench.display()),
    ))
}

fn missing(bench: &std::path::Path) -> Failure {
    let dir = bench.parent().map_or_else(PathBuf::new, PathBuf::from);
    Failure::new(
        EXIT_HOST,
        format!(
            "`warmvm bench` runs {BENCH_BINARY}, which is not installed in {}: build it with `cargo build --release -p warmvm -p warmvm-bench`",
            dir.display()
        ),
    )
}

/// The command line (without the program) with its subcommand word taken out: the first
/// argument that is neither a flag nor a global flag's value. Clap has accepted the command
/// line already, so that word is `bench`.
fn without_subcommand(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut value_next = false;
    let mut found = false;
    for arg in args {
        if found || value_next {
            value_next = false;
            out.push(arg);
            continue;
        }
        let flag = arg.to_str().filter(|a| a.starts_with('-'));
        match flag {
            Some(f) => {
                value_next = GLOBALS_WITH_VALUE.contains(&f);
                out.push(arg);
            }
            None => {
                debug_assert_eq!(arg, OsStr::new("bench"));
                found = true;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(args: &[&str]) -> Vec<String> {
        without_subcommand(args.iter().map(OsString::from))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn only_the_subcommand_word_is_taken_out() {
        assert_eq!(
            strip(&["bench", "reboot", "--runs", "1"]),
            ["reboot", "--runs", "1"]
        );
        assert_eq!(
            strip(&["--json", "--socket", "bench", "bench", "faults", "--json"]),
            ["--json", "--socket", "bench", "faults", "--json"]
        );
        assert_eq!(
            strip(&[
                "--log-level=debug",
                "--log-format",
                "json",
                "bench",
                "aging"
            ]),
            ["--log-level=debug", "--log-format", "json", "aging"]
        );
        // A later `bench` is an argument of the benchmark, not the subcommand.
        assert_eq!(
            strip(&["bench", "cache", "--modes", "warm", "bench"]),
            ["cache", "--modes", "warm", "bench"]
        );
    }

    /// Every global flag that takes a value is known here: otherwise its value would be
    /// taken for the subcommand.
    #[test]
    fn the_global_flags_with_a_value_are_all_known() {
        let cmd = <crate::args::Cli as clap::CommandFactory>::command();
        let mut with_value: Vec<String> = cmd
            .get_arguments()
            .filter(|a| a.is_global_set() && a.get_action().takes_values())
            .map(|a| format!("--{}", a.get_long().unwrap()))
            .collect();
        with_value.sort();
        let mut known: Vec<&str> = GLOBALS_WITH_VALUE.to_vec();
        known.sort_unstable();
        assert_eq!(with_value, known);
        assert!(cmd.get_arguments().all(|a| a.get_short().is_none()));
    }

    #[test]
    fn a_missing_bench_binary_says_how_to_build_it() {
        let f = missing(std::path::Path::new("/opt/x/warmvm-bench"));
        assert_eq!(f.code, EXIT_HOST);
        assert!(!f.message.contains('\n'));
        assert!(f.message.contains("/opt/x"), "{}", f.message);
        assert!(f
            .message
            .contains("cargo build --release -p warmvm -p warmvm-bench"));
    }
}
