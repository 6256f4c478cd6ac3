//! `--config FILE`: a TOML file giving any flag of a subcommand, under the
//! flag's long name.
//!
//! The file is read against the subcommand's clap definition, not a struct
//! of its own, so every flag is covered as soon as it exists: a key is a
//! flag's long name (`retry-max-attempts`, or `retry_max_attempts`), and a
//! table joins its name to its keys with `-` (`[retry] initial = "100ms"`
//! is `--retry-initial`). Values go through the flag's own parser.
//!
//! Precedence: a flag on the command line, then its `TANDEM_*` environment
//! variable, then the file, then the built-in default. The file's values
//! are added to the command line for the flags set by neither, and the
//! whole line parsed again: one parser, one set of checks.
//!
//! [`Layered::render`] prints the configuration in force as TOML, with
//! where each value came from and secrets redacted.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

use tandem_coordinator::redact::{SecretKind, Secrets};

mod toml_file;

use toml_file::{FileValue, Scalar, key_lines, read_file};

/// Flags that make no sense inside the file itself.
const NOT_IN_FILE: &[&str] = &["help", "version", "config", "print-config"];

/// A configuration file that cannot be used; the message names the file,
/// the key and its line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigFileError(pub String);

/// The parsed command line with the file's values in.
pub struct Layered {
    /// The matches of the whole command line (file values included).
    pub matches: ArgMatches,
    /// The command, built (global flags propagated).
    command: Command,
    /// The subcommand the file was for.
    sub: String,
    /// Ids of the arguments whose value came from the file.
    from_file: BTreeSet<String>,
    /// The file, if one was given.
    path: Option<PathBuf>,
}

/// Parses `argv` with `command`. When subcommand `sub` was given `--config
/// FILE`, the file's values fill every flag of `sub` that neither the
/// command line nor the environment set. Help, version and command-line
/// errors exit the process, as clap does.
///
/// # Errors
///
/// The file cannot be read or parsed, names an unknown key (the message
/// names it, its line, and the nearest flag), or has a value the flag's
/// parser refuses.
pub fn parse_layered(
    mut command: Command,
    argv: Vec<OsString>,
    sub: &str,
) -> Result<Layered, ConfigFileError> {
    command.build();
    let first = command.clone().get_matches_from(argv.clone());
    let mut layered = Layered {
        matches: first,
        command,
        sub: sub.to_string(),
        from_file: BTreeSet::new(),
        path: None,
    };
    let Some(sub_m) = layered.matches.subcommand_matches(sub) else {
        return Ok(layered);
    };
    let Some(path) = sub_m.get_one::<PathBuf>("config").cloned() else {
        return Ok(layered);
    };
    let sub_cmd = layered
        .command
        .find_subcommand(sub)
        .ok_or_else(|| ConfigFileError(format!("no subcommand {sub}")))?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ConfigFileError(format!("cannot read {}: {e}", path.display())))?;
    let name = path.display().to_string();
    let values = read_file(&text, &name)?;
    let mut extra = Vec::new();
    let mut by_long = BTreeMap::new();
    for v in values {
        let arg = find_arg(sub_cmd, &v.key).ok_or_else(|| unknown_key(&name, &v, sub_cmd))?;
        let id = arg.get_id().to_string();
        let long = arg.get_long().unwrap_or(&id).to_string();
        if let Some(first) = by_long.insert(long.clone(), v.line) {
            return Err(ConfigFileError(format!(
                "{name}: {long:?} is given twice (lines {first} and {})",
                v.line
            )));
        }
        if matches!(
            sub_m.value_source(&id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let bad = |why: &str| {
            ConfigFileError(format!("{name}: key {:?} (line {}): {why}", v.key, v.line))
        };
        match (arg.get_action(), v.value) {
            (ArgAction::SetTrue, Scalar::Bool(true)) => extra.push(format!("--{long}")),
            (ArgAction::SetTrue, Scalar::Bool(false)) => {}
            (ArgAction::SetTrue, _) => return Err(bad("expected true or false")),
            (ArgAction::Append, Scalar::Many(items)) => {
                extra.extend(items.iter().map(|i| format!("--{long}={i}")));
            }
            (ArgAction::Append | ArgAction::Set, Scalar::One(s)) => {
                extra.push(format!("--{long}={s}"));
            }
            (ArgAction::Set, Scalar::Bool(b)) => extra.push(format!("--{long}={b}")),
            (ArgAction::Set, Scalar::Many(_)) => {
                return Err(bad("takes one value, not a list"));
            }
            (_, _) => return Err(bad("this kind of value is not accepted here")),
        }
        layered.from_file.insert(id);
    }
    let mut argv2 = argv;
    argv2.extend(extra.into_iter().map(OsString::from));
    layered.matches = layered
        .command
        .clone()
        .try_get_matches_from(argv2)
        .map_err(|e| clap_error(&name, &text, sub_cmd, &e))?;
    layered.path = Some(path);
    Ok(layered)
}

/// Finds the flag a key names: its long name, with `_` for `-`.
fn find_arg<'a>(cmd: &'a Command, key: &str) -> Option<&'a Arg> {
    let key = key.replace('_', "-");
    if NOT_IN_FILE.contains(&key.as_str()) {
        return None;
    }
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(key.as_str()))
}

fn unknown_key(file: &str, v: &FileValue, cmd: &Command) -> ConfigFileError {
    let key = v.key.replace('_', "-");
    let nearest = cmd
        .get_arguments()
        .filter_map(Arg::get_long)
        .filter(|l| !NOT_IN_FILE.contains(l))
        .map(|l| (edit_distance(&key, l), l))
        .min();
    let hint = match nearest {
        Some((d, l)) if d <= 3.max(key.len() / 4) => format!("; did you mean {l:?}?"),
        _ => String::new(),
    };
    let why = if NOT_IN_FILE.contains(&key.as_str()) {
        " (only on the command line)"
    } else {
        ""
    };
    ConfigFileError(format!(
        "unknown key {:?} in {file} (line {}){why}{hint}",
        v.key, v.line
    ))
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A second-parse error, pointed at the file's key when it names a flag.
fn clap_error(file: &str, text: &str, cmd: &Command, e: &clap::Error) -> ConfigFileError {
    let rendered = e.render().to_string();
    let first = rendered
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string();
    let long = e
        .get(clap::error::ContextKind::InvalidArg)
        .map(|v| v.to_string())
        .and_then(|s| {
            s.trim_start_matches("--")
                .split([' ', '='])
                .next()
                .map(str::to_string)
        });
    let key = long.and_then(|l| {
        let spans = key_lines(text).ok()?;
        spans
            .into_iter()
            .find(|(k, _)| find_arg(cmd, k).and_then(Arg::get_long) == Some(l.as_str()))
    });
    match key {
        Some((k, line)) => ConfigFileError(format!("{file}: key {k:?} (line {line}): {first}")),
        None => ConfigFileError(format!("{file}: {first}")),
    }
}

impl Layered {
    /// The file given with `--config`, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The secrets of the whole command line, file values included (see
    /// [`Secrets::of_command_line`]): what no output may show.
    pub fn secrets(&self) -> Secrets {
        Secrets::of_command_line(&self.command, &self.matches)
    }

    /// The configuration in force for the subcommand, as TOML: every flag
    /// under its long name, with where its value came from (`default`,
    /// `file`, `env NAME`, `flag`); unset ones commented out. Secrets are
    /// redacted: passwords in connection strings and URLs, and the value
    /// of any flag named like a token, secret or password (files holding
    /// them are paths and shown).
    pub fn render(&self) -> String {
        let mut out = format!(
            "# tandem {}: the configuration in force ({})\n",
            self.sub,
            match &self.path {
                Some(p) => format!("file {}", p.display()),
                None => "no --config file".into(),
            }
        );
        let (Some(cmd), Some(m)) = (
            self.command.find_subcommand(&self.sub),
            self.matches.subcommand_matches(&self.sub),
        ) else {
            return out;
        };
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if NOT_IN_FILE.contains(&long) {
                continue;
            }
            let id = arg.get_id().as_str();
            let source = if self.from_file.contains(id) {
                "file".to_string()
            } else {
                match m.value_source(id) {
                    Some(ValueSource::CommandLine) => "flag".into(),
                    Some(ValueSource::EnvVariable) => format!(
                        "env {}",
                        arg.get_env()
                            .map(|e| e.to_string_lossy())
                            .unwrap_or_default()
                    ),
                    Some(ValueSource::DefaultValue) => "default".into(),
                    _ => "unset".into(),
                }
            };
            let kind = SecretKind::of_flag(long);
            let raw: Vec<String> = m
                .get_raw(id)
                .map(|vs| vs.map(|v| v.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            let shown = |s: &str| toml_value(&kind.redact(s));
            let value = match arg.get_action() {
                ArgAction::SetTrue => Some(m.get_flag(id).to_string()),
                ArgAction::Append if !raw.is_empty() || source != "unset" => Some(format!(
                    "[{}]",
                    raw.iter().map(|s| shown(s)).collect::<Vec<_>>().join(", ")
                )),
                _ => raw.first().map(|s| shown(s)),
            };
            match value {
                Some(v) => out.push_str(&format!("{long} = {v}  # {source}\n")),
                None => out.push_str(&format!("# {long} =  # unset\n")),
            }
        }
        out
    }
}

/// A number as a TOML number, anything else as a TOML string.
fn toml_value(s: &str) -> String {
    if !s.is_empty() && s.parse::<i64>().is_ok() && !s.starts_with(['+', '0']) || s == "0" {
        return s.to_string();
    }
    // A decimal fraction (a ratio): digits, one point, digits.
    if let Some((int, frac)) = s.split_once('.')
        && !int.is_empty()
        && !frac.is_empty()
        && int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return s.to_string();
    }
    toml::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests;
