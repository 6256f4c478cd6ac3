//! The admin HTTP listener (`tandem serve --admin-listen`): a JSON API over
//! the Admin service, the web console, and `/metrics`, on a port of its own
//! beside the gRPC one, stopped by the same shutdown.
//!
//! - [`api`]: `/api/…` (overview, list, detail, retry, abort).
//! - [`console`]: the console's HTML / JS / CSS, embedded in the binary.
//!
//! Everything under `/api/` and `/metrics` needs the admin role when
//! `--auth-file` is given (bearer token, or the client certificate when the
//! listener is TLS with `--tls-client-ca`): 401 without a credential, 403
//! with one lacking the role. Without `--auth-file` reads are open but
//! actions are refused: a console is never a write path open to everyone.
//! The console's own files load without a credential (they hold no data).

mod api;
mod console;
mod query;
mod timeline;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Method, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tandem_common::security::Role;
use tandem_common::security::rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::runtime::Coordinator;
use crate::security::ServerSecurity;
use crate::service::{AdminService, SharedAccess};

/// How long open connections get to finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Connections served at once; past it new ones are closed.
const MAX_CONNECTIONS: usize = 256;
/// A connection with no request in flight for this long is closed: one
/// idle after its last answer, and one that never completes a request
/// head (silent, or trickling bytes). Idle or slow clients must not hold
/// the [`MAX_CONNECTIONS`] slots and lock operators and scrapers out.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one request may take, its body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Requests in flight on one connection, and when that last changed.
struct Activity {
    state: std::sync::Mutex<(usize, std::time::Instant)>,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: std::sync::Mutex::new((0, std::time::Instant::now())),
        })
    }

    fn change(&self, delta: isize) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = s.0.saturating_add_signed(delta);
        s.1 = std::time::Instant::now();
    }

    /// `None` once idle for [`IDLE_TIMEOUT`]; else how long to wait
    /// before asking again.
    fn idle_left(&self) -> Option<Duration> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0 > 0 {
            return Some(IDLE_TIMEOUT);
        }
        IDLE_TIMEOUT
            .checked_sub(s.1.elapsed())
            .filter(|d| !d.is_zero())
    }

    /// Resolves once the connection has been idle for [`IDLE_TIMEOUT`].
    async fn idle(&self) {
        while let Some(wait) = self.idle_left() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Marks a request in flight until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(a: &Arc<Activity>) -> InFlight {
        a.change(1);
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.change(-1);
    }
}

/// The admin listener's socket, bound by the caller (port 0 picks one).
pub struct AdminListener {
    /// Where it accepts connections.
    pub listener: TcpListener,
    /// This coordinator's name (instance name, or its gRPC address).
    pub instance: String,
}

/// What every handler shares.
#[derive(Clone)]
struct AppState {
    admin: AdminService,
    coord: Coordinator,
    /// This coordinator's name, shown by the console.
    instance: String,
    /// `None`: authentication off (reads open, actions refused).
    access: Option<SharedAccess>,
}

/// The client certificates of a TLS connection, put in each request's
/// extensions for the admin check.
#[derive(Clone)]
struct PeerCerts(Arc<Vec<CertificateDer<'static>>>);

/// The caller who passed the admin check (logged with actions).
#[derive(Clone)]
struct AdminCaller(String);

/// The router: API and metrics behind the admin check, console open.
fn router(state: AppState) -> Router {
    let protected = Router::new()
        .nest("/api", api::routes())
        .route("/metrics", axum::routing::get(metrics))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin,
        ));
    Router::new()
        .merge(console::routes())
        .merge(protected)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such page") })
        .layer(axum::middleware::from_fn(common_headers))
        .with_state(state)
}

/// Serves the admin listener until `shutdown` is cancelled; then open
/// connections get [`SHUTDOWN_GRACE`] to finish. TLS (and client
/// certificates) as `security` says, with the gRPC port's certificate.
pub async fn serve(
    coord: Coordinator,
    listener: AdminListener,
    security: ServerSecurity,
    shutdown: CancellationToken,
) {
    let AdminListener { listener, instance } = listener;
    let state = AppState {
        admin: AdminService::new(coord.clone()),
        coord,
        instance,
        access: security.access.as_ref().map(|a| a.shared()),
    };
    if state.access.is_none() {
        tracing::warn!(
            "admin HTTP listener without --auth-file: the console and API can be READ by anyone \
             who reaches the port; retry and abort are refused until --auth-file is given"
        );
    }
    let app = router(state);
    let connections = TaskTracker::new();
    match &security.tls {
        Some(tls) => {
            let mut incoming = tls.incoming(listener);
            loop {
                let next = tokio::select! {
                    n = incoming.next() => n,
                    () = shutdown.cancelled() => break,
                };
                let Some(Ok(stream)) = next else {
                    if next.is_none() {
                        break;
                    }
                    continue;
                };
                let certs = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| PeerCerts(Arc::new(c.to_vec())));
                spawn_connection(&connections, &app, stream, certs, &shutdown);
            }
        }
        None => loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = shutdown.cancelled() => break,
            };
            match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    spawn_connection(&connections, &app, tcp, None, &shutdown);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        },
    }
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("admin listener: connections still open after the grace period; closed");
    }
}

/// Serves one connection (HTTP/1.1 or HTTP/2) in a tracked task, closing
/// it gracefully on shutdown.
fn spawn_connection<S>(
    tracker: &TaskTracker,
    app: &Router,
    stream: S,
    certs: Option<PeerCerts>,
    shutdown: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if tracker.len() >= MAX_CONNECTIONS {
        tracing::warn!("admin listener: too many connections; one closed");
        return;
    }
    let app = app.clone();
    let shutdown = shutdown.clone();
    tracker.spawn(async move {
        let activity = Activity::new();
        let svc = tower::ServiceExt::map_request(app, move |mut req: Request<_>| {
            if let Some(c) = &certs {
                req.extensions_mut().insert(c.clone());
            }
            req
        });
        let counting = activity.clone();
        let svc = tower::ServiceExt::map_future(svc, move |fut| {
            let in_flight = InFlight::start(&counting);
            async move {
                let answer = match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                    Ok(answer) => answer,
                    // Not 408: browsers send a request answered 408 again.
                    Err(_) => Ok(error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no answer within 60 s; an action may still complete: reload the \
                         transaction",
                    )),
                };
                drop(in_flight);
                answer
            }
        });
        let svc = TowerToHyperService::new(svc);
        let builder = auto::Builder::new(TokioExecutor::new());
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            () = activity.idle() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
            }
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    });
}

/// The admin check in front of `/api/` and `/metrics`.
async fn require_admin(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let write = req.method() != Method::GET && req.method() != Method::HEAD;
    if write && let Some(why) = cross_site(&req) {
        tracing::warn!(
            path = req.uri().path(),
            why,
            "admin HTTP action refused: cross-site"
        );
        return error(StatusCode::FORBIDDEN, why);
    }
    let Some(access) = &state.access else {
        if write {
            return error(
                StatusCode::FORBIDDEN,
                "actions are refused while authentication is off: configure --auth-file with an \
                 admin token on the coordinator to retry or abort from the console",
            );
        }
        return next.run(req).await;
    };
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let certs = req.extensions().get::<PeerCerts>().map(|c| c.0.clone());
    let checked = access.read().unwrap_or_else(|p| p.into_inner()).check(
        auth,
        certs.as_deref().map(Vec::as_slice),
        Role::Admin,
    );
    match checked {
        Ok(name) => {
            req.extensions_mut().insert(AdminCaller(name));
            next.run(req).await
        }
        Err(refusal) => {
            tracing::warn!(path = req.uri().path(), refused = %refusal, "admin HTTP call refused");
            let status = match refusal {
                tandem_common::security::Refusal::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
                tandem_common::security::Refusal::PermissionDenied(_) => StatusCode::FORBIDDEN,
            };
            let mut resp = error(status, &refusal.to_string());
            if status == StatusCode::UNAUTHORIZED {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tandem-admin\""),
                );
            }
            resp
        }
    }
}

/// Why an action comes from another site, if it does. A browser holding
/// an admin client certificate presents it to any page's form POST, so
/// actions must come from the console's own origin. `Sec-Fetch-Site` is set
/// by the browser alone and decides; without it, a request carrying
/// `Authorization` was not sent by a form (a cross-origin script would need
/// a CORS preflight, which is never granted), and otherwise an `Origin`
/// must name this host. Tools like curl send none of these and are not
/// affected; a proxy rewriting `Host` does not matter to browsers that
/// send `Sec-Fetch-Site`.
fn cross_site(req: &Request) -> Option<&'static str> {
    const WHY: &str = "actions are accepted only from the console's own origin";
    let headers = req.headers();
    if let Some(site) = headers.get("sec-fetch-site") {
        return (!matches!(site.as_bytes(), b"same-origin" | b"none")).then_some(WHY);
    }
    if headers.contains_key(header::AUTHORIZATION) {
        return None;
    }
    let origin = headers.get(header::ORIGIN)?;
    let Some((scheme, origin_host)) = origin.to_str().ok().and_then(|o| o.split_once("://")) else {
        return Some(WHY);
    };
    // HTTP/1.1 names the host in Host, HTTP/2 in :authority.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let default_port = if scheme.eq_ignore_ascii_case("https") {
        ":443"
    } else {
        ":80"
    };
    let norm = |h: &str| {
        h.strip_suffix(default_port)
            .unwrap_or(h)
            .to_ascii_lowercase()
    };
    match host {
        Some(h) if norm(h) == norm(origin_host) => None,
        _ => Some(WHY),
    }
}

/// Headers on every answer: no sniffing, no framing, no referrer.
async fn common_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// `GET /metrics`: the OpenMetrics text format (what `prometheus-client`
/// writes; Prometheus asks for it by default).
async fn metrics(State(state): State<AppState>) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        crate::metrics::render(&state.coord),
    )
        .into_response()
}

/// A JSON error answer `{"error": message}`.
fn error(status: StatusCode, message: &str) -> Response {
    json(status, &serde_json::json!({ "error": message }))
}

/// A JSON answer, never cached.
fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_vec(value)
        .unwrap_or_else(|_| br#"{"error":"the answer could not be encoded"}"#.to_vec());
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
