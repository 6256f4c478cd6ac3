//! Development certificates and tokens (`tandem certs dev`): a private CA,
//! a certificate for each party (coordinator, participant, client, admin),
//! bearer tokens, and access files granting them their roles — everything
//! needed to run with mutual TLS and tokens in one step. For development
//! and tests only: the CA's private key is never written (only `ca.pem`,
//! its certificate), so nothing more can be signed by it; the
//! `README.txt` written beside the files says so.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tandem_common::security::auth::{new_token, token_digest_hex};
use time::OffsetDateTime;

/// The parties `tandem certs dev` makes certificates and tokens for.
pub const PARTIES: [&str; 4] = ["coordinator", "participant", "client", "admin"];

/// A development certificate authority.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl DevCa {
    /// A new CA named `name`.
    ///
    /// # Errors
    ///
    /// Key generation or signing failed.
    pub fn new(name: &str) -> Result<DevCa, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(5 * 365 * 86400);
        Ok(DevCa {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
        })
    }

    /// The CA certificate (the bundle peers trust).
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses), usable as
    /// server and client certificate, valid from `not_before` to
    /// `not_after`.
    ///
    /// # Errors
    ///
    /// Key generation or signing failed.
    pub fn issue_between(
        &self,
        names: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, rcgen::Error> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("tandem"),
        );
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// As [`issue_between`](Self::issue_between), valid for a year from an
    /// hour ago.
    ///
    /// # Errors
    ///
    /// Key generation or signing failed.
    pub fn issue(&self, names: &[&str]) -> Result<Issued, rcgen::Error> {
        let now = OffsetDateTime::now_utc();
        self.issue_between(
            names,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(365 * 86400),
        )
    }
}

/// The names in a party's development certificate: `<party>.tandem.local`
/// (the name access files grant roles to), and for the ones that listen,
/// localhost and the loopback addresses.
pub fn party_names(party: &str) -> Vec<String> {
    let mut names = vec![format!("{party}.tandem.local")];
    if party == "coordinator" || party == "participant" {
        names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
    }
    names
}

/// What [`write_dev`] wrote.
#[derive(Debug)]
pub struct DevFiles {
    /// The directory.
    pub dir: PathBuf,
}

impl DevFiles {
    /// `<dir>/<name>`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Writes a new file at `path` (owner-only when `secret`): whatever was
/// there is removed first, so an existing file's looser mode or a planted
/// link is never written through.
fn write(path: &Path, text: &str, secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)?;
    file.write_all(text.as_bytes())
}

/// Writes into `dir` (created if needed): `ca.pem`; for each of
/// [`PARTIES`] `<party>.pem`, `<party>-key.pem` and `<party>.token`;
/// `coordinator-access.txt` (client, participant and admin roles, by
/// certificate name and by token) for `tandem serve --auth-file`;
/// `participant-access.txt` (the coordinator role) for participants.
///
/// # Errors
///
/// The directory cannot be written or key generation failed.
pub fn write_dev(dir: &Path) -> anyhow::Result<DevFiles> {
    std::fs::create_dir_all(dir)?;
    let ca = DevCa::new("Tandem development CA (NOT FOR PRODUCTION)")?;
    write(&dir.join("ca.pem"), &ca.pem(), false)?;
    let mut tokens = Vec::new();
    for party in PARTIES {
        let names = party_names(party);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let issued = ca.issue(&names)?;
        write(&dir.join(format!("{party}.pem")), &issued.cert_pem, false)?;
        write(&dir.join(format!("{party}-key.pem")), &issued.key_pem, true)?;
        let token = new_token();
        write(
            &dir.join(format!("{party}.token")),
            &format!("{token}\n"),
            true,
        )?;
        tokens.push((party, token));
    }
    let token_of = |p: &str| {
        tokens
            .iter()
            .find(|(q, _)| *q == p)
            .map(|(_, t)| token_digest_hex(t))
            .unwrap_or_default()
    };
    let mut access = String::from(
        "# Development access list for `tandem serve --auth-file` (tandem certs dev).\n\
         # role        name          credential\n",
    );
    for (role, party) in [
        ("client", "client"),
        ("participant", "participant"),
        ("admin", "admin"),
    ] {
        access.push_str(&format!(
            "{role:<13} {party:<13} cert:{party}.tandem.local\n{role:<13} {party:<13} token-sha256:{}\n",
            token_of(party)
        ));
    }
    write(&dir.join("coordinator-access.txt"), &access, false)?;
    let participant_access = format!(
        "# Who a participant obeys (ParticipantServer::only_coordinators).\n\
         coordinator   coordinator   cert:coordinator.tandem.local\n\
         coordinator   coordinator   token-sha256:{}\n",
        token_of("coordinator")
    );
    write(
        &dir.join("participant-access.txt"),
        &participant_access,
        false,
    )?;
    write(
        &dir.join("README.txt"),
        "DEVELOPMENT CERTIFICATES AND TOKENS: never use them in production.\n\
         Made by `tandem certs dev`. The CA's key is not kept; make new files\n\
         with the same command when they expire (in a year).\n",
        false,
    )?;
    Ok(DevFiles {
        dir: dir.to_path_buf(),
    })
}
