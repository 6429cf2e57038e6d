//! Rate limits as Envoy's local rate limit filter (`envoy.filters.http.local_ratelimit`):
//! the connection manager lists the filter without a bucket (it does nothing by itself),
//! and each rate-limited route configures it (`typed_per_filter_config`) with its token
//! bucket, enforced for every request, with the `x-ratelimit-*` headers (the IETF draft
//! 03) and `retry-after`. A bucket per source principal is a wildcard descriptor whose
//! value is the caller's certificate URI SAN (a CEL descriptor): one bucket per value.

use ambit_xds::type_url;
use ambit_xds::waypoint::{PEER_URI_SAN, RATELIMIT_FILTER, SOURCE_PRINCIPAL_KEY};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3 as common;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::rate_limit_descriptors::expr::v3 as expr;
use envoy_types::pb::envoy::r#type::v3 as types;
use envoy_types::pb::google::protobuf;

use crate::model::ratelimit::RateLimit;

/// The stats prefix of every rate limit (`<prefix>.http_local_rate_limit.*` in Envoy).
pub const STAT_PREFIX: &str = "http_local_rate_limiter";
/// How many callers' buckets a per-principal limit keeps (the least recently used go).
pub const MAX_PRINCIPALS: u32 = 10_000;

fn any<M: prost::Message>(type_url: &str, m: &M) -> protobuf::Any {
    protobuf::Any {
        type_url: type_url.into(),
        value: m.encode_to_vec(),
    }
}

/// The connection manager's filter: no bucket of its own.
pub fn http_filter() -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: RATELIMIT_FILTER.into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
            type_url::HTTP_LOCAL_RATELIMIT,
            &LocalRateLimit {
                stat_prefix: STAT_PREFIX.into(),
                ..Default::default()
            },
        ))),
        ..Default::default()
    }
}

fn all() -> Option<core::RuntimeFractionalPercent> {
    Some(core::RuntimeFractionalPercent {
        default_value: Some(types::FractionalPercent {
            numerator: 100,
            denominator: types::fractional_percent::DenominatorType::Hundred as i32,
        }),
        runtime_key: String::new(),
    })
}

/// A route's rate limit: its `typed_per_filter_config` entry.
pub fn per_route(r: &RateLimit) -> (String, protobuf::Any) {
    let bucket = types::TokenBucket {
        max_tokens: r.burst,
        tokens_per_fill: Some(protobuf::UInt32Value { value: r.requests }),
        fill_interval: Some(protobuf::Duration {
            seconds: r.per.as_secs() as i64,
            nanos: 0,
        }),
    };
    let mut config = LocalRateLimit {
        stat_prefix: STAT_PREFIX.into(),
        token_bucket: Some(bucket),
        filter_enabled: all(),
        filter_enforced: all(),
        enable_x_ratelimit_headers: common::XRateLimitHeadersRfcVersion::DraftVersion03 as i32,
        enable_retry_after_header: true,
        ..Default::default()
    };
    if r.per_source_principal {
        // One wildcard descriptor: a bucket per caller, the route's own bucket only for
        // a request without a caller certificate.
        config.descriptors = vec![common::LocalRateLimitDescriptor {
            entries: vec![common::rate_limit_descriptor::Entry {
                key: SOURCE_PRINCIPAL_KEY.into(),
                value: String::new(),
            }],
            token_bucket: Some(bucket),
            shadow_mode: false,
        }];
        config.rate_limits = vec![route::RateLimit {
            actions: vec![route::rate_limit::Action {
                action_specifier: Some(route::rate_limit::action::ActionSpecifier::Extension(
                    core::TypedExtensionConfig {
                        name: "envoy.rate_limit_descriptors.expr".into(),
                        typed_config: Some(any(
                            type_url::DESCRIPTOR_EXPR,
                            &expr::Descriptor {
                                descriptor_key: SOURCE_PRINCIPAL_KEY.into(),
                                skip_if_error: true,
                                expr_specifier: Some(expr::descriptor::ExprSpecifier::Text(
                                    PEER_URI_SAN.into(),
                                )),
                            },
                        )),
                    },
                )),
            }],
            ..Default::default()
        }];
        config.always_consume_default_token_bucket = Some(protobuf::BoolValue { value: false });
        config.max_dynamic_descriptors = Some(protobuf::UInt32Value {
            value: MAX_PRINCIPALS,
        });
    }
    (
        RATELIMIT_FILTER.to_owned(),
        any(type_url::HTTP_LOCAL_RATELIMIT, &config),
    )
}
