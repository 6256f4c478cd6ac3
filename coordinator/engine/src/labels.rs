//! Caller labels: a few `key=value` pairs a business service attaches to a
//! transaction at Begin or Submit (an order id, a tenant), kept with the
//! record so an operator can find it later (`tandem tx list --label`, the
//! console). Bounded in number and size, since they are stored with every
//! version of the record and echoed back.

use std::collections::HashMap;

/// Most labels on one transaction.
pub const MAX_LABELS: usize = 8;
/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 64;
/// Longest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 256;

/// One caller label.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    /// Letters, digits, `_`, `-`, `.`, `/`; starts with a letter.
    pub key: String,
    /// Printable text.
    pub value: String,
}

/// Why a set of labels was refused; the message names the key at fault
/// (cut to [`MAX_KEY_BYTES`], so a hostile key is not echoed whole).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LabelError(pub String);

/// Checks labels from the wire and returns them sorted by key.
///
/// # Errors
///
/// [`LabelError`] naming the first bad key (too many labels, a bad key, a
/// value too long or not printable).
pub fn from_wire(map: HashMap<String, String>) -> Result<Vec<Label>, LabelError> {
    if map.len() > MAX_LABELS {
        return Err(LabelError(format!(
            "{} labels; at most {MAX_LABELS}",
            map.len()
        )));
    }
    let mut labels: Vec<Label> = map
        .into_iter()
        .map(|(key, value)| Label { key, value })
        .collect();
    labels.sort();
    for l in &labels {
        check_key(&l.key)?;
        if l.value.len() > MAX_VALUE_BYTES {
            return Err(LabelError(format!(
                "label {:?}: value of {} bytes; at most {MAX_VALUE_BYTES}",
                l.key,
                l.value.len()
            )));
        }
        if !printable(&l.value) {
            return Err(LabelError(format!(
                "label {:?}: the value holds control or invisible formatting characters",
                l.key
            )));
        }
    }
    Ok(labels)
}

/// Whether `text` holds no control character and no invisible formatting
/// one: shown in a terminal or the console, it reads as what it is.
pub fn printable(text: &str) -> bool {
    !text.chars().any(|c| c.is_control() || invisible(c))
}

/// Zero-width and direction-changing characters: they would make a value
/// shown in the console or the CLI read as something it is not.
pub fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}'
        | '\u{061C}'
        | '\u{180E}'
        | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{2069}'
        | '\u{FEFF}')
}

/// Checks one key (also used for filters).
///
/// # Errors
///
/// [`LabelError`] naming the key, cut to [`MAX_KEY_BYTES`].
pub fn check_key(key: &str) -> Result<(), LabelError> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY_BYTES
        && key.starts_with(|c: char| c.is_ascii_alphabetic())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'));
    if ok {
        return Ok(());
    }
    let shown: String = key.chars().take(MAX_KEY_BYTES).collect();
    Err(LabelError(format!(
        "label key {shown:?}: 1 to {MAX_KEY_BYTES} letters, digits, '_', '-', '.' or '/', \
         starting with a letter"
    )))
}

/// Whether `labels` carries every one of `wanted`.
pub fn has_all(labels: &[Label], wanted: &[Label]) -> bool {
    wanted.iter().all(|w| labels.contains(w))
}

/// The labels as a wire map.
pub fn to_wire(labels: &[Label]) -> HashMap<String, String> {
    labels
        .iter()
        .map(|l| (l.key.clone(), l.value.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn good_labels_come_back_sorted() {
        let l = from_wire(map(&[("tenant", "acme"), ("order_id", "42")])).unwrap();
        assert_eq!(l[0].key, "order_id");
        assert_eq!(l[1].key, "tenant");
    }

    #[test]
    fn bad_labels_are_refused_naming_the_key() {
        let many: Vec<(String, String)> = (0..9).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(from_wire(many.into_iter().collect()).is_err());
        let e = from_wire(map(&[("9lives", "x")])).unwrap_err();
        assert!(e.0.contains("9lives"), "{e}");
        let e = from_wire(map(&[("order id", "x")])).unwrap_err();
        assert!(e.0.contains("order id"), "{e}");
        let long = "v".repeat(MAX_VALUE_BYTES + 1);
        let e = from_wire(map(&[("order", &long)])).unwrap_err();
        assert!(e.0.contains("order"), "{e}");
        let e = from_wire(map(&[("order", "a\nb")])).unwrap_err();
        assert!(e.0.contains("control"), "{e}");
        let e = from_wire(map(&[("order", "paid\u{202E}dnufer")])).unwrap_err();
        assert!(e.0.contains("invisible"), "{e}");
        assert!(from_wire(map(&[("order", "zero\u{200B}width")])).is_err());
        assert!(from_wire(map(&[("city", "Zürich – 東京")])).is_ok());
        let key = "k".repeat(10_000);
        let e = from_wire(map(&[(&key, "v")])).unwrap_err();
        assert!(e.0.len() < 300, "a hostile key is not echoed whole");
        assert!(from_wire(map(&[("", "v")])).is_err());
    }

    #[test]
    fn filters_need_every_label() {
        let l = from_wire(map(&[("a", "1"), ("b", "2")])).unwrap();
        assert!(has_all(&l, &from_wire(map(&[("a", "1")])).unwrap()));
        assert!(!has_all(&l, &from_wire(map(&[("a", "2")])).unwrap()));
        assert!(has_all(&l, &[]));
    }
}
