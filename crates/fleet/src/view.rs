//! What `warmvm fleet status` shows: every host's record, and the fleet-wide keys (the
//! halt, the slots) as they stand, read in one etcd revision. Blocking: the CLI has no
//! runtime of its own, so this makes a current-thread one for the call.

use serde::{Deserialize, Serialize};

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

/// Read the fleet (blocking; at most the client's timeouts).
pub fn read(options: &EtcdOptions) -> Result<FleetView, FleetError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(FleetError::Runtime)?;
    runtime.block_on(read_async(options))
}

/// Read the fleet.
pub async fn read_async(options: &EtcdOptions) -> Result<FleetView, FleetError> {
    use etcd_client::{GetOptions, Txn, TxnOp, TxnOpResponse};
    let mut client = options.connect().await?;
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
