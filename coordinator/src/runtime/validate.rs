//! Request validation at the edge: limits on branches, reasons and
//! deadlines. A refused request changes nothing.

use std::time::Duration;

use super::Inner;
use crate::engine::NewBranch;
use crate::error::CoordError;

/// Longest resource name accepted.
const MAX_RESOURCE_LEN: usize = 256;
/// Longest endpoint accepted.
const MAX_ENDPOINT_LEN: usize = 1024;
/// Longest client rollback reason kept.
const MAX_REASON_LEN: usize = 1024;

/// New branches' resource names hold no control or invisible formatting
/// character (an operator reads them in a terminal). Checked only for
/// what is started now: a repeat of a transaction recorded before this
/// rule is answered from its record.
pub(super) fn printable_resources(branches: &[NewBranch]) -> Result<(), CoordError> {
    if branches
        .iter()
        .any(|b| !crate::engine::labels::printable(&b.resource))
    {
        return Err(CoordError::InvalidArgument(
            "branch resource holds control or invisible formatting characters".into(),
        ));
    }
    Ok(())
}

pub(super) fn check_reason(reason: &str) -> Result<(), CoordError> {
    if reason.len() > MAX_REASON_LEN {
        return Err(CoordError::InvalidArgument(format!(
            "reason is {} bytes; at most {MAX_REASON_LEN}",
            reason.len()
        )));
    }
    if !crate::engine::labels::printable(reason) {
        return Err(CoordError::InvalidArgument(
            "reason holds control or invisible formatting characters (an operator reads it in \
             a terminal)"
                .into(),
        ));
    }
    Ok(())
}

impl Inner {
    pub(super) fn deadline(&self, timeout: Option<Duration>) -> Result<u64, CoordError> {
        let timeout = timeout.unwrap_or(self.config.default_timeout);
        if timeout > self.config.max_timeout {
            return Err(CoordError::InvalidArgument(format!(
                "timeout {} ms is above the maximum of {} ms",
                timeout.as_millis(),
                self.config.max_timeout.as_millis()
            )));
        }
        Ok(self.now() + timeout.as_millis() as u64)
    }

    pub(super) fn validate_branch(&self, b: &NewBranch) -> Result<(), CoordError> {
        let invalid = |m: String| Err(CoordError::InvalidArgument(m));
        if b.endpoint.is_empty() {
            return invalid("branch endpoint is empty".into());
        }
        if b.endpoint.len() > MAX_ENDPOINT_LEN {
            return invalid(format!(
                "branch endpoint is longer than {MAX_ENDPOINT_LEN} bytes"
            ));
        }
        super::validate_endpoint(&b.endpoint).map_err(CoordError::InvalidArgument)?;
        self.check_policy(&b.endpoint)?;
        if b.resource.is_empty() {
            return invalid("branch resource is empty".into());
        }
        if b.resource.len() > MAX_RESOURCE_LEN {
            return invalid(format!(
                "branch resource is longer than {MAX_RESOURCE_LEN} bytes"
            ));
        }
        if b.payload.len() > self.config.max_payload_bytes {
            return invalid(format!(
                "branch payload is {} bytes; the limit is {} bytes",
                b.payload.len(),
                self.config.max_payload_bytes
            ));
        }
        Ok(())
    }

    /// The participant policy: TLS when required, and an endpoint the
    /// allowlist names. Checked before anything is stored or dialled (and
    /// before every call: the log may hold branches named under an older
    /// policy); the refusal does not echo the endpoint.
    pub(super) fn check_policy(&self, endpoint: &str) -> Result<(), CoordError> {
        if !self.config.require_tls && self.config.allowed_endpoints.is_empty() {
            return Ok(());
        }
        let (scheme, host, port) =
            super::endpoint_parts(endpoint).map_err(CoordError::InvalidArgument)?;
        if self.config.require_tls && scheme != "https" {
            return Err(CoordError::PermissionDenied(
                "this coordinator calls participants only over TLS: use an https:// endpoint"
                    .into(),
            ));
        }
        let allowed = &self.config.allowed_endpoints;
        if !allowed.is_empty() && !allowed.iter().any(|p| p.matches(&scheme, &host, port)) {
            return Err(CoordError::PermissionDenied(
                "the branch's endpoint is not an allowed participant (see the coordinator's \
                 --allow-participant)"
                    .into(),
            ));
        }
        Ok(())
    }
}
