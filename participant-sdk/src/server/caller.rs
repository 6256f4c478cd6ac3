//! The caller check in front of the `Participant` service: only allowed
//! coordinators may drive branches (when an access list is set; access
//! lists come with feature `tls`, and without it every caller passes).

use tonic::{Request, Status};

#[cfg(feature = "tls")]
use crate::security::{AccessList, Role};

/// Refuses a caller that is not an allowed coordinator (when
/// [`ParticipantServer::only_coordinators`](super::ParticipantServer::only_coordinators) is set) on the request's
/// headers, before its message is read.
#[cfg(feature = "tls")]
#[derive(Clone)]
pub struct CallerCheck(pub(super) Option<AccessList>);

/// No access list without feature `tls`: every caller passes.
#[cfg(not(feature = "tls"))]
#[derive(Clone)]
pub struct CallerCheck;

#[cfg(not(feature = "tls"))]
impl tonic::service::Interceptor for CallerCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        Ok(req)
    }
}

#[cfg(feature = "tls")]
impl tonic::service::Interceptor for CallerCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(access) = &self.0 else {
            return Ok(req);
        };
        let auth = req.metadata().get("authorization").map(|v| v.as_bytes());
        let certs = req.peer_certs();
        match access.check(
            auth,
            certs.as_deref().map(|c| c.as_slice()),
            Role::Coordinator,
        ) {
            Ok(_) => Ok(req),
            Err(r) => {
                tracing::warn!(refused = %r, "participant call refused");
                Err(Status::from(r))
            }
        }
    }
}
