//! Spans of Ambit's proxies, exported with OTLP (gRPC) to a collector, and the W3C Trace
//! Context (`traceparent`) that joins them across hops and with the application's own.
//!
//! The node agents record a span per tunnelled connection (a client span where a
//! connection leaves through HBONE, a server span where one arrives), the waypoint one
//! per request; each hop sends its span's `traceparent` on (on the HBONE CONNECT, on the
//! request to the backend), so a request through client agent, waypoint and destination
//! agent is one trace. Sampling follows the parent's decision; a trace a hop starts is
//! sampled at the configured percentage (Istio's default: 1 %).

use std::borrow::Cow;
use std::time::Duration;

use opentelemetry::trace::{
    Span as _, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
pub use opentelemetry::trace::{SpanContext, SpanKind};
pub use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{BatchConfigBuilder, Sampler, SdkTracer, SdkTracerProvider};

/// How often finished spans are sent (Envoy flushes every 5 s; shorter keeps tests and
/// dashboards prompt at no real cost).
const EXPORT_EVERY: Duration = Duration::from_millis(500);
/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where spans go, and how many traces this process starts are sampled.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The collector's OTLP/gRPC endpoint (`http://collector:4317`).
    pub endpoint: String,
    /// `service.name` of the spans (`ambit-agent`, `ambit-waypoint`).
    pub service: String,
    /// More resource attributes (the node, the waypoint's name and namespace).
    pub resource: Vec<(String, String)>,
    /// Percent of the traces this process starts (no sampled parent) that are recorded.
    pub sample_percent: f64,
}

/// The tracer of a process; cheap to clone.
#[derive(Clone, Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// Why tracing could not start.
#[derive(Debug)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl Tracing {
    /// Starts exporting to `c.endpoint` (batched, from a task of the current tokio
    /// runtime). A collector that is down costs only the spans it misses.
    pub fn otlp(c: &Config) -> Result<Self, Error> {
        use opentelemetry_otlp::WithExportConfig;
        if !(0.0..=100.0).contains(&c.sample_percent) {
            return Err(Error(format!(
                "the sampling percentage {} is not 0-100",
                c.sample_percent
            )));
        }
        let uri: http::Uri = c
            .endpoint
            .parse()
            .map_err(|e| Error(format!("--otlp-endpoint {:?}: {e}", c.endpoint)))?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.host().is_none() {
            return Err(Error(format!(
                "--otlp-endpoint {:?}: needs http://host:port (OTLP over gRPC)",
                c.endpoint
            )));
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(c.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| Error(format!("the OTLP exporter: {e}")))?;
        let processor =
            opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(EXPORT_EVERY)
                    .build(),
            )
            .build();
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(c.service.clone())
            .with_attributes(
                c.resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                c.sample_percent / 100.0,
            ))))
            .build();
        let tracer = provider.tracer("ambit");
        Ok(Self { provider, tracer })
    }

    /// Starts a span: a child of `parent` (a remote hop's, from its `traceparent`), or
    /// the root of a new trace; `links` name other spans it relates to.
    pub fn start(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: Option<&SpanContext>,
        links: Vec<SpanContext>,
        attributes: Vec<KeyValue>,
    ) -> Span {
        let cx = match parent {
            Some(p) => opentelemetry::Context::new().with_remote_span_context(p.clone()),
            None => opentelemetry::Context::new(),
        };
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .with_links(
                links
                    .into_iter()
                    .map(opentelemetry::trace::Link::with_context)
                    .collect(),
            )
            .start_with_context(&self.tracer, &cx);
        Span(span)
    }

    /// Sends what is left (waiting at most the export timeout), and stops.
    pub async fn shutdown(self) {
        let provider = self.provider.clone();
        let done = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(EXPORT_TIMEOUT, done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::debug!("shutting tracing down: {e}"),
            _ => tracing::debug!("shutting tracing down took too long"),
        }
    }
}

/// A span, ended when dropped.
#[derive(Debug)]
pub struct Span(opentelemetry_sdk::trace::Span);

impl Span {
    /// Its context (what a `traceparent` carries on).
    pub fn context(&self) -> SpanContext {
        self.0.span_context().clone()
    }

    /// The `traceparent` that makes the next hop its child.
    pub fn traceparent(&self) -> String {
        traceparent(self.0.span_context())
    }

    /// Is it recorded (sampled)?
    pub fn is_recording(&self) -> bool {
        self.0.is_recording()
    }

    /// Sets an attribute.
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if self.0.is_recording() {
            self.0.set_attribute(KeyValue::new(key, value));
        }
    }

    /// Marks it failed, saying why.
    pub fn error(&mut self, why: impl Into<Cow<'static, str>>) {
        self.0.set_status(Status::error(why));
    }
}

/// The remote span context of a `traceparent` (W3C Trace Context level 1), if valid.
pub fn parse_traceparent(v: &str) -> Option<SpanContext> {
    let b = v.as_bytes();
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if b.len() < 55 || !hex(&b[..2]) || &b[..2] == b"ff" {
        return None;
    }
    if (&b[..2] == b"00" && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let (trace, span, flags) = (&v[3..35], &v[36..52], &v[53..55]);
    if !hex(trace.as_bytes()) || !hex(span.as_bytes()) || !hex(flags.as_bytes()) {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let cx = SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags & 1),
        true,
        TraceState::default(),
    );
    cx.is_valid().then_some(cx)
}

/// The `traceparent` of `cx`.
pub fn traceparent(cx: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        cx.trace_id(),
        cx.span_id(),
        cx.trace_flags().to_u8() & 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_round_trip_and_bad_ones_are_refused() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = parse_traceparent(good).unwrap();
        assert!(cx.is_sampled() && cx.is_remote());
        assert_eq!(traceparent(&cx), good);
        let unsampled = good.replace("-01", "-00");
        assert!(!parse_traceparent(&unsampled).unwrap().is_sampled());
        // A later version may carry more.
        assert!(parse_traceparent(&format!("01{}-more", &good[2..])).is_some());
        for bad in [
            "",
            &good[..54],
            &good.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)),
            &good.replace("00f067aa0ba902b7", &"0".repeat(16)),
            &good.replace("4bf9", "4BF9"),
            &good.replacen("00", "ff", 1),
            "00-0-0-00",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }
}
