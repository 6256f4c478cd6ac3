//! Delivering alerts: one HTTP/1.1 POST at a time over a fresh connection
//! (plain TCP, or rustls for https), with a deadline per POST and
//! exponential backoff between tries. hyper's client connection is used
//! directly: hyper is already under tonic, and an alert a minute needs no
//! pool.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tandem_common::security::ClientTls;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;

use super::{Alert, AlertError, AlertSettings};

/// Where alerts go: the parsed URL and, for https, the TLS client.
pub(super) struct Webhook {
    host: String,
    port: u16,
    path: String,
    tls: Option<TlsConnector>,
    authorization: Option<String>,
}

impl Webhook {
    pub(super) fn new(settings: &AlertSettings) -> Result<Webhook, AlertError> {
        // The URL's path and query may be the hook's secret: only its host
        // is named.
        let shown = crate::redact::redact_url(&settings.url);
        let bad = |why: &str| AlertError(format!("{shown}: {why}"));
        let uri: http::Uri = settings
            .url
            .parse()
            .map_err(|e| bad(&format!("not a URL ({e})")))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(bad("put credentials in --alert-token-file, not the URL"));
        }
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        let tls = if https {
            let client = ClientTls {
                ca: settings.ca.clone(),
                cert: None,
                key: None,
                domain: None,
            };
            let mut config = client
                .rustls_config()
                .map_err(|e| AlertError(e.to_string()))?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        let authorization = settings.token.as_ref().map(|t| format!("Bearer {t}"));
        Ok(Webhook {
            host,
            port,
            path,
            tls,
            authorization,
        })
    }

    /// One POST; `Ok` on a 2xx answer.
    async fn post(&self, body: Bytes) -> Result<(), String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.exchange(TokioIo::new(tcp), body).await,
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("server name: {e}"))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                self.exchange(TokioIo::new(stream), body).await
            }
        }
    }

    async fn exchange<I>(&self, io: I, body: Bytes) -> Result<(), String>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, mut conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let host = match self.port {
            80 | 443 => self.host.clone(),
            p => format!("{}:{p}", self.host),
        };
        let mut req = Request::post(self.path.as_str())
            .header(http::header::HOST, host)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "tandem-alerts")
            .header(http::header::CONNECTION, "close");
        if let Some(auth) = &self.authorization {
            req = req.header(http::header::AUTHORIZATION, auth);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        // The connection is driven beside the request; with `connection:
        // close` it may end first, having handed the answer over already.
        let send = sender.send_request(req);
        tokio::pin!(send);
        let response = tokio::select! {
            biased;
            r = &mut send => r,
            r = &mut conn => match r {
                Ok(()) => send.await,
                Err(e) => return Err(format!("HTTP: {e}")),
            },
        }
        .map_err(|e| format!("HTTP: {e}"))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", response.status()))
        }
    }
}

/// The delivery task: alerts one at a time, each tried `settings.tries`
/// times with doubling waits; ends when `stop` is cancelled.
pub(super) async fn deliver(
    hook: Webhook,
    settings: AlertSettings,
    mut rx: mpsc::Receiver<Alert>,
    stop: CancellationToken,
) {
    loop {
        let alert = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            a = rx.recv() => match a {
                Some(a) => a,
                None => break,
            },
        };
        let body = match serde_json::to_vec(&alert) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(error = %e, "alert not encoded");
                continue;
            }
        };
        let mut wait = settings.first_backoff;
        for attempt in 1..=settings.tries.max(1) {
            let result = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                r = tokio::time::timeout(settings.request_timeout, hook.post(body.clone())) => {
                    r.unwrap_or_else(|_| Err("no answer in time".into()))
                }
            };
            match result {
                Ok(()) => {
                    tracing::debug!(gtid = %alert.gtid, kind = ?alert.kind, "alert delivered");
                    break;
                }
                Err(error) if attempt < settings.tries => {
                    tracing::debug!(gtid = %alert.gtid, attempt, %error, "alert not delivered; retrying");
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(wait) => {}
                    }
                    wait = wait.saturating_mul(2);
                }
                Err(error) => tracing::warn!(
                    gtid = %alert.gtid,
                    kind = ?alert.kind,
                    tries = attempt,
                    %error,
                    "alert webhook unreachable: alert given up"
                ),
            }
        }
    }
    let left = rx.len();
    if left > 0 {
        tracing::warn!(left, "stopping: alerts not delivered");
    }
}
