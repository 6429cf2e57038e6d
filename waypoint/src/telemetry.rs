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

/// One request series: Istio's standard label set, as its waypoints report it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Always `waypoint`.
    pub reporter: &'static str,
    /// The caller's workload, from the `baggage` its agent sent (`unknown` without).
    pub source_workload: String,
    /// The caller's namespace, from its identity.
    pub source_workload_namespace: String,
    /// The caller's SPIFFE ID (`unknown` without one).
    pub source_principal: String,
    /// Its app: its canonical service (as ztunnel derives it from baggage).
    pub source_app: String,
    /// Its version: its canonical revision.
    pub source_version: String,
    /// Its canonical service (`service.name` of its baggage).
    pub source_canonical_service: String,
    /// Its canonical revision (`service.version`).
    pub source_canonical_revision: String,
    /// Its cluster (`k8s.cluster.name`).
    pub source_cluster: String,
    /// The upstream workload that answered (its endpoint's `istio.workload` metadata).
    pub destination_workload: String,
    /// Its namespace.
    pub destination_workload_namespace: String,
    /// Its SPIFFE ID (the identity its HBONE tunnel proved).
    pub destination_principal: String,
    /// Its app (its canonical service).
    pub destination_app: String,
    /// Its version (its canonical revision).
    pub destination_version: String,
    /// The service's hostname (from the listener).
    pub destination_service: String,
    /// The service's name.
    pub destination_service_name: String,
    /// The service's namespace.
    pub destination_service_namespace: String,
    /// The upstream's canonical service.
    pub destination_canonical_service: String,
    /// The upstream's canonical revision.
    pub destination_canonical_revision: String,
    /// The upstream's cluster.
    pub destination_cluster: String,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    /// The HTTP status answered.
    pub response_code: u16,
    /// The gRPC status (from the trailers, or a trailers-only answer), empty for HTTP.
    pub grpc_response_status: String,
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

/// One TCP series (`istio_tcp_*` with `reporter="waypoint"`): a `tcp` service port, or
/// workload-addressed traffic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// Always `waypoint`.
    pub reporter: &'static str,
    /// The caller's workload, from its `baggage`.
    pub source_workload: String,
    /// The caller's namespace, from its identity.
    pub source_workload_namespace: String,
    /// The caller's SPIFFE ID.
    pub source_principal: String,
    /// The service (`unknown` for workload-addressed traffic).
    pub destination_service: String,
    /// The workload the bytes went to.
    pub destination_workload: String,
    /// Its namespace.
    pub destination_workload_namespace: String,
    /// Its identity (HBONE), `unknown` in plaintext.
    pub destination_principal: String,
    /// Always `tcp`.
    pub request_protocol: &'static str,
    /// Always `mutual_tls`.
    pub connection_security_policy: &'static str,
}

impl TcpLabels {
    /// The labels of a tunnel's bytes to `ep` (`workload`: its namespace and name).
    pub fn of(
        ctx: &crate::proxy::RequestContext,
        meta: &ambit_hbone::baggage::PeerMetadata,
        service: &str,
        workload: Option<(&str, &str)>,
        ep: &crate::config::Endpoint,
    ) -> Self {
        let unknown = || UNKNOWN.to_owned();
        Self {
            reporter: "waypoint",
            source_workload: meta.workload.clone().unwrap_or_else(unknown),
            source_workload_namespace: ctx
                .peer
                .as_ref()
                .map(|p| p.namespace().to_owned())
                .or_else(|| meta.namespace.clone())
                .unwrap_or_else(unknown),
            source_principal: ctx.peer.as_ref().map_or_else(unknown, |p| p.to_string()),
            destination_service: service.to_owned(),
            destination_workload: workload.map_or_else(unknown, |(_, n)| n.to_owned()),
            destination_workload_namespace: workload.map_or_else(unknown, |(ns, _)| ns.to_owned()),
            destination_principal: ep.hbone.as_ref().map_or_else(unknown, |p| p.to_string()),
            request_protocol: "tcp",
            connection_security_policy: "mutual_tls",
        }
    }
}

/// A cluster's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// The Envoy cluster.
    pub cluster: String,
}

/// A circuit breaker's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    /// The Envoy cluster.
    pub cluster: String,
    /// Which limit.
    pub limit: &'static str,
}

/// An outlier detection decision's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    /// The Envoy cluster.
    pub cluster: String,
    /// Which detector (`consecutive_5xx`, `consecutive_gateway_failure`).
    pub reason: &'static str,
    /// `ejected`, or `overflow` when `max_ejection_percent` kept the endpoint in.
    pub outcome: &'static str,
}

/// An RBAC filter's decision's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RbacLabels {
    /// The listener (`<service host>:<port>`).
    pub listener: String,
    /// The filter's action: `ALLOW`, `DENY` or `LOG` (Istio's ALLOW, DENY, AUDIT).
    pub action: &'static str,
    /// `allowed`, `denied` (or, for LOG, `logged` when a policy matched).
    pub decision: &'static str,
    /// The policy that matched (`none`: no policy of an ALLOW filter matched).
    pub policy: String,
}

/// A JWT filter's decision's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwtLabels {
    /// The listener.
    pub listener: String,
    /// `verified`, `unauthenticated` (no token, none required), or why it was refused
    /// (`missing`, `expired`, `signature`, `unknown_key`, ...).
    pub result: &'static str,
}

/// Labels of `ambit_waypoint_local_rate_limit_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    /// The listener.
    pub listener: String,
    /// The route (its name; empty if it has none).
    pub route: String,
    /// `ok`, `rate_limited` (answered 429) or `shadowed` (over the limit, not enforced):
    /// Envoy's `http_local_rate_limit.{ok,rate_limited}`.
    pub decision: &'static str,
}

/// The waypoint's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `istio_requests_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `istio_request_duration_milliseconds`.
    pub duration: Family<RequestLabels, Histogram>,
    /// `istio_request_bytes`: the request's headers and body.
    pub request_bytes: Family<RequestLabels, Histogram>,
    /// `istio_response_bytes`: the response's headers and body.
    pub response_bytes: Family<RequestLabels, Histogram>,
    /// `ambit_waypoint_upstream_requests_total`: every attempt, retries included.
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    /// `ambit_waypoint_upstream_retries_total`.
    pub retries: Family<ClusterLabels, Counter>,
    /// `ambit_waypoint_upstream_overflow_total`: what a cluster's circuit breakers turned
    /// away, by `limit` (`requests`, `pending`, `connections`, `retries`: Envoy's
    /// `upstream_rq_overflow`, `upstream_rq_pending_overflow`, `upstream_cx_overflow`,
    /// `upstream_rq_retry_overflow`).
    pub overflow: Family<OverflowLabels, Counter>,
    /// `ambit_waypoint_outlier_ejections_total`: endpoints outlier detection ejected
    /// (Envoy's `outlier_detection.ejections_enforced_*`), or would have but for
    /// `max_ejection_percent` (`ejections_overflow`).
    pub ejections: Family<EjectionLabels, Counter>,
    /// `ambit_waypoint_rbac_decisions_total`: what each RBAC filter decided, as Envoy's
    /// `rbac.allowed`/`rbac.denied` with the policy that decided (Envoy's per-rule
    /// stats). An ALLOW filter's passes by its policies are not counted per request
    /// (the common case is cheap), its denials are.
    pub rbac: Family<RbacLabels, Counter>,
    /// `ambit_waypoint_jwt_authn_total`: what JWT filters made of requests.
    pub jwt: Family<JwtLabels, Counter>,
    /// `ambit_waypoint_local_rate_limit_total`: what local rate limits decided.
    pub rate_limit: Family<RateLimitLabels, Counter>,
    /// `istio_tcp_connections_opened_total`.
    pub tcp_opened: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub tcp_closed: Family<TcpLabels, Counter>,
    /// `istio_tcp_sent_bytes_total`: caller to upstream.
    pub tcp_sent: Family<TcpLabels, Counter>,
    /// `istio_tcp_received_bytes_total`: upstream to caller.
    pub tcp_received: Family<TcpLabels, Counter>,
}

/// Istio's duration buckets (milliseconds).
const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's size buckets (bytes): powers of ten up to 1 GB.
const SIZE_BUCKETS: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration =
            Family::<RequestLabels, Histogram>::new_with_constructor(|| Histogram::new(BUCKETS));
        let sizes = || {
            Family::<RequestLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(SIZE_BUCKETS)
            })
        };
        let (request_bytes, response_bytes) = (sizes(), sizes());
        registry.register(
            "istio_requests",
            "Requests the waypoint answered",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "How long the waypoint took to answer, to the response's last byte, in milliseconds",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request sizes (headers and body), in bytes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response sizes (headers and body), in bytes",
            response_bytes.clone(),
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
        let overflow = Family::<OverflowLabels, Counter>::default();
        registry.register(
            "ambit_waypoint_upstream_overflow",
            "Requests, retries and connections a cluster's circuit breakers turned away",
            overflow.clone(),
        );
        let ejections = Family::<EjectionLabels, Counter>::default();
        registry.register(
            "ambit_waypoint_outlier_ejections",
            "Endpoints outlier detection ejected, or would have but for max_ejection_percent",
            ejections.clone(),
        );
        let rbac = Family::<RbacLabels, Counter>::default();
        registry.register(
            "ambit_waypoint_rbac_decisions",
            "Requests an RBAC filter (Istio AuthorizationPolicy) denied, or logged for audit",
            rbac.clone(),
        );
        let jwt = Family::<JwtLabels, Counter>::default();
        registry.register(
            "ambit_waypoint_jwt_authn",
            "Requests a JWT filter (Istio RequestAuthentication) verified, let through without a token, or refused",
            jwt.clone(),
        );
        let rate_limit = Family::<RateLimitLabels, Counter>::default();
        registry.register(
            "ambit_waypoint_local_rate_limit",
            "Requests a local rate limit let through or answered 429",
            rate_limit.clone(),
        );
        let tcp = |registry: &mut Registry, name: &str, help: &str| {
            let f = Family::<TcpLabels, Counter>::default();
            registry.register(name, help, f.clone());
            f
        };
        let tcp_opened = tcp(
            &mut registry,
            "istio_tcp_connections_opened",
            "TCP connections the waypoint opened upstream",
        );
        let tcp_closed = tcp(
            &mut registry,
            "istio_tcp_connections_closed",
            "TCP connections the waypoint closed",
        );
        let tcp_sent = tcp(
            &mut registry,
            "istio_tcp_sent_bytes",
            "Bytes from the caller to the upstream",
        );
        let tcp_received = tcp(
            &mut registry,
            "istio_tcp_received_bytes",
            "Bytes from the upstream to the caller",
        );
        Self {
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
            upstream_requests,
            retries,
            overflow,
            ejections,
            rbac,
            jwt,
            rate_limit,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
        }
    }
}

const UNKNOWN: &str = "unknown";

/// What waypoint `name` of `namespace` says about itself on its upstream tunnels
/// (`baggage`, in ztunnel's form: its pods are a Deployment of its name, as Istio's).
pub fn baggage(namespace: &str, name: &str) -> String {
    ambit_hbone::baggage::PeerMetadata {
        cluster: Some(ambit_xds::istio::CLUSTER.to_owned()),
        namespace: Some(namespace.to_owned()),
        workload_kind: Some("deployment".to_owned()),
        workload: Some(name.to_owned()),
        service: Some(name.to_owned()),
        revision: Some("latest".to_owned()),
    }
    .to_header()
}

impl RequestLabels {
    /// The labels of a tunnel from `peer` to the service of `listener` (`<host>:<port>`);
    /// `meta`: what the caller's `baggage` said about it (telemetry only: the principal
    /// and namespace come from the certificate). The upstream's labels are `unknown`
    /// until a request picks one ([`RequestLabels::with_upstream`]).
    pub fn tunnel(
        peer: Option<&ambit_identity::Identity>,
        listener: &str,
        meta: &ambit_hbone::baggage::PeerMetadata,
    ) -> Self {
        let host = listener.rsplit_once(':').map_or(listener, |(h, _)| h);
        let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| UNKNOWN.into());
        let unknown = || UNKNOWN.to_owned();
        let service = or_unknown(&meta.service);
        let revision = meta.revision.clone().unwrap_or_else(|| "latest".into());
        Self {
            reporter: "waypoint",
            source_workload: or_unknown(&meta.workload),
            source_workload_namespace: peer
                .map_or_else(|| or_unknown(&meta.namespace), |p| p.namespace().to_owned()),
            source_principal: peer.map_or_else(unknown, |p| p.to_string()),
            source_app: service.clone(),
            source_version: revision.clone(),
            source_canonical_service: service,
            source_canonical_revision: revision,
            source_cluster: or_unknown(&meta.cluster),
            destination_workload: unknown(),
            destination_workload_namespace: unknown(),
            destination_principal: unknown(),
            destination_app: unknown(),
            destination_version: unknown(),
            destination_service_name: host.split('.').next().unwrap_or(UNKNOWN).to_owned(),
            destination_service: host.to_owned(),
            destination_service_namespace: host.split('.').nth(1).unwrap_or(UNKNOWN).to_owned(),
            destination_canonical_service: unknown(),
            destination_canonical_revision: "latest".into(),
            destination_cluster: unknown(),
            request_protocol: "http",
            response_code: 0,
            grpc_response_status: String::new(),
            response_flags: "-",
            connection_security_policy: "mutual_tls",
        }
    }

    /// These labels with the upstream that answered.
    fn with_upstream(mut self, up: &Upstream) -> Self {
        if let Some(w) = &up.workload {
            self.destination_workload = w.name.clone();
            self.destination_workload_namespace = w.namespace.clone();
            self.destination_app = w.canonical_service.clone();
            self.destination_version = w.canonical_revision.clone();
            self.destination_canonical_service = w.canonical_service.clone();
            self.destination_canonical_revision = w.canonical_revision.clone();
            self.destination_cluster = w.cluster.clone();
        }
        if let Some(p) = &up.principal {
            self.destination_principal = p.to_string();
        }
        self
    }
}

/// The upstream that answered a request, as its labels name it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upstream {
    /// Its endpoint's workload metadata.
    pub workload: Option<std::sync::Arc<ambit_xds::istio::WorkloadMetadata>>,
    /// The identity its tunnel proved.
    pub principal: Option<ambit_identity::Identity>,
}

/// What one answered request is counted as.
#[derive(Clone, Debug)]
pub struct Answered<'a> {
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// The HTTP status.
    pub code: u16,
    /// The gRPC status, if any.
    pub grpc_status: Option<u32>,
    /// Envoy's response flags.
    pub flags: &'static str,
    /// Who answered (a default one when nobody upstream did).
    pub upstream: &'a Upstream,
    /// To the last byte.
    pub millis: f64,
    /// Request headers and body.
    pub request_bytes: u64,
    /// Response headers and body.
    pub response_bytes: u64,
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

    /// Counts one request, retry or connection to `cluster` a circuit breaker turned
    /// away.
    pub fn overflow(&self, cluster: &str, limit: crate::config::Overflow) {
        self.overflow
            .get_or_create(&OverflowLabels {
                cluster: cluster.to_owned(),
                limit: limit.as_str(),
            })
            .inc();
    }

    /// Counts an RBAC filter's denial or audit mark.
    pub fn rbac(&self, listener: &str, action: &'static str, decision: &'static str, policy: &str) {
        self.rbac
            .get_or_create(&RbacLabels {
                listener: listener.to_owned(),
                action,
                decision,
                policy: policy.to_owned(),
            })
            .inc();
    }

    /// Counts a JWT filter's decision.
    pub fn jwt_authn(&self, listener: &str, result: &'static str) {
        self.jwt
            .get_or_create(&JwtLabels {
                listener: listener.to_owned(),
                result,
            })
            .inc();
    }

    /// Counts a local rate limit's decision on a route.
    pub fn rate_limit(&self, listener: &str, route: &str, decision: &'static str) {
        self.rate_limit
            .get_or_create(&RateLimitLabels {
                listener: listener.to_owned(),
                route: route.to_owned(),
                decision,
            })
            .inc();
    }

    /// Counts an outlier detection decision on `cluster`.
    pub fn ejection(&self, cluster: &str, reason: &'static str, ejected: bool) {
        self.ejections
            .get_or_create(&EjectionLabels {
                cluster: cluster.to_owned(),
                reason,
                outcome: if ejected { "ejected" } else { "overflow" },
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

/// What varies between a tunnel's request series.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RequestKey {
    protocol: &'static str,
    code: u16,
    grpc_status: Option<u32>,
    flags: &'static str,
    upstream: Upstream,
}

/// A request series' metrics.
#[derive(Debug)]
struct RequestSeries {
    key: RequestKey,
    count: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

type AttemptKey = (String, u16, &'static str);

/// What one tunnel's requests are counted under, and the series it has used so far: a
/// request then costs neither label hashing nor allocation (the families hash 25 labels
/// per lookup). At most [`SERIES_PER_TUNNEL`] of each are kept; a tunnel seeing more
/// (a backend answering every status code) counts the rest through the families.
#[derive(Debug)]
pub struct TunnelSeries {
    base: RequestLabels,
    requests: Mutex<Vec<RequestSeries>>,
    attempts: Mutex<Vec<(AttemptKey, Counter)>>,
}

impl TunnelSeries {
    /// A tunnel's series: its requests are counted under `base` (the upstream, code,
    /// flags and protocol filled in per request).
    pub fn new(base: RequestLabels) -> Self {
        Self {
            base,
            requests: Mutex::default(),
            attempts: Mutex::default(),
        }
    }

    /// Counts one answered request.
    pub fn request(&self, m: &Metrics, a: &Answered<'_>) {
        let observe = |s: &RequestSeries| {
            s.count.inc();
            s.duration.observe(a.millis);
            s.request_bytes.observe(a.request_bytes as f64);
            s.response_bytes.observe(a.response_bytes as f64);
        };
        let mut cache = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        // Endpoints are shared `Arc`s: comparing them is a pointer comparison.
        let same = |k: &RequestKey| {
            k.code == a.code
                && k.flags == a.flags
                && k.protocol == a.protocol
                && k.grpc_status == a.grpc_status
                && k.upstream.principal == a.upstream.principal
                && match (&k.upstream.workload, &a.upstream.workload) {
                    (Some(x), Some(y)) => std::sync::Arc::ptr_eq(x, y) || x == y,
                    (None, None) => true,
                    _ => false,
                }
        };
        if let Some(s) = cache.iter().find(|s| same(&s.key)) {
            observe(s);
            return;
        }
        let labels = RequestLabels {
            request_protocol: a.protocol,
            response_code: a.code,
            grpc_response_status: a.grpc_status.map(|g| g.to_string()).unwrap_or_default(),
            response_flags: a.flags,
            ..self.base.clone()
        }
        .with_upstream(a.upstream);
        let s = RequestSeries {
            key: RequestKey {
                protocol: a.protocol,
                code: a.code,
                grpc_status: a.grpc_status,
                flags: a.flags,
                upstream: a.upstream.clone(),
            },
            count: m.requests.get_or_create(&labels).clone(),
            duration: m.duration.get_or_create(&labels).clone(),
            request_bytes: m.request_bytes.get_or_create(&labels).clone(),
            response_bytes: m.response_bytes.get_or_create(&labels).clone(),
        };
        observe(&s);
        if cache.len() < SERIES_PER_TUNNEL {
            cache.push(s);
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
