//! Prometheus metrics, served as text on `GET /metrics` (`hci-daemon
//! --metrics ADDR`).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `hci_api_request_duration_seconds` | histogram | `method` (gRPC path) |
//! | `hci_vms` | gauge | `phase` |
//! | `hci_volumes` | gauge | `phase` |
//! | `hci_volume_robustness` | gauge | `robustness` (`healthy`, `degraded`, `faulted`, `unknown`) |
//! | `hci_node_vms_running` | gauge | |
//! | `hci_vm_cpu_seconds_total` | counter | `vm` |
//! | `hci_vm_memory_bytes` / `hci_vm_rss_bytes` | gauge | `vm` |
//! | `hci_vm_disk_read_bytes_total` / `…_written_bytes_total` | counter | `vm`, `disk` |
//! | `hci_vm_nic_received_bytes_total` / `…_sent_bytes_total` | counter | `vm`, `nic` |
//!
//! Resource counts are read from the store at scrape time; per-VM figures
//! come from the VMs running on this node. API latency is measured by a
//! tower layer around every gRPC call (until the response headers, so a
//! watch or console stream counts its setup only).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use hci_core::model::{VirtualMachine, VmPhase, Volume, VolumePhase};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::codegen::http;

use crate::controllers::VmController;
use crate::resources::ResourceStore;

type Labels = Vec<(String, String)>;

fn label(k: &str, v: impl Into<String>) -> Labels {
    vec![(k.to_string(), v.into())]
}

/// Latency histograms of API calls by method, shared by the server layer
/// and the metrics endpoint.
#[derive(Clone)]
pub struct ApiLatency(Family<Labels, Histogram, fn() -> Histogram>);

impl std::fmt::Debug for ApiLatency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiLatency").finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~1.6 s.
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

impl Default for ApiLatency {
    fn default() -> Self {
        ApiLatency(Family::new_with_constructor(latency_histogram))
    }
}

impl ApiLatency {
    fn observe(&self, method: &str, seconds: f64) {
        // Only the API's own paths become labels: anything else a client
        // sends is counted under "other", so labels cannot grow unbounded.
        let method = if method.starts_with("/hci.v1.") || method.starts_with("/grpc.") {
            method
        } else {
            "other"
        };
        self.0
            .get_or_create(&label("method", method))
            .observe(seconds);
    }
}

/// A tower layer recording [`ApiLatency`] for every request.
#[derive(Debug, Clone)]
pub struct LatencyLayer(pub ApiLatency);

impl<S> tower::Layer<S> for LatencyLayer {
    type Service = LatencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LatencyService {
            inner,
            latency: self.0.clone(),
        }
    }
}

/// The service of [`LatencyLayer`].
#[derive(Debug, Clone)]
pub struct LatencyService<S> {
    inner: S,
    latency: ApiLatency,
}

impl<S, B> tower::Service<http::Request<B>> for LatencyService<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let start = Instant::now();
        let latency = self.latency.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            latency.observe(&method, start.elapsed().as_secs_f64());
            result
        })
    }
}

/// What the metrics endpoint reports from.
#[derive(Debug, Clone)]
pub struct MetricsSource {
    /// The resources (counted at scrape time).
    pub resources: ResourceStore,
    /// API latency, from the server's [`LatencyLayer`].
    pub latency: ApiLatency,
    /// This node's VMs, if controllers run.
    pub vms: Option<Arc<VmController>>,
}

fn robustness(phase: VolumePhase) -> &'static str {
    match phase {
        VolumePhase::Detached
        | VolumePhase::Attached
        | VolumePhase::Expanding
        | VolumePhase::Rebuilding => "healthy",
        VolumePhase::Degraded => "degraded",
        VolumePhase::Failed => "faulted",
        VolumePhase::Pending | VolumePhase::Creating | VolumePhase::Deleting => "unknown",
    }
}

impl MetricsSource {
    /// The metrics in Prometheus text format.
    pub async fn render(&self) -> hci_core::Result<String> {
        let mut registry = Registry::default();
        registry.register(
            "hci_api_request_duration_seconds",
            "Latency of API calls until their response headers",
            self.latency.0.clone(),
        );

        let vms: Family<Labels, Gauge> = Family::default();
        for phase in VmPhase::ALL.iter() {
            vms.get_or_create(&label("phase", phase.to_string())).set(0);
        }
        for vm in self.resources.list::<VirtualMachine>().await?.items {
            let phase = vm.status_or_default().phase.to_string();
            vms.get_or_create(&label("phase", phase)).inc();
        }
        registry.register("hci_vms", "Virtual machines by phase", vms);

        let volumes: Family<Labels, Gauge> = Family::default();
        let robust: Family<Labels, Gauge> = Family::default();
        for phase in VolumePhase::ALL.iter() {
            volumes
                .get_or_create(&label("phase", phase.to_string()))
                .set(0);
        }
        for r in ["healthy", "degraded", "faulted", "unknown"] {
            robust.get_or_create(&label("robustness", r)).set(0);
        }
        for vol in self.resources.list::<Volume>().await?.items {
            let phase = vol.status_or_default().phase;
            volumes
                .get_or_create(&label("phase", phase.to_string()))
                .inc();
            robust
                .get_or_create(&label("robustness", robustness(phase)))
                .inc();
        }
        registry.register("hci_volumes", "Volumes by phase", volumes);
        registry.register("hci_volume_robustness", "Volumes by robustness", robust);

        if let Some(ctl) = &self.vms {
            let running: Gauge = Gauge::default();
            running.set(ctl.running_count() as i64);
            registry.register("hci_node_vms_running", "VMs running on this node", running);
            let cpu: Family<Labels, Counter<f64>> = Family::default();
            let mem: Family<Labels, Gauge> = Family::default();
            let rss: Family<Labels, Gauge> = Family::default();
            let disk_r: Family<Labels, Counter> = Family::default();
            let disk_w: Family<Labels, Counter> = Family::default();
            let nic_rx: Family<Labels, Counter> = Family::default();
            let nic_tx: Family<Labels, Counter> = Family::default();
            for (vm, stats) in ctl.stats().await {
                let l = label("vm", vm.clone());
                cpu.get_or_create(&l).inc_by(stats.cpu_time.as_secs_f64());
                mem.get_or_create(&l).set(stats.memory_bytes as i64);
                rss.get_or_create(&l).set(stats.rss_bytes as i64);
                for (disk, read, written) in &stats.disks {
                    let l = vec![("vm".into(), vm.clone()), ("disk".into(), disk.clone())];
                    disk_r.get_or_create(&l).inc_by(*read);
                    disk_w.get_or_create(&l).inc_by(*written);
                }
                for (nic, rx, tx) in &stats.nics {
                    let l = vec![("vm".into(), vm.clone()), ("nic".into(), nic.clone())];
                    nic_rx.get_or_create(&l).inc_by(*rx);
                    nic_tx.get_or_create(&l).inc_by(*tx);
                }
            }
            registry.register("hci_vm_cpu_seconds", "Guest CPU time", cpu);
            registry.register("hci_vm_memory_bytes", "Guest memory size", mem);
            registry.register("hci_vm_rss_bytes", "Resident memory of the VMM", rss);
            registry.register("hci_vm_disk_read_bytes", "Bytes read by the guest", disk_r);
            registry.register(
                "hci_vm_disk_written_bytes",
                "Bytes written by the guest",
                disk_w,
            );
            registry.register(
                "hci_vm_nic_received_bytes",
                "Bytes received by the guest",
                nic_rx,
            );
            registry.register("hci_vm_nic_sent_bytes", "Bytes sent by the guest", nic_tx);
        }

        let mut out = String::new();
        encode(&mut out, &registry).map_err(|e| hci_core::Error::Backend {
            backend: "metrics",
            message: e.to_string(),
            source: None,
        })?;
        Ok(out)
    }
}

/// Serves `GET /metrics` on `listener` (e.g. `TcpListener::bind(addr)`)
/// until `shutdown` completes.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    source: MetricsSource,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;

    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let source = source.clone();
            async move {
                match source.render().await {
                    Ok(text) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    Err(e) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("cannot collect metrics: {e}\n"),
                    )
                        .into_response(),
                }
            }
        }),
    );
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics on /metrics");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
