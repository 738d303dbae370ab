//! What `warmvm fleet status` shows: every host's record, and the fleet-wide keys (the
//! halt, the slots) as they stand, read in one etcd revision; then the current plan with
//! its progress and steps, and, when asked, the last events of the history. Blocking: the CLI has no
//! runtime of its own, so this makes a current-thread one for the call.

use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::plan::{PlanProgress, PlanSpec, StepRecord};
use crate::records::{decode, HostRecord};
use crate::{keys, EtcdOptions, FleetError};

/// The fleet as read at one etcd revision.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FleetView {
    /// The etcd revision read.
    pub revision: i64,
    /// The hosts' records, by name.
    pub hosts: Vec<HostRecord>,
    /// Keys under the hosts' prefix that are not a record this build reads (a newer
    /// format, or written by something else): the key and why.
    pub unreadable: Vec<Unreadable>,
    /// `/warmvm/halt`'s value as stored, if set.
    pub halt: Option<String>,
    /// `/warmvm/slots/*`, key and value as stored.
    pub slots: Vec<RawKey>,
    /// The plan that runs now (or ran last), where it stands and its steps. Added with
    /// the plan's view in `fleet status`.
    #[serde(default)]
    pub plan: Option<PlanView>,
    /// The last events of the history, oldest first (only when asked for). Added with
    /// `fleet status --events`.
    #[serde(default)]
    pub events: Vec<Event>,
}

/// A plan as `fleet status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanView {
    pub spec: PlanSpec,
    pub progress: PlanProgress,
    /// Its steps, by host name.
    pub steps: Vec<StepRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Unreadable {
    pub key: String,
    pub error: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RawKey {
    pub key: String,
    pub value: String,
}

/// Read the fleet with the last `events` events (blocking; at most the client's timeouts).
pub fn read(options: &EtcdOptions, events: u32) -> Result<FleetView, FleetError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(FleetError::Runtime)?;
    runtime.block_on(async {
        let mut client = options.connect().await?;
        let mut view = read_async(&mut client).await?;
        let current = crate::plan::current_plan(&mut client).await?;
        let shown = match current {
            Some(id) => Some(id),
            None => last_plan_id(&mut client).await?,
        };
        if let Some(id) = shown {
            view.plan =
                crate::plan::read_plan(&mut client, &id)
                    .await?
                    .map(|(spec, progress, steps)| PlanView {
                        spec,
                        progress,
                        steps: steps.into_values().collect(),
                    });
        }
        view.events = crate::events::last(&mut client, events).await?;
        Ok(view)
    })
}

/// The newest plan's id, running or not: ids are the creation time in base 36, so the
/// last key under the plans' prefix is the newest plan's.
async fn last_plan_id(client: &mut etcd_client::Client) -> Result<Option<String>, FleetError> {
    use etcd_client::{GetOptions, SortOrder, SortTarget};
    let prefix = format!("{}plans/", keys::ROOT);
    let r = client
        .get(
            prefix.clone(),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_sort(SortTarget::Key, SortOrder::Descend)
                    .with_limit(1),
            ),
        )
        .await
        .map_err(FleetError::etcd("read the plans"))?;
    Ok(r.kvs().first().and_then(|kv| {
        let key = String::from_utf8_lossy(kv.key());
        key.strip_prefix(&prefix)
            .and_then(|rest| rest.split('/').next())
            .map(str::to_string)
    }))
}

/// Read the hosts and the fleet-wide keys at one revision.
pub async fn read_async(client: &mut etcd_client::Client) -> Result<FleetView, FleetError> {
    use etcd_client::{GetOptions, Txn, TxnOp, TxnOpResponse};
    let prefix = |p: String| {
        TxnOp::get(
            p.clone(),
            Some(GetOptions::new().with_range(keys::prefix_end(&p))),
        )
    };
    // One transaction: one revision for all three.
    let txn = Txn::new().and_then([
        prefix(keys::hosts_prefix()),
        TxnOp::get(keys::halt(), None),
        prefix(keys::slots_prefix()),
    ]);
    let r = client
        .txn(txn)
        .await
        .map_err(FleetError::etcd("read the fleet"))?;
    let revision = r.header().map_or(0, |h| h.revision());
    let mut gets = r.op_responses().into_iter().filter_map(|o| match o {
        TxnOpResponse::Get(g) => Some(g),
        _ => None,
    });
    let (Some(hosts), Some(halt), Some(slots)) = (gets.next(), gets.next(), gets.next()) else {
        return Ok(FleetView {
            revision,
            hosts: Vec::new(),
            unreadable: Vec::new(),
            halt: None,
            slots: Vec::new(),
            plan: None,
            events: Vec::new(),
        });
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut view = FleetView {
        revision,
        hosts: Vec::new(),
        unreadable: Vec::new(),
        halt: halt.kvs().first().map(|kv| text(kv.value())),
        slots: slots
            .kvs()
            .iter()
            .map(|kv| RawKey {
                key: text(kv.key()),
                value: text(kv.value()),
            })
            .collect(),
        plan: None,
        events: Vec::new(),
    };
    for kv in hosts.kvs() {
        let key = text(kv.key());
        match decode::<HostRecord>(&key, "host record", kv.value()) {
            Ok(h) => view.hosts.push(h),
            Err(e) => view.unreadable.push(Unreadable {
                key,
                error: e.to_string(),
            }),
        }
    }
    Ok(view)
}
