//! Named crash points for tests: with the `failpoints` cargo feature, the
//! process aborts (no destructors, no flushes, as in a power cut or
//! SIGKILL) when it reaches the point named by the `TANDEM_FAILPOINT`
//! environment variable. Without the feature, [`hit`] compiles to nothing.
//! The tests crate turns the feature on, so build the shipped binary from
//! its own package (`cargo build --release -p tandem-cli`): a
//! whole-workspace build unifies features and would include it.
//!
//! The points, in protocol order:
//! - `after-branch-recorded`: a branch is in the log, its phase-1 call not
//!   sent;
//! - `after-phase-one`: a participant answered phase 1, the answer not
//!   recorded;
//! - `after-decision-forced`: a forced decision (a commit, or the abort of
//!   a client-chosen gtid) is on disk, no phase-2 call sent;
//! - `between-phase-two`: one phase-2 call was acknowledged, the
//!   acknowledgement not recorded, other calls possibly outstanding.

/// Every point [`hit`] is called with.
pub const POINTS: [&str; 4] = [
    "after-branch-recorded",
    "after-phase-one",
    "after-decision-forced",
    "between-phase-two",
];

/// Aborts the process if `TANDEM_FAILPOINT` names `point` (with the
/// `failpoints` feature; a no-op otherwise).
#[inline]
pub fn hit(point: &'static str) {
    #[cfg(feature = "failpoints")]
    {
        static CHOSEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let chosen = CHOSEN.get_or_init(|| std::env::var("TANDEM_FAILPOINT").ok());
        if chosen.as_deref() == Some(point) {
            eprintln!("tandem: failpoint {point} reached: aborting");
            std::process::abort();
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = point;
}
