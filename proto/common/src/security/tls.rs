//! TLS on every hop, with rustls (ring provider): a server side whose
//! certificates are replaced while serving ([`ServerTls::reload`]) and the
//! settings of a client ([`ClientTls`]).
//!
//! Files are PEM. A certificate that has expired or is not yet valid is
//! refused when loaded, with the file and the dates in the error.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

pub use super::settings::{ClientTls, TlsError};

/// Handshakes in progress at once; past it new connections are closed.
const MAX_HANDSHAKES: usize = 1024;
/// Handshakes in progress at once from one host (an IPv4 address, an IPv6
/// /64): one host holding connections open without a handshake cannot
/// take every slot.
const MAX_HANDSHAKES_PER_PEER: usize = 64;
/// A connection that has not finished its handshake by then is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a server's TLS files are.
#[derive(Clone, Debug)]
pub struct ServerTlsFiles {
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA bundle (PEM) that client certificates are verified against;
    /// `None`: clients present no certificate.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse a connection without a client certificate
    /// (mutual TLS). Without it a client may still connect without one and
    /// authenticate with a token.
    pub require_client_cert: bool,
}

/// A TLS server configuration that can be replaced while serving: new
/// connections use the latest; connections already open keep theirs.
#[derive(Clone)]
pub struct ServerTls {
    files: Arc<ServerTlsFiles>,
    current: Arc<RwLock<Arc<ServerConfig>>>,
    stamps: Arc<Mutex<Vec<Option<SystemTime>>>>,
    /// Handshakes in progress at once: in all, and from one host.
    max_handshakes: (usize, usize),
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks the files.
    ///
    /// # Errors
    ///
    /// A file is missing, unreadable, not PEM, or its certificate expired.
    pub fn load(files: ServerTlsFiles) -> Result<ServerTls, TlsError> {
        let config = server_config(&files)?;
        let stamps = stamps(&files);
        Ok(ServerTls {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(Arc::new(config))),
            stamps: Arc::new(Mutex::new(stamps)),
            max_handshakes: (MAX_HANDSHAKES, MAX_HANDSHAKES_PER_PEER),
        })
    }

    /// At most `total` handshakes in progress at once, `per_peer` of them
    /// from one host (defaults 1024 and 64); past either, new connections
    /// are closed.
    pub fn handshake_limits(mut self, total: usize, per_peer: usize) -> Self {
        self.max_handshakes = (total.max(1), per_peer.max(1));
        self
    }

    /// Reads the files again and serves new connections with them. On an
    /// error the configuration in use stays.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load).
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = stamps(&self.files);
        let config = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
        Ok(())
    }

    /// Reloads when a file's modification time changed since the last
    /// (re)load; `Ok(true)` when it did.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamps(&self.files);
        if *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) == now {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// Checks the files every `every` and reloads changed ones, logging
    /// the result; ends with the runtime or when aborted.
    pub fn watch(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match tls.reload_if_changed() {
                    Ok(true) => tracing::info!("TLS certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "TLS certificate not reloaded; keeping the one in use")
                    }
                }
            }
        })
    }

    fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// TLS connections accepted on `listener`, for tonic's
    /// `serve_with_incoming`. Handshakes run concurrently (bounded, with a
    /// timeout); a connection that fails its handshake (a plaintext
    /// client, an untrusted certificate) is closed and never reaches the
    /// services. Accepting stops when the stream is dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = mpsc::channel(64);
        let tls = self.clone();
        let (total, per_peer) = self.max_handshakes;
        tokio::spawn(async move {
            let handshakes = Arc::new(Semaphore::new(total));
            let peers = PeerHandshakes::default();
            loop {
                let accepted = tokio::select! {
                    r = listener.accept() => r,
                    () = tx.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors or the like: wait, then go on.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(peer_permit) = peers.acquire(peer.ip(), per_peer) else {
                    tracing::warn!(%peer, "too many TLS handshakes in progress from this host; connection closed");
                    continue;
                };
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "too many TLS handshakes in progress; connection closed");
                    continue;
                };
                // Without nodelay a reply's trailers wait for a delayed ACK.
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls.config());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                    drop((permit, peer_permit));
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Handshakes in progress by host.
#[derive(Clone, Default)]
struct PeerHandshakes(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One handshake of a host in progress; released when dropped.
struct PeerPermit {
    peers: PeerHandshakes,
    host: IpAddr,
}

impl PeerHandshakes {
    /// A slot for a handshake from `ip`, unless its host has `max`.
    fn acquire(&self, ip: IpAddr, max: usize) -> Option<PeerPermit> {
        let host = host_of(ip);
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(host).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerPermit {
            peers: self.clone(),
            host,
        })
    }
}

impl Drop for PeerPermit {
    fn drop(&mut self) {
        let mut map = self.peers.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.host) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.host);
            }
        }
    }
}

/// The host an address belongs to: an IPv4 address (or one mapped into
/// IPv6) itself, an IPv6 address's /64 (one host commonly holds a /64).
fn host_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

fn stamps(files: &ServerTlsFiles) -> Vec<Option<SystemTime>> {
    let mut paths = vec![&files.cert, &files.key];
    paths.extend(files.client_ca.as_ref());
    paths
        .into_iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(files: &ServerTlsFiles) -> Result<ServerConfig, TlsError> {
    let chain = read_certs(&files.cert)?;
    check_validity(&files.cert, &chain[0])?;
    let key = read_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let roots = root_store(ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
            let verifier = if files.require_client_cert {
                verifier.build()
            } else {
                verifier.allow_unauthenticated().build()
            }
            .map_err(|e| TlsError(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None if files.require_client_cert => {
            return Err(TlsError(
                "client certificates are required but no client CA is configured".into(),
            ));
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        TlsError(format!(
            "{} and {} do not make a server identity: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn root_store(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| TlsError(format!("CA bundle {}: {e}", ca.display())))?;
    }
    Ok(Arc::new(roots))
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("cannot read {what} {}: {e}", path.display())))
}

/// The certificates of a PEM file (at least one).
///
/// # Errors
///
/// The file cannot be read or holds no certificate.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path, "certificate file")?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError(format!(
                "{} is not a PEM certificate file: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!("no certificate in {}", path.display())));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path, "private key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        TlsError(format!(
            "{} holds no usable private key: {e}",
            path.display()
        ))
    })
}

/// Refuses a certificate outside its validity period, naming the dates.
fn check_validity(path: &Path, cert: &CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| {
        TlsError(format!(
            "{}: cannot parse the certificate: {e}",
            path.display()
        ))
    })?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(TlsError(format!(
            "certificate {} expired on {}",
            path.display(),
            validity.not_after
        )));
    }
    if now < validity.not_before {
        return Err(TlsError(format!(
            "certificate {} is not valid before {}",
            path.display(),
            validity.not_before
        )));
    }
    Ok(())
}

impl ClientTls {
    /// Reads the files into tonic's client configuration.
    ///
    /// # Errors
    ///
    /// A file cannot be read, a certificate expired, or only one of
    /// certificate and key is given.
    pub fn config(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => {
                read_certs(ca)?;
                config.ca_certificate(Certificate::from_pem(read_file(ca, "CA bundle")?))
            }
            None => config.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert)?;
                check_validity(cert, &chain[0])?;
                read_key(key)?;
                config = config.identity(Identity::from_pem(
                    read_file(cert, "certificate file")?,
                    read_file(key, "private key")?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(TlsError(
                    "a client certificate needs both the certificate and its key".into(),
                ));
            }
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }

    /// The same settings as a rustls configuration, for connections tonic
    /// does not make (PostgreSQL). The server's certificate is always
    /// verified, against `ca` or the system's roots; `domain` is not used
    /// (the connection's host name is checked).
    ///
    /// # Errors
    ///
    /// As [`ClientTls::config`]; or the system's roots cannot be read.
    pub fn rustls_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let roots = match &self.ca {
            Some(ca) => root_store(ca)?,
            None => {
                let found = rustls_native_certs::load_native_certs();
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(TlsError(format!(
                        "no CA given and no usable system root certificate ({} errors)",
                        found.errors.len()
                    )));
                }
                Arc::new(roots)
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_root_certificates(roots);
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert)?;
                check_validity(cert, &chain[0])?;
                builder
                    .with_client_auth_cert(chain, read_key(key)?)
                    .map_err(|e| {
                        TlsError(format!(
                            "{} and {} do not make a client identity: {e}",
                            cert.display(),
                            key.display()
                        ))
                    })
            }
            (None, None) => Ok(builder.with_no_client_auth()),
            _ => Err(TlsError(
                "a client certificate needs both the certificate and its key".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // An IPv6 /64 is one host; an IPv4 address mapped into IPv6 is that
    // address; each host has its own count, released with its permits.
    #[test]
    fn handshakes_are_counted_by_host() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(host_of(ip("2001:db8::1")), host_of(ip("2001:db8::ffff:2")));
        assert_ne!(host_of(ip("2001:db8::1")), host_of(ip("2001:db8:0:1::1")));
        assert_eq!(host_of(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        let peers = PeerHandshakes::default();
        let held: Vec<_> = (1..=2)
            .map(|i| peers.acquire(ip(&format!("2001:db8::{i}")), 2))
            .collect();
        assert!(held.iter().all(Option::is_some));
        assert!(peers.acquire(ip("2001:db8::3"), 2).is_none());
        assert!(peers.acquire(ip("10.0.0.1"), 2).is_some());
        drop(held);
        assert!(peers.acquire(ip("2001:db8::3"), 2).is_some());
        assert!(peers.0.lock().expect("map").is_empty());
    }
}
