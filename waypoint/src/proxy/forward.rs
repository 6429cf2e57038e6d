//! Forwarding a request to a route's cluster, as Envoy's router does: a weighted
//! cluster, the request shaped for the upstream's protocol (rewrites, header changes,
//! hop-by-hop headers), then attempts — each to another endpoint, under the cluster's
//! circuit breakers, with per-try and route timeouts — retried with jittered backoff
//! while the retry policy and the cluster's retry budget allow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use tracing::info;

use super::mirror::{self, Shadow};
use super::report::Flag;
use super::{RequestContext, edit_headers, replace_prefix};
use crate::body::{self, Buffered, Counted, ProxyBody, RETRY_BUFFER, Replay, Tee};
use crate::config::{
    Cluster, Config, Endpoint, Forward, Mirror, Overflow, RetryPolicy, Route, UpstreamProtocol,
};
use crate::upstream::UpstreamError;

pub(super) struct Outcome {
    pub(super) response: Response<ProxyBody>,
    pub(super) flag: Option<Flag>,
    pub(super) attempts: u32,
    pub(super) upstream: Option<Endpoint>,
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
pub(super) enum Attempt {
    Response(Response<ProxyBody>),
    Failed(UpstreamError),
    TimedOut,
}

pub(super) async fn forward(
    ctx: &Arc<RequestContext>,
    config: &Arc<Config>,
    route: &Route,
    fw: &Forward,
    mut parts: http::request::Parts,
    body: Counted,
) -> Outcome {
    let fail = |status, msg, flag| Outcome {
        response: body::text(status, msg),
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
            mirror::send(ctx, config, m, shadow, b, fw.timeout);
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
                response: body::text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                flag: flag_if(Flag::Timeout),
                attempts: attempt,
                upstream,
            },
            Attempt::Failed(UpstreamError::Overflow(o)) => {
                ctx.metrics.overflow(name, o);
                Outcome {
                    response: body::text(StatusCode::SERVICE_UNAVAILABLE, OVERFLOW),
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
                    response: body::text(StatusCode::SERVICE_UNAVAILABLE, msg),
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
pub(super) fn upstream_target(
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

pub(super) fn version(protocol: UpstreamProtocol) -> http::Version {
    match protocol {
        UpstreamProtocol::Http1 => http::Version::HTTP_11,
        UpstreamProtocol::Http2 => http::Version::HTTP_2,
    }
}

/// Tells the cluster's outlier detection how `ep` (one of `endpoints`) answered; what a
/// circuit breaker turned away is not the endpoint's doing.
pub(super) fn observe(
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

pub(super) async fn one_attempt(
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
