//! `tandem tx submit`: run one transaction from the command line, through
//! the SDK's `TransactionClient` as any business service would (with the
//! same `--ca`, `--cert`, `--key` and `--token-file` as the other `tandem
//! tx` verbs), and say how it ended.

use std::time::Duration;

use tandem_coordinator::cli::Output;
use tandem_sdk::{Branch, ClientOptions, Error, Gtid, Mode, TransactionClient};

/// One branch given as `ENDPOINT/RESOURCE/PAYLOAD`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchSpec {
    /// The participant's URL (`http://host:port` or `https://host:port`).
    pub endpoint: String,
    /// The resource at that participant.
    pub resource: String,
    /// The payload, as given (UTF-8; may itself contain `/`; may be empty).
    pub payload: String,
}

/// Parses `http(s)://host:port/resource/payload`: the endpoint ends at the
/// first `/` after the scheme, the resource at the next one, the rest is
/// the payload (`…/resource` alone means an empty payload).
///
/// # Errors
///
/// A message saying what is missing.
pub fn parse_branch(s: &str) -> Result<BranchSpec, String> {
    let bad = |what: &str| {
        format!(
            "branch {s:?}: {what}; give ENDPOINT/RESOURCE/PAYLOAD, such as http://127.0.0.1:9001/accounts/alice:-100"
        )
    };
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| bad("no http:// or https:// endpoint"))?;
    if scheme != "http" && scheme != "https" {
        return Err(bad("the endpoint's scheme must be http or https"));
    }
    let (authority, rest) = rest
        .split_once('/')
        .ok_or_else(|| bad("no resource after the endpoint"))?;
    if authority.is_empty() {
        return Err(bad("the endpoint has no host"));
    }
    let (resource, payload) = rest.split_once('/').unwrap_or((rest, ""));
    if resource.is_empty() {
        return Err(bad("the resource is empty"));
    }
    Ok(BranchSpec {
        endpoint: format!("{scheme}://{authority}"),
        resource: resource.to_string(),
        payload: payload.to_string(),
    })
}

/// How a submitted transaction ended.
#[derive(Debug)]
pub enum Outcome {
    /// Committed (`complete` is false while some branch still has to
    /// acknowledge: the coordinator keeps retrying it).
    Committed {
        /// The transaction.
        gtid: Gtid,
        /// Every branch acknowledged.
        complete: bool,
    },
    /// Aborted, with why.
    Aborted {
        /// The transaction, when the coordinator named it.
        gtid: Option<Gtid>,
        /// Why, for people.
        reason: String,
    },
}

impl Outcome {
    /// Whether it committed.
    pub fn committed(&self) -> bool {
        matches!(self, Outcome::Committed { .. })
    }

    /// The text to print: one line, or a JSON document.
    pub fn render(&self, output: Output) -> String {
        let gtid_text = |g: &Option<Gtid>| g.map(|g| g.to_string()).unwrap_or_default();
        match (self, output) {
            (Outcome::Committed { gtid, complete }, Output::Json) => serde_json::json!({
                "gtid": gtid.to_string(),
                "outcome": "committed",
                "complete": complete,
            })
            .to_string(),
            (Outcome::Aborted { gtid, reason }, Output::Json) => serde_json::json!({
                "gtid": gtid_text(gtid),
                "outcome": "aborted",
                "reason": reason,
            })
            .to_string(),
            (Outcome::Committed { gtid, complete }, Output::Table) => {
                let pending = if *complete {
                    ""
                } else {
                    " (a branch has not acknowledged yet; the coordinator keeps retrying it)"
                };
                format!("{gtid} committed{pending}")
            }
            (Outcome::Aborted { gtid, reason }, Output::Table) => {
                format!("{} aborted: {reason}", gtid_text(gtid))
            }
        }
    }
}

/// Submits one transaction of `branches` to `coordinator` (as `gtid` when
/// given: a repeat returns the first submission's outcome).
///
/// # Errors
///
/// The coordinator could not be reached, refused the request, or did not
/// answer (the outcome is then unknown: the message says which gtid to
/// ask about).
pub async fn submit(
    coordinator: &str,
    options: &ClientOptions,
    mode: Mode,
    branches: &[BranchSpec],
    gtid: Option<Gtid>,
    timeout: Option<Duration>,
) -> anyhow::Result<Outcome> {
    anyhow::ensure!(!branches.is_empty(), "give at least one --branch");
    let client = TransactionClient::connect_with(coordinator.to_string(), options).await?;
    let branches: Vec<Branch> = branches
        .iter()
        .map(|b| {
            Branch::new(
                b.endpoint.as_str(),
                b.resource.as_str(),
                b.payload.clone().into_bytes(),
            )
        })
        .collect();
    let result = match gtid {
        Some(g) => client.submit_as(g, mode, branches, timeout).await,
        None => client.submit_with_timeout(mode, branches, timeout).await,
    };
    match result {
        Ok(done) => Ok(Outcome::Committed {
            gtid: done.gtid,
            complete: done.complete,
        }),
        Err(Error::Aborted { gtid, reason, .. }) => Ok(Outcome::Aborted { gtid, reason }),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branches_parse_endpoint_resource_and_payload() {
        let b = parse_branch("https://127.0.0.1:9001/accounts/alice:-100").expect("parses");
        assert_eq!(b.endpoint, "https://127.0.0.1:9001");
        assert_eq!(b.resource, "accounts");
        assert_eq!(b.payload, "alice:-100");
        let b = parse_branch("http://h:1/r/a/b").expect("a payload may hold /");
        assert_eq!((b.resource.as_str(), b.payload.as_str()), ("r", "a/b"));
        let b = parse_branch("http://h:1/r").expect("no payload");
        assert_eq!(b.payload, "");
        for bad in [
            "h:1/r/p",
            "ftp://h/r/p",
            "http://h:1",
            "http:///r/p",
            "http://h:1//p",
        ] {
            assert!(parse_branch(bad).is_err(), "{bad} accepted");
        }
    }
}
