//! TLS to PostgreSQL, set in the connection string as libpq users expect:
//! `sslmode`, `sslrootcert`, `sslcert`, `sslkey`.
//!
//! | `sslmode` | TLS | server certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` (default) | when the server offers it | verified |
//! | `require`, `verify-ca`, `verify-full` | always (refused otherwise) | verified |
//!
//! Every TLS connection verifies the server's certificate and host name,
//! against `sslrootcert` or the system's roots: unlike libpq, `prefer` and
//! `require` never accept an unverified server (a man in the middle would
//! see every query). `sslcert` and `sslkey` present a client certificate.

use std::path::PathBuf;

use tokio_postgres::config::SslMode;

use super::PgError;
use crate::security::ClientTls;

/// The keys handled here; tokio-postgres would refuse the last three.
const KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// A connection string's TLS settings, taken out of it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct TlsSettings {
    pub(super) mode: Option<String>,
    pub(super) root_cert: Option<PathBuf>,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
}

impl TlsSettings {
    /// tokio-postgres's mode for `sslmode`.
    pub(super) fn ssl_mode(&self) -> Result<SslMode, PgError> {
        Ok(match self.mode.as_deref() {
            Some("disable") => SslMode::Disable,
            None | Some("allow" | "prefer") => SslMode::Prefer,
            Some("require" | "verify-ca" | "verify-full") => SslMode::Require,
            Some(other) => {
                return Err(PgError(format!(
                    "bad connection string: sslmode {other:?} is not one of disable, allow, \
                     prefer, require, verify-ca, verify-full"
                )));
            }
        })
    }

    /// The rustls connector, `None` when TLS is off.
    pub(super) fn connector(
        &self,
    ) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, PgError> {
        if self.ssl_mode()? == SslMode::Disable {
            return Ok(None);
        }
        let tls = ClientTls {
            ca: self.root_cert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            domain: None,
        };
        let config = tls
            .rustls_config()
            .map_err(|e| PgError(format!("TLS settings of the connection string: {e}")))?;
        Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
    }

    fn set(&mut self, key: &str, value: String) {
        match key {
            "sslmode" => self.mode = Some(value),
            "sslrootcert" => self.root_cert = Some(value.into()),
            "sslcert" => self.cert = Some(value.into()),
            _ => self.key = Some(value.into()),
        }
    }
}

/// Splits `url` into the string tokio-postgres parses and the TLS settings.
/// Both forms are understood: `postgres://…?sslmode=require&…` and
/// `host=… sslmode=require …`.
pub(super) fn split(url: &str) -> Result<(String, TlsSettings), PgError> {
    let mut settings = TlsSettings::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), settings));
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if KEYS.contains(&key) {
                settings.set(key, percent_decode(value)?);
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, settings));
    }
    let mut kept = String::new();
    let mut rest = url;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let (key, value, raw, tail) = key_value(rest)?;
        if KEYS.contains(&key) {
            settings.set(key, value);
        } else {
            if !kept.is_empty() {
                kept.push(' ');
            }
            kept.push_str(raw);
        }
        rest = tail;
    }
    Ok((kept, settings))
}

/// One `key = value` of a key/value connection string: the key, the
/// unquoted value, the raw text and what follows.
fn key_value(s: &str) -> Result<(&str, String, &str, &str), PgError> {
    let bad = |why: &str| PgError(format!("bad connection string: {why}"));
    let eq = s.find('=').ok_or_else(|| bad("a setting without `=`"))?;
    let key = s[..eq].trim();
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(bad("a setting without a key"));
    }
    let after = &s[eq + 1..];
    let value_start = after.len() - after.trim_start().len();
    let body = &after[value_start..];
    let mut value = String::new();
    let consumed = if let Some(quoted) = body.strip_prefix('\'') {
        let mut chars = quoted.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, next)) = chars.next() {
                        value.push(next);
                    }
                }
                '\'' => {
                    end = Some(i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        1 + end.ok_or_else(|| bad("an unterminated quoted value"))?
    } else {
        let end = body.find(char::is_whitespace).unwrap_or(body.len());
        value.push_str(&body[..end]);
        end
    };
    let total = eq + 1 + value_start + consumed;
    Ok((key, value, &s[..total], &s[total..]))
}

fn percent_decode(s: &str) -> Result<String, PgError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| PgError("bad connection string: a bad %-escape".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PgError("bad connection string: not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_form_settings_are_taken_out() {
        let (rest, s) = split(
            "postgres://app@db:5432/bank?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .expect("split");
        assert_eq!(rest, "postgres://app@db:5432/bank?application_name=x");
        assert_eq!(s.mode.as_deref(), Some("verify-full"));
        assert_eq!(s.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(s.ssl_mode().expect("mode"), SslMode::Require);
    }

    #[test]
    fn key_value_form_settings_are_taken_out() {
        let (rest, s) = split(
            "host=db  port=5432 sslmode = require sslcert='/a b/c.pem' sslkey=/k.pem user=app",
        )
        .expect("split");
        assert_eq!(rest, "host=db port=5432 user=app");
        assert_eq!(s.cert, Some(PathBuf::from("/a b/c.pem")));
        assert_eq!(s.key, Some(PathBuf::from("/k.pem")));
        assert_eq!(s.ssl_mode().expect("mode"), SslMode::Require);
    }

    #[test]
    fn without_settings_the_string_is_unchanged_and_tls_is_preferred() {
        let (rest, s) = split("host=db user=app").expect("split");
        assert_eq!(rest, "host=db user=app");
        assert_eq!(s, TlsSettings::default());
        assert_eq!(s.ssl_mode().expect("mode"), SslMode::Prefer);
        let (rest, _) = split("postgres://db/x").expect("split");
        assert_eq!(rest, "postgres://db/x");
    }

    #[test]
    fn bad_settings_are_refused() {
        let (_, s) = split("host=db sslmode=sometimes").expect("split");
        assert!(s.ssl_mode().is_err());
        assert!(split("host=db sslrootcert='open").is_err());
        assert!(split("postgres://db/x?sslrootcert=%zz").is_err());
        let (_, s) = split("host=db sslmode=disable").expect("split");
        assert!(s.connector().expect("no TLS").is_none());
        let (_, s) = split("host=db sslmode=require sslrootcert=/nonexistent.pem").expect("split");
        assert!(s.connector().is_err());
    }
}
