//! TLS settings as plain data, in every build: a client's [`ClientOptions`]
//! can name them without the `tls` feature, which adds what uses them
//! ([`tls`](super::tls)).
//!
//! [`ClientOptions`]: super::ClientOptions

use std::path::PathBuf;

/// A TLS file that cannot be used, with the reason.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// How a client speaks TLS: the CA bundle its servers' certificates are
/// verified against (the system's roots when `None`) and, for mutual TLS,
/// its own certificate and key.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// CA bundle (PEM).
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM), for mutual TLS.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The name to expect in the server's certificate instead of the
    /// endpoint's host.
    pub domain: Option<String>,
}
