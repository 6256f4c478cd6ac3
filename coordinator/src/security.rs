//! The coordinator's security settings: TLS for its listener, the access
//! list of callers, and how it reaches participants (TLS, client
//! certificate, token). Command-line flags for `tandem serve` and for the
//! clients (`tandem tx`, `tandem bench`), and reloading without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use clap::Args;
use tandem_common::security::ClientOptions;
use tandem_common::security::{AccessList, BearerToken, ClientTls, ServerTls, ServerTlsFiles};

use crate::config::EndpointPattern;
use crate::service::SharedAccess;

/// How often changed certificate and access files are picked up (SIGHUP
/// reloads at once).
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// `tandem serve`'s security flags.
#[derive(Args, Clone, Debug, Default)]
pub struct ServeSecurityArgs {
    /// Serve TLS with this certificate chain (PEM).
    #[arg(long, env = "TANDEM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TANDEM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Verify client certificates against this CA bundle (their names can
    /// then be granted roles in --auth-file).
    #[arg(long, env = "TANDEM_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Refuse clients without a certificate from --tls-client-ca (mutual TLS).
    #[arg(long, env = "TANDEM_REQUIRE_CLIENT_CERT", requires = "tls_client_ca")]
    pub require_client_cert: bool,
    /// Grants of roles (client, participant, admin) to tokens and
    /// certificate names, one `role name credential` per line. Without it
    /// authentication is off (local development only).
    #[arg(long, env = "TANDEM_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// Participant endpoints a branch may name: scheme://host:port, with
    /// `*` or `*.domain` hosts and `*` ports; repeat or comma-separate.
    /// Without it any endpoint may be named.
    #[arg(long, env = "TANDEM_ALLOW_PARTICIPANTS", value_delimiter = ',')]
    pub allow_participant: Vec<EndpointPattern>,
    /// Serve only TLS and call only https:// participant endpoints.
    #[arg(long, env = "TANDEM_REQUIRE_TLS")]
    pub require_tls: bool,
    /// CA bundle that participants' certificates are verified against
    /// (default: the system's roots).
    #[arg(long, env = "TANDEM_PARTICIPANT_CA")]
    pub participant_ca: Option<PathBuf>,
    /// Client certificate the coordinator presents to participants.
    #[arg(long, env = "TANDEM_PARTICIPANT_CERT", requires = "participant_key")]
    pub participant_cert: Option<PathBuf>,
    /// The private key of --participant-cert.
    #[arg(long, env = "TANDEM_PARTICIPANT_KEY", requires = "participant_cert")]
    pub participant_key: Option<PathBuf>,
    /// File holding the bearer token sent to participants.
    #[arg(long, env = "TANDEM_PARTICIPANT_TOKEN_FILE")]
    pub participant_token_file: Option<PathBuf>,
}

/// Flags of a client of the coordinator (`tandem tx`, `tandem bench`).
#[derive(Args, Clone, Debug, Default)]
pub struct ClientSecurityArgs {
    /// CA bundle the coordinator's certificate is verified against (for
    /// an https:// address; default: the system's roots).
    #[arg(long, global = true, env = "TANDEM_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (mutual TLS).
    #[arg(long, global = true, env = "TANDEM_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert.
    #[arg(long, global = true, env = "TANDEM_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// File holding the bearer token to send.
    #[arg(long, global = true, env = "TANDEM_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl ClientSecurityArgs {
    /// Whether any of the flags was given.
    pub fn given(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.token_file.is_some()
    }

    /// The SDK's client options.
    ///
    /// # Errors
    ///
    /// The token file cannot be read.
    pub fn options(&self) -> Result<ClientOptions, String> {
        ClientOptions::from_files(
            self.ca.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
            self.token_file.as_deref(),
        )
    }
}

/// How the coordinator calls participants.
#[derive(Clone, Debug, Default)]
pub struct ParticipantAccess {
    /// TLS for https:// endpoints.
    pub tls: Option<ClientTls>,
    /// Bearer token sent with every call.
    pub token: BearerToken,
    /// Where the token came from (re-read on reload).
    pub token_file: Option<PathBuf>,
}

impl ParticipantAccess {
    /// Re-reads the token file, if any.
    ///
    /// # Errors
    ///
    /// The file cannot be read.
    pub fn reread_token(&mut self) -> Result<(), String> {
        if let Some(p) = &self.token_file {
            self.token = BearerToken::from_file(p)?;
        }
        Ok(())
    }
}

/// The access list and the file it came from.
#[derive(Clone)]
pub struct AccessControl {
    path: PathBuf,
    list: SharedAccess,
    stamp: Arc<RwLock<Option<SystemTime>>>,
}

impl AccessControl {
    /// Reads the access file.
    ///
    /// # Errors
    ///
    /// The file cannot be read or has a bad line.
    pub fn load(path: &Path) -> Result<AccessControl, String> {
        let list = read_access(path)?;
        Ok(AccessControl {
            path: path.to_path_buf(),
            list: Arc::new(RwLock::new(list)),
            stamp: Arc::new(RwLock::new(modified(path))),
        })
    }

    /// An access list built in code (tests).
    pub fn fixed(list: AccessList) -> AccessControl {
        AccessControl {
            path: PathBuf::new(),
            list: Arc::new(RwLock::new(list)),
            stamp: Arc::new(RwLock::new(None)),
        }
    }

    /// The list the auth layer reads.
    pub fn shared(&self) -> SharedAccess {
        self.list.clone()
    }

    fn reload(&self, force: bool) -> Result<bool, String> {
        if self.path.as_os_str().is_empty() {
            return Ok(false);
        }
        let now = modified(&self.path);
        if !force && *self.stamp.read().unwrap_or_else(|p| p.into_inner()) == now {
            return Ok(false);
        }
        let list = read_access(&self.path)?;
        *self.list.write().unwrap_or_else(|p| p.into_inner()) = list;
        *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = now;
        Ok(true)
    }
}

/// An access file that grants something (an empty one, perhaps caught
/// while being rewritten, would refuse every call).
fn read_access(path: &Path) -> Result<AccessList, String> {
    let list = AccessList::load(path)?;
    if list.is_empty() {
        return Err(format!(
            "access file {} grants nothing: every call would be refused",
            path.display()
        ));
    }
    Ok(list)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// TLS and authentication of the coordinator's listener.
#[derive(Clone, Default)]
pub struct ServerSecurity {
    /// TLS; `None` serves plaintext.
    pub tls: Option<ServerTls>,
    /// Roles of callers; `None`: authentication off.
    pub access: Option<AccessControl>,
}

impl ServerSecurity {
    /// Re-reads certificates and the access file: all of them when
    /// `force` (SIGHUP), else the ones whose files changed. Errors keep
    /// what is in use and are logged.
    pub fn reload(&self, force: bool) {
        if let Some(tls) = &self.tls {
            let r = if force {
                tls.reload().map(|()| true)
            } else {
                tls.reload_if_changed()
            };
            match r {
                Ok(true) => tracing::info!("TLS certificate reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate not reloaded; keeping the one in use")
                }
            }
        }
        if let Some(access) = &self.access {
            match access.reload(force) {
                Ok(true) => tracing::info!("access file reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "access file not reloaded; keeping the one in use")
                }
            }
        }
    }
}

impl ServeSecurityArgs {
    /// Reads and checks every file named; the listener's security and how
    /// participants are called.
    ///
    /// # Errors
    ///
    /// A file is missing, unreadable, expired or malformed, or the flags
    /// contradict each other.
    pub fn load(&self) -> Result<(ServerSecurity, ParticipantAccess), String> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(
                ServerTls::load(ServerTlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                    require_client_cert: self.require_client_cert,
                })
                .map_err(|e| e.to_string())?,
            ),
            _ => None,
        };
        if self.require_tls && tls.is_none() {
            return Err("--require-tls needs --tls-cert and --tls-key".into());
        }
        let access = self
            .auth_file
            .as_deref()
            .map(AccessControl::load)
            .transpose()?;
        let client_tls = ClientTls {
            ca: self.participant_ca.clone(),
            cert: self.participant_cert.clone(),
            key: self.participant_key.clone(),
            domain: None,
        };
        client_tls.config().map_err(|e| e.to_string())?;
        let mut participants = ParticipantAccess {
            tls: Some(client_tls),
            token: BearerToken::none(),
            token_file: self.participant_token_file.clone(),
        };
        participants.reread_token()?;
        Ok((ServerSecurity { tls, access }, participants))
    }
}
