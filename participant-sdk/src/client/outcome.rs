//! A participant's questions to the coordinator: the [`Outcome`] of a
//! transaction it holds a branch of (in-doubt resolution), and the client
//! that asks them in the background.

#[cfg(feature = "participant")]
use std::sync::Arc;
#[cfg(feature = "participant")]
use std::time::Duration;

use tandem_proto::v1 as pb;

use super::TransactionClient;
use super::cluster::Repeat;
#[cfg(feature = "participant")]
use super::cluster::{self, Cluster};
#[cfg(feature = "participant")]
use crate::security::ClientOptions;
use crate::{Error, Gtid};

/// What should happen to a branch, as the coordinator knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Undecided: ask again later.
    Pending,
    /// Commit / confirm.
    Commit,
    /// Roll back / cancel (also for a gtid the coordinator never recorded:
    /// presumed abort).
    Abort,
}

/// A client for a participant's background questions to the coordinator
/// (`GetOutcome`): connects on first use, 5 s to connect, 10 s per call;
/// `coordinator` may list several coordinators of one store, separated by
/// commas (any of them answers). `None` (logged, naming `what`) for an
/// address that does not parse.
#[cfg(feature = "participant")]
pub(crate) fn background_client(
    coordinator: &str,
    what: &str,
    options: &ClientOptions,
) -> Option<TransactionClient> {
    let mut all = Vec::new();
    for address in coordinator
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        match crate::security::endpoint(address, options.tls.as_ref()) {
            Ok(e) => all.push((
                address.to_string(),
                cluster::rpc(
                    e.connect_timeout(Duration::from_secs(5))
                        .timeout(Duration::from_secs(10))
                        .connect_lazy(),
                    options.token.clone(),
                ),
            )),
            Err(e) => {
                tracing::error!(%coordinator, error = %e, "{what} disabled: bad coordinator address or TLS files");
                return None;
            }
        }
    }
    if all.is_empty() {
        tracing::error!(%coordinator, "{what} disabled: no coordinator address");
        return None;
    }
    Some(TransactionClient {
        cluster: Arc::new(Cluster::new(all, options.clone())),
        trace: None,
    })
}

impl TransactionClient {
    /// The outcome of `gtid`, for a participant holding one of its branches
    /// (in-doubt resolution; [`ParticipantServer::resolve_in_doubt`] does
    /// this for you).
    ///
    /// [`ParticipantServer::resolve_in_doubt`]: crate::ParticipantServer::resolve_in_doubt
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] when the coordinator cannot be reached.
    pub async fn outcome(&self, gtid: Gtid) -> Result<Outcome, Error> {
        let req = pb::GetOutcomeRequest {
            gtid: gtid.to_string(),
        };
        let resp = self
            .cluster
            .call(Repeat::Safe, |mut rpc| {
                let req = req.clone();
                async move { rpc.get_outcome(req).await }
            })
            .await?;
        Ok(match resp.outcome() {
            pb::Outcome::Pending => Outcome::Pending,
            pb::Outcome::Commit => Outcome::Commit,
            pb::Outcome::Abort => Outcome::Abort,
        })
    }
}
