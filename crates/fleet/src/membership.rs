//! A host's membership: its record at `keys::host(NAME)`, under a lease its daemon keeps
//! alive, so that the record goes when the daemon does (at once when it stops and revokes
//! the lease, within the lease's TTL when it dies).
//!
//! A name belongs to one daemon at a time: the record is written only if the key is absent
//! or already under this daemon's lease, both checked in the same transaction as the
//! write. A warm reboot's new daemon adopts the old one's lease (handed over with its
//! settings), so the record stays through the reboot and only its contents change.

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::records::{encode, HostRecord};
use crate::{keys, FleetError};

/// The membership lease's TTL: how long a host's record outlives its daemon's death.
pub const LEASE_TTL_SECS: i64 = 5;

/// What writing the record found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// The record is ours and holds what we wrote.
    Ours,
    /// Another live daemon holds the name (its lease, as etcd names it, and the pid its
    /// record says, if it decodes): nothing was written.
    HeldByOther { lease: i64, pid: Option<u32> },
}

/// A lease for the membership record, granted now.
pub async fn grant(client: &mut Client) -> Result<i64, FleetError> {
    let r = client
        .lease_grant(LEASE_TTL_SECS, None)
        .await
        .map_err(FleetError::etcd("grant the membership lease"))?;
    Ok(r.id())
}

/// The lease's remaining TTL in seconds; 0 or less when it has expired (or never was).
pub async fn remaining(client: &mut Client, lease: i64) -> Result<i64, FleetError> {
    let r = client
        .lease_time_to_live(lease, None)
        .await
        .map_err(FleetError::etcd(format!("look the lease {lease:x} up")))?;
    Ok(r.ttl())
}

/// Revoke the lease: every key under it (the record) is deleted at once.
pub async fn revoke(client: &mut Client, lease: i64) -> Result<(), FleetError> {
    client
        .lease_revoke(lease)
        .await
        .map_err(FleetError::etcd(format!("revoke the lease {lease:x}")))?;
    Ok(())
}

/// Write `record` at its host's key under `lease`, if the key is absent or already under
/// `lease`; otherwise write nothing and say who holds it.
pub async fn write(
    client: &mut Client,
    lease: i64,
    record: &HostRecord,
) -> Result<Written, FleetError> {
    let key = keys::host(&record.name);
    let value = encode(record);
    let put = || {
        TxnOp::put(
            key.clone(),
            value.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )
    };
    let what = || format!("write {key}");
    // The usual case first: the record is ours already.
    let ours = Txn::new()
        .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
        .and_then([put()])
        .or_else([TxnOp::get(key.clone(), None)]);
    let r = client.txn(ours).await.map_err(FleetError::etcd(what()))?;
    if r.succeeded() {
        return Ok(Written::Ours);
    }
    if let Some(held) = holder(&r.op_responses()) {
        return Ok(held);
    }
    // Absent (or gone since): claim it, unless someone else claimed it meanwhile.
    let claim = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([put()])
        .or_else([TxnOp::get(key.clone(), None)]);
    let r = client.txn(claim).await.map_err(FleetError::etcd(what()))?;
    if r.succeeded() {
        return Ok(Written::Ours);
    }
    Ok(holder(&r.op_responses()).unwrap_or(Written::HeldByOther {
        lease: 0,
        pid: None,
    }))
}

/// From a failed transaction's get: who holds the key (None when it is absent).
fn holder(responses: &[TxnOpResponse]) -> Option<Written> {
    responses.iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| Written::HeldByOther {
            lease: kv.lease(),
            pid: serde_json::from_slice::<serde_json::Value>(kv.value())
                .ok()
                .and_then(|v| v.get("pid")?.as_u64())
                .and_then(|p| u32::try_from(p).ok()),
        }),
        _ => None,
    })
}
