//! The coordinator's leadership: etcd's election API, and fenced writes.
//!
//! Leading is holding the oldest candidate key under [`keys::election`], under a lease the
//! candidate keeps alive. A leader can be paused (SIGSTOP, a long GC, a cut link) past its
//! lease and go on believing it leads while another does; so every coordinator write goes
//! through [`Leadership::fenced_txn`], which compares the leader key's create revision in
//! the same transaction. A leader whose key is gone writes nothing that lands.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp, TxnResponse};
use tokio::sync::watch;

use crate::kv::is_deadline;
use crate::{keys, FleetError};

/// The leader's key and its fencing token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leadership {
    /// The candidate key etcd made for this leader (`keys::election()/<lease hex>`).
    pub key: Vec<u8>,
    /// The key's create revision: the fencing token every write compares.
    pub create_revision: i64,
    pub lease: i64,
}

impl Leadership {
    pub fn key_text(&self) -> String {
        String::from_utf8_lossy(&self.key).into_owned()
    }

    /// The compare that makes a write this leader's only.
    pub fn fence(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.create_revision)
    }

    /// Run `ops` if this is still the leader and `compares` hold; `otherwise` runs when
    /// `compares` fail while leading. A write by a leader that is no longer one is
    /// [`FleetError::NotLeader`] and lands nowhere.
    pub async fn fenced_txn(
        &self,
        client: &mut Client,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
        otherwise: Vec<TxnOp>,
    ) -> Result<TxnResponse, FleetError> {
        // The fence is an outer transaction around the caller's: its failure tells "not the
        // leader" apart from the caller's own compares failing.
        let inner = Txn::new().when(compares).and_then(ops).or_else(otherwise);
        let txn = Txn::new()
            .when([self.fence()])
            .and_then([TxnOp::txn(inner)]);
        let r = client
            .txn(txn)
            .await
            .map_err(FleetError::etcd("coordinator write"))?;
        if !r.succeeded() {
            return Err(FleetError::NotLeader {
                key: self.key_text(),
            });
        }
        for op in r.op_responses() {
            if let etcd_client::TxnOpResponse::Txn(inner) = op {
                return Ok(inner);
            }
        }
        Err(FleetError::Refused(
            "etcd answered a fenced write without its inner transaction".into(),
        ))
    }

    /// Whether this still leads, as etcd sees it now.
    pub async fn still_leads(&self, client: &mut Client) -> Result<bool, FleetError> {
        let r = client
            .txn(Txn::new().when([self.fence()]))
            .await
            .map_err(FleetError::etcd("check the leadership"))?;
        Ok(r.succeeded())
    }

    /// Give the leadership up (the next candidate leads at once).
    pub async fn resign(&self, client: &mut Client) -> Result<(), FleetError> {
        let leader = etcd_client::LeaderKey::new()
            .with_name(keys::election())
            .with_key(self.key.clone())
            .with_rev(self.create_revision)
            .with_lease(self.lease);
        client
            .resign(Some(etcd_client::ResignOptions::new().with_leader(leader)))
            .await
            .map_err(FleetError::etcd("resign"))?;
        Ok(())
    }
}

/// Campaign with `lease` (kept alive by the caller, e.g. a [`Session`]) until this
/// candidate leads; `name` is what [`leader`] shows of it.
///
/// The client's per-call deadline is shorter than a wait to lead, so the call is
/// repeated. etcd resigns a campaign whose call ended early, deleting the candidate key;
/// a repeated call may meanwhile have found that key still there and taken it as its own,
/// and would then "lead" with a key that is gone. So a campaign that returns is checked:
/// its key must still be there with the revision it returned, or it campaigns again.
/// (Were the check itself to race with such a late delete, the fence would still refuse
/// every write of that leadership: safety never rests on this check.)
pub async fn campaign(
    client: &mut Client,
    name: &str,
    lease: i64,
) -> Result<Leadership, FleetError> {
    loop {
        match client.campaign(keys::election(), name, lease).await {
            Ok(r) => {
                let Some(leader) = r.leader() else {
                    return Err(FleetError::Refused(
                        "etcd answered a campaign without a leader key".into(),
                    ));
                };
                let leadership = Leadership {
                    key: leader.key().to_vec(),
                    create_revision: leader.rev(),
                    lease: leader.lease(),
                };
                if leadership.still_leads(client).await? {
                    return Ok(leadership);
                }
                tracing::debug!(
                    key = leadership.key_text(),
                    "the campaign's key was deleted by an earlier call's resign: campaigning again"
                );
            }
            Err(e) if is_deadline(&e) => continue,
            Err(e) => return Err(FleetError::etcd("campaign")(e)),
        }
    }
}

/// The current leader's name, if any leads.
pub async fn leader(client: &mut Client) -> Result<Option<String>, FleetError> {
    match client.leader(keys::election()).await {
        Ok(r) => Ok(r
            .kv()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
        // etcd answers "election: no leader" as an error.
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => Ok(None),
        Err(e) => Err(FleetError::etcd("leader")(e)),
    }
}

/// The leadership held under `lease`, if the current leader's key is under it: a warm
/// reboot's new daemon adopts its host's lease, and with it the election key the old
/// daemon won; it leads with that key instead of campaigning behind itself.
pub async fn own_leadership(
    client: &mut Client,
    lease: i64,
) -> Result<Option<Leadership>, FleetError> {
    match client.leader(keys::election()).await {
        Ok(r) => Ok(r
            .kv()
            .filter(|kv| kv.lease() == lease)
            .map(|kv| Leadership {
                key: kv.key().to_vec(),
                create_revision: kv.create_revision(),
                lease,
            })),
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => Ok(None),
        Err(e) => Err(FleetError::etcd("leader")(e)),
    }
}

/// A lease kept alive in the background: the life of a host's membership, slot and
/// candidacy. `lost()` resolves when the lease could not be renewed before it ran out
/// (etcd unreachable, or the lease revoked): whoever leads with it stops.
pub struct Session {
    pub lease: i64,
    pub ttl_secs: i64,
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Grant a lease of `ttl_secs` and keep it alive every third of it.
    pub async fn start(client: &Client, ttl_secs: i64) -> Result<Session, FleetError> {
        let mut c = client.clone();
        // The lease runs from no earlier than this.
        let asked = tokio::time::Instant::now();
        let lease = c
            .lease_grant(ttl_secs, None)
            .await
            .map_err(FleetError::etcd("grant a lease"))?
            .id();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(keep_alive(c, lease, asked, ttl_secs, tx));
        Ok(Session {
            lease,
            ttl_secs,
            lost: rx,
            task,
        })
    }

    /// Resolves once the lease is lost.
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|lost| *lost).await;
    }

    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Stop renewing and revoke the lease (its keys go at once).
    pub async fn close(self, client: &mut Client) -> Result<(), FleetError> {
        self.task.abort();
        client
            .lease_revoke(self.lease)
            .await
            .map_err(FleetError::etcd("revoke the lease"))?;
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Renew `lease` every third of its TTL until it cannot be: etcd says it is gone, or no
/// renewal was answered before the lease's last known expiry. That expiry is counted from
/// when each renewal was *sent* (etcd renewed it later than that), so this side gives up
/// no later than etcd lets the lease go.
async fn keep_alive(
    mut client: Client,
    lease: i64,
    granted: tokio::time::Instant,
    ttl_secs: i64,
    lost: watch::Sender<bool>,
) {
    use tokio::time::{sleep, timeout_at, Instant};
    let ttl = Duration::from_secs(u64::try_from(ttl_secs.max(1)).unwrap_or(1));
    let period = ttl / 3;
    let retry = period.min(Duration::from_millis(500));
    let mut valid_until = granted + ttl;
    'connect: while Instant::now() < valid_until {
        let (mut keeper, mut stream) =
            match timeout_at(valid_until, client.lease_keep_alive(lease)).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(_)) => {
                    sleep(retry).await;
                    continue 'connect;
                }
                Err(_) => break 'connect,
            };
        loop {
            let sent = Instant::now();
            if keeper.keep_alive().await.is_err() {
                sleep(retry).await;
                continue 'connect;
            }
            match timeout_at(valid_until, stream.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    valid_until = sent + Duration::from_secs(u64::try_from(r.ttl()).unwrap_or(0));
                }
                // TTL 0: etcd no longer knows the lease.
                Ok(Ok(Some(_))) => break 'connect,
                Ok(Ok(None)) | Ok(Err(_)) => {
                    sleep(retry).await;
                    continue 'connect;
                }
                Err(_) => break 'connect,
            }
            sleep(period).await;
        }
    }
    let _ = lost.send(true);
}
