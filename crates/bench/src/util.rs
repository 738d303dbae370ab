//! Small helpers shared by the benchmarks: one-line errors, statistics, scratch
//! directories, /proc readings, child processes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

/// A benchmark failure, as the one line the binary prints.
#[derive(Debug)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `map_err(ctx("what failed"))`: an error that says what was being done.
pub fn ctx<E: fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> Error {
    let what = what.into();
    move |e| Error(format!("{what}: {e}"))
}

pub fn fail<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}

/// Median, minimum and maximum of a series of samples.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stats {
    /// The statistics of `samples` (which must not be empty).
    pub fn of(samples: Vec<f64>) -> Result<Self> {
        if samples.is_empty() {
            return fail("no samples were taken");
        }
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Ok(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            samples,
        })
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A scratch directory, removed with everything in it when dropped.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("warmvm-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(ctx(format!(
            "cannot create scratch directory {}",
            path.display()
        )))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

pub fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(ctx(format!("cannot create directory {}", dir.display())))?;
    }
    std::fs::write(path, text).map_err(ctx(format!("cannot write {}", path.display())))
}

/// Start `warmvm run --json --state-dir DIR CONFIG`, stderr piped (for its last line on
/// failure) and stdout as given.
pub fn spawn_run(warmvm: &Path, dir: &Path, config: &Path, stdout: Stdio) -> Result<Child> {
    Command::new(warmvm)
        .arg("run")
        .arg("--json")
        .arg("--state-dir")
        .arg(dir)
        .arg(config)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ctx(format!("cannot start {}", warmvm.display())))
}

/// Size of a file, 0 if it does not exist (yet).
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The `warmvm` binary: the one given, or the one built next to this benchmark.
pub fn find_warmvm(given: Option<PathBuf>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => {
            let exe = std::env::current_exe().map_err(ctx("cannot find this executable"))?;
            exe.with_file_name("warmvm")
        }
    };
    if !path.is_file() {
        return fail(format!(
            "warmvm binary {} not found: build it with `cargo build --release -p warmvm` or pass --warmvm PATH",
            path.display()
        ));
    }
    Ok(path)
}

/// Memory figures of a process, from /proc/PID/status (KiB).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ProcMemory {
    pub vm_rss_kib: u64,
    pub rss_anon_kib: u64,
    pub rss_file_kib: u64,
    pub rss_shmem_kib: u64,
}

impl ProcMemory {
    /// Resident memory that is not shared memory: guest RAM lives in memfds, which the
    /// kernel counts as RssShmem, so this is the VMM's own footprint.
    pub fn vmm_kib(&self) -> u64 {
        self.vm_rss_kib.saturating_sub(self.rss_shmem_kib)
    }

    pub fn read(pid: u32) -> Result<Self> {
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(&path).map_err(ctx(format!("cannot read {path}")))?;
        let field = |key: &str| -> Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .ok_or_else(|| Error(format!("{path} has no {key} line")))
        };
        Ok(Self {
            vm_rss_kib: field("VmRSS")?,
            rss_anon_kib: field("RssAnon")?,
            rss_file_kib: field("RssFile")?,
            rss_shmem_kib: field("RssShmem")?,
        })
    }
}

/// Wait for `child` at most `timeout`; kill it (it is ours) if it does not exit in time.
pub fn wait_or_kill(child: &mut Child, timeout: Duration, what: &str) -> Result<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(ctx(format!("waiting for {what}")))?
        {
            return Ok(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return fail(format!(
                "{what} did not finish within {} s and was killed",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The last non-empty line of a child's standard error, to explain its failure.
pub fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)")
        .trim()
        .to_string()
}

/// Today's date (UTC) as YYYY-MM-DD.
pub fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Howard Hinnant's civil_from_days.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The host's kernel release and CPU model, for the report's header.
pub fn host_description() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown kernel".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("Linux {kernel}, {cpus} x {cpu}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_series() {
        assert_eq!(Stats::of(vec![3.0, 1.0, 2.0]).unwrap().median, 2.0);
        assert_eq!(Stats::of(vec![4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(Stats::of(vec![]).is_err());
    }

    #[test]
    fn date_is_iso() {
        let d = utc_date();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"));
    }
}
