//! The security flags of an example participant, one per call of the
//! SDK's security API, so that the example shows the secure setup to copy:
//!
//! | flags | SDK |
//! |---|---|
//! | `--tls-cert`, `--tls-key`, `--tls-client-ca`, `--require-client-cert` | [`ParticipantServer::tls`] with [`ServerTls::load`] |
//! | `--only-coordinators FILE` | [`ParticipantServer::only_coordinators`] with [`AccessList::load`] |
//! | `--coordinator-ca`, `--coordinator-cert`, `--coordinator-key`, `--coordinator-token-file` | the [`ClientOptions`] of [`ParticipantServer::resolve_in_doubt_with`] |
//!
//! With the files of `tandem certs dev --out certs`: `--tls-cert
//! certs/participant.pem --tls-key certs/participant-key.pem
//! --tls-client-ca certs/ca.pem --require-client-cert --only-coordinators
//! certs/participant-access.txt`, and for in-doubt resolution over TLS
//! `--coordinator-ca certs/ca.pem --coordinator-token-file
//! certs/participant.token`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use tandem_sdk::security::{AccessList, ServerTls, ServerTlsFiles};
use tandem_sdk::{ClientOptions, ParticipantServer};

/// TLS, who is obeyed, and how the coordinator is reached.
#[derive(Args, Clone, Debug, Default)]
pub struct SecureArgs {
    /// Serve TLS with this certificate chain (PEM); plaintext callers are
    /// refused. Re-read when it changes.
    #[arg(long, env = "TANDEM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TANDEM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Verify callers' certificates against this CA bundle (their names
    /// can then be granted the coordinator role in --only-coordinators).
    #[arg(long, env = "TANDEM_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Refuse callers without a certificate from --tls-client-ca (mutual
    /// TLS).
    #[arg(long, env = "TANDEM_REQUIRE_CLIENT_CERT", requires = "tls_client_ca")]
    pub require_client_cert: bool,
    /// Obey only callers granted the `coordinator` role in this access
    /// file (`coordinator NAME cert:DNS-NAME` or `token-sha256:…` lines):
    /// any other Prepare / Commit / Rollback / Try / Confirm / Cancel is
    /// refused before the barrier or a handler sees it. Without it anyone
    /// who reaches the port may commit or cancel a branch.
    #[arg(long, env = "TANDEM_ONLY_COORDINATORS")]
    pub only_coordinators: Option<PathBuf>,
    /// CA bundle the coordinator's certificate is verified against, when
    /// in-doubt resolution asks an https:// --coordinator (default: the
    /// system's roots).
    #[arg(long, env = "TANDEM_COORDINATOR_CA")]
    pub coordinator_ca: Option<PathBuf>,
    /// Client certificate shown to the coordinator (mutual TLS), named
    /// with the participant role in its access file.
    #[arg(long, env = "TANDEM_COORDINATOR_CERT", requires = "coordinator_key")]
    pub coordinator_cert: Option<PathBuf>,
    /// The private key of --coordinator-cert.
    #[arg(long, env = "TANDEM_COORDINATOR_KEY", requires = "coordinator_cert")]
    pub coordinator_key: Option<PathBuf>,
    /// File holding the bearer token sent to the coordinator (granted the
    /// participant role in its access file).
    #[arg(long, env = "TANDEM_COORDINATOR_TOKEN_FILE")]
    pub coordinator_token_file: Option<PathBuf>,
}

impl SecureArgs {
    /// `server` with TLS and the coordinators' access list, as the flags
    /// say.
    ///
    /// # Errors
    ///
    /// A certificate, key or access file cannot be read or is not valid.
    pub fn apply(&self, mut server: ParticipantServer) -> anyhow::Result<ParticipantServer> {
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let tls = ServerTls::load(ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
                require_client_cert: self.require_client_cert,
            })?;
            server = server.tls(tls);
        }
        if let Some(path) = &self.only_coordinators {
            let access = AccessList::load(path)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("--only-coordinators {}", path.display()))?;
            if self.tls_cert.is_none() {
                tracing::warn!(
                    "TOKENS IN CLEARTEXT: --only-coordinators without --tls-cert: the \
                     coordinator's token crosses the network unencrypted (give --tls-cert \
                     and --tls-key)"
                );
            }
            server = server.only_coordinators(access);
        }
        Ok(server)
    }

    /// How in-doubt resolution reaches the coordinator.
    ///
    /// # Errors
    ///
    /// The token file cannot be read or holds no usable token.
    pub fn coordinator_options(&self) -> anyhow::Result<ClientOptions> {
        ClientOptions::from_files(
            self.coordinator_ca.as_deref(),
            self.coordinator_cert.as_deref(),
            self.coordinator_key.as_deref(),
            self.coordinator_token_file.as_deref(),
        )
        .map_err(anyhow::Error::msg)
    }
}
