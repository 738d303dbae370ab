//! A `warmvm daemon` process of a test or a bench: started in a directory of its own,
//! waited for, talked to, followed across warm reboots, and killed with every process
//! that succeeded it when dropped.

use std::ffi::{OsStr, OsString};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use warmvm_api::Client;

use crate::judge::{judge, Judgement, Outcome};
use crate::process::{kill_all_naming, pid_alive, pids_naming, wait_until};

/// How long a daemon may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The `warmvm` executable the tests run: `CARGO_BIN_EXE_warmvm` if set at run time, else
/// the one beside the running executable (a test binary in `target/*/deps` or a bench
/// binary in `target/*`, where cargo builds `warmvm` for the tests that need it). Tests
/// that know it at build time (`env!("CARGO_BIN_EXE_warmvm")`) may set it instead with
/// [`Start::binary`].
pub fn warmvm_binary() -> PathBuf {
    locate_warmvm().unwrap_or_else(|tried| {
        panic!(
            "no warmvm executable at {} (build it: cargo build -p warmvm)",
            tried.display()
        )
    })
}

/// [`warmvm_binary`], or the path where it was looked for.
fn locate_warmvm() -> Result<PathBuf, PathBuf> {
    if let Some(p) = std::env::var_os("CARGO_BIN_EXE_warmvm") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().unwrap_or(Path::new("."));
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir = dir.parent().unwrap_or(dir);
    }
    let bin = dir.join("warmvm");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(bin)
    }
}

/// `warmvm daemon --socket SOCKET`, to which a test adds the rest: for a daemon that must
/// refuse to start (run it with [`refused`]); [`Start`] starts one that must run.
pub fn daemon_command(socket: &Path) -> Command {
    let mut cmd = Command::new(warmvm_binary());
    cmd.args(["daemon", "--socket"]).arg(socket);
    cmd
}

/// Run `cmd`, a daemon that must refuse to start, to its end (stdin empty, stdout and
/// stderr captured); a daemon still running after 60 s is killed and the test fails.
pub fn refused(cmd: &mut Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("warmvm runs");
    let pid = child.id();
    let (done, waited) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = done.send(());
        out
    });
    let finished = waited.recv_timeout(Duration::from_secs(60)).is_ok();
    if !finished {
        // SAFETY: kill has no memory effects; the pid is our child, not reaped yet (its
        // waiter has not returned).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let out = waiter
        .join()
        .expect("the waiter thread")
        .expect("the daemon's output");
    assert!(
        finished,
        "the daemon did not refuse to start within 60 s: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// How [`Start`] knows that a daemon is up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// Its sd_notify `READY=1` (on a socket in its directory, which also receives the
    /// `MAINPID=` of each daemon a warm reboot starts), and any interrupted reboot's VMs
    /// brought back.
    Notify,
    /// Its API answers `GET /v1/status` (for builds or wrappers that do not notify).
    Answers,
}

/// Errors starting a daemon (benches handle them; tests get a panic from [`Start::start`]).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot prepare {}: {source}", path.display())]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the daemon: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the daemon exited at start-up ({status})\n{log}")]
    Exited { status: ExitStatus, log: String },
    #[error("the daemon was not ready within {} s: {why}\n{log}", waited.as_secs())]
    NotReady {
        waited: Duration,
        why: String,
        log: String,
    },
}

/// How to start a daemon: `BINARY [--log-level L] daemon --socket DIR/api.sock
/// --state-dir DIR/state --stop-grace-secs N ARGS`, its stderr appended to
/// `DIR/daemon.log`. Made by [`Daemon::builder`]; [`Start::start`] starts it.
#[derive(Clone, Debug)]
pub struct Start {
    dir: PathBuf,
    binary: Option<PathBuf>,
    wrapper: Vec<OsString>,
    netns: Option<String>,
    log_level: String,
    stop_grace_secs: u64,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    nofile: Option<u64>,
    ready: Ready,
    ready_timeout: Duration,
    client_timeout: Option<Duration>,
    own_process_group: bool,
}

impl Start {
    /// The executable to start (default: [`warmvm_binary`]).
    pub fn binary(mut self, binary: impl AsRef<Path>) -> Self {
        self.binary = Some(binary.as_ref().to_path_buf());
        self
    }

    /// Run the daemon under `wrapper` (a program and its options, e.g. strace), which
    /// gets the binary and its arguments after them.
    pub fn wrapper<S: AsRef<OsStr>>(mut self, wrapper: &[S]) -> Self {
        self.wrapper = wrapper.iter().map(|s| s.as_ref().to_owned()).collect();
        self
    }

    /// Run the daemon inside network namespace `netns` (`ip netns exec` runs it in place,
    /// so its pid is the daemon's).
    pub fn netns(mut self, netns: &str) -> Self {
        self.netns = Some(netns.to_string());
        self
    }

    /// `--log-level` (default `debug`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// `--stop-grace-secs` (default 5).
    pub fn stop_grace_secs(mut self, secs: u64) -> Self {
        self.stop_grace_secs = secs;
        self
    }

    /// More `daemon` arguments.
    pub fn args<S: AsRef<OsStr>>(mut self, args: &[S]) -> Self {
        self.args.extend(args.iter().map(|s| s.as_ref().to_owned()));
        self
    }

    /// More environment variables.
    pub fn envs<K: AsRef<OsStr>, V: AsRef<OsStr>>(mut self, env: &[(K, V)]) -> Self {
        self.env.extend(
            env.iter()
                .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())),
        );
        self
    }

    /// A soft RLIMIT_NOFILE of `nofile` (a limit to exhaust).
    pub fn nofile(mut self, nofile: Option<u64>) -> Self {
        self.nofile = nofile;
        self
    }

    /// Start the daemon in a process group of its own, so that Ctrl-C at a terminal (SIGINT
    /// to the foreground group) reaches only the program that started it, which then stops
    /// the daemon in its own time.
    pub fn own_process_group(mut self) -> Self {
        self.own_process_group = true;
        self
    }

    /// How to know the daemon is up (default [`Ready::Notify`]), and for how long to wait
    /// (default [`READY_TIMEOUT`]).
    pub fn ready(mut self, ready: Ready, timeout: Duration) -> Self {
        self.ready = ready;
        self.ready_timeout = timeout;
        self
    }

    /// The timeout of [`Daemon::client`]'s requests (default: the client's own).
    pub fn client_timeout(mut self, timeout: Duration) -> Self {
        self.client_timeout = Some(timeout);
        self
    }

    /// Start the daemon and wait until it is ready; panics (with its log) if it is not.
    pub fn start(self) -> Daemon {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start the daemon and wait until it is ready.
    pub fn try_start(self) -> Result<Daemon, StartError> {
        let dir = self.dir.clone();
        let prepare = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StartError::Prepare { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(prepare(&dir))?;
        let binary = self.binary.clone().unwrap_or_else(warmvm_binary);
        let socket = dir.join("api.sock");
        let mut cmd = match (&self.netns, self.wrapper.split_first()) {
            (Some(ns), _) => {
                let mut c = Command::new("ip");
                c.args([OsStr::new("netns"), OsStr::new("exec"), OsStr::new(ns)]);
                c.args(&self.wrapper).arg(&binary);
                c
            }
            (None, Some((first, rest))) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&binary);
                c
            }
            (None, None) => Command::new(&binary),
        };
        let notify = match self.ready {
            Ready::Notify => {
                let path = dir.join("notify.sock");
                let _ = std::fs::remove_file(&path);
                let notify = UnixDatagram::bind(&path).map_err(prepare(&path))?;
                // A daemon that drops to another uid (tests/privileges.rs) must still be
                // able to send to it; the directory is the test's own.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
                    .map_err(prepare(&path))?;
                notify
                    .set_read_timeout(Some(self.ready_timeout))
                    .map_err(prepare(&path))?;
                cmd.env("NOTIFY_SOCKET", &path);
                Some(notify)
            }
            Ready::Answers => {
                cmd.env_remove("NOTIFY_SOCKET");
                None
            }
        };
        if let Some(n) = self.nofile {
            limit_nofile(&mut cmd, n);
        }
        if self.own_process_group {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        // Appended to: a daemon started again in the same directory (after one was killed)
        // keeps the earlier daemons' lines.
        let log_path = dir.join("daemon.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(prepare(&log_path))?;
        let child = cmd
            .args(["--log-level", &self.log_level, "daemon", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--stop-grace-secs", &self.stop_grace_secs.to_string()])
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(StartError::Spawn)?;
        let exes = [Some(binary.clone()), locate_warmvm().ok()]
            .into_iter()
            .flatten()
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .collect();
        let mut d = Daemon {
            pid: child.id(),
            child: Some(child),
            dir,
            socket,
            notify,
            exes,
            binary,
            client_timeout: self.client_timeout,
        };
        d.wait_ready(self.ready, self.ready_timeout)?;
        Ok(d)
    }
}

/// Give the command's process a soft RLIMIT_NOFILE of `n` (at most its hard limit).
fn limit_nofile(cmd: &mut Command, n: u64) {
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

/// A daemon process and every process that succeeds it. After a warm reboot the daemon
/// is another process, not our child: `pid` follows it ([`Daemon::follow_reboot`],
/// [`Daemon::settle_and_judge`]). Dropped, it kills every process still naming its
/// socket (the daemon, its successors, a wrapper), reaps its child, and removes its
/// directory unless the test is failing.
pub struct Daemon {
    /// The process started (the daemon, or the wrapper that runs it), until reaped.
    pub child: Option<Child>,
    /// The daemon that serves (or served last).
    pub pid: u32,
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// Where the daemon (and each daemon a warm reboot starts) sends sd_notify messages,
    /// with [`Ready::Notify`].
    notify: Option<UnixDatagram>,
    /// The executables whose processes are this daemon's: the one started and this
    /// build's `warmvm` (a warm reboot may start it).
    exes: Vec<PathBuf>,
    binary: PathBuf,
    client_timeout: Option<Duration>,
}

impl Daemon {
    /// How to start a daemon in `dir` (see [`Start`] for the defaults).
    pub fn builder(dir: &Path) -> Start {
        Start {
            dir: dir.to_path_buf(),
            binary: None,
            wrapper: Vec::new(),
            netns: None,
            log_level: "debug".to_string(),
            stop_grace_secs: 5,
            args: Vec::new(),
            env: Vec::new(),
            nofile: None,
            ready: Ready::Notify,
            ready_timeout: READY_TIMEOUT,
            own_process_group: false,
            client_timeout: None,
        }
    }

    /// Start a daemon in `dir` and wait for its READY=1.
    pub fn start(dir: &Path, extra: &[&str]) -> Daemon {
        Self::builder(dir).args(extra).start()
    }

    /// Start a daemon with extra environment variables.
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::builder(dir).args(extra).envs(env).start()
    }

    /// Start a daemon from the executable at `binary` (a copy of the test's build, say).
    pub fn start_from(binary: &Path, dir: &Path, extra: &[&str]) -> Daemon {
        Self::builder(dir).binary(binary).args(extra).start()
    }

    /// Start a daemon inside network namespace `netns`.
    pub fn start_in_netns(dir: &Path, netns: &str) -> Daemon {
        Self::builder(dir).netns(netns).start()
    }

    /// [`Daemon::start_in_netns`] with extra daemon arguments.
    pub fn start_in_netns_with(dir: &Path, netns: &str, extra: &[&str]) -> Daemon {
        Self::builder(dir).netns(netns).args(extra).start()
    }

    /// Start a daemon whose soft RLIMIT_NOFILE is `nofile` (if given): a limit to exhaust.
    pub fn start_limited(
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Daemon {
        Self::builder(dir)
            .args(extra)
            .envs(env)
            .nofile(nofile)
            .start()
    }

    fn wait_ready(&mut self, ready: Ready, timeout: Duration) -> Result<(), StartError> {
        let not_ready = |d: &Daemon, why: String| StartError::NotReady {
            waited: timeout,
            why,
            log: d.log(),
        };
        match ready {
            Ready::Notify => {
                let msg = self.try_next_notification().map_err(|e| {
                    match self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten())
                    {
                        Some(status) => StartError::Exited {
                            status,
                            log: self.log(),
                        },
                        None => not_ready(self, format!("no notification: {e}")),
                    }
                })?;
                if !msg.lines().any(|l| l == "READY=1") {
                    return Err(not_ready(self, format!("it notified {msg:?}")));
                }
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    return Err(StartError::Exited {
                        status,
                        log: self.log(),
                    });
                }
                // A daemon that found an interrupted reboot's manifest serves while it
                // brings those VMs back: the tests start from a daemon that has.
                self.client()
                    .wait_reboot_done(None, Duration::from_secs(150))
                    .map_err(|e| {
                        not_ready(self, format!("it never finished bringing VMs back: {e}"))
                    })?;
            }
            Ready::Answers => {
                let deadline = Instant::now() + timeout;
                loop {
                    if let Ok(s) = self.client().status() {
                        // A wrapper's pid is not the daemon's: ask the daemon.
                        if let Some(pid) = s["pid"].as_u64() {
                            self.pid = pid as u32;
                        }
                        break;
                    }
                    if let Some(status) = self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten())
                    {
                        return Err(StartError::Exited {
                            status,
                            log: self.log(),
                        });
                    }
                    if Instant::now() > deadline {
                        return Err(not_ready(self, "its API did not answer".to_string()));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        Ok(())
    }

    /// Start a daemon again in this directory (same socket and state directory, the same
    /// executable, default options) once the last one is gone (killed by a test, or exited
    /// after a reboot), and wait for its READY=1. `pid` follows it.
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
        let mut next = std::mem::ManuallyDrop::new(
            Self::builder(&self.dir)
                .binary(&self.binary)
                .args(extra)
                .envs(env)
                .start(),
        );
        self.child = next.child.take();
        self.pid = next.pid;
        // `next` is not dropped (its drop would kill the daemon and remove the directory):
        // it keeps the old notification socket, whose file the start already replaced.
        std::mem::swap(&mut self.notify, &mut next.notify);
    }

    fn try_next_notification(&self) -> std::io::Result<String> {
        let notify = self.notify.as_ref().ok_or_else(|| {
            std::io::Error::other("this daemon was started without a notification socket")
        })?;
        let mut buf = [0u8; 512];
        // A receive with a timeout is never restarted after a signal handler or a stop and
        // continue (signal(7)); once, in a full run, it returned EINTR here.
        loop {
            match notify.recv(&mut buf) {
                Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The next sd_notify message a daemon sent.
    pub fn next_notification(&self) -> String {
        self.try_next_notification()
            .unwrap_or_else(|e| panic!("no notification from the daemon: {e}\n{}", self.log()))
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

    /// Stop the daemon serving now (our child, or a successor a warm reboot started) with
    /// SIGTERM, as systemd would, and wait at most `limit` until its socket stops
    /// answering and it is gone (reaped if it is our child); false if it was not. For
    /// benches, which report a daemon that does not stop instead of panicking; dropping
    /// the `Daemon` still kills whatever is left.
    pub fn stop(&mut self, limit: Duration) -> bool {
        // SAFETY: kill has no memory effects; the pid is our child or the daemon that
        // serves this test's socket.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        let answers = || std::os::unix::net::UnixStream::connect(&self.socket).is_ok();
        loop {
            if let Some(c) = self.child.as_mut() {
                let _ = c.try_wait();
            }
            if !answers() && !pid_alive(self.pid) {
                if let Some(mut c) = self.child.take() {
                    let _ = c.wait();
                }
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM our child, then wait for its exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the daemon is our child");
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

    /// Create reference-guest VMs `names` ([`crate::reference_vm`]) and wait until every
    /// guest of the daemon has reported progress.
    pub fn create_reference_vms(&self, names: &[&str]) {
        for name in names {
            self.client()
                .create(&serde_json::from_value(crate::reference_vm(name)).expect("a VM config"))
                .expect("VM created and started");
        }
        assert!(
            wait_until(30, || crate::figures(self).iter().all(|v| v.2 > 0)),
            "the guests never reported\n{}",
            self.log()
        );
    }

    /// Create reference VMs of 64 MiB and `vcpus` vCPUs running `cmdline`, and wait until
    /// each vCPU of each has verified some of its memory.
    pub fn create_vms(&self, names: &[String], vcpus: u32, cmdline: &str) {
        let c = self.client();
        for name in names {
            let body = serde_json::json!({
                "name": name, "memory_mib": 64, "vcpus": vcpus, "cmdline": cmdline
            });
            c.call("POST", "/v1/vms", Some(body.to_string().as_bytes()))
                .unwrap_or_else(|e| panic!("creating {name}: {e}\n{}", self.log()));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let list = c.list().unwrap();
            let vms = list["vms"].as_array().unwrap();
            if vms.len() == names.len()
                && vms.iter().all(|v| {
                    let each = crate::verified(v);
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

    /// Live daemons of this test: processes of its executables whose arguments name its
    /// socket (a wrapper such as strace is not one).
    pub fn processes(&self) -> Vec<u32> {
        pids_naming(&self.socket)
            .into_iter()
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe"))
                    .is_ok_and(|exe| self.exes.contains(&exe))
            })
            .collect()
    }

    /// Wait (at most `secs`) until no daemon is left, or one that serves the socket; then
    /// judge the VMs named `names` ([`crate::judge`]). The serving daemon's pid becomes
    /// `self.pid`.
    pub fn settle_and_judge(&mut self, names: &[String], secs: u64) -> Outcome {
        let old = self.pid;
        let deadline = Instant::now() + Duration::from_secs(secs);
        let (alive, serving) = loop {
            if let Some(c) = self.child.as_mut() {
                let _ = c.try_wait();
            }
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
            Err(Judgement::Corrupted(why)) => Outcome::Corrupted(why),
            Err(Judgement::Lost(why)) => Outcome::Lost(why),
        }
    }

    /// The daemons' log (every daemon started in this directory appends to it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// A client of this daemon's API.
    pub fn client(&self) -> Client {
        let c = Client::new(&self.socket);
        match self.client_timeout {
            Some(t) => c.with_timeout(t),
            None => c,
        }
    }

    /// Run the CLI (this build's) against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(warmvm_binary())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("warmvm runs")
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
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
        } else if pid_alive(self.pid) {
            // A daemon a warm reboot started (not our child).
            // SAFETY: kill has no memory effects; the pid is the daemon's.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
        // Every process still naming this test's socket goes too: successors a warm
        // reboot started (also those whose pid a failed test never learnt), wrappers, CLI
        // commands, so that none outlives the test.
        let left = kill_all_naming(&self.socket, Duration::from_secs(10));
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        if !left.is_empty() {
            eprintln!(
                "processes {left:?} of {} survived SIGKILL",
                self.socket.display()
            );
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
