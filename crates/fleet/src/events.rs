//! The fleet's history: each event its own key, `keys::event(seq)`, never overwritten.
//!
//! The sequence is a counter at `keys::events_sequence`: an append reads it, and its
//! transaction compares the counter's revision as read and the new event key's absence,
//! then writes both. Two appends that read the same counter cannot both land (the loser
//! reads again and takes the next number), so numbers never repeat, have no gaps, and
//! order the events as they landed. (A transaction's own revision would be unique too,
//! but it is known only once the transaction has landed, too late to name its key.)
//! A coordinator's appends carry its fencing compare too ([`append`]'s `extra`).

use etcd_client::{Client, Compare, CompareOp, GetOptions, SortOrder, SortTarget, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::kv;
use crate::records::{decode, encode, FORMAT};
use crate::{keys, FleetError};

/// What happened. Kinds are only ever added; a reader that does not know a newer build's
/// kind reads it as `Other` (its detail still says what it was).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    PlanCreated,
    LeaderElected,
    StepAssigned,
    StepStarted,
    GatePassed,
    GateFailed,
    HostSkipped,
    WaveDone,
    SoakStarted,
    PlanDone,
    Halted,
    Resumed,
    #[serde(other)]
    Other,
}

/// One event (`keys::event`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub format: u32,
    /// Its place in the history, set by [`append`].
    pub seq: u64,
    pub at_unix_ms: u64,
    pub kind: EventKind,
    pub host: Option<String>,
    pub plan: Option<String>,
    /// The step's id (`PLAN/HOST`).
    pub step: Option<String>,
    pub detail: String,
}

impl Event {
    pub fn new(kind: EventKind, at_unix_ms: u64) -> Event {
        Event {
            format: FORMAT,
            seq: 0,
            at_unix_ms,
            kind,
            host: None,
            plan: None,
            step: None,
            detail: String::new(),
        }
    }

    pub fn host(mut self, host: &str) -> Event {
        self.host = Some(host.into());
        self
    }

    pub fn plan(mut self, plan: &str) -> Event {
        self.plan = Some(plan.into());
        self
    }

    pub fn step(mut self, step: &str) -> Event {
        self.step = Some(step.into());
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Event {
        self.detail = detail.into();
        self
    }
}

/// How many times an append retries when others append at the same time.
const APPEND_TRIES: u32 = 64;

/// Append `event` with the next sequence number; `extra` compares must hold too (a
/// coordinator's fencing compare), else nothing is written and
/// [`FleetError::Refused`] says so. Returns the event's sequence number.
pub async fn append(
    client: &mut Client,
    extra: &[Compare],
    mut event: Event,
) -> Result<u64, FleetError> {
    let counter = keys::events_sequence();
    for _ in 0..APPEND_TRIES {
        let (last, counter_compare) = match kv::get(client, &counter).await? {
            Some(kv) => {
                let text = String::from_utf8_lossy(kv.value());
                let last: u64 = text.parse().map_err(|_| {
                    FleetError::Refused(format!("{counter} holds {text:?}, not a number"))
                })?;
                (
                    last,
                    Compare::mod_revision(counter.clone(), CompareOp::Equal, kv.mod_revision()),
                )
            }
            None => (
                0,
                Compare::create_revision(counter.clone(), CompareOp::Equal, 0),
            ),
        };
        event.seq = last + 1;
        let key = keys::event(event.seq);
        let mut compares = vec![
            counter_compare,
            Compare::create_revision(key.clone(), CompareOp::Equal, 0),
        ];
        compares.extend(extra.iter().cloned());
        let txn = Txn::new().when(compares).and_then([
            TxnOp::put(counter.clone(), event.seq.to_string(), None),
            TxnOp::put(key, encode(&event), None),
        ]);
        let r = client
            .txn(txn)
            .await
            .map_err(FleetError::etcd("append an event"))?;
        if r.succeeded() {
            return Ok(event.seq);
        }
        if !extra.is_empty() && !extra_holds(client, extra).await? {
            return Err(FleetError::Refused(
                "the event's conditions no longer hold (not the coordinator)".into(),
            ));
        }
    }
    Err(FleetError::Refused(format!(
        "could not append an event in {APPEND_TRIES} tries (too many writers at once)"
    )))
}

/// Whether `extra` alone holds now (to tell a lost race for the counter from a failed
/// condition).
async fn extra_holds(client: &mut Client, extra: &[Compare]) -> Result<bool, FleetError> {
    let r = client
        .txn(Txn::new().when(extra.to_vec()))
        .await
        .map_err(FleetError::etcd("check an event's conditions"))?;
    Ok(r.succeeded())
}

/// The last `count` events, oldest first.
pub async fn last(client: &mut Client, count: u32) -> Result<Vec<Event>, FleetError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let prefix = keys::events_prefix();
    let mut r = client
        .get(
            prefix.clone(),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Key, SortOrder::Descend)
                    .with_limit(i64::from(count)),
            ),
        )
        .await
        .map_err(FleetError::etcd("read the events"))?;
    let mut events = Vec::new();
    for kv in r.take_kvs().into_iter().rev() {
        events.push(decode(&kv::key_text(&kv), "event", kv.value())?);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_round_trips_and_a_newer_kind_reads_as_other() {
        let e = Event::new(EventKind::GateFailed, 9)
            .host("h1")
            .plan("plan-1")
            .step("plan-1/h1")
            .detail("blackout 90 ms over 50 ms");
        let back: Event = decode("k", "event", &encode(&e)).unwrap();
        assert_eq!(back, e);
        let mut v = serde_json::to_value(&e).unwrap();
        v["kind"] = serde_json::json!("drain-started");
        let back: Event = decode("k", "event", v.to_string().as_bytes()).unwrap();
        assert_eq!(back.kind, EventKind::Other);
        assert_eq!(back.detail, e.detail);
    }

    #[test]
    fn event_keys_sort_as_their_numbers() {
        assert!(keys::event(9) < keys::event(10));
        assert!(keys::event(99_999) < keys::event(100_000));
        assert!(keys::event(1).starts_with(&keys::events_prefix()));
    }
}
