//! What observing the coordinator costs: `tandem bench --metrics` serves
//! `/metrics` on an admin listener and scrapes it every second during the
//! run (Prometheus scrapes every 15 s to 1 min: a pessimistic rate);
//! `tandem bench --trace` sends a fresh `traceparent` with every
//! transaction; `--otlp` exports the coordinator's spans over OTLP/gRPC to
//! a collector the bench runs in-process, which counts what it receives.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An OTLP/gRPC trace collector on `127.0.0.1:0` that counts spans.
pub(super) struct Collector {
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
    spans: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

struct Counting(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Counting {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Starts it.
    pub(super) async fn start() -> anyhow::Result<Collector> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let spans = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = TraceServiceServer::new(Counting(spans.clone()))
            .max_decoding_message_size(64 * 1024 * 1024);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        Ok(Collector {
            endpoint,
            spans,
            stop: Some(stop),
        })
    }

    /// Spans received so far.
    pub(super) fn spans(&self) -> u64 {
        self.spans.load(Ordering::Relaxed)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Scrapes `/metrics` every second until stopped.
pub(super) struct Scraper {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<ScrapeStats>,
}

/// What the scrapes saw.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ScrapeStats {
    /// Scrapes answered 200.
    pub scrapes: u64,
    /// Scrapes that failed.
    pub failed: u64,
    /// Bytes of the last answer.
    pub last_bytes: usize,
    /// The slowest scrape, ms.
    pub slowest_ms: f64,
}

impl Scraper {
    /// Starts scraping `http://admin/metrics` (with `authorization`, if
    /// any) every second.
    pub(super) fn start(admin: String, authorization: Option<String>) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut stats = ScrapeStats::default();
            while !flag.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                match scrape(&admin, authorization.as_deref()).await {
                    Ok(bytes) => {
                        stats.scrapes += 1;
                        stats.last_bytes = bytes;
                        stats.slowest_ms =
                            stats.slowest_ms.max(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                    Err(_) => stats.failed += 1,
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            stats
        });
        Scraper { stop, task }
    }

    /// Stops and reports.
    pub(super) async fn finish(self) -> ScrapeStats {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// One `GET /metrics`; the body's size when the answer is 200.
async fn scrape(admin: &str, authorization: Option<&str>) -> anyhow::Result<usize> {
    let mut conn = tokio::net::TcpStream::connect(admin).await?;
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\n{auth}Connection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    anyhow::ensure!(text.starts_with("HTTP/1.1 200"), "scrape refused");
    let body = text.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
    Ok(body)
}
