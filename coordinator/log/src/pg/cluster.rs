//! The cluster as the store sees it (`tandem cluster status`): every
//! registered instance, its lease, what it owns.

use uuid::Uuid;

use super::{io, lease};
use crate::LogError;

/// One coordinator instance as registered in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceStatus {
    /// Its name.
    pub name: String,
    /// This process of it.
    pub incarnation: Uuid,
    /// Where clients reach it.
    pub address: String,
    /// Milliseconds since its last heartbeat (database clock).
    pub heartbeat_age_ms: u64,
    /// Its lease has run out (database clock): it stopped renewing (killed,
    /// paused, cut off from the store), and what it owns is taken over.
    pub lease_expired: bool,
    /// Unfinished transactions it owns.
    pub owned: u64,
}

/// The cluster as the store sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterStatus {
    /// Registered instances, alive or not (dead ones are forgotten once
    /// they own nothing).
    pub instances: Vec<InstanceStatus>,
    /// Unfinished transactions whose lease has expired, waiting to be
    /// taken over.
    pub expired: u64,
}

/// The cluster as the store at `url` sees it, read without joining it
/// (`tandem cluster status`).
///
/// # Errors
///
/// The store cannot be reached or read.
pub async fn cluster_status(url: &str) -> Result<ClusterStatus, LogError> {
    let pool = tandem_common::postgres::pool(url, 1)
        .map_err(|e| LogError::Storage(format!("cannot use the store: {e}")))?;
    let fail = |e: io::Fail| match e {
        io::Fail::Transient(e) | io::Fail::Fatal(e) => LogError::Storage(e),
    };
    let client = pool.get().await.map_err(|e| fail(e.into()))?;
    lease::read_cluster(&client).await.map_err(fail)
}
