//! The fleet's halt: set by transaction when a gate fails (or by an operator), watched by
//! every host, which then starts no step; cleared by `warmvm fleet resume`.

use etcd_client::{
    Client, Compare, CompareOp, EventType, KeyValue, Txn, TxnOp, WatchOptions, WatchStream,
};
use serde::{Deserialize, Serialize};

use crate::events::{self, Event, EventKind};
use crate::kv::{self, now_unix_ms};
use crate::records::{decode, encode, FORMAT};
use crate::{keys, FleetError};

/// Why the fleet is halted (`keys::halt`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltRecord {
    pub format: u32,
    /// Who set it: a host's name, `coordinator:HOST`, or an operator's user@machine.
    pub by: String,
    pub plan: Option<String>,
    pub host: Option<String>,
    pub reason: String,
    pub at_unix_ms: u64,
}

impl HaltRecord {
    pub fn new(by: &str, reason: impl Into<String>) -> HaltRecord {
        HaltRecord {
            format: FORMAT,
            by: by.into(),
            plan: None,
            host: None,
            reason: reason.into(),
            at_unix_ms: now_unix_ms(),
        }
    }
}

/// A halt key's value in one line, for refusals (what it says, or that it is unreadable).
pub fn describe(kv: &KeyValue) -> String {
    match decode::<HaltRecord>(&keys::halt(), "halt", kv.value()) {
        Ok(h) => format!("by {}: {}", h.by, h.reason),
        Err(e) => e.to_string(),
    }
}

/// The operations that set the halt, for a transaction of the caller's (a coordinator
/// adds its fencing compare); they land only where no halt is set yet.
pub fn set_ops(record: &HaltRecord) -> (Compare, TxnOp) {
    (
        Compare::create_revision(keys::halt(), CompareOp::Equal, 0),
        TxnOp::put(keys::halt(), encode(record), None),
    )
}

/// Set the halt unless one is set already (the first reason stays). True when this call
/// set it. Records an event when it did.
pub async fn set(client: &mut Client, record: &HaltRecord) -> Result<bool, FleetError> {
    let (compare, put) = set_ops(record);
    let r = client
        .txn(Txn::new().when([compare]).and_then([put]))
        .await
        .map_err(FleetError::etcd("set the halt"))?;
    if r.succeeded() {
        let mut e = Event::new(EventKind::Halted, record.at_unix_ms)
            .detail(format!("by {}: {}", record.by, record.reason));
        e.plan = record.plan.clone();
        e.host = record.host.clone();
        events::append(client, &[], e).await?;
    }
    Ok(r.succeeded())
}

/// The halt, if one is set.
pub async fn get(client: &mut Client) -> Result<Option<HaltRecord>, FleetError> {
    Ok(kv::get_record(client, &keys::halt(), "halt")
        .await?
        .map(|(h, _)| h))
}

/// Clear the halt (resume): the halt deleted only as it was read, so a halt set again
/// meanwhile is not lost unseen. Returns the halt cleared, or None when none was set.
pub async fn clear(client: &mut Client, by: &str) -> Result<Option<HaltRecord>, FleetError> {
    let Some((halt, kv)) = kv::get_record::<HaltRecord>(client, &keys::halt(), "halt").await?
    else {
        return Ok(None);
    };
    let r = client
        .txn(
            Txn::new()
                .when([Compare::mod_revision(
                    keys::halt(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::delete(keys::halt(), None)]),
        )
        .await
        .map_err(FleetError::etcd("clear the halt"))?;
    if !r.succeeded() {
        return Err(FleetError::Refused(
            "the halt changed while resuming: look at it again, then resume".into(),
        ));
    }
    let mut e = Event::new(EventKind::Resumed, now_unix_ms())
        .detail(format!("by {by}, after: {}", halt.reason));
    e.plan = halt.plan.clone();
    e.host = halt.host.clone();
    events::append(client, &[], e).await?;
    Ok(Some(halt))
}

/// A change of the halt seen by [`HaltWatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HaltChange {
    Set(HaltRecord),
    Cleared,
}

/// Watches the halt key from a revision on.
pub struct HaltWatch {
    stream: WatchStream,
    pending: std::collections::VecDeque<HaltChange>,
}

impl HaltWatch {
    /// The halt as it is now, and a watch of every change after it (no change is missed
    /// between the two: the watch starts at the next revision).
    pub async fn start(client: &mut Client) -> Result<(Option<HaltRecord>, HaltWatch), FleetError> {
        let r = client
            .get(keys::halt(), None)
            .await
            .map_err(FleetError::etcd("get the halt"))?;
        let revision = r.header().map(|h| h.revision()).unwrap_or(0);
        let now = match r.kvs().first() {
            Some(kv) => Some(decode(&keys::halt(), "halt", kv.value())?),
            None => None,
        };
        let stream = client
            .watch(
                keys::halt(),
                Some(WatchOptions::new().with_start_revision(revision + 1)),
            )
            .await
            .map_err(FleetError::etcd("watch the halt"))?;
        Ok((
            now,
            HaltWatch {
                stream,
                pending: Default::default(),
            },
        ))
    }

    /// The next change; None when the watch ended (etcd went away: the caller starts
    /// again, and meanwhile must assume halted).
    pub async fn next(&mut self) -> Result<Option<HaltChange>, FleetError> {
        loop {
            if let Some(c) = self.pending.pop_front() {
                return Ok(Some(c));
            }
            let Some(r) = self
                .stream
                .message()
                .await
                .map_err(FleetError::etcd("watch the halt"))?
            else {
                return Ok(None);
            };
            if r.canceled() {
                return Ok(None);
            }
            for e in r.events() {
                match (e.event_type(), e.kv()) {
                    (EventType::Put, Some(kv)) => self.pending.push_back(HaltChange::Set(decode(
                        &keys::halt(),
                        "halt",
                        kv.value(),
                    )?)),
                    (EventType::Delete, _) => self.pending.push_back(HaltChange::Cleared),
                    _ => {}
                }
            }
        }
    }
}
