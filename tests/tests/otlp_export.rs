//! OTLP export from a real `tandem serve --otlp-endpoint` to a real
//! OTLP/gRPC collector (a tonic server of the OpenTelemetry protocol's own
//! types): the coordinator's spans arrive in the trace the client sent,
//! participant calls as children; `--otlp-sample-ratio 0` exports nothing.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use tandem_sdk::trace::TraceParent;
use tandem_sdk::{Branch, Mode, TransactionClient};
use tandem_tests::Scripted;
use tandem_tests::process::Serve;

/// Every span received, with the `service.name` it came from.
#[derive(Clone, Default)]
struct Collected(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collected {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut all = self.0.lock().expect("spans");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    all.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A collector on 127.0.0.1:0: its endpoint and what it received.
async fn collector() -> (String, Collected) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let collected = Collected::default();
    let service = TraceServiceServer::new(collected.clone());
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (endpoint, collected)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `n` two-branch transactions, each with a trace of its own, through
/// a coordinator exporting with `ratio`; stops it (which flushes the
/// exporter) and returns the trace ids sent and the spans received.
async fn run(ratio: &str, n: usize) -> (Vec<(String, String)>, Vec<(String, Span)>) {
    let (endpoint, collected) = collector().await;
    let dir = tempfile::tempdir().expect("dir");
    let serve = Serve::start_with(
        &dir.path().join("data"),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-sample-ratio",
            ratio,
            "--service-name",
            "coord-under-test",
        ],
        &[],
    );
    let (a, b) = (Scripted::yes("a"), Scripted::yes("b"));
    let (pa, pb) = (a.serve().await, b.serve().await);
    let client = TransactionClient::connect(serve.url.clone())
        .await
        .expect("connect");
    let mut sent = Vec::new();
    for _ in 0..n {
        let trace = TraceParent::new_root();
        sent.push((hex(&trace.trace_id), hex(&trace.parent_id)));
        let done = client
            .with_traceparent(trace)
            .submit(
                Mode::TwoPhase,
                vec![
                    Branch::new(pa.url(), "r", "x"),
                    Branch::new(pb.url(), "r", "y"),
                ],
            )
            .await
            .expect("submit");
        assert!(done.complete);
    }
    let status = tokio::task::spawn_blocking(move || serve.terminate())
        .await
        .expect("stop");
    assert!(status.success(), "{status:?}");
    let spans = collected.0.lock().expect("spans").clone();
    (sent, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_in_the_clients_trace() {
    let (sent, spans) = run("1", 3).await;
    assert!(!spans.is_empty(), "nothing exported");
    for (service, span) in &spans {
        assert!(service.contains("coord-under-test"), "{service}");
        assert!(
            sent.iter().any(|(t, _)| t == &hex(&span.trace_id)),
            "a span in a trace no client sent: {} {}",
            span.name,
            hex(&span.trace_id)
        );
    }
    // Each transaction's trace holds its request and its four participant
    // calls (two prepares, two commits), each a child of the client's span
    // (phase 2 may run after the request has answered, or after a restart
    // from the stored traceparent).
    for (trace, client_span) in &sent {
        let mut names: Vec<&str> = spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| &hex(&s.trace_id) == trace)
            .inspect(|s| {
                assert_eq!(&hex(&s.parent_span_id), client_span, "{}", s.name);
                assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
            })
            .map(|s| s.name.as_str())
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["commit", "commit", "prepare", "prepare", "submit"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_sample_ratio_exports_nothing() {
    let (_, spans) = run("0", 5).await;
    assert!(
        spans.is_empty(),
        "{} spans exported with ratio 0",
        spans.len()
    );
}

/// Whether OpenTelemetry's `TraceIdRatioBased` keeps the trace with this id
/// (hex) at `ratio`: the lower 64 bits, shifted right once, under the bound.
fn kept_at(ratio: f64, trace_hex: &str) -> bool {
    let low = u64::from_str_radix(&trace_hex[16..], 16).expect("hex");
    (low >> 1) < (ratio * (1u64 << 63) as f64) as u64
}

/// Sampling is decided by trace id before spans are built, and it keeps or
/// drops a transaction's trace whole: every span of a kept trace (the
/// request and its four participant calls) and none of a dropped one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ratio_keeps_whole_traces_chosen_by_trace_id() {
    let (sent, spans) = run("0.5", 16).await;
    let mut kept = 0;
    for (trace, _) in &sent {
        let n = spans
            .iter()
            .filter(|(_, s)| &hex(&s.trace_id) == trace)
            .count();
        if kept_at(0.5, trace) {
            kept += 1;
            assert_eq!(n, 5, "trace {trace} is sampled: all its spans");
        } else {
            assert_eq!(n, 0, "trace {trace} is not sampled: none of its spans");
        }
    }
    assert_eq!(
        spans.len(),
        5 * kept,
        "spans outside the clients' traces were exported"
    );
}
