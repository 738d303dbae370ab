//! What the integration tests that drive a daemon share: a daemon process in a temporary
//! directory, the CLI against it, and small waiting helpers. Each test file uses a part.
#![allow(dead_code)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warmvm_api::Client;

pub const BIN: &str = env!("CARGO_BIN_EXE_warmvm");
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn required() -> bool {
    std::env::var("WARMVM_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// A fresh, short directory (socket paths are limited to 107 bytes).
pub fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wvm-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A daemon process; killed and reaped however the test ends. After a warm reboot the
/// daemon is another process, not our child: `pid` follows it.
pub struct Daemon {
    pub child: Option<Child>,
    pub pid: u32,
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// Where the daemon (and each daemon a warm reboot starts) sends sd_notify messages.
    pub notify: UnixDatagram,
}

impl Daemon {
    /// Start a daemon in `dir` and wait for its READY=1.
    pub fn start(dir: &Path, extra: &[&str]) -> Daemon {
        Self::start_with_env(dir, extra, &[])
    }

    /// Start a daemon with extra environment variables.
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::start_cmd(Command::new(BIN), dir, extra, env)
    }

    /// Start a daemon from the executable at `binary` (a copy of the test's build, say).
    pub fn start_from(binary: &Path, dir: &Path, extra: &[&str]) -> Daemon {
        Self::start_cmd(Command::new(binary), dir, extra, &[])
    }

    /// Start a daemon inside network namespace `netns` (`ip netns exec` runs it in place,
    /// so its pid is the daemon's).
    pub fn start_in_netns(dir: &Path, netns: &str) -> Daemon {
        Self::start_in_netns_with(dir, netns, &[])
    }

    /// [`Daemon::start_in_netns`] with extra daemon arguments.
    pub fn start_in_netns_with(dir: &Path, netns: &str, extra: &[&str]) -> Daemon {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, BIN]);
        Self::start_cmd(cmd, dir, extra, &[])
    }

    /// Start a daemon whose soft RLIMIT_NOFILE is `nofile` (if given): a limit to exhaust.
    pub fn start_limited(
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Daemon {
        let mut cmd = Command::new(BIN);
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs in the forked child before exec; getrlimit and setrlimit are
            // async-signal-safe and touch only the child.
            unsafe {
                cmd.pre_exec(move || {
                    let mut rl = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    rl.rlim_cur = n.min(rl.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        }
        Self::start_cmd(cmd, dir, extra, env)
    }

    fn start_cmd(mut cmd: Command, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let socket = dir.join("api.sock");
        let notify_path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        // A daemon that drops to another uid (tests/privileges.rs) must still be able to
        // send to it; the directory is the test's own.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&notify_path, std::fs::Permissions::from_mode(0o666)).unwrap();
        notify.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
        // Appended to: a daemon started again in the same directory (after one was killed)
        // keeps the earlier daemons' lines.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .unwrap();
        let child = cmd
            .args(["--log-level", "debug", "daemon", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--stop-grace-secs", "5"])
            .args(extra)
            .env("NOTIFY_SOCKET", &notify_path)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Daemon {
            pid: child.id(),
            child: Some(child),
            dir: dir.to_path_buf(),
            socket,
            notify,
        };
        let msg = d.next_notification();
        assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
        assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none());
        // A daemon that found an interrupted reboot's manifest serves while it brings
        // those VMs back: the tests start from a daemon that has.
        if let Err(e) = d.client().wait_reboot_done(None, Duration::from_secs(150)) {
            panic!(
                "the daemon never finished bringing VMs back: {e}\n{}",
                d.log()
            );
        }
        d
    }

    /// Start a daemon again in this directory (same socket and state directory) once the
    /// last one is gone (killed by a test, or exited after a reboot), and wait for its
    /// READY=1. `pid` follows it.
    pub fn start_again(&mut self, extra: &[&str], env: &[(&str, &str)]) {
        // A killed daemon's leader turns zombie before its other threads have exited and
        // closed the listening socket: until they have, the socket still accepts.
        let answers = || std::os::unix::net::UnixStream::connect(&self.socket).is_ok();
        assert!(
            wait_until(30, || !pid_alive(self.pid) && !answers()),
            "daemon {} is still alive\n{}",
            self.pid,
            self.log()
        );
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        let mut next =
            std::mem::ManuallyDrop::new(Self::start_cmd(Command::new(BIN), &self.dir, extra, env));
        self.child = next.child.take();
        self.pid = next.pid;
        // `next` is not dropped (its drop would kill the daemon and remove the directory):
        // it keeps the old notification socket, whose file start_cmd already replaced.
        std::mem::swap(&mut self.notify, &mut next.notify);
    }

    /// The next sd_notify message a daemon sent.
    pub fn next_notification(&self) -> String {
        let mut buf = [0u8; 512];
        // A receive with a timeout is never restarted after a signal handler or a stop and
        // continue (signal(7)); once, in a full run, it returned EINTR here.
        loop {
            match self.notify.recv(&mut buf) {
                Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("no notification from the daemon: {e}\n{}", self.log()),
            }
        }
    }

    /// After a warm reboot to `new_pid`: the new daemon told systemd its pid and that it is
    /// ready, and the old one exited 0 (reaped here if it was our child).
    pub fn follow_reboot(&mut self, new_pid: u32) {
        assert_ne!(new_pid, self.pid, "a warm reboot starts a new process");
        let msg = self.next_notification();
        assert!(
            msg.lines().any(|l| l == format!("MAINPID={new_pid}")),
            "{msg}"
        );
        assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert_eq!(status.code(), Some(0), "the old daemon\n{}", self.log());
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the old daemon did not exit after the warm reboot\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            assert!(
                wait_until(30, || !pid_alive(self.pid)),
                "the old daemon {} did not exit after the warm reboot\n{}",
                self.pid,
                self.log()
            );
        }
        self.pid = new_pid;
    }

    /// SIGTERM a daemon that is not our child (one a warm reboot started), then wait until
    /// its socket stops answering and the process is gone.
    pub fn terminate_adopted(&mut self) {
        assert!(self.child.is_none());
        // SAFETY: kill has no memory effects; the pid is the daemon's, read from its API.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let answers = || std::os::unix::net::UnixStream::connect(&self.socket).is_ok();
        assert!(
            wait_until(60, || !answers()),
            "the daemon did not stop on SIGTERM\n{}",
            self.log()
        );
        assert!(
            wait_until(30, || !pid_alive(self.pid)),
            "the daemon {} is still alive\n{}",
            self.pid,
            self.log()
        );
    }

    /// Create reference-guest VMs `names` ([`reference_vm`]) and wait until every guest
    /// of the daemon has reported progress.
    pub fn create_reference_vms(&self, names: &[&str]) {
        for name in names {
            self.client()
                .create(&serde_json::from_value(reference_vm(name)).expect("a VM config"))
                .expect("VM created and started");
        }
        assert!(
            wait_until(30, || figures(self).iter().all(|v| v.2 > 0)),
            "the guests never reported\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    /// Run the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        let out = Command::new(BIN)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap();
        out
    }

    /// Run the CLI with --json; it must succeed.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a);
        assert!(
            out.status.success(),
            "warmvm {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).expect("--json prints JSON")
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill has no memory effects; the pid is our unreaped child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the daemon did not exit on SIGTERM\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        } else if pid_alive(self.pid) {
            // A daemon a warm reboot started (not our child).
            // SAFETY: kill has no memory effects; the pid is the daemon's.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
        // A failed test may not know the pid of a daemon a reboot started (its answer never
        // came): every process still serving this test's socket goes too, so none outlives
        // the test.
        for pid in pids_with_arg(&self.socket) {
            // SAFETY: as above; the process names this test's own socket.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The processes whose command line has `arg` as one of its arguments.
fn pids_with_arg(arg: &std::path::Path) -> Vec<u32> {
    use std::os::unix::ffi::OsStrExt;
    let want = arg.as_os_str().as_bytes();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == want))
        })
        .collect()
}

/// True while `pid` is a live process (not gone, not a zombie waiting to be reaped).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// `GET /v1/vms/NAME`, which must answer.
pub fn show(d: &Daemon, name: &str) -> Value {
    d.client()
        .show(name)
        .unwrap_or_else(|e| panic!("{name}: {e}\n{}", d.log()))
}

/// The guest has verified all its pages `passes` more times than when called, cleanly
/// (no mismatch, its clock never went back): the guest's own evidence that its memory
/// and registers are intact.
pub fn verifies_on(d: &Daemon, name: &str, passes: u64) {
    let start = show(d, name)["guest"]["min_passes"].as_u64().unwrap_or(0);
    assert!(
        wait_until(120, || {
            let g = &show(d, name)["guest"];
            if g.is_null() {
                // A guest that has just started has not reported yet.
                return false;
            }
            assert_eq!(g["mismatches"], 0, "{name}: {g}");
            assert_eq!(g["time_went_backwards"], 0, "{name}: {g}");
            g["min_passes"].as_u64().unwrap_or(0) >= start + passes
        }),
        "{name} does not verify on: {}\n{}",
        show(d, name),
        d.log()
    );
}

/// Create a reference VM (see [`reference_vm`]) and wait until its guest has verified
/// its memory once.
pub fn create(d: &Daemon, name: &str) {
    d.client()
        .create(&serde_json::from_value(reference_vm(name)).unwrap())
        .unwrap_or_else(|e| panic!("{name}: {e}\n{}", d.log()));
    verifies_on(d, name, 1);
}

pub fn reference_vm(name: &str) -> Value {
    json!({ "name": name, "memory_mib": 64, "cmdline": "quiet interval_ms=20" })
}

pub fn counter(vm: &Value) -> u64 {
    vm["guest"]["counter"].as_u64().unwrap_or(0)
}

/// Wait until `f` holds, at most `secs`.
pub fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A network namespace of a test's own, with one persistent TAP (`tap`) in it carrying
/// the host's end of the guest's link; deleted when dropped, also on panic. It derefs to
/// [`warmvm_vmm::testing::Netns`] for `name`, `ip`, `add_tap`, `command` and `fetch`.
pub struct Netns {
    ns: warmvm_vmm::testing::Netns,
    pub tap: String,
}

impl Netns {
    /// `tag` keeps names apart between tests; `host_cidr` is the host's address on the
    /// TAP, e.g. `10.77.0.1/24`.
    pub fn new(tag: &str, host_cidr: &str) -> Netns {
        let ns = warmvm_vmm::testing::Netns::new(tag);
        let tap = "wvtap0".to_string();
        ns.add_tap(&tap, Some(host_cidr));
        Netns { ns, tap }
    }
}

impl std::ops::Deref for Netns {
    type Target = warmvm_vmm::testing::Netns;
    fn deref(&self) -> &Self::Target {
        &self.ns
    }
}

/// A file's text, or "" if it cannot be read (yet): console logs the VMM is writing.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A ustar archive of `files`, padded with zero sectors to `sectors` in all: a reference
/// guest's disk.
pub fn tar_image(files: &[(&str, Vec<u8>)], sectors: usize) -> Vec<u8> {
    let mut out = warmvm_vmm::testing::ustar_entries(files);
    assert!(out.len() + 1024 <= sectors * 512);
    out.resize(sectors * 512, 0);
    out
}

/// Each VM's (name, state, progress counter, mismatches + register check failures +
/// times time went backwards), from `GET /v1/vms`.
pub fn figures(d: &Daemon) -> Vec<(String, String, u64, u64)> {
    let list = d.client().list().expect("the daemon answers");
    list["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|vm| {
            let g = &vm["guest"];
            let bad = g["mismatches"].as_u64().unwrap_or(0)
                + g["register_check_failures"].as_u64().unwrap_or(0)
                + g["time_went_backwards"].as_u64().unwrap_or(0);
            (
                vm["name"].as_str().unwrap_or_default().to_string(),
                vm["state"].as_str().unwrap_or_default().to_string(),
                counter(vm),
                bad,
            )
        })
        .collect()
}
