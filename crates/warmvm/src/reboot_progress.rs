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
    saved: Option<(u64, Duration)>,
    restored: bool,
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
    let start = Instant::now();
    let mut vms: Vec<Watched> = vms
        .into_iter()
        .map(|(name, expect_bytes)| Watched {
            dir: root.join(&name),
            name,
            expect_bytes,
            saved: None,
            restored: false,
        })
        .collect();
    let mut started: Option<Instant> = None;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut parts = Vec::new();
        for v in &mut vms {
            let exists = v.dir.exists();
            if started.is_none() && exists {
                started = Some(Instant::now());
            }
            let bytes = written(&v.dir);
            if v.saved.is_none() && v.dir.join(warmvm_vmm::snapshot::STATE_FILE).exists() {
                let took = started.map_or(start.elapsed(), |s| s.elapsed());
                v.saved = Some((bytes, took));
                if !terminal {
                    eprintln!(
                        "saved {}: {:.0} MiB, {:.0} MiB/s so far",
                        v.name,
                        mib(bytes),
                        mib(bytes) / took.as_secs_f64().max(1e-3)
                    );
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
                (Some((b, _)), false) => format!("saved {:.0} MiB", mib(b)),
                (None, _) if exists => {
                    let rate =
                        mib(bytes) / started.map_or(1e-3, |s| s.elapsed().as_secs_f64().max(1e-3));
                    format!(
                        "{:.0}/{:.0} MiB {rate:.0} MiB/s",
                        mib(bytes),
                        mib(v.expect_bytes)
                    )
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
