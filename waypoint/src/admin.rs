//! The waypoint's HTTP endpoints, as the node agent's: `/metrics` (Prometheus),
//! `/healthz/ready`, and on the localhost admin listener `/debug/config_dump` — what the
//! waypoint is running: its xDS state and every listener, route, cluster (with its
//! requests and retries in flight), endpoint, fronted workload and L4 policy it holds.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

use crate::config::{
    Action, Config, Endpoint, HeaderMatch, ListenerKind, PathMatch, RetryLimit, Route, StringMatch,
};
use crate::identity::Certs;
use crate::telemetry::Metrics;

/// What the endpoints show, and nothing else.
#[derive(Debug)]
pub struct AdminState {
    /// The waypoint's xDS node id (`<namespace>/<name>`).
    pub node: String,
    /// The control plane's address.
    pub xds_address: String,
    /// True once the waypoint serves with a certificate and a whole configuration.
    pub ready: AtomicBool,
    /// The xDS client's state.
    pub xds: Arc<ambit_xds::client::XdsStatus>,
    /// The configuration being served.
    pub config: watch::Receiver<Arc<Config>>,
    /// The current certificate.
    pub certs: watch::Receiver<Option<Arc<Certs>>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// `/metrics` and `/healthz/ready` (the Prometheus port, 15020).
    Metrics,
    /// `/healthz/ready` only (15021).
    Ready,
    /// Everything, including `/debug/config_dump` (bind it to localhost; 15000).
    Admin,
}

/// Serves HTTP/1.1 on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, endpoints: Endpoints) {
    loop {
        let (tcp, _) = crate::inbound::accept(&listener).await;
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, endpoints, &req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await
            {
                debug!("admin connection: {e}");
            }
        });
    }
}

fn route<B>(state: &AdminState, endpoints: Endpoints, req: &Request<B>) -> Response<Full<Bytes>> {
    use Endpoints::*;
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match (endpoints, req.uri().path()) {
        (Metrics | Admin, "/metrics") => Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(state.metrics.encode())))
            .expect("static response parts are valid"),
        (_, "/healthz/ready") => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: waiting for a certificate and a whole configuration\n".into(),
                )
            }
        }
        (Admin, "/debug/config_dump") => {
            let body = serde_json::to_vec_pretty(&dump(state))
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts are valid")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// The whole dump.
pub fn dump(state: &AdminState) -> Value {
    let x = &state.xds;
    json!({
        "node": state.node,
        "ready": state.ready.load(Ordering::Acquire),
        "identity": state.certs.borrow().as_ref().map(|c| c.identity.as_str().to_owned()),
        "xds": {
            "address": state.xds_address,
            "connected": x.connected.load(Ordering::Acquire),
            "connects": x.connects.load(Ordering::Relaxed),
            "acks": x.acks.load(Ordering::Relaxed),
            "nacks": x.nacks.load(Ordering::Relaxed),
            "types": x.types(),
        },
        "config": config_dump(&state.config.borrow()),
    })
}

/// A configuration as JSON: every resource the waypoint holds, by type and name.
pub fn config_dump(c: &Config) -> Value {
    let r = &c.resources;
    let listeners: Vec<Value> = r
        .listeners
        .values()
        .map(|l| {
            let (kind, target) = match &l.kind {
                ListenerKind::Http {
                    route_config,
                    filters,
                    normalize_path,
                    merge_slashes,
                } => (
                    "http",
                    json!({
                        "route_config": route_config,
                        "normalize_path": normalize_path,
                        "merge_slashes": merge_slashes,
                        "http_filters": filters.iter().map(filter_json).collect::<Vec<_>>(),
                    }),
                ),
                ListenerKind::Tcp { cluster, rbac } => (
                    "tcp",
                    json!({
                        "cluster": cluster,
                        "rbac": rbac.iter().map(|r| rbac_json(r)).collect::<Vec<_>>(),
                    }),
                ),
            };
            json!({
                "name": l.name,
                "addresses": l.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "kind": kind,
                "filter": target,
            })
        })
        .collect();
    let routes: Vec<Value> = r
        .routes
        .values()
        .map(|rc| {
            json!({
                "name": rc.name,
                "virtual_hosts": rc.virtual_hosts.iter().map(|vh| json!({
                    "name": vh.name,
                    "domains": vh.domains,
                    "routes": vh.routes.iter().map(route_json).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let clusters: Vec<Value> = r
        .clusters
        .values()
        .map(|cl| {
            let (requests, retries) = cl.load.now();
            let (connections, pending) = cl.load.connections_and_pending();
            json!({
                "name": cl.name,
                "protocol": format!("{:?}", cl.protocol),
                "lb_policy": format!("{:?}", cl.lb),
                "connect_timeout_ms": cl.connect_timeout.as_millis() as u64,
                "eds_name": cl.eds_name,
                "retry_limit": match cl.retry_limit {
                    RetryLimit::Max(n) => json!({"max_retries": n}),
                    RetryLimit::Budget { percent, min } => json!({
                        "retry_budget": {"budget_percent": percent, "min_retry_concurrency": min}
                    }),
                },
                "circuit_breakers": {
                    "max_connections": cl.limits.max_connections,
                    "max_pending_requests": cl.limits.max_pending_requests,
                    "max_requests": cl.limits.max_requests,
                },
                "requests_in_flight": requests,
                "retries_in_flight": retries,
                "connections_open": connections,
                "requests_pending": pending,
                "healthy_panic_threshold": cl.panic_threshold,
                "outlier_detection": cl.outlier.as_ref().map(|o| {
                    let c = o.config();
                    json!({
                        "consecutive_5xx": c.consecutive_5xx,
                        "enforcing_consecutive_5xx": (c.enforcing_5xx * 100.0).round(),
                        "consecutive_gateway_failure": c.consecutive_gateway,
                        "enforcing_consecutive_gateway_failure": (c.enforcing_gateway * 100.0).round(),
                        "interval_ms": c.interval.as_millis() as u64,
                        "base_ejection_time_ms": c.base_ejection_time.as_millis() as u64,
                        "max_ejection_time_ms": c.max_ejection_time.as_millis() as u64,
                        "max_ejection_percent": c.max_ejection_percent,
                        "ejected": o.ejected().iter().map(ToString::to_string).collect::<Vec<_>>(),
                    })
                }),
            })
        })
        .collect();
    let endpoints: serde_json::Map<String, Value> = r
        .endpoints
        .iter()
        .map(|(name, eps)| {
            (
                name.clone(),
                eps.iter().map(endpoint_json).collect::<Vec<_>>().into(),
            )
        })
        .collect();
    let fronted: Vec<Value> = r
        .workloads
        .values()
        .map(|w| {
            json!({
                "namespace": w.namespace,
                "name": w.name,
                "ips": w.ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                "hbone_identity": w.hbone.as_ref().map(|i| i.as_str().to_owned()),
            })
        })
        .collect();
    json!({
        "listeners": listeners,
        "route_configs": routes,
        "clusters": clusters,
        "endpoints": endpoints,
        "fronted_workloads": fronted,
        "l4_policies": r.policies.values().map(|p| serde_json::to_value(&**p).unwrap_or_default()).collect::<Vec<_>>(),
    })
}

fn filter_json(f: &crate::filter::NamedFilter) -> Value {
    use crate::filter::HttpFilter;
    let config = match &f.filter {
        HttpFilter::Fault(fault) => json!({"fault": fault.as_deref().map(fault_json)}),
        HttpFilter::Rbac(r) => rbac_json(r),
        HttpFilter::RateLimit(r) => json!({
            "stat_prefix": r.stat_prefix,
            "active": r.is_active(),
            "per_value_buckets": r.dynamic_buckets(),
        }),
        HttpFilter::Jwt(j) => json!({
            "providers": j.providers.values().map(|p| json!({
                "name": p.name,
                "issuer": p.issuer,
                "audiences": p.audiences,
                "jwks": match &p.keys {
                    crate::filter::jwt::Keys::Inline(k) => json!({"inline_keys": k.keys.len()}),
                    crate::filter::jwt::Keys::Remote(r) => json!({"uri": r.uri.to_string(), "cluster": r.cluster}),
                },
            })).collect::<Vec<_>>(),
            "rules": j.rules.len(),
        }),
    };
    json!({"name": f.name, "kind": f.filter.kind(), "config": config})
}

/// An RBAC filter: its action, and its policies' names (what a denial's details and the
/// metrics name) and sizes.
fn rbac_json(r: &crate::filter::rbac::Rbac) -> Value {
    json!({
        "action": r.action.as_str(),
        "policies": r.policies.iter().map(|(name, p)| json!({
            "name": name,
            "permissions": p.permissions.len(),
            "principals": p.principals.len(),
        })).collect::<Vec<_>>(),
    })
}

fn fault_json(f: &crate::config::Fault) -> Value {
    json!({
        "delay": f.delay.map(|(d, p)| json!({"fixed_delay_ms": d.as_millis() as u64, "probability": p})),
        "abort": f.abort.map(|(a, p)| json!({
            "status": match a {
                crate::config::FaultAbort::Http(s) => json!({"http": s.as_u16()}),
                crate::config::FaultAbort::Grpc(g) => json!({"grpc": g}),
            },
            "probability": p,
        })),
        "headers": f.headers.iter().map(header_match).collect::<Vec<_>>(),
    })
}

fn endpoint_json(e: &Endpoint) -> Value {
    json!({
        "address": e.addr.to_string(),
        "weight": e.weight,
        "hbone_identity": e.hbone.as_ref().map(|i| i.as_str().to_owned()),
        "workload": e.workload.as_ref().map(|w| format!("{}/{}", w.namespace, w.name)),
    })
}

fn string_match(m: &StringMatch) -> Value {
    match m {
        StringMatch::Exact(s) => json!({"exact": s}),
        StringMatch::Prefix(s) => json!({"prefix": s}),
        StringMatch::Suffix(s) => json!({"suffix": s}),
        StringMatch::Contains(s) => json!({"contains": s}),
        StringMatch::Regex(r) => json!({"regex": r.as_str()}),
        StringMatch::Present => json!({"present": true}),
        StringMatch::IgnoreCase(m) => json!({"ignore_case": string_match(m)}),
    }
}

fn header_match(h: &HeaderMatch) -> Value {
    json!({"name": h.name, "value": string_match(&h.value), "invert": h.invert})
}

fn route_json(r: &Route) -> Value {
    let path = match &r.matcher.path {
        PathMatch::Prefix(p) => json!({"prefix": p}),
        PathMatch::Exact(p) => json!({"path": p}),
        PathMatch::SeparatedPrefix(p) => json!({"path_separated_prefix": p}),
        PathMatch::Regex(re) => json!({"safe_regex": re.as_str()}),
    };
    let action = match &r.action {
        Action::Forward(f) => json!({"route": {
            "clusters": f.clusters.iter().map(|(c, w)| json!({"name": c, "weight": w})).collect::<Vec<_>>(),
            "timeout_ms": f.timeout.map(|t| t.as_millis() as u64),
            "retry_policy": f.retry.as_ref().map(|p| json!({
                "retry_on": format!("{:?}", p.retry_on),
                "num_retries": p.num_retries,
                "per_try_timeout_ms": p.per_try_timeout.map(|t| t.as_millis() as u64),
                "retriable_status_codes": p.retriable_status_codes,
                "base_interval_ms": p.base_interval.as_millis() as u64,
                "max_interval_ms": p.max_interval.as_millis() as u64,
            })),
            "prefix_rewrite": f.prefix_rewrite,
            "regex_rewrite": f.regex_rewrite.as_ref().map(|(re, s)| json!({"pattern": re.as_str(), "substitution": s})),
            "host_rewrite": f.host_rewrite,
        }}),
        Action::Redirect(rd) => json!({"redirect": {
            "scheme": rd.scheme, "host": rd.host, "port": rd.port, "path": rd.path,
            "prefix_rewrite": rd.prefix_rewrite, "status": rd.status.as_u16(),
            "strip_query": rd.strip_query,
        }}),
        Action::Direct { status, body } => json!({"direct_response": {
            "status": status.as_u16(),
            "body": String::from_utf8_lossy(body),
        }}),
    };
    let headers = |ops: &[crate::config::HeaderOp]| -> Vec<Value> {
        ops.iter()
            .map(|o| {
                json!({
                    "name": o.name.as_str(),
                    "value": String::from_utf8_lossy(o.value.as_bytes()),
                    "overwrite": o.overwrite,
                })
            })
            .collect()
    };
    let names = |ns: &[http::HeaderName]| -> Vec<String> {
        ns.iter().map(|n| n.as_str().to_owned()).collect()
    };
    json!({
        "name": r.name,
        "match": {
            "path": path,
            "headers": r.matcher.headers.iter().map(header_match).collect::<Vec<_>>(),
            "query_parameters": r.matcher.query.iter().map(|q| json!({"name": q.name, "value": string_match(&q.value)})).collect::<Vec<_>>(),
        },
        "action": action,
        "request_headers_to_add": headers(&r.request_headers_to_add),
        "request_headers_to_remove": names(&r.request_headers_to_remove),
        "response_headers_to_add": headers(&r.response_headers_to_add),
        "response_headers_to_remove": names(&r.response_headers_to_remove),
        "fault": r.fault.as_deref().map(fault_json),
    })
}
