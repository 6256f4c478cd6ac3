//! Readiness: whether the coordinator takes new work now, and if not, why.
//! The runtime publishes every change (recovery finished, the log failed,
//! shutdown began) on a watch channel, so the gRPC health service follows
//! it without polling.

use tokio::sync::watch;

use super::{Coordinator, Inner};

/// What keeps the coordinator from taking new work; serving when none holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Readiness {
    /// The transactions found in the log at start are still being taken
    /// over (until every one finished its first round of calls). New
    /// transactions are accepted meanwhile, but a load balancer is better
    /// off sending them to an instance that is not busy catching up.
    pub recovering: bool,
    /// The log failed: nothing is decided until a restart.
    pub halted: bool,
    /// Shutdown began: `begin` and `submit` answer UNAVAILABLE.
    pub draining: bool,
}

impl Readiness {
    /// A coordinator that has not recovered yet (recovery starts it).
    pub(super) const STARTING: Readiness = Readiness {
        recovering: true,
        halted: false,
        draining: false,
    };

    /// Whether new transactions should be sent here.
    pub fn serving(&self) -> bool {
        !(self.recovering || self.halted || self.draining)
    }

    /// Why not serving, for logs and health messages ("" when serving).
    pub fn reason(&self) -> &'static str {
        if self.halted {
            "halted after a log failure"
        } else if self.draining {
            "draining for shutdown"
        } else if self.recovering {
            "recovering in-flight transactions"
        } else {
            ""
        }
    }
}

impl Coordinator {
    /// Follows the coordinator's [`Readiness`]: the receiver sees every
    /// change (and the current value at once).
    pub fn readiness(&self) -> watch::Receiver<Readiness> {
        self.inner.readiness.subscribe()
    }
}

impl Inner {
    /// Applies `change` and tells the followers if anything changed.
    pub(super) fn set_readiness(&self, change: impl FnOnce(&mut Readiness)) {
        self.readiness.send_if_modified(|r| {
            let before = *r;
            change(r);
            before != *r
        });
    }
}
