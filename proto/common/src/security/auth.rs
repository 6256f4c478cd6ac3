//! Who is calling: credentials (a bearer token or the mutual-TLS
//! certificate's names) checked against an access list of roles.
//!
//! The access list is a text file, one grant per line:
//!
//! ```text
//! # role        name       credential
//! client        orders     token-sha256:5e88489...   # SHA-256 of the token, hex
//! participant   bank       cert:bank.tandem.local    # a DNS or URI name of the client certificate
//! admin         ops        token-sha256:9f86d08... expires=2027-03-31
//! ```
//!
//! A grant may end with `expires=YYYY-MM-DD` (UTC, the end of that day);
//! past it the credential is refused as unauthenticated.
//!
//! Tokens are kept only as SHA-256 digests and compared in constant time;
//! a token is never logged. A name may have several lines (several roles
//! or credentials).

use std::path::Path;
use std::sync::Arc;

use ring::digest::{SHA256, digest};
use rustls_pki_types::CertificateDer;
use subtle::ConstantTimeEq;

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Start and finish transactions (Begin, Enlist, Commit, Rollback,
    /// Submit, PrepareMessage, SubmitMessage, GetTransaction).
    Client,
    /// Ask a transaction's outcome (GetOutcome), for in-doubt resolution.
    Participant,
    /// The Admin service.
    Admin,
    /// Call a participant's Prepare/Commit/Rollback/Try/Confirm/Cancel/
    /// Deliver/Check (granted in a participant's access list).
    Coordinator,
}

impl Role {
    /// The role's name in an access file.
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Participant => "participant",
            Role::Admin => "admin",
            Role::Coordinator => "coordinator",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        [
            Role::Client,
            Role::Participant,
            Role::Admin,
            Role::Coordinator,
        ]
        .into_iter()
        .find(|r| r.name() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No credential, or one nobody was granted: `UNAUTHENTICATED`.
    #[error("{0}")]
    Unauthenticated(String),
    /// A known caller without the role: `PERMISSION_DENIED`.
    #[error("{0}")]
    PermissionDenied(String),
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> tonic::Status {
        match r {
            Refusal::Unauthenticated(m) => tonic::Status::unauthenticated(m),
            Refusal::PermissionDenied(m) => tonic::Status::permission_denied(m),
        }
    }
}

enum Credential {
    Token([u8; 32]),
    Cert(String),
}

struct Grant {
    role: Role,
    name: String,
    credential: Credential,
    /// Unix milliseconds after which the grant is void.
    expires_ms: Option<u64>,
}

/// Unix milliseconds at the end of the UTC day `YYYY-MM-DD`.
fn end_of_day_ms(date: &str) -> Option<u64> {
    let mut parts = date.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || !(1970..=9999).contains(&y) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from((days + 1) * 86_400_000).ok()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Roles granted to credentials; see the [module docs](self) for the file.
#[derive(Clone, Default)]
pub struct AccessList {
    grants: Arc<Vec<Grant>>,
}

impl std::fmt::Debug for AccessList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names and roles only: digests stay out of logs too.
        let mut list = f.debug_list();
        for g in self.grants.iter() {
            list.entry(&format_args!("{} {}", g.role, g.name));
        }
        list.finish()
    }
}

/// SHA-256 of `token`, as it is kept in an access list.
pub fn token_digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
    out
}

/// `token_digest` in hex, as written in an access file.
pub fn token_digest_hex(token: &str) -> String {
    token_digest(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random token (256 bits, hex, prefixed `tdm_`).
///
/// # Panics
///
/// Never in practice: only if the system's random source fails.
pub fn new_token() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 32];
    #[allow(clippy::expect_used)]
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random source failed");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("tdm_{hex}")
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl AccessList {
    /// Parses an access file's text.
    ///
    /// # Errors
    ///
    /// A line that is not `role name credential`, naming the line.
    pub fn parse(text: &str) -> Result<AccessList, String> {
        let mut grants = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: &str| format!("line {}: {why}", n + 1);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (role, name, credential, expires) = match fields[..] {
                [role, name, credential] => (role, name, credential, None),
                [role, name, credential, expires] => (role, name, credential, Some(expires)),
                _ => return Err(bad("expected `role name credential [expires=YYYY-MM-DD]`")),
            };
            let expires_ms = match expires {
                None => None,
                Some(e) => Some(
                    e.strip_prefix("expires=")
                        .and_then(end_of_day_ms)
                        .ok_or_else(|| bad("the fourth field must be expires=YYYY-MM-DD"))?,
                ),
            };
            let role = Role::parse(role)
                .ok_or_else(|| bad("the role must be client, participant, admin or coordinator"))?;
            let credential = if let Some(hex) = credential.strip_prefix("token-sha256:") {
                Credential::Token(parse_hex32(hex).ok_or_else(|| {
                    bad("token-sha256: needs 64 hex digits (`tandem auth hash` makes them)")
                })?)
            } else if let Some(cert) = credential.strip_prefix("cert:") {
                if cert.is_empty() {
                    return Err(bad("cert: needs a certificate name"));
                }
                Credential::Cert(cert.to_ascii_lowercase())
            } else {
                return Err(bad(
                    "the credential must be token-sha256:<hex> or cert:<name>",
                ));
            };
            grants.push(Grant {
                role,
                name: name.to_string(),
                credential,
                expires_ms,
            });
        }
        Ok(AccessList {
            grants: Arc::new(grants),
        })
    }

    /// Reads an access file.
    ///
    /// # Errors
    ///
    /// The file cannot be read or has a bad line.
    pub fn load(path: &Path) -> Result<AccessList, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read access file {}: {e}", path.display()))?;
        AccessList::parse(&text).map_err(|e| format!("access file {}: {e}", path.display()))
    }

    /// Grants `role` to the bearer of `token` (for building a list in code).
    pub fn with_token(self, role: Role, name: &str, token: &str) -> AccessList {
        self.with(Grant {
            role,
            name: name.into(),
            credential: Credential::Token(token_digest(token)),
            expires_ms: None,
        })
    }

    /// Grants `role` to a client certificate naming `cert_name` (a DNS or
    /// URI subject alternative name).
    pub fn with_cert(self, role: Role, name: &str, cert_name: &str) -> AccessList {
        self.with(Grant {
            role,
            name: name.into(),
            credential: Credential::Cert(cert_name.to_ascii_lowercase()),
            expires_ms: None,
        })
    }

    fn with(self, grant: Grant) -> AccessList {
        let mut grants: Vec<Grant> = Arc::try_unwrap(self.grants).unwrap_or_else(|a| {
            a.iter()
                .map(|g| Grant {
                    role: g.role,
                    name: g.name.clone(),
                    credential: match &g.credential {
                        Credential::Token(d) => Credential::Token(*d),
                        Credential::Cert(c) => Credential::Cert(c.clone()),
                    },
                    expires_ms: g.expires_ms,
                })
                .collect()
        });
        grants.push(grant);
        AccessList {
            grants: Arc::new(grants),
        }
    }

    /// How many grants it holds.
    pub fn len(&self) -> usize {
        self.grants.len()
    }

    /// Whether it grants nothing.
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    /// Checks that the caller — its `authorization` header value and its
    /// TLS client certificates — holds `role`. Returns the caller's name.
    ///
    /// # Errors
    ///
    /// [`Refusal::Unauthenticated`] for no credential or an unknown one,
    /// [`Refusal::PermissionDenied`] for a known caller without `role`.
    pub fn check(
        &self,
        authorization: Option<&[u8]>,
        peer_certs: Option<&[CertificateDer<'static>]>,
        role: Role,
    ) -> Result<String, Refusal> {
        let mut known: Option<&str> = None;
        let now = now_ms();
        let mut expired = false;
        if let Some(value) = authorization {
            let token = value
                .strip_prefix(b"Bearer ")
                .or_else(|| value.strip_prefix(b"bearer "))
                .ok_or_else(|| {
                    Refusal::Unauthenticated(
                        "the authorization header must be `Bearer <token>`".into(),
                    )
                })?;
            let mut d = [0u8; 32];
            d.copy_from_slice(digest(&SHA256, token).as_ref());
            let mut matched = false;
            for g in self.grants.iter() {
                if let Credential::Token(want) = &g.credential
                    && bool::from(want.ct_eq(&d))
                {
                    if g.expires_ms.is_some_and(|e| e <= now) {
                        expired = true;
                        continue;
                    }
                    matched = true;
                    known = Some(&g.name);
                    if g.role == role {
                        return Ok(g.name.clone());
                    }
                }
            }
            if !matched {
                return Err(Refusal::Unauthenticated(
                    if expired {
                        "the token expired"
                    } else {
                        "unknown token"
                    }
                    .into(),
                ));
            }
        }
        if let Some(leaf) = peer_certs.and_then(|c| c.first()) {
            let names = cert_names(leaf);
            for g in self.grants.iter() {
                if let Credential::Cert(want) = &g.credential
                    && names.iter().any(|n| n == want)
                    && g.expires_ms.is_none_or(|e| e > now)
                {
                    known = known.or(Some(&g.name));
                    if g.role == role {
                        return Ok(g.name.clone());
                    }
                }
            }
        }
        match known {
            Some(name) => Err(Refusal::PermissionDenied(format!(
                "{name} does not have the {role} role"
            ))),
            None if authorization.is_none() && peer_certs.is_none_or(|c| c.is_empty()) => {
                Err(Refusal::Unauthenticated(
                    "no credential: send `authorization: Bearer <token>` or a client certificate"
                        .into(),
                ))
            }
            None => Err(Refusal::Unauthenticated(
                "the client certificate is not in the access list".into(),
            )),
        }
    }
}

/// The DNS and URI subject alternative names of a certificate, lower case.
pub fn cert_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(s)
            | x509_parser::extensions::GeneralName::URI(s) => Some(s.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "tdm_secret";

    fn list() -> AccessList {
        AccessList::parse(&format!(
            "# comment\nclient orders token-sha256:{}\nadmin ops cert:Admin.tandem.local\n",
            token_digest_hex(TOKEN)
        ))
        .expect("parses")
    }

    // A token finds its grant; a wrong role is denied, an unknown token or
    // none at all is unauthenticated.
    #[test]
    fn tokens_are_checked_by_role() {
        let l = list();
        let bearer = format!("Bearer {TOKEN}");
        assert_eq!(
            l.check(Some(bearer.as_bytes()), None, Role::Client),
            Ok("orders".into())
        );
        assert!(matches!(
            l.check(Some(bearer.as_bytes()), None, Role::Admin),
            Err(Refusal::PermissionDenied(_))
        ));
        assert!(matches!(
            l.check(Some(b"Bearer nope"), None, Role::Client),
            Err(Refusal::Unauthenticated(_))
        ));
        assert!(matches!(
            l.check(Some(TOKEN.as_bytes()), None, Role::Client),
            Err(Refusal::Unauthenticated(_))
        ));
        assert!(matches!(
            l.check(None, None, Role::Client),
            Err(Refusal::Unauthenticated(_))
        ));
    }

    // An expired grant is refused as unauthenticated; dates parse exactly.
    #[test]
    fn expired_tokens_are_refused() {
        let l = AccessList::parse(&format!(
            "client old token-sha256:{} expires=2020-01-31",
            token_digest_hex(TOKEN)
        ))
        .expect("parses");
        let bearer = format!("Bearer {TOKEN}");
        assert_eq!(
            l.check(Some(bearer.as_bytes()), None, Role::Client),
            Err(Refusal::Unauthenticated("the token expired".into()))
        );
        assert_eq!(end_of_day_ms("1970-01-01"), Some(86_400_000));
        assert_eq!(end_of_day_ms("2024-03-01"), Some(1_709_337_600_000));
        assert!(end_of_day_ms("2024-13-01").is_none());
        assert!(AccessList::parse("client x cert:a expires=soon").is_err());
    }

    // Bad lines are refused with their number; digests never print.
    #[test]
    fn bad_lines_are_named() {
        assert!(
            AccessList::parse("client x")
                .unwrap_err()
                .starts_with("line 1")
        );
        assert!(
            AccessList::parse("\nroot x cert:a")
                .unwrap_err()
                .starts_with("line 2")
        );
        assert!(AccessList::parse("client x token-sha256:abc").is_err());
        assert!(!format!("{:?}", list()).contains(&token_digest_hex(TOKEN)));
    }
}
