//! The HTTP layer over the operations: route a request ([`crate::routes`]), decode its body
//! into the typed request, call the operation ([`crate::ops`], [`crate::reboot`]) and
//! encode its answer; the metrics text for `GET /metrics`. It decides nothing itself: what
//! a request does, and which status each refusal gets, are the operations'.

#[cfg(feature = "fault-injection")]
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::de::DeserializeOwned;
use warmvm_vmm::VmConfig;

use crate::aging::HoldRequest;
use crate::http::{Request, Response, CONTENT_TYPE_METRICS};
use crate::routes::{route, Op, Routed, ROUTES};
use crate::state::{ApiError, ApiState};
use crate::types::StopRequest;

/// The query of `DELETE /v1/vms/{name}`: `keep_logs=true|false` (default false).
fn parse_delete_query(query: Option<&str>) -> Result<bool, ApiError> {
    let mut keep_logs = false;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("keep_logs", "true")) => keep_logs = true,
            Some(("keep_logs", "false")) => keep_logs = false,
            Some(("keep_logs", v)) => {
                return Err(ApiError::new(
                    400,
                    format!("keep_logs must be true or false, not {v:?}"),
                ))
            }
            None if pair == "keep_logs" => {
                return Err(ApiError::new(400, "keep_logs needs a value: true or false"))
            }
            _ => {
                return Err(ApiError::new(
                    400,
                    format!("unknown query parameter {pair:?} (only keep_logs)"),
                ))
            }
        }
    }
    Ok(keep_logs)
}

/// A JSON body of `what`, strictly.
fn parse<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::new(400, format!("invalid {what}: {e}")))
}

/// The body of `POST /v1/vms`: a VM config.
fn parse_create(body: &[u8]) -> Result<VmConfig, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            400,
            "the request body must be a VM config as JSON (see VmConfig in docs/openapi.json)",
        ));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::new(400, format!("invalid VM config: {e}")))
}

/// The optional body of `PUT /v1/vms/{name}/stop`.
fn parse_stop(body: &[u8]) -> Result<StopRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(StopRequest::default());
    }
    parse(body, "stop request")
}

/// The body of `PUT /v1/aging/hold`: `{"hold": true|false}`.
fn parse_hold(body: &[u8]) -> Result<HoldRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            400,
            format!(r#"invalid hold request (expected {{"hold": true|false}}): {e}"#),
        )
    })
}

impl ApiState {
    /// Answer one request. `metrics_only` for the loopback metrics port.
    pub fn handle(&self, req: &Request, metrics_only: bool) -> Response {
        self.handle_with_fds(req, metrics_only, Vec::new())
    }

    /// [`ApiState::handle`] for a request that passed `fds` (SCM_RIGHTS on the API socket):
    /// only VM creation takes any.
    pub fn handle_with_fds(
        &self,
        req: &Request,
        metrics_only: bool,
        fds: Vec<std::fs::File>,
    ) -> Response {
        let started = Instant::now();
        let response = self.handle_timed(req, metrics_only, fds);
        if let Some(m) = self.aging() {
            m.record_latency(started.elapsed());
        }
        response
    }

    fn handle_timed(&self, req: &Request, metrics_only: bool, fds: Vec<std::fs::File>) -> Response {
        #[cfg(feature = "fault-injection")]
        std::thread::sleep(crate::aging::inject::request_delay());
        const METRICS_ONLY: &[crate::routes::Route] = &[crate::routes::Route {
            method: "GET",
            path: "/metrics",
            op: Op::Metrics,
        }];
        #[cfg(feature = "fault-injection")]
        if !metrics_only && req.method == "PUT" && req.path == "/v1/debug/panic" {
            return self
                .inject_panic(&req.body)
                .unwrap_or_else(|e| e.response());
        }
        #[cfg(feature = "fault-injection")]
        if !metrics_only && req.method == "PUT" && req.path == "/v1/debug/aging" {
            return self
                .inject_aging(&req.body)
                .unwrap_or_else(|e| e.response());
        }
        let routes = if metrics_only { METRICS_ONLY } else { ROUTES };
        let (op, name) = match route(routes, &req.method, &req.path) {
            Routed::Found { op, name } => (op, name),
            Routed::MethodNotAllowed(allow) => {
                let mut r = Response::error(
                    405,
                    &format!(
                        "{} does not take {} (allowed: {allow})",
                        req.path, req.method
                    ),
                );
                r.allow = Some(allow);
                return r;
            }
            Routed::NotFound => {
                return Response::error(404, &format!("no such path: {}", req.path))
            }
        };
        if self.handed_over() {
            return Response::error(
                503,
                "this daemon has handed its VMs over to a new daemon process; retry",
            );
        }
        let name = name.unwrap_or_default();
        if !fds.is_empty() && op != Op::CreateVm {
            return Response::error(
                400,
                &format!(
                    "{} {} takes no fds, but {} were passed",
                    req.method,
                    req.path,
                    fds.len()
                ),
            );
        }
        let result = match op {
            Op::Status => self.status().map(|s| Response::json(200, &s)),
            Op::ListVms => Ok(Response::json(200, &self.list())),
            Op::CreateVm => parse_create(&req.body)
                .and_then(|config| self.create_with_fds(&config, fds))
                .map(|r| Response::json(201, &r)),
            Op::ShowVm => self.find(name).map(|vm| Response::json(200, &vm.report())),
            Op::PauseVm => self.pause(name).map(|r| Response::json(200, &r)),
            Op::ResumeVm => self.resume(name).map(|r| Response::json(200, &r)),
            Op::StopVm => parse_stop(&req.body)
                .and_then(|r| self.stop(name, &r))
                .map(|r| Response::json(200, &r)),
            Op::DeleteVm => parse_delete_query(req.query.as_deref())
                .and_then(|keep_logs| self.delete(name, keep_logs))
                .map(|r| Response::json(200, &r)),
            Op::Aging => self
                .aging_or_404()
                .map(|m| Response::json(200, &m.report())),
            Op::AgingHistory => self
                .aging_or_404()
                .map(|m| Response::json(200, &m.history())),
            // The monitor and the reboot are checked before the body, as they always were.
            Op::AgingHold => self
                .aging_or_404()
                .and_then(|_| self.refuse_while_rebooting())
                .and_then(|()| parse_hold(&req.body))
                .and_then(|r| self.hold(&r))
                .map(|r| Response::json(200, &r)),
            Op::SnapshotVm => parse(&req.body, "snapshot request")
                .and_then(|r| self.snapshot(name, &r))
                .map(|r| Response::json(200, &r)),
            Op::MigrateVm => parse(&req.body, "migrate request")
                .and_then(|r| self.migrate(name, &r))
                .map(|r| Response::json(200, &r)),
            Op::ResolveMigration => self
                .resolve_migration(name)
                .map(|r| Response::json(200, &r)),
            Op::RestoreVm => parse(&req.body, "restore request")
                .and_then(|r| self.restore(&r))
                .map(|r| Response::json(201, &r)),
            Op::Reboot => Self::parse_reboot_request(&req.body)
                .and_then(|r| self.reboot(&r))
                .map(|r| {
                    let mut resp = Response::json(200, &r);
                    resp.then_exit = true;
                    resp
                }),
            Op::Metrics => Ok(Response::text(
                200,
                CONTENT_TYPE_METRICS,
                crate::metrics::render(self),
            )),
        };
        result.unwrap_or_else(|e| {
            // The request's span carries the method and path.
            if e.status >= 500 {
                tracing::error!(status = e.status, error = %e.message, "request failed");
            } else {
                tracing::info!(status = e.status, error = %e.message, "request refused");
            }
            e.response()
        })
    }

    /// Tests only (`PUT /v1/debug/panic`, not part of the API): make one kind of thread
    /// panic, as a bug there would. Body: `{"in": "api" | "main" | "console" | "vcpu",
    /// "vm": NAME}` (`vm` for `vcpu` only).
    #[cfg(feature = "fault-injection")]
    fn inject_panic(&self, body: &[u8]) -> Result<Response, ApiError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Inject {
            #[serde(rename = "in")]
            thread: String,
            vm: Option<String>,
        }
        let req: Inject = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(400, format!("invalid panic request: {e}")))?;
        match req.thread.as_str() {
            "api" => panic!("fault injected: a panic in an API thread"),
            "main" => crate::control::INJECT_MAIN_PANIC.store(true, Ordering::Release),
            "console" => warmvm_vmm::panic::inject_console_panic(),
            "vcpu" => self
                .find(req.vm.as_deref().unwrap_or_default())?
                .inject_vcpu_panic(),
            other => return Err(ApiError::new(400, format!("no thread kind {other:?}"))),
        }
        Ok(Response::json(
            202,
            &serde_json::json!({ "injected": req.thread }),
        ))
    }

    /// Tests only (`PUT /v1/debug/aging`, not part of the API): start injected aging.
    #[cfg(feature = "fault-injection")]
    fn inject_aging(&self, body: &[u8]) -> Result<Response, ApiError> {
        let inj: crate::aging::inject::Injection = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(400, format!("invalid aging injection: {e}")))?;
        inj.check().map_err(|e| ApiError::new(400, e))?;
        if inj.fill_to_bounds {
            self.aging()
                .ok_or_else(|| ApiError::new(409, "this daemon has no aging monitor"))?
                .fill_to_bounds();
        }
        crate::aging::inject::start(inj)
            .map_err(|e| ApiError::new(500, format!("cannot start injected aging: {e}")))?;
        tracing::warn!(?inj, "injected aging started");
        Ok(Response::json(
            202,
            &serde_json::json!({ "injected": true }),
        ))
    }
}
