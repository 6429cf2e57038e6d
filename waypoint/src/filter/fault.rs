//! Envoy's fault injection filter (`envoy.filters.http.fault`), the `HTTPFault` subset:
//! a fixed delay and/or an abort (an HTTP status, or a gRPC status), each for a share of
//! requests, optionally only for requests with some headers. A route's own fault
//! (`typed_per_filter_config`) replaces the filter's.

use std::time::Duration;

use envoy_types::pb::google::protobuf;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{self, ProxyBody};
use crate::config::HeaderMatch;
use crate::config::decode::{self, Error};

/// A fixed delay and/or an abort, each for a share of requests, for requests matching
/// `headers`.
#[derive(Clone, Debug)]
pub struct Fault {
    /// How long, and the probability (0 to 1).
    pub delay: Option<(Duration, f64)>,
    /// What is answered, and the probability (0 to 1).
    pub abort: Option<(FaultAbort, f64)>,
    /// Only requests matching all these.
    pub headers: Vec<HeaderMatch>,
}

impl PartialEq for Fault {
    fn eq(&self, other: &Self) -> bool {
        self.delay == other.delay && self.abort == other.abort && self.headers == other.headers
    }
}

/// What an abort answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAbort {
    /// This HTTP status.
    Http(http::StatusCode),
    /// This gRPC status, in an HTTP 200 answer.
    Grpc(u32),
}

impl Fault {
    /// Applies to this request?
    pub fn applies(&self, parts: &http::request::Parts) -> bool {
        self.headers
            .iter()
            .all(|h| crate::router::header_matches(h, parts))
    }

    /// The delay to inject now, if this request draws one.
    pub fn draw_delay(&self) -> Option<Duration> {
        self.delay
            .filter(|(_, p)| fastrand::f64() < *p)
            .map(|(d, _)| d)
    }

    /// The abort to inject now, if this request draws one.
    pub fn draw_abort(&self) -> Option<FaultAbort> {
        self.abort
            .filter(|(_, p)| fastrand::f64() < *p)
            .map(|(a, _)| a)
    }
}

/// What an abort answers, as Envoy's fault filter: the HTTP status; or, for a gRPC
/// status, a trailers-only gRPC answer to a gRPC request (and a plain 200 to any other,
/// as Envoy's local reply does).
pub fn abort_response(a: FaultAbort, grpc_request: bool) -> Response<ProxyBody> {
    match a {
        FaultAbort::Http(status) => body::text(status, "fault filter abort"),
        FaultAbort::Grpc(_) if !grpc_request => body::text(StatusCode::OK, "fault filter abort"),
        FaultAbort::Grpc(code) => {
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

/// An `HTTPFault` (the filter's own, or a route's): `None` if it injects nothing.
pub fn decode(any: &protobuf::Any) -> Result<Option<Fault>, Error> {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as http_fault;
    let f: http_fault::HttpFault = decode::unpack(any, ambit_xds::type_url::HTTP_FAULT)?;
    if !f.upstream_cluster.is_empty()
        || !f.downstream_nodes.is_empty()
        || f.max_active_faults.is_some()
        || f.response_rate_limit.is_some()
    {
        return Err(
            "fault upstream_cluster, downstream_nodes, max_active_faults and response_rate_limit are not supported".into(),
        );
    }
    let delay = match &f.delay {
        None => None,
        Some(d) => match &d.fault_delay_secifier {
            Some(common_fault::fault_delay::FaultDelaySecifier::FixedDelay(t)) => {
                Some((decode::duration(t)?, decode::probability(&d.percentage)?))
            }
            _ => return Err("only fixed fault delays are supported".into()),
        },
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => {
            if !a.response_body.is_empty() {
                return Err("fault abort response_body is not supported".into());
            }
            let what = match a.error_type {
                Some(http_fault::fault_abort::ErrorType::HttpStatus(s)) => FaultAbort::Http(
                    u16::try_from(s)
                        .ok()
                        .and_then(|s| http::StatusCode::from_u16(s).ok())
                        .filter(|s| (200..600).contains(&s.as_u16()))
                        .ok_or_else(|| format!("fault abort status {s}"))?,
                ),
                Some(http_fault::fault_abort::ErrorType::GrpcStatus(g)) => FaultAbort::Grpc(g),
                _ => return Err("fault aborts need an HTTP or gRPC status".into()),
            };
            Some((what, decode::probability(&a.percentage)?))
        }
    };
    if delay.is_none() && abort.is_none() {
        return Ok(None);
    }
    let headers = f
        .headers
        .iter()
        .map(decode::header_matcher)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Fault {
        delay,
        abort,
        headers,
    }))
}
