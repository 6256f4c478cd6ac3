//! Security at every hop, with real TLS handshakes and certificates made
//! here: who may call the coordinator, who a participant obeys, which
//! endpoints the coordinator dials, and certificates replaced while
//! transactions are in flight.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tandem_cli::certs::{DevCa, party_names, write_dev};
use tandem_coordinator::RunningCoordinator;
use tandem_coordinator::log::MemLog;
use tandem_coordinator::runtime::Environment;
use tandem_coordinator::security::{
    AccessControl, ParticipantAccess, ServeSecurityArgs, ServerSecurity,
};
use tandem_proto::v1 as pb;
use tandem_proto::v1::participant_client::ParticipantClient;
use tandem_sdk::security::{AccessList, BearerToken, ClientTls, ServerTls, ServerTlsFiles};
use tandem_sdk::{Branch, ClientOptions, Error, Mode, ParticipantServer, TransactionClient};
use tandem_tests::{Scripted, spawn, test_config};

/// Development files (CA, certificates, tokens, access lists) in a temp dir.
struct Dev {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Dev {
    fn new() -> Dev {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("certs");
        write_dev(&path).expect("dev certs");
        Dev { _dir: dir, path }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn token(&self, party: &str) -> String {
        std::fs::read_to_string(self.file(&format!("{party}.token")))
            .expect("token")
            .trim()
            .to_string()
    }

    fn server_files(&self, party: &str, require_client_cert: bool) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.file(&format!("{party}.pem")),
            key: self.file(&format!("{party}-key.pem")),
            client_ca: Some(self.file("ca.pem")),
            require_client_cert,
        }
    }

    /// Client TLS of `party` (mutual TLS), or CA only.
    fn client_tls(&self, party: Option<&str>) -> ClientTls {
        ClientTls {
            ca: Some(self.file("ca.pem")),
            cert: party.map(|p| self.file(&format!("{p}.pem"))),
            key: party.map(|p| self.file(&format!("{p}-key.pem"))),
            domain: None,
        }
    }

    fn options(&self, cert_of: Option<&str>, token_of: Option<&str>) -> ClientOptions {
        ClientOptions {
            tls: Some(self.client_tls(cert_of)),
            token: token_of
                .map(|p| BearerToken::new(&self.token(p)).expect("token"))
                .unwrap_or_default(),
        }
    }

    /// How the coordinator calls participants: its certificate and token.
    fn participant_access(&self) -> ParticipantAccess {
        ParticipantAccess {
            tls: Some(self.client_tls(Some("coordinator"))),
            token: BearerToken::new(&self.token("coordinator")).expect("token"),
            token_file: None,
        }
    }

    fn coordinator_security(&self, require_client_cert: bool) -> ServerSecurity {
        ServerSecurity {
            tls: Some(
                ServerTls::load(self.server_files("coordinator", require_client_cert))
                    .expect("tls"),
            ),
            access: Some(
                AccessControl::load(&self.file("coordinator-access.txt")).expect("access"),
            ),
        }
    }

    /// A participant serving TLS that obeys only the coordinator.
    async fn participant(
        &self,
        scripted: &Arc<Scripted>,
        tcc: bool,
    ) -> tandem_sdk::RunningParticipant {
        let server = ParticipantServer::new()
            .tls(ServerTls::load(self.server_files("participant", false)).expect("tls"))
            .only_coordinators(
                AccessList::load(&self.file("participant-access.txt")).expect("access"),
            );
        let server = if tcc {
            server.tcc("r", scripted.clone())
        } else {
            server.two_phase("r", scripted.clone())
        };
        spawn(server).await
    }

    async fn coordinator(&self, require_client_cert: bool) -> RunningCoordinator {
        let env = Environment {
            participants: self.participant_access(),
            ..Environment::default()
        };
        RunningCoordinator::start_with(
            secure_config(),
            Arc::new(MemLog::new()),
            env,
            self.coordinator_security(require_client_cert),
        )
        .await
        .expect("start coordinator")
    }
}

/// [`test_config`] calling only TLS participants on loopback: the
/// allowlist a coordinator holding a participant token needs.
fn secure_config() -> tandem_coordinator::config::CoordinatorConfig {
    let mut config = test_config();
    config.allowed_endpoints = vec!["https://127.0.0.1:*".parse().expect("pattern")];
    config
}

fn code(e: &Error) -> Option<tonic::Code> {
    match e {
        Error::Rpc(s) => Some(s.code()),
        Error::Invalid { code, .. } => Some(*code),
        _ => None,
    }
}

mod allowlists;
mod tls;
mod tokens;
