//! HTTP routes: Gateway API `HTTPRoute` with Service parentRefs (the GAMMA mesh profile).
//!
//! [`HttpRouteSpec`] is the route as a source reads it, in Gateway API's own shape and
//! field names (`camelCase`), so the file source parses it from YAML and the Kubernetes
//! source can take a real `HTTPRoute`'s spec field for field. [`validate`] checks it
//! against the rest of the model and gives an [`HttpRoute`]: parents and backends
//! resolved to services and ports, durations parsed, regular expressions compiled once
//! (to prove they compile), filters checked. The translator turns routes into Envoy
//! `RouteConfiguration`s.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{NamespacedName, Problems, Service};

/// Largest weight Gateway API allows a backend.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// An `HTTPRoute` as a source reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    /// Its name, unique in its namespace.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// The services it attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Host names (the `Host` header) it applies to; empty: all.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Its rules. With none, the route matches nothing.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// `parentRefs[]`: for a mesh route, a Service (`group: ""`, `kind: Service`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    /// API group; a Service's is `""` (the core group).
    #[serde(default)]
    pub group: Option<String>,
    /// Must be `Service` (Gateway API's default, `Gateway`, is not a mesh parent).
    #[serde(default)]
    pub kind: Option<String>,
    /// Defaults to the route's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The service's name.
    pub name: String,
    /// Only this port of the service; all its HTTP ports if absent.
    #[serde(default)]
    pub port: Option<u16>,
    /// Not used by mesh routes.
    #[serde(default)]
    pub section_name: Option<String>,
}

/// `rules[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    /// An optional name.
    #[serde(default)]
    pub name: Option<String>,
    /// Any match selects the rule; none is one match of every request (`PathPrefix /`).
    #[serde(default)]
    pub matches: Vec<MatchSpec>,
    /// Applied in order.
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
    /// Where matching requests go, by weight. None (and no redirect): 500.
    #[serde(default)]
    pub backend_refs: Vec<BackendRefSpec>,
    /// Request timeouts.
    #[serde(default)]
    pub timeouts: Option<TimeoutsSpec>,
    /// Retries (GEP-1731).
    #[serde(default)]
    pub retry: Option<RetrySpec>,
    /// Ambit's extension: faults injected into some of the rule's requests (Istio's
    /// `HTTPFaultInjection` field names; Envoy's `HTTPFault`).
    #[serde(default)]
    pub fault: Option<FaultSpec>,
    /// Ambit's extension: a token bucket for the rule's requests (Envoy's
    /// `local_ratelimit`; Envoy Gateway's `requests` and `unit`).
    #[serde(default)]
    pub rate_limit: Option<super::ratelimit::RateLimitSpec>,
}

/// `fault`: delay and/or abort a share of the requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultSpec {
    /// Delay requests before they go on.
    #[serde(default)]
    pub delay: Option<FaultDelaySpec>,
    /// Answer requests at once instead of sending them on.
    #[serde(default)]
    pub abort: Option<FaultAbortSpec>,
    /// Only requests with all these headers (`name`, `value`, `type` Exact or
    /// RegularExpression) get the fault.
    #[serde(default)]
    pub headers: Vec<ValueMatchSpec>,
}

/// `fault.delay`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelaySpec {
    /// The share of requests delayed (default: all).
    #[serde(default)]
    pub percentage: Option<PercentSpec>,
    /// How long (a duration: `200ms`, `2s`).
    pub fixed_delay: String,
}

/// `fault.abort`: one of `httpStatus` and `grpcStatus`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbortSpec {
    /// The share of requests aborted (default: all).
    #[serde(default)]
    pub percentage: Option<PercentSpec>,
    /// The HTTP status answered (200-599).
    #[serde(default)]
    pub http_status: Option<u16>,
    /// The gRPC status answered, by Istio's name (`UNAVAILABLE`, ...) or number.
    #[serde(default)]
    pub grpc_status: Option<String>,
}

/// Istio's `Percent`: `{value: 12.5}`, 0 to 100.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PercentSpec {
    /// Percent of requests.
    pub value: f64,
}

impl PartialEq for PercentSpec {
    fn eq(&self, other: &Self) -> bool {
        self.value.to_bits() == other.value.to_bits()
    }
}

impl Eq for PercentSpec {}

/// `matches[]`: every field given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchSpec {
    /// Defaults to `PathPrefix /`.
    #[serde(default)]
    pub path: Option<PathMatchSpec>,
    /// Every header must match.
    #[serde(default)]
    pub headers: Vec<ValueMatchSpec>,
    /// Every query parameter must match.
    #[serde(default)]
    pub query_params: Vec<ValueMatchSpec>,
    /// An HTTP method (`GET`, `POST`, ...).
    #[serde(default)]
    pub method: Option<String>,
}

/// `matches[].path`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatchSpec {
    /// `Exact`, `PathPrefix` (the default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Defaults to `/`.
    #[serde(default)]
    pub value: Option<String>,
}

/// `matches[].headers[]` and `matches[].queryParams[]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatchSpec {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// The header (case-insensitive) or query parameter (exact) name.
    pub name: String,
    /// The value to match.
    pub value: String,
}

/// `filters[]`: `type` says which of the other fields is set.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FilterSpec {
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestRedirect` or `URLRewrite`.
    #[serde(rename = "type")]
    pub kind: String,
    /// For `RequestHeaderModifier`.
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    /// For `ResponseHeaderModifier`.
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    /// For `RequestRedirect`.
    #[serde(default)]
    pub request_redirect: Option<RedirectSpec>,
    /// For `URLRewrite`.
    #[serde(default, rename = "urlRewrite")]
    pub url_rewrite: Option<RewriteSpec>,
    /// For `RequestMirror`.
    #[serde(default)]
    pub request_mirror: Option<MirrorSpec>,
}

/// `requestMirror`: a copy of a share of the requests, to another backend, whose answer
/// is thrown away.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MirrorSpec {
    /// Where copies go.
    pub backend_ref: BackendRefSpec,
    /// The share of requests copied, in percent (default: all).
    #[serde(default)]
    pub percent: Option<u32>,
    /// Or as a fraction (`numerator`, `denominator`, default 100).
    #[serde(default)]
    pub fraction: Option<FractionSpec>,
}

/// Gateway API's `Fraction`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FractionSpec {
    /// Numerator.
    pub numerator: u32,
    /// Denominator (default 100).
    #[serde(default)]
    pub denominator: Option<u32>,
}

/// Header changes: `set` replaces, `add` appends, `remove` deletes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifier {
    /// Replace (or add) these headers.
    #[serde(default)]
    pub set: Vec<Header>,
    /// Append these headers.
    #[serde(default)]
    pub add: Vec<Header>,
    /// Remove these headers.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// The name.
    pub name: String,
    /// The value.
    pub value: String,
}

/// `requestRedirect`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RedirectSpec {
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Replaces the host.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Replaces the path.
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
    /// Replaces the port.
    #[serde(default)]
    pub port: Option<u16>,
    /// 301 or 302 (the default).
    #[serde(default)]
    pub status_code: Option<u16>,
}

/// `urlRewrite`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteSpec {
    /// Replaces the `Host` header.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Replaces the path.
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
}

/// A path change: `ReplaceFullPath` or `ReplacePrefixMatch`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathModifierSpec {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub kind: String,
    /// For `ReplaceFullPath`.
    #[serde(default)]
    pub replace_full_path: Option<String>,
    /// For `ReplacePrefixMatch` (only with a `PathPrefix` match).
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

/// `backendRefs[]`: a Service port, by weight.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRefSpec {
    /// API group; a Service's is `""`.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` (the default).
    #[serde(default)]
    pub kind: Option<String>,
    /// The service's name.
    pub name: String,
    /// Defaults to the route's namespace (the only one allowed without a ReferenceGrant).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The service port; required.
    #[serde(default)]
    pub port: Option<u16>,
    /// Share of requests (relative to the rule's other backends); defaults to 1.
    #[serde(default)]
    pub weight: Option<u32>,
}

/// `timeouts` (Gateway API durations: `10s`, `500ms`, `1m30s`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TimeoutsSpec {
    /// The whole request, retries included; `0s` disables.
    #[serde(default)]
    pub request: Option<String>,
    /// Each attempt to a backend.
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// `retry` (GEP-1731), with one Ambit extension, `retryOn`, in Envoy's words.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySpec {
    /// Response codes to retry (400-599).
    #[serde(default)]
    pub codes: Vec<u16>,
    /// How many times a request may be retried (defaults to 1 if retry is given).
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Base of the exponential backoff between attempts (default 25ms, as Envoy).
    #[serde(default)]
    pub backoff: Option<String>,
    /// More conditions, as Envoy's `retry_on` names them (`5xx`, `gateway-error`,
    /// `reset`, `connect-failure`, `retriable-4xx`, `refused-stream`,
    /// `retriable-status-codes`, and for gRPC `cancelled`, `deadline-exceeded`,
    /// `internal`, `resource-exhausted`, `unavailable`). Connection failures, refused
    /// streams and resets are always retried when `retry` is given.
    #[serde(default)]
    pub retry_on: Vec<String>,
}

/// Envoy `retry_on` conditions this mesh accepts.
pub const RETRY_ON: [&str; 12] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

// ---- Validated.

/// A validated route.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRoute {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Where it attaches: a service and one port, or all its HTTP ports.
    pub parents: Vec<(NamespacedName, Option<u16>)>,
    /// Host names it applies to (lowercase); empty: all.
    pub hostnames: Vec<String>,
    /// Its rules, in the order written.
    pub rules: Vec<HttpRule>,
}

/// A validated rule.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRule {
    /// At least one (an absent `matches` is one match of everything).
    pub matches: Vec<HttpMatch>,
    /// Header changes to requests.
    pub request_headers: HeaderModifier,
    /// Header changes to responses.
    pub response_headers: HeaderModifier,
    /// A redirect answers instead of a backend.
    pub redirect: Option<Redirect>,
    /// Host and path rewrites.
    pub rewrite: Option<Rewrite>,
    /// Weighted backends (empty without a redirect: answered with 500).
    pub backends: Vec<Backend>,
    /// `timeouts.request` (`None`: no timeout).
    pub request_timeout: Option<Duration>,
    /// `timeouts.backendRequest`.
    pub backend_timeout: Option<Duration>,
    /// Retries.
    pub retry: Option<Retry>,
    /// Faults injected.
    pub fault: Option<Fault>,
    /// Its token bucket.
    pub rate_limit: Option<super::ratelimit::RateLimit>,
    /// Copies of requests to other backends (their answers thrown away).
    pub mirrors: Vec<Mirror>,
}

/// A mirror: a share of requests copied to a service port.
#[derive(Clone, Debug, PartialEq)]
pub struct Mirror {
    /// The service.
    pub service: NamespacedName,
    /// Its port.
    pub port: u16,
    /// Percent of requests (0 to 100).
    pub percent: f64,
}

/// A validated fault.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    /// Delay (and the percent of requests).
    pub delay: Option<(Duration, f64)>,
    /// Abort (and the percent of requests).
    pub abort: Option<(Abort, f64)>,
    /// Only requests matching all these (names lowercase).
    pub headers: Vec<ValueMatch>,
}

/// What an abort answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// This HTTP status.
    Http(u16),
    /// This gRPC status (in an HTTP 200 answer).
    Grpc(u32),
}

/// gRPC's status codes by name.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A validated match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpMatch {
    /// The path.
    pub path: PathMatch,
    /// Headers (names lowercase).
    pub headers: Vec<ValueMatch>,
    /// Query parameters.
    pub query_params: Vec<ValueMatch>,
    /// The method.
    pub method: Option<String>,
}

/// How a path is matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// Path segments: `/a` matches `/a` and `/a/b`, not `/ab`.
    Prefix(String),
    /// A regular expression (RE2 syntax) matching the whole path.
    Regex(String),
}

/// A header or query parameter match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueMatch {
    /// The name.
    pub name: String,
    /// The value, exactly or as a regular expression.
    pub value: StringMatch,
}

/// Exact or regular-expression string match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    /// Equal.
    Exact(String),
    /// The whole value matches.
    Regex(String),
}

/// A redirect.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Redirect {
    /// New scheme.
    pub scheme: Option<String>,
    /// New host.
    pub hostname: Option<String>,
    /// New path.
    pub path: Option<PathModifier>,
    /// New port.
    pub port: Option<u16>,
    /// 301 or 302.
    pub status_code: u16,
}

/// A rewrite.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// New host.
    pub hostname: Option<String>,
    /// New path.
    pub path: Option<PathModifier>,
}

/// A path change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathModifier {
    /// Replace the whole path.
    Full(String),
    /// Replace the matched prefix.
    Prefix(String),
}

/// A backend service port with its weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// The service.
    pub service: NamespacedName,
    /// Its port (a service port, not a target port).
    pub port: u16,
    /// Relative share.
    pub weight: u32,
}

/// Retry settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Retries at most (so `attempts + 1` tries).
    pub attempts: u32,
    /// Base backoff interval.
    pub backoff: Duration,
    /// Status codes retried.
    pub codes: Vec<u16>,
    /// Envoy `retry_on` conditions (always with `connect-failure`, `refused-stream`,
    /// `reset`; with `retriable-status-codes` if `codes` is not empty).
    pub retry_on: Vec<String>,
}

/// Parses a Gateway API duration (GEP-2257): one to four `<number><unit>` parts, units
/// `h`, `m`, `s`, `ms`, e.g. `1h`, `1m30s`, `500ms`, `0s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 10s, 500ms or 1m30s");
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * u32::try_from(n).map_err(|_| bad())?;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

/// The protocol of a service port, from its `appProtocol` or its name (Istio's
/// convention: `http`, `http-web`, `grpc-api`, ...). Undeclared ports are TCP: the
/// protocol is never sniffed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// Opaque bytes.
    #[default]
    Tcp,
    /// HTTP/1.1 (a waypoint also accepts HTTP/2 with prior knowledge on it).
    Http,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
}

impl Protocol {
    /// From `appProtocol` (which wins) or the port's name.
    pub fn of(app_protocol: Option<&str>, name: Option<&str>) -> Result<Self, String> {
        if let Some(p) = app_protocol {
            return Self::named(p).ok_or_else(|| {
                format!("appProtocol {p:?} is not one of tcp, http, http2, grpc, kubernetes.io/h2c")
            });
        }
        let prefix = name.map(|n| n.split('-').next().unwrap_or(n));
        Ok(prefix.and_then(Self::named).unwrap_or_default())
    }

    fn named(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "tcp" => Self::Tcp,
            "http" => Self::Http,
            "http2" | "kubernetes.io/h2c" => Self::Http2,
            "grpc" => Self::Grpc,
            _ => return None,
        })
    }

    /// HTTP of any version.
    pub fn is_http(self) -> bool {
        self != Self::Tcp
    }

    /// The name used in xDS and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Http2 => "http2",
            Self::Grpc => "grpc",
        }
    }
}

/// Validates routes against the model's services (which already carry their waypoints
/// and port protocols). Routes with problems are left out and their problems reported.
pub(super) fn validate(
    p: &mut Problems,
    routes: Vec<HttpRouteSpec>,
    services: &imbl::OrdMap<NamespacedName, std::sync::Arc<Service>>,
) -> BTreeMap<NamespacedName, HttpRoute> {
    let mut out = BTreeMap::new();
    for (i, r) in routes.into_iter().enumerate() {
        let place = format!("httpRoutes[{i}] ({}/{})", r.namespace, r.name);
        let before = p.0.len();
        let key = NamespacedName {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        };
        if !super::is_dns_subdomain(&r.name) {
            p.add(&place, "name must be a DNS name");
        }
        if out.contains_key(&key) {
            p.add(&place, format!("route {key} is defined twice"));
        }
        if r.parent_refs.is_empty() {
            p.add(
                &place,
                "parentRefs is empty: a mesh route attaches to a Service",
            );
        }
        let mut parents = Vec::new();
        for (j, pr) in r.parent_refs.iter().enumerate() {
            let at = format!("{place}.parentRefs[{j}]");
            if pr
                .group
                .as_deref()
                .is_some_and(|g| !g.is_empty() && g != "core")
                || pr.kind.as_deref() != Some("Service")
            {
                p.add(
                    &at,
                    "only Service parents are supported (the GAMMA mesh profile): set `kind: Service` and group \"\"",
                );
                continue;
            }
            let svc = NamespacedName {
                namespace: pr.namespace.clone().unwrap_or_else(|| r.namespace.clone()),
                name: pr.name.clone(),
            };
            let Some(s) = services.get(&svc) else {
                p.add(&at, format!("service {svc} is not defined"));
                continue;
            };
            if s.waypoint.is_none() {
                p.add(
                    &at,
                    format!(
                        "service {svc} has no waypoint (label ambit.dev/waypoint on it or its namespace), so nothing would apply this route"
                    ),
                );
                continue;
            }
            match pr.port {
                Some(port) => match s.ports.iter().find(|sp| sp.port == port) {
                    None => p.add(&at, format!("service {svc} has no port {port}")),
                    Some(sp) if !sp.protocol().is_http() => p.add(
                        &at,
                        format!(
                            "port {port} of service {svc} is tcp; name it http-… or set appProtocol to route HTTP"
                        ),
                    ),
                    Some(_) => parents.push((svc, Some(port))),
                },
                None if !s.ports.iter().any(|sp| sp.protocol().is_http()) => p.add(
                    &at,
                    format!("service {svc} has no HTTP port (name ports http-… or set appProtocol)"),
                ),
                None => parents.push((svc, None)),
            }
        }
        let mut hostnames = Vec::new();
        for (j, h) in r.hostnames.iter().enumerate() {
            let bare = h.strip_prefix("*.").unwrap_or(h);
            if !super::is_dns_subdomain(&bare.to_ascii_lowercase()) {
                p.add(
                    &format!("{place}.hostnames[{j}]"),
                    format!("{h:?} is not a host name"),
                );
            } else {
                hostnames.push(h.to_ascii_lowercase());
            }
        }
        let mut rules = Vec::new();
        for (j, rule) in r.rules.into_iter().enumerate() {
            let at = format!("{place}.rules[{j}]");
            if let Some(rule) = validate_rule(p, &at, &r.namespace, rule, services) {
                rules.push(rule);
            }
        }
        if p.0.len() > before {
            continue;
        }
        out.insert(
            key,
            HttpRoute {
                name: r.name,
                namespace: r.namespace,
                parents,
                hostnames,
                rules,
            },
        );
    }
    out
}

fn check_regex(p: &mut Problems, at: &str, re: &str) {
    if let Err(e) = regex::Regex::new(re) {
        p.add(at, format!("invalid regular expression {re:?}: {e}"));
    }
}

fn is_header_name(s: &str) -> bool {
    http::HeaderName::from_bytes(s.as_bytes()).is_ok() && !s.starts_with(':')
}

fn validate_rule(
    p: &mut Problems,
    at: &str,
    namespace: &str,
    rule: RuleSpec,
    services: &imbl::OrdMap<NamespacedName, std::sync::Arc<Service>>,
) -> Option<HttpRule> {
    let before = p.0.len();
    let mut matches = Vec::new();
    let specs = if rule.matches.is_empty() {
        vec![MatchSpec::default()]
    } else {
        rule.matches
    };
    for (k, m) in specs.into_iter().enumerate() {
        let at = format!("{at}.matches[{k}]");
        let (kind, value) = match &m.path {
            Some(pm) => (
                pm.kind.as_deref().unwrap_or("PathPrefix"),
                pm.value.clone().unwrap_or_else(|| "/".into()),
            ),
            None => ("PathPrefix", "/".into()),
        };
        let path = match kind {
            "Exact" | "PathPrefix" => {
                if !value.starts_with('/') || value.contains(['?', '#']) {
                    p.add(
                        &format!("{at}.path"),
                        format!("{value:?} must start with / and hold no query or fragment"),
                    );
                }
                if kind == "Exact" {
                    PathMatch::Exact(value)
                } else {
                    // `/a/` and `/a` are the same prefix.
                    let v = if value.len() > 1 {
                        value.trim_end_matches('/').to_owned()
                    } else {
                        value
                    };
                    PathMatch::Prefix(if v.is_empty() { "/".into() } else { v })
                }
            }
            "RegularExpression" => {
                check_regex(p, &format!("{at}.path"), &value);
                PathMatch::Regex(value)
            }
            other => {
                p.add(
                    &format!("{at}.path.type"),
                    format!("{other:?} is not Exact, PathPrefix or RegularExpression"),
                );
                continue;
            }
        };
        let mut values = |what: &str, list: Vec<ValueMatchSpec>, header: bool| {
            list.iter()
                .enumerate()
                .filter_map(|(n, v)| value_match(p, &format!("{at}.{what}[{n}]"), v, header))
                .collect::<Vec<_>>()
        };
        let headers = values("headers", m.headers, true);
        let query_params = values("queryParams", m.query_params, false);
        const METHODS: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ];
        if let Some(method) = &m.method
            && !METHODS.contains(&method.as_str())
        {
            p.add(
                &format!("{at}.method"),
                format!("{method:?} is not an HTTP method (GET, POST, ...)"),
            );
        }
        matches.push(HttpMatch {
            path,
            headers,
            query_params,
            method: m.method,
        });
    }

    let mut request_headers = HeaderModifier::default();
    let mut response_headers = HeaderModifier::default();
    let mut redirect = None;
    let mut rewrite = None;
    let mut mirrors = Vec::new();
    let check_modifier = |p: &mut Problems, at: &str, m: &HeaderModifier| {
        for h in m.set.iter().chain(&m.add) {
            if !is_header_name(&h.name) || http::HeaderValue::from_str(&h.value).is_err() {
                p.add(
                    at,
                    format!("header {:?}: {:?} is not valid", h.name, h.value),
                );
            }
        }
        for h in &m.remove {
            if !is_header_name(h) {
                p.add(at, format!("{h:?} is not a header name"));
            }
        }
    };
    let check_path_modifier = |p: &mut Problems,
                               at: &str,
                               m: &PathModifierSpec|
     -> Option<PathModifier> {
        let (path, prefix) = match (
            m.kind.as_str(),
            &m.replace_full_path,
            &m.replace_prefix_match,
        ) {
            ("ReplaceFullPath", Some(v), None) => (v, false),
            ("ReplacePrefixMatch", None, Some(v)) => (v, true),
            (k @ ("ReplaceFullPath" | "ReplacePrefixMatch"), _, _) => {
                p.add(at, format!("type {k} needs exactly its own field (replaceFullPath or replacePrefixMatch)"));
                return None;
            }
            (k, _, _) => {
                p.add(
                    at,
                    format!("{k:?} is not ReplaceFullPath or ReplacePrefixMatch"),
                );
                return None;
            }
        };
        if !path.starts_with('/') {
            p.add(at, format!("{path:?} must start with /"));
            return None;
        }
        Some(if prefix {
            PathModifier::Prefix(path.clone())
        } else {
            PathModifier::Full(path.clone())
        })
    };
    for (k, f) in rule.filters.iter().enumerate() {
        let at = format!("{at}.filters[{k}]");
        let set = [
            f.request_header_modifier.is_some(),
            f.response_header_modifier.is_some(),
            f.request_redirect.is_some(),
            f.url_rewrite.is_some(),
            f.request_mirror.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        let field = match f.kind.as_str() {
            "RequestHeaderModifier" => f.request_header_modifier.is_some(),
            "ResponseHeaderModifier" => f.response_header_modifier.is_some(),
            "RequestRedirect" => f.request_redirect.is_some(),
            "URLRewrite" => f.url_rewrite.is_some(),
            "RequestMirror" => f.request_mirror.is_some(),
            other => {
                p.add(
                    &at,
                    format!(
                        "filter type {other:?} is not supported (RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror)"
                    ),
                );
                continue;
            }
        };
        if !field || set != 1 {
            p.add(
                &at,
                format!("type {} needs its own field and no other", f.kind),
            );
            continue;
        }
        if let Some(m) = &f.request_header_modifier {
            check_modifier(p, &at, m);
            merge(&mut request_headers, m);
        }
        if let Some(m) = &f.response_header_modifier {
            check_modifier(p, &at, m);
            merge(&mut response_headers, m);
        }
        if let Some(r) = &f.request_redirect {
            if redirect.is_some() {
                p.add(&at, "only one RequestRedirect per rule");
            }
            let status_code = r.status_code.unwrap_or(302);
            if ![301, 302, 303, 307, 308].contains(&status_code) {
                p.add(
                    &at,
                    format!("statusCode {status_code} is not 301, 302, 303, 307 or 308"),
                );
            }
            if let Some(s) = &r.scheme
                && s != "http"
                && s != "https"
            {
                p.add(&at, format!("scheme {s:?} is not http or https"));
            }
            redirect = Some(Redirect {
                scheme: r.scheme.clone(),
                hostname: r.hostname.clone(),
                path: r
                    .path
                    .as_ref()
                    .and_then(|m| check_path_modifier(p, &format!("{at}.requestRedirect.path"), m)),
                port: r.port,
                status_code,
            });
        }
        if let Some(m) = &f.request_mirror {
            let at = format!("{at}.requestMirror");
            let percent = match (m.percent, &m.fraction) {
                (Some(_), Some(_)) => {
                    p.add(&at, "percent and fraction are exclusive");
                    continue;
                }
                (Some(pc), None) if pc <= 100 => f64::from(pc),
                (Some(pc), None) => {
                    p.add(&format!("{at}.percent"), format!("{pc} is not 0-100"));
                    continue;
                }
                (None, Some(fr)) => {
                    let d = fr.denominator.unwrap_or(100);
                    if d == 0 || fr.numerator > d {
                        p.add(
                            &format!("{at}.fraction"),
                            "needs 0 <= numerator <= denominator, denominator > 0",
                        );
                        continue;
                    }
                    f64::from(fr.numerator) * 100.0 / f64::from(d)
                }
                (None, None) => 100.0,
            };
            if m.backend_ref.weight.is_some() {
                p.add(
                    &format!("{at}.backendRef.weight"),
                    "a mirror's backend has no weight",
                );
                continue;
            }
            if let Some(b) = backend(
                p,
                &format!("{at}.backendRef"),
                namespace,
                &m.backend_ref,
                services,
            ) {
                mirrors.push(Mirror {
                    service: b.service,
                    port: b.port,
                    percent,
                });
            }
        }
        if let Some(r) = &f.url_rewrite {
            if rewrite.is_some() {
                p.add(&at, "only one URLRewrite per rule");
            }
            rewrite = Some(Rewrite {
                hostname: r.hostname.clone(),
                path: r
                    .path
                    .as_ref()
                    .and_then(|m| check_path_modifier(p, &format!("{at}.urlRewrite.path"), m)),
            });
        }
    }
    let prefix_modifier = |r: Option<&PathModifier>| matches!(r, Some(PathModifier::Prefix(_)));
    if (prefix_modifier(rewrite.as_ref().and_then(|r| r.path.as_ref()))
        || prefix_modifier(redirect.as_ref().and_then(|r| r.path.as_ref())))
        && !matches
            .iter()
            .all(|m| matches!(m.path, PathMatch::Prefix(_)))
    {
        p.add(
            at,
            "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
        );
    }
    if redirect.is_some() && (rewrite.is_some() || !rule.backend_refs.is_empty()) {
        p.add(
            at,
            "a rule with a RequestRedirect has no backendRefs and no URLRewrite",
        );
    }

    let mut backends = Vec::new();
    for (k, b) in rule.backend_refs.iter().enumerate() {
        if let Some(b) = backend(p, &format!("{at}.backendRefs[{k}]"), namespace, b, services) {
            backends.push(b);
        }
    }
    if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
        // Gateway API: all weights zero → every request gets 500; keep them, the
        // translator answers 500.
    }

    let duration = |p: &mut Problems, at: &str, s: &Option<String>| {
        s.as_deref().and_then(|s| match parse_duration(s) {
            Ok(d) => Some(d),
            Err(e) => {
                p.add(at, e);
                None
            }
        })
    };
    let timeouts = rule.timeouts.unwrap_or_default();
    let request_timeout =
        duration(p, &format!("{at}.timeouts.request"), &timeouts.request).filter(|d| !d.is_zero());
    let backend_timeout = duration(
        p,
        &format!("{at}.timeouts.backendRequest"),
        &timeouts.backend_request,
    )
    .filter(|d| !d.is_zero());
    if let (Some(r), Some(b)) = (request_timeout, backend_timeout)
        && b > r
    {
        p.add(
            &format!("{at}.timeouts"),
            "backendRequest must not be longer than request",
        );
    }
    let retry = match rule.retry {
        None => None,
        Some(r) => {
            let at = format!("{at}.retry");
            for c in &r.codes {
                if !(400..=599).contains(c) {
                    p.add(&format!("{at}.codes"), format!("{c} is not 400-599"));
                }
            }
            for c in &r.retry_on {
                if !RETRY_ON.contains(&c.as_str()) {
                    p.add(
                        &format!("{at}.retryOn"),
                        format!("{c:?} is not one of {}", RETRY_ON.join(", ")),
                    );
                }
            }
            let attempts = r.attempts.unwrap_or(1);
            if attempts > 10 {
                p.add(&format!("{at}.attempts"), "at most 10");
            }
            let backoff = duration(p, &format!("{at}.backoff"), &r.backoff)
                .unwrap_or(Duration::from_millis(25));
            let mut retry_on: Vec<String> = ["connect-failure", "refused-stream", "reset"]
                .into_iter()
                .map(str::to_owned)
                .collect();
            if !r.codes.is_empty() {
                retry_on.push("retriable-status-codes".into());
            }
            for c in r.retry_on {
                if !retry_on.contains(&c) {
                    retry_on.push(c);
                }
            }
            Some(Retry {
                attempts,
                backoff,
                codes: r.codes,
                retry_on,
            })
        }
    };
    let fault = rule.fault.map(|f| {
        let at = format!("{at}.fault");
        let percent = |p: &mut Problems, where_: &str, v: Option<PercentSpec>| {
            let v = v.map_or(100.0, |v| v.value);
            if !(0.0..=100.0).contains(&v) {
                p.add(
                    &format!("{at}.{where_}.percentage.value"),
                    format!("{v} is not 0-100"),
                );
            }
            v
        };
        if f.delay.is_none() && f.abort.is_none() {
            p.add(&at, "a fault needs a delay or an abort");
        }
        let delay = f.delay.map(|d| {
            let pct = percent(p, "delay", d.percentage);
            let t = duration(p, &format!("{at}.delay.fixedDelay"), &Some(d.fixed_delay))
                .unwrap_or_default();
            (t, pct)
        });
        let abort = f.abort.and_then(|a| {
            let pct = percent(p, "abort", a.percentage);
            match (a.http_status, a.grpc_status) {
                (Some(s), None) if (200..=599).contains(&s) => Some((Abort::Http(s), pct)),
                (Some(s), None) => {
                    p.add(
                        &format!("{at}.abort.httpStatus"),
                        format!("{s} is not 200-599"),
                    );
                    None
                }
                (None, Some(g)) => {
                    let code = GRPC_CODES
                        .iter()
                        .position(|n| *n == g)
                        .map(|i| i as u32)
                        .or_else(|| g.parse::<u32>().ok().filter(|c| *c <= 16));
                    match code {
                        Some(c) => Some((Abort::Grpc(c), pct)),
                        None => {
                            p.add(
                                &format!("{at}.abort.grpcStatus"),
                                format!("{g:?} is not a gRPC status (UNAVAILABLE, 14, ...)"),
                            );
                            None
                        }
                    }
                }
                _ => {
                    p.add(
                        &format!("{at}.abort"),
                        "needs exactly one of httpStatus and grpcStatus",
                    );
                    None
                }
            }
        });
        let headers = f
            .headers
            .iter()
            .enumerate()
            .filter_map(|(k, h)| value_match(p, &format!("{at}.headers[{k}]"), h, true))
            .collect();
        Fault {
            delay,
            abort,
            headers,
        }
    });
    let rate_limit = rule
        .rate_limit
        .and_then(|r| super::ratelimit::validate(p, &format!("{at}.rateLimit"), r));
    if p.0.len() > before {
        return None;
    }
    Some(HttpRule {
        matches,
        request_headers,
        response_headers,
        redirect,
        rewrite,
        backends,
        request_timeout,
        backend_timeout,
        retry,
        fault,
        rate_limit,
        mirrors,
    })
}

/// A `backendRef` checked against the services defined: a Service port in the route's
/// namespace.
fn backend(
    p: &mut Problems,
    at: &str,
    namespace: &str,
    b: &BackendRefSpec,
    services: &imbl::OrdMap<NamespacedName, std::sync::Arc<Service>>,
) -> Option<Backend> {
    if b.group
        .as_deref()
        .is_some_and(|g| !g.is_empty() && g != "core")
        || b.kind.as_deref().is_some_and(|k| k != "Service")
    {
        p.add(at, "only Service backends are supported");
        return None;
    }
    let ns = b.namespace.clone().unwrap_or_else(|| namespace.to_owned());
    if ns != namespace {
        p.add(
            at,
            format!(
                "backend in namespace {ns:?}: a route may only send to its own namespace's services (ReferenceGrant is not supported)"
            ),
        );
        return None;
    }
    let svc = NamespacedName {
        namespace: ns,
        name: b.name.clone(),
    };
    let Some(s) = services.get(&svc) else {
        p.add(at, format!("service {svc} is not defined"));
        return None;
    };
    let Some(port) = b.port else {
        p.add(at, "port is required for a Service backend");
        return None;
    };
    if !s.ports.iter().any(|sp| sp.port == port) {
        p.add(at, format!("service {svc} has no port {port}"));
        return None;
    }
    let weight = b.weight.unwrap_or(1);
    if weight > MAX_WEIGHT {
        p.add(at, format!("weight {weight} is over {MAX_WEIGHT}"));
        return None;
    }
    Some(Backend {
        service: svc,
        port,
        weight,
    })
}

/// A header (`header`, names lowercased) or query parameter match.
fn value_match(p: &mut Problems, at: &str, v: &ValueMatchSpec, header: bool) -> Option<ValueMatch> {
    if header && !is_header_name(&v.name) || !header && v.name.is_empty() {
        p.add(at, format!("{:?} is not a valid name", v.name));
    }
    let value = match v.kind.as_deref().unwrap_or("Exact") {
        "Exact" => StringMatch::Exact(v.value.clone()),
        "RegularExpression" => {
            check_regex(p, at, &v.value);
            StringMatch::Regex(v.value.clone())
        }
        other => {
            p.add(
                &format!("{at}.type"),
                format!("{other:?} is not Exact or RegularExpression"),
            );
            return None;
        }
    };
    Some(ValueMatch {
        name: if header {
            v.name.to_ascii_lowercase()
        } else {
            v.name.clone()
        },
        value,
    })
}

fn merge(into: &mut HeaderModifier, m: &HeaderModifier) {
    into.set.extend(m.set.iter().cloned());
    into.add.extend(m.add.iter().cloned());
    into.remove.extend(m.remove.iter().cloned());
}

/// Gateway API's precedence between matches of routes on one parent: an exact path,
/// then (Ambit's choice for the implementation-specific case) a regular expression,
/// then the longest prefix, then a method, then more header matches, then more query
/// matches. Ties keep the order of routes (by namespace/name) and rules.
pub fn precedence(m: &HttpMatch) -> impl Ord {
    let path = match &m.path {
        PathMatch::Exact(_) => (0, 0),
        PathMatch::Regex(_) => (1, 0),
        PathMatch::Prefix(p) => (2, usize::MAX - p.len()),
    };
    (
        path,
        m.method.is_none(),
        usize::MAX - m.headers.len(),
        usize::MAX - m.query_params.len(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_gateway_api_writes_them() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "10", "1.5s", "s", "1d", "1h1h1h1h1h", "123456s", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn protocols_come_from_app_protocol_or_the_name_prefix() {
        assert_eq!(Protocol::of(None, Some("http")), Ok(Protocol::Http));
        assert_eq!(Protocol::of(None, Some("http-web")), Ok(Protocol::Http));
        assert_eq!(Protocol::of(None, Some("grpc-api")), Ok(Protocol::Grpc));
        assert_eq!(Protocol::of(None, Some("http2")), Ok(Protocol::Http2));
        assert_eq!(Protocol::of(None, Some("web")), Ok(Protocol::Tcp));
        assert_eq!(Protocol::of(None, None), Ok(Protocol::Tcp));
        assert_eq!(
            Protocol::of(Some("kubernetes.io/h2c"), Some("tcp")),
            Ok(Protocol::Http2)
        );
        assert!(Protocol::of(Some("thrift"), None).is_err());
    }
}
