//! Progress of `warmvm reboot --mode saved` on the CLI's side: the daemon's status counts
//! the VMs saved, but not the bytes, so the CLI watches the snapshot files grow in
//! `<state dir>/saved-reboot/<vm>/`, on the daemon's host as `vm console` does. On
//! a terminal one line is rewritten in place (bytes and rate per VM); otherwise one plain
//! line per VM once it is saved, and once it is restored (its snapshot removed).

use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One VM being saved: its snapshot directory and how much RAM it holds.
struct Watched {
    name: String,
    dir: PathBuf,
    expect_bytes: u64,
    /// When this watcher first saw its snapshot directory, and the bytes in it then.
    first_seen: Option<(Instant, u64)>,
    saved: Option<u64>,
    restored: bool,
}

/// The shortest interval a rate is given over: a VM saved between two looks (200 ms
/// apart) has no rate here (the reboot's report says how long each save took); over a
/// near-zero interval the figure was absurd (64004 MiB/s for 64 MiB).
const MIN_RATE_INTERVAL: Duration = Duration::from_millis(500);

/// MiB/s over what the watcher saw written: from `from` bytes to `to` in `elapsed`.
fn rate(from: u64, to: u64, elapsed: Duration) -> Option<f64> {
    (elapsed >= MIN_RATE_INTERVAL && to > from).then(|| mib(to - from) / elapsed.as_secs_f64())
}

/// Watches until dropped.
pub struct SaveProgress {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SaveProgress {
    /// Start watching `vms` (name, resident RAM in bytes) under `state_dir`.
    pub fn start(state_dir: &Path, vms: Vec<(String, u64)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let root = state_dir.join(warmvm_api::modes::SAVED_DIR);
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("reboot-progress".into())
            .spawn(move || watch(&root, vms, &flag))
            .ok();
        Self { stop, thread }
    }
}

impl Drop for SaveProgress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes written so far into a snapshot directory's RAM files (their allocated blocks:
/// the files are sized up front, and holes are never written).
fn written(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ram"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

fn watch(root: &Path, vms: Vec<(String, u64)>, stop: &AtomicBool) {
    let terminal = std::io::stderr().is_terminal();
    let mut vms: Vec<Watched> = vms
        .into_iter()
        .map(|(name, expect_bytes)| Watched {
            dir: root.join(&name),
            name,
            expect_bytes,
            first_seen: None,
            saved: None,
            restored: false,
        })
        .collect();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut parts = Vec::new();
        for v in &mut vms {
            let exists = v.dir.exists();
            let bytes = written(&v.dir);
            let now = Instant::now();
            if v.first_seen.is_none() && exists {
                v.first_seen = Some((now, bytes));
            }
            let seen_rate = v
                .first_seen
                .and_then(|(t, b)| rate(b, bytes, now.duration_since(t)));
            if v.saved.is_none() && v.dir.join(warmvm_vmm::snapshot::STATE_FILE).exists() {
                v.saved = Some(bytes);
                if !terminal {
                    match seen_rate {
                        Some(r) => eprintln!(
                            "saved {}: {:.0} MiB, about {r:.0} MiB/s",
                            v.name,
                            mib(bytes)
                        ),
                        None => eprintln!("saved {}: {:.0} MiB", v.name, mib(bytes)),
                    }
                }
            }
            if v.saved.is_some() && !v.restored && !exists {
                v.restored = true;
                if !terminal {
                    eprintln!("restored {}", v.name);
                }
            }
            let state = match (v.saved, v.restored) {
                (_, true) => "restored".to_string(),
                (Some(b), false) => format!("saved {:.0} MiB", mib(b)),
                (None, _) if exists => {
                    let done = format!("{:.0}/{:.0} MiB", mib(bytes), mib(v.expect_bytes));
                    match seen_rate {
                        Some(r) => format!("{done} {r:.0} MiB/s"),
                        None => done,
                    }
                }
                (None, _) => "waiting".to_string(),
            };
            parts.push(format!("{} {state}", v.name));
        }
        if terminal {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2Ksaved reboot: {}", parts.join(" | "));
            let _ = err.flush();
        }
        if stopping {
            if terminal {
                eprintln!();
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_rate_over_a_near_zero_interval() {
        // A 64 MiB VM saved before the watcher's second look: no figure, rather than
        // 64 MiB over a millisecond.
        assert_eq!(rate(0, 64 << 20, Duration::from_millis(1)), None);
        assert_eq!(rate(0, 64 << 20, Duration::from_millis(499)), None);
        // Nothing written while watched: no rate either.
        assert_eq!(rate(64 << 20, 64 << 20, Duration::from_secs(3)), None);
        // What was written while watched, over the time watched.
        assert_eq!(
            rate(100 << 20, 300 << 20, Duration::from_secs(2)),
            Some(100.0)
        );
    }
}
