//! Checking a sled log before trusting it: every record must decode, and
//! sled must hold every forced round the mark says it was given. `tandem
//! serve` refuses a log that fails this (unless told to quarantine and go
//! on), and `tandem log check` prints the same report offline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{LogError, codec, mark};
use crate::model::Gtid;

/// sled tree holding records that could not be read, moved aside by
/// `--accept-log-damage` (key and bytes as they were).
pub(super) const QUARANTINE_TREE: &str = "quarantine";

/// What a look at a log found.
#[derive(Clone, Debug, Default)]
pub struct LogReport {
    /// The data directory.
    pub dir: PathBuf,
    /// The forced mark beside sled's data, if any.
    pub mark: Option<u64>,
    /// The mark file exists but cannot be read.
    pub mark_error: Option<String>,
    /// The last forced round sled holds.
    pub sled_round: u64,
    /// Records by state name.
    pub counts: BTreeMap<String, usize>,
    /// Records that do not decode: (key, why).
    pub undecodable: Vec<(String, String)>,
    /// sled failed while reading (a damaged page).
    pub read_error: Option<String>,
    /// Records quarantined by an earlier `--accept-log-damage`.
    pub quarantined: usize,
}

impl LogReport {
    /// Every problem found, in words; empty for a healthy log.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.mark_error {
            out.push(format!("its forced mark cannot be read: {e}"));
        }
        // The mark is written (and synced) at the first open, before sled
        // counts any round: sled past round 0 without one means it was
        // removed, and nothing tells whether sled lost forced writes.
        if self.mark.is_none() && self.mark_error.is_none() && self.sled_round > 0 {
            out.push(format!(
                "its forced mark ({}) is missing though sled holds forced round {}: whether \
                 forced writes were lost cannot be checked (the file was deleted, or the \
                 directory restored without it)",
                mark::MARK_FILE,
                self.sled_round
            ));
        }
        if let Some(m) = self.mark.filter(|m| *m > self.sled_round) {
            out.push(format!(
                "it is behind its forced mark: sled holds forced round {}, the mark says {m} \
                 ({} forced rounds of writes are missing; the data file was damaged, \
                 truncated or replaced)",
                self.sled_round,
                m - self.sled_round
            ));
        }
        if let Some(e) = &self.read_error {
            out.push(format!("sled cannot read all of it: {e}"));
        }
        if !self.undecodable.is_empty() {
            let first: Vec<String> = self
                .undecodable
                .iter()
                .take(5)
                .map(|(k, why)| format!("{k} ({why})"))
                .collect();
            out.push(format!(
                "{} records do not decode: {}{}",
                self.undecodable.len(),
                first.join(", "),
                if self.undecodable.len() > 5 {
                    ", …"
                } else {
                    ""
                }
            ));
        }
        out
    }

    /// Whether anything is wrong.
    pub fn is_damaged(&self) -> bool {
        !self.problems().is_empty()
    }

    /// The refusal `tandem serve` prints for a damaged log.
    pub fn refusal(&self) -> String {
        format!(
            "the transaction log in {} is damaged: {}. Tandem will not serve from it: \
             a lost commit decision would be answered ABORT. Restore the directory from \
             a backup; or see what is affected with `tandem log check --data-dir {}` and \
             start with --accept-log-damage to quarantine what cannot be read (every \
             gtid concerned is logged) and go on",
            self.dir.display(),
            self.problems().join("; "),
            self.dir.display()
        )
    }
}

/// Reads every record of `txns` (payloads stored apart from `payloads`)
/// and fills `report`'s counts, undecodable records and read error.
/// Decodes every record of `txns`, counting states into `report` and
/// putting the gtid of each unfinished one into `unfinished`.
pub(super) fn inspect(
    txns: &sled::Tree,
    payloads: &sled::Tree,
    report: &mut LogReport,
    unfinished: &mut BTreeSet<Gtid>,
) {
    for item in txns.iter() {
        let (key, value) = match item {
            Ok(kv) => kv,
            Err(e) => {
                report.read_error = Some(e.to_string());
                return;
            }
        };
        let Ok(gtid) = Gtid::from_slice(&key) else {
            report
                .undecodable
                .push((format!("{key:?}"), "key is not a gtid".into()));
            continue;
        };
        let decoded = codec::decode(gtid, &value, |branch| {
            let mut k = [0u8; 20];
            k[..16].copy_from_slice(gtid.as_bytes());
            k[16..].copy_from_slice(&branch.to_be_bytes());
            Ok(payloads
                .get(k)
                .map_err(|e| LogError::Storage(e.to_string()))?
                .map(|v| Bytes::copy_from_slice(&v)))
        });
        match decoded {
            Ok(rec) => {
                if !rec.state.is_terminal() {
                    unfinished.insert(gtid);
                }
                *report.counts.entry(rec.state.name().into()).or_default() += 1;
            }
            Err(e) => report.undecodable.push((gtid.to_string(), e.to_string())),
        }
    }
}

/// Looks at the log in `dir` without serving it (`tandem log check`).
///
/// # Errors
///
/// sled cannot open the directory (missing, or held by a running
/// coordinator).
pub fn check_dir(dir: &Path) -> Result<LogReport, LogError> {
    if !dir.join("db").exists() && !dir.join(mark::MARK_FILE).exists() {
        return Err(LogError::Storage(format!(
            "{} holds no Tandem log",
            dir.display()
        )));
    }
    let mut report = LogReport {
        dir: dir.to_path_buf(),
        ..LogReport::default()
    };
    match mark::read(dir) {
        Ok(m) => report.mark = m,
        Err(e) => report.mark_error = Some(e),
    }
    let db = super::SledLog::sled_config(dir)
        .open()
        .map_err(|e| match e {
            sled::Error::Corruption { .. } => LogError::Damaged(format!(
                "DAMAGED: sled cannot open the log in {}: {e}",
                dir.display()
            )),
            e => LogError::Storage(format!("cannot open {}: {e}", dir.display())),
        })?;
    let tree = |name: &str| {
        db.open_tree(name)
            .map_err(|e| LogError::Storage(format!("cannot open tree {name}: {e}")))
    };
    report.sled_round = mark::sled_round(&db).map_err(LogError::Storage)?;
    report.quarantined = tree(QUARANTINE_TREE)?.len();
    let mut unfinished = BTreeSet::new();
    inspect(
        &tree("txns")?,
        &tree("payloads")?,
        &mut report,
        &mut unfinished,
    );
    Ok(report)
}
