//! Live migration between daemons: the destination's listener, the source's
//! `POST /v1/vms/{name}/migrate`, and the mutual TLS both speak (see
//! [`warmvm_vmm::migration`] for the stream itself).
//!
//! Trust: each daemon has a certificate and a key, and trusts peers whose certificate a
//! given CA signed, in both directions. The source checks that the destination's
//! certificate names the address it connects to (an IP address SAN); the destination
//! checks only that the source's chains to the CA. A peer that fails the handshake gets
//! nothing but the TLS alert, and is logged. Plain TCP only with `--migration-insecure`,
//! which is refused on any address but loopback.
//!
//! The listener is bound at start-up (before privileges drop) and handed to the next
//! daemon by a warm reboot, like the metrics listener. Each accepted connection gets a
//! thread that runs the receiver and, once the VM runs here, adds it to the Host. While
//! any migration is under way, in or out, a reboot is refused (409); while a VM migrates
//! out, operations on it are refused too.
//!
//! In doubt: each migration has an id (in its Hello), which the destination keeps once it
//! commits. A source whose stream broke after `Commit` keeps the VM paused with the
//! destination's address and that id; `POST /v1/vms/{name}/migrate/resolve` asks the
//! destination over a new mutual-TLS connection (first message `Ask`) and frees or
//! resumes the VM by its answer. It is never resumed without an answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use warmvm_vmm::migration::{self, MigrationError, MigrationReport, ReceiveOptions, SendOptions};
use warmvm_vmm::{Lifecycle, Vm};

pub(crate) mod setup;
pub(crate) mod under_way;

pub use setup::{bind, MigrationOptions, Setup, SetupError, Tls, MAX_IO_TIMEOUT_SECS};
pub use under_way::UnderWay;
use under_way::{InDoubt, Incoming, Outgoing};

use crate::state::{ApiError, ApiState};
use crate::types::{
    MigrateRequest, MigrationResolution, Resolved, MIGRATE_MAX_ROUNDS, MIGRATE_MAX_TIMEOUT_SECS,
};

/// The name under which a warm reboot hands the migration listener to the new daemon.
pub const MIGRATION_LISTENER_FD: &str = "migration-listener";

/// How long one read or write on a migration stream may wait for the peer, unless
/// `--migration-io-timeout` says otherwise.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a peer has for the TLS handshake: one that stalls holds a receiving slot no
/// longer than this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the source waits for the destination to accept the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Incoming migrations received at once; more are closed at once (and logged).
const MAX_INCOMING: usize = 4;
/// How often the listener looks for connections (and whether a reboot is under way).
const ACCEPT_POLL: Duration = Duration::from_millis(50);

/// Set a migration stream's timeouts (`io`: each read or write) and latency.
fn tune(tcp: &TcpStream, io: Duration) -> std::io::Result<()> {
    tcp.set_read_timeout(Some(io))?;
    tcp.set_write_timeout(Some(io))?;
    tcp.set_nodelay(true)
}

/// Bytes a peer must take per I/O timeout spent waiting on it in writes (see [`Timed`]).
const MIN_PROGRESS: usize = 1 << 20;

/// A migration stream's TCP connection, on which a peer that stalls fails the migration
/// after the I/O timeout (the socket's timeouts, set by [`tune`]):
/// - a read or write that waited out the timeout fails with `TimedOut`, not "would block":
///   rustls's I/O loop treats "would block" as "try the other direction, then again", so
///   with a peer stalled both ways a blocked write was retried without end;
/// - writes that together waited the timeout while the peer took less than
///   [`MIN_PROGRESS`] fail too: a stopped peer's kernel still takes a trickle, and each
///   partial write restarted the socket's timer, so a paused VM waited as long as the
///   peer was stopped;
/// - once it failed, every later read or write fails at once: rustls ignores a write
///   error once (it retries on the next call), and bytes may have gone out with the
///   failed write, so nothing more may be sent on it.
struct Timed<S> {
    inner: S,
    timeout: Duration,
    /// Time spent in writes, and the bytes they took, since the peer last took
    /// [`MIN_PROGRESS`].
    waited: Duration,
    taken: usize,
    /// Why the peer is deemed stalled, once it is.
    stalled: Option<String>,
}

impl<S> Timed<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        Timed {
            inner,
            timeout,
            waited: Duration::ZERO,
            taken: 0,
            stalled: None,
        }
    }

    /// The stream is dead from here: `why`, now and for every later call.
    fn stall(&mut self, why: String) -> std::io::Error {
        self.stalled = Some(why.clone());
        std::io::Error::new(std::io::ErrorKind::TimedOut, why)
    }

    fn check(&self) -> std::io::Result<()> {
        match &self.stalled {
            Some(why) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                why.clone(),
            )),
            None => Ok(()),
        }
    }

    fn no_progress(&mut self, e: std::io::Error) -> std::io::Error {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            self.stall(format!(
                "the peer made no progress within the I/O timeout ({} ms)",
                self.timeout.as_millis()
            ))
        } else {
            e
        }
    }
}

impl<S: Read> Read for Timed<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.check()?;
        self.inner.read(buf).map_err(|e| self.no_progress(e))
    }
}

impl<S: Write> Write for Timed<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.check()?;
        let t = std::time::Instant::now();
        let wrote = self.inner.write(buf);
        self.waited += t.elapsed();
        let n = wrote.map_err(|e| self.no_progress(e))?;
        self.taken += n;
        if self.taken >= MIN_PROGRESS {
            (self.waited, self.taken) = (Duration::ZERO, 0);
        } else if self.waited >= self.timeout {
            return Err(self.stall(format!(
                "the peer took {} bytes in {} ms of waiting for it (the I/O timeout is {} ms)",
                self.taken,
                self.waited.as_millis(),
                self.timeout.as_millis()
            )));
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.check()?;
        self.inner.flush().map_err(|e| self.no_progress(e))
    }
}

/// Start accepting migrations on `listener`: a thread that lives as long as the daemon
/// serves, and one thread per incoming migration.
pub fn start_listener(
    state: Arc<ApiState>,
    listener: TcpListener,
    hv: warmvm_vmm::Hypervisor,
    tls: Option<Arc<rustls::ServerConfig>>,
    io_timeout: Duration,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let hv = Arc::new(hv);
    std::thread::Builder::new()
        .name("migration-listen".into())
        .spawn(move || {
            warmvm_sandbox::enter_or_log(warmvm_sandbox::ThreadKind::Api);
            accept_loop(&state, &listener, &hv, tls.as_ref(), io_timeout);
        })?;
    Ok(())
}

fn accept_loop(
    state: &Arc<ApiState>,
    listener: &TcpListener,
    hv: &Arc<warmvm_vmm::Hypervisor>,
    tls: Option<&Arc<rustls::ServerConfig>>,
    io_timeout: Duration,
) {
    loop {
        if state.handed_over() || state.shutting_down.load(Ordering::SeqCst) {
            // The listener is the new daemon's now, or nothing more is accepted.
            return;
        }
        // During a reboot connections wait in the backlog, for this daemon or the next.
        if state.rebooting() {
            std::thread::sleep(ACCEPT_POLL);
            continue;
        }
        let (tcp, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a migration connection failed");
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        // A reboot that began meanwhile, or too many at once: the peer sees the
        // connection closed before anything was said, and its VM runs on there.
        let under_way = &state.migrations;
        let gate = match state.op_gate() {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(%peer, error = %e.message, "migration connection refused");
                continue;
            }
        };
        if under_way.incoming.fetch_add(1, Ordering::SeqCst) >= MAX_INCOMING {
            under_way.incoming.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%peer, max = MAX_INCOMING, "too many incoming migrations; connection closed");
            continue;
        }
        drop(gate);
        let st = state.clone();
        let hv = hv.clone();
        let tls = tls.cloned();
        let spawned = std::thread::Builder::new()
            .name("migration-in".into())
            .spawn(move || {
                warmvm_sandbox::enter_or_log(warmvm_sandbox::ThreadKind::Api);
                let counted = Incoming {
                    under_way: &st.migrations,
                    name: Mutex::new(None),
                };
                receive_one(&st, &hv, tcp, peer, tls, io_timeout, &counted);
            });
        if let Err(e) = spawned {
            state.migrations.incoming.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%peer, error = %e, "cannot start a thread for a migration");
        }
    }
}

fn receive_one(
    state: &ApiState,
    hv: &warmvm_vmm::Hypervisor,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    io_timeout: Duration,
    counted: &Incoming<'_>,
) {
    let handshake = if tls.is_some() {
        Some(HANDSHAKE_TIMEOUT)
    } else {
        Some(io_timeout)
    };
    if let Err(e) = tcp
        .set_nonblocking(false)
        .and_then(|()| tune(&tcp, io_timeout))
        .and_then(|()| tcp.set_read_timeout(handshake))
    {
        tracing::warn!(%peer, error = %e, "migration connection unusable");
        return;
    }
    let name_taken = |name: &str| {
        // Reserve the name for this migration, so that two arriving at once cannot both
        // take it.
        let mut names = state.migrations.incoming_names();
        if names.contains(name) || state.vms().iter().any(|v| v.name() == name) {
            return true;
        }
        names.insert(name.to_string());
        *counted.name.lock().unwrap_or_else(|p| p.into_inner()) = Some(name.to_string());
        false
    };
    let answer = |vm: &str, id: &str| {
        if !id.is_empty()
            && state
                .migrations
                .committed_in()
                .get(id)
                .is_some_and(|n| n == vm)
        {
            migration::Outcome::Committed
        } else if state.migrations.incoming_names().contains(vm)
            || state.vms().iter().any(|v| v.name() == vm)
        {
            // Still being received (perhaps that very migration, waiting for `Commit`),
            // or a VM of that name runs here whose migration id this daemon does not know
            // (ids are not handed over by a warm reboot): "not committed" could make two
            // copies run, so the source is told to wait.
            migration::Outcome::Undecided
        } else {
            migration::Outcome::NotCommitted
        }
    };
    let opts = ReceiveOptions {
        state_dir: state.state_dir.clone(),
        name_taken: &name_taken,
        answer: &answer,
    };
    let received = match tls {
        Some(cfg) => {
            let mut conn = match rustls::ServerConnection::new(cfg) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot start TLS for a migration");
                    return;
                }
            };
            while conn.is_handshaking() {
                if let Err(e) = conn.complete_io(&mut Timed::new(&tcp, io_timeout)) {
                    tracing::warn!(%peer, error = %e, "migration peer failed authentication; connection closed");
                    return;
                }
            }
            if let Err(e) = tcp.set_read_timeout(Some(io_timeout)) {
                tracing::warn!(%peer, error = %e, "migration connection unusable");
                return;
            }
            tracing::info!(%peer, "migration peer authenticated");
            migration::serve(
                hv,
                rustls::StreamOwned::new(conn, Timed::new(tcp, io_timeout)),
                &opts,
            )
        }
        None => migration::serve(hv, Timed::new(tcp, io_timeout), &opts),
    };
    match received {
        Ok(migration::Served::Answered {
            vm,
            migration_id,
            outcome,
        }) => {
            tracing::info!(%vm, %peer, %migration_id, ?outcome, "answered a source holding a VM in doubt");
        }
        Ok(migration::Served::Received(received)) => {
            let received = *received;
            let name = received.vm.name().to_string();
            let report = received.report;
            let vm = Arc::new(received.vm);
            // Under the Host lock, as the daemon's shutdown takes its list of VMs to stop.
            let late = {
                let mut host = state.lock();
                host.attach(vm.clone());
                if !report.migration_id.is_empty() {
                    state
                        .migrations
                        .committed_in()
                        .insert(report.migration_id.clone(), name.clone());
                }
                state.shutting_down.load(Ordering::SeqCst)
            };
            if late {
                // The daemon stops every VM: this one arrived after it took their list.
                tracing::warn!(vm = %name, "VM migrated in while the daemon stops; stopping it too");
                vm.stop(Duration::from_secs(crate::state::DEFAULT_STOP_GRACE_SECS));
            }
            tracing::info!(vm = %name, %peer, sender = %report.sender, pages = report.pages,
                rounds = report.rounds, restore_us = report.restore_us,
                resume_us = report.resume_us, "VM migrated in; it runs here");
        }
        Err(e) => tracing::warn!(%peer, error = %e, "incoming migration failed; nothing kept"),
    }
}

/// The status a failed migration is answered with.
fn failure_status(e: &MigrationError) -> u16 {
    match e {
        MigrationError::NotRunning { .. }
        | MigrationError::NameTaken(_)
        | MigrationError::Refused(_)
        | MigrationError::Cancelled(_)
        | MigrationError::NotInDoubt { .. }
        | MigrationError::Undecided => 409,
        _ => 502,
    }
}

impl MigrateRequest {
    /// Check the request; the destination's address.
    pub fn check(&self) -> Result<SocketAddr, ApiError> {
        let addr = crate::schema::parse_socket_addr(&self.to)
            .map(SocketAddr::V4)
            .ok_or_else(|| {
                ApiError::new(
                    400,
                    format!(
                        "to {:?}: not an IPv4 address and port (e.g. 192.0.2.7:7000)",
                        self.to
                    ),
                )
            })?;
        if self.downtime_ms == 0 || self.downtime_ms > 60_000 {
            return Err(ApiError::new(400, "downtime_ms must be 1..=60000"));
        }
        if self.max_rounds == 0 || self.max_rounds > MIGRATE_MAX_ROUNDS {
            return Err(ApiError::new(
                400,
                format!("max_rounds must be 1..={MIGRATE_MAX_ROUNDS}"),
            ));
        }
        if self.timeout_secs == 0 || self.timeout_secs > MIGRATE_MAX_TIMEOUT_SECS {
            return Err(ApiError::new(
                400,
                format!("timeout_secs must be 1..={MIGRATE_MAX_TIMEOUT_SECS}"),
            ));
        }
        Ok(addr)
    }
}

impl ApiState {
    /// Let this daemon migrate VMs out (and refuse to migrate to its own listener).
    pub fn enable_migration(&self, setup: Setup, listening_on: Option<SocketAddr>) {
        let _ = self.migration.set((setup, listening_on));
    }

    /// How this daemon migrates; 409 if it was started without the migration flags.
    fn migration_setup(&self) -> Result<(&Setup, Option<SocketAddr>), ApiError> {
        self.migration
            .get()
            .map(|(setup, listening_on)| (setup, *listening_on))
            .ok_or_else(|| {
                ApiError::new(
                    409,
                    "this daemon cannot migrate: start it with --migration-cert, --migration-key and --migration-ca (or --migration-insecure for loopback)",
                )
            })
    }

    /// Claim `vm` for a migration out (or for resolving one), if it is `wanted` and no
    /// other claim holds it; under the operation gate, so that no reboot begins meanwhile.
    /// 409 with `only` (what `wanted` allows) if it is in another state. The claim ends
    /// when the returned guard is dropped.
    fn claim_outgoing(
        &self,
        vm: &Vm,
        wanted: Lifecycle,
        only: &str,
    ) -> Result<Outgoing<'_>, ApiError> {
        let name = vm.name();
        let _gate = self.op_gate()?;
        let mut out = self.migrations.outgoing();
        if out.contains(name) {
            return Err(ApiError::new(
                409,
                format!("VM {name} is migrating already"),
            ));
        }
        let now = vm.lifecycle();
        if now != wanted {
            return Err(ApiError::new(
                409,
                format!("VM {name} is {}; {only}", now.name()),
            ));
        }
        out.insert(name.to_string());
        Ok(Outgoing(&self.migrations, name.to_string()))
    }

    /// `POST /v1/vms/{name}/migrate`: move a running VM to another daemon. On success it
    /// runs there and is gone from here; on a failure before the commit it runs on here;
    /// after the commit it stays here, paused and in doubt.
    pub fn migrate(&self, name: &str, req: &MigrateRequest) -> Result<MigrationReport, ApiError> {
        let to = req.check()?;
        let vm = self.find(name)?;
        let (setup, listening_on) = self.migration_setup()?;
        if setup.tls.is_none() && !to.ip().is_loopback() {
            return Err(ApiError::new(
                400,
                format!("to {to}: this daemon runs with --migration-insecure, which migrates only to loopback addresses"),
            ));
        }
        if listening_on.is_some_and(|l| {
            l == to || (l.port() == to.port() && l.ip().is_unspecified() && to.ip().is_loopback())
        }) {
            return Err(ApiError::new(
                409,
                format!("to {to}: that is this daemon's own migration listener"),
            ));
        }
        let _outgoing =
            self.claim_outgoing(&vm, Lifecycle::Running, "only a running VM can be migrated")?;
        let migration_id = new_migration_id(name);
        let opts = SendOptions {
            downtime: Duration::from_millis(req.downtime_ms),
            max_rounds: req.max_rounds,
            timeout: Duration::from_secs(req.timeout_secs),
            force: req.force,
            migration_id: migration_id.clone(),
            ..Default::default()
        };
        tracing::info!(vm = %name, %to, %migration_id, downtime_ms = req.downtime_ms, max_rounds = req.max_rounds,
            timeout_secs = req.timeout_secs, force = req.force, "migrating VM");
        let stream = connect(setup, to).map_err(|e| {
            ApiError::new(e.status, format!("{}; VM {name} runs on here", e.message))
        })?;
        let sent = migration::send(&vm, stream, &opts);
        match sent {
            Ok(report) => {
                // The VM runs at the destination: forget it here (its RAM is freed with
                // the last reference, outside the lock).
                let gone = self.lock().detach(name);
                drop(gone);
                Ok(report)
            }
            Err(failed) => {
                let status = failure_status(&failed.error);
                let now = match vm.lifecycle() {
                    Lifecycle::InDoubt => {
                        self.migrations
                            .in_doubt()
                            .insert(name.to_string(), InDoubt { to, migration_id });
                        format!(
                            "VM {name} stays here, paused and in doubt: resolve it (warmvm vm migrate --resolve {name}) to ask the destination whether it runs there"
                        )
                    }
                    other => format!("VM {name} is {} here", other.name()),
                };
                Err(ApiError::new(
                    status,
                    format!("migrating {name} to {to} failed: {}; {now}", failed.error),
                ))
            }
        }
    }

    /// `POST /v1/vms/{name}/migrate/resolve`: ask the destination of the migration that
    /// left VM `name` in doubt whether it runs the VM from that migration. Yes: the copy
    /// here is freed. No (it never committed, or does not have it): the VM resumes here.
    /// No answer: nothing changes (409 or 502) and the VM stays paused, in doubt.
    pub fn resolve_migration(&self, name: &str) -> Result<MigrationResolution, ApiError> {
        let vm = self.find(name)?;
        let (setup, _) = self.migration_setup()?;
        let _outgoing = self.claim_outgoing(
            &vm,
            Lifecycle::InDoubt,
            "only a VM in doubt after a migration is resolved",
        )?;
        let Some(InDoubt { to, migration_id }) = self.migrations.in_doubt().get(name).cloned()
        else {
            return Err(ApiError::new(
                409,
                format!("VM {name} is in doubt, but this daemon has no record of where it went; it stays paused"),
            ));
        };
        let stays = "; the VM stays here, paused and in doubt";
        let stream = connect(setup, to)
            .map_err(|e| ApiError::new(e.status, format!("{}{stays}", e.message)))?;
        let outcome = migration::ask(stream, name, &migration_id).map_err(|e| {
            ApiError::new(
                failure_status(&e),
                format!("asking {to} about VM {name}: {e}{stays}"),
            )
        })?;
        tracing::info!(vm = %name, %to, %migration_id, ?outcome, "the destination answered about the VM in doubt");
        migration::settle(&vm, outcome).map_err(|e| {
            ApiError::new(failure_status(&e), format!("resolving {name}: {e}{stays}"))
        })?;
        self.migrations.in_doubt().remove(name);
        let resolved = if outcome == migration::Outcome::Committed {
            let gone = self.lock().detach(name);
            drop(gone);
            Resolved::RunsThere
        } else {
            Resolved::ResumedHere
        };
        Ok(MigrationResolution {
            vm: name.to_string(),
            to: to.to_string(),
            migration_id,
            resolved,
        })
    }
}

/// A migration stream to a peer's listener: TLS over TCP, or plain TCP (loopback only).
trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// Connect to the migration listener at `to`, with this daemon's TLS if it has it.
fn connect(setup: &Setup, to: SocketAddr) -> Result<Box<dyn Conn>, ApiError> {
    let unreachable = |e: std::io::Error| {
        ApiError::new(
            502,
            format!("cannot reach a migration listener at {to}: {e}"),
        )
    };
    let tcp = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).map_err(unreachable)?;
    tune(&tcp, setup.io_timeout).map_err(unreachable)?;
    let Some(tls) = &setup.tls else {
        return Ok(Box::new(Timed::new(tcp, setup.io_timeout)));
    };
    let mut conn = rustls::ClientConnection::new(tls.client.clone(), ServerName::from(to.ip()))
        .map_err(|e| ApiError::new(500, format!("cannot start TLS: {e}")))?;
    let mut tcp = Timed::new(tcp, setup.io_timeout);
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| {
            tracing::warn!(%to, error = %e, "migration peer failed authentication");
            ApiError::new(502, format!("TLS with {to} failed: {e}"))
        })?;
    }
    Ok(Box::new(rustls::StreamOwned::new(conn, tcp)))
}

/// A fresh id for a migration of `name`: unique in practice (the time, this process,
/// and the standard library's per-process random hash keys).
fn new_migration_id(name: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(name.as_bytes());
    h.write_u32(std::process::id());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    format!("{:x}-{:016x}", now, h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> MigrationOptions {
        MigrationOptions::default()
    }

    #[test]
    fn insecure_is_refused_off_loopback() {
        let o = MigrationOptions {
            listen: Some("10.0.0.1:7000".parse().unwrap()),
            insecure: true,
            ..opts()
        };
        assert!(matches!(o.setup(), Err(SetupError::InsecureNotLoopback(_))));
        let o = MigrationOptions {
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            insecure: true,
            ..opts()
        };
        assert!(o.setup().expect("loopback is allowed").is_some());
    }

    #[test]
    fn a_listener_needs_trust_and_the_files_go_together() {
        let o = MigrationOptions {
            listen: Some("10.0.0.1:7000".parse().unwrap()),
            ..opts()
        };
        assert!(matches!(o.setup(), Err(SetupError::NoTrust)));
        let o = MigrationOptions {
            cert: Some("/nonexistent/c.pem".into()),
            ..opts()
        };
        assert!(matches!(
            o.setup(),
            Err(SetupError::Incomplete("--migration-key"))
        ));
        let o = MigrationOptions {
            cert: Some("/nonexistent/c.pem".into()),
            key: Some("/nonexistent/k.pem".into()),
            ca: Some("/nonexistent/ca.pem".into()),
            ..opts()
        };
        let e = o.setup().expect_err("missing files");
        assert!(
            e.to_string()
                .starts_with("--migration-cert /nonexistent/c.pem"),
            "{e}"
        );
        assert!(opts().setup().expect("nothing asked").is_none());
    }

    #[test]
    fn the_io_timeout_is_bounded_and_handed_to_the_next_daemon() {
        let with = |secs| MigrationOptions {
            insecure: true,
            io_timeout_secs: Some(secs),
            ..opts()
        };
        for bad in [0, MAX_IO_TIMEOUT_SECS + 1] {
            let e = with(bad).setup().expect_err("out of range");
            assert!(e.to_string().contains("--migration-io-timeout"), "{e}");
        }
        let s = with(2).setup().expect("in range").expect("a setup");
        assert_eq!(s.io_timeout, Duration::from_secs(2));
        let args = with(2).to_args();
        assert!(
            args.ends_with(&["--migration-io-timeout".into(), "2".into()]),
            "{args:?}"
        );
        let s = MigrationOptions {
            insecure: true,
            ..opts()
        };
        assert_eq!(s.setup().unwrap().unwrap().io_timeout, IO_TIMEOUT);
        assert!(!s.to_args().iter().any(|a| a == "--migration-io-timeout"));
    }

    #[test]
    fn a_write_to_a_peer_that_never_reads_fails_as_timed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a listener");
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).expect("connected");
        let (_peer, _) = listener.accept().expect("accepted");
        let timeout = Duration::from_millis(200);
        tune(&tcp, timeout).unwrap();
        // The peer's kernel takes what fits its buffers, then a trickle; it never reads.
        let chunk = vec![0u8; 1 << 20];
        let mut w = Timed::new(tcp, timeout);
        let e = (0..1024)
            .try_for_each(|_| w.write_all(&chunk))
            .expect_err("1 GiB never fits a peer that does not read");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        // Dead from here: nothing more goes out, and nothing is read.
        let again = w.write(b"x").expect_err("a stalled stream stays failed");
        assert_eq!(again.kind(), std::io::ErrorKind::TimedOut, "{again}");
        let read = w
            .read(&mut [0u8; 1])
            .expect_err("a stalled stream stays failed");
        assert_eq!(read.kind(), std::io::ErrorKind::TimedOut, "{read}");
    }

    #[test]
    fn migrate_requests_are_checked() {
        let ok: MigrateRequest = serde_json::from_str(r#"{"to": "192.0.2.7:7000"}"#).unwrap();
        assert_eq!(
            (ok.downtime_ms, ok.max_rounds, ok.timeout_secs, ok.force),
            (300, 30, 600, false)
        );
        assert!(ok.check().is_ok());
        for bad in [
            r#"{"to": "nowhere"}"#,
            r#"{"to": "192.0.2.7"}"#,
            r#"{"to": "192.0.2.07:7000"}"#,
            r#"{"to": "192.0.2.7:07000"}"#,
            r#"{"to": "192.0.2.7:65536"}"#,
            r#"{"to": "[::1]:7000"}"#,
            r#"{"to": "192.0.2.7:7000", "max_rounds": 0}"#,
            r#"{"to": "192.0.2.7:7000", "timeout_secs": 0}"#,
            r#"{"to": "192.0.2.7:7000", "downtime_ms": 0}"#,
        ] {
            let r: MigrateRequest = serde_json::from_str(bad).unwrap();
            assert_eq!(r.check().expect_err(bad).status, 400, "{bad}");
        }
        assert!(serde_json::from_str::<MigrateRequest>(r#"{"to": "a:1", "speed": 1}"#).is_err());
        assert!(serde_json::from_str::<MigrateRequest>(r#"{}"#).is_err());
    }
}
