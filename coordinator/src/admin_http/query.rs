//! Query strings (`a=1&b=x%20y&a=2`) decoded into bounded pairs: a few
//! lines instead of a form-decoding dependency, and repeated keys kept
//! (`state=STUCK&state=ACTIVE`).

/// Longest query string read; longer ones are refused.
pub(super) const MAX_QUERY_BYTES: usize = 4096;
/// Most pairs read.
const MAX_PAIRS: usize = 64;

/// The decoded pairs of `query`, in order.
///
/// # Errors
///
/// Too long, too many pairs, or a value that is not UTF-8 once decoded.
pub(super) fn pairs(query: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let Some(q) = query.filter(|q| !q.is_empty()) else {
        return Ok(Vec::new());
    };
    if q.len() > MAX_QUERY_BYTES {
        return Err(format!(
            "the query string is {} bytes; at most {MAX_QUERY_BYTES}",
            q.len()
        ));
    }
    let mut out = Vec::new();
    for part in q.split('&').filter(|p| !p.is_empty()) {
        if out.len() == MAX_PAIRS {
            return Err(format!("more than {MAX_PAIRS} query parameters"));
        }
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        out.push((decode(k)?, decode(v)?));
    }
    Ok(out)
}

/// `+` is a space, `%XX` a byte; a bad escape is kept as written.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "a query value is not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_decode_and_repeat_and_refuse_garbage() {
        let got = pairs(Some("state=STUCK&state=ACTIVE&gtid=01%2D9&x=a+b&empty")).expect("decodes");
        assert_eq!(
            got,
            vec![
                ("state".into(), "STUCK".into()),
                ("state".into(), "ACTIVE".into()),
                ("gtid".into(), "01-9".into()),
                ("x".into(), "a b".into()),
                ("empty".into(), String::new()),
            ]
        );
        assert_eq!(
            pairs(Some("a=%zz&b=%4")).expect("kept"),
            vec![("a".into(), "%zz".into()), ("b".into(), "%4".into())]
        );
        assert!(pairs(Some("a=%ff")).is_err());
        assert!(pairs(Some(&"a".repeat(MAX_QUERY_BYTES + 1))).is_err());
        assert!(pairs(Some(&"a=1&".repeat(MAX_PAIRS + 1))).is_err());
        assert!(pairs(None).expect("none").is_empty());
    }
}
