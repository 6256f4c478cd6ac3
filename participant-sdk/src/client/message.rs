//! Transactional messages from a business service: prepare a message with
//! the coordinator, commit the local transaction, submit the message.
//! Dropping a prepared message is [`TransactionClient::rollback`].

use std::time::Duration;

use tandem_proto::v1 as pb;

use super::cluster::Repeat;
use super::{
    Branch, CommitOutcome, TransactionClient, gtid_from_wire, timeout_ms, traced, wire_labels,
    with_gtid,
};
use crate::{Error, Gtid};

impl TransactionClient {
    /// Records the transactional message `gtid` with the coordinator
    /// (forced to its disk before this returns), undecided: "deliver these
    /// calls once my local transaction commits, and never otherwise".
    ///
    /// `gtid` is a UUID v7 made now (`Gtid::now_v7()`), chosen before the
    /// call so that the local transaction can record it. `check` names the
    /// back-check of this service (its endpoint, and the name its
    /// [`MessageCheck`](crate::MessageCheck) is registered under with
    /// [`ParticipantServer::check`](crate::ParticipantServer::check); its
    /// payload is passed to the check); `deliveries` are the calls to
    /// make (branches 2, 3, … in this order, each served by a
    /// [`Message`](crate::Message) handler). `timeout` is how long the
    /// coordinator waits for [`submit_message`](Self::submit_message)
    /// before asking the check (`None`: its default).
    ///
    /// Then: commit the local transaction, recording `gtid` in it as the
    /// check will read it, and call [`submit_message`](Self::submit_message).
    /// If the local transaction fails, [`rollback`](Self::rollback) drops
    /// the message at once (otherwise its check drops it at the timeout).
    /// [`PgMessages::send`](crate::postgres::PgMessages::send) is all of
    /// this for a service whose state is in PostgreSQL.
    ///
    /// A repeat with the same gtid and branches answers the same message,
    /// so a call whose reply was lost can be repeated.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tandem_sdk::{Branch, Error, Gtid, TransactionClient};
    ///
    /// # async fn order(client: TransactionClient) -> Result<(), Error> {
    /// let gtid = Gtid::now_v7();
    /// let check = Branch::new("http://orders:9000", "orders-check", "");
    /// let points = Branch::new("http://loyalty:9001", "points", "customer-7:+80");
    /// client
    ///     .prepare_message(gtid, check, vec![points], Some(Duration::from_secs(30)))
    ///     .await?;
    /// // ... commit the order and a row for `gtid` in one local transaction ...
    /// client.submit_message(gtid).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for a bad request (no delivery, a branch with a
    /// mode other than [`Mode::Msg`](crate::Mode::Msg), a timeout above the
    /// coordinator's maximum, a gtid that is not a recent UUID v7), or
    /// ALREADY_EXISTS when `gtid` names another transaction or message;
    /// [`Error::TimedOut`] / [`Error::Unavailable`] with the gtid when no
    /// answer came: the message may be recorded; repeat the call, or leave
    /// it to the check (the local transaction has not committed, so the
    /// check drops it).
    pub async fn prepare_message(
        &self,
        gtid: Gtid,
        check: Branch,
        deliveries: Vec<Branch>,
        timeout: Option<Duration>,
    ) -> Result<Gtid, Error> {
        self.prepare_message_labeled(gtid, check, deliveries, timeout, &[])
            .await
    }

    /// As [`prepare_message`](Self::prepare_message), with caller labels
    /// kept in the message's record (see
    /// [`begin_labeled`](Self::begin_labeled)).
    ///
    /// # Errors
    ///
    /// As [`prepare_message`](Self::prepare_message); [`Error::Invalid`]
    /// naming the key of a label the coordinator refuses.
    pub async fn prepare_message_labeled(
        &self,
        gtid: Gtid,
        check: Branch,
        deliveries: Vec<Branch>,
        timeout: Option<Duration>,
        labels: &[(&str, &str)],
    ) -> Result<Gtid, Error> {
        let req = pb::PrepareMessageRequest {
            gtid: gtid.to_string(),
            check: Some(check.wire()),
            branches: deliveries.into_iter().map(Branch::wire).collect(),
            timeout_ms: timeout_ms(timeout),
            labels: wire_labels(labels),
        };
        let trace = self.outgoing_trace();
        let resp = self
            .cluster
            .call(Repeat::Safe, |mut rpc| {
                let req = traced(req.clone(), trace.as_ref());
                async move { rpc.prepare_message(req).await }
            })
            .await
            .map_err(|s| with_gtid(s, gtid))?;
        gtid_from_wire(&resp.gtid)
    }

    /// Submits the prepared message `gtid` once the local transaction has
    /// committed: the coordinator decides delivery (forced to its disk),
    /// delivers to every branch and returns. Repeating it is safe.
    ///
    /// Once the local transaction has committed, the message is delivered
    /// even if this call fails or is never made: the coordinator's check
    /// finds the commit at the timeout. This call only makes it sooner.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] with FAILED_PRECONDITION when the message was
    /// dropped already (rolled back, or its check answered no: the local
    /// transaction did not commit in time), NOT_FOUND for an unknown gtid;
    /// [`Error::TimedOut`] / [`Error::Unavailable`] with the gtid when no
    /// answer came (repeat, or leave it to the check).
    pub async fn submit_message(&self, gtid: Gtid) -> Result<CommitOutcome, Error> {
        let req = pb::SubmitMessageRequest {
            gtid: gtid.to_string(),
        };
        let trace = self.outgoing_trace();
        let resp = self
            .cluster
            .call(Repeat::Safe, |mut rpc| {
                let req = traced(req.clone(), trace.as_ref());
                async move { rpc.submit_message(req).await }
            })
            .await
            .map_err(|s| with_gtid(s, gtid))?;
        Ok(CommitOutcome {
            complete: resp.state == pb::TxState::Committed as i32,
        })
    }
}
