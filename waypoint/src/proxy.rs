//! One HTTP request through the waypoint, with Envoy's router semantics: the route
//! ([`router`](crate::router)), then its action — a direct response, a redirect, or
//! forwarding to a weighted cluster with header changes, rewrites, retries (backoff with
//! jitter, per-try timeouts, another endpoint each time) and the route timeout (504).
//!
//! Responses stream back as they arrive; only a retryable request's body is held, up to
//! [`RETRY_BUFFER`](crate::body::RETRY_BUFFER).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ambit_identity::Identity;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tokio::sync::watch;
use tracing::info;

use crate::body::{
    self, Buffered, Counted, End, OnEnd, ProxyBody, RETRY_BUFFER, Replay, Reported, Tee,
};
use crate::config::{
    Action, Cluster, Config, Endpoint, Forward, HeaderOp, Mirror, MirrorHost, Overflow, PathMatch,
    Redirect, RetryPolicy, Route, UpstreamProtocol,
};
use crate::upstream::{UpstreamError, Upstreams};
use crate::{router, trace};

/// What every request on one inbound tunnel shares.
#[derive(Debug)]
pub struct RequestContext {
    /// The configuration (each request reads the latest and keeps it).
    pub config: watch::Receiver<Arc<Config>>,
    /// Upstream connections.
    pub upstreams: Arc<Upstreams>,
    /// The listener's route configuration.
    pub route_config: String,
    /// The listener's fault injection filter, if it has one (with its own fault, if
    /// any): routes' faults apply only with it.
    pub fault_filter: Option<Option<Arc<crate::config::Fault>>>,
    /// The listener's name (for the access log).
    pub listener: String,
    /// The caller's identity (from its HBONE certificate), if any.
    pub peer: Option<Identity>,
    /// The caller's IP (`forwarded: for=` of its tunnel).
    pub client: Option<IpAddr>,
    /// Where requests are counted.
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// What every request of the tunnel is counted under (its code, flags and protocol
    /// are filled in per request).
    pub series: crate::telemetry::TunnelSeries,
}

/// Envoy's response flags, for the access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flag {
    /// No route.
    NoRoute,
    /// No healthy upstream.
    NoHealthy,
    /// Upstream connection failure.
    ConnectFailure,
    /// Upstream reset.
    Reset,
    /// Upstream request timeout.
    Timeout,
    /// Retry limit exceeded (the last response was retryable).
    RetryExceeded,
    /// Upstream overflow: a circuit breaker of the cluster turned the request (or a
    /// retry that was due) away.
    Overflow,
    /// Direct response or redirect.
    Direct,
    /// The client went away before the response ended.
    DownstreamClosed,
    /// A fault injected an abort.
    FaultInjected,
}

impl Flag {
    fn as_str(self) -> &'static str {
        match self {
            Flag::NoRoute => "NR",
            Flag::NoHealthy => "UH",
            Flag::ConnectFailure => "UF",
            Flag::Reset => "UR",
            Flag::Timeout => "UT",
            Flag::RetryExceeded => "URX",
            Flag::Overflow => "UO",
            Flag::Direct => "DR",
            Flag::DownstreamClosed => "DC",
            Flag::FaultInjected => "FI",
        }
    }

    /// The flags of a request a fault delayed (`DI`), with `flag`.
    fn delayed(flag: Option<Flag>) -> &'static str {
        match flag {
            None => "DI",
            Some(Flag::NoRoute) => "DI,NR",
            Some(Flag::NoHealthy) => "DI,UH",
            Some(Flag::ConnectFailure) => "DI,UF",
            Some(Flag::Reset) => "DI,UR",
            Some(Flag::Timeout) => "DI,UT",
            Some(Flag::RetryExceeded) => "DI,URX",
            Some(Flag::Overflow) => "DI,UO",
            Some(Flag::Direct) => "DI,DR",
            Some(Flag::DownstreamClosed) => "DI,DC",
            Some(Flag::FaultInjected) => "DI,FI",
        }
    }
}

/// What a fault's abort answers, as Envoy's fault filter: the HTTP status; or, for a
/// gRPC status, a trailers-only gRPC answer to a gRPC request (and a plain 200 to any
/// other, as Envoy's local reply does).
fn fault_abort(a: crate::config::FaultAbort, grpc_request: bool) -> Response<ProxyBody> {
    match a {
        crate::config::FaultAbort::Http(status) => text(status, "fault filter abort"),
        crate::config::FaultAbort::Grpc(_) if !grpc_request => {
            text(StatusCode::OK, "fault filter abort")
        }
        crate::config::FaultAbort::Grpc(code) => {
            let mut r = Response::new(body::full(""));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            r
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(body));
    *r.status_mut() = status;
    if !body.is_empty() {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    r
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
    let mut report = Report(Some(Exchange {
        ctx: ctx.clone(),
        started,
        delayed: false,
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        host: parts.headers.get(header::HOST).cloned(),
        status: 0,
        flag: None,
        attempts: 0,
        upstream: None,
        grpc: false,
        grpc_status: None,
        request_header_bytes,
        request_bytes,
        response_header_bytes: 0,
        traceparent,
    }));
    let mut attempts = 0;
    let mut upstream: Option<Endpoint> = None;
    let route = pick(&config, &ctx.route_config, &parts);
    // Fault injection (Envoy's fault filter, before the router): a route's fault, else
    // the filter's own; a delay first, then perhaps an abort.
    let fault = ctx
        .fault_filter
        .as_ref()
        .and_then(|base| route.and_then(|r| r.fault.as_ref()).or(base.as_ref()))
        .filter(|f| f.headers.iter().all(|h| router::header_matches(h, &parts)));
    if let Some((delay, p)) = fault.and_then(|f| f.delay)
        && fastrand::f64() < p
    {
        tokio::time::sleep(delay).await;
        if let Some(x) = report.0.as_mut() {
            x.delayed = true;
        }
    }
    let aborted = fault
        .and_then(|f| f.abort)
        .filter(|(_, p)| fastrand::f64() < *p)
        .map(|(a, _)| a);
    let (resp, flag) = match (aborted, route) {
        (Some(a), _) => {
            let grpc = parts
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            (fault_abort(a, grpc), Some(Flag::FaultInjected))
        }
        (None, None) => (text(StatusCode::NOT_FOUND, ""), Some(Flag::NoRoute)),
        (None, Some(route)) => match &route.action {
            Action::Direct { status, body: b } => {
                let mut r = Response::new(body::full(b.clone()));
                *r.status_mut() = *status;
                (r, Some(Flag::Direct))
            }
            Action::Redirect(rd) => (redirect(rd, route, &parts), Some(Flag::Direct)),
            Action::Forward(fw) => {
                let out = forward(&ctx, &config, route, fw, parts, body).await;
                attempts = out.attempts;
                upstream = out.upstream;
                let mut resp = out.response;
                edit_headers(
                    resp.headers_mut(),
                    &route.response_headers_to_add,
                    &route.response_headers_to_remove,
                );
                (resp, out.flag)
            }
        },
    };
    let grpc = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let (parts, body) = resp.into_parts();
    if let Some(x) = report.0.as_mut() {
        x.status = parts.status.as_u16();
        x.flag = flag;
        x.attempts = attempts;
        x.upstream = upstream;
        x.grpc = grpc;
        // A trailers-only answer carries its status in the headers.
        x.grpc_status = body::grpc_status(&parts.headers);
        x.response_header_bytes = header_bytes(&parts.headers);
    }
    Ok(Response::from_parts(parts, Reported::new(body, report)))
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

/// What a request reports when its response ends: one count in Istio's metrics and one
/// access-log line. Dropped before that (the client left while the waypoint waited for
/// the upstream), it reports the request as abandoned.
pub struct Report(Option<Exchange>);

impl Drop for Report {
    fn drop(&mut self) {
        if let Some(x) = self.0.take() {
            x.record(0, None, End::Abandoned);
        }
    }
}

impl OnEnd for Report {
    fn end(mut self, bytes: u64, trailer_status: Option<u32>, end: End) {
        if let Some(x) = self.0.take() {
            x.record(bytes, trailer_status, end);
        }
    }
}

/// One request, as far as it got.
struct Exchange {
    ctx: Arc<RequestContext>,
    started: Instant,
    /// A fault delayed it (`DI`).
    delayed: bool,
    method: http::Method,
    uri: Uri,
    host: Option<HeaderValue>,
    status: u16,
    flag: Option<Flag>,
    attempts: u32,
    upstream: Option<Endpoint>,
    grpc: bool,
    grpc_status: Option<u32>,
    request_header_bytes: u64,
    request_bytes: Arc<AtomicU64>,
    response_header_bytes: u64,
    traceparent: HeaderValue,
}

impl Exchange {
    fn record(self, bytes: u64, trailer_status: Option<u32>, end: End) {
        let flag = self.flag.or(match end {
            End::Complete => None,
            End::UpstreamFailed => Some(Flag::Reset),
            End::Abandoned => Some(Flag::DownstreamClosed),
        });
        let flags = if self.delayed {
            Flag::delayed(flag)
        } else {
            flag.map_or("-", Flag::as_str)
        };
        let grpc_status = if self.grpc {
            trailer_status.or(self.grpc_status)
        } else {
            None
        };
        let received = self.request_bytes.load(Ordering::Relaxed);
        let millis = self.started.elapsed().as_secs_f64() * 1e3;
        let up = self
            .upstream
            .as_ref()
            .map(|e| crate::telemetry::Upstream {
                workload: e.workload.clone(),
                principal: e.hbone.clone(),
            })
            .unwrap_or_default();
        self.ctx.series.request(
            &self.ctx.metrics,
            &crate::telemetry::Answered {
                protocol: if self.grpc { "grpc" } else { "http" },
                code: self.status,
                grpc_status,
                flags,
                upstream: &up,
                millis,
                request_bytes: self.request_header_bytes + received,
                response_bytes: self.response_header_bytes + bytes,
            },
        );
        let ep = self.upstream.as_ref();
        info!(
            target: "access",
            listener = %self.ctx.listener,
            method = %self.method,
            authority = self
                .uri
                .authority()
                .map(|a| a.as_str())
                .or_else(|| self.host.as_ref().and_then(|h| h.to_str().ok()))
                .unwrap_or("-"),
            path = self.uri.path(),
            status = self.status,
            grpc_status = grpc_status.map_or_else(|| "-".to_owned(), |g| g.to_string()),
            flags,
            attempts = self.attempts,
            upstream = ep.map_or_else(|| "-".into(), |e| e.addr.to_string()),
            upstream_workload = ep
                .and_then(|e| e.workload.as_deref())
                .map_or("-", |w| w.name.as_str()),
            upstream_principal = ep.and_then(|e| e.hbone.as_ref()).map_or("-", |p| p.as_str()),
            peer = self.ctx.peer.as_ref().map_or("-", |p| p.as_str()),
            bytes_received = received,
            bytes_sent = bytes,
            duration_ms = millis as u64,
            traceparent = self.traceparent.to_str().unwrap_or("-"),
            "request"
        );
    }
}

fn pick<'a>(config: &'a Config, rc: &str, parts: &http::request::Parts) -> Option<&'a Route> {
    let rc = config.route_config(rc)?;
    let vh = router::virtual_host(rc, &router::host_of(parts))?;
    router::route(vh, parts)
}

fn edit_headers(h: &mut HeaderMap, add: &[HeaderOp], remove: &[HeaderName]) {
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
fn replace_prefix(route: &Route, path: &str, rewrite: &str) -> String {
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

struct Outcome {
    response: Response<ProxyBody>,
    flag: Option<Flag>,
    attempts: u32,
    upstream: Option<Endpoint>,
}

/// Envoy's answer when a circuit breaker turns a request away.
const OVERFLOW: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

fn weighted(clusters: &[(String, u32)]) -> Option<&str> {
    let total: u64 = clusters.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut x = fastrand::u64(..total);
    for (name, w) in clusters {
        if x < u64::from(*w) {
            return Some(name);
        }
        x -= u64::from(*w);
    }
    None
}

/// What an attempt gave.
enum Attempt {
    Response(Response<ProxyBody>),
    Failed(UpstreamError),
    TimedOut,
}

async fn forward(
    ctx: &Arc<RequestContext>,
    config: &Arc<Config>,
    route: &Route,
    fw: &Forward,
    mut parts: http::request::Parts,
    body: Counted,
) -> Outcome {
    let fail = |status, msg, flag| Outcome {
        response: text(status, msg),
        flag: Some(flag),
        attempts: 0,
        upstream: None,
    };
    let Some(name) = weighted(&fw.clusters) else {
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream",
            Flag::NoHealthy,
        );
    };
    let Some((cluster, endpoints)) = config.cluster(name) else {
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream",
            Flag::NoHealthy,
        );
    };
    if endpoints.is_empty() {
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream",
            Flag::NoHealthy,
        );
    }

    // The request as the upstream gets it: its own path and authority (shared bytes, no
    // copy) unless the route rewrites them.
    let path_and_query = if fw.prefix_rewrite.is_some() || fw.regex_rewrite.is_some() {
        let mut path = parts.uri.path().to_owned();
        if let Some(rw) = &fw.prefix_rewrite {
            path = replace_prefix(route, &path, rw);
        }
        if let Some((re, sub)) = &fw.regex_rewrite {
            path = re.replace_all(&path, sub.as_str()).into_owned();
        }
        let pq = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        match http::uri::PathAndQuery::try_from(pq) {
            Ok(pq) => pq,
            Err(_) => return fail(StatusCode::BAD_REQUEST, "bad request", Flag::Direct),
        }
    } else {
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
    };
    let authority = match &fw.host_rewrite {
        Some(h) => http::uri::Authority::try_from(h.as_str()).ok(),
        None => parts.uri.authority().cloned().or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
        }),
    };
    let te_trailers = parts
        .headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for h in &HOP_BY_HOP {
        parts.headers.remove(h);
    }
    parts.headers.remove(header::TE);
    edit_headers(
        &mut parts.headers,
        &route.request_headers_to_add,
        &route.request_headers_to_remove,
    );
    // Mirrors (Envoy's shadows), each by its share: copies of the request as it now is.
    let mirrors: smallvec::SmallVec<[&Mirror; 2]> = fw
        .mirrors
        .iter()
        .filter(|m| fastrand::f64() < m.share)
        .collect();
    let shadow = (!mirrors.is_empty()).then(|| Shadow {
        method: parts.method.clone(),
        path_and_query: path_and_query.clone(),
        authority: authority.clone(),
        headers: parts.headers.clone(),
        te_trailers,
    });
    // HTTP/1.1 carries the authority in Host: kept as it came, unless rewritten or the
    // request's URI has one (an HTTP/2 client's :authority, or an absolute-form request
    // line, which wins over Host).
    let set_host = fw.host_rewrite.is_some()
        || parts.uri.authority().is_some()
        || !parts.headers.contains_key(header::HOST);
    let Ok(uri) = upstream_target(
        cluster.protocol,
        &mut parts.headers,
        path_and_query,
        authority,
        set_host,
        te_trailers,
    ) else {
        return fail(StatusCode::BAD_REQUEST, "bad request", Flag::Direct);
    };
    parts.uri = uri;
    parts.version = version(cluster.protocol);

    let retry = fw.retry.clone().unwrap_or(RetryPolicy {
        num_retries: 0,
        ..Default::default()
    });
    // Only a body that fits the buffer can be sent twice.
    let (mut replay, mut once) = (None, None);
    if retry.num_retries > 0 {
        match body::buffer(body, RETRY_BUFFER).await {
            Ok(Buffered::Whole(frames)) => replay = Some(frames),
            Ok(Buffered::Partial(frames, rest)) => once = Some(Replay::then(frames, rest)),
            Err(_) => {
                return fail(StatusCode::BAD_REQUEST, "bad request body", Flag::Direct);
            }
        }
    } else {
        once = Some(Replay::then(Vec::new(), body));
    }
    let mut once: Option<ProxyBody> = once.map(http_body_util::BodyExt::boxed);
    if let Some(shadow) = &shadow {
        // A replayable body is replayed to the mirrors too; a streamed one is copied to
        // them as the upstream reads it.
        let bodies: Vec<ProxyBody> = match (&replay, once.take()) {
            (Some(frames), _) => mirrors
                .iter()
                .map(|_| http_body_util::BodyExt::boxed(Replay::of(frames)))
                .collect(),
            (None, Some(b)) => {
                let (tee, copies) = Tee::new(b, mirrors.len());
                once = Some(http_body_util::BodyExt::boxed(tee));
                copies
                    .into_iter()
                    .map(http_body_util::BodyExt::boxed)
                    .collect()
            }
            (None, None) => unreachable!("the body is either buffered or streamed"),
        };
        for (m, b) in mirrors.iter().zip(bodies) {
            send_mirror(ctx, config, m, shadow, b, fw.timeout);
        }
    }
    let retries = if replay.is_some() {
        retry.num_retries
    } else {
        0
    };

    let deadline = fw.timeout.map(|t| tokio::time::Instant::now() + t);
    // Rarely more than a few: kept inline, no allocation per request.
    let mut tried: smallvec::SmallVec<[SocketAddr; 4]> = smallvec::SmallVec::new();
    let mut attempt: u32 = 0;
    // The cluster's max_requests, and what its retry budget is measured against,
    // until the answer's headers.
    let Some(_request) = cluster.load.admit_request(cluster.limits.max_requests) else {
        ctx.metrics.overflow(name, Overflow::Requests);
        return fail(StatusCode::SERVICE_UNAVAILABLE, OVERFLOW, Flag::Overflow);
    };
    // The retry being made, counted against the budget from its backoff to its answer.
    let mut retrying = None;
    loop {
        attempt += 1;
        let Some(ep) = ctx.upstreams.choose(cluster, &endpoints, &tried) else {
            return fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream",
                Flag::NoHealthy,
            );
        };
        tried.push(ep.addr);
        let body = match (&replay, once.take()) {
            (Some(frames), _) => http_body_util::BodyExt::boxed(Replay::of(frames)),
            (None, Some(b)) => b,
            (None, None) => unreachable!("a streamed body is sent once"),
        };
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        if attempt > 1 {
            req.headers_mut().insert(
                HeaderName::from_static("x-envoy-attempt-count"),
                HeaderValue::from(attempt),
            );
        }
        let result = one_attempt(ctx, cluster, &ep, req, retry.per_try_timeout, deadline).await;
        observe(ctx, cluster, endpoints.len(), &ep, &result);
        drop(retrying.take());
        let (code, flags) = match &result {
            Attempt::Response(r) => (r.status().as_u16(), "-"),
            Attempt::Failed(UpstreamError::Connect(_)) => (0, Flag::ConnectFailure.as_str()),
            Attempt::Failed(_) => (0, Flag::Reset.as_str()),
            Attempt::TimedOut => (0, Flag::Timeout.as_str()),
        };
        ctx.series.attempt(&ctx.metrics, name, code, flags);
        let route_timed_out = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        let retryable = match &result {
            Attempt::Response(r) => retriable_response(&retry, r),
            Attempt::Failed(e) => {
                ctx.upstreams.failed(ep.addr);
                retriable_error(&retry, e)
            }
            Attempt::TimedOut => {
                retry.retry_on.five_xx || retry.retry_on.gateway_error || retry.retry_on.reset
            }
        };
        let mut overflow = false;
        if retryable && attempt <= retries && !route_timed_out {
            // As Envoy: a retry the cluster's budget cannot take is not made; the
            // answer in hand goes back, flagged UO.
            retrying = cluster.load.retry(cluster.retry_limit);
            overflow = retrying.is_none();
        }
        if retrying.is_some() {
            // Fully jittered exponential backoff, as Envoy: [0, base * 2^(n-1)], capped.
            let cap = retry
                .base_interval
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(retry.max_interval);
            let wait = cap.mul_f64(fastrand::f64());
            let wait = match deadline {
                Some(d) => wait.min(d.saturating_duration_since(tokio::time::Instant::now())),
                None => wait,
            };
            tokio::time::sleep(wait).await;
            ctx.metrics.retry(name);
            continue;
        }
        if overflow {
            ctx.metrics.overflow(name, Overflow::Retries);
        }
        let upstream = Some(ep.clone());
        let flag_if = |f: Flag| Some(if overflow { Flag::Overflow } else { f });
        return match result {
            Attempt::Response(r) => Outcome {
                flag: if overflow {
                    Some(Flag::Overflow)
                } else {
                    retryable.then_some(Flag::RetryExceeded)
                },
                response: response_from(r),
                attempts: attempt,
                upstream,
            },
            Attempt::TimedOut => Outcome {
                response: text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                flag: flag_if(Flag::Timeout),
                attempts: attempt,
                upstream,
            },
            Attempt::Failed(UpstreamError::Overflow(o)) => {
                ctx.metrics.overflow(name, o);
                Outcome {
                    response: text(StatusCode::SERVICE_UNAVAILABLE, OVERFLOW),
                    flag: Some(Flag::Overflow),
                    attempts: attempt,
                    upstream,
                }
            }
            Attempt::Failed(e) => {
                let (msg, flag) = match e {
                    UpstreamError::Connect(_) => (
                        "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                        Flag::ConnectFailure,
                    ),
                    _ => (
                        "upstream connect error or disconnect/reset before headers. reset reason: remote reset",
                        Flag::Reset,
                    ),
                };
                Outcome {
                    response: text(StatusCode::SERVICE_UNAVAILABLE, msg),
                    flag: flag_if(flag),
                    attempts: attempt,
                    upstream,
                }
            }
        };
    }
}

/// The request's URI for an upstream of `protocol`, and its headers made to match: the
/// authority in `Host` for HTTP/1.1 (if `set_host`), in the URI for HTTP/2, where `TE:
/// trailers` passes on if the client sent it.
fn upstream_target(
    protocol: UpstreamProtocol,
    headers: &mut HeaderMap,
    path_and_query: http::uri::PathAndQuery,
    authority: Option<http::uri::Authority>,
    set_host: bool,
    te_trailers: bool,
) -> Result<Uri, http::Error> {
    match protocol {
        UpstreamProtocol::Http1 => {
            if set_host
                && let Some(v) = authority
                    .as_ref()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                headers.insert(header::HOST, v);
            }
            Ok(Uri::from(path_and_query))
        }
        UpstreamProtocol::Http2 => {
            headers.remove(header::HOST);
            if te_trailers {
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
            }
            let mut p = http::uri::Parts::default();
            p.scheme = Some(http::uri::Scheme::HTTP);
            p.authority = authority;
            p.path_and_query = Some(path_and_query);
            Ok(Uri::from_parts(p)?)
        }
    }
}

fn version(protocol: UpstreamProtocol) -> http::Version {
    match protocol {
        UpstreamProtocol::Http1 => http::Version::HTTP_11,
        UpstreamProtocol::Http2 => http::Version::HTTP_2,
    }
}

/// A request as routed, before it is shaped for one upstream's protocol: what mirrors
/// copy.
struct Shadow {
    method: http::Method,
    path_and_query: http::uri::PathAndQuery,
    authority: Option<http::uri::Authority>,
    headers: HeaderMap,
    te_trailers: bool,
}

/// Envoy's shadow host: `-shadow` appended to the host, before any port.
fn shadow_host(a: &http::uri::Authority) -> Option<http::uri::Authority> {
    let shadowed = match a.port() {
        Some(port) => format!("{}-shadow:{port}", a.host()),
        None => format!("{}-shadow", a.host()),
    };
    http::uri::Authority::try_from(shadowed).ok()
}

/// Sends a mirror's copy of a request in a task of its own and throws the answer away,
/// as Envoy's shadowing does: under the mirror cluster's circuit breakers, within the
/// route's timeout, counted in the cluster's upstream requests, never retried, and
/// never felt by the original request.
fn send_mirror(
    ctx: &Arc<RequestContext>,
    config: &Arc<Config>,
    m: &Mirror,
    shadow: &Shadow,
    body: ProxyBody,
    timeout: Option<Duration>,
) {
    let (ctx, config, name) = (ctx.clone(), config.clone(), m.cluster.clone());
    let authority = match &m.host {
        MirrorHost::ShadowSuffix => shadow.authority.as_ref().and_then(shadow_host),
        MirrorHost::Same => shadow.authority.clone(),
        MirrorHost::Literal(h) => http::uri::Authority::try_from(h.as_str()).ok(),
    };
    let mut headers = shadow.headers.clone();
    let (method, path_and_query, te_trailers) = (
        shadow.method.clone(),
        shadow.path_and_query.clone(),
        shadow.te_trailers,
    );
    tokio::spawn(async move {
        // Envoy sends nothing to a shadow cluster it does not know.
        let Some((cluster, endpoints)) = config.cluster(&name) else {
            return;
        };
        let Some(_request) = cluster.load.admit_request(cluster.limits.max_requests) else {
            ctx.metrics.overflow(&name, Overflow::Requests);
            return;
        };
        let Some(ep) = ctx.upstreams.choose(cluster, &endpoints, &[]) else {
            ctx.series
                .attempt(&ctx.metrics, &name, 0, Flag::NoHealthy.as_str());
            return;
        };
        let Ok(uri) = upstream_target(
            cluster.protocol,
            &mut headers,
            path_and_query,
            authority,
            true,
            te_trailers,
        ) else {
            return;
        };
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = version(cluster.protocol);
        *req.headers_mut() = headers;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let result = one_attempt(&ctx, cluster, &ep, req, None, deadline).await;
        observe(&ctx, cluster, endpoints.len(), &ep, &result);
        let (code, flags) = match result {
            Attempt::Response(r) => {
                // Read to its end (so the connection can be reused), then dropped.
                let status = r.status().as_u16();
                let drain = http_body_util::BodyExt::collect(r.into_body());
                match deadline {
                    Some(d) => drop(tokio::time::timeout_at(d, drain).await),
                    None => drop(drain.await),
                }
                (status, "-")
            }
            Attempt::Failed(UpstreamError::Overflow(o)) => {
                ctx.metrics.overflow(&name, o);
                (0, Flag::Overflow.as_str())
            }
            Attempt::Failed(e) => {
                ctx.upstreams.failed(ep.addr);
                match e {
                    UpstreamError::Connect(_) => (0, Flag::ConnectFailure.as_str()),
                    _ => (0, Flag::Reset.as_str()),
                }
            }
            Attempt::TimedOut => (0, Flag::Timeout.as_str()),
        };
        ctx.series.attempt(&ctx.metrics, &name, code, flags);
    });
}

/// Tells the cluster's outlier detection how `ep` (one of `endpoints`) answered; what a
/// circuit breaker turned away is not the endpoint's doing.
fn observe(
    ctx: &RequestContext,
    cluster: &Cluster,
    endpoints: usize,
    ep: &Endpoint,
    result: &Attempt,
) {
    use crate::outlier::{Answer, Verdict};
    let Some(o) = &cluster.outlier else { return };
    let answer = match result {
        Attempt::Response(r) => Answer::Status(r.status().as_u16()),
        Attempt::Failed(UpstreamError::Overflow(_)) => return,
        Attempt::Failed(UpstreamError::Connect(_)) => Answer::ConnectFailed,
        Attempt::Failed(_) => Answer::Reset,
        Attempt::TimedOut => Answer::TimedOut,
    };
    match o.record(ep.addr, endpoints, answer) {
        Verdict::None => {}
        Verdict::Ejected(reason) => {
            info!(cluster = %cluster.name, endpoint = %ep.addr, reason = reason.as_str(), "outlier ejected");
            ctx.metrics.ejection(&cluster.name, reason.as_str(), true);
        }
        Verdict::Overflow(reason) => ctx.metrics.ejection(&cluster.name, reason.as_str(), false),
    }
}

async fn one_attempt(
    ctx: &RequestContext,
    cluster: &Cluster,
    ep: &Endpoint,
    req: Request<ProxyBody>,
    per_try: Option<Duration>,
    deadline: Option<tokio::time::Instant>,
) -> Attempt {
    let _in_flight = ctx.upstreams.start(ep.addr);
    let now = tokio::time::Instant::now();
    let limit = match (per_try.map(|t| now + t), deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let send = ctx.upstreams.send(cluster, ep, ctx.client, req);
    let result = match limit {
        Some(at) => match tokio::time::timeout_at(at, send).await {
            Ok(r) => r,
            Err(_) => return Attempt::TimedOut,
        },
        None => send.await,
    };
    match result {
        Ok(r) => Attempt::Response(r),
        Err(e) => Attempt::Failed(e),
    }
}

fn retriable_response(p: &RetryPolicy, r: &Response<ProxyBody>) -> bool {
    let s = r.status().as_u16();
    let on = &p.retry_on;
    (on.five_xx && (500..600).contains(&s))
        || (on.gateway_error && matches!(s, 502..=504))
        || (on.retriable_4xx && s == 409)
        || (on.retriable_status_codes && p.retriable_status_codes.contains(&s))
        || match body::grpc_status(r.headers()) {
            Some(1) => on.grpc_cancelled,
            Some(4) => on.grpc_deadline_exceeded,
            Some(8) => on.grpc_resource_exhausted,
            Some(13) => on.grpc_internal,
            Some(14) => on.grpc_unavailable,
            _ => false,
        }
}

fn retriable_error(p: &RetryPolicy, e: &UpstreamError) -> bool {
    let on = &p.retry_on;
    match e {
        UpstreamError::Connect(_) => on.connect_failure || on.five_xx || on.gateway_error,
        UpstreamError::Refused => on.refused_stream || on.five_xx,
        UpstreamError::Reset(_) => on.reset || on.five_xx || on.gateway_error,
        // A circuit breaker's answer is final, as Envoy's.
        UpstreamError::Overflow(_) => false,
    }
}

fn response_from(mut r: Response<ProxyBody>) -> Response<ProxyBody> {
    for h in &HOP_BY_HOP {
        r.headers_mut().remove(h);
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

    #[test]
    fn weights_pick_in_proportion() {
        let c = vec![
            ("a".to_owned(), 80),
            ("b".to_owned(), 20),
            ("z".to_owned(), 0),
        ];
        let a = (0..10_000).filter(|_| weighted(&c) == Some("a")).count();
        assert!((7_600..8_400).contains(&a), "{a}");
        assert!((0..1000).all(|_| weighted(&c) != Some("z")));
        assert_eq!(weighted(&[("x".into(), 0)]), None);
    }
}
