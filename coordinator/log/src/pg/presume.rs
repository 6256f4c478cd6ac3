//! [`crate::TxnLog::presume_abort`] of [`super::PgLog`]: "no record, so
//! abort" written to the store before anyone is told (DESIGN.md, "One
//! forced write per transaction").

use super::PgLog;
use super::io::{Fail, Store};
use super::schema::code;
use crate::model::TxnRecord;
use crate::{LogError, Presumed, codec};

/// The marker's insert: an aborted row owned by nobody (the nil UUID) at
/// epoch 1, which a first write deciding abort replaces (`flush.rs`) and
/// any other first write is refused by, unless the gtid has a row (a coordinator that began it wrote it first:
/// `DO NOTHING`, after waiting for that insert to commit or roll back) or
/// the retention horizon covers it (read `FOR SHARE`, as first writes do).
const PRESUME_SQL: &str = "INSERT INTO tandem_txns (gtid, state, decision, record, owner, epoch)
     SELECT $1, $2, 2, $3, '00000000-0000-0000-0000-000000000000', 1
     WHERE $4 > (SELECT purged_ms FROM tandem_horizon FOR SHARE)
     ON CONFLICT (gtid) DO NOTHING
     RETURNING gtid";

impl PgLog {
    /// [`crate::TxnLog::presume_abort`]: straight to the store, retried
    /// like every store call.
    pub(super) fn presume(&self, marker: &TxnRecord) -> Result<Presumed, LogError> {
        let marker = marker.clone();
        self.on_store("presume an abort", move |store| {
            let marker = marker.clone();
            async move { store.presume_abort(&marker).await }
        })?
    }
}

impl Store {
    async fn presume_abort(&self, marker: &TxnRecord) -> Result<Result<Presumed, LogError>, Fail> {
        let client = self.pool.get().await?;
        let gtid = marker.gtid;
        let ms = crate::gtid_ms(&gtid).map_or(i64::MAX, |ms| ms.min(i64::MAX as u64) as i64);
        let written = client
            .query(
                PRESUME_SQL,
                &[&gtid, &code(marker.state), &codec::encode(marker), &ms],
            )
            .await?;
        if !written.is_empty() {
            return Ok(Ok(Presumed::Aborted));
        }
        // A row is there (or, written and its answer lost, ours: the same
        // abort), or the horizon refused the insert.
        let Some(row) = client
            .query_opt(
                "SELECT record, epoch FROM tandem_txns WHERE gtid = $1",
                &[&gtid],
            )
            .await?
        else {
            return Ok(Ok(Presumed::Forgotten));
        };
        let payloads = self.payloads_of(&client, &[gtid]).await?;
        let bytes: Vec<u8> = row.get(0);
        Ok(Store::decode_row(gtid, &bytes, row.get(1), &payloads)
            .map(|rec| Presumed::Found(Box::new(rec))))
    }
}
