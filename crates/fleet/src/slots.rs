//! The disruption budget's slots: a host starts a step only while it holds one of the
//! plan's `max_unavailable` slot keys, taken by transaction under the host's lease and
//! held until its gate passed (so the slot spans the reboot; a host that dies releases
//! it when its lease runs out).

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::kv;
use crate::{keys, FleetError};

/// Take a free slot among `0..count` for `host` under `lease`. Some(index) when this host
/// holds one (already, or now), None when all are held by others.
pub async fn take(
    client: &mut Client,
    count: u32,
    host: &str,
    lease: i64,
) -> Result<Option<u32>, FleetError> {
    keys::check_name("host", host).map_err(FleetError::Invalid)?;
    if count == 0 {
        return Err(FleetError::Invalid("there must be at least 1 slot".into()));
    }
    // A host holds one slot at most: one it holds already is its own.
    if let Some((i, _)) = holders(client).await?.into_iter().find(|(_, h)| h == host) {
        return Ok(Some(i));
    }
    for i in 0..count {
        let key = keys::slot(i);
        let r = client
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key.clone(),
                        host,
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else([TxnOp::get(key.clone(), None)]),
            )
            .await
            .map_err(FleetError::etcd(format!("take {key}")))?;
        if r.succeeded() {
            return Ok(Some(i));
        }
        let holder = r.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        if holder.as_deref() == Some(host.as_bytes()) {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Release slot `index` if `host` holds it (a slot another took is left alone). True when
/// it was released.
pub async fn release(client: &mut Client, index: u32, host: &str) -> Result<bool, FleetError> {
    let key = keys::slot(index);
    let r = client
        .txn(
            Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Equal, host)])
                .and_then([TxnOp::delete(key.clone(), None)]),
        )
        .await
        .map_err(FleetError::etcd(format!("release {key}")))?;
    Ok(r.succeeded())
}

/// Who holds which slot, by index.
pub async fn holders(client: &mut Client) -> Result<Vec<(u32, String)>, FleetError> {
    let prefix = keys::slots_prefix();
    let mut out = Vec::new();
    for kv in kv::get_prefix(client, &prefix).await? {
        let key = kv::key_text(&kv);
        let Some(index) = key
            .strip_prefix(&prefix)
            .and_then(|i| i.parse::<u32>().ok())
        else {
            continue;
        };
        out.push((index, String::from_utf8_lossy(kv.value()).into_owned()));
    }
    out.sort();
    Ok(out)
}
