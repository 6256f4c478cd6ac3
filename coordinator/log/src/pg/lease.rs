//! Ownership in [`super::PgLog`]'s store: registering an incarnation,
//! renewing its heartbeat and leases, claiming expired leases, and the
//! cluster view.

use std::sync::Arc;

use tandem_common::postgres::tokio_postgres;
use tracing::warn;

use super::io::{Fail, Store};
use super::schema::{self, unfinished_codes};
use super::{ClusterStatus, InstanceStatus};
use crate::model::Gtid;
use crate::{LogError, Ownership};

impl Store {
    /// Migrates, registers this incarnation, and takes over the unfinished
    /// rows of earlier incarnations of this name. Returns how many.
    pub(super) async fn register(&self) -> Result<u64, Fail> {
        let mut client = self.pool.get().await?;
        schema::migrate(&mut client).await.map_err(Fail::Fatal)?;
        let o = &self.shared.options;
        let me = self.shared.incarnation;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO tandem_instances (incarnation, name, address, lease_until)
             VALUES ($1, $2, $3, now() + $4::bigint * interval '1 millisecond')
             ON CONFLICT (incarnation) DO UPDATE
             SET heartbeat_at = now(), lease_until = excluded.lease_until",
            &[&me, &o.name, &o.address, &self.lease_ms()],
        )
        .await?;
        let claimed = tx
            .execute(
                "UPDATE tandem_txns SET owner = $1, epoch = epoch + 1
                 WHERE state = ANY($3) AND owner IN (
                     SELECT incarnation FROM tandem_instances
                     WHERE name = $2 AND incarnation <> $1)",
                &[&me, &o.name, &unfinished_codes()],
            )
            .await?;
        // Earlier incarnations of this name own nothing unfinished now.
        tx.execute(
            "DELETE FROM tandem_instances WHERE name = $1 AND incarnation <> $2",
            &[&o.name, &me],
        )
        .await?;
        tx.commit().await?;
        Ok(claimed)
    }

    /// Renews this incarnation's heartbeat and lease, which is the lease of
    /// every transaction it owns: one row written every third of the
    /// lease, whatever it owns (a STUCK backlog included).
    pub(super) async fn renew_loop(self: Arc<Self>) {
        let period = self.shared.options.lease / 3;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.shared.halted.get().is_some() {
                return;
            }
            if self
                .shared
                .renewals_paused
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                continue;
            }
            let renewed = self.renew().await;
            let counter = match renewed {
                Ok(true) => &self.shared.renewals,
                _ => &self.shared.renewal_failures,
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match renewed {
                Ok(true) => {}
                Ok(false) => {
                    self.shared.latch(LogError::Fenced(format!(
                        "another process registered as instance {:?}: this one stops deciding",
                        self.shared.options.name
                    )));
                    return;
                }
                Err(Fail::Transient(e) | Fail::Fatal(e)) => {
                    let until = std::time::Instant::now() + self.shared.options.lease;
                    *self
                        .shared
                        .claims_paused_until
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(until);
                    warn!(error = %e, "cannot renew the leases in the store; retrying")
                }
            }
        }
    }

    pub(super) async fn renew(&self) -> Result<bool, Fail> {
        let client = self.pool.get().await?;
        let me = self.shared.incarnation;
        let alive = client
            .execute(
                "UPDATE tandem_instances
                 SET heartbeat_at = now(), lease_until = now() + $2::bigint * interval '1 millisecond'
                 WHERE incarnation = $1",
                &[&me, &self.lease_ms()],
            )
            .await?;
        Ok(alive == 1)
    }

    /// Claims up to `limit` unfinished transactions whose owner's lease
    /// expired, or whose owner is not registered any more (`epoch + 1`),
    /// skipping rows another instance is claiming; and forgets instances
    /// long dead that own nothing.
    /// With `only`, that one transaction alone (a request for it came to
    /// this instance).
    pub(super) async fn claim_expired(
        &self,
        limit: usize,
        only: Option<Gtid>,
    ) -> Result<Vec<Gtid>, Fail> {
        let paused = *self
            .shared
            .claims_paused_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if paused.is_some_and(|until| std::time::Instant::now() < until) {
            // This instance could not renew its own leases lately: others
            // may not have either (a store outage), so nothing is claimed
            // until every live instance had a lease period to renew.
            return Ok(Vec::new());
        }
        let client = self.pool.get().await?;
        let me = self.shared.incarnation;
        let rows = client
            .query(
                "WITH due AS (
                     SELECT t.gtid FROM tandem_txns t
                     WHERE t.state = ANY($2) AND t.owner <> $1
                       AND ($4::uuid IS NULL OR t.gtid = $4)
                       AND NOT EXISTS (SELECT 1 FROM tandem_instances i
                                       WHERE i.incarnation = t.owner AND i.lease_until >= now())
                     LIMIT $3
                     FOR UPDATE OF t SKIP LOCKED)
                 UPDATE tandem_txns t SET owner = $1, epoch = t.epoch + 1
                 FROM due WHERE t.gtid = due.gtid
                 RETURNING t.gtid",
                &[&me, &unfinished_codes(), &(limit as i64), &only],
            )
            .await?;
        if only.is_some() {
            return Ok(rows.into_iter().map(|r| r.get(0)).collect());
        }
        client
            .execute(
                "DELETE FROM tandem_instances i
                 WHERE heartbeat_at < now() - 10 * $1::bigint * interval '1 millisecond'
                   AND NOT EXISTS (SELECT 1 FROM tandem_txns t
                                   WHERE t.owner = i.incarnation AND t.state = ANY($2))",
                &[&self.lease_ms(), &unfinished_codes()],
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }
}

impl Store {
    /// Who drives `gtid`: its row's owner, whether that lease still runs.
    pub(super) async fn owner_of(&self, gtid: Gtid) -> Result<Option<Ownership>, Fail> {
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT t.owner = $2,
                        coalesce(i.lease_until >= now(), false) OR NOT (t.state = ANY($3)),
                        coalesce(i.name, ''), coalesce(i.address, ''), t.epoch
                 FROM tandem_txns t LEFT JOIN tandem_instances i ON i.incarnation = t.owner
                 WHERE t.gtid = $1",
            )
            .await?;
        let row = client
            .query_opt(
                &statement,
                &[&gtid, &self.shared.incarnation, &unfinished_codes()],
            )
            .await?;
        Ok(row.map(|r| Ownership {
            here: r.get(0),
            live: r.get(1),
            name: r.get(2),
            address: r.get(3),
            epoch: r.get::<_, i64>(4).max(1) as u64,
        }))
    }
}

/// The cluster as the store sees it (read only).
pub(super) async fn read_cluster(client: &tokio_postgres::Client) -> Result<ClusterStatus, Fail> {
    {
        let rows = client
            .query(
                "SELECT i.name, i.incarnation, i.address,
                            (extract(epoch FROM now() - i.heartbeat_at) * 1000)::bigint,
                            (SELECT count(*) FROM tandem_txns t
                             WHERE t.owner = i.incarnation AND t.state = ANY($1)),
                            i.lease_until < now()
                     FROM tandem_instances i ORDER BY i.name, i.started_at",
                &[&unfinished_codes()],
            )
            .await?;
        let expired: i64 = client
            .query_one(
                "SELECT count(*) FROM tandem_txns t
                 WHERE t.state = ANY($1)
                   AND NOT EXISTS (SELECT 1 FROM tandem_instances i
                                   WHERE i.incarnation = t.owner AND i.lease_until >= now())",
                &[&unfinished_codes()],
            )
            .await?
            .get(0);
        Ok(ClusterStatus {
            instances: rows
                .into_iter()
                .map(|r| InstanceStatus {
                    name: r.get(0),
                    incarnation: r.get(1),
                    address: r.get(2),
                    heartbeat_age_ms: r.get::<_, i64>(3).max(0) as u64,
                    owned: r.get::<_, i64>(4).max(0) as u64,
                    lease_expired: r.get(5),
                })
                .collect(),
            expired: expired.max(0) as u64,
        })
    }
}
