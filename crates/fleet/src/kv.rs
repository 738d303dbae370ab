//! Small helpers over etcd's KV calls that every module of the fleet uses.

use std::time::{SystemTime, UNIX_EPOCH};

use etcd_client::{Client, GetOptions, KeyValue};
use serde::de::DeserializeOwned;

use crate::records::decode;
use crate::FleetError;

/// Now, Unix milliseconds (this machine's clock; records say whose clock they carry).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The key-value at `key`, if there is one.
pub async fn get(client: &mut Client, key: &str) -> Result<Option<KeyValue>, FleetError> {
    let mut r = client
        .get(key, None)
        .await
        .map_err(FleetError::etcd(format!("get {key}")))?;
    Ok(r.take_kvs().into_iter().next())
}

/// Every key-value under `prefix`, in key order.
pub async fn get_prefix(client: &mut Client, prefix: &str) -> Result<Vec<KeyValue>, FleetError> {
    let mut r = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(FleetError::etcd(format!("get {prefix}*")))?;
    Ok(r.take_kvs())
}

/// The record of `kind` at `key`, if there is one.
pub async fn get_record<T: DeserializeOwned>(
    client: &mut Client,
    key: &str,
    kind: &'static str,
) -> Result<Option<(T, KeyValue)>, FleetError> {
    match get(client, key).await? {
        Some(kv) => Ok(Some((decode(key, kind, kv.value())?, kv))),
        None => Ok(None),
    }
}

/// A key as text (the fleet's keys are all UTF-8; anything else is shown escaped).
pub fn key_text(kv: &KeyValue) -> String {
    String::from_utf8_lossy(kv.key()).into_owned()
}

/// etcd's answer to a call that timed out (the client's per-call deadline), which a
/// blocking call such as a campaign simply repeats.
pub fn is_deadline(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            )
        }
        _ => false,
    }
}
