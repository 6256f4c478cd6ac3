//! Security shared by the coordinator, its clients and participants: TLS
//! ([`tls`]), credentials and roles ([`auth`]), and a bearer token sent on
//! outgoing calls ([`BearerToken`]); [`ClientOptions`] puts a client's TLS
//! and token together.
//!
//! [`BearerToken`], [`ClientOptions`] and [`endpoint`] are in every build;
//! feature `tls` adds TLS (rustls, and x509-parser for certificate dates
//! and names) and the access lists that check callers. Without it the
//! [`ClientTls`] settings are data only and [`endpoint`] refuses them.

#[cfg(feature = "tls")]
pub mod auth;
mod settings;
#[cfg(feature = "tls")]
pub mod tls;

#[cfg(feature = "tls")]
pub use auth::{AccessList, Refusal, Role};
/// The TLS library behind [`ClientTls::rustls_config`]; its `pki_types`
/// hold the [`CertificateDer`] of [`tls::read_certs`] and [`auth::cert_names`].
#[cfg(feature = "tls")]
pub use rustls;
#[cfg(feature = "tls")]
pub use rustls::pki_types::CertificateDer;
pub use settings::{ClientTls, TlsError};
#[cfg(feature = "tls")]
pub use tls::{ServerTls, ServerTlsFiles};
/// What [`ClientTls::config`] returns, for your own tonic `Endpoint`.
#[cfg(feature = "tls")]
pub use tonic::transport::ClientTlsConfig;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Endpoint;

/// Adds `authorization: Bearer <token>` to every outgoing call (none when
/// empty). An interceptor for tonic clients.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<redacted>)"
        } else {
            "BearerToken(none)"
        })
    }
}

impl BearerToken {
    /// No token.
    pub fn none() -> Self {
        BearerToken(None)
    }

    /// Sends `token`.
    ///
    /// # Errors
    ///
    /// The token has characters a header cannot carry.
    pub fn new(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.is_empty() {
            return Ok(BearerToken(None));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token has characters a header cannot carry".to_string())?;
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }

    /// Reads a token from a file (surrounding whitespace ignored).
    ///
    /// # Errors
    ///
    /// The file cannot be read, is empty, or the token is not header-safe.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        if text.trim().is_empty() {
            return Err(format!("token file {} is empty", path.display()));
        }
        Self::new(&text).map_err(|e| format!("token file {}: {e}", path.display()))
    }

    /// Whether a token is set.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel endpoint for `url` (TCP_NODELAY set). An `https://` address
/// gets TLS — `tls`, or the system's roots without it — and is never
/// called in cleartext; `http://` is plaintext, and refused with `tls`.
///
/// # Errors
///
/// A malformed address, unusable TLS files, or TLS settings for an
/// address that is not `https://`.
pub fn endpoint(url: &str, tls: Option<&ClientTls>) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("bad address {url:?}: {e}"))?
        .tcp_nodelay(true);
    if endpoint.uri().scheme_str() != Some("https") {
        if tls.is_some() {
            return Err(format!(
                "TLS settings were given for {url:?}, which would be called in cleartext: \
                 use an https:// address"
            ));
        }
        return Ok(endpoint);
    }
    with_tls(endpoint, url, tls)
}

#[cfg(feature = "tls")]
fn with_tls(endpoint: Endpoint, url: &str, tls: Option<&ClientTls>) -> Result<Endpoint, String> {
    let config = tls
        .cloned()
        .unwrap_or_default()
        .config()
        .map_err(|e| e.to_string())?;
    endpoint
        .tls_config(config)
        .map_err(|e| format!("TLS for {url:?}: {e}"))
}

#[cfg(not(feature = "tls"))]
fn with_tls(_: Endpoint, url: &str, _: Option<&ClientTls>) -> Result<Endpoint, String> {
    Err(format!(
        "{url:?} is an https:// address and this build has no TLS: enable the `tls` \
         feature (of tandem-sdk, or tandem-common)"
    ))
}

/// How to reach the coordinator: TLS settings for an `https://` address
/// and the bearer token sent with every call.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// TLS (CA bundle, client certificate for mutual TLS). For an
    /// `https://` address without it, the system's roots are trusted.
    pub tls: Option<ClientTls>,
    /// Sent as `authorization: Bearer <token>` when set.
    pub token: BearerToken,
}

impl ClientOptions {
    /// Options from files, as command-line flags name them: TLS when a CA
    /// bundle or a client certificate (with its key, for mutual TLS) is
    /// given, and the token `token_file` holds.
    ///
    /// # Errors
    ///
    /// The token file cannot be read, is empty, or its token is not
    /// header-safe.
    pub fn from_files(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
        token_file: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        let token = match token_file {
            Some(p) => BearerToken::from_file(p)?,
            None => BearerToken::none(),
        };
        let tls = (ca.is_some() || cert.is_some()).then(|| ClientTls {
            ca: ca.map(Into::into),
            cert: cert.map(Into::into),
            key: key.map(Into::into),
            domain: None,
        });
        Ok(ClientOptions { tls, token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Rule: a build without TLS never calls an https:// address in
    // cleartext; it refuses it, naming the feature to enable.
    #[cfg(not(feature = "tls"))]
    #[test]
    fn without_tls_an_https_address_is_refused() {
        let e = endpoint("https://coordinator.example:7070", None).expect_err("no TLS");
        assert!(e.contains("`tls` feature"), "{e}");
        assert!(endpoint("http://127.0.0.1:7070", None).is_ok());
        let tls = ClientTls::default();
        assert!(endpoint("http://127.0.0.1:7070", Some(&tls)).is_err());
    }

    // Rule: with TLS an https:// address gets a TLS endpoint, and TLS
    // settings for an http:// address are refused.
    #[cfg(feature = "tls")]
    #[test]
    fn with_tls_an_https_address_gets_tls() {
        let tls = ClientTls::default();
        assert!(endpoint("https://coordinator.example:7070", None).is_ok());
        let e = endpoint("http://127.0.0.1:7070", Some(&tls)).expect_err("cleartext");
        assert!(e.contains("cleartext"), "{e}");
    }
}
