//! The waypoint's configuration: the subset of Envoy's Listener, RouteConfiguration,
//! Cluster and ClusterLoadAssignment it implements, decoded and checked once when xDS
//! delivers them ([`decode`]), then joined into one immutable [`Config`] that requests
//! read through an `Arc` (a change never disturbs a request in flight: it keeps the
//! `Arc` it started with).
//!
//! A field that would change behaviour and that the waypoint does not implement is an
//! error (the update is NACKed), never silently ignored. Fields that only tune (stats
//! prefixes, names) are accepted.

pub mod decode;
pub mod xds;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_identity::Identity;

/// One service port the waypoint serves, picked by the CONNECT authority.
#[derive(Clone, Debug)]
pub struct Listener {
    /// Its name (`<hostname>:<port>`).
    pub name: String,
    /// The VIP:port addresses it answers for.
    pub addrs: Vec<SocketAddr>,
    /// What it does.
    pub kind: ListenerKind,
}

/// A listener's one filter.
#[derive(Clone, Debug)]
pub enum ListenerKind {
    /// HTTP connection manager with routes from RDS.
    Http {
        /// The `RouteConfiguration`'s name.
        route_config: String,
        /// Its HTTP filters before the router, in order.
        filters: Vec<crate::filter::NamedFilter>,
        /// Normalize request paths (RFC 3986) before filters and routes.
        normalize_path: bool,
        /// Merge runs of slashes in request paths.
        merge_slashes: bool,
    },
    /// TCP proxy to one cluster.
    Tcp {
        /// The cluster.
        cluster: String,
        /// Its network RBAC filters (Istio's AuthorizationPolicies on a TCP port),
        /// decided when a tunnel arrives, in order.
        rbac: Vec<Arc<crate::filter::rbac::Rbac>>,
    },
}

/// A `RouteConfiguration`.
#[derive(Clone, Debug)]
pub struct RouteConfig {
    /// Its name.
    pub name: String,
    /// Virtual hosts, in order.
    pub virtual_hosts: Vec<VirtualHost>,
}

/// A virtual host: routes for some `Host` names.
#[derive(Clone, Debug)]
pub struct VirtualHost {
    /// Its name.
    pub name: String,
    /// Domains: exact (`a.b`), suffix wildcards (`*.b`), prefix wildcards (`a.*`) or `*`.
    pub domains: Vec<String>,
    /// Routes; the first that matches wins.
    pub routes: Vec<Route>,
}

/// A route.
#[derive(Clone, Debug)]
pub struct Route {
    /// Its name, if any.
    pub name: String,
    /// When it applies.
    pub matcher: RouteMatch,
    /// What it does.
    pub action: Action,
    /// Headers set on requests.
    pub request_headers_to_add: Vec<HeaderOp>,
    /// Headers removed from requests.
    pub request_headers_to_remove: Vec<http::HeaderName>,
    /// Headers set on responses.
    pub response_headers_to_add: Vec<HeaderOp>,
    /// Headers removed from responses.
    pub response_headers_to_remove: Vec<http::HeaderName>,
    /// Its fault injection (`typed_per_filter_config` of the fault filter): replaces the
    /// filter's own where the listener has the filter.
    pub fault: Option<Arc<Fault>>,
    /// Its local rate limit (`typed_per_filter_config` of the local rate limit filter),
    /// with its buckets: they last as long as the route configuration is unchanged.
    pub rate_limit: Option<Arc<crate::filter::ratelimit::LocalRateLimit>>,
}

pub use crate::filter::fault::{Fault, FaultAbort};

impl PartialEq for StringMatch {
    fn eq(&self, other: &Self) -> bool {
        use StringMatch::*;
        match (self, other) {
            (Exact(a), Exact(b))
            | (Prefix(a), Prefix(b))
            | (Suffix(a), Suffix(b))
            | (Contains(a), Contains(b)) => a == b,
            (Regex(a), Regex(b)) => a.as_str() == b.as_str(),
            (Present, Present) => true,
            (IgnoreCase(a), IgnoreCase(b)) => a == b,
            _ => false,
        }
    }
}

/// Adds or replaces one header.
#[derive(Clone, Debug)]
pub struct HeaderOp {
    /// The header.
    pub name: http::HeaderName,
    /// Its value.
    pub value: http::HeaderValue,
    /// Replace existing values (else append).
    pub overwrite: bool,
}

/// Envoy's `RouteMatch` subset.
#[derive(Clone, Debug)]
pub struct RouteMatch {
    /// The path (without the query).
    pub path: PathMatch,
    /// Every header must match.
    pub headers: Vec<HeaderMatch>,
    /// Every query parameter must match.
    pub query: Vec<QueryMatch>,
}

/// How the path is matched.
#[derive(Clone, Debug)]
pub enum PathMatch {
    /// A string prefix.
    Prefix(String),
    /// The whole path.
    Exact(String),
    /// Whole segments: `/a` matches `/a`, `/a/`, `/a/b`, not `/ab`.
    SeparatedPrefix(String),
    /// A regular expression matching the whole path.
    Regex(regex::Regex),
}

/// A string matcher.
#[derive(Clone, Debug)]
pub enum StringMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Contains.
    Contains(String),
    /// The whole value matches.
    Regex(regex::Regex),
    /// Present, whatever its value.
    Present,
    /// The inner pattern (lowercase) against the value lowercased (Envoy's
    /// `ignore_case`).
    IgnoreCase(Box<StringMatch>),
}

/// A header match (`:method`, `:authority`, `:path` are pseudo-headers).
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderMatch {
    /// The header's name (lowercase).
    pub name: String,
    /// Its value.
    pub value: StringMatch,
    /// Invert the result.
    pub invert: bool,
}

/// A query parameter match.
#[derive(Clone, Debug)]
pub struct QueryMatch {
    /// The parameter's name.
    pub name: String,
    /// Its value.
    pub value: StringMatch,
}

/// What a route does.
#[derive(Clone, Debug)]
pub enum Action {
    /// Proxy to a cluster.
    Forward(Forward),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer directly.
    Direct {
        /// The status.
        status: http::StatusCode,
        /// The body.
        body: bytes::Bytes,
    },
}

/// Proxying.
#[derive(Clone, Debug)]
pub struct Forward {
    /// Clusters with weights (one with weight 1 when not split).
    pub clusters: Vec<(String, u32)>,
    /// Copies of requests sent elsewhere, answers thrown away.
    pub mirrors: Vec<Mirror>,
    /// The whole request, retries included; `None`: no limit.
    pub timeout: Option<Duration>,
    /// Retries, if any.
    pub retry: Option<RetryPolicy>,
    /// Replaces the matched prefix.
    pub prefix_rewrite: Option<String>,
    /// Replaces what the regular expression matches in the path.
    pub regex_rewrite: Option<(regex::Regex, String)>,
    /// Replaces the `Host`.
    pub host_rewrite: Option<String>,
}

/// A request mirror (Envoy's `RequestMirrorPolicy`).
#[derive(Clone, Debug)]
pub struct Mirror {
    /// The cluster copies go to.
    pub cluster: String,
    /// The share of requests copied (0 to 1).
    pub share: f64,
    /// The copy's `Host`.
    pub host: MirrorHost,
}

/// What a mirrored request's `Host` (`:authority`) is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MirrorHost {
    /// Envoy's default: the host with `-shadow` appended (before any port).
    ShadowSuffix,
    /// Unchanged.
    Same,
    /// Replaced.
    Literal(String),
}

/// Envoy's retry policy subset.
#[derive(Clone, Debug, Default)]
pub struct RetryPolicy {
    /// The conditions (`5xx`, `gateway-error`, `reset`, `connect-failure`,
    /// `retriable-4xx`, `refused-stream`, `retriable-status-codes`, gRPC `cancelled`,
    /// `deadline-exceeded`, `internal`, `resource-exhausted`, `unavailable`).
    pub retry_on: RetryOn,
    /// Retries at most.
    pub num_retries: u32,
    /// Each attempt's timeout.
    pub per_try_timeout: Option<Duration>,
    /// For `retriable-status-codes`.
    pub retriable_status_codes: Vec<u16>,
    /// Backoff base (Envoy's default 25 ms).
    pub base_interval: Duration,
    /// Backoff cap (default 10× the base).
    pub max_interval: Duration,
}

/// Parsed `retry_on` conditions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Any 5xx, or a reset/connect failure/timeout.
    pub five_xx: bool,
    /// 502, 503, 504.
    pub gateway_error: bool,
    /// The upstream reset or closed before a response.
    pub reset: bool,
    /// The connection could not be made.
    pub connect_failure: bool,
    /// 409.
    pub retriable_4xx: bool,
    /// An HTTP/2 REFUSED_STREAM.
    pub refused_stream: bool,
    /// The codes in `retriable_status_codes`.
    pub retriable_status_codes: bool,
    /// gRPC CANCELLED (1).
    pub grpc_cancelled: bool,
    /// gRPC DEADLINE_EXCEEDED (4).
    pub grpc_deadline_exceeded: bool,
    /// gRPC INTERNAL (13).
    pub grpc_internal: bool,
    /// gRPC RESOURCE_EXHAUSTED (8).
    pub grpc_resource_exhausted: bool,
    /// gRPC UNAVAILABLE (14).
    pub grpc_unavailable: bool,
}

/// A redirect.
#[derive(Clone, Debug)]
pub struct Redirect {
    /// New scheme.
    pub scheme: Option<String>,
    /// New host.
    pub host: Option<String>,
    /// New port.
    pub port: Option<u16>,
    /// New path.
    pub path: Option<String>,
    /// Replaces the matched prefix.
    pub prefix_rewrite: Option<String>,
    /// The status (301, 302, 303, 307, 308).
    pub status: http::StatusCode,
    /// Drop the query.
    pub strip_query: bool,
}

/// The upstream protocol of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (prior knowledge).
    Http2,
}

/// How a cluster picks endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbPolicy {
    /// In turn.
    RoundRobin,
    /// The less loaded of two random endpoints.
    LeastRequest,
}

/// A `Cluster`.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// Its name.
    pub name: String,
    /// Its upstream protocol (HTTP/1.1 unless it says HTTP/2).
    pub protocol: UpstreamProtocol,
    /// Its load balancing.
    pub lb: LbPolicy,
    /// How long a new connection may take.
    pub connect_timeout: Duration,
    /// The `ClusterLoadAssignment` to use (its `service_name`, else its name).
    pub eds_name: String,
    /// How many retries may be outstanding at once (Envoy's `circuit_breakers`).
    pub retry_limit: RetryLimit,
    /// The other circuit breakers: connections, pending and concurrent requests.
    pub limits: Limits,
    /// Requests, retries and connections in flight now, which the limits are checked
    /// against.
    pub load: Arc<ClusterLoad>,
    /// Its name, shared: upstream connections are pooled per cluster (as Envoy's), so
    /// that each cluster's circuit breakers count only its own.
    pub pool: Arc<str>,
    /// Outlier detection, if configured (its state lives as long as this version of
    /// the cluster, as Envoy's).
    pub outlier: Option<Arc<crate::outlier::Outlier>>,
    /// Below this percentage of endpoints not ejected, all are used (Envoy's
    /// `healthy_panic_threshold`, default 50).
    pub panic_threshold: f64,
}

/// Envoy's circuit breakers of the default priority, for one cluster. Without
/// `circuit_breakers` (or a field of it), Envoy's defaults: 1,024 each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `max_connections`: upstream connections open at once, to all of its endpoints.
    pub max_connections: u32,
    /// `max_pending_requests`: requests waiting for a connection at once (when
    /// `max_connections` are open and busy).
    pub max_pending_requests: u32,
    /// `max_requests`: requests to the cluster in flight at once.
    pub max_requests: u32,
}

/// Envoy's default for each circuit breaker but `max_retries`.
pub const DEFAULT_LIMIT: u32 = 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_LIMIT,
            max_pending_requests: DEFAULT_LIMIT,
            max_requests: DEFAULT_LIMIT,
        }
    }
}

/// Which circuit breaker turned a request or connection away (Envoy's `UO`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// `max_requests`.
    Requests,
    /// `max_pending_requests`.
    Pending,
    /// `max_connections` (TCP: the connection is refused).
    Connections,
    /// `max_retries` or the retry budget.
    Retries,
}

impl Overflow {
    /// The label value of `ambit_waypoint_upstream_overflow_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::Requests => "requests",
            Overflow::Pending => "pending",
            Overflow::Connections => "connections",
            Overflow::Retries => "retries",
        }
    }
}

/// Envoy's limit on concurrent retries to one cluster (`CircuitBreakers.Thresholds` of
/// the default priority), which keeps retries from multiplying the load on a cluster
/// that is failing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RetryLimit {
    /// `max_retries`: at most this many at once (Envoy's default, without thresholds: 3).
    Max(u32),
    /// `retry_budget`: at most `percent` % of the requests in flight, and never fewer
    /// than `min` (Envoy's defaults: 20 %, 3). Overrides `max_retries`.
    Budget {
        /// Percent of the requests in flight.
        percent: f64,
        /// The floor.
        min: u32,
    },
}

impl Default for RetryLimit {
    fn default() -> Self {
        RetryLimit::Max(3)
    }
}

impl RetryLimit {
    /// How many retries may be outstanding while `requests` requests are in flight.
    pub fn allowed(self, requests: u64) -> u64 {
        match self {
            RetryLimit::Max(n) => u64::from(n),
            RetryLimit::Budget { percent, min } => {
                ((requests as f64 * percent / 100.0) as u64).max(u64::from(min))
            }
        }
    }
}

/// A cluster's requests, retries, connections and pending requests in flight (Envoy's
/// `upstream_rq_active`, `upstream_rq_retry`, `upstream_cx_active` and
/// `upstream_rq_pending_active` resources). A cluster updated by xDS starts from zero, as
/// Envoy's does; what is in flight counts against the version it started with.
#[derive(Debug, Default)]
pub struct ClusterLoad {
    requests: std::sync::atomic::AtomicU64,
    retries: std::sync::atomic::AtomicU64,
    connections: Arc<std::sync::atomic::AtomicU64>,
    pending: std::sync::atomic::AtomicU64,
    /// Woken when a connection of the cluster goes back to its pool or closes.
    freed: Arc<tokio::sync::Notify>,
}

/// Counts one open upstream connection against its cluster while it lives; dropped when
/// the connection closes, it wakes the requests waiting for one.
#[derive(Debug)]
pub struct ConnectionGuard {
    count: Arc<std::sync::atomic::AtomicU64>,
    freed: Arc<tokio::sync::Notify>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.count
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.freed.notify_waiters();
    }
}

/// Counts against a [`ClusterLoad`] while it lives.
#[derive(Debug)]
pub struct LoadGuard<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ClusterLoad {
    /// Counts one request (waiting for, or reading, an upstream's answer) while the
    /// guard lives.
    pub fn request(&self) -> LoadGuard<'_> {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LoadGuard(&self.requests)
    }

    /// One more retry, if `limit` allows it with the requests in flight now; it counts
    /// (its backoff included) while the guard lives. `None`: overflow.
    pub fn retry(&self, limit: RetryLimit) -> Option<LoadGuard<'_>> {
        use std::sync::atomic::Ordering::Relaxed;
        let allowed = limit.allowed(self.requests.load(Relaxed));
        self.retries
            .fetch_update(Relaxed, Relaxed, |n| (n < allowed).then_some(n + 1))
            .ok()
            .map(|_| LoadGuard(&self.retries))
    }

    /// Requests and retries in flight now.
    pub fn now(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.requests.load(Relaxed), self.retries.load(Relaxed))
    }

    /// Connections open and requests waiting for one, now.
    pub fn connections_and_pending(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.connections.load(Relaxed), self.pending.load(Relaxed))
    }

    /// One more request in flight, if `max_requests` allows it.
    pub fn admit_request(&self, max: u32) -> Option<LoadGuard<'_>> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests
            .fetch_update(Relaxed, Relaxed, |n| (n < u64::from(max)).then_some(n + 1))
            .ok()
            .map(|_| LoadGuard(&self.requests))
    }

    /// One more open connection, if `max_connections` allows it.
    pub fn open_connection(&self, max: u32) -> Option<ConnectionGuard> {
        use std::sync::atomic::Ordering::Relaxed;
        self.connections
            .fetch_update(Relaxed, Relaxed, |n| (n < u64::from(max)).then_some(n + 1))
            .ok()
            .map(|_| ConnectionGuard {
                count: self.connections.clone(),
                freed: self.freed.clone(),
            })
    }

    /// One more request waiting for a connection, if `max_pending_requests` allows it.
    pub fn wait_for_connection(&self, max: u32) -> Option<LoadGuard<'_>> {
        use std::sync::atomic::Ordering::Relaxed;
        self.pending
            .fetch_update(Relaxed, Relaxed, |n| (n < u64::from(max)).then_some(n + 1))
            .ok()
            .map(|_| LoadGuard(&self.pending))
    }

    /// Resolves when a connection of the cluster goes back to its pool or closes (to
    /// be created before looking, so that no wake-up is missed).
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// Wakes the requests waiting for a connection (one went back to its pool).
    pub fn connection_freed(&self) {
        self.freed.notify_waiters();
    }
}

impl Cluster {
    /// The service host name in an Istio cluster name (`outbound|<port>|<subset>|<host>`).
    pub fn service_host(&self) -> Option<&str> {
        let mut parts = self.name.split('|');
        (parts.next() == Some("outbound"))
            .then(|| parts.nth(2))
            .flatten()
            .filter(|h| !h.is_empty())
    }
}

/// One endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Where it is.
    pub addr: SocketAddr,
    /// Reached over HBONE to its node agent as this identity; plaintext if `None`.
    pub hbone: Option<Identity>,
    /// Its weight.
    pub weight: u32,
    /// Who it is (Istio's `istio.workload` endpoint metadata), for `destination_*`
    /// labels; shared by every request that picks it.
    pub workload: Option<Arc<ambit_xds::istio::WorkloadMetadata>>,
}

/// Every resource, decoded, by type; [`Config::join`] makes the request-time view.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    /// By name.
    pub listeners: BTreeMap<String, Arc<Listener>>,
    /// By name.
    pub routes: BTreeMap<String, Arc<RouteConfig>>,
    /// By name.
    pub clusters: BTreeMap<String, Arc<Cluster>>,
    /// By cluster (EDS) name.
    pub endpoints: BTreeMap<String, Arc<Vec<Endpoint>>>,
    /// The L4 policies that select the waypoint's pods (`ambit.v1.Authorization`; a stock
    /// Envoy does not subscribe to them), by name.
    pub policies: BTreeMap<String, Arc<ambit_policy::Authorization>>,
    /// The workloads the waypoint fronts (`ambit.v1.Workload`), by uid.
    pub workloads: BTreeMap<String, Arc<FrontedWorkload>>,
}

/// A workload whose traffic must cross this waypoint: a CONNECT to one of its IPs (not
/// a service VIP) is workload-addressed, and forwarded to it at L4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontedWorkload {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its IPs.
    pub ips: Vec<std::net::IpAddr>,
    /// Reached over HBONE as this identity if it is enrolled; plaintext otherwise.
    pub hbone: Option<Identity>,
}

/// What a request reads: every listener indexed by address, with its route
/// configuration, clusters and endpoints resolved.
#[derive(Debug, Default)]
pub struct Config {
    /// What it was joined from.
    pub resources: Resources,
    by_addr: HashMap<SocketAddr, Arc<Listener>>,
    hbone: HashMap<SocketAddr, Identity>,
    fronted: HashMap<std::net::IpAddr, Arc<FrontedWorkload>>,
}

impl Config {
    /// Joins the decoded resources.
    pub fn join(resources: Resources) -> Self {
        let mut by_addr = HashMap::new();
        for l in resources.listeners.values() {
            for a in &l.addrs {
                by_addr.insert(*a, l.clone());
            }
        }
        let mut hbone = HashMap::new();
        for eps in resources.endpoints.values() {
            for e in eps.iter() {
                if let Some(id) = &e.hbone {
                    hbone.insert(e.addr, id.clone());
                }
            }
        }
        let fronted = resources
            .workloads
            .values()
            .flat_map(|w| w.ips.iter().map(move |ip| (*ip, w.clone())))
            .collect();
        Self {
            resources,
            by_addr,
            hbone,
            fronted,
        }
    }

    /// The workload fronted by this waypoint that owns `ip`, if any.
    pub fn fronted(&self, ip: std::net::IpAddr) -> Option<&Arc<FrontedWorkload>> {
        self.fronted.get(&ip)
    }

    /// The listener for a CONNECT authority.
    pub fn listener(&self, authority: SocketAddr) -> Option<&Arc<Listener>> {
        self.by_addr.get(&authority)
    }

    /// A route configuration by name.
    pub fn route_config(&self, name: &str) -> Option<&Arc<RouteConfig>> {
        self.resources.routes.get(name)
    }

    /// A cluster and its endpoints (none yet if EDS has not delivered them).
    pub fn cluster(&self, name: &str) -> Option<(&Arc<Cluster>, Arc<Vec<Endpoint>>)> {
        let c = self.resources.clusters.get(name)?;
        let eps = self
            .resources
            .endpoints
            .get(&c.eds_name)
            .cloned()
            .unwrap_or_default();
        Some((c, eps))
    }

    /// Authorizes a tunnel to the waypoint with the L4 policies that select its pods,
    /// with the semantics node agents apply.
    pub fn authorize(&self, conn: &ambit_policy::Connection<'_>) -> Result<(), String> {
        match ambit_policy::decide(self.resources.policies.values().map(|p| &**p), conn) {
            ambit_policy::Decision::Allow { .. } => Ok(()),
            ambit_policy::Decision::Deny { reason } => Err(reason.to_string()),
        }
    }

    /// The connection rate limits among the L4 policies that select the waypoint's pods
    /// that limit `conn`, as (`namespace/name`, rate).
    pub fn rate_limits(
        &self,
        conn: &ambit_policy::Connection<'_>,
    ) -> Vec<(String, ambit_policy::ConnectionRate)> {
        ambit_policy::limits(self.resources.policies.values().map(|p| &**p), conn)
            .into_iter()
            .map(|(p, r)| (format!("{}/{}", p.namespace, p.name), r))
            .collect()
    }

    /// The HBONE identity of an endpoint address, if it is reached over HBONE.
    pub fn hbone_identity(&self, addr: SocketAddr) -> Option<&Identity> {
        self.hbone.get(&addr)
    }
}
