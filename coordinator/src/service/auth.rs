//! Authentication and roles for every call, in one tower layer in front of
//! both services: the caller's bearer token or mutual-TLS certificate must
//! hold the role the method needs, or the call is refused
//! (`UNAUTHENTICATED` / `PERMISSION_DENIED`) before any service sees it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use tandem_common::security::{AccessList, Role};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

/// The role a method needs; `None` for paths no service serves (tonic
/// answers those UNIMPLEMENTED) and for `grpc.health.v1.Health` and gRPC
/// reflection: a load balancer or Kubernetes probe checks health without a
/// token even with `--auth-file`, and reflection tells only the schema.
pub fn required_role(path: &str) -> Option<Role> {
    if path.starts_with("/tandem.v1.Admin/") {
        Some(Role::Admin)
    } else if path == "/tandem.v1.Coordinator/GetOutcome" {
        Some(Role::Participant)
    } else if path.starts_with("/tandem.v1.Coordinator/") {
        Some(Role::Client)
    } else {
        None
    }
}

/// The authenticated caller's name (its token's or certificate's), put in
/// the request's extensions for the services (e.g. who settled a branch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller(pub String);

/// The access list in force; replaced on reload.
pub type SharedAccess = Arc<RwLock<AccessList>>;

/// Checks every request against the access list.
#[derive(Clone)]
pub struct AuthLayer {
    access: SharedAccess,
}

impl AuthLayer {
    /// Calls must hold a role granted in `access`.
    pub fn new(access: SharedAccess) -> Self {
        AuthLayer { access }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            access: self.access.clone(),
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    access: SharedAccess,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Auth<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        if let Some(role) = required_role(req.uri().path()) {
            let auth = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            let certs = req
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.peer_certs());
            let checked = self.access.read().unwrap_or_else(|p| p.into_inner()).check(
                auth,
                certs.as_deref().map(|c| c.as_slice()),
                role,
            );
            match checked {
                Ok(name) => {
                    req.extensions_mut().insert(Caller(name));
                }
                Err(refusal) => {
                    tracing::warn!(path = req.uri().path(), refused = %refusal, "call refused");
                    let status = tonic::Status::from(refusal);
                    return Box::pin(std::future::ready(Ok(status.into_http())));
                }
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Load balancers and probes carry no token: health and reflection
    /// need no role, while every Tandem method needs one.
    #[test]
    fn health_and_reflection_need_no_role() {
        assert_eq!(required_role("/grpc.health.v1.Health/Check"), None);
        assert_eq!(required_role("/grpc.health.v1.Health/Watch"), None);
        assert_eq!(
            required_role("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            None
        );
        assert_eq!(
            required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            None
        );
        assert_eq!(
            required_role("/tandem.v1.Coordinator/Begin"),
            Some(Role::Client)
        );
    }
}
