//! Reads of [`super::PgLog`]: one record, or a page of them, with the
//! payloads stored apart.

use std::collections::HashMap;

use bytes::Bytes;
use tandem_common::postgres::tokio_postgres;

use super::io::{Fail, Store};
use super::schema::code;
use crate::model::{Gtid, TxState, TxnRecord};
use crate::{LogError, codec};

impl Store {
    /// A row's record, at the row's epoch (the column is the truth: a
    /// takeover raises it without rewriting the record).
    pub(super) fn decode_row(
        gtid: Gtid,
        bytes: &[u8],
        epoch: i64,
        payloads: &HashMap<(Gtid, u32), Bytes>,
    ) -> Result<TxnRecord, LogError> {
        let mut rec = codec::decode(gtid, bytes, |branch| {
            Ok(payloads.get(&(gtid, branch)).cloned())
        })?;
        rec.epoch = epoch.max(1) as u64;
        Ok(rec)
    }

    pub(super) async fn payloads_of(
        &self,
        client: &tokio_postgres::Client,
        gtids: &[Gtid],
    ) -> Result<HashMap<(Gtid, u32), Bytes>, Fail> {
        if gtids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = client
            .query(
                "SELECT gtid, branch, payload FROM tandem_payloads WHERE gtid = ANY($1)",
                &[&gtids],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let branch: i32 = r.get(1);
                (
                    (r.get(0), branch as u32),
                    Bytes::from(r.get::<_, Vec<u8>>(2)),
                )
            })
            .collect())
    }

    /// Rows of `(gtid, record, epoch)` decoded, in order, with the
    /// payloads stored apart fetched in one query.
    async fn decode_rows(
        &self,
        client: &tokio_postgres::Client,
        rows: Vec<tokio_postgres::Row>,
    ) -> Result<Vec<(Gtid, Result<TxnRecord, LogError>)>, Fail> {
        let rows: Vec<(Gtid, Vec<u8>, i64)> = rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let apart: Vec<Gtid> = rows
            .iter()
            .filter(|(_, b, _)| codec::has_payloads_apart(b))
            .map(|(g, _, _)| *g)
            .collect();
        let payloads = self.payloads_of(client, &apart).await?;
        Ok(rows
            .into_iter()
            .map(|(g, b, e)| (g, Self::decode_row(g, &b, e, &payloads)))
            .collect())
    }

    /// The records of `gtids` that exist, each decoded on its own (one
    /// that does not decode fails only its own reads).
    pub(super) async fn read_some(
        &self,
        gtids: &[Gtid],
    ) -> Result<HashMap<Gtid, Result<Option<TxnRecord>, LogError>>, Fail> {
        let client = self.pool.get().await?;
        // Prepared once per connection: a statement prepared per call costs
        // the store a round trip and a transaction of its own. The
        // retention horizon comes with the rows, read in the same snapshot
        // (the row whose gtid is NULL): a record missing here was removed
        // by a purge that raised the horizon this read sees (`tombstone.rs`).
        let statement = client
            .prepare_cached(
                "SELECT gtid, record, epoch FROM tandem_txns WHERE gtid = ANY($1)
                 UNION ALL SELECT NULL, NULL, purged_ms FROM tandem_horizon",
            )
            .await?;
        let (rows, horizon): (Vec<_>, Vec<_>) = client
            .query(&statement, &[&gtids])
            .await?
            .into_iter()
            .partition(|r| r.get::<_, Option<Gtid>>(0).is_some());
        for h in horizon {
            let purged: i64 = h.get(2);
            self.shared
                .purged_seen
                .fetch_max(purged.max(0) as u64, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(self
            .decode_rows(&client, rows)
            .await?
            .into_iter()
            .map(|(g, r)| (g, r.map(Some)))
            .collect())
    }

    pub(super) async fn read_many(
        &self,
        after: Option<Gtid>,
        states: &[TxState],
        limit: usize,
        own: bool,
        back: bool,
    ) -> Result<Result<Vec<TxnRecord>, LogError>, Fail> {
        let client = self.pool.get().await?;
        let codes: Vec<i16> = states.iter().map(|s| code(*s)).collect();
        let owner = own.then_some(self.shared.incarnation);
        let rows = client
            .query(
                if back {
                    "SELECT gtid, record, epoch FROM tandem_txns
                     WHERE ($1::uuid IS NULL OR gtid < $1)
                       AND (cardinality($2::int2[]) = 0 OR state = ANY($2))
                       AND ($3::uuid IS NULL OR owner = $3)
                     ORDER BY gtid DESC LIMIT $4"
                } else {
                    "SELECT gtid, record, epoch FROM tandem_txns
                     WHERE ($1::uuid IS NULL OR gtid > $1)
                       AND (cardinality($2::int2[]) = 0 OR state = ANY($2))
                       AND ($3::uuid IS NULL OR owner = $3)
                     ORDER BY gtid LIMIT $4"
                },
                &[
                    &after,
                    &codes,
                    &owner,
                    &(limit.min(i64::MAX as usize) as i64),
                ],
            )
            .await?;
        Ok(self
            .decode_rows(&client, rows)
            .await?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }
}
