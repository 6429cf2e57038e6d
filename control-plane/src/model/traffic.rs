//! Traffic policy for a service's waypoint clusters: Istio's `DestinationRule`.
//!
//! [`DestinationRuleSpec`] has Istio's shape and field names (`host`,
//! `trafficPolicy.loadBalancer.simple`), so a platform team moving off Istio reads it as
//! it is, and the Kubernetes source can later take a real `DestinationRule`'s spec field
//! for field. Today it sets the load balancer and the retry limit
//! (`connectionPool.http.maxRetries`) of the Envoy `Cluster`s the waypoint uses for the
//! service (the node agents' L4 balancing is not affected, as ztunnel ignores
//! DestinationRules too).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{NamespacedName, Problems, Service};

/// A `DestinationRule` as a source reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// Its name, unique in its namespace.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// The service: its short name (in the rule's namespace) or its full host name
    /// (`<name>.<namespace>.svc.cluster.local`).
    pub host: String,
    /// What applies to traffic to it.
    #[serde(default)]
    pub traffic_policy: TrafficPolicySpec,
}

/// `trafficPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// `loadBalancer`.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSpec>,
    /// `connectionPool`.
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSpec>,
    /// `outlierDetection`.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionSpec>,
}

/// `outlierDetection`: endpoints that keep failing are ejected from the service's
/// waypoint clusters for a while (Envoy's `outlier_detection`, as Istio writes it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    /// 5xx answers (or connection failures, resets, timeouts) in a row that eject an
    /// endpoint (Envoy's default 5); 0 turns this off.
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    /// 502, 503 or 504 answers (or connection failures, resets, timeouts) in a row that
    /// eject an endpoint; off unless set.
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// How often ejections are reviewed (default 10s).
    #[serde(default)]
    pub interval: Option<String>,
    /// An endpoint's first ejection lasts this long, each next one this much longer
    /// (default 30s; at most 300s).
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    /// At most this percentage of the endpoints is ejected at once (default 10), and
    /// always at least one may be.
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
    /// Below this percentage of endpoints not ejected, ejections are ignored and all
    /// endpoints are used (Envoy's panic threshold; Istio's default 0: never).
    #[serde(default)]
    pub min_health_percent: Option<u32>,
}

/// Validated outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OutlierDetection {
    /// `consecutive5xxErrors` as written (`None`: Envoy's default, 5).
    pub consecutive_5xx: Option<u32>,
    /// `consecutiveGatewayErrors`, if set.
    pub consecutive_gateway: Option<u32>,
    /// `interval`, if set.
    pub interval: Option<std::time::Duration>,
    /// `baseEjectionTime`, if set.
    pub base_ejection_time: Option<std::time::Duration>,
    /// `maxEjectionPercent`, if set.
    pub max_ejection_percent: Option<u32>,
    /// `minHealthPercent` (0 unless set).
    pub min_health_percent: u32,
}

/// `connectionPool`: the circuit breakers of the service's waypoint clusters (Envoy's
/// `circuit_breakers`; without a field, no limit, as Istio's defaults).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPoolSpec {
    /// `tcp`.
    #[serde(default)]
    pub tcp: Option<TcpPoolSpec>,
    /// `http`.
    #[serde(default)]
    pub http: Option<HttpPoolSpec>,
}

/// `connectionPool.tcp`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpPoolSpec {
    /// `maxConnections`: connections a waypoint opens to the service at once (Envoy's
    /// `max_connections`); HTTP/1.1 requests beyond them wait (see
    /// `http1MaxPendingRequests`), TCP connections beyond them are refused.
    #[serde(default)]
    pub max_connections: Option<u32>,
}

/// `connectionPool.http`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpPoolSpec {
    /// `http1MaxPendingRequests`: requests waiting for a connection at once (Envoy's
    /// `max_pending_requests`); beyond, 503 `UO`.
    #[serde(default)]
    pub http1_max_pending_requests: Option<u32>,
    /// `http2MaxRequests`: requests to the service in flight at once, whatever the
    /// protocol (Envoy's `max_requests`); beyond, 503 `UO`.
    #[serde(default)]
    pub http2_max_requests: Option<u32>,
    /// `maxRetries`: retries outstanding to the service at once, from all its waypoint's
    /// requests (Envoy's `max_retries` circuit breaker). Without it, a retry budget
    /// applies: 20 % of the requests in flight, at least 3.
    #[serde(default)]
    pub max_retries: Option<u32>,
}

/// What a service's `DestinationRule` says, as the translator uses it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TrafficPolicy {
    /// How a waypoint picks among its endpoints.
    pub load_balancer: LoadBalancer,
    /// A fixed limit on concurrent retries instead of the default retry budget.
    pub max_retries: Option<u32>,
    /// Connections at once (`None`: no limit).
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection at once (`None`: no limit).
    pub max_pending_requests: Option<u32>,
    /// Requests in flight at once (`None`: no limit).
    pub max_requests: Option<u32>,
    /// Outlier detection, if any.
    pub outlier_detection: Option<OutlierDetection>,
}

/// `loadBalancer`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    /// `ROUND_ROBIN` or `LEAST_REQUEST` (Istio's `simple` names).
    pub simple: String,
}

/// How a waypoint picks among a service's endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LoadBalancer {
    /// In turn (Envoy's and Istio's default).
    #[default]
    RoundRobin,
    /// The less busy of two endpoints drawn at random (power of two choices).
    LeastRequest,
}

/// Checks the rules against the services and sets each service's
/// [`Service::traffic`]. A service has at most one rule. It applies wherever a
/// waypoint sends to the service (as a route's backend), whether or not the service
/// has a waypoint of its own.
pub(super) fn apply(
    p: &mut Problems,
    rules: Vec<DestinationRuleSpec>,
    services: &mut imbl::OrdMap<NamespacedName, std::sync::Arc<Service>>,
) {
    let mut seen: BTreeMap<NamespacedName, NamespacedName> = BTreeMap::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, r) in rules.into_iter().enumerate() {
        let place = format!("destinationRules[{i}] ({}/{})", r.namespace, r.name);
        let key = NamespacedName {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        };
        if !super::is_dns_subdomain(&r.name) {
            p.add(&place, "name must be a DNS name");
        }
        if !names.insert(key.clone()) {
            p.add(&place, format!("destination rule {key} is defined twice"));
            continue;
        }
        let svc = match r.host.split_once('.') {
            None => NamespacedName {
                namespace: r.namespace.clone(),
                name: r.host.clone(),
            },
            Some((name, rest)) => match rest.strip_suffix(".svc.cluster.local") {
                Some(ns) if !ns.contains('.') => NamespacedName {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                },
                _ => {
                    p.add(
                        &format!("{place}.host"),
                        format!(
                            "{:?} is neither a service's name nor <name>.<namespace>.svc.cluster.local",
                            r.host
                        ),
                    );
                    continue;
                }
            },
        };
        let Some(service) = services.get_mut(&svc) else {
            p.add(
                &format!("{place}.host"),
                format!("service {svc} is not defined"),
            );
            continue;
        };
        if let Some(other) = seen.get(&svc) {
            p.add(
                &format!("{place}.host"),
                format!("service {svc} already has destination rule {other}"),
            );
            continue;
        }
        let lb = match r
            .traffic_policy
            .load_balancer
            .as_ref()
            .map(|l| l.simple.as_str())
        {
            None | Some("ROUND_ROBIN") | Some("UNSPECIFIED") => LoadBalancer::RoundRobin,
            Some("LEAST_REQUEST") | Some("LEAST_CONN") => LoadBalancer::LeastRequest,
            Some(other) => {
                p.add(
                    &format!("{place}.trafficPolicy.loadBalancer.simple"),
                    format!("{other:?} is not supported: use ROUND_ROBIN or LEAST_REQUEST"),
                );
                continue;
            }
        };
        let pool = r.traffic_policy.connection_pool.as_ref();
        let http = pool.and_then(|c| c.http.as_ref());
        let limits = [
            (
                "tcp.maxConnections",
                pool.and_then(|c| c.tcp.as_ref())
                    .and_then(|t| t.max_connections),
            ),
            (
                "http.http1MaxPendingRequests",
                http.and_then(|h| h.http1_max_pending_requests),
            ),
            (
                "http.http2MaxRequests",
                http.and_then(|h| h.http2_max_requests),
            ),
        ];
        if let Some((field, _)) = limits.iter().find(|(_, v)| *v == Some(0)) {
            p.add(
                &format!("{place}.trafficPolicy.connectionPool.{field}"),
                "must be at least 1 (0 would refuse every request)",
            );
            continue;
        }
        let outlier_detection = match &r.traffic_policy.outlier_detection {
            None => None,
            Some(o) => {
                let at = format!("{place}.trafficPolicy.outlierDetection");
                match outlier_detection(o) {
                    Ok(o) => Some(o),
                    Err((field, e)) => {
                        p.add(&format!("{at}.{field}"), e);
                        continue;
                    }
                }
            }
        };
        std::sync::Arc::make_mut(service).traffic = TrafficPolicy {
            load_balancer: lb,
            max_retries: http.and_then(|h| h.max_retries),
            max_connections: limits[0].1,
            max_pending_requests: limits[1].1,
            max_requests: limits[2].1,
            outlier_detection,
        };
        seen.insert(svc, key);
    }
}

/// Checks `outlierDetection`: an error names its field.
fn outlier_detection(o: &OutlierDetectionSpec) -> Result<OutlierDetection, (&'static str, String)> {
    let time = |field: &'static str, v: &Option<String>| -> Result<_, (&'static str, String)> {
        match v {
            None => Ok(None),
            Some(s) => match super::http::parse_duration(s) {
                Ok(d) if d >= std::time::Duration::from_millis(1) => Ok(Some(d)),
                Ok(_) => Err((field, format!("{s:?} is under 1ms"))),
                Err(e) => Err((field, e)),
            },
        }
    };
    let percent = |field: &'static str, v: Option<u32>| match v {
        Some(n) if n > 100 => Err((field, format!("{n} is not 0-100"))),
        v => Ok(v),
    };
    Ok(OutlierDetection {
        consecutive_5xx: o.consecutive_5xx_errors,
        consecutive_gateway: o.consecutive_gateway_errors,
        interval: time("interval", &o.interval)?,
        base_ejection_time: time("baseEjectionTime", &o.base_ejection_time)?,
        max_ejection_percent: percent("maxEjectionPercent", o.max_ejection_percent)?,
        min_health_percent: percent("minHealthPercent", o.min_health_percent)?.unwrap_or(0),
    })
}
