//! Finding transactions: the filters of Admin ListTransactions (states,
//! age, mode, resource, endpoint, caller labels, gtid prefix), newest or
//! oldest first, one bounded page at a time.

use crate::error::CoordError;
use crate::labels::{self, Label};
use crate::model::{Gtid, Mode, TxState, TxnRecord};

use super::Coordinator;

/// Records read from the log for one page at most: a filter that matches
/// little returns a short (even empty) page with a cursor to go on from,
/// instead of reading the whole log in one request.
pub const SCAN_BUDGET: usize = 20_000;
/// How far ahead of its creation time a client-chosen gtid may be (a
/// minute is accepted; two leave room).
const CLOCK_AHEAD_MS: u64 = 120_000;
/// Records read per step.
const CHUNK: usize = 512;

/// What an operator looks for; the empty query matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only these states (any when empty).
    pub states: Vec<TxState>,
    /// Only created before this time (ms since the Unix epoch).
    pub created_before_ms: Option<u64>,
    /// Only carrying every one of these labels.
    pub labels: Vec<Label>,
    /// Only with a branch of this resource.
    pub resource: Option<String>,
    /// Only with a branch calling this endpoint (a trailing `/` ignored).
    pub endpoint: Option<String>,
    /// Only of this protocol (a mixed transaction is of its own mode).
    pub mode: Option<Mode>,
    /// Only gtids starting with this (lower case).
    pub gtid_prefix: Option<String>,
    /// Newest first.
    pub newest_first: bool,
}

impl ListQuery {
    /// Whether `rec` is wanted (its state included).
    pub fn matches(&self, rec: &TxnRecord) -> bool {
        let endpoint = self.endpoint.as_deref().map(|e| e.trim_end_matches('/'));
        (self.states.is_empty() || self.states.contains(&rec.state))
            && self.created_before_ms.is_none_or(|t| rec.created_ms < t)
            && labels::has_all(&rec.labels, &self.labels)
            && self
                .resource
                .as_deref()
                .is_none_or(|r| rec.branches.iter().any(|b| b.resource == r))
            && endpoint.is_none_or(|e| {
                rec.branches
                    .iter()
                    .any(|b| b.endpoint.trim_end_matches('/') == e)
            })
            && self.mode.is_none_or(|m| rec.mode == m)
            && self
                .gtid_prefix
                .as_deref()
                .is_none_or(|p| rec.gtid.to_string().starts_with(p))
    }
}

/// One page of a listing.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    /// The records found, in the order asked.
    pub records: Vec<TxnRecord>,
    /// Where the next page starts (exclusive); `None` when nothing is left.
    pub next: Option<Gtid>,
}

impl Coordinator {
    /// Up to `size` records matching `query`, continuing after (or, newest
    /// first, before) `cursor`; live transactions show their live state.
    /// Reads at most [`SCAN_BUDGET`] records.
    ///
    /// # Errors
    ///
    /// A log failure.
    pub fn list_page(
        &self,
        cursor: Option<Gtid>,
        query: &ListQuery,
        size: usize,
    ) -> Result<ListPage, CoordError> {
        let log = &self.inner.log;
        let mut cursor = cursor;
        let mut found = Vec::new();
        let mut read = 0;
        loop {
            let chunk = if query.newest_first {
                log.scan_back(cursor.as_ref(), &query.states, CHUNK)?
            } else {
                log.scan(cursor.as_ref(), &query.states, CHUNK)?
            };
            let end = chunk.len() < CHUNK;
            read += chunk.len();
            for mut rec in chunk {
                cursor = Some(rec.gtid);
                if let Some(entry) = self.inner.find_live(&rec.gtid) {
                    rec = entry.lock().visible_record().into_owned();
                }
                if !query.matches(&rec) {
                    continue;
                }
                if found.len() == size {
                    // One more exists: the page ends at the last one kept.
                    let next = found.last().map(|r: &TxnRecord| r.gtid);
                    return Ok(ListPage {
                        records: found,
                        next,
                    });
                }
                found.push(rec);
            }
            if end {
                return Ok(ListPage {
                    records: found,
                    next: None,
                });
            }
            if read >= SCAN_BUDGET {
                return Ok(ListPage {
                    records: found,
                    next: cursor,
                });
            }
            // Oldest first: gtids are UUID v7, so once past the creation
            // limit everything after is newer too.
            if !query.newest_first
                && let (Some(before), Some(last)) = (query.created_before_ms, cursor)
                && gtid_ms(&last) >= before.saturating_add(CLOCK_AHEAD_MS)
            {
                return Ok(ListPage {
                    records: found,
                    next: None,
                });
            }
        }
    }
}

/// The creation time a UUID v7 gtid carries, ms since the Unix epoch.
fn gtid_ms(g: &Gtid) -> u64 {
    let b = g.as_bytes();
    b[..6]
        .iter()
        .fold(0u64, |acc, x| (acc << 8) | u64::from(*x))
}
