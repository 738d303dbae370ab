//! The fleet agent of a daemon: one thread of its own running a current-thread runtime,
//! which connects to etcd, holds the membership lease, and writes the host's record every
//! [`REFRESH`] (or at once when asked). No daemon thread ever waits on etcd: they read the
//! agent's [`AgentStatus`] and send it commands that do not block.
//!
//! etcd unreachable is never fatal: the agent tries again every second for as long as the
//! daemon runs, and logs once per change of state (connected, disconnected, refused).

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::Client;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::connect::CALL_TIMEOUT;
use crate::executor::{Executor, RebootAsk, SharedRecord};
use crate::membership::{self, Written};
use crate::records::HostRecord;
use crate::{EtcdOptions, FleetError};

/// How often the record is written and the lease kept alive.
pub const REFRESH: Duration = Duration::from_secs(1);
/// How long the agent waits before it tries etcd again.
pub const RETRY: Duration = Duration::from_secs(1);

/// Where the agent stands, as the daemon's status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The host's name in the fleet.
    pub host_name: String,
    /// The agent reaches etcd and its record is there. False while it connects, after it
    /// lost etcd, and while another daemon holds the name.
    pub connected: bool,
    /// Since when `connected` has been what it is, Unix milliseconds.
    pub since_unix_ms: u64,
    /// The membership lease (hex, as etcdctl prints it), once granted or adopted.
    pub lease: Option<String>,
    /// Why the agent is not connected, when it is not.
    pub error: Option<String>,
}

/// What the agent needs from its daemon.
pub struct AgentConfig {
    pub etcd: EtcdOptions,
    pub host_name: String,
    /// The lease a warm reboot's old daemon handed over, kept alive instead of a new one.
    pub adopt_lease: Option<i64>,
    /// The record as it stands now; `None`: write nothing this time (the daemon is
    /// handing its VMs over to a new process, which writes from now on).
    pub record: Box<dyn FnMut() -> Option<HostRecord> + Send>,
    /// Run first thing on the agent's thread (the daemon installs its seccomp filter).
    pub thread_setup: Box<dyn FnOnce() + Send>,
    /// Where the agent asks its daemon for a plan step's reboot. With it the agent also
    /// campaigns to coordinate and carries out this host's steps; without it, it only
    /// keeps the record.
    pub reboots: Option<std_mpsc::Sender<RebootAsk>>,
}

enum Command {
    /// Write the record now.
    Refresh,
    /// End the agent; revoke the lease first if asked (the record goes at once). The
    /// sender hears when it is done.
    Stop {
        revoke: bool,
        done: std_mpsc::SyncSender<()>,
    },
}

/// The daemon's handle on its agent.
pub struct Agent {
    status: Arc<Mutex<AgentStatus>>,
    lease: Arc<Mutex<Option<i64>>>,
    commands: mpsc::UnboundedSender<Command>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Agent {
    /// Start the agent's thread. Fails only if the thread or its runtime cannot be made,
    /// or the TLS files cannot be read; etcd is not reached here.
    pub fn start(config: AgentConfig) -> Result<Agent, FleetError> {
        crate::keys::check_name("--host-name", &config.host_name).map_err(FleetError::Invalid)?;
        // The files are read now, so that a missing one is an error at start.
        config.etcd.connect_options()?;
        let status = Arc::new(Mutex::new(AgentStatus {
            host_name: config.host_name.clone(),
            connected: false,
            since_unix_ms: now_ms(),
            lease: config.adopt_lease.map(|l| format!("{l:x}")),
            error: Some("connecting".into()),
        }));
        let lease = Arc::new(Mutex::new(config.adopt_lease));
        let (tx, rx) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(FleetError::Runtime)?;
        let mut runner = Runner {
            status: status.clone(),
            lease: lease.clone(),
            commands: rx,
            etcd: config.etcd,
            record: Arc::new(Mutex::new(config.record)),
            logged: None,
            host_name: config.host_name.clone(),
            reboots: config.reboots,
            busy: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let setup = config.thread_setup;
        std::thread::Builder::new()
            .name("warmvm-fleet".into())
            .spawn(move || {
                setup();
                runtime.block_on(runner.run());
            })
            .map_err(FleetError::Runtime)?;
        Ok(Agent {
            status,
            lease,
            commands: tx,
        })
    }

    pub fn status(&self) -> AgentStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The membership lease, for a warm reboot's new daemon to adopt.
    pub fn lease(&self) -> Option<i64> {
        *self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write the record soon, not at the next tick (something changed).
    pub fn refresh(&self) {
        let _ = self.commands.send(Command::Refresh);
    }

    /// End the agent, revoking the lease if `revoke` (the daemon stops for good), waiting
    /// at most `wait` for it.
    pub fn stop(&self, revoke: bool, wait: Duration) {
        let (done, heard) = std_mpsc::sync_channel(1);
        if self.commands.send(Command::Stop { revoke, done }).is_ok() {
            let _ = heard.recv_timeout(wait);
        }
    }
}

struct Runner {
    status: Arc<Mutex<AgentStatus>>,
    lease: Arc<Mutex<Option<i64>>>,
    commands: mpsc::UnboundedReceiver<Command>,
    etcd: EtcdOptions,
    record: SharedRecord,
    /// The state last logged: (connected, error).
    logged: Option<(bool, Option<String>)>,
    host_name: String,
    reboots: Option<std_mpsc::Sender<RebootAsk>>,
    /// A step's reboot is under way (kept across sessions).
    busy: Arc<std::sync::atomic::AtomicBool>,
}

/// Tasks of one session with etcd (the coordinator's, the step executor's): they end
/// with it, so nothing of the fleet is decided or started without etcd and the lease.
struct SessionTasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for SessionTasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// How a session with etcd ended.
enum End {
    /// Asked to stop (done).
    Stopped,
    /// Lost etcd or the lease; try again.
    Lost(String),
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, FleetError>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(1), f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(chain(&e)),
        Err(_) => Err(format!("etcd: {what}: no answer within {CALL_TIMEOUT:?}")),
    }
}

impl Runner {
    async fn run(&mut self) {
        loop {
            let end = self.session().await;
            match end {
                End::Stopped => return,
                End::Lost(why) => {
                    let why = self.hint(why);
                    self.set(false, Some(why))
                }
            }
            // Wait before trying again, still obeying a stop.
            let sleep = tokio::time::sleep(RETRY);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    c = self.commands.recv() => match c {
                        None => return,
                        Some(Command::Refresh) => {}
                        Some(Command::Stop { revoke, done }) => {
                            // Not connected: a revoke cannot be done now; the lease runs
                            // out by itself.
                            if revoke {
                                self.revoke_without_session().await;
                            }
                            let _ = done.send(());
                            return;
                        }
                    },
                }
            }
        }
    }

    /// `why` with what the operator may have missed: a cluster that requires client
    /// certificates drops a client without one mid-handshake, which the client library
    /// reports only as a transport error (of one kind or another).
    fn hint(&self, why: String) -> String {
        let no_cert = self.etcd.tls.as_ref().is_some_and(|t| t.cert.is_none());
        if no_cert && why.to_lowercase().contains("transport") {
            format!("{why} (this daemon has no etcd client certificate: a cluster that requires one, as with --client-cert-auth, refuses it; see --fleet-etcd-cert and --fleet-etcd-key)")
        } else {
            why
        }
    }

    /// A stop while etcd was not reached: one quick try to revoke.
    async fn revoke_without_session(&mut self) {
        let Some(lease) = self.lease() else { return };
        if let Ok(mut c) = timed("connect", self.etcd.connect()).await {
            let _ = timed("revoke", membership::revoke(&mut c, lease)).await;
        }
    }

    fn lease(&self) -> Option<i64> {
        *self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_lease(&self, lease: Option<i64>) {
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = lease;
        self.status.lock().unwrap_or_else(|p| p.into_inner()).lease =
            lease.map(|l| format!("{l:x}"));
    }

    /// Record the state, logging it when it changed.
    fn set(&mut self, connected: bool, error: Option<String>) {
        {
            let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            if s.connected != connected {
                s.since_unix_ms = now_ms();
            }
            s.connected = connected;
            s.error = error.clone();
        }
        // Log a change of state, not every failed attempt; an error that changes its
        // kind (refused vs. unreachable) counts as a change.
        let kind = |e: &Option<String>| e.as_ref().map(|e| e.starts_with("refused"));
        let changed = match &self.logged {
            None => true,
            Some((c, e)) => *c != connected || kind(e) != kind(&error),
        };
        if changed {
            let lease = self.lease().map(|l| format!("{l:x}")).unwrap_or_default();
            match &error {
                None => {
                    tracing::info!(lease = %lease, "fleet: connected to etcd; the host's record is written")
                }
                Some(e) => {
                    tracing::warn!(error = %e, "fleet: not connected to etcd; the VMs run on, no fleet step starts; retrying")
                }
            }
            self.logged = Some((connected, error));
        }
    }

    async fn session(&mut self) -> End {
        let mut client = match timed("connect", self.etcd.connect()).await {
            Ok(c) => c,
            Err(e) => return End::Lost(e),
        };
        let lease = match self.usable_lease(&mut client).await {
            Ok(l) => l,
            Err(e) => return End::Lost(e),
        };
        let (mut keeper, mut answers) = match timed("keep the lease alive", async {
            client
                .lease_keep_alive(lease)
                .await
                .map_err(FleetError::etcd("keep the lease alive"))
        })
        .await
        {
            Ok(k) => k,
            Err(e) => return End::Lost(e),
        };
        let mut tasks = SessionTasks(Vec::new());
        loop {
            // The lease first: a record is only worth writing under a live lease.
            let kept = timed("keep the lease alive", async {
                keeper
                    .keep_alive()
                    .await
                    .map_err(FleetError::etcd("keep the lease alive"))?;
                answers
                    .message()
                    .await
                    .map_err(FleetError::etcd("keep the lease alive"))
            })
            .await;
            match kept {
                Ok(Some(a)) if a.ttl() > 0 => {}
                Ok(_) => {
                    // Expired while we could not reach etcd: the record is gone with it.
                    self.set_lease(None);
                    return End::Lost(format!("the lease {lease:x} expired"));
                }
                Err(e) => return End::Lost(e),
            }
            let record = {
                let mut f = self.record.lock().unwrap_or_else(|p| p.into_inner());
                f()
            };
            if let Some(record) = record {
                match timed(
                    "write the record",
                    membership::write(&mut client, lease, &record),
                )
                .await
                {
                    Ok(Written::Ours) => {
                        self.set(true, None);
                        // Once the record is ours: lead and run steps under this lease.
                        if tasks.0.is_empty() {
                            if let Some(reboots) = &self.reboots {
                                tasks.0.push(tokio::spawn(crate::coordinate::lead(
                                    client.clone(),
                                    self.host_name.clone(),
                                    lease,
                                )));
                                let executor = Executor {
                                    host: self.host_name.clone(),
                                    lease,
                                    record: self.record.clone(),
                                    reboots: reboots.clone(),
                                    busy: self.busy.clone(),
                                };
                                tasks.0.push(tokio::spawn(executor.run(client.clone())));
                            }
                        }
                    }
                    Ok(Written::HeldByOther { lease: other, pid }) => {
                        // Not this daemon's record: it neither leads nor runs steps.
                        tasks = SessionTasks(Vec::new());
                        let pid = pid.map_or(String::new(), |p| format!(" (pid {p})"));
                        self.set(
                            false,
                            Some(format!(
                                "refused: the host name {:?} is held by another daemon{pid} under lease {other:x}; this daemon stays out of the fleet until it is free",
                                record.name
                            )),
                        );
                    }
                    Err(e) => return End::Lost(e),
                }
            }
            let sleep = tokio::time::sleep(REFRESH);
            tokio::pin!(sleep);
            tokio::select! {
                _ = &mut sleep => {}
                c = self.commands.recv() => match c {
                    Some(Command::Refresh) => {}
                    None => return End::Stopped,
                    Some(Command::Stop { revoke, done }) => {
                        if revoke {
                            match timed("revoke", membership::revoke(&mut client, lease)).await {
                                Ok(()) => tracing::info!(lease = %format!("{lease:x}"), "fleet: lease revoked; the host's record is gone"),
                                Err(e) => tracing::warn!(error = %e, "fleet: cannot revoke the lease; the record goes when it expires"),
                            }
                        }
                        let _ = done.send(());
                        return End::Stopped;
                    }
                },
            }
        }
    }

    /// The lease we hold if it is still alive in etcd, else a new one.
    async fn usable_lease(&mut self, client: &mut Client) -> Result<i64, String> {
        if let Some(l) = self.lease() {
            if timed("look the lease up", membership::remaining(client, l)).await? > 0 {
                return Ok(l);
            }
            tracing::info!(lease = %format!("{l:x}"), "fleet: the membership lease expired; granting a new one");
        }
        let l = timed("grant a lease", membership::grant(client)).await?;
        self.set_lease(Some(l));
        Ok(l)
    }
}
