//! What a request reports when its response ends: one count in Istio's metrics and one
//! access-log line, with Envoy's response flags and response code details.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Response, Uri};
use tracing::info;

use super::RequestContext;
use crate::body::{self, End, OnEnd, ProxyBody, Reported};
use crate::config::Endpoint;

/// Envoy's response flags, for the access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Flag {
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
    /// A local rate limit answered 429.
    RateLimited,
}

impl Flag {
    pub(super) fn as_str(self) -> &'static str {
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
            Flag::RateLimited => "RL",
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
            Some(Flag::RateLimited) => "DI,RL",
        }
    }
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
pub(super) struct Exchange {
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
    /// Envoy's `response_code_details`: why the answer is what it is.
    details: String,
    /// The policy of an RBAC `LOG` filter (Istio's AUDIT) that matched, if any.
    audit: Option<String>,
    /// Its span, ended when it is reported.
    span: Option<ambit_otel::Span>,
}

impl Report {
    /// Reports `x` when its response ends (or when dropped before).
    pub(super) fn new(x: Exchange) -> Self {
        Self(Some(x))
    }

    /// A fault delayed the request (`DI`).
    pub(super) fn delayed(&mut self) {
        if let Some(x) = self.0.as_mut() {
            x.delayed = true;
        }
    }

    /// An audit policy matched the request.
    pub(super) fn audit(&mut self, policy: String) {
        if let Some(x) = self.0.as_mut() {
            x.audit = Some(policy);
        }
    }

    /// The response, to be reported when its body ends.
    pub(super) fn respond(
        mut self,
        resp: Response<ProxyBody>,
        flag: Option<Flag>,
        details: String,
        attempts: u32,
        upstream: Option<Endpoint>,
    ) -> Response<Reported<Report>> {
        let grpc = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let (parts, body) = resp.into_parts();
        if let Some(x) = self.0.as_mut() {
            x.status = parts.status.as_u16();
            x.flag = flag;
            x.details = details;
            x.attempts = attempts;
            x.upstream = upstream;
            x.grpc = grpc;
            // A trailers-only answer carries its status in the headers.
            x.grpc_status = body::grpc_status(&parts.headers);
            x.response_header_bytes = super::header_bytes(&parts.headers);
        }
        Response::from_parts(parts, Reported::new(body, self))
    }
}

impl Exchange {
    /// A request just arrived.
    pub(super) fn new(
        ctx: Arc<RequestContext>,
        started: Instant,
        parts: &http::request::Parts,
        request_header_bytes: u64,
        request_bytes: Arc<AtomicU64>,
        traceparent: HeaderValue,
        span: Option<ambit_otel::Span>,
    ) -> Self {
        Exchange {
            ctx,
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
            details: "downstream_remote_disconnect".to_owned(),
            audit: None,
            span,
        }
    }
}

impl Exchange {
    fn record(mut self, bytes: u64, trailer_status: Option<u32>, end: End) {
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
        if let Some(mut span) = self.span.take() {
            span.set("http.response.status_code", i64::from(self.status));
            span.set("ambit.response_flags", flags.to_owned());
            span.set("ambit.response_code_details", self.details.clone());
            if let Some(e) = &self.upstream {
                span.set("ambit.upstream.address", e.addr.to_string());
                if let Some(p) = &e.hbone {
                    span.set("ambit.upstream.principal", p.to_string());
                }
            }
            if self.status >= 500 || self.status == 0 {
                span.error(format!("{} {flags}", self.status));
            }
        }
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
            response_code_details = self.details,
            audit_policy = self.audit.as_deref().unwrap_or("-"),
            "request"
        );
    }
}
