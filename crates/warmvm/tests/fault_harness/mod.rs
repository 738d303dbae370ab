//! A daemon harness for the warm-reboot fault tests: start a daemon (possibly under a
//! wrapper such as strace), create busy reference VMs, reboot, wait until the reboot has
//! settled, and judge who runs the VMs and whether they are intact.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warmvm_api::Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_warmvm");
/// Guests that rewrite and re-verify their memory without pause: any state or RAM the
/// wrong VMM touched shows up as mismatches.
pub const BUSY: &str = "quiet interval_ms=0 refill_every=1";

/// A fresh, short directory (socket paths are limited to 107 bytes).
pub fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wvt-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How a warm reboot ended, once settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// One daemon serves and runs every VM, verified; `true` if it is the old one.
    Running { in_old: bool },
    /// No daemon runs the VMs (none serves, or the VMs are gone or stalled).
    Lost(String),
    /// A VM saw a mismatch, a register check failure, or crashed.
    Corrupted(String),
    /// More than one daemon of the test is still alive.
    BothAlive(Vec<u32>),
    /// One daemon is left that does not serve the socket (it should have exited).
    Stray(Vec<u32>),
}

/// A daemon started by the test (or the wrapper that runs it), and every warmvm process
/// that serves its socket after it; all are killed when this is dropped.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// The pid of the daemon that served before the last reboot.
    pub pid: u32,
    /// The warmvm binaries whose processes belong to this test: the one started, and
    /// this build's (a warm reboot may start it).
    pub exes: Vec<PathBuf>,
}

impl Daemon {
    /// Start `exe daemon` in `dir`, under `prefix` (e.g. strace and its options), and wait
    /// until it answers.
    pub fn start(exe: &Path, prefix: &[&str], dir: &Path, env: &[(&str, &str)]) -> Daemon {
        let socket = dir.join("api.sock");
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let child = cmd
            .args(["--log-level", "info", "daemon", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--stop-grace-secs", "1"])
            .envs(env.iter().copied())
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child,
            dir: dir.to_path_buf(),
            socket,
            pid: 0,
            exes: vec![
                std::fs::canonicalize(exe).unwrap(),
                std::fs::canonicalize(BIN).unwrap(),
            ],
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(s) = d.client().status() {
                d.pid = s["pid"].as_u64().unwrap() as u32;
                break;
            }
            assert!(
                d.child.try_wait().unwrap().is_none(),
                "the daemon exited at start-up\n{}",
                d.log()
            );
            assert!(
                Instant::now() < deadline,
                "the daemon did not answer\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket).with_timeout(Duration::from_secs(20))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Create reference VMs of 64 MiB and `vcpus` vCPUs running `cmdline`, and wait until
    /// each vCPU of each has verified some of its memory.
    pub fn create_vms(&self, names: &[String], vcpus: u32, cmdline: &str) {
        let c = self.client();
        for name in names {
            let body =
                json!({ "name": name, "memory_mib": 64, "vcpus": vcpus, "cmdline": cmdline });
            c.call("POST", "/v1/vms", Some(body.to_string().as_bytes()))
                .unwrap_or_else(|e| panic!("creating {name}: {e}\n{}", self.log()));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let list = c.list().unwrap();
            let vms = list["vms"].as_array().unwrap();
            if vms.len() == names.len()
                && vms.iter().all(|v| {
                    let each = verified(v);
                    each.len() == vcpus as usize && each.iter().all(|&n| n > 0)
                })
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the guests do not verify: {list}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `PUT /v1/reboot` with `body`: the status and body of the answer, or the error.
    pub fn reboot(&self, body: &Value) -> Result<(u16, Value), String> {
        let c = self.client().with_timeout(Duration::from_secs(150));
        match c.raw("PUT", "/v1/reboot", Some(body.to_string().as_bytes())) {
            Ok(r) => Ok((
                r.status,
                serde_json::from_slice(&r.body).unwrap_or(Value::Null),
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Live warmvm processes of this test: those of its binary whose arguments name its
    /// socket (a wrapper such as strace is not one).
    pub fn processes(&self) -> Vec<u32> {
        let want = self.socket.to_str().unwrap().as_bytes().to_vec();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let named = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == want.as_slice()));
            let ours = std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| self.exes.contains(&exe));
            if named && ours && pid_alive(pid) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Wait (at most `secs`) until no daemon is left, or one that serves the socket; then
    /// judge the VMs named `names`. The serving daemon's pid becomes `self.pid`.
    pub fn settle_and_judge(&mut self, names: &[String], secs: u64) -> Outcome {
        let old = self.pid;
        let deadline = Instant::now() + Duration::from_secs(secs);
        let (alive, serving) = loop {
            let _ = self.child.try_wait();
            let alive = self.processes();
            let serving = match alive.len() {
                1 => self
                    .client()
                    .status()
                    .ok()
                    .and_then(|s| s["pid"].as_u64())
                    .map(|p| p as u32),
                _ => None,
            };
            let settled =
                alive.is_empty() || (serving.is_some() && serving == alive.first().copied());
            if settled || Instant::now() > deadline {
                break (alive, serving);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if alive.len() > 1 {
            return Outcome::BothAlive(alive);
        }
        let Some(pid) = serving else {
            if !alive.is_empty() {
                return Outcome::Stray(alive);
            }
            return Outcome::Lost("no daemon is left".to_string());
        };
        self.pid = pid;
        match judge(&self.client(), names) {
            Ok(()) => Outcome::Running { in_old: pid == old },
            Err((true, why)) => Outcome::Corrupted(why),
            Err((false, why)) => Outcome::Lost(why),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for _ in 0..500 {
            let left = self.processes();
            if left.is_empty() {
                break;
            }
            for pid in left {
                // SAFETY: kill has no memory effects; the pid is a warmvm process serving
                // this test's own socket.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// True while `pid` is a live process (not gone, not a zombie waiting to be reaped).
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// Pages each of the VM's vCPUs has verified.
pub fn verified(vm: &Value) -> Vec<u64> {
    vm["guest"]["vcpus"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v["pages_verified"].as_u64().unwrap_or(0))
        .collect()
}

/// Every VM of `names` listed and running, every vCPU's verified pages advancing, with no mismatch
/// and no register check failure. Errors say whether the VMs are corrupted (true) or lost.
pub fn judge(client: &Client, names: &[String]) -> Result<(), (bool, String)> {
    let list = |c: &Client| {
        c.list()
            .map(|l| l["vms"].as_array().cloned().unwrap_or_default())
            .map_err(|e| (false, format!("cannot list the VMs: {e}")))
    };
    let first = list(client)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = list(client)?;
        for vm in &now {
            let g = &vm["guest"];
            if g["mismatches"] != 0 || g["register_check_failures"] != 0 || vm["state"] == "crashed"
            {
                return Err((true, vm.to_string()));
            }
        }
        let find = |vms: &[Value], name: &str| vms.iter().find(|v| v["name"] == name).cloned();
        let mut stalled = Vec::new();
        for name in names {
            let Some(vm) = find(&now, name) else {
                return Err((false, format!("VM {name} is gone")));
            };
            let before = find(&first, name).map(|v| verified(&v)).unwrap_or_default();
            let now = verified(&vm);
            // Each vCPU verifies its own share: every one of them must go on.
            let advanced = before.len() == now.len() && before.iter().zip(&now).all(|(a, b)| b > a);
            if vm["state"] != "running" || !advanced {
                stalled.push(vm.to_string());
            }
        }
        if stalled.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err((false, format!("not running or not verifying: {stalled:?}")));
        }
    }
}
