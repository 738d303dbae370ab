//! The API's client, as the CLI uses it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::aging::{AgingReport, HoldRequest};
use crate::http::{self, ClientResponse};
use crate::types::{
    DaemonStatus, Mode, RebootRequest, RestoreRequest, SnapshotRequest, StopRequest,
    UnsupportedMode, VmList, REBOOT_TIMEOUT,
};
use warmvm_vmm::handover::RebootReport;
use warmvm_vmm::snapshot::SaveReport;
use warmvm_vmm::VmReport;

/// How long the client waits for an answer (a stop waits for its grace period on top).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one status request may take while a reboot is watched (the daemon answers at
/// once; a request sent during the handover waits in the backlog for the new daemon).
const STATUS_POLL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no warmvm daemon is listening on {}: start one with `warmvm daemon`", .0.display())]
    NoDaemon(PathBuf),
    #[error("cannot connect to {}: {err}", path.display())]
    Connect { path: PathBuf, err: io::Error },
    #[error("talking to the daemon on {}: {err}", path.display())]
    Io { path: PathBuf, err: io::Error },
    #[error("the daemon's answer is malformed: {0}")]
    Protocol(String),
    /// The daemon refused or failed the request.
    #[error("{message}")]
    Api { status: u16, message: String },
    /// A reboot was still under way when the client stopped waiting for it.
    #[error("the reboot was still under way after {} s: {}", waited.as_secs(), under_way(status))]
    RebootUnderWay {
        waited: Duration,
        status: Box<DaemonStatus>,
    },
}

/// What a status says of the reboot under way, for [`ClientError::RebootUnderWay`].
fn under_way(status: &DaemonStatus) -> String {
    match &status.reboot_in_progress {
        Some(p) => p.to_string(),
        None => format!("daemon pid {} runs", status.pid),
    }
}

impl ClientError {
    /// The HTTP status, if the daemon answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A connection factory for one daemon socket (each request uses its own connection).
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Send one request; any status comes back as it is.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<ClientResponse, ClientError> {
        self.raw_with_fds(method, path, body, &[])
    }

    /// [`Client::raw`], passing `fds` with the request's first bytes (SCM_RIGHTS).
    pub fn raw_with_fds(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        fds: &[std::os::fd::RawFd],
    ) -> Result<ClientResponse, ClientError> {
        let mut stream = UnixStream::connect(&self.socket).map_err(|err| match err.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::NoDaemon(self.socket.clone())
            }
            _ => ClientError::Connect {
                path: self.socket.clone(),
                err,
            },
        })?;
        let io_err = |err| ClientError::Io {
            path: self.socket.clone(),
            err,
        };
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(io_err)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(io_err)?;
        let body = body.unwrap_or_default();
        let mut msg = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: warmvm/{}\r\nAccept: application/json\r\nConnection: close\r\n",
            env!("CARGO_PKG_VERSION")
        );
        if !body.is_empty() || matches!(method, "POST" | "PUT") {
            msg.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        msg.push_str("\r\n");
        let mut bytes = msg.into_bytes();
        bytes.extend_from_slice(body);
        // A daemon that refuses a request early (e.g. 413) may close before reading all of
        // it: its answer is still there to read.
        let sent = if fds.is_empty() {
            stream.write_all(&bytes)
        } else {
            use vmm_sys_util::sock_ctrl_msg::ScmSocket;
            stream
                .send_with_fds(&[&bytes[..]], fds)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))
                .and_then(|n| stream.write_all(&bytes[n..]))
        };
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut data = Vec::new();
        let read = stream.read_to_end(&mut data);
        if data.is_empty() {
            sent.map_err(io_err)?;
            read.map_err(io_err)?;
            return Err(ClientError::Protocol(
                "the daemon closed without an answer".into(),
            ));
        }
        http::parse_response(&data).map_err(ClientError::Protocol)
    }

    /// Send one request and return the JSON body of a 2xx answer; an error answer becomes
    /// [`ClientError::Api`] with the daemon's message.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<serde_json::Value, ClientError> {
        let resp = self.raw(method, path, body)?;
        Self::json_answer(resp)
    }

    /// The JSON body of a 2xx answer; an error answer becomes [`ClientError::Api`].
    fn json_answer(resp: ClientResponse) -> Result<serde_json::Value, ClientError> {
        let value: Result<serde_json::Value, _> = serde_json::from_slice(&resp.body);
        if (200..300).contains(&resp.status) {
            return value.map_err(|e| ClientError::Protocol(format!("invalid JSON: {e}")));
        }
        let message = value
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_string))
            .unwrap_or_else(|| {
                format!(
                    "the daemon answered {} {}",
                    resp.status,
                    http::reason(resp.status)
                )
            });
        Err(ClientError::Api {
            status: resp.status,
            message,
        })
    }

    pub fn status(&self) -> Result<serde_json::Value, ClientError> {
        self.call("GET", "/v1/status", None)
    }

    pub fn list(&self) -> Result<serde_json::Value, ClientError> {
        self.call("GET", "/v1/vms", None)
    }

    pub fn create(&self, config: &warmvm_vmm::VmConfig) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::to_vec(config).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call("POST", "/v1/vms", Some(&body))
    }

    /// Create a VM whose interfaces with a `tap_fd` use that fd of this process: the fds
    /// travel with the request, and each `tap_fd` becomes its position among them.
    pub fn create_passing_taps(
        &self,
        config: &warmvm_vmm::VmConfig,
    ) -> Result<serde_json::Value, ClientError> {
        let mut config = config.clone();
        let mut fds = Vec::new();
        for net in &mut config.nets {
            if let Some(fd) = net.tap_fd {
                net.tap_fd = Some(fds.len() as i32);
                fds.push(fd);
            }
        }
        let body = serde_json::to_vec(&config).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = self.raw_with_fds("POST", "/v1/vms", Some(&body), &fds)?;
        Self::json_answer(resp)
    }

    pub fn show(&self, name: &str) -> Result<serde_json::Value, ClientError> {
        self.call("GET", &vm_path(name, ""), None)
    }

    pub fn pause(&self, name: &str) -> Result<serde_json::Value, ClientError> {
        self.call("PUT", &vm_path(name, "/pause"), None)
    }

    pub fn resume(&self, name: &str) -> Result<serde_json::Value, ClientError> {
        self.call("PUT", &vm_path(name, "/resume"), None)
    }

    pub fn stop(
        &self,
        name: &str,
        grace_secs: Option<u64>,
    ) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::to_vec(&StopRequest { grace_secs })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let grace = grace_secs.unwrap_or(crate::types::DEFAULT_STOP_GRACE_SECS);
        self.clone()
            .with_timeout(self.timeout + Duration::from_secs(grace))
            .call("PUT", &vm_path(name, "/stop"), Some(&body))
    }

    /// Delete a VM that is not running, and its state directory unless `keep_logs`.
    pub fn delete(&self, name: &str, keep_logs: bool) -> Result<serde_json::Value, ClientError> {
        let query = if keep_logs { "?keep_logs=true" } else { "" };
        self.call("DELETE", &format!("{}{query}", vm_path(name, "")), None)
    }

    /// Warm-reboot the daemon (into `binary`, or its own binary): answers with the
    /// reboot's report once the new daemon runs every VM.
    pub fn reboot(
        &self,
        mode: &str,
        binary: Option<&Path>,
    ) -> Result<serde_json::Value, ClientError> {
        self.reboot_with(mode, binary, None)
    }

    /// Reboot the daemon in `mode` (warm, saved, cold); `grace_secs` for cold. For saved
    /// and cold, returns once the new daemon has brought every VM back (or given up on
    /// it), so that its status has `last_reboot`.
    pub fn reboot_with(
        &self,
        mode: &str,
        binary: Option<&Path>,
        grace_secs: Option<u64>,
    ) -> Result<serde_json::Value, ClientError> {
        // A mode none of the three is refused here as the daemon would refuse it.
        let mode: Mode = mode
            .parse()
            .map_err(|e: UnsupportedMode| ClientError::Api {
                status: 400,
                message: e.to_string(),
            })?;
        let req = RebootRequest {
            binary: binary.map(Path::to_path_buf),
            grace_secs,
            ..RebootRequest::new(mode)
        };
        // The daemon allows the new one up to its stage timeout to prepare, then its ready
        // budget (far shorter) to take the guests over.
        let timeout = self.timeout.max(if mode == Mode::Warm {
            REBOOT_TIMEOUT * 2 + Duration::from_secs(30)
        } else {
            // Saving every VM's RAM, or waiting for every guest to power off, then for
            // every guest to boot.
            Duration::from_secs(1800)
        });
        let started = std::time::Instant::now();
        let report = self.reboot_request(&req, timeout)?;
        if mode != Mode::Warm {
            let new_pid = serde_json::from_value::<RebootReport>(report.clone())
                .map_or(0, |r| u64::from(r.new_pid));
            let left = timeout.saturating_sub(started.elapsed());
            match self.wait_reboot_done(Some(new_pid), left) {
                // The reboot was answered; a new daemon gone since is for the caller to
                // find out (the next daemon started brings its VMs back).
                Ok(_) | Err(ClientError::NoDaemon(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }

    /// Send `PUT /v1/reboot`, waiting at most `timeout` for the answer (the old daemon
    /// answers once the new one runs: a saved or cold reboot's VMs may still be coming
    /// back then, see [`Client::wait_reboot_done`]).
    pub fn reboot_request(
        &self,
        req: &RebootRequest,
        timeout: Duration,
    ) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.clone()
            .with_timeout(timeout.max(Duration::from_secs(1)))
            .call("PUT", "/v1/reboot", Some(&body))
    }

    /// Poll `GET /v1/status` until the daemon answering is `pid` (any, if `None`) and has no
    /// reboot in progress: [`TypedClient::wait_reboot_done`], answering with the status's
    /// JSON.
    pub fn wait_reboot_done(
        &self,
        pid: Option<u64>,
        timeout: Duration,
    ) -> Result<serde_json::Value, ClientError> {
        self.typed().wait_reboot_done(pid, timeout).map(|a| a.json)
    }

    /// Snapshot a VM into `dir` (on the daemon's host).
    pub fn snapshot(
        &self,
        name: &str,
        dir: &Path,
        leave_paused: bool,
    ) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::to_vec(&crate::types::SnapshotRequest {
            dir: dir.to_path_buf(),
            leave_paused,
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        // Writing RAM takes time in proportion to its size.
        self.clone()
            .with_timeout(self.timeout.max(Duration::from_secs(600)))
            .call("PUT", &vm_path(name, "/snapshot"), Some(&body))
    }

    /// Create a VM from the snapshot in `dir`.
    pub fn restore(
        &self,
        dir: &Path,
        name: Option<&str>,
        backing: &warmvm_vmm::snapshot::Backing,
    ) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::to_vec(&crate::types::RestoreRequest {
            dir: dir.to_path_buf(),
            name: name.map(str::to_string),
            disks: backing.disks.clone(),
            taps: backing.taps.clone(),
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.clone()
            .with_timeout(self.timeout.max(Duration::from_secs(600)))
            .call("POST", "/v1/restore", Some(&body))
    }

    /// The Prometheus text.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let resp = self.raw("GET", "/metrics", None)?;
        if resp.status != 200 {
            return Err(ClientError::Api {
                status: resp.status,
                message: String::from_utf8_lossy(&resp.body).trim().to_string(),
            });
        }
        String::from_utf8(resp.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

/// A typed answer and the JSON it was decoded from, as the daemon sent it (what `--json`
/// prints, unchanged). It reads as its value: `answer.pid` is `answer.value.pid`.
#[derive(Clone, Debug)]
pub struct Answer<T> {
    pub value: T,
    pub json: serde_json::Value,
}

impl<T> std::ops::Deref for Answer<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> Answer<T> {
    /// The typed value alone.
    pub fn into_value(self) -> T {
        self.value
    }
}

/// [`Client`]'s requests with typed answers: the same types the daemon's operations return
/// and the OpenAPI test checks ([`crate::types`] and the VMM's reports), decoded strictly
/// from the answer. Each answer keeps its JSON beside its value ([`Answer`]).
#[derive(Clone, Copy, Debug)]
pub struct TypedClient<'a>(&'a Client);

impl Client {
    /// This client, answering with typed values.
    pub fn typed(&self) -> TypedClient<'_> {
        TypedClient(self)
    }
}

/// Decode a 2xx answer's JSON (of `what`, e.g. `GET /v1/status`) as `T`.
fn decode<T: serde::de::DeserializeOwned>(
    what: &str,
    json: serde_json::Value,
) -> Result<Answer<T>, ClientError> {
    match T::deserialize(&json) {
        Ok(value) => Ok(Answer { value, json }),
        Err(e) => Err(ClientError::Protocol(format!(
            "unexpected answer to {what}: {e}"
        ))),
    }
}

fn encode(body: &impl serde::Serialize) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))
}

impl TypedClient<'_> {
    /// The JSON answer of a 2xx, decoded as `T`.
    fn call<T: serde::de::DeserializeOwned>(
        client: &Client,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Answer<T>, ClientError> {
        let json = client.call(method, path, body)?;
        decode(&format!("{method} {path}"), json)
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<Answer<DaemonStatus>, ClientError> {
        Self::call(self.0, "GET", "/v1/status", None)
    }

    /// `GET /v1/vms`.
    pub fn list(&self) -> Result<Answer<VmList>, ClientError> {
        Self::call(self.0, "GET", "/v1/vms", None)
    }

    /// `GET /v1/vms/{name}`.
    pub fn show(&self, name: &str) -> Result<Answer<VmReport>, ClientError> {
        Self::call(self.0, "GET", &vm_path(name, ""), None)
    }

    /// `POST /v1/vms`, passing the TAP fds the config names (see
    /// [`Client::create_passing_taps`]).
    pub fn create_passing_taps(
        &self,
        config: &warmvm_vmm::VmConfig,
    ) -> Result<Answer<VmReport>, ClientError> {
        decode("POST /v1/vms", self.0.create_passing_taps(config)?)
    }

    /// `PUT /v1/vms/{name}/pause`.
    pub fn pause(&self, name: &str) -> Result<Answer<VmReport>, ClientError> {
        Self::call(self.0, "PUT", &vm_path(name, "/pause"), None)
    }

    /// `PUT /v1/vms/{name}/resume`.
    pub fn resume(&self, name: &str) -> Result<Answer<VmReport>, ClientError> {
        Self::call(self.0, "PUT", &vm_path(name, "/resume"), None)
    }

    /// `PUT /v1/vms/{name}/stop` (see [`Client::stop`]).
    pub fn stop(
        &self,
        name: &str,
        grace_secs: Option<u64>,
    ) -> Result<Answer<VmReport>, ClientError> {
        decode("PUT /v1/vms/{name}/stop", self.0.stop(name, grace_secs)?)
    }

    /// `DELETE /v1/vms/{name}` (see [`Client::delete`]).
    pub fn delete(&self, name: &str, keep_logs: bool) -> Result<Answer<VmReport>, ClientError> {
        decode("DELETE /v1/vms/{name}", self.0.delete(name, keep_logs)?)
    }

    /// `PUT /v1/reboot`, waiting at most `timeout` for the answer (see
    /// [`Client::reboot_request`]).
    pub fn reboot(
        &self,
        req: &RebootRequest,
        timeout: Duration,
    ) -> Result<Answer<RebootReport>, ClientError> {
        decode("PUT /v1/reboot", self.0.reboot_request(req, timeout)?)
    }

    /// Reboot the daemon in `mode` and wait until the new daemon runs every VM (see
    /// [`Client::reboot_with`]): the old daemon's report of the reboot.
    pub fn reboot_with(
        &self,
        mode: Mode,
        binary: Option<&Path>,
        grace_secs: Option<u64>,
    ) -> Result<Answer<RebootReport>, ClientError> {
        let json = self.0.reboot_with(mode.name(), binary, grace_secs)?;
        decode("PUT /v1/reboot", json)
    }

    /// Poll `GET /v1/status` until the daemon answering is `pid` (any, if `None`) and has no
    /// reboot in progress (a new daemon of a saved or cold reboot brings its VMs back while
    /// it serves); returns that status. Errors while the daemon is being replaced are
    /// retried until `timeout`; then the last status seen (or error) is returned as an
    /// error. No daemon on the socket at all ends the wait at once.
    pub fn wait_reboot_done(
        &self,
        pid: Option<u64>,
        timeout: Duration,
    ) -> Result<Answer<DaemonStatus>, ClientError> {
        let deadline = std::time::Instant::now() + timeout;
        let polling = self.0.clone().with_timeout(STATUS_POLL_TIMEOUT);
        loop {
            let seen = polling.typed().status();
            // Nobody holds the socket: neither daemon runs (during a reboot one always
            // does, as the listener is handed over before the old one exits).
            if let Err(ClientError::NoDaemon(_)) = seen {
                return seen;
            }
            let done = matches!(&seen, Ok(s) if s.reboot_in_progress.is_none()
                && pid.is_none_or(|p| u64::from(s.pid) == p));
            if done {
                return seen;
            }
            if std::time::Instant::now() >= deadline {
                return Err(match seen {
                    Ok(s) => ClientError::RebootUnderWay {
                        waited: timeout,
                        status: Box::new(s.into_value()),
                    },
                    Err(e) => e,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `PUT /v1/vms/{name}/snapshot`.
    pub fn snapshot(
        &self,
        name: &str,
        req: &SnapshotRequest,
    ) -> Result<Answer<SaveReport>, ClientError> {
        let json = self.0.snapshot(name, &req.dir, req.leave_paused)?;
        decode("PUT /v1/vms/{name}/snapshot", json)
    }

    /// `POST /v1/vms/{name}/migrate`: waits for the migration to end (the request's
    /// timeout, plus time for the switchover).
    pub fn migrate(
        &self,
        name: &str,
        req: &crate::types::MigrateRequest,
    ) -> Result<Answer<crate::types::MigrationReport>, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let wait = Duration::from_secs(req.timeout_secs.saturating_add(120));
        let json = self.0.clone().with_timeout(self.0.timeout.max(wait)).call(
            "POST",
            &vm_path(name, "/migrate"),
            Some(&body),
        )?;
        decode("POST /v1/vms/{name}/migrate", json)
    }

    /// `POST /v1/vms/{name}/migrate/resolve`.
    pub fn resolve_migration(
        &self,
        name: &str,
    ) -> Result<Answer<crate::types::MigrationResolution>, ClientError> {
        Self::call(self.0, "POST", &vm_path(name, "/migrate/resolve"), None)
    }

    /// `POST /v1/restore`.
    pub fn restore(&self, req: &RestoreRequest) -> Result<Answer<VmReport>, ClientError> {
        let backing = warmvm_vmm::snapshot::Backing {
            disks: req.disks.clone(),
            taps: req.taps.clone(),
        };
        let json = self.0.restore(&req.dir, req.name.as_deref(), &backing)?;
        decode("POST /v1/restore", json)
    }

    /// `GET /v1/aging`.
    pub fn aging(&self) -> Result<Answer<AgingReport>, ClientError> {
        Self::call(self.0, "GET", "/v1/aging", None)
    }

    /// `GET /v1/aging/history`.
    pub fn aging_history(
        &self,
    ) -> Result<Answer<crate::aging::monitor::AgingHistory>, ClientError> {
        Self::call(self.0, "GET", "/v1/aging/history", None)
    }

    /// `PUT /v1/aging/hold`.
    pub fn hold(&self, hold: bool) -> Result<Answer<AgingReport>, ClientError> {
        let body = encode(&HoldRequest { hold })?;
        Self::call(self.0, "PUT", "/v1/aging/hold", Some(&body))
    }
}

/// `/v1/vms/<name><suffix>`, with anything outside a VM name's characters percent-encoded
/// (such a name matches no VM, and gets a clean 404).
fn vm_path(name: &str, suffix: &str) -> String {
    let mut p = String::from("/v1/vms/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
            p.push(b as char);
        } else {
            p.push_str(&format!("%{b:02X}"));
        }
    }
    p.push_str(suffix);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_are_encoded_into_paths() {
        assert_eq!(vm_path("web-1.a_b", "/pause"), "/v1/vms/web-1.a_b/pause");
        assert_eq!(vm_path("a/b c", ""), "/v1/vms/a%2Fb%20c");
    }

    /// `GET /v1/status` of a daemon built before `build` and `privileges` (as commit a412568,
    /// the oldest build the upgrade test starts from, answers): it reads, with those absent.
    #[test]
    fn an_older_daemons_status_is_read() {
        let json = serde_json::json!({
            "version": "0.1.0", "pid": 41, "uptime_ms": 1200, "vm_count": 1,
            "vms_running": 1, "vms_paused": 0, "state_dir": "/run/warmvm",
        });
        let s = decode::<DaemonStatus>("GET /v1/status", json.clone()).unwrap();
        assert_eq!((s.pid, s.vm_count, s.build.as_str()), (41, 1, ""));
        assert!(s.privileges.is_none() && s.binary.is_none() && s.last_takeover.is_none());
        assert_eq!(s.json, json, "the answer's JSON is kept as it came");
        // Anything else missing is a malformed answer, not a default.
        let mut no_pid = json;
        no_pid.as_object_mut().unwrap().remove("pid");
        let e = decode::<DaemonStatus>("GET /v1/status", no_pid).unwrap_err();
        assert!(
            matches!(&e, ClientError::Protocol(m) if m.contains("GET /v1/status") && m.contains("pid")),
            "{e}"
        );
    }

    /// A VM's report from a daemon built before the reports listed devices (commit 12d284d).
    #[test]
    fn an_older_daemons_vm_report_is_read() {
        let json = serde_json::json!({
            "name": "a", "state": "powered-off", "exit_status": 3, "memory_mib": 64,
            "vcpus": 1, "boot": "ring3", "uptime_ms": 5, "console_log": "/x/console.log",
            "ram_resident_mib": 2,
            "exits": [{ "id": 0, "io_exits": 1, "mmio_exits": 0, "other_exits": 0,
                        "kicks": 0, "waits": 0, "wait_ms": 0 }],
            "unknown_accesses": { "pio_reads": 0, "pio_writes": 0, "mmio_reads": 0,
                                  "mmio_writes": 0 },
            "guest": null,
        });
        let r = decode::<VmReport>("GET /v1/vms/a", json).unwrap();
        assert_eq!(
            r.lifecycle,
            warmvm_vmm::Lifecycle::PoweredOff { exit_status: 3 }
        );
        assert!(r.devices.is_empty() && r.guest.is_none());
    }

    #[test]
    fn a_reboot_under_way_is_told_in_words() {
        let status: DaemonStatus = serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "pid": 41, "uptime_ms": 1200, "vm_count": 2,
            "vms_running": 2, "vms_paused": 0, "state_dir": "/run/warmvm",
            "reboot_in_progress": { "mode": "saved", "phase": "saving", "vms_done": 1,
                                    "vms_total": 2, "elapsed_ms": 3500 },
        }))
        .unwrap();
        let e = ClientError::RebootUnderWay {
            waited: Duration::from_secs(4),
            status: Box::new(status),
        };
        assert_eq!(
            e.to_string(),
            "the reboot was still under way after 4 s: saved reboot, saving, 3 s in, 1 of 2 VMs done"
        );
    }

    #[test]
    fn a_missing_socket_means_no_daemon() {
        let c = Client::new(Path::new("/nonexistent/warmvm.sock"));
        let e = c.status().unwrap_err();
        assert!(matches!(e, ClientError::NoDaemon(_)));
        assert_eq!(
            e.to_string(),
            "no warmvm daemon is listening on /nonexistent/warmvm.sock: start one with `warmvm daemon`"
        );
    }
}
