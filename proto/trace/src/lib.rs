//! W3C trace context (<https://www.w3.org/TR/trace-context/>): the
//! `traceparent` and `tracestate` headers that let one transaction be
//! followed from the business service, through the coordinator, into every
//! participant handler.
//!
//! The business client sends them on its calls (see the SDK's
//! `TransactionClient::with_traceparent`); the coordinator keeps the
//! context of the call that started a transaction in its record and sends
//! it, as the child of its own span, with every participant call, phase 2
//! after a restart included; the SDK opens each handler's span as the child
//! of that and hands it to the handler in `BranchContext::traceparent`.
//!
//! Parsing is strict (version `00`, lower-case hex, ids not all zero) and a
//! header that does not parse is ignored, never an error: tracing must not
//! fail a transaction. When the application installed an OpenTelemetry
//! layer (`tracing-opentelemetry`), spans are real OpenTelemetry children;
//! without one, nothing here allocates beyond formatting one header.
//!
//! The types are plain data, so the coordinator's engine keeps them in its
//! records without a transport; cargo feature `grpc` adds reading and
//! writing them in gRPC metadata (tonic), `otel` the OpenTelemetry spans.
//! The participant SDK re-exports this crate as `tandem_sdk::trace`.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;

#[cfg(feature = "otel")]
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
#[cfg(feature = "grpc")]
use tonic::metadata::{MetadataMap, MetadataValue};
#[cfg(feature = "otel")]
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The metadata key of the trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// The metadata key of vendor trace state.
pub const TRACESTATE: &str = "tracestate";
/// Longest `tracestate` carried; a longer one is dropped (the W3C limit is
/// 32 members; this bounds what a caller can make the coordinator store).
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// A parsed `traceparent`: which trace a call belongs to and which span
/// made it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace: the same in every span of one transaction.
    pub trace_id: [u8; 16],
    /// The span of the caller (the parent of the callee's span).
    pub parent_id: [u8; 8],
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

impl TraceParent {
    /// The "sampled" flag.
    pub const SAMPLED: u8 = 0x01;

    /// Parses a `traceparent` header: `00-<32 hex>-<16 hex>-<2 hex>`, lower
    /// case, neither id all zeros. `None` for anything else.
    pub fn parse(header: &str) -> Option<TraceParent> {
        let b = header.as_bytes();
        if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        let mut flags = [0u8; 1];
        hex_into(&b[3..35], &mut trace_id)?;
        hex_into(&b[36..52], &mut parent_id)?;
        hex_into(&b[53..55], &mut flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags: flags[0],
        })
    }

    /// A new trace (random ids, sampled): for a caller with no trace of
    /// its own that wants one.
    pub fn new_root() -> TraceParent {
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&random_nonzero().to_be_bytes());
        trace_id[8..].copy_from_slice(&random_nonzero().to_be_bytes());
        TraceParent {
            trace_id,
            parent_id: random_nonzero().to_be_bytes(),
            flags: Self::SAMPLED,
        }
    }

    /// The same trace with a new random span id as the parent: what a hop
    /// that records no span of its own sends on.
    pub fn child(&self) -> TraceParent {
        self.with_parent(random_nonzero().to_be_bytes())
    }

    /// The same trace and flags, with `parent_id` as the parent.
    pub fn with_parent(&self, parent_id: [u8; 8]) -> TraceParent {
        TraceParent { parent_id, ..*self }
    }

    /// Whether the caller samples this trace.
    pub fn sampled(&self) -> bool {
        self.flags & Self::SAMPLED != 0
    }

    /// The trace id as 32 lower-case hex digits (formatted lazily: no
    /// allocation when a log line does not use it).
    pub fn trace_id_hex(&self) -> impl fmt::Display + '_ {
        Hex(&self.trace_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{}",
            Hex(&self.trace_id),
            Hex(&self.parent_id),
            Hex(&[self.flags])
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

impl FromStr for TraceParent {
    type Err = InvalidTraceParent;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TraceParent::parse(s).ok_or(InvalidTraceParent)
    }
}

/// A string that is not a valid W3C `traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>, lower case, ids not all zero)")]
pub struct InvalidTraceParent;

/// A trace parent with the caller's `tracestate`, if any: what travels on
/// a call and what the coordinator keeps for a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace and the caller's span.
    pub parent: TraceParent,
    /// Vendor trace state, passed on unchanged; at most
    /// [`MAX_TRACESTATE_BYTES`] of printable ASCII, else `None`.
    pub state: Option<String>,
}

impl From<TraceParent> for TraceContext {
    fn from(parent: TraceParent) -> Self {
        TraceContext {
            parent,
            state: None,
        }
    }
}

impl TraceContext {
    /// The context in these header values; `None` when `traceparent` is
    /// missing or invalid. An unusable `tracestate` is dropped alone.
    pub fn from_headers(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        let parent = TraceParent::parse(traceparent)?;
        Some(TraceContext {
            parent,
            state: tracestate.and_then(usable_state).map(str::to_string),
        })
    }

    /// The context a gRPC call carries, if it carries a valid one.
    #[cfg(feature = "grpc")]
    pub fn from_metadata(metadata: &MetadataMap) -> Option<TraceContext> {
        let parent = metadata.get(TRACEPARENT)?.to_str().ok()?;
        let state = metadata.get(TRACESTATE).and_then(|v| v.to_str().ok());
        TraceContext::from_headers(parent, state)
    }

    /// Writes this context into a call's metadata (replacing any there).
    #[cfg(feature = "grpc")]
    pub fn inject(&self, metadata: &mut MetadataMap) {
        if let Ok(v) = MetadataValue::try_from(self.parent.to_string()) {
            metadata.insert(TRACEPARENT, v);
        }
        if let Some(v) = self
            .state
            .as_deref()
            .and_then(|s| MetadataValue::try_from(s).ok())
        {
            metadata.insert(TRACESTATE, v);
        }
    }

    /// The OpenTelemetry context of `span`, when an OpenTelemetry layer
    /// records it; `None` otherwise (no layer, or the span is disabled).
    #[cfg(feature = "otel")]
    pub fn of_span(span: &tracing::Span) -> Option<TraceContext> {
        let cx = span.context();
        let otel = cx.span();
        let sc = otel.span_context();
        if !sc.is_valid() {
            return None;
        }
        let state = sc.trace_state().header();
        Some(TraceContext {
            parent: TraceParent {
                trace_id: sc.trace_id().to_bytes(),
                parent_id: sc.span_id().to_bytes(),
                flags: sc.trace_flags().to_u8(),
            },
            state: usable_state(&state).map(str::to_string),
        })
    }

    /// What to send on a call made inside `span`: this trace, with
    /// `span`'s OpenTelemetry id as the parent when a layer records it,
    /// else a fresh span id.
    #[cfg(feature = "otel")]
    pub fn child_in(&self, span: &tracing::Span) -> TraceContext {
        let parent = match TraceContext::of_span(span) {
            Some(own) if own.parent.trace_id == self.parent.trace_id => {
                self.parent.with_parent(own.parent.parent_id)
            }
            _ => self.parent.child(),
        };
        TraceContext {
            parent,
            state: self.state.clone(),
        }
    }

    /// Makes `span` a child of this context in OpenTelemetry (a remote
    /// parent). Does nothing without an OpenTelemetry layer, and for a span
    /// already entered.
    #[cfg(feature = "otel")]
    pub fn adopt(&self, span: &tracing::Span) {
        let state = self
            .state
            .as_deref()
            .and_then(|s| TraceState::from_str(s).ok())
            .unwrap_or_default();
        let sc = SpanContext::new(
            TraceId::from_bytes(self.parent.trace_id),
            SpanId::from_bytes(self.parent.parent_id),
            TraceFlags::new(self.parent.flags),
            true,
            state,
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc);
        // A disabled span or no layer: nothing to parent, nothing to do.
        let _ = span.set_parent(cx);
    }
}

/// `state` when it is short and printable enough to carry.
fn usable_state(state: &str) -> Option<&str> {
    let ok = !state.is_empty()
        && state.len() <= MAX_TRACESTATE_BYTES
        && state.bytes().all(|c| (0x20..=0x7e).contains(&c));
    ok.then_some(state)
}

/// Decodes lower-case hex `src` into `out` (twice as long).
fn hex_into(src: &[u8], out: &mut [u8]) -> Option<()> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    for (i, pair) in src.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(())
}

struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A random non-zero u64 from a per-thread generator (SplitMix64, seeded
/// from the system's randomness once per thread, through the standard
/// library's `RandomState`): span ids need to be unique, not secret, and
/// this costs no system call per id.
fn random_nonzero() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    fn seed() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        // Randomly keyed per thread (from the system) and per call; the
        // clock in the hash keeps two seeds apart even so.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        h.write_u128(t);
        h.finish()
    }
    STATE.with(|s| {
        loop {
            let mut z = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            s.set(z);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            if z != 0 {
                return z;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    // Rule: a valid header parses and formats back to itself.
    #[test]
    fn a_valid_traceparent_round_trips() {
        let tp = TraceParent::parse(GOOD).expect("valid");
        assert_eq!(tp.to_string(), GOOD);
        assert!(tp.sampled());
        assert_eq!(
            tp.trace_id_hex().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    // Rule: anything but version 00, lower-case hex and non-zero ids is
    // refused (and so ignored by every reader).
    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "garbage",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    // Rule: a child keeps the trace and flags and gets a new parent id.
    #[test]
    fn a_child_keeps_the_trace() {
        let tp = TraceParent::parse(GOOD).expect("valid");
        let c = tp.child();
        assert_eq!(c.trace_id, tp.trace_id);
        assert_eq!(c.flags, tp.flags);
        assert_ne!(c.parent_id, tp.parent_id);
        assert_ne!(c.parent_id, [0; 8]);
        let root = TraceParent::new_root();
        assert_ne!(root.trace_id, [0; 16]);
        assert_ne!(root.trace_id, TraceParent::new_root().trace_id);
    }

    // Rule: tracestate travels when short and printable, and is dropped
    // alone otherwise; metadata round-trips.
    #[cfg(feature = "grpc")]
    #[test]
    fn tracestate_is_bounded_and_metadata_round_trips() {
        let long = "a=".to_string() + &"b".repeat(MAX_TRACESTATE_BYTES);
        assert_eq!(
            TraceContext::from_headers(GOOD, Some(&long)).map(|c| c.state),
            Some(None)
        );
        let cx = TraceContext::from_headers(GOOD, Some("vendor=x")).expect("valid");
        let mut md = MetadataMap::new();
        cx.inject(&mut md);
        assert_eq!(TraceContext::from_metadata(&md), Some(cx));
        let mut bad = MetadataMap::new();
        bad.insert(TRACEPARENT, MetadataValue::from_static("00-zz"));
        assert_eq!(TraceContext::from_metadata(&bad), None);
    }

    // Rule: without an OpenTelemetry layer a call's parent is a fresh id
    // in the same trace.
    #[cfg(feature = "otel")]
    #[test]
    fn without_a_layer_the_child_gets_a_fresh_id() {
        let cx = TraceContext::from(TraceParent::parse(GOOD).expect("valid"));
        let out = cx.child_in(&tracing::Span::current());
        assert_eq!(out.parent.trace_id, cx.parent.trace_id);
        assert_ne!(out.parent.parent_id, cx.parent.parent_id);
    }
}
