//! The control plane's Prometheus metrics: xDS streams, pushes, ACKs and NACKs (by node
//! and type), the model's size, and whether the mesh file is currently accepted.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::ads::AdsStats;
use crate::model::Model;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NackLabels {
    node: String,
    type_url: String,
}

/// Reads everything at scrape time.
#[derive(Debug)]
struct ControlPlaneCollector {
    ads: Arc<AdsStats>,
    models: watch::Receiver<Arc<Model>>,
    file_error: watch::Receiver<Option<String>>,
    held: watch::Receiver<Option<String>>,
}

impl Collector for ControlPlaneCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter =
            |e: &mut DescriptorEncoder, name, help, v: u64| -> Result<(), std::fmt::Error> {
                ConstCounter::new(v).encode(e.encode_descriptor(
                    name,
                    help,
                    None,
                    MetricType::Counter,
                )?)
            };
        let gauge = |e: &mut DescriptorEncoder,
                     name,
                     help,
                     v: i64|
         -> Result<(), std::fmt::Error> {
            ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
        };
        counter(
            &mut e,
            "ambit_xds_streams_opened",
            "ADS streams opened by node agents",
            self.ads.streams_opened.load(Relaxed),
        )?;
        counter(
            &mut e,
            "ambit_xds_responses_sent",
            "xDS responses sent",
            self.ads.responses_sent.load(Relaxed),
        )?;
        counter(
            &mut e,
            "ambit_xds_acks",
            "xDS responses acknowledged",
            self.ads.acks.load(Relaxed),
        )?;
        let mut nacks = e.encode_descriptor(
            "ambit_xds_nacks",
            "xDS responses rejected, by node and type",
            None,
            MetricType::Counter,
        )?;
        for ((node, type_url), n) in self.ads.nack_counts() {
            ConstCounter::new(n).encode(nacks.encode_family(&NackLabels { node, type_url })?)?;
        }
        let m = self.models.borrow().clone();
        gauge(
            &mut e,
            "ambit_mesh_workloads",
            "Workloads in the served model",
            m.workloads.len() as i64,
        )?;
        gauge(
            &mut e,
            "ambit_mesh_services",
            "Services in the served model",
            m.services.len() as i64,
        )?;
        gauge(
            &mut e,
            "ambit_mesh_policies",
            "Authorization policies in the served model",
            m.policies.len() as i64,
        )?;
        gauge(
            &mut e,
            "ambit_mesh_source_valid",
            "1 if the source's current input is valid; 0 if it was rejected and the last good model is served",
            i64::from(self.file_error.borrow().is_none()),
        )?;
        gauge(
            &mut e,
            "ambit_mesh_source_held",
            "1 while a change that removes most of the mesh is held back (see --shrink-hold-ms)",
            i64::from(self.held.borrow().is_some()),
        )?;
        Ok(())
    }
}

/// The registry behind `/metrics`.
#[derive(Debug)]
pub struct ControlPlaneMetrics {
    registry: Registry,
}

impl ControlPlaneMetrics {
    /// Metrics over the ADS counters, the served model and the source's state
    /// (`file_error`: its current rejection; `held`: why its change is held back).
    pub fn new(
        ads: Arc<AdsStats>,
        models: watch::Receiver<Arc<Model>>,
        file_error: watch::Receiver<Option<String>>,
        held: watch::Receiver<Option<String>>,
    ) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ControlPlaneCollector {
            ads,
            models,
            file_error,
            held,
        }));
        Self { registry }
    }

    /// The metrics in Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves `GET /metrics` (and `/healthz/ready`) until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<ControlPlaneMetrics>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Typically EMFILE: wait for descriptors to free up instead of spinning.
                tracing::warn!("metrics listener: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let (status, ctype, body) = match req.uri().path() {
                            "/metrics" => (
                                200,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                metrics.encode(),
                            ),
                            "/healthz/ready" => (200, "text/plain", "ready\n".to_owned()),
                            _ => (404, "text/plain", "not found\n".to_owned()),
                        };
                        hyper::Response::builder()
                            .status(status)
                            .header("content-type", ctype)
                            .body(Full::new(Bytes::from(body)))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
