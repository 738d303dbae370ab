//! The API's routes: one table, used by the router and checked against docs/openapi.json.

/// One route: a method and a path template whose `{name}` segment captures a VM name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub op: Op,
}

/// What a route does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Status,
    ListVms,
    CreateVm,
    ShowVm,
    PauseVm,
    ResumeVm,
    StopVm,
    DeleteVm,
    SnapshotVm,
    MigrateVm,
    ResolveMigration,
    RestoreVm,
    Reboot,
    Aging,
    AgingHistory,
    AgingHold,
    Metrics,
}

/// Every route the server has.
pub const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/v1/status",
        op: Op::Status,
    },
    Route {
        method: "GET",
        path: "/v1/vms",
        op: Op::ListVms,
    },
    Route {
        method: "POST",
        path: "/v1/vms",
        op: Op::CreateVm,
    },
    Route {
        method: "GET",
        path: "/v1/vms/{name}",
        op: Op::ShowVm,
    },
    Route {
        method: "DELETE",
        path: "/v1/vms/{name}",
        op: Op::DeleteVm,
    },
    Route {
        method: "PUT",
        path: "/v1/vms/{name}/pause",
        op: Op::PauseVm,
    },
    Route {
        method: "PUT",
        path: "/v1/vms/{name}/resume",
        op: Op::ResumeVm,
    },
    Route {
        method: "PUT",
        path: "/v1/vms/{name}/stop",
        op: Op::StopVm,
    },
    Route {
        method: "PUT",
        path: "/v1/vms/{name}/snapshot",
        op: Op::SnapshotVm,
    },
    Route {
        method: "POST",
        path: "/v1/vms/{name}/migrate",
        op: Op::MigrateVm,
    },
    Route {
        method: "POST",
        path: "/v1/vms/{name}/migrate/resolve",
        op: Op::ResolveMigration,
    },
    Route {
        method: "POST",
        path: "/v1/restore",
        op: Op::RestoreVm,
    },
    Route {
        method: "PUT",
        path: "/v1/reboot",
        op: Op::Reboot,
    },
    Route {
        method: "GET",
        path: "/v1/aging",
        op: Op::Aging,
    },
    Route {
        method: "GET",
        path: "/v1/aging/history",
        op: Op::AgingHistory,
    },
    Route {
        method: "PUT",
        path: "/v1/aging/hold",
        op: Op::AgingHold,
    },
    Route {
        method: "GET",
        path: "/metrics",
        op: Op::Metrics,
    },
];

/// The outcome of routing a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed<'a> {
    /// A route matched; `name` is the captured VM name, if the template has one.
    Found {
        op: Op,
        name: Option<&'a str>,
    },
    /// The path exists but not with this method: the methods it has, for `Allow`.
    MethodNotAllowed(String),
    NotFound,
}

fn match_template<'a>(template: &str, path: &'a str) -> Option<Option<&'a str>> {
    let mut t = template.split('/');
    let mut p = path.split('/');
    let mut name = None;
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(name),
            (Some("{name}"), Some(seg)) if !seg.is_empty() => name = Some(seg),
            (Some(a), Some(b)) if a == b => {}
            _ => return None,
        }
    }
}

/// Route `method` `path` (without query) through `routes`.
pub fn route<'a>(routes: &[Route], method: &str, path: &'a str) -> Routed<'a> {
    let mut allowed: Vec<&str> = Vec::new();
    for r in routes {
        if let Some(name) = match_template(r.path, path) {
            if r.method == method {
                return Routed::Found { op: r.op, name };
            }
            allowed.push(r.method);
        }
    }
    if allowed.is_empty() {
        Routed::NotFound
    } else {
        Routed::MethodNotAllowed(allowed.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_and_capture() {
        assert_eq!(
            route(ROUTES, "PUT", "/v1/vms/web-1/pause"),
            Routed::Found {
                op: Op::PauseVm,
                name: Some("web-1")
            }
        );
        assert_eq!(
            route(ROUTES, "GET", "/v1/vms"),
            Routed::Found {
                op: Op::ListVms,
                name: None
            }
        );
        assert_eq!(
            route(ROUTES, "PATCH", "/v1/vms/a"),
            Routed::MethodNotAllowed("GET, DELETE".into())
        );
        assert_eq!(route(ROUTES, "GET", "/v1/vms/"), Routed::NotFound);
        assert_eq!(route(ROUTES, "GET", "/v1/vms/a/b"), Routed::NotFound);
        assert_eq!(route(ROUTES, "GET", "/v2/status"), Routed::NotFound);
    }

    #[test]
    fn every_path_and_method_is_unique() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(!(a.method == b.method && a.path == b.path), "{a:?}");
            }
        }
    }
}
