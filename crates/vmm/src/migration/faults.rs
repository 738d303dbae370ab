//! Named points of a live migration where a test build kills its own process or cuts its
//! stream, so that the failure paths around the commit point can be exercised between two
//! real daemons.
//!
//! Only a build with the `fault-injection` feature acts on them (the integration tests
//! are built that way); in a release build [`hit`] compiles to nothing. The faults are
//! named by `WARMVM_MIGRATION_FAULT=<point>:<action>` (several separated by `,`), where
//! point is one of [`Point`]'s names and action is `kill` (SIGKILL this process), `stop`
//! (SIGSTOP this process, every thread and the guest's vCPUs with it, until someone sends
//! it SIGCONT) or `cut` (the stream fails there as if the link had gone down; only the
//! source's `committed` point acts on it).

/// The variable that names the faults.
pub const VAR: &str = "WARMVM_MIGRATION_FAULT";

/// The points, in the order a migration reaches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// Source: the destination acknowledged the first pre-copy round; the guest runs here.
    SourcePrecopy,
    /// Destination: the first pre-copy round is acknowledged; the guest runs at the source.
    DestPrecopy,
    /// Destination: the state arrived, nothing is restored and `Ready` is not sent.
    DestState,
    /// Destination: `Ready` was sent; waiting for `Commit`.
    DestReadySent,
    /// Destination: `Commit` was read; the VM has not run here yet, `Running` is not sent.
    DestCommitted,
    /// Source: `Commit` was sent; `Running` not yet read.
    SourceCommitted,
}

impl Point {
    pub const ALL: [Point; 6] = [
        Point::SourcePrecopy,
        Point::DestPrecopy,
        Point::DestState,
        Point::DestReadySent,
        Point::DestCommitted,
        Point::SourceCommitted,
    ];

    /// As `WARMVM_MIGRATION_FAULT` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Point::SourcePrecopy => "source-precopy",
            Point::DestPrecopy => "dest-precopy",
            Point::DestState => "dest-state",
            Point::DestReadySent => "dest-ready-sent",
            Point::DestCommitted => "dest-committed",
            Point::SourceCommitted => "source-committed",
        }
    }
}

/// What a point does when hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Kill,
    Stop,
    Cut,
}

/// Parse the variable's value: the faults understood, and the entries that were not.
pub fn parse(spec: &str) -> (Vec<(Point, Action)>, Vec<String>) {
    let mut faults = Vec::new();
    let mut bad = Vec::new();
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let parsed = entry.split_once(':').and_then(|(point, action)| {
            let point = Point::ALL.into_iter().find(|p| p.name() == point)?;
            let action = match action {
                "kill" => Action::Kill,
                "stop" => Action::Stop,
                "cut" => Action::Cut,
                _ => return None,
            };
            Some((point, action))
        });
        match parsed {
            Some(f) => faults.push(f),
            None => bad.push(entry.to_string()),
        }
    }
    (faults, bad)
}

/// Act on `point` if the variable names it (test builds only); true if the stream is to
/// be cut there.
#[inline]
pub fn hit(point: Point) -> bool {
    #[cfg(feature = "fault-injection")]
    return imp::hit(point);
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = point;
        false
    }
}

#[cfg(feature = "fault-injection")]
mod imp {
    use std::sync::OnceLock;

    use super::{Action, Point};

    fn faults() -> &'static [(Point, Action)] {
        static FAULTS: OnceLock<Vec<(Point, Action)>> = OnceLock::new();
        FAULTS.get_or_init(|| {
            let Ok(spec) = std::env::var(super::VAR) else {
                return Vec::new();
            };
            let (faults, bad) = super::parse(&spec);
            for entry in bad {
                tracing::error!(%entry, "{}: ignoring an entry", super::VAR);
            }
            faults
        })
    }

    pub(super) fn hit(point: Point) -> bool {
        let mut cut = false;
        for &(p, action) in faults().iter().filter(|(p, _)| *p == point) {
            tracing::warn!(
                point = p.name(),
                ?action,
                pid = std::process::id(),
                "migration fault injected"
            );
            match action {
                // SAFETY: raise has no memory effects; SIGKILL ends this process here.
                Action::Kill => unsafe {
                    libc::raise(libc::SIGKILL);
                },
                // SAFETY: as above; SIGSTOP stops every thread of this process until a
                // SIGCONT, after which this call returns.
                Action::Stop => unsafe {
                    libc::raise(libc::SIGSTOP);
                },
                Action::Cut => cut = true,
            }
        }
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_parsed_and_bad_entries_named() {
        let (faults, bad) = parse(
            "source-committed:cut, dest-state:kill,,dest-x:kill,dest-state:stop,dest-state:hang",
        );
        assert_eq!(
            faults,
            vec![
                (Point::SourceCommitted, Action::Cut),
                (Point::DestState, Action::Kill),
                (Point::DestState, Action::Stop)
            ]
        );
        assert_eq!(bad, vec!["dest-x:kill", "dest-state:hang"]);
        for p in Point::ALL {
            assert_eq!(
                parse(&format!("{}:stop", p.name())).0,
                vec![(p, Action::Stop)]
            );
        }
    }
}
