//! Envoy resources → the waypoint's [`config`](super) types, refusing what would
//! change behaviour and is not implemented.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ambit_identity::Identity;
use ambit_xds::type_url;
use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upstream_http;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf;
use prost::Message;

use crate::filter::NamedFilter;

use super::{
    Action, Cluster, DEFAULT_LIMIT, Endpoint, Forward, HeaderMatch, HeaderOp, LbPolicy, Limits,
    Listener, ListenerKind, Mirror, MirrorHost, PathMatch, QueryMatch, Redirect, RetryLimit,
    RetryOn, RetryPolicy, Route, RouteConfig, RouteMatch, StringMatch, UpstreamProtocol,
    VirtualHost,
};

/// Why a resource was refused.
pub type Error = String;

pub(crate) fn unpack<M: Message + Default>(any: &protobuf::Any, want: &str) -> Result<M, Error> {
    if any.type_url != want {
        return Err(format!("typed_config is {}, expected {want}", any.type_url));
    }
    M::decode(any.value.as_slice()).map_err(|e| format!("{want}: {e}"))
}

pub(crate) fn duration(d: &protobuf::Duration) -> Result<Duration, Error> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err("negative duration".into());
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

fn socket_address(a: &Option<core::Address>) -> Result<SocketAddr, Error> {
    let Some(core::Address {
        address: Some(core::address::Address::SocketAddress(sa)),
    }) = a
    else {
        return Err("only socket addresses are supported".into());
    };
    let ip: IpAddr = sa
        .address
        .parse()
        .map_err(|_| format!("{:?} is not an IP address", sa.address))?;
    let port = match sa.port_specifier {
        Some(core::socket_address::PortSpecifier::PortValue(p)) => {
            u16::try_from(p).map_err(|_| format!("port {p} is out of range"))?
        }
        _ => return Err("a socket address needs port_value".into()),
    };
    Ok(SocketAddr::new(ip, port))
}

/// A `Listener`.
pub fn listener(any: &protobuf::Any) -> Result<Listener, Error> {
    let l: listener::Listener = unpack(any, type_url::LISTENER)?;
    let mut addrs = vec![socket_address(&l.address)?];
    for a in &l.additional_addresses {
        addrs.push(socket_address(&a.address)?);
    }
    if !l.listener_filters.is_empty() {
        return Err("listener_filters are not supported".into());
    }
    let [chain] = l.filter_chains.as_slice() else {
        return Err(format!(
            "exactly one filter chain is supported, found {}",
            l.filter_chains.len()
        ));
    };
    if chain.filter_chain_match.is_some() || chain.transport_socket.is_some() {
        return Err("filter_chain_match and transport_socket are not supported".into());
    }
    // Network RBAC filters (TCP listeners), then the one terminal filter.
    let Some((filter, before)) = chain.filters.split_last() else {
        return Err("a filter chain needs a network filter".into());
    };
    let mut rbac = Vec::new();
    for f in before {
        let Some(listener::filter::ConfigType::TypedConfig(cfg)) = &f.config_type else {
            return Err(format!("filter {}: needs a typed_config", f.name));
        };
        if cfg.type_url != type_url::NETWORK_RBAC {
            return Err(format!(
                "network filter {} ({}) is not supported before the last (only RBAC)",
                f.name, cfg.type_url
            ));
        }
        if let Some(r) = crate::filter::rbac::decode_network(cfg)
            .map_err(|e| format!("network filter {}: {e}", f.name))?
        {
            rbac.push(Arc::new(r));
        }
    }
    let Some(listener::filter::ConfigType::TypedConfig(cfg)) = &filter.config_type else {
        return Err(format!("filter {}: needs a typed_config", filter.name));
    };
    let kind = match cfg.type_url.as_str() {
        type_url::HCM => {
            if !rbac.is_empty() {
                return Err("network RBAC before an HTTP connection manager is not supported (use the RBAC HTTP filter)".into());
            }
            let h: hcm::HttpConnectionManager = unpack(cfg, type_url::HCM)?;
            let Some(hcm::http_connection_manager::RouteSpecifier::Rds(rds)) = &h.route_specifier
            else {
                return Err("the HTTP connection manager must take its routes from RDS".into());
            };
            use hcm::http_connection_manager::PathWithEscapedSlashesAction as Escaped;
            if !matches!(
                Escaped::try_from(h.path_with_escaped_slashes_action),
                Ok(Escaped::ImplementationSpecificDefault | Escaped::KeepUnchanged)
            ) {
                return Err(
                    "path_with_escaped_slashes_action other than KEEP_UNCHANGED is not supported"
                        .into(),
                );
            }
            if h.normalize_path.is_some_and(|n| n.value) && h.path_normalization_options.is_some() {
                return Err("path_normalization_options are not supported".into());
            }
            ListenerKind::Http {
                route_config: rds.route_config_name.clone(),
                filters: http_filters(&h.http_filters)?,
                // Envoy's default (without its runtime override) is not to normalize.
                normalize_path: h.normalize_path.is_some_and(|n| n.value),
                merge_slashes: h.merge_slashes,
            }
        }
        type_url::TCP_PROXY => {
            let t: tcp_proxy::TcpProxy = unpack(cfg, type_url::TCP_PROXY)?;
            match t.cluster_specifier {
                Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(c)) => ListenerKind::Tcp {
                    cluster: c,
                    rbac: std::mem::take(&mut rbac),
                },
                _ => return Err("tcp_proxy needs one cluster".into()),
            }
        }
        other => return Err(format!("network filter {other} is not supported")),
    };
    Ok(Listener {
        name: l.name,
        addrs,
        kind,
    })
}

/// An HTTP connection manager's filters: those the waypoint implements, in their
/// order, then the router (last, and only there).
fn http_filters(filters: &[hcm::HttpFilter]) -> Result<Vec<NamedFilter>, Error> {
    use crate::filter::{self, HttpFilter};
    let mut out = Vec::new();
    let n = filters.len();
    for (i, f) in filters.iter().enumerate() {
        let at = |e: Error| format!("HTTP filter {:?}: {e}", f.name);
        if f.is_optional || f.disabled {
            return Err(at("is_optional and disabled are not supported".into()));
        }
        let Some(hcm::http_filter::ConfigType::TypedConfig(c)) = &f.config_type else {
            return Err(at("needs a typed_config".into()));
        };
        let filter = match c.type_url.as_str() {
            type_url::ROUTER if i + 1 == n => break,
            type_url::HTTP_FAULT => {
                HttpFilter::Fault(filter::fault::decode(c).map_err(at)?.map(Arc::new))
            }
            type_url::HTTP_LOCAL_RATELIMIT => {
                HttpFilter::RateLimit(Arc::new(filter::ratelimit::decode(c).map_err(at)?))
            }
            type_url::HTTP_JWT_AUTHN => {
                HttpFilter::Jwt(Arc::new(filter::jwt::decode(c).map_err(at)?))
            }
            type_url::HTTP_RBAC => match filter::rbac::decode(c).map_err(at)? {
                Some(r) => HttpFilter::Rbac(Arc::new(r)),
                // No rules: Envoy's filter does nothing.
                None => continue,
            },
            other => {
                return Err(at(format!(
                    "{other} is not supported (JWT authentication, RBAC, local rate limiting and fault injection, then the router last)"
                )));
            }
        };
        out.push(NamedFilter {
            name: f.name.clone(),
            filter,
        });
    }
    if filters.last().and_then(|f| match &f.config_type {
        Some(hcm::http_filter::ConfigType::TypedConfig(c)) => Some(c.type_url.as_str()),
        _ => None,
    }) != Some(type_url::ROUTER)
    {
        return Err("the router must be the last HTTP filter".into());
    }
    Ok(out)
}

fn regex(r: &matcher::RegexMatcher) -> Result<regex::Regex, Error> {
    // Whole-string semantics, as Envoy's safe_regex.
    regex::Regex::new(&format!("^(?:{})$", r.regex))
        .map_err(|e| format!("regex {:?}: {e}", r.regex))
}

pub(crate) fn string_match(m: &matcher::StringMatcher) -> Result<StringMatch, Error> {
    use matcher::string_matcher::MatchPattern;
    // Envoy: ignore_case lowers both sides, and does nothing to a regex.
    let fold = |s: &str| {
        if m.ignore_case {
            s.to_ascii_lowercase()
        } else {
            s.to_owned()
        }
    };
    let pattern = match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => StringMatch::Exact(fold(s)),
        Some(MatchPattern::Prefix(s)) => StringMatch::Prefix(fold(s)),
        Some(MatchPattern::Suffix(s)) => StringMatch::Suffix(fold(s)),
        Some(MatchPattern::Contains(s)) => StringMatch::Contains(fold(s)),
        Some(MatchPattern::SafeRegex(r)) => return Ok(StringMatch::Regex(regex(r)?)),
        _ => return Err("unsupported string matcher".into()),
    };
    Ok(if m.ignore_case {
        StringMatch::IgnoreCase(Box::new(pattern))
    } else {
        pattern
    })
}

// Deprecated fields still configure a stock Envoy, so they are honoured or refused.
#[allow(deprecated)]
pub(crate) fn header_ops(opts: &[core::HeaderValueOption]) -> Result<Vec<HeaderOp>, Error> {
    use core::header_value_option::HeaderAppendAction;
    opts.iter()
        .map(|o| {
            let h = o.header.as_ref().ok_or("header option without a header")?;
            let name = http::HeaderName::from_bytes(h.key.as_bytes())
                .map_err(|_| format!("{:?} is not a header name", h.key))?;
            let value = http::HeaderValue::from_str(&h.value)
                .map_err(|_| format!("header {}: invalid value", h.key))?;
            let overwrite = match HeaderAppendAction::try_from(o.append_action) {
                Ok(HeaderAppendAction::AppendIfExistsOrAdd) => {
                    // The deprecated `append` field, if set, says the same or the opposite.
                    o.append.is_some_and(|a| !a.value)
                }
                Ok(HeaderAppendAction::OverwriteIfExistsOrAdd) => true,
                _ => return Err(format!("header {}: append_action not supported", h.key)),
            };
            Ok(HeaderOp {
                name,
                value,
                overwrite,
            })
        })
        .collect()
}

fn header_names(v: &[String]) -> Result<Vec<http::HeaderName>, Error> {
    v.iter()
        .map(|n| {
            http::HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| format!("{n:?} is not a header name"))
        })
        .collect()
}

fn retry_policy(r: &route::RetryPolicy) -> Result<RetryPolicy, Error> {
    let mut on = RetryOn::default();
    for c in r
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        match c {
            "5xx" => on.five_xx = true,
            "gateway-error" => on.gateway_error = true,
            "reset" => on.reset = true,
            "connect-failure" => on.connect_failure = true,
            "retriable-4xx" => on.retriable_4xx = true,
            "refused-stream" => on.refused_stream = true,
            "retriable-status-codes" => on.retriable_status_codes = true,
            "cancelled" => on.grpc_cancelled = true,
            "deadline-exceeded" => on.grpc_deadline_exceeded = true,
            "internal" => on.grpc_internal = true,
            "resource-exhausted" => on.grpc_resource_exhausted = true,
            "unavailable" => on.grpc_unavailable = true,
            other => return Err(format!("retry_on {other:?} is not supported")),
        }
    }
    if r.retry_priority.is_some() || !r.retry_host_predicate.is_empty() {
        return Err("retry_priority and retry_host_predicate are not supported".into());
    }
    let (base, max) = match &r.retry_back_off {
        Some(b) => {
            let base = b
                .base_interval
                .as_ref()
                .map(duration)
                .transpose()?
                .unwrap_or(Duration::from_millis(25));
            let max = b
                .max_interval
                .as_ref()
                .map(duration)
                .transpose()?
                .unwrap_or(base * 10);
            (base, max)
        }
        None => (Duration::from_millis(25), Duration::from_millis(250)),
    };
    Ok(RetryPolicy {
        retry_on: on,
        num_retries: r.num_retries.map_or(1, |n| n.value),
        per_try_timeout: r.per_try_timeout.as_ref().map(duration).transpose()?,
        retriable_status_codes: r
            .retriable_status_codes
            .iter()
            .map(|c| u16::try_from(*c).map_err(|_| format!("status code {c}")))
            .collect::<Result<_, _>>()?,
        base_interval: base,
        max_interval: max.max(base),
    })
}

/// A `HeaderMatcher` (routes, fault filters, RBAC).
// Deprecated fields still configure a stock Envoy, so they are honoured or refused.
#[allow(deprecated)]
pub(crate) fn header_matcher(h: &route::HeaderMatcher) -> Result<HeaderMatch, Error> {
    use route::header_matcher::HeaderMatchSpecifier;
    if h.treat_missing_header_as_empty {
        return Err(format!(
            "header {}: treat_missing_header_as_empty is not supported",
            h.name
        ));
    }
    let value = match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::StringMatch(s)) => string_match(s)?,
        Some(HeaderMatchSpecifier::ExactMatch(s)) => StringMatch::Exact(s.clone()),
        Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => StringMatch::Regex(regex(r)?),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => StringMatch::Prefix(s.clone()),
        Some(HeaderMatchSpecifier::SuffixMatch(s)) => StringMatch::Suffix(s.clone()),
        Some(HeaderMatchSpecifier::PresentMatch(true)) | None => StringMatch::Present,
        _ => return Err(format!("header {}: unsupported match", h.name)),
    };
    Ok(HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        value,
        invert: h.invert_match,
    })
}

// Deprecated fields still configure a stock Envoy, so they are honoured or refused.
#[allow(deprecated)]
pub(crate) fn route_match(m: &route::RouteMatch) -> Result<RouteMatch, Error> {
    use route::route_match::PathSpecifier;
    if m.case_sensitive.is_some_and(|c| !c.value) {
        return Err("case-insensitive paths are not supported".into());
    }
    if m.runtime_fraction.is_some() || m.grpc.is_some() || m.tls_context.is_some() {
        return Err("runtime_fraction, grpc and tls_context matches are not supported".into());
    }
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(PathSpecifier::PathSeparatedPrefix(p)) => PathMatch::SeparatedPrefix(p.clone()),
        Some(PathSpecifier::SafeRegex(r)) => PathMatch::Regex(regex(r)?),
        _ => return Err("unsupported path match".into()),
    };
    let headers = m
        .headers
        .iter()
        .map(header_matcher)
        .collect::<Result<Vec<_>, _>>()?;
    let mut query = Vec::new();
    for q in &m.query_parameters {
        use route::query_parameter_matcher::QueryParameterMatchSpecifier;
        let value = match &q.query_parameter_match_specifier {
            Some(QueryParameterMatchSpecifier::StringMatch(s)) => string_match(s)?,
            Some(QueryParameterMatchSpecifier::PresentMatch(true)) | None => StringMatch::Present,
            _ => return Err(format!("query parameter {}: unsupported match", q.name)),
        };
        query.push(QueryMatch {
            name: q.name.clone(),
            value,
        });
    }
    Ok(RouteMatch {
        path,
        headers,
        query,
    })
}

// Deprecated fields still configure a stock Envoy, so they are honoured or refused.
#[allow(deprecated)]
fn action(a: &Option<route::route::Action>) -> Result<Action, Error> {
    match a {
        Some(route::route::Action::Route(ra)) => {
            use route::route_action::{ClusterSpecifier, HostRewriteSpecifier};
            let clusters = match &ra.cluster_specifier {
                Some(ClusterSpecifier::Cluster(c)) => vec![(c.clone(), 1)],
                Some(ClusterSpecifier::WeightedClusters(w)) => w
                    .clusters
                    .iter()
                    .map(|c| (c.name.clone(), c.weight.map_or(0, |w| w.value)))
                    .collect(),
                _ => return Err("a route needs a cluster or weighted clusters".into()),
            };
            if clusters.iter().all(|(_, w)| *w == 0) {
                return Err("every weighted cluster has weight 0".into());
            }
            if !ra.hash_policy.is_empty()
                || ra.hedge_policy.is_some()
                || !ra.rate_limits.is_empty()
                || ra.cors.is_some()
            {
                return Err("hashing, hedging, rate limits and CORS are not supported yet".into());
            }
            // Envoy's default route timeout is 15 s; 0 disables it.
            let timeout = match &ra.timeout {
                None => Some(Duration::from_secs(15)),
                Some(d) => Some(duration(d)?).filter(|d| !d.is_zero()),
            };
            let mirrors = ra
                .request_mirror_policies
                .iter()
                .map(mirror_policy)
                .collect::<Result<_, _>>()?;
            Ok(Action::Forward(Forward {
                clusters,
                mirrors,
                timeout,
                retry: ra.retry_policy.as_ref().map(retry_policy).transpose()?,
                prefix_rewrite: Some(ra.prefix_rewrite.clone()).filter(|p| !p.is_empty()),
                regex_rewrite: ra
                    .regex_rewrite
                    .as_ref()
                    .map(|r| {
                        let m = r.pattern.as_ref().ok_or("regex_rewrite without pattern")?;
                        let re = regex::Regex::new(&m.regex)
                            .map_err(|e| format!("regex {:?}: {e}", m.regex))?;
                        Ok::<_, Error>((re, r.substitution.clone()))
                    })
                    .transpose()?,
                host_rewrite: match &ra.host_rewrite_specifier {
                    None => None,
                    Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h.clone()),
                    Some(_) => return Err("only host_rewrite_literal is supported".into()),
                },
            }))
        }
        Some(route::route::Action::Redirect(r)) => {
            use route::redirect_action::{
                PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier,
            };
            let status = match RedirectResponseCode::try_from(r.response_code) {
                Ok(RedirectResponseCode::MovedPermanently) => 301,
                Ok(RedirectResponseCode::Found) => 302,
                Ok(RedirectResponseCode::SeeOther) => 303,
                Ok(RedirectResponseCode::TemporaryRedirect) => 307,
                Ok(RedirectResponseCode::PermanentRedirect) => 308,
                Err(_) => return Err(format!("redirect code {}", r.response_code)),
            };
            let (path, prefix_rewrite) = match &r.path_rewrite_specifier {
                None => (None, None),
                Some(PathRewriteSpecifier::PathRedirect(p)) => (Some(p.clone()), None),
                Some(PathRewriteSpecifier::PrefixRewrite(p)) => (None, Some(p.clone())),
                Some(_) => return Err("regex path redirects are not supported".into()),
            };
            Ok(Action::Redirect(Redirect {
                scheme: match &r.scheme_rewrite_specifier {
                    None => None,
                    Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".into()),
                    Some(SchemeRewriteSpecifier::HttpsRedirect(false)) => None,
                    Some(SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.clone()),
                },
                host: Some(r.host_redirect.clone()).filter(|h| !h.is_empty()),
                port: match r.port_redirect {
                    0 => None,
                    p => Some(u16::try_from(p).map_err(|_| format!("port {p}"))?),
                },
                path,
                prefix_rewrite,
                status: http::StatusCode::from_u16(status).expect("valid"),
                strip_query: r.strip_query,
            }))
        }
        Some(route::route::Action::DirectResponse(d)) => {
            use core::data_source::Specifier;
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                None => bytes::Bytes::new(),
                Some(Specifier::InlineString(s)) => bytes::Bytes::from(s.clone()),
                Some(Specifier::InlineBytes(b)) => bytes::Bytes::from(b.clone()),
                Some(_) => return Err("direct response bodies must be inline".into()),
            };
            Ok(Action::Direct {
                status: http::StatusCode::from_u16(u16::try_from(d.status).map_err(|_| "status")?)
                    .map_err(|_| format!("status {}", d.status))?,
                body,
            })
        }
        _ => Err("unsupported route action".into()),
    }
}

/// A request mirror policy: a named cluster, a share, the shadow `Host`.
fn mirror_policy(m: &route::route_action::RequestMirrorPolicy) -> Result<Mirror, Error> {
    if m.cluster.is_empty() {
        return Err(
            "a request mirror policy needs a cluster (cluster_header is not supported)".into(),
        );
    }
    if m.trace_sampled.is_some() || !m.request_headers_mutations.is_empty() {
        return Err(
            "request mirror trace_sampled and request_headers_mutations are not supported".into(),
        );
    }
    let share = match &m.runtime_fraction {
        // Envoy: without a fraction, every request is mirrored.
        None => 1.0,
        Some(f) => match &f.default_value {
            None => 1.0,
            Some(_) => probability(&f.default_value)?,
        },
    };
    Ok(Mirror {
        cluster: m.cluster.clone(),
        share,
        host: if !m.host_rewrite_literal.is_empty() {
            MirrorHost::Literal(m.host_rewrite_literal.clone())
        } else if m.disable_shadow_host_suffix_append {
            MirrorHost::Same
        } else {
            MirrorHost::ShadowSuffix
        },
    })
}

/// A fractional percent as a probability.
pub(crate) fn probability(
    p: &Option<envoy_types::pb::envoy::r#type::v3::FractionalPercent>,
) -> Result<f64, Error> {
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
    // Envoy: no percentage is 0 %.
    let Some(p) = p else { return Ok(0.0) };
    let per = match DenominatorType::try_from(p.denominator) {
        Ok(DenominatorType::Hundred) => 100.0,
        Ok(DenominatorType::TenThousand) => 10_000.0,
        Ok(DenominatorType::Million) => 1_000_000.0,
        Err(_) => return Err(format!("fractional percent denominator {}", p.denominator)),
    };
    Ok((f64::from(p.numerator) / per).min(1.0))
}

/// A `RouteConfiguration`.
pub fn route_config(any: &protobuf::Any) -> Result<RouteConfig, Error> {
    let rc: route::RouteConfiguration = unpack(any, type_url::ROUTE)?;
    let mut virtual_hosts = Vec::new();
    for vh in &rc.virtual_hosts {
        if vh.require_tls != 0 || vh.retry_policy.is_some() || !vh.rate_limits.is_empty() {
            return Err(format!(
                "virtual host {}: require_tls, virtual-host retry policies and rate limits are not supported",
                vh.name
            ));
        }
        let mut routes = Vec::new();
        for r in &vh.routes {
            let at = |e: Error| format!("virtual host {}, route {:?}: {e}", vh.name, r.name);
            let matcher = r
                .r#match
                .as_ref()
                .ok_or("a route without a match")
                .map_err(|e| at(e.into()))
                .and_then(|m| route_match(m).map_err(at))?;
            let (mut route_fault, mut rate_limit) = (None, None);
            for (name, cfg) in &r.typed_per_filter_config {
                match (name.as_str(), cfg.type_url.as_str()) {
                    (ambit_xds::waypoint::FAULT_FILTER, type_url::HTTP_FAULT) => {
                        route_fault = crate::filter::fault::decode(cfg).map_err(at)?.map(Arc::new);
                    }
                    (ambit_xds::waypoint::RATELIMIT_FILTER, type_url::HTTP_LOCAL_RATELIMIT) => {
                        let rl = crate::filter::ratelimit::decode(cfg).map_err(at)?;
                        if !rl.is_active() {
                            return Err(at(
                                "a route's local rate limit needs a token_bucket".into()
                            ));
                        }
                        rate_limit = Some(Arc::new(rl));
                    }
                    _ => {
                        return Err(at(format!(
                            "typed_per_filter_config {name:?} ({}) is not supported (only fault injection and local rate limiting)",
                            cfg.type_url
                        )));
                    }
                }
            }
            routes.push(Route {
                name: r.name.clone(),
                fault: route_fault,
                rate_limit,
                matcher,
                action: action(&r.action).map_err(at)?,
                request_headers_to_add: header_ops(&r.request_headers_to_add).map_err(at)?,
                request_headers_to_remove: header_names(&r.request_headers_to_remove)
                    .map_err(at)?,
                response_headers_to_add: header_ops(&r.response_headers_to_add).map_err(at)?,
                response_headers_to_remove: header_names(&r.response_headers_to_remove)
                    .map_err(at)?,
            });
        }
        virtual_hosts.push(VirtualHost {
            name: vh.name.clone(),
            domains: vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
            routes,
        });
    }
    Ok(RouteConfig {
        name: rc.name,
        virtual_hosts,
    })
}

/// A `Cluster`.
pub fn cluster(any: &protobuf::Any) -> Result<Cluster, Error> {
    let c: cluster::Cluster = unpack(any, type_url::CLUSTER)?;
    match c.cluster_discovery_type {
        Some(cluster::cluster::ClusterDiscoveryType::Type(t))
            if t == cluster::cluster::DiscoveryType::Eds as i32 => {}
        _ => {
            return Err(format!(
                "cluster {}: only EDS clusters are supported",
                c.name
            ));
        }
    }
    let lb = match cluster::cluster::LbPolicy::try_from(c.lb_policy) {
        Ok(cluster::cluster::LbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(cluster::cluster::LbPolicy::LeastRequest) => LbPolicy::LeastRequest,
        _ => {
            return Err(format!(
                "cluster {}: lb_policy must be ROUND_ROBIN or LEAST_REQUEST",
                c.name
            ));
        }
    };
    if c.transport_socket.is_some() || !c.transport_socket_matches.is_empty() {
        return Err(format!(
            "cluster {}: transport sockets are not supported (HBONE comes from endpoint metadata)",
            c.name
        ));
    }
    if !c.health_checks.is_empty() {
        return Err(format!(
            "cluster {}: active health checks are not supported yet",
            c.name
        ));
    }
    let outlier = c
        .outlier_detection
        .as_ref()
        .map(outlier_detection)
        .transpose()
        .map_err(|e| format!("cluster {}: outlier detection: {e}", c.name))?
        .map(|o| Arc::new(crate::outlier::Outlier::new(o)));
    let panic_threshold = match &c.common_lb_config {
        None => 50.0,
        Some(lb) => {
            let rest = cluster::cluster::CommonLbConfig {
                healthy_panic_threshold: None,
                ..lb.clone()
            };
            if rest != cluster::cluster::CommonLbConfig::default() {
                return Err(format!(
                    "cluster {}: of common_lb_config only healthy_panic_threshold is supported",
                    c.name
                ));
            }
            lb.healthy_panic_threshold
                .as_ref()
                .map_or(50.0, |p| p.value.clamp(0.0, 100.0))
        }
    };
    let (retry_limit, limits) = match &c.circuit_breakers {
        Some(cb) => circuit_breakers(cb).map_err(|e| format!("cluster {}: {e}", c.name))?,
        None => (RetryLimit::default(), Limits::default()),
    };
    let mut protocol = UpstreamProtocol::Http1;
    for (k, v) in &c.typed_extension_protocol_options {
        if k != "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" {
            return Err(format!(
                "cluster {}: protocol options {k} not supported",
                c.name
            ));
        }
        let o: upstream_http::HttpProtocolOptions = unpack(v, type_url::HTTP_PROTOCOL_OPTIONS)?;
        use upstream_http::http_protocol_options::UpstreamProtocolOptions;
        use upstream_http::http_protocol_options::explicit_http_config::ProtocolConfig;
        protocol = match o.upstream_protocol_options {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match e.protocol_config {
                Some(ProtocolConfig::Http2ProtocolOptions(_)) => UpstreamProtocol::Http2,
                Some(ProtocolConfig::HttpProtocolOptions(_)) | None => UpstreamProtocol::Http1,
                Some(_) => {
                    return Err(format!("cluster {}: HTTP/3 is not supported", c.name));
                }
            },
            None => UpstreamProtocol::Http1,
            Some(_) => {
                return Err(format!(
                    "cluster {}: only explicit HTTP protocol configuration is supported",
                    c.name
                ));
            }
        };
    }
    let eds_name = c
        .eds_cluster_config
        .as_ref()
        .map(|e| e.service_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| c.name.clone());
    Ok(Cluster {
        connect_timeout: c
            .connect_timeout
            .as_ref()
            .map(duration)
            .transpose()?
            .unwrap_or(Duration::from_secs(5)),
        pool: Arc::from(c.name.as_str()),
        name: c.name,
        protocol,
        lb,
        eds_name,
        retry_limit,
        limits,
        load: Default::default(),
        outlier,
        panic_threshold,
    })
}

/// A cluster's `outlier_detection`: the consecutive-error detectors. Success-rate and
/// failure-percentage detection must be off (`enforcing_success_rate: 0`, as Istio
/// writes it), and local-origin errors not split.
fn outlier_detection(
    o: &cluster::OutlierDetection,
) -> Result<crate::outlier::OutlierConfig, Error> {
    let d = crate::outlier::OutlierConfig::default();
    let value = |v: Option<protobuf::UInt32Value>, default: u32| v.map_or(default, |v| v.value);
    let percent = |v: Option<protobuf::UInt32Value>, default: u32| -> Result<f64, Error> {
        match value(v, default) {
            p if p <= 100 => Ok(f64::from(p) / 100.0),
            p => Err(format!("an enforcing percentage of {p}")),
        }
    };
    if value(o.enforcing_success_rate, 100) != 0
        || value(o.enforcing_failure_percentage, 0) != 0
        || value(o.enforcing_failure_percentage_local_origin, 0) != 0
    {
        return Err(
            "success-rate and failure-percentage detection are not supported (set enforcing_success_rate to 0)"
                .into(),
        );
    }
    if o.split_external_local_origin_errors {
        return Err("split_external_local_origin_errors is not supported".into());
    }
    let time = |t: &Option<protobuf::Duration>, default: Duration| -> Result<Duration, Error> {
        match t {
            None => Ok(default),
            Some(t) => duration(t),
        }
    };
    let interval = time(&o.interval, d.interval)?;
    if interval.is_zero() {
        return Err("interval must be over 0".into());
    }
    let base_ejection_time = time(&o.base_ejection_time, d.base_ejection_time)?;
    let max_ejection_time = match &o.max_ejection_time {
        None => d.max_ejection_time.max(base_ejection_time),
        Some(t) => match duration(t)? {
            t if t < base_ejection_time => {
                return Err("max_ejection_time cannot be smaller than base_ejection_time".into());
            }
            t => t,
        },
    };
    if !o.monitors.is_empty() {
        return Err("outlier detection monitors are not supported".into());
    }
    Ok(crate::outlier::OutlierConfig {
        consecutive_5xx: value(o.consecutive_5xx, d.consecutive_5xx),
        enforcing_5xx: percent(o.enforcing_consecutive_5xx, 100)?,
        consecutive_gateway: value(o.consecutive_gateway_failure, d.consecutive_gateway),
        enforcing_gateway: percent(o.enforcing_consecutive_gateway_failure, 0)?,
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_percent: value(o.max_ejection_percent, d.max_ejection_percent).min(100),
        always_eject_one_host: o.always_eject_one_host.is_some_and(|b| b.value),
        max_ejection_time_jitter: time(&o.max_ejection_time_jitter, Duration::ZERO)?,
    })
}

/// A cluster's circuit breakers (the default priority's thresholds; Envoy's defaults
/// for what they leave out).
fn circuit_breakers(cb: &cluster::CircuitBreakers) -> Result<(RetryLimit, Limits), Error> {
    if !cb.per_host_thresholds.is_empty() {
        return Err("per-host circuit breaker thresholds are not supported yet".into());
    }
    let mut retry = RetryLimit::default();
    let mut limits = Limits::default();
    for t in &cb.thresholds {
        if t.priority != core::RoutingPriority::Default as i32 {
            return Err("only DEFAULT-priority circuit breaker thresholds are supported".into());
        }
        if t.max_connection_pools.is_some() {
            return Err("circuit breaker max_connection_pools is not supported yet".into());
        }
        let or_default = |v: Option<protobuf::UInt32Value>| v.map_or(DEFAULT_LIMIT, |v| v.value);
        limits = Limits {
            max_connections: or_default(t.max_connections),
            max_pending_requests: or_default(t.max_pending_requests),
            max_requests: or_default(t.max_requests),
        };
        if let Some(m) = t.max_retries {
            retry = RetryLimit::Max(m.value);
        }
        if let Some(b) = &t.retry_budget {
            if b.budget_interval
                .is_some_and(|d| d.seconds != 0 || d.nanos != 0)
            {
                return Err("retry_budget.budget_interval is not supported".into());
            }
            let percent = b.budget_percent.map_or(20.0, |p| p.value);
            if !(0.0..=100.0).contains(&percent) {
                return Err(format!(
                    "retry_budget.budget_percent {percent} is not in [0, 100]"
                ));
            }
            retry = RetryLimit::Budget {
                percent,
                min: b.min_retry_concurrency.map_or(3, |m| m.value),
            };
        }
    }
    Ok((retry, limits))
}

/// A `ClusterLoadAssignment`.
pub fn endpoints(any: &protobuf::Any) -> Result<(String, Vec<Endpoint>), Error> {
    let cla: endpoint::ClusterLoadAssignment = unpack(any, type_url::ENDPOINT)?;
    let mut out = Vec::new();
    for loc in &cla.endpoints {
        for e in &loc.lb_endpoints {
            let Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier
            else {
                return Err("named endpoints are not supported".into());
            };
            // Unhealthy endpoints (as EDS says) get no traffic.
            let health = core::HealthStatus::try_from(e.health_status).unwrap_or_default();
            if matches!(
                health,
                core::HealthStatus::Unhealthy
                    | core::HealthStatus::Draining
                    | core::HealthStatus::Timeout
            ) {
                continue;
            }
            let field = |ns: &str, key: &str| {
                e.metadata
                    .as_ref()
                    .and_then(|m| m.filter_metadata.get(ns))
                    .and_then(|s| s.fields.get(key))
                    .map(|v| match &v.kind {
                        Some(protobuf::value::Kind::StringValue(s)) => Ok(s.as_str()),
                        _ => Err(format!("metadata {ns}.{key} must be a string")),
                    })
                    .transpose()
            };
            use ambit_xds::{istio, waypoint};
            let hbone = field(waypoint::METADATA, waypoint::HBONE_IDENTITY)?
                .map(|s| Identity::parse(s).map_err(|e| format!("hbone_identity: {e}")))
                .transpose()?;
            // Telemetry only: a malformed value is refused rather than mislabelling.
            let workload = field(istio::METADATA, istio::WORKLOAD)?
                .map(|s| {
                    istio::WorkloadMetadata::parse(s)
                        .map(std::sync::Arc::new)
                        .ok_or_else(|| {
                            format!(
                                "metadata istio.workload {s:?} is not \
                             <name>;<namespace>;<canonical service>;<revision>;<cluster>"
                            )
                        })
                })
                .transpose()?;
            out.push(Endpoint {
                addr: socket_address(&ep.address)?,
                hbone,
                weight: e.load_balancing_weight.map_or(1, |w| w.value.max(1)),
                workload,
            });
        }
    }
    Ok((cla.cluster_name, out))
}

/// An `ambit.v1.Workload` the waypoint fronts.
pub fn fronted_workload(any: &protobuf::Any) -> Result<super::FrontedWorkload, Error> {
    let w: ambit_xds::ambit::Workload = unpack(any, type_url::WORKLOAD)?;
    let ips = w
        .ips
        .iter()
        .map(|b| ambit_xds::convert::ip_from_bytes(b).map_err(|e| format!("ips: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if ips.is_empty() {
        return Err(format!("workload {}/{} has no IP", w.namespace, w.name));
    }
    let hbone = if w.enrolled {
        Some(Identity::parse(&w.identity).map_err(|e| format!("identity: {e}"))?)
    } else {
        None
    };
    Ok(super::FrontedWorkload {
        namespace: w.namespace,
        name: w.name,
        ips,
        hbone,
    })
}
