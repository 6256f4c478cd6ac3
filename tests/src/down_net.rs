//! Participants in the test process for the retention tests: phase 1
//! votes yes; phase 2 fails at [`DOWN`] while `down` is set (a participant
//! away, whose branch ends STUCK).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tandem_coordinator::model::{Mode, TraceContext};
use tandem_coordinator::runtime::{CallFuture, Transport};
use tandem_proto::v1::{BranchRequest, VoteResponse};

/// The endpoint whose phase 2 fails while [`DownNet::down`] is set.
pub const DOWN: &str = "http://down:1";

/// See the module docs.
#[derive(Debug, Default)]
pub struct DownNet {
    /// Phase-1 calls made.
    pub phase_one: AtomicUsize,
    /// Phase 2 fails at [`DOWN`] while set.
    pub down: AtomicBool,
}

impl Transport for DownNet {
    fn phase_one(
        &self,
        _: &str,
        _: Mode,
        _: BranchRequest,
        _: Option<TraceContext>,
        _: Duration,
    ) -> CallFuture<'_, VoteResponse> {
        self.phase_one.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {
            Ok(VoteResponse {
                yes: true,
                ..Default::default()
            })
        })
    }

    fn phase_two(
        &self,
        endpoint: &str,
        _: Mode,
        _: bool,
        _: BranchRequest,
        _: Option<TraceContext>,
        _: Duration,
    ) -> CallFuture<'_, ()> {
        let down = endpoint == DOWN && self.down.load(Ordering::SeqCst);
        Box::pin(async move {
            if down {
                Err("down for maintenance".into())
            } else {
                Ok(())
            }
        })
    }
}
