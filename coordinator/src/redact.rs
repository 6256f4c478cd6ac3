//! Keeping secrets out of what `tandem` prints.
//!
//! - [`redact`] and [`redact_url`] hide the secret parts of a connection
//!   string or URL that is shown on purpose (`--print-config`, a log line
//!   naming the collector).
//! - [`Secrets`] holds every secret the command line gave: passwords in
//!   URLs and connection strings, webhook paths and queries (a Slack-style
//!   hook's path is its credential), token values and the contents of
//!   token files. [`Secrets::scrub`] hides them in any text: every log
//!   line goes through it ([`ScrubbedStderr`]), at every level and from
//!   every library, and so does the error a command exits with. So an
//!   error that quotes its URL (a gRPC transport's, a PostgreSQL driver's)
//!   prints no password either.

use std::borrow::Cow;
use std::io::Write;
use std::ops::Range;
use std::sync::Arc;

use clap::{ArgMatches, Command};

/// How a flag's value holds its secrets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    /// The whole value: a flag named like a token, secret or password.
    Whole,
    /// A webhook URL: its credentials, path and query.
    Webhook,
    /// A connection string or URL: its password (`user:pass@`,
    /// `password=…` and the like).
    Connection,
}

impl SecretKind {
    /// The kind of the value of flag `--long`.
    pub fn of_flag(long: &str) -> SecretKind {
        let named_secret = ["token", "secret", "password"]
            .iter()
            .any(|w| long.contains(w));
        if named_secret && !long.ends_with("-file") {
            SecretKind::Whole
        } else if long.contains("webhook") {
            SecretKind::Webhook
        } else {
            SecretKind::Connection
        }
    }

    /// `s` with its secrets hidden.
    pub fn redact(self, s: &str) -> String {
        match self {
            SecretKind::Whole => "***".into(),
            SecretKind::Webhook => redact_url(s),
            SecretKind::Connection => redact(s),
        }
    }

    /// Where the secrets of `s` are.
    fn spans(self, s: &str) -> Vec<Range<usize>> {
        match self {
            SecretKind::Whole => std::iter::once(0..s.len()).collect(),
            SecretKind::Webhook => url_spans(s),
            SecretKind::Connection => connection_spans(s),
        }
    }
}

/// Hides passwords in a connection string or URL: `user:pass@` becomes
/// `user:***@`, and `password=…` (also `token=`, `secret=`) becomes
/// `password=***`, in key=value and in query-string form.
pub fn redact(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut at = 0;
    for span in connection_spans(s) {
        out.push_str(&s[at..span.start]);
        out.push_str("***");
        at = span.end;
    }
    out.push_str(&s[at..]);
    out
}

/// A URL whose path and query may themselves be the secret (a Slack or
/// PagerDuty webhook): only `scheme://host:port` is shown.
pub fn redact_url(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return "***".to_string();
    };
    let rest = &s[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let hidden = if authority_end < rest.len() || host.len() < authority.len() {
        "/***"
    } else {
        ""
    };
    format!("{}://{host}{hidden}", &s[..scheme_end])
}

/// The secret parts of a webhook URL: its credentials (`user:pass`) and
/// everything after the authority. Not a URL: all of it.
fn url_spans(s: &str) -> Vec<Range<usize>> {
    let Some(scheme_end) = s.find("://") else {
        return std::iter::once(0..s.len()).collect();
    };
    let start = scheme_end + 3;
    let rest = &s[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let mut spans = Vec::new();
    if let Some(at) = rest[..authority_end].rfind('@') {
        spans.push(start..start + at);
    }
    if authority_end < rest.len() {
        spans.push(start + authority_end..s.len());
    }
    spans
}

/// The secret parts of a connection string or URL, in order, not
/// overlapping.
fn connection_spans(s: &str) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    // user:pass@ in a URL. The PostgreSQL driver takes credentials up to
    // the first `@` anywhere, so a password may hold `/`, `?` or `#`.
    if let Some(scheme_end) = s.find("://") {
        let rest = &s[scheme_end + 3..];
        if let Some(at) = rest.find('@')
            && let Some(colon) = rest[..at].find(':')
            && !rest[..colon].contains(['/', '?', '#'])
        {
            spans.push(scheme_end + 3 + colon + 1..scheme_end + 3 + at);
        }
    }
    // key=value pairs: a query string's (`&`-separated) and a libpq
    // connection string's (whitespace-separated, spaces around `=`
    // allowed, values quoted or backslash-escaped).
    let password = spans.first().cloned();
    let mut from = 0;
    while let Some((key_start, value_at)) = next_secret(&s[from..]) {
        // A `key=` inside the URL's password is part of that secret.
        if let Some(p) = &password
            && p.contains(&(from + key_start))
        {
            from = p.end;
            continue;
        }
        let rest = &s[from..];
        // What separates the whole key (`api_key`, `x-api-key`) from what
        // precedes it tells a query string from a connection string.
        let word_start = rest.as_bytes()[..key_start]
            .iter()
            .rposition(|c| !(c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.')))
            .map_or(0, |p| p + 1);
        let before = word_start.checked_sub(1).map(|i| rest.as_bytes()[i]);
        let value = &rest[value_at..];
        let end = value_at + value_end(value, before);
        spans.push(from + value_at..from + end);
        from += end;
    }
    // Overlaps become one span.
    spans.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(spans.len());
    for span in spans {
        match merged.last_mut() {
            Some(last) if span.start <= last.end => last.end = last.end.max(span.end),
            _ => merged.push(span),
        }
    }
    merged
}

/// Where a secret value ends, by what came before its key.
fn value_end(value: &str, before_key: Option<u8>) -> usize {
    match before_key {
        Some(b'?' | b'&') => return value.find(['&', '#']).unwrap_or(value.len()),
        Some(b';') => return value.find(';').unwrap_or(value.len()),
        _ => {}
    }
    // A connection string's value: '…' with \-escapes, or up to
    // whitespace with \-escapes. Every return is at an ASCII byte or the
    // end, so on a character boundary.
    let b = value.as_bytes();
    let quoted = b.first() == Some(&b'\'');
    let mut k = usize::from(quoted);
    while k < b.len() {
        match b[k] {
            b'\\' => k += 2,
            b'\'' if quoted => return k + 1,
            c if !quoted && c.is_ascii_whitespace() => return k,
            _ => k += 1,
        }
    }
    b.len()
}

/// Keys whose values are secrets, in connection strings and query strings.
const SECRET_KEYS: [&str; 10] = [
    "password",
    "sslpassword",
    "token",
    "secret",
    "key",
    "apikey",
    "sig",
    "signature",
    "auth",
    "credential",
];

/// The first secret key in `s` followed by `=`: (where the key starts,
/// where its value starts).
fn next_secret(s: &str) -> Option<(usize, usize)> {
    let lower = s.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let mut best: Option<(usize, usize)> = None;
    for key in SECRET_KEYS {
        let mut from = 0;
        while let Some(found) = lower[from..].find(key) {
            let i = from + found;
            from = i + key.len();
            let starts_word = i == 0
                || bytes[i - 1].is_ascii_whitespace()
                || matches!(bytes[i - 1], b'&' | b'?' | b';' | b'_' | b'-' | b'.');
            let mut j = i + key.len();
            while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                j += 1;
            }
            if !starts_word || bytes.get(j) != Some(&b'=') {
                continue;
            }
            let mut v = j + 1;
            while v < bytes.len() && bytes[v].is_ascii_whitespace() {
                v += 1;
            }
            if best.is_none_or(|(start, _)| i < start) {
                best = Some((i, v));
            }
            break;
        }
    }
    best
}

/// The secrets a process was given, to hide wherever they would be
/// printed. Cheap to scrub with when empty.
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    /// Longest first, so that a secret holding another is hidden whole.
    values: Vec<String>,
}

impl Secrets {
    /// The secrets in `value`, a value of the given kind.
    pub fn add(&mut self, kind: SecretKind, value: &str) {
        for span in kind.spans(value) {
            self.add_value(&value[span]);
        }
    }

    /// `secret`, as given and in the forms a log line may show it in: with
    /// `"` and `\` escaped (JSON lines, `{:?}`) and percent-decoded (a URL's
    /// password as a driver reads it).
    pub fn add_value(&mut self, secret: &str) {
        let secret = secret.trim();
        // A webhook's bare "/" hides nothing.
        if secret.trim_matches(['/', '?', '#']).is_empty() {
            return;
        }
        for plain in [secret.to_string(), percent_decoded(secret)] {
            let escaped = format!("{plain:?}");
            let escaped = escaped[1..escaped.len() - 1].to_string();
            for form in [plain, escaped] {
                if !self.values.contains(&form) {
                    self.values.push(form);
                }
            }
        }
        self.values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    }

    /// The secrets in the values of every flag `matches` holds for `command`
    /// and its subcommands, each by [`SecretKind::of_flag`]; and the
    /// contents of token, secret and password files.
    pub fn of_command_line(command: &Command, matches: &ArgMatches) -> Secrets {
        let mut secrets = Secrets::default();
        secrets.collect(command, matches);
        secrets
    }

    fn collect(&mut self, command: &Command, matches: &ArgMatches) {
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let id = arg.get_id().as_str();
            let Ok(Some(raw)) = matches.try_get_raw(id) else {
                continue;
            };
            let kind = SecretKind::of_flag(long);
            let secret_file = long.ends_with("-file")
                && ["token", "secret", "password"]
                    .iter()
                    .any(|w| long.contains(w));
            for value in raw {
                let value = value.to_string_lossy();
                self.add(kind, &value);
                // What the file holds may end up in an error message (a
                // token that is not valid header text); unreadable now,
                // it is reported by whoever reads it.
                if secret_file && let Ok(text) = std::fs::read_to_string(value.as_ref()) {
                    self.add_value(&text);
                }
            }
        }
        if let Some((name, sub)) = matches.subcommand()
            && let Some(sub_command) = command.find_subcommand(name)
        {
            self.collect(sub_command, sub);
        }
    }

    /// No secret known.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// `text` with every known secret replaced by `***`.
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for secret in &self.values {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), "***"));
            }
        }
        out
    }
}

/// `%XX` sequences decoded; `s` itself when there are none or the result
/// is not UTF-8.
fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(Some(h)), Some(Some(l))) =
                (b.get(i + 1).map(|c| hex(*c)), b.get(i + 2).map(|c| hex(*c)))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

/// Standard error with every known secret scrubbed: the writer of the log
/// subscriber. Each log line reaches it in one write, so a secret is never
/// split between two.
#[derive(Clone, Debug)]
pub struct ScrubbedStderr(pub Arc<Secrets>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ScrubbedStderr {
    type Writer = Scrubbing<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Scrubbing(&self.0)
    }
}

/// One log line's writer (see [`ScrubbedStderr`]).
pub struct Scrubbing<'a>(&'a Secrets);

impl Write for Scrubbing<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if self.0.is_empty() {
            err.write_all(buf)?;
        } else {
            let text = String::from_utf8_lossy(buf);
            err.write_all(self.0.scrub(&text).as_bytes())?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests;
