//! Reading the TOML file: every value with its joined key (tables joined
//! with `-`) and its line, as the flags' text.

use toml::de::{DeTable, DeValue};

use super::ConfigFileError;

/// One value read from the file.
pub(super) struct FileValue {
    pub(super) key: String,
    pub(super) line: usize,
    pub(super) value: Scalar,
}

pub(super) enum Scalar {
    One(String),
    Bool(bool),
    Many(Vec<String>),
}

/// Every key of the file (tables joined with `-`) and its line.
pub(super) fn key_lines(text: &str) -> Result<Vec<(String, usize)>, toml::de::Error> {
    let table = DeTable::parse(text)?;
    let mut out = Vec::new();
    flatten(text, "", table.get_ref(), &mut |key, line, _| {
        out.push((key, line));
        Ok(())
    })
    .ok();
    Ok(out)
}

pub(super) fn read_file(text: &str, name: &str) -> Result<Vec<FileValue>, ConfigFileError> {
    let table = DeTable::parse(text).map_err(|e| ConfigFileError(format!("{name}: {e}")))?;
    let mut out = Vec::new();
    flatten(text, "", table.get_ref(), &mut |key, line, value| {
        let scalar = match value {
            DeValue::Boolean(b) => Scalar::Bool(*b),
            DeValue::Array(items) => Scalar::Many(
                items
                    .iter()
                    .map(|i| scalar_text(i.get_ref()))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("a list of strings or numbers")?,
            ),
            v => Scalar::One(scalar_text(v).ok_or("a string, number, boolean or list")?),
        };
        out.push(FileValue {
            key,
            line,
            value: scalar,
        });
        Ok(())
    })
    .map_err(|(key, line, why)| {
        ConfigFileError(format!("{name}: key {key:?} (line {line}): expected {why}"))
    })?;
    Ok(out)
}

type Visit<'a> = dyn FnMut(String, usize, &DeValue<'_>) -> Result<(), &'static str> + 'a;

/// Walks the tables, calling `visit` for every non-table value with its
/// joined key and line.
pub(super) fn flatten(
    text: &str,
    prefix: &str,
    table: &DeTable<'_>,
    visit: &mut Visit<'_>,
) -> Result<(), (String, usize, &'static str)> {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{prefix}-{}", k.get_ref())
        };
        let line = text[..k.span().start.min(text.len())].matches('\n').count() + 1;
        match v.get_ref() {
            DeValue::Table(t) => flatten(text, &key, t, visit)?,
            value => visit(key.clone(), line, value).map_err(|why| (key, line, why))?,
        }
    }
    Ok(())
}

pub(super) fn scalar_text(v: &DeValue<'_>) -> Option<String> {
    match v {
        DeValue::String(s) => Some(s.to_string()),
        DeValue::Integer(i) => {
            let digits = i.as_str().replace('_', "");
            let digits = digits
                .trim_start_matches("0x")
                .trim_start_matches("0o")
                .trim_start_matches("0b");
            i64::from_str_radix(digits, i.radix())
                .ok()
                .map(|n| n.to_string())
        }
        DeValue::Float(f) => Some(f.as_str().to_string()),
        DeValue::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}
