//! Request authentications as Envoy's JWT filter (`envoy.filters.http.jwt_authn`), as
//! Istio writes it: one provider per JWT rule, named
//! `ns[<namespace>]-ra[<name>]-jwt[<index>]`, each writing a verified payload to the
//! dynamic metadata RBAC reads (`jwt_payload`); one rule for every path requiring any of
//! the providers, or no token at all (`allow_missing`: a token that is present must be
//! valid, a missing one passes unauthenticated).

use ambit_xds::type_url;
use ambit_xds::waypoint::{JWT_FILTER, JWT_PAYLOAD};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as jwt;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::google::protobuf;

use super::waypoint::cluster_name;
use crate::model::Model;
use crate::model::authn::{Jwks, JwtRule, RequestAuthentication};

/// How long fetched keys are kept before they are fetched again (Envoy's default).
const CACHE_DURATION: std::time::Duration = std::time::Duration::from_secs(600);

/// The JWT filter of a listener for `ras` (the request authentications that apply to
/// it), if any applies.
pub fn jwt_filter<'a>(
    m: &Model,
    ras: impl IntoIterator<Item = &'a RequestAuthentication>,
) -> Option<hcm::HttpFilter> {
    let mut providers = std::collections::HashMap::new();
    for ra in ras {
        for (i, r) in ra.rules.iter().enumerate() {
            providers.insert(
                format!("ns[{}]-ra[{}]-jwt[{i}]", ra.namespace, ra.name),
                provider(m, r),
            );
        }
    }
    if providers.is_empty() {
        return None;
    }
    let mut names: Vec<&String> = providers.keys().collect();
    names.sort();
    let requirements = names
        .into_iter()
        .map(|n| jwt::JwtRequirement {
            requires_type: Some(jwt::jwt_requirement::RequiresType::ProviderName(n.clone())),
        })
        .chain([jwt::JwtRequirement {
            requires_type: Some(jwt::jwt_requirement::RequiresType::AllowMissing(
                protobuf::Empty {},
            )),
        }])
        .collect();
    let config = jwt::JwtAuthentication {
        providers,
        rules: vec![jwt::RequirementRule {
            r#match: Some(route::RouteMatch {
                path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            requirement_type: Some(jwt::requirement_rule::RequirementType::Requires(
                jwt::JwtRequirement {
                    requires_type: Some(jwt::jwt_requirement::RequiresType::RequiresAny(
                        jwt::JwtRequirementOrList { requirements },
                    )),
                },
            )),
        }],
        ..Default::default()
    };
    Some(hcm::HttpFilter {
        name: JWT_FILTER.into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(protobuf::Any {
            type_url: type_url::HTTP_JWT_AUTHN.into(),
            value: prost::Message::encode_to_vec(&config),
        })),
        ..Default::default()
    })
}

fn duration(d: std::time::Duration) -> protobuf::Duration {
    protobuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn provider(m: &Model, r: &JwtRule) -> jwt::JwtProvider {
    use jwt::jwt_provider::JwksSourceSpecifier;
    let jwks = match &r.keys {
        Jwks::Inline(doc) => JwksSourceSpecifier::LocalJwks(core::DataSource {
            specifier: Some(core::data_source::Specifier::InlineString(doc.clone())),
            ..Default::default()
        }),
        Jwks::Remote { uri, service, port } => {
            let host = m
                .services
                .get(service)
                .map(|s| s.hostname.clone())
                .unwrap_or_default();
            JwksSourceSpecifier::RemoteJwks(jwt::RemoteJwks {
                http_uri: Some(core::HttpUri {
                    uri: uri.clone(),
                    timeout: Some(duration(r.timeout)),
                    http_upstream_type: Some(core::http_uri::HttpUpstreamType::Cluster(
                        cluster_name(&host, *port),
                    )),
                }),
                cache_duration: Some(duration(CACHE_DURATION)),
                ..Default::default()
            })
        }
    };
    jwt::JwtProvider {
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        from_headers: r
            .from_headers
            .iter()
            .map(|(name, prefix)| jwt::JwtHeader {
                name: name.clone(),
                value_prefix: prefix.clone(),
            })
            .collect(),
        from_params: r.from_params.clone(),
        from_cookies: r.from_cookies.clone(),
        forward: r.forward,
        forward_payload_header: r.payload_header.clone().unwrap_or_default(),
        payload_in_metadata: JWT_PAYLOAD.into(),
        claim_to_headers: r
            .claim_to_headers
            .iter()
            .map(|(header, claim)| jwt::JwtClaimToHeader {
                header_name: header.clone(),
                claim_name: claim.clone(),
                claim_path: vec![],
            })
            .collect(),
        jwks_source_specifier: Some(jwks),
        ..Default::default()
    }
}

/// The clusters the JWT filters of a waypoint need (the services serving `jwksUri`s).
pub fn jwks_clusters<'a>(
    ras: impl IntoIterator<Item = &'a RequestAuthentication>,
) -> impl Iterator<Item = (crate::model::NamespacedName, u16)> {
    ras.into_iter()
        .flat_map(|ra| ra.rules.iter())
        .filter_map(|r| match &r.keys {
            Jwks::Remote { service, port, .. } => Some((service.clone(), *port)),
            Jwks::Inline(_) => None,
        })
        .collect::<Vec<_>>()
        .into_iter()
}
