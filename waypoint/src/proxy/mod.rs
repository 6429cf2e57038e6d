//! One HTTP request through the waypoint, as Envoy's HTTP connection manager runs it:
//! the route is picked ([`router`](crate::router)), the listener's HTTP filters run in
//! their order ([`filter`](crate::filter): RBAC, fault injection), then the route's
//! action — a direct response, a redirect, or forwarding ([`forward`]) to a weighted
//! cluster with header changes, rewrites, retries, timeouts and mirrors ([`mirror`]).
//! Every request is reported once, when its response ends ([`report`]).
//!
//! Responses stream back as they arrive; only a retryable request's body is held, up to
//! [`RETRY_BUFFER`](crate::body::RETRY_BUFFER).

mod forward;
mod mirror;
mod report;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use ambit_identity::Identity;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::body::{self, Counted, ProxyBody, Reported};
use crate::config::{Action, Config, HeaderOp, ListenerKind, PathMatch, Redirect, Route};
use crate::filter::{HttpFilter, Metadata, rbac};
use crate::{router, trace};
pub use report::Report;
use report::{Exchange, Flag};

/// What every request on one inbound tunnel shares.
#[derive(Debug)]
pub struct RequestContext {
    /// The configuration (each request reads the latest and keeps it).
    pub config: watch::Receiver<Arc<Config>>,
    /// Upstream connections.
    pub upstreams: Arc<Upstreams>,
    /// The service address the tunnel is for (its CONNECT authority): each request
    /// takes that listener's filters and routes from the configuration it reads, so a
    /// policy change applies to the next request, not the next tunnel.
    pub authority: SocketAddr,
    /// The listener's name (for the access log and metrics).
    pub listener: String,
    /// The caller's identity (from its HBONE certificate), if any.
    pub peer: Option<Identity>,
    /// The caller's IP (`forwarded: for=` of its tunnel).
    pub client: Option<IpAddr>,
    /// Where requests are counted.
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// Where request spans go, if anywhere.
    pub tracing: Option<ambit_otel::Tracing>,
    /// The tunnel's trace context (its CONNECT's `traceparent`: the client agent's span).
    pub tunnel_trace: Option<ambit_otel::SpanContext>,
    /// What every request of the tunnel is counted under (its code, flags and protocol
    /// are filled in per request).
    pub series: crate::telemetry::TunnelSeries,
}

use crate::upstream::Upstreams;

/// What the filters answered instead of the route, if anything.
struct LocalReply {
    response: Response<ProxyBody>,
    flag: Option<Flag>,
    /// Envoy's `response_code_details`.
    details: String,
}

/// Serves one request. Its metrics and access-log line are written when its response
/// ends ([`Report`]), so that they carry the sizes, the gRPC status of the trailers and
/// the duration to the last byte, as Envoy's do.
pub async fn handle(
    ctx: Arc<RequestContext>,
    req: Request<Incoming>,
) -> Result<Response<Reported<Report>>, Infallible> {
    let started = Instant::now();
    let config = ctx.config.borrow().clone();
    let (mut parts, body) = req.into_parts();
    let span = ctx
        .tracing
        .as_ref()
        .map(|t| start_span(t, &ctx, &mut parts));
    let traceparent = trace_context(&mut parts.headers);
    let request_header_bytes = (parts.method.as_str().len()
        + parts.uri.path_and_query().map_or(1, |p| p.as_str().len())
        + parts.uri.authority().map_or(0, |a| a.as_str().len()))
        as u64
        + header_bytes(&parts.headers);
    let request_bytes = Arc::new(AtomicU64::new(0));
    let body = Counted::new(body, request_bytes.clone());
    // Reported however the request ends: if the client goes away before the answer
    // (this future is dropped), as code 0 with `DC`, as Envoy does. For the access log,
    // cheap clones (shared bytes), read only when it is written.
    let mut report = Report::new(Exchange::new(
        ctx.clone(),
        started,
        &parts,
        request_header_bytes,
        request_bytes,
        traceparent,
        span,
    ));
    let (route_config, filters, normalize, merge) =
        match config.listener(ctx.authority).map(|l| &l.kind) {
            Some(ListenerKind::Http {
                route_config,
                filters,
                normalize_path,
                merge_slashes,
            }) => (
                route_config.as_str(),
                filters.as_slice(),
                *normalize_path,
                *merge_slashes,
            ),
            // The listener went away (or is no longer HTTP) since the tunnel began.
            _ => ("", &[][..], false, false),
        };
    // One path for filters, routes and the upstream (Envoy normalizes before all).
    if (normalize || merge) && !normal_path(&mut parts, normalize, merge) {
        let r = body::text(StatusCode::BAD_REQUEST, "Bad Request");
        return Ok(report.respond(r, None, "path_normalization_failed".into(), 0, None));
    }
    let route = pick(&config, route_config, &parts);
    let mut added = HeaderMap::new();
    let reply = run_filters(
        &ctx,
        &config,
        filters,
        route,
        &mut parts,
        &mut report,
        &mut added,
    )
    .await;
    let mut attempts = 0;
    let mut upstream = None;
    let (resp, flag, details) = match (reply, route) {
        (Some(r), _) => (r.response, r.flag, r.details),
        (None, None) => (
            body::text(StatusCode::NOT_FOUND, ""),
            Some(Flag::NoRoute),
            "route_not_found".to_owned(),
        ),
        (None, Some(route)) => match &route.action {
            Action::Direct { status, body: b } => {
                let mut r = Response::new(body::full(b.clone()));
                *r.status_mut() = *status;
                (r, Some(Flag::Direct), "direct_response".to_owned())
            }
            Action::Redirect(rd) => (
                redirect(rd, route, &parts),
                Some(Flag::Direct),
                "direct_response".to_owned(),
            ),
            Action::Forward(fw) => {
                let out = forward::forward(&ctx, &config, route, fw, parts, body).await;
                attempts = out.attempts;
                upstream = out.upstream;
                let mut resp = out.response;
                edit_headers(
                    resp.headers_mut(),
                    &route.response_headers_to_add,
                    &route.response_headers_to_remove,
                );
                let details = if out.flag.is_none() {
                    "via_upstream"
                } else {
                    "upstream_failure"
                };
                (resp, out.flag, details.to_owned())
            }
        },
    };
    let mut resp = resp;
    // What filters put on the response (a rate limit's x-ratelimit-*).
    resp.headers_mut().extend(added);
    Ok(report.respond(resp, flag, details, attempts, upstream))
}

/// Normalizes the request's path in place (its query kept); false if it is not a path.
fn normal_path(parts: &mut http::request::Parts, normalize: bool, merge: bool) -> bool {
    let path = parts.uri.path();
    if path == "*" {
        return true;
    }
    let normal = if normalize {
        if crate::path::is_normal(path, merge) {
            return true;
        }
        crate::path::normalize(path, merge)
    } else if path.contains("//") {
        // Only merging slashes (Envoy allows it without normalization).
        crate::path::normalize(path, true).filter(|_| path.starts_with('/'))
    } else {
        return true;
    };
    let Some(normal) = normal else {
        return false;
    };
    let pq = match parts.uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut p = parts.uri.clone().into_parts();
    match http::uri::PathAndQuery::try_from(pq) {
        Ok(pq) => p.path_and_query = Some(pq),
        Err(_) => return false,
    }
    match http::Uri::from_parts(p) {
        Ok(u) => {
            parts.uri = u;
            true
        }
        Err(_) => false,
    }
}

/// Runs the listener's HTTP filters in order; the first that answers ends the chain.
/// What they add to the response of a request they let through goes to `added`.
async fn run_filters(
    ctx: &RequestContext,
    config: &Arc<Config>,
    filters: &[crate::filter::NamedFilter],
    route: Option<&Route>,
    parts: &mut http::request::Parts,
    report: &mut Report,
    added: &mut HeaderMap,
) -> Option<LocalReply> {
    let mut metadata = Metadata::default();
    for f in filters {
        match &f.filter {
            HttpFilter::Jwt(j) => {
                let fetch = crate::filter::jwt::Fetcher {
                    upstreams: ctx.upstreams.clone(),
                    config: config.clone(),
                };
                let result = match j.run(parts, &mut metadata, fetch).await {
                    crate::filter::jwt::Outcome::Verified(_) => "verified",
                    crate::filter::jwt::Outcome::Unauthenticated => "unauthenticated",
                    crate::filter::jwt::Outcome::Refused(why) => {
                        ctx.metrics.jwt_authn(&ctx.listener, why.code());
                        return Some(jwt_refusal(why, parts));
                    }
                };
                ctx.metrics.jwt_authn(&ctx.listener, result);
            }
            HttpFilter::Rbac(r) => {
                let facts = rbac::Facts {
                    parts: Some(&*parts),
                    peer: ctx.peer.as_ref(),
                    source: ctx.client,
                    destination: ctx.authority,
                    metadata: &metadata,
                };
                let action = r.action.as_str();
                match r.check(&facts) {
                    rbac::Verdict::Allowed { matched } => {
                        if r.action == rbac::RbacAction::Log
                            && let Some(policy) = matched
                        {
                            ctx.metrics.rbac(&ctx.listener, action, "logged", &policy);
                            report.audit(policy);
                        }
                    }
                    rbac::Verdict::Denied { matched } => {
                        let policy = matched.as_deref().unwrap_or("none");
                        ctx.metrics.rbac(&ctx.listener, action, "denied", policy);
                        return Some(LocalReply {
                            response: body::text(StatusCode::FORBIDDEN, "RBAC: access denied"),
                            flag: None,
                            details: format!("rbac_access_denied_matched_policy[{policy}]"),
                        });
                    }
                }
            }
            HttpFilter::RateLimit(base) => {
                use crate::filter::ratelimit::{Decision, Facts};
                // A route's own buckets replace the filter's (per-filter config, by name).
                let own = route
                    .and_then(|r| r.rate_limit.as_ref())
                    .filter(|_| f.name == ambit_xds::waypoint::RATELIMIT_FILTER);
                let limit = own.unwrap_or(base);
                let facts = Facts {
                    headers: &parts.headers,
                    peer: ctx.peer.as_ref(),
                    client: ctx.client,
                };
                let route_name = route.map_or("", |r| r.name.as_str());
                match limit.check(&facts) {
                    Decision::NotApplied => {}
                    Decision::Allowed(h) => {
                        ctx.metrics.rate_limit(&ctx.listener, route_name, "ok");
                        added.extend(h);
                    }
                    Decision::Shadowed(h) => {
                        ctx.metrics
                            .rate_limit(&ctx.listener, route_name, "shadowed");
                        added.extend(h);
                    }
                    Decision::Limited(response) => {
                        ctx.metrics
                            .rate_limit(&ctx.listener, route_name, "rate_limited");
                        return Some(LocalReply {
                            response,
                            flag: Some(Flag::RateLimited),
                            details: "local_rate_limited".to_owned(),
                        });
                    }
                }
            }
            HttpFilter::Fault(base) => {
                // A route's fault replaces the filter's own (Envoy's per-filter config,
                // keyed by the filter's name).
                let own = route
                    .and_then(|r| r.fault.as_ref())
                    .filter(|_| f.name == ambit_xds::waypoint::FAULT_FILTER);
                let Some(fault) = own.or(base.as_ref()).filter(|f| f.applies(parts)) else {
                    continue;
                };
                if let Some(delay) = fault.draw_delay() {
                    tokio::time::sleep(delay).await;
                    report.delayed();
                }
                if let Some(a) = fault.draw_abort() {
                    let grpc = parts
                        .headers
                        .get(header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                    return Some(LocalReply {
                        response: crate::filter::fault::abort_response(a, grpc),
                        flag: Some(Flag::FaultInjected),
                        details: "fault_filter_abort".to_owned(),
                    });
                }
            }
        }
    }
    None
}

/// Envoy's answer to a request its JWT filter refused: 401 (403 for a wrong audience),
/// the reason as the body, and a `www-authenticate` challenge naming the resource.
fn jwt_refusal(why: crate::filter::jwt::Failure, parts: &http::request::Parts) -> LocalReply {
    let mut r = body::text(why.status(), why.message());
    let realm = format!("http://{}{}", router::host_of(parts), parts.uri.path());
    let challenge = match why {
        crate::filter::jwt::Failure::Missing => format!("Bearer realm=\"{realm}\""),
        _ => format!("Bearer realm=\"{realm}\", error=\"invalid_token\""),
    };
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    LocalReply {
        response: r,
        flag: None,
        details: format!(
            "jwt_authn_access_denied{{{}}}",
            why.message().replace(' ', "_")
        ),
    }
}

/// The request's span: a child of the request's own trace context if it has one (the
/// application's span), linked to the tunnel's (the client agent's); else a child of the
/// tunnel's. Its `traceparent` replaces the request's, so that the upstream hop and the
/// backend are its children.
fn start_span(
    t: &ambit_otel::Tracing,
    ctx: &RequestContext,
    parts: &mut http::request::Parts,
) -> ambit_otel::Span {
    use ambit_otel::{KeyValue, SpanKind};
    let own = parts
        .headers
        .get(trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(ambit_otel::parse_traceparent);
    let tunnel = ctx.tunnel_trace.clone();
    let (parent, links) = match (own, tunnel) {
        (Some(own), tunnel) => (Some(own), tunnel.into_iter().collect()),
        (None, tunnel) => (tunnel, vec![]),
    };
    let host = router::host_of(parts).into_owned();
    let mut attributes = vec![
        KeyValue::new("http.request.method", parts.method.to_string()),
        KeyValue::new("url.path", parts.uri.path().to_owned()),
        KeyValue::new("server.address", host),
        KeyValue::new("ambit.listener", ctx.listener.clone()),
    ];
    if let Some(p) = &ctx.peer {
        attributes.push(KeyValue::new("ambit.source.principal", p.to_string()));
    }
    if let Some(ip) = ctx.client {
        attributes.push(KeyValue::new("client.address", ip.to_string()));
    }
    let span = t.start(
        format!("{} {}", parts.method, ctx.listener),
        SpanKind::Server,
        parent.as_ref(),
        links,
        attributes,
    );
    if let Ok(v) = HeaderValue::try_from(span.traceparent()) {
        parts.headers.insert(trace::TRACEPARENT, v);
    }
    span
}

/// The request's `traceparent`: its own if valid, else a new one put in its place (an
/// invalid one starts a new trace, as the W3C spec says).
fn trace_context(h: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = h.get(trace::TRACEPARENT)
        && trace::is_valid(v.as_bytes())
    {
        return v.clone();
    }
    let v = HeaderValue::try_from(trace::new_traceparent()).expect("hex and dashes");
    h.insert(trace::TRACEPARENT, v.clone());
    v
}

/// The size of a header block as Envoy approximates it: names and values.
fn header_bytes(h: &HeaderMap) -> u64 {
    h.iter()
        .map(|(k, v)| (k.as_str().len() + v.len()) as u64)
        .sum()
}

fn pick<'a>(config: &'a Config, rc: &str, parts: &http::request::Parts) -> Option<&'a Route> {
    let rc = config.route_config(rc)?;
    let vh = router::virtual_host(rc, &router::host_of(parts))?;
    router::route(vh, parts)
}

pub(crate) fn edit_headers(h: &mut HeaderMap, add: &[HeaderOp], remove: &[HeaderName]) {
    for name in remove {
        h.remove(name);
    }
    for op in add {
        if op.overwrite {
            h.insert(op.name.clone(), op.value.clone());
        } else {
            h.append(op.name.clone(), op.value.clone());
        }
    }
}

/// The path with the route's matched prefix replaced by `rewrite`.
pub(super) fn replace_prefix(route: &Route, path: &str, rewrite: &str) -> String {
    let prefix = match &route.matcher.path {
        PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) => p.as_str(),
        PathMatch::Exact(p) => p.as_str(),
        PathMatch::Regex(_) => "",
    };
    let rest = path.strip_prefix(prefix).unwrap_or(path);
    let joined = if rewrite.ends_with('/') && rest.starts_with('/') {
        format!("{rewrite}{}", &rest[1..])
    } else if !rewrite.ends_with('/')
        && !rest.is_empty()
        && !rest.starts_with('/')
        && prefix.ends_with('/')
    {
        format!("{rewrite}/{rest}")
    } else {
        format!("{rewrite}{rest}")
    };
    if joined.is_empty() {
        "/".into()
    } else {
        joined
    }
}

fn redirect(rd: &Redirect, route: &Route, parts: &http::request::Parts) -> Response<ProxyBody> {
    let host = router::host_of(parts);
    let scheme = rd
        .scheme
        .clone()
        .or_else(|| parts.uri.scheme_str().map(str::to_owned))
        .unwrap_or_else(|| "http".into());
    let host = rd.host.clone().unwrap_or_else(|| host.into_owned());
    let port = rd.port.map(|p| format!(":{p}")).unwrap_or_default();
    let path = match (&rd.path, &rd.prefix_rewrite) {
        (Some(p), _) => p.clone(),
        (None, Some(rw)) => replace_prefix(route, parts.uri.path(), rw),
        (None, None) => parts.uri.path().to_owned(),
    };
    let query = match parts.uri.query() {
        Some(q) if !rd.strip_query && !path.contains('?') => format!("?{q}"),
        _ => String::new(),
    };
    let location = format!("{scheme}://{host}{port}{path}{query}");
    let mut r = Response::new(body::full(""));
    *r.status_mut() = rd.status;
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            r.headers_mut().insert(header::LOCATION, v);
        }
        Err(_) => *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteMatch;

    fn route(path: PathMatch) -> Route {
        Route {
            name: String::new(),
            matcher: RouteMatch {
                path,
                headers: vec![],
                query: vec![],
            },
            action: Action::Direct {
                status: StatusCode::OK,
                body: Default::default(),
            },
            request_headers_to_add: vec![],
            request_headers_to_remove: vec![],
            response_headers_to_add: vec![],
            response_headers_to_remove: vec![],
            fault: None,
            rate_limit: None,
        }
    }

    #[test]
    fn prefix_rewrites_keep_segments_whole() {
        let r = route(PathMatch::SeparatedPrefix("/old".into()));
        assert_eq!(replace_prefix(&r, "/old/x", "/new"), "/new/x");
        assert_eq!(replace_prefix(&r, "/old", "/new"), "/new");
        assert_eq!(replace_prefix(&r, "/old/x", "/"), "/x");
        assert_eq!(replace_prefix(&r, "/old", "/"), "/");
        assert_eq!(replace_prefix(&r, "/old/x", ""), "/x");
    }
}
