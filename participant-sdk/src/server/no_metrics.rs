//! What dispatch records without feature `metrics`: nothing. A stand-in
//! for [`ParticipantMetrics`](crate::metrics) that cannot be made, so a
//! server's `Option` of it is always `None` and dispatch reads the same
//! with and without the feature.

use crate::barrier::gate::Passage;
use crate::handler::{BoxFuture, HandlerError, Vote};

/// Never constructed: without feature `metrics` there are none.
#[derive(Clone)]
pub(crate) enum ParticipantMetrics {}

impl ParticipantMetrics {
    pub(crate) fn time_handler<'a, T: Send + 'a>(
        &'a self,
        _: &'a str,
        _: &'static str,
        _: BoxFuture<'a, Result<T, HandlerError>>,
        _: fn(&Result<T, HandlerError>) -> &'static str,
    ) -> BoxFuture<'a, Result<T, HandlerError>> {
        match *self {}
    }

    pub(crate) fn passed(&self, _: &str, _: &'static str, _: Passage) {
        match *self {}
    }

    pub(crate) fn panicked(&self, _: &str, _: &'static str) {
        match *self {}
    }
}

pub(crate) fn vote_result(_: &Result<Vote, HandlerError>) -> &'static str {
    "ok"
}

pub(crate) fn ack_result(_: &Result<(), HandlerError>) -> &'static str {
    "ok"
}
