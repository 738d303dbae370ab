//! The coordinator's round: read the current plan and the fleet, decide with
//! [`roll::next_actions`], and write the decision in one fenced transaction that also
//! compares everything the decision was made on (the progress as read, the halt as read,
//! each new step's absence). A round whose state moved meanwhile writes nothing and the
//! next round decides again; a coordinator that no longer leads writes nothing at all.

use std::collections::BTreeMap;

use etcd_client::{Client, Compare, CompareOp, TxnOp};

use crate::events;
use crate::kv::{self, now_unix_ms};
use crate::lead::Leadership;
use crate::plan::{self, PlanProgress, PlanSpec, StepRecord};
use crate::records::{encode, HostRecord};
use crate::roll::{self, Action, RollState};
use crate::{keys, FleetError};

/// Everything a round decides on, as read.
#[derive(Clone, Debug)]
pub struct View {
    pub spec: PlanSpec,
    pub progress: PlanProgress,
    /// The progress key's mod revision as read (0: not there).
    pub progress_revision: i64,
    pub steps: BTreeMap<String, StepRecord>,
    pub hosts: BTreeMap<String, HostRecord>,
    pub halted: bool,
}

/// The current plan and the fleet around it; None when no plan runs.
pub async fn read_view(client: &mut Client) -> Result<Option<View>, FleetError> {
    let Some(id) = plan::current_plan(client).await? else {
        return Ok(None);
    };
    let Some((spec, _, steps)) = plan::read_plan(client, &id).await? else {
        return Err(FleetError::Refused(format!(
            "the current plan {id} has no spec at {}",
            keys::plan(&id)
        )));
    };
    let (progress, progress_revision) =
        match kv::get_record::<PlanProgress>(client, &keys::plan_progress(&id), "plan progress")
            .await?
        {
            Some((p, kv)) => (p, kv.mod_revision()),
            None => (PlanProgress::new(&id, spec.created_unix_ms), 0),
        };
    let hosts = plan::registered_hosts(client)
        .await?
        .into_iter()
        .map(|(name, (record, _))| (name, record))
        .collect();
    let halted = kv::get(client, &keys::halt()).await?.is_some();
    Ok(Some(View {
        spec,
        progress,
        progress_revision,
        steps,
        hosts,
        halted,
    }))
}

/// One round by the leader `leadership` (`by` names it in what it writes). Returns the
/// actions that landed (empty: nothing to do, or the state moved and the next round
/// decides again). [`FleetError::NotLeader`]: it no longer leads and must stop.
pub async fn round(
    client: &mut Client,
    leadership: &Leadership,
    by: &str,
    stale_after_ms: u64,
) -> Result<Vec<Action>, FleetError> {
    // A deposed leader learns it here even in a round that would write nothing (its
    // writes are fenced anyway).
    if !leadership.still_leads(client).await? {
        return Err(FleetError::NotLeader {
            key: leadership.key_text(),
        });
    }
    let Some(view) = read_view(client).await? else {
        return Ok(Vec::new());
    };
    let state = RollState {
        spec: &view.spec,
        progress: &view.progress,
        steps: &view.steps,
        hosts: &view.hosts,
        halted: view.halted,
        now_unix_ms: now_unix_ms(),
        stale_after_ms,
    };
    let actions = roll::next_actions(&state);
    if actions.is_empty() {
        return Ok(actions);
    }
    let w = roll::writes(&state, &actions, by);
    let id = view.spec.id.as_str();
    let progress_key = keys::plan_progress(id);
    let mut compares = vec![
        if view.progress_revision == 0 {
            Compare::create_revision(progress_key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(
                progress_key.clone(),
                CompareOp::Equal,
                view.progress_revision,
            )
        },
        Compare::create_revision(
            keys::halt(),
            if view.halted {
                CompareOp::NotEqual
            } else {
                CompareOp::Equal
            },
            0,
        ),
        Compare::value(keys::current_plan(), CompareOp::Equal, id),
    ];
    let mut ops = vec![TxnOp::put(progress_key, encode(&w.progress), None)];
    for step in &w.new_steps {
        let key = keys::step(id, &step.host);
        compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
        ops.push(TxnOp::put(key, encode(step), None));
    }
    if let Some(halt) = &w.halt {
        // The halt compare above already says none is set.
        ops.push(TxnOp::put(keys::halt(), encode(halt), None));
    }
    if w.done {
        ops.push(TxnOp::delete(keys::current_plan(), None));
    }
    let r = leadership
        .fenced_txn(client, compares, ops, Vec::new())
        .await?;
    if !r.succeeded() {
        tracing::debug!(
            plan = id,
            "the fleet changed during the round: deciding again"
        );
        return Ok(Vec::new());
    }
    for e in w.events {
        events::append(client, &[leadership.fence()], e).await?;
    }
    Ok(actions)
}

/// How often a leader runs a round.
pub const ROUND_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A host record older than this is stale: its host is not assigned a step. A record is
/// written every second; a warm reboot pauses it for the handover.
pub const STALE_AFTER_MS: u64 = 10_000;

/// A daemon's candidacy and leadership, for as long as the caller lets it run (the agent
/// aborts it when it loses etcd or its lease): campaign under `lease` (or recognise the
/// election key already under it, left by this host's daemon before a warm reboot), then
/// run a round every [`ROUND_EVERY`] until it no longer leads, then campaign again.
pub async fn lead(mut client: Client, name: String, lease: i64) {
    loop {
        let leadership = match crate::lead::own_leadership(&mut client, lease).await {
            Ok(Some(l)) => {
                tracing::info!(
                    key = l.key_text(),
                    "fleet: this host's election key leads (kept across the warm reboot): coordinating"
                );
                l
            }
            Ok(None) => match crate::lead::campaign(&mut client, &name, lease).await {
                Ok(l) => {
                    tracing::info!(key = l.key_text(), "fleet: elected the coordinator");
                    let e = events::Event::new(events::EventKind::LeaderElected, now_unix_ms())
                        .host(&name)
                        .detail(l.key_text());
                    if let Err(e) = events::append(&mut client, &[l.fence()], e).await {
                        tracing::debug!(error = %e, "fleet: cannot record the election");
                    }
                    l
                }
                Err(e) => {
                    tracing::debug!(error = %e, "fleet: campaign failed; trying again");
                    tokio::time::sleep(ROUND_EVERY).await;
                    continue;
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "fleet: cannot read the leader; trying again");
                tokio::time::sleep(ROUND_EVERY).await;
                continue;
            }
        };
        loop {
            tokio::time::sleep(ROUND_EVERY).await;
            match round(&mut client, &leadership, &name, STALE_AFTER_MS).await {
                Ok(actions) if !actions.is_empty() => {
                    tracing::info!(?actions, "fleet: coordinator round")
                }
                Ok(_) => {}
                Err(FleetError::NotLeader { key }) => {
                    tracing::warn!(key, "fleet: no longer the coordinator; campaigning again");
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "fleet: coordinator round failed"),
            }
        }
    }
}
