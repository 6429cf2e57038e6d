//! Request mirroring (Envoy's shadowing): copies of a share of a route's requests sent to
//! another cluster, answers thrown away, never felt by the original request.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Request};

use super::RequestContext;
use super::forward::{Attempt, observe, one_attempt, upstream_target, version};
use super::report::Flag;
use crate::body::ProxyBody;
use crate::config::{Config, Mirror, MirrorHost, Overflow};
use crate::upstream::UpstreamError;

/// A request as routed, before it is shaped for one upstream's protocol: what mirrors
/// copy.
pub(super) struct Shadow {
    pub(super) method: http::Method,
    pub(super) path_and_query: http::uri::PathAndQuery,
    pub(super) authority: Option<http::uri::Authority>,
    pub(super) headers: HeaderMap,
    pub(super) te_trailers: bool,
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
pub(super) fn send(
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
