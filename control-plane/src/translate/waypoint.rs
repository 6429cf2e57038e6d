//! A waypoint's configuration as standard Envoy resources: what `ambit-waypoint` and a
//! stock Envoy both subscribe to.
//!
//! For every port of every service the waypoint serves (the services of its namespace
//! whose `ambit.dev/waypoint` names it):
//! - a `Listener` named `<hostname>:<port>` whose address is the service's VIP and port
//!   (more VIPs in `additional_addresses`), with `bind_to_port: false`: the waypoint
//!   picks the listener by the CONNECT authority, never by a socket. Its one filter is
//!   an HTTP connection manager (RDS) for HTTP ports, a `tcp_proxy` for TCP ports;
//! - a `RouteConfiguration` of the same name: the HTTPRoutes attached to that service
//!   port, each match one Envoy route in Gateway API precedence (first match wins), or,
//!   with no route attached, one route sending everything to the service itself;
//! - a `Cluster` (EDS) per backend service port, `outbound|<port>||<hostname>` as Istio
//!   names them, with HTTP/2 upstream for `http2` and `grpc` ports;
//! - its `ClusterLoadAssignment`: each endpoint's IP and target port, and in filter
//!   metadata `ambit` (`hbone_identity`) the endpoint's identity when it is enrolled
//!   (reached over HBONE to its node agent; others in plaintext), and in `istio`
//!   (`workload`) who it is, in Istio's form, for the waypoint's `destination_*` labels.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ambit_xds::{istio, type_url};
use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upstream_http;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf;
use prost::Message;

use super::{VersionedResource, encode, encode_keyed};
use crate::model::http::{
    Abort, Fault, HeaderModifier, HttpMatch, HttpRule, PathMatch, PathModifier, StringMatch,
    precedence,
};
use crate::model::traffic::{LoadBalancer, OutlierDetection, TrafficPolicy};
use crate::model::{Model, NamespacedName, Protocol, Service, Waypoint};

pub use ambit_xds::waypoint::{HBONE_IDENTITY, METADATA, node_id};
/// How long a new upstream connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries of a route no HTTPRoute configures: only what never reached the backend.
const DEFAULT_RETRY_ON: &str = "connect-failure,refused-stream";
const DEFAULT_RETRIES: u32 = 2;

/// Resources by type URL, then by name.
pub type Resources = BTreeMap<&'static str, BTreeMap<String, Arc<VersionedResource>>>;

/// Istio's cluster name for a service port.
pub fn cluster_name(hostname: &str, port: u16) -> String {
    format!("outbound|{port}||{hostname}")
}

/// The listener's (and its route configuration's) name for a service port.
pub fn listener_name(hostname: &str, port: u16) -> String {
    format!("{hostname}:{port}")
}

fn any(type_url: &str, m: &impl Message) -> protobuf::Any {
    protobuf::Any {
        type_url: type_url.to_owned(),
        value: m.encode_to_vec(),
    }
}

fn duration(d: Duration) -> protobuf::Duration {
    protobuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn socket_address(addr: SocketAddr) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(
                addr.port().into(),
            )),
            ..Default::default()
        })),
    }
}

fn ads() -> core::ConfigSource {
    core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

/// Everything `wp` is sent.
pub fn resources(m: &Model, wp: &Waypoint) -> Resources {
    let mut out = Resources::new();
    let mut clusters: BTreeSet<(NamespacedName, u16)> = BTreeSet::new();
    let served = m.services.iter().filter(|(_, s)| {
        !s.is_waypoint && s.namespace == wp.namespace && s.waypoint.as_deref() == Some(&wp.name)
    });
    for (key, svc) in served {
        for port in &svc.ports {
            let name = listener_name(&svc.hostname, port.port);
            let protocol = port.protocol();
            let policies = m
                .waypoint_policies
                .values()
                .filter(|p| p.applies_to(&svc.namespace, &svc.name, &wp.name));
            let authentications = m
                .request_authentications
                .values()
                .filter(|r| r.applies_to(&svc.namespace, &svc.name, &wp.name));
            if protocol.is_http() {
                clusters.extend(super::authn::jwks_clusters(authentications.clone()));
            }
            let mut filters = Vec::new();
            if !protocol.is_http() {
                filters = super::authz::rbac_network_filters(policies.clone());
            }
            let filter = if protocol.is_http() {
                listener::Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(listener::filter::ConfigType::TypedConfig(any(
                        type_url::HCM,
                        &http_connection_manager(
                            &name,
                            super::authn::jwt_filter(m, authentications.clone())
                                .into_iter()
                                .chain(super::authz::rbac_filters(policies))
                                .collect(),
                        ),
                    ))),
                }
            } else {
                listener::Filter {
                    name: "envoy.filters.network.tcp_proxy".into(),
                    config_type: Some(listener::filter::ConfigType::TypedConfig(any(
                        type_url::TCP_PROXY,
                        &tcp_proxy::TcpProxy {
                            stat_prefix: name.clone(),
                            cluster_specifier: Some(
                                tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(cluster_name(
                                    &svc.hostname,
                                    port.port,
                                )),
                            ),
                            ..Default::default()
                        },
                    ))),
                }
            };
            let mut vips = svc.vips.iter().map(|ip| SocketAddr::new(*ip, port.port));
            let Some(first) = vips.next() else { continue };
            let l = listener::Listener {
                name: name.clone(),
                address: Some(socket_address(first)),
                additional_addresses: vips
                    .map(|a| listener::AdditionalAddress {
                        address: Some(socket_address(a)),
                        ..Default::default()
                    })
                    .collect(),
                bind_to_port: Some(protobuf::BoolValue { value: false }),
                filter_chains: vec![listener::FilterChain {
                    filters: filters.into_iter().chain([filter]).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            };
            insert(&mut out, type_url::LISTENER, &name, &l);
            if protocol.is_http() {
                let rc = route_configuration(m, key, svc, port.port, &name, &mut clusters);
                insert(&mut out, type_url::ROUTE, &name, &rc);
            } else {
                clusters.insert((key.clone(), port.port));
            }
        }
    }
    for (key, port) in clusters {
        let Some(svc) = m.services.get(&key) else {
            continue;
        };
        let Some(sp) = svc.ports.iter().find(|p| p.port == port) else {
            continue;
        };
        let name = cluster_name(&svc.hostname, port);
        insert(
            &mut out,
            type_url::CLUSTER,
            &name,
            &cluster_for(&name, sp.protocol(), &svc.traffic),
        );
        let (cla, content) = load_assignment(m, svc, &name, sp.target_port);
        out.entry(type_url::ENDPOINT).or_default().insert(
            name.clone(),
            encode_keyed(type_url::ENDPOINT, &name, &cla, content),
        );
    }
    out
}

fn insert(out: &mut Resources, type_url: &'static str, name: &str, m: &impl Message) {
    out.entry(type_url)
        .or_default()
        .insert(name.to_owned(), encode(type_url, name, m));
}

/// An HTTP connection manager: its authentication and authorization filters (JWT and
/// RBAC, from the request authentications and waypoint policies that apply), local rate
/// limits and fault injection (both configured per route), then the router.
fn http_connection_manager(
    name: &str,
    authorization: Vec<hcm::HttpFilter>,
) -> hcm::HttpConnectionManager {
    hcm::HttpConnectionManager {
        stat_prefix: name.to_owned(),
        codec_type: hcm::http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: Some(ads()),
                route_config_name: name.to_owned(),
            },
        )),
        http_filters: authorization
            .into_iter()
            .chain([
                super::ratelimit::http_filter(),
                hcm::HttpFilter {
                    name: ambit_xds::waypoint::FAULT_FILTER.into(),
                    config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                        type_url::HTTP_FAULT,
                        &HttpFault::default(),
                    ))),
                    ..Default::default()
                },
                hcm::HttpFilter {
                    name: "envoy.filters.http.router".into(),
                    config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                        type_url::ROUTER,
                        &Router::default(),
                    ))),
                    ..Default::default()
                },
            ])
            .collect(),
        strip_port_mode: Some(hcm::http_connection_manager::StripPortMode::StripAnyHostPort(true)),
        // Istio's default (BASE): RFC 3986 normalization before filters and routes, so
        // authorization, routing and the backend agree on one path.
        normalize_path: Some(protobuf::BoolValue { value: true }),
        ..Default::default()
    }
}

/// One Envoy route per match of every rule of every route attached to (service, port),
/// grouped into virtual hosts by host name.
fn route_configuration(
    m: &Model,
    key: &NamespacedName,
    svc: &Service,
    port: u16,
    name: &str,
    clusters: &mut BTreeSet<(NamespacedName, u16)>,
) -> route::RouteConfiguration {
    // (hostnames, rule, match) in route order, then rule order, then match order.
    let mut entries: Vec<(&[String], &HttpRule, &HttpMatch)> = Vec::new();
    for r in m.http_routes.values() {
        if r.parents
            .iter()
            .any(|(s, p)| s == key && p.is_none_or(|p| p == port))
        {
            for rule in &r.rules {
                for mt in &rule.matches {
                    entries.push((&r.hostnames, rule, mt));
                }
            }
        }
    }
    entries.sort_by_key(|(_, _, mt)| precedence(mt));
    let mut virtual_hosts = Vec::new();
    if entries.is_empty() {
        clusters.insert((key.clone(), port));
        virtual_hosts.push(route::VirtualHost {
            name: "default".into(),
            domains: vec!["*".into()],
            routes: vec![route::Route {
                name: "default".into(),
                r#match: Some(route::RouteMatch {
                    path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::route::Action::Route(route::RouteAction {
                    cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                        cluster_name(&svc.hostname, port),
                    )),
                    timeout: Some(duration(Duration::ZERO)),
                    retry_policy: Some(route::RetryPolicy {
                        retry_on: DEFAULT_RETRY_ON.into(),
                        num_retries: Some(protobuf::UInt32Value {
                            value: DEFAULT_RETRIES,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        });
    } else {
        let hostnames: BTreeSet<&String> = entries.iter().flat_map(|(h, _, _)| h.iter()).collect();
        let mut hosts: Vec<(String, Vec<String>)> = hostnames
            .into_iter()
            .map(|h| (h.clone(), vec![h.clone()]))
            .collect();
        hosts.push(("*".into(), vec!["*".into()]));
        for (vh_name, domains) in hosts {
            let routes: Vec<route::Route> = entries
                .iter()
                .filter(|(h, _, _)| h.is_empty() || (vh_name != "*" && h.contains(&vh_name)))
                .map(|(_, rule, mt)| envoy_route(m, rule, mt, clusters))
                .collect();
            if routes.is_empty() {
                continue;
            }
            virtual_hosts.push(route::VirtualHost {
                name: vh_name,
                domains,
                routes,
                ..Default::default()
            });
        }
    }
    route::RouteConfiguration {
        name: name.to_owned(),
        virtual_hosts,
        // Header names were validated by the model; Envoy must not strip ours.
        validate_clusters: Some(protobuf::BoolValue { value: false }),
        ..Default::default()
    }
}

fn string_matcher(s: &StringMatch) -> matcher::StringMatcher {
    matcher::StringMatcher {
        match_pattern: Some(match s {
            StringMatch::Exact(v) => matcher::string_matcher::MatchPattern::Exact(v.clone()),
            StringMatch::Regex(r) => {
                matcher::string_matcher::MatchPattern::SafeRegex(regex_matcher(r))
            }
        }),
        ignore_case: false,
    }
}

fn regex_matcher(r: &str) -> matcher::RegexMatcher {
    matcher::RegexMatcher {
        regex: r.to_owned(),
        engine_type: None,
    }
}

fn header_options(m: &HeaderModifier) -> Vec<core::HeaderValueOption> {
    let opt = |name: &str, value: &str, action: core::header_value_option::HeaderAppendAction| {
        core::HeaderValueOption {
            header: Some(core::HeaderValue {
                key: name.to_owned(),
                value: value.to_owned(),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        }
    };
    use core::header_value_option::HeaderAppendAction::{
        AppendIfExistsOrAdd, OverwriteIfExistsOrAdd,
    };
    m.set
        .iter()
        .map(|h| opt(&h.name, &h.value, OverwriteIfExistsOrAdd))
        .chain(
            m.add
                .iter()
                .map(|h| opt(&h.name, &h.value, AppendIfExistsOrAdd)),
        )
        .collect()
}

fn envoy_route(
    m: &Model,
    rule: &HttpRule,
    mt: &HttpMatch,
    clusters: &mut BTreeSet<(NamespacedName, u16)>,
) -> route::Route {
    use route::route_match::PathSpecifier;
    let path_specifier = match &mt.path {
        PathMatch::Exact(p) => PathSpecifier::Path(p.clone()),
        PathMatch::Prefix(p) if p == "/" => PathSpecifier::Prefix("/".into()),
        // Gateway API prefixes match whole segments: `/a` matches `/a` and `/a/b`, not `/ab`.
        PathMatch::Prefix(p) => PathSpecifier::PathSeparatedPrefix(p.clone()),
        PathMatch::Regex(r) => PathSpecifier::SafeRegex(regex_matcher(r)),
    };
    let mut headers: Vec<route::HeaderMatcher> = mt
        .headers
        .iter()
        .map(|h| route::HeaderMatcher {
            name: h.name.clone(),
            header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(
                string_matcher(&h.value),
            )),
            ..Default::default()
        })
        .collect();
    if let Some(method) = &mt.method {
        headers.push(route::HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(
                string_matcher(&StringMatch::Exact(method.clone())),
            )),
            ..Default::default()
        });
    }
    let query_parameters = mt
        .query_params
        .iter()
        .map(|q| route::QueryParameterMatcher {
            name: q.name.clone(),
            query_parameter_match_specifier: Some(
                route::query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                    string_matcher(&q.value),
                ),
            ),
        })
        .collect();
    let r#match = route::RouteMatch {
        path_specifier: Some(path_specifier),
        headers,
        query_parameters,
        ..Default::default()
    };
    let action = if let Some(rd) = &rule.redirect {
        use route::redirect_action::{
            PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier,
        };
        route::route::Action::Redirect(route::RedirectAction {
            scheme_rewrite_specifier: rd
                .scheme
                .clone()
                .map(SchemeRewriteSpecifier::SchemeRedirect),
            host_redirect: rd.hostname.clone().unwrap_or_default(),
            port_redirect: rd.port.map(u32::from).unwrap_or_default(),
            path_rewrite_specifier: rd.path.as_ref().map(|p| match p {
                PathModifier::Full(v) => PathRewriteSpecifier::PathRedirect(v.clone()),
                PathModifier::Prefix(v) => PathRewriteSpecifier::PrefixRewrite(v.clone()),
            }),
            response_code: match rd.status_code {
                301 => RedirectResponseCode::MovedPermanently,
                303 => RedirectResponseCode::SeeOther,
                307 => RedirectResponseCode::TemporaryRedirect,
                308 => RedirectResponseCode::PermanentRedirect,
                _ => RedirectResponseCode::Found,
            } as i32,
            ..Default::default()
        })
    } else if rule.backends.iter().all(|b| b.weight == 0) {
        // No backend (or only zero weights): Gateway API says 500.
        route::route::Action::DirectResponse(route::DirectResponseAction {
            status: 500,
            ..Default::default()
        })
    } else {
        let mut weighted = Vec::new();
        for b in rule.backends.iter().filter(|b| b.weight > 0) {
            let Some(svc) = m.services.get(&b.service) else {
                continue;
            };
            clusters.insert((b.service.clone(), b.port));
            weighted.push((cluster_name(&svc.hostname, b.port), b.weight));
        }
        use route::route_action::ClusterSpecifier;
        let cluster_specifier = if weighted.len() == 1 {
            ClusterSpecifier::Cluster(weighted.remove(0).0)
        } else {
            ClusterSpecifier::WeightedClusters(route::WeightedCluster {
                clusters: weighted
                    .into_iter()
                    .map(|(name, weight)| route::weighted_cluster::ClusterWeight {
                        name,
                        weight: Some(protobuf::UInt32Value { value: weight }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        };
        let retry_policy = match (&rule.retry, rule.backend_timeout) {
            (Some(r), per_try) => Some(route::RetryPolicy {
                retry_on: r.retry_on.join(","),
                num_retries: Some(protobuf::UInt32Value { value: r.attempts }),
                per_try_timeout: per_try.map(duration),
                retriable_status_codes: r.codes.iter().map(|c| u32::from(*c)).collect(),
                retry_back_off: Some(route::retry_policy::RetryBackOff {
                    base_interval: Some(duration(r.backoff)),
                    max_interval: Some(duration(r.backoff * 10)),
                }),
                ..Default::default()
            }),
            (None, Some(per_try)) => Some(route::RetryPolicy {
                num_retries: Some(protobuf::UInt32Value { value: 0 }),
                per_try_timeout: Some(duration(per_try)),
                ..Default::default()
            }),
            (None, None) => None,
        };
        let (prefix_rewrite, regex_rewrite, host) = match &rule.rewrite {
            None => (String::new(), None, None),
            Some(rw) => {
                let (prefix, regex) = match &rw.path {
                    None => (String::new(), None),
                    Some(PathModifier::Prefix(p)) => (p.clone(), None),
                    Some(PathModifier::Full(p)) => (
                        String::new(),
                        Some(matcher::RegexMatchAndSubstitute {
                            pattern: Some(regex_matcher("^/.*$")),
                            substitution: p.clone(),
                        }),
                    ),
                };
                (prefix, regex, rw.hostname.clone())
            }
        };
        let request_mirror_policies = rule
            .mirrors
            .iter()
            .filter_map(|mirror| {
                let svc = m.services.get(&mirror.service)?;
                clusters.insert((mirror.service.clone(), mirror.port));
                Some(route::route_action::RequestMirrorPolicy {
                    cluster: cluster_name(&svc.hostname, mirror.port),
                    runtime_fraction: Some(
                        envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent {
                            default_value: Some(fractional(mirror.percent)),
                            runtime_key: String::new(),
                        },
                    ),
                    ..Default::default()
                })
            })
            .collect();
        route::route::Action::Route(route::RouteAction {
            cluster_specifier: Some(cluster_specifier),
            request_mirror_policies,
            timeout: Some(duration(rule.request_timeout.unwrap_or(Duration::ZERO))),
            retry_policy,
            prefix_rewrite,
            regex_rewrite,
            host_rewrite_specifier: host
                .map(route::route_action::HostRewriteSpecifier::HostRewriteLiteral),
            ..Default::default()
        })
    };
    route::Route {
        r#match: Some(r#match),
        action: Some(action),
        request_headers_to_add: header_options(&rule.request_headers),
        request_headers_to_remove: rule.request_headers.remove.clone(),
        response_headers_to_add: header_options(&rule.response_headers),
        response_headers_to_remove: rule.response_headers.remove.clone(),
        typed_per_filter_config: rule
            .fault
            .as_ref()
            .map(|f| {
                (
                    ambit_xds::waypoint::FAULT_FILTER.to_owned(),
                    any(type_url::HTTP_FAULT, &http_fault(f)),
                )
            })
            .into_iter()
            .chain(rule.rate_limit.as_ref().map(super::ratelimit::per_route))
            .collect(),
        ..Default::default()
    }
}

/// A percent as Envoy's fractional percent (per million, so 12.5 % is exact).
fn fractional(percent: f64) -> envoy_types::pb::envoy::r#type::v3::FractionalPercent {
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
    envoy_types::pb::envoy::r#type::v3::FractionalPercent {
        numerator: (percent * 10_000.0).round() as u32,
        denominator: DenominatorType::Million as i32,
    }
}

/// A rule's fault as Envoy's `HTTPFault` (the percentages always set: Envoy's default
/// is 0 %).
fn http_fault(f: &Fault) -> HttpFault {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
    HttpFault {
        delay: f.delay.map(|(d, pct)| common_fault::FaultDelay {
            percentage: Some(fractional(pct)),
            fault_delay_secifier: Some(common_fault::fault_delay::FaultDelaySecifier::FixedDelay(
                duration(d),
            )),
        }),
        abort: f.abort.map(|(a, pct)| fault::FaultAbort {
            percentage: Some(fractional(pct)),
            error_type: Some(match a {
                Abort::Http(s) => fault::fault_abort::ErrorType::HttpStatus(u32::from(s)),
                Abort::Grpc(g) => fault::fault_abort::ErrorType::GrpcStatus(g),
            }),
            ..Default::default()
        }),
        headers: f
            .headers
            .iter()
            .map(|h| route::HeaderMatcher {
                name: h.name.clone(),
                header_match_specifier: Some(
                    route::header_matcher::HeaderMatchSpecifier::StringMatch(string_matcher(
                        &h.value,
                    )),
                ),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Envoy's retry budget defaults, set explicitly: concurrent retries to a cluster are at
/// most 20 % of its requests in flight (and never held below 3), so a failing backend's
/// retries cannot multiply its load. A DestinationRule's `maxRetries` replaces it.
const RETRY_BUDGET_PERCENT: f64 = 20.0;
const RETRY_BUDGET_MIN: u32 = 3;

/// The circuit breakers of a waypoint cluster: the retry limit, and the connection and
/// request limits of the service's DestinationRule — `u32::MAX` where it sets none, as
/// Istio writes them (Envoy's implicit 1,024 would otherwise apply).
fn circuit_breakers(traffic: &TrafficPolicy) -> cluster::CircuitBreakers {
    use cluster::circuit_breakers::{Thresholds, thresholds::RetryBudget};
    let limit = |v: Option<u32>| {
        Some(protobuf::UInt32Value {
            value: v.unwrap_or(u32::MAX),
        })
    };
    let (max_retries, retry_budget) = match traffic.max_retries {
        Some(n) => (Some(protobuf::UInt32Value { value: n }), None),
        None => (
            None,
            Some(RetryBudget {
                budget_percent: Some(envoy_types::pb::envoy::r#type::v3::Percent {
                    value: RETRY_BUDGET_PERCENT,
                }),
                min_retry_concurrency: Some(protobuf::UInt32Value {
                    value: RETRY_BUDGET_MIN,
                }),
                budget_interval: None,
            }),
        ),
    };
    cluster::CircuitBreakers {
        thresholds: vec![Thresholds {
            priority: core::RoutingPriority::Default as i32,
            max_connections: limit(traffic.max_connections),
            max_pending_requests: limit(traffic.max_pending_requests),
            max_requests: limit(traffic.max_requests),
            max_retries,
            retry_budget,
            ..Default::default()
        }],
        per_host_thresholds: vec![],
    }
}

/// A DestinationRule's outlier detection as Istio writes it: success-rate detection off,
/// consecutive 5xx and gateway errors enforced when set (and a 0 turns one off).
fn outlier_detection(o: &OutlierDetection) -> cluster::OutlierDetection {
    let u32v = |v: u32| Some(protobuf::UInt32Value { value: v });
    let enforcing = |v: u32| u32v(if v > 0 { 100 } else { 0 });
    cluster::OutlierDetection {
        enforcing_success_rate: u32v(0),
        consecutive_5xx: o.consecutive_5xx.and_then(u32v),
        enforcing_consecutive_5xx: o.consecutive_5xx.and_then(enforcing),
        consecutive_gateway_failure: o.consecutive_gateway.and_then(u32v),
        enforcing_consecutive_gateway_failure: o.consecutive_gateway.and_then(enforcing),
        interval: o.interval.map(duration),
        base_ejection_time: o.base_ejection_time.map(duration),
        max_ejection_percent: o.max_ejection_percent.and_then(u32v),
        ..Default::default()
    }
}

fn cluster_for(name: &str, protocol: Protocol, traffic: &TrafficPolicy) -> cluster::Cluster {
    use upstream_http::http_protocol_options::explicit_http_config::ProtocolConfig;
    let config = match protocol {
        Protocol::Http2 | Protocol::Grpc => {
            Some(ProtocolConfig::Http2ProtocolOptions(Default::default()))
        }
        Protocol::Http => Some(ProtocolConfig::HttpProtocolOptions(Default::default())),
        Protocol::Tcp => None,
    };
    let options = config.map(|c| {
        let o = upstream_http::HttpProtocolOptions {
            upstream_protocol_options: Some(
                upstream_http::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    upstream_http::http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(c),
                    },
                ),
            ),
            ..Default::default()
        };
        (
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_owned(),
            any(type_url::HTTP_PROTOCOL_OPTIONS, &o),
        )
    });
    cluster::Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.to_owned(),
        }),
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        circuit_breakers: Some(circuit_breakers(traffic)),
        outlier_detection: traffic.outlier_detection.as_ref().map(outlier_detection),
        // As Istio: with outlier detection, the panic threshold is the rule's
        // minHealthPercent, 0 unless set (never use ejected endpoints); set even when 0,
        // as Envoy's default is 50 %.
        common_lb_config: traffic.outlier_detection.as_ref().map(|o| {
            cluster::cluster::CommonLbConfig {
                healthy_panic_threshold: Some(envoy_types::pb::envoy::r#type::v3::Percent {
                    value: f64::from(o.min_health_percent),
                }),
                ..Default::default()
            }
        }),
        lb_policy: match traffic.load_balancer {
            LoadBalancer::RoundRobin => cluster::cluster::LbPolicy::RoundRobin,
            LoadBalancer::LeastRequest => cluster::cluster::LbPolicy::LeastRequest,
        } as i32,
        typed_extension_protocol_options: options.into_iter().collect(),
        ..Default::default()
    }
}

/// What an endpoint is built from (its resource's version is a hash of these).
type EndpointContent = (IpAddr, u16, Option<String>, String);

/// A cluster's endpoints, and what they were built from.
fn load_assignment(
    m: &Model,
    svc: &Service,
    name: &str,
    target_port: u16,
) -> (endpoint::ClusterLoadAssignment, Vec<EndpointContent>) {
    let string = |s: String| protobuf::Value {
        kind: Some(protobuf::value::Kind::StringValue(s)),
    };
    let mut content = Vec::new();
    let lb_endpoints = svc
        .endpoints
        .iter()
        .filter_map(|uid| m.workloads.get(uid))
        .filter_map(|w| {
            let ip: IpAddr = w
                .ips
                .iter()
                .find(|ip| ip.is_ipv4())
                .or(w.ips.first())
                .copied()?;
            let hbone = w.enrolled.then(|| w.identity.to_string());
            // Who it is, as Istio's proxies learn it (their `destination_*` labels).
            let workload = istio::WorkloadMetadata::derive(&w.name, &w.namespace, |k| {
                w.labels.get(k).map(String::as_str)
            })
            .encode();
            let mut filter_metadata = std::collections::HashMap::new();
            filter_metadata.insert(
                istio::METADATA.to_owned(),
                protobuf::Struct {
                    fields: [(istio::WORKLOAD.to_owned(), string(workload.clone()))].into(),
                },
            );
            if let Some(id) = &hbone {
                filter_metadata.insert(
                    METADATA.to_owned(),
                    protobuf::Struct {
                        fields: [(HBONE_IDENTITY.to_owned(), string(id.clone()))].into(),
                    },
                );
            }
            content.push((ip, target_port, hbone, workload));
            Some(endpoint::LbEndpoint {
                host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                    endpoint::Endpoint {
                        address: Some(socket_address(SocketAddr::new(ip, target_port))),
                        ..Default::default()
                    },
                )),
                metadata: Some(core::Metadata {
                    filter_metadata,
                    ..Default::default()
                }),
                load_balancing_weight: Some(protobuf::UInt32Value { value: 1 }),
                ..Default::default()
            })
        })
        .collect();
    let cla = endpoint::ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: vec![endpoint::LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    };
    (cla, content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::file::parse;
    use std::path::Path;

    pub(crate) const MESH: &str = r#"
namespaces:
  - name: shop
    labels: {ambit.dev/dataplane: ambient}
nodes: [{name: node-1}, {name: node-2}]
workloads:
  - {name: wp-0, namespace: shop, node: node-1, serviceAccount: wp, ips: [10.244.1.20],
     labels: {gateway.networking.k8s.io/gateway-name: wp}}
  - {name: web-v1-0, namespace: shop, node: node-2, ips: [10.244.2.10], labels: {app: web, v: "1"}}
  - {name: web-v2-0, namespace: shop, node: node-2, ips: [10.244.2.11], labels: {app: web, v: "2"}}
  - {name: db-0, namespace: shop, node: node-2, ips: [10.244.2.12], labels: {app: db}}
waypoints:
  - {name: wp, namespace: shop}
services:
  - name: web
    namespace: shop
    vips: [10.96.0.10, fd00:96::10]
    ports: [{name: http, port: 80, targetPort: 8080}, {name: admin, port: 9000}]
    selector: {app: web}
    labels: {ambit.dev/waypoint: wp}
  - name: web-v1
    namespace: shop
    vips: [10.96.0.11]
    ports: [{name: http, port: 80, targetPort: 8080}]
    selector: {app: web, v: "1"}
  - name: web-v2
    namespace: shop
    vips: [10.96.0.12]
    ports: [{port: 80, targetPort: 8080, appProtocol: http2}]
    selector: {app: web, v: "2"}
  - name: db
    namespace: shop
    vips: [10.96.0.13]
    ports: [{name: http, port: 80}]
    selector: {app: db}
    labels: {ambit.dev/waypoint: wp}
httpRoutes:
  - name: web
    namespace: shop
    parentRefs: [{kind: Service, group: "", name: web, port: 80}]
    rules:
      - backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]
        timeouts: {request: 2s, backendRequest: 500ms}
        retry: {attempts: 2, codes: [503], backoff: 10ms}
      - matches: [{path: {type: Exact, value: /v2}}, {headers: [{name: X-Canary, value: "yes"}]}]
        backendRefs: [{name: web-v2, port: 80}]
      - matches: [{path: {type: PathPrefix, value: /old/}}]
        filters:
          - type: RequestRedirect
            requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}
destinationRules:
  - name: web-v2
    namespace: shop
    host: web-v2.shop.svc.cluster.local
    trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
"#;

    fn model() -> Model {
        parse(Path::new("mesh.yaml"), MESH).unwrap_or_else(|e| panic!("{e}"))
    }

    fn decode<M: Message + Default>(r: &VersionedResource) -> M {
        M::decode(r.resource.value.as_slice()).unwrap()
    }

    #[test]
    fn the_model_derives_the_waypoint_its_pods_and_who_goes_through_it() {
        let m = model();
        let wp = &m.waypoints[&NamespacedName {
            namespace: "shop".into(),
            name: "wp".into(),
        }];
        assert_eq!(wp.replicas, ["shop/wp-0"]);
        assert_eq!(
            wp.identity.as_ref().unwrap().as_str(),
            "spiffe://cluster.local/ns/shop/sa/wp"
        );
        let pod = &m.workloads["shop/wp-0"];
        assert!(pod.native_tunnel && !pod.enrolled && pod.waypoint.is_none());
        // web's and db's endpoints must be reached through the waypoint; web-v1/v2 pods
        // are web's endpoints too.
        assert_eq!(m.workloads["shop/web-v1-0"].waypoint.as_deref(), Some("wp"));
        assert_eq!(m.workloads["shop/db-0"].waypoint.as_deref(), Some("wp"));
        let svc = &m.services[&NamespacedName {
            namespace: "shop".into(),
            name: "wp".into(),
        }];
        assert!(svc.is_waypoint);
        assert_eq!(svc.endpoints, ["shop/wp-0"]);
    }

    #[test]
    fn a_waypoint_gets_listeners_routes_clusters_and_endpoints() {
        let m = model();
        let r = resources(&m, m.waypoints.values().next().unwrap());
        let names = |t| r[t].keys().cloned().collect::<Vec<_>>();
        assert_eq!(
            names(type_url::LISTENER),
            [
                "db.shop.svc.cluster.local:80",
                "web.shop.svc.cluster.local:80",
                "web.shop.svc.cluster.local:9000"
            ]
        );
        assert_eq!(
            names(type_url::ROUTE),
            [
                "db.shop.svc.cluster.local:80",
                "web.shop.svc.cluster.local:80"
            ]
        );
        assert_eq!(
            names(type_url::CLUSTER),
            [
                "outbound|80||db.shop.svc.cluster.local",
                "outbound|80||web-v1.shop.svc.cluster.local",
                "outbound|80||web-v2.shop.svc.cluster.local",
                "outbound|9000||web.shop.svc.cluster.local"
            ]
        );
        assert_eq!(names(type_url::ENDPOINT), names(type_url::CLUSTER));

        let l: listener::Listener = decode(&r[type_url::LISTENER]["web.shop.svc.cluster.local:80"]);
        assert_eq!(l.bind_to_port, Some(protobuf::BoolValue { value: false }));
        assert_eq!(l.additional_addresses.len(), 1, "the IPv6 VIP");
        let tcp: listener::Listener =
            decode(&r[type_url::LISTENER]["web.shop.svc.cluster.local:9000"]);
        let Some(listener::filter::ConfigType::TypedConfig(a)) =
            &tcp.filter_chains[0].filters[0].config_type
        else {
            panic!()
        };
        assert_eq!(a.type_url, type_url::TCP_PROXY);

        // Precedence: the exact path first, then the header match (prefix /, one
        // header), then the /old prefix, then the catch-all weighted split.
        let rc: route::RouteConfiguration =
            decode(&r[type_url::ROUTE]["web.shop.svc.cluster.local:80"]);
        assert_eq!(rc.virtual_hosts.len(), 1);
        let routes = &rc.virtual_hosts[0].routes;
        use route::route_match::PathSpecifier;
        let paths: Vec<_> = routes
            .iter()
            .map(|r| {
                let m = r.r#match.as_ref().unwrap();
                (m.path_specifier.clone().unwrap(), m.headers.len())
            })
            .collect();
        assert_eq!(
            paths,
            [
                (PathSpecifier::Path("/v2".into()), 0),
                (PathSpecifier::PathSeparatedPrefix("/old".into()), 0),
                (PathSpecifier::Prefix("/".into()), 1),
                (PathSpecifier::Prefix("/".into()), 0),
            ]
        );
        let Some(route::route::Action::Route(split)) = &routes[3].action else {
            panic!()
        };
        let Some(route::route_action::ClusterSpecifier::WeightedClusters(w)) =
            &split.cluster_specifier
        else {
            panic!()
        };
        assert_eq!(
            w.clusters
                .iter()
                .map(|c| (c.name.as_str(), c.weight.unwrap().value))
                .collect::<Vec<_>>(),
            [
                ("outbound|80||web-v1.shop.svc.cluster.local", 90),
                ("outbound|80||web-v2.shop.svc.cluster.local", 10)
            ]
        );
        assert_eq!(split.timeout, Some(duration(Duration::from_secs(2))));
        let retry = split.retry_policy.as_ref().unwrap();
        assert_eq!(retry.num_retries.unwrap().value, 2);
        assert_eq!(retry.retriable_status_codes, [503]);
        assert_eq!(
            retry.retry_on,
            "connect-failure,refused-stream,reset,retriable-status-codes"
        );
        assert_eq!(
            retry.per_try_timeout,
            Some(duration(Duration::from_millis(500)))
        );
        assert!(matches!(
            routes[1].action,
            Some(route::route::Action::Redirect(_))
        ));

        // db has no route: everything goes to db itself, with no timeout.
        let rc: route::RouteConfiguration =
            decode(&r[type_url::ROUTE]["db.shop.svc.cluster.local:80"]);
        let Some(route::route::Action::Route(a)) = &rc.virtual_hosts[0].routes[0].action else {
            panic!()
        };
        assert_eq!(
            a.cluster_specifier,
            Some(route::route_action::ClusterSpecifier::Cluster(
                "outbound|80||db.shop.svc.cluster.local".into()
            ))
        );
        assert_eq!(a.timeout, Some(duration(Duration::ZERO)));

        // Endpoints: target ports, and enrolled ones carry their identity for HBONE.
        let cla: endpoint::ClusterLoadAssignment =
            decode(&r[type_url::ENDPOINT]["outbound|80||web-v2.shop.svc.cluster.local"]);
        let e = &cla.endpoints[0].lb_endpoints[0];
        let Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
            panic!()
        };
        assert_eq!(
            ep.address,
            Some(socket_address("10.244.2.11:8080".parse().unwrap()))
        );
        let md = &e.metadata.as_ref().unwrap().filter_metadata[METADATA].fields[HBONE_IDENTITY];
        assert_eq!(
            md.kind,
            Some(protobuf::value::Kind::StringValue(
                "spiffe://cluster.local/ns/shop/sa/default".into()
            ))
        );
        let md =
            &e.metadata.as_ref().unwrap().filter_metadata[istio::METADATA].fields[istio::WORKLOAD];
        assert_eq!(
            md.kind,
            Some(protobuf::value::Kind::StringValue(
                "web-v2-0;shop;web;latest;Kubernetes".into()
            ))
        );
        let c: cluster::Cluster =
            decode(&r[type_url::CLUSTER]["outbound|80||web-v2.shop.svc.cluster.local"]);
        assert!(
            c.typed_extension_protocol_options
                .contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
        );
        // Its DestinationRule asks for least request; other clusters keep round robin.
        assert_eq!(c.lb_policy, cluster::cluster::LbPolicy::LeastRequest as i32);
        let c: cluster::Cluster =
            decode(&r[type_url::CLUSTER]["outbound|80||web-v1.shop.svc.cluster.local"]);
        assert_eq!(c.lb_policy, cluster::cluster::LbPolicy::RoundRobin as i32);
    }

    #[test]
    fn a_waypoint_is_sent_the_workloads_it_fronts_and_no_others() {
        let m = model();
        let snap = super::super::Snapshot::from_model(&m);
        let node = node_id("shop", "wp");
        let names: Vec<String> = snap
            .resources(&node, type_url::WORKLOAD)
            .map(|r| r.name.clone())
            .collect();
        // web's pods (web names the waypoint) and db's; not the waypoint's own pod.
        assert_eq!(names, ["shop/db-0", "shop/web-v1-0", "shop/web-v2-0"]);
        assert!(snap.get(&node, type_url::WORKLOAD, "shop/wp-0").is_none());
        assert!(snap.get(&node, type_url::WORKLOAD, "shop/db-0").is_some());
        // An agent still gets every workload.
        assert_eq!(snap.resources("node-1", type_url::WORKLOAD).count(), 4);
    }

    #[test]
    fn versions_are_stable_across_builds() {
        let (a, b) = (model(), model());
        let (ra, rb) = (
            resources(&a, a.waypoints.values().next().unwrap()),
            resources(&b, b.waypoints.values().next().unwrap()),
        );
        // Versions, not bytes: prost encodes endpoint metadata maps in hash order.
        let versions = |r: &Resources| {
            r.iter()
                .flat_map(|(t, m)| {
                    m.iter()
                        .map(move |(n, v)| (*t, n.clone(), v.version.clone()))
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(versions(&ra), versions(&rb));
        assert!(!versions(&ra).is_empty());
    }

    #[test]
    fn mirrors_become_mirror_policies_and_their_mistakes_are_explained() {
        let filters = |f: &str| {
            MESH.replace(
                "      - matches: [{path: {type: Exact, value: /v2}}, {headers: [{name: X-Canary, value: \"yes\"}]}]\n",
                &format!("      - matches: [{{path: {{type: Exact, value: /v2}}}}, {{headers: [{{name: X-Canary, value: \"yes\"}}]}}]\n        filters:\n{f}"),
            )
        };
        let good = filters(
            "          - {type: RequestMirror, requestMirror: {backendRef: {name: web-v1, port: 80}, fraction: {numerator: 1, denominator: 8}}}\n",
        );
        let m = parse(Path::new("mesh.yaml"), &good).unwrap_or_else(|e| panic!("{e}"));
        let r = resources(&m, m.waypoints.values().next().unwrap());
        let rc: route::RouteConfiguration =
            decode(&r[type_url::ROUTE]["web.shop.svc.cluster.local:80"]);
        // The exact path /v2 is the first route.
        let route = &rc.virtual_hosts[0].routes[0];
        let Some(route::route::Action::Route(ra)) = &route.action else {
            panic!("{route:?}")
        };
        let policy = &ra.request_mirror_policies[0];
        assert_eq!(policy.cluster, "outbound|80||web-v1.shop.svc.cluster.local");
        assert_eq!(
            policy.runtime_fraction.as_ref().unwrap().default_value,
            Some(fractional(12.5))
        );
        assert_eq!(fractional(12.5).numerator, 125_000);

        let bad = filters(concat!(
            "          - {type: RequestMirror, requestMirror: {backendRef: {name: nowhere, port: 80}}}\n",
            "          - {type: RequestMirror, requestMirror: {backendRef: {name: web-v1, port: 80}, percent: 101}}\n",
            "          - {type: RequestMirror, requestMirror: {backendRef: {name: web-v1, port: 80}, percent: 1, fraction: {numerator: 1}}}\n",
            "          - {type: RequestMirror, requestMirror: {backendRef: {name: web-v1, port: 80, weight: 2}}}\n",
            "          - {type: RequestMirror, requestMirror: {backendRef: {name: web-v1, port: 80}, fraction: {numerator: 3, denominator: 2}}}\n",
        ));
        let e = parse(Path::new("mesh.yaml"), &bad).unwrap_err().to_string();
        let at = "httpRoutes[0] (shop/web).rules[1].filters";
        for want in [
            format!("{at}[0].requestMirror.backendRef: service shop/nowhere is not defined"),
            format!("{at}[1].requestMirror.percent: 101 is not 0-100"),
            format!("{at}[2].requestMirror: percent and fraction are exclusive"),
            format!("{at}[3].requestMirror.backendRef.weight: a mirror's backend has no weight"),
            format!("{at}[4].requestMirror.fraction: needs 0 <= numerator <= denominator"),
        ] {
            assert!(e.contains(&want), "{want}\n{e}");
        }
    }

    #[test]
    fn outlier_detection_is_written_as_istio_writes_it_and_checked() {
        let with = |od: &str| {
            MESH.replace(
                "trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}",
                &format!("trafficPolicy: {{outlierDetection: {od}}}"),
            )
        };
        let m = parse(
            Path::new("mesh.yaml"),
            &with("{consecutive5xxErrors: 0, consecutiveGatewayErrors: 2, interval: 5s, baseEjectionTime: 1m, maxEjectionPercent: 50, minHealthPercent: 30}"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let r = resources(&m, m.waypoints.values().next().unwrap());
        let c: cluster::Cluster =
            decode(&r[type_url::CLUSTER]["outbound|80||web-v2.shop.svc.cluster.local"]);
        let od = c.outlier_detection.expect("outlier detection");
        let v = |x: Option<protobuf::UInt32Value>| x.map(|x| x.value);
        assert_eq!(v(od.enforcing_success_rate), Some(0));
        assert_eq!(v(od.consecutive_5xx), Some(0));
        assert_eq!(v(od.enforcing_consecutive_5xx), Some(0));
        assert_eq!(v(od.consecutive_gateway_failure), Some(2));
        assert_eq!(v(od.enforcing_consecutive_gateway_failure), Some(100));
        assert_eq!(v(od.max_ejection_percent), Some(50));
        assert_eq!(od.interval, Some(duration(Duration::from_secs(5))));
        assert_eq!(
            od.base_ejection_time,
            Some(duration(Duration::from_secs(60)))
        );
        assert_eq!(
            c.common_lb_config
                .unwrap()
                .healthy_panic_threshold
                .unwrap()
                .value,
            30.0
        );
        // Without outlier detection, neither is set.
        let r = resources(&model(), model().waypoints.values().next().unwrap());
        let c: cluster::Cluster =
            decode(&r[type_url::CLUSTER]["outbound|80||web-v2.shop.svc.cluster.local"]);
        assert!(c.outlier_detection.is_none() && c.common_lb_config.is_none());

        let at = "destinationRules[0] (shop/web-v2).trafficPolicy.outlierDetection";
        for (od, want) in [
            (
                "{maxEjectionPercent: 101}",
                "maxEjectionPercent: 101 is not 0-100",
            ),
            ("{interval: 10}", "interval: \"10\" is not a duration"),
            (
                "{baseEjectionTime: 0s}",
                "baseEjectionTime: \"0s\" is under 1ms",
            ),
            (
                "{consecutiveErrors: 5}",
                "unknown field `consecutiveErrors`",
            ),
        ] {
            let e = parse(Path::new("mesh.yaml"), &with(od))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{od}: {want}\n{e}");
            if !want.starts_with("unknown") {
                assert!(e.contains(at), "{e}");
            }
        }
    }

    #[test]
    fn route_mistakes_are_explained_with_their_place() {
        let bad = MESH
            .replace(
                "backendRefs: [{name: web-v2, port: 80}]",
                "backendRefs: [{name: web-v3, port: 80}]",
            )
            .replace("type: Exact, value: /v2", "type: Exact, value: v2")
            .replace("backoff: 10ms", "backoff: 10")
            .replace(
                "{kind: Service, group: \"\", name: web, port: 80}",
                "{kind: Service, name: web, port: 81}",
            );
        let e = parse(Path::new("mesh.yaml"), &bad).unwrap_err().to_string();
        for want in [
            "httpRoutes[0] (shop/web).parentRefs[0]: service shop/web has no port 81",
            "httpRoutes[0] (shop/web).rules[1].matches[0].path: \"v2\" must start with /",
            "httpRoutes[0] (shop/web).rules[1].backendRefs[0]: service shop/web-v3 is not defined",
            "httpRoutes[0] (shop/web).rules[0].retry.backoff: \"10\" is not a duration",
        ] {
            assert!(e.contains(want), "{want}\n{e}");
        }
        let bad_rules = MESH.replace(
            "host: web-v2.shop.svc.cluster.local\n    trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}",
            "host: web-v3\n  - name: again\n    namespace: shop\n    host: web-v1.other.example\n  - name: lb\n    namespace: shop\n    host: web-v1\n    trafficPolicy: {loadBalancer: {simple: RANDOM}}",
        );
        let e = parse(Path::new("mesh.yaml"), &bad_rules)
            .unwrap_err()
            .to_string();
        for want in [
            "destinationRules[0] (shop/web-v2).host: service shop/web-v3 is not defined",
            "destinationRules[1] (shop/again).host: \"web-v1.other.example\" is neither",
            "destinationRules[2] (shop/lb).trafficPolicy.loadBalancer.simple: \"RANDOM\" is not supported",
        ] {
            assert!(e.contains(want), "{want}\n{e}");
        }
        let no_waypoint = MESH.replace(
            "    selector: {app: web}\n    labels: {ambit.dev/waypoint: wp}",
            "    selector: {app: web}",
        );
        let e = parse(Path::new("mesh.yaml"), &no_waypoint)
            .unwrap_err()
            .to_string();
        assert!(e.contains("service shop/web has no waypoint"), "{e}");
        let e = parse(
            Path::new("mesh.yaml"),
            &MESH.replace("{name: wp, namespace: shop}", "{name: wq, namespace: shop}"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("waypoint shop/wp is not defined under waypoints"),
            "{e}"
        );
    }
}
