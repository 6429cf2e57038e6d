//! Istio's HTTP metrics as a waypoint reports them (`reporter="waypoint"`):
//! `istio_requests_total` and `istio_request_duration_milliseconds`, with the labels the
//! waypoint knows (the caller from its certificate, the service from the listener, the
//! answer's code and Envoy response flags), served on `/metrics`; and, like Envoy's
//! per-cluster `upstream_rq_*` statistics, every attempt sent upstream and every retry:
//! `ambit_waypoint_upstream_requests_total{cluster, response_code, response_flags}` and
//! `ambit_waypoint_upstream_retries_total{cluster}`.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// One request series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Always `waypoint`.
    pub reporter: &'static str,
    /// The caller's SPIFFE ID (`unknown` without one).
    pub source_principal: String,
    /// The caller's namespace, from its identity.
    pub source_workload_namespace: String,
    /// The caller's workload, from the `baggage` its agent sent (`unknown` without).
    pub source_workload: String,
    /// Its canonical service (`service.name` of its baggage).
    pub source_canonical_service: String,
    /// Its canonical revision (`service.version`).
    pub source_canonical_revision: String,
    /// Its cluster (`k8s.cluster.name`).
    pub source_cluster: String,
    /// The service's hostname (from the listener).
    pub destination_service: String,
    /// The service's namespace.
    pub destination_service_namespace: String,
    /// The service's name.
    pub destination_service_name: String,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    /// The HTTP status answered.
    pub response_code: u16,
    /// Envoy's response flags (`-` for none).
    pub response_flags: &'static str,
    /// Always `mutual_tls` (every tunnel to a waypoint is).
    pub connection_security_policy: &'static str,
}

/// One upstream attempt series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The Envoy cluster (`outbound|<port>||<host>`).
    pub cluster: String,
    /// The upstream's status, 0 when none came (connect failure, reset, timeout).
    pub response_code: u16,
    /// `UF`, `UR` or `UT` when no response came, `-` otherwise.
    pub response_flags: &'static str,
}

/// A cluster's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// The Envoy cluster.
    pub cluster: String,
}

/// The waypoint's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `istio_requests_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `istio_request_duration_milliseconds`.
    pub duration: Family<RequestLabels, Histogram>,
    /// `ambit_waypoint_upstream_requests_total`: every attempt, retries included.
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    /// `ambit_waypoint_upstream_retries_total`.
    pub retries: Family<ClusterLabels, Counter>,
}

/// Istio's duration buckets (milliseconds).
const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration =
            Family::<RequestLabels, Histogram>::new_with_constructor(|| Histogram::new(BUCKETS));
        registry.register(
            "istio_requests",
            "Requests the waypoint answered",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "How long the waypoint took to answer, in milliseconds",
            duration.clone(),
        );
        let upstream_requests = Family::<UpstreamLabels, Counter>::default();
        let retries = Family::<ClusterLabels, Counter>::default();
        registry.register(
            "ambit_waypoint_upstream_requests",
            "Attempts the waypoint sent upstream (retries included), by answer",
            upstream_requests.clone(),
        );
        registry.register(
            "ambit_waypoint_upstream_retries",
            "Retries the waypoint made",
            retries.clone(),
        );
        Self {
            registry,
            requests,
            duration,
            upstream_requests,
            retries,
        }
    }
}

impl RequestLabels {
    /// The labels of a tunnel from `peer` to the service of `listener` (`<host>:<port>`);
    /// `meta`: what the caller's `baggage` said about it (telemetry only: the principal
    /// and namespace come from the certificate).
    pub fn tunnel(
        peer: Option<&ambit_identity::Identity>,
        listener: &str,
        meta: &ambit_hbone::baggage::PeerMetadata,
    ) -> Self {
        let host = listener.rsplit_once(':').map_or(listener, |(h, _)| h);
        let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".into());
        Self {
            reporter: "waypoint",
            source_principal: peer.map_or_else(|| "unknown".into(), |p| p.to_string()),
            source_workload_namespace: peer
                .map_or_else(|| or_unknown(&meta.namespace), |p| p.namespace().to_owned()),
            source_workload: or_unknown(&meta.workload),
            source_canonical_service: or_unknown(&meta.service),
            source_canonical_revision: meta.revision.clone().unwrap_or_else(|| "latest".into()),
            source_cluster: or_unknown(&meta.cluster),
            destination_service_name: host.split('.').next().unwrap_or("unknown").to_owned(),
            destination_service: host.to_owned(),
            destination_service_namespace: host.split('.').nth(1).unwrap_or("unknown").to_owned(),
            request_protocol: "http",
            response_code: 0,
            response_flags: "-",
            connection_security_policy: "mutual_tls",
        }
    }
}

impl Metrics {
    /// Counts one retry to `cluster`.
    pub fn retry(&self, cluster: &str) {
        self.retries
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Series a tunnel keeps at hand, so that none is looked up more than once per tunnel.
const SERIES_PER_TUNNEL: usize = 16;

type RequestKey = (&'static str, u16, &'static str);
type AttemptKey = (String, u16, &'static str);

/// What one tunnel's requests are counted under, and the series it has used so far: a
/// request then costs neither label hashing nor allocation (the families hash four
/// strings per lookup). At most [`SERIES_PER_TUNNEL`] of each are kept; a tunnel seeing
/// more (a backend answering every status code) counts the rest through the families.
#[derive(Debug)]
pub struct TunnelSeries {
    base: RequestLabels,
    requests: Mutex<Vec<(RequestKey, Counter, Histogram)>>,
    attempts: Mutex<Vec<(AttemptKey, Counter)>>,
}

impl TunnelSeries {
    /// A tunnel's series: its requests are counted under `base` (code, flags and protocol
    /// filled in per request).
    pub fn new(base: RequestLabels) -> Self {
        Self {
            base,
            requests: Mutex::default(),
            attempts: Mutex::default(),
        }
    }

    /// Counts one answered request.
    pub fn request(
        &self,
        m: &Metrics,
        request_protocol: &'static str,
        response_code: u16,
        response_flags: &'static str,
        millis: f64,
    ) {
        let key = (request_protocol, response_code, response_flags);
        let mut cache = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c, h)) = cache.iter().find(|(k, _, _)| *k == key) {
            c.inc();
            h.observe(millis);
            return;
        }
        let labels = RequestLabels {
            request_protocol,
            response_code,
            response_flags,
            ..self.base.clone()
        };
        let c = m.requests.get_or_create(&labels).clone();
        let h = m.duration.get_or_create(&labels).clone();
        c.inc();
        h.observe(millis);
        if cache.len() < SERIES_PER_TUNNEL {
            cache.push((key, c, h));
        }
    }

    /// Counts one attempt sent to `cluster`.
    pub fn attempt(
        &self,
        m: &Metrics,
        cluster: &str,
        response_code: u16,
        response_flags: &'static str,
    ) {
        let mut cache = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = cache.iter().find(|((cl, code, flags), _)| {
            *code == response_code && *flags == response_flags && cl == cluster
        }) {
            c.inc();
            return;
        }
        let c = m
            .upstream_requests
            .get_or_create(&UpstreamLabels {
                cluster: cluster.to_owned(),
                response_code,
                response_flags,
            })
            .clone();
        c.inc();
        if cache.len() < SERIES_PER_TUNNEL {
            cache.push(((cluster.to_owned(), response_code, response_flags), c));
        }
    }
}
