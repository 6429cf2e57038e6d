//! Envoy's local rate limit filter (`envoy.filters.http.local_ratelimit`): token buckets
//! in the waypoint, configured on the filter or (usually) per route, with Envoy's
//! semantics:
//!
//! - a bucket holds at most `max_tokens` and gains `tokens_per_fill` per
//!   `fill_interval`, continuously (Envoy's atomic token bucket); it starts full;
//! - `rate_limits` actions turn a request into descriptors (lists of key/value
//!   entries); a descriptor is produced only if every action yields a value;
//! - each request descriptor takes the configured descriptor with exactly its entries,
//!   or else the first whose blank values match any value (a wildcard: a bucket of its
//!   own per distinct value, the least recently used dropped beyond
//!   `max_dynamic_descriptors`);
//! - a request takes one token from each matched bucket (slowest first) and from the
//!   default bucket (always, or only when nothing matched, as
//!   `always_consume_default_token_bucket` says); one empty bucket answers it 429
//!   `local_rate_limited`, with `retry-after` (seconds until its next token) if
//!   configured;
//! - with the IETF draft-03 headers on, every response it applied to says the bucket's
//!   size, the whole tokens left and the seconds until the next token when none is
//!   left (`x-ratelimit-limit`, `-remaining`, `-reset`), of the bucket that refused the
//!   request, else of the slowest one.
//!
//! Actions: the caller's certificate URI SAN (the CEL expression
//! `connection.uri_san_peer_certificate` of `envoy.rate_limit_descriptors.expr`), a
//! request header, the client address and a generic key; others are refused.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3 as common;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as lrl;
use envoy_types::pb::envoy::extensions::rate_limit_descriptors::expr::v3 as expr;
use envoy_types::pb::envoy::r#type::v3 as types;
use envoy_types::pb::google::protobuf;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::config::decode::{self, Error};
use ambit_identity::Identity;

/// Envoy's default of `max_dynamic_descriptors`.
const DEFAULT_MAX_DYNAMIC: usize = 20;
/// Envoy's shortest fill interval.
const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);

/// A token bucket.
#[derive(Debug)]
pub struct TokenBucket {
    max: f64,
    /// Tokens per second.
    rate: f64,
    /// (tokens, when counted).
    state: Mutex<(f64, Instant)>,
}

/// A bucket's answer to one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Take {
    /// Was there a token?
    pub allowed: bool,
    /// Whole tokens left.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub until_full: Duration,
    /// Until the next whole token (zero while one is left).
    pub until_next: Duration,
}

impl TokenBucket {
    fn new(p: &BucketParams) -> Self {
        Self {
            max: f64::from(p.max_tokens),
            rate: f64::from(p.per_fill) / p.fill_interval.as_secs_f64(),
            state: Mutex::new((f64::from(p.max_tokens), Instant::now())),
        }
    }

    /// Takes a token if there is one.
    pub fn take(&self) -> Take {
        let now = Instant::now();
        let mut s = self.state.lock().expect("token bucket");
        let tokens = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(self.max);
        let allowed = tokens >= 1.0;
        let left = if allowed { tokens - 1.0 } else { tokens };
        *s = (left, now);
        let secs = |t: f64| Duration::from_secs_f64((t / self.rate).max(0.0));
        Take {
            allowed,
            remaining: left.floor() as u32,
            until_full: secs(self.max - left),
            until_next: if left >= 1.0 {
                Duration::ZERO
            } else {
                secs(1.0 - left)
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct BucketParams {
    max_tokens: u32,
    per_fill: u32,
    fill_interval: Duration,
}

fn bucket_params(b: &types::TokenBucket) -> Result<BucketParams, Error> {
    if b.max_tokens == 0 {
        return Err("token_bucket.max_tokens must be at least 1".into());
    }
    let per_fill = b.tokens_per_fill.map_or(1, |v| v.value);
    if per_fill == 0 {
        return Err("token_bucket.tokens_per_fill must be at least 1".into());
    }
    let fill_interval = b
        .fill_interval
        .as_ref()
        .ok_or("token_bucket.fill_interval is required")
        .map_err(Error::from)
        .and_then(decode::duration)?;
    if fill_interval < MIN_FILL_INTERVAL {
        return Err(format!(
            "token_bucket.fill_interval must be at least {MIN_FILL_INTERVAL:?}"
        ));
    }
    Ok(BucketParams {
        max_tokens: b.max_tokens,
        per_fill,
        fill_interval,
    })
}

/// What makes one descriptor entry of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    /// The caller's certificate URI SAN (its SPIFFE ID).
    PeerUriSan { key: String, skip_if_error: bool },
    /// A request header's value.
    Header {
        name: HeaderName,
        key: String,
        skip_if_absent: bool,
    },
    /// The client's address.
    RemoteAddress,
    /// A fixed entry.
    Generic { key: String, value: String },
}

/// What the filter knows of a request.
pub struct Facts<'a> {
    /// Its headers.
    pub headers: &'a HeaderMap,
    /// The caller's identity.
    pub peer: Option<&'a Identity>,
    /// The caller's address.
    pub client: Option<IpAddr>,
}

impl Action {
    /// The entry, `Ok(None)` to leave it out, `Err` if the descriptor is not produced.
    fn entry(&self, f: &Facts) -> Result<Option<(String, String)>, ()> {
        match self {
            Action::PeerUriSan { key, skip_if_error } => match f.peer {
                Some(id) => Ok(Some((key.clone(), id.to_string()))),
                None if *skip_if_error => Ok(None),
                None => Err(()),
            },
            Action::Header {
                name,
                key,
                skip_if_absent,
            } => match f.headers.get(name).and_then(|v| v.to_str().ok()) {
                Some(v) => Ok(Some((key.clone(), v.to_owned()))),
                None if *skip_if_absent => Ok(None),
                None => Err(()),
            },
            Action::RemoteAddress => f
                .client
                .map(|ip| Some(("remote_address".to_owned(), ip.to_string())))
                .ok_or(()),
            Action::Generic { key, value } => Ok(Some((key.clone(), value.clone()))),
        }
    }
}

/// A configured descriptor and its buckets.
#[derive(Debug)]
struct Descriptor {
    /// (key, value); a blank value matches any.
    entries: Vec<(String, String)>,
    params: BucketParams,
    /// Its bucket when it has no blank value.
    fixed: Option<Arc<TokenBucket>>,
    /// Its buckets per distinct values of its blank entries, with when each was last
    /// used (a counter), for least-recently-used eviction.
    dynamic: Mutex<Dynamic>,
    max_dynamic: usize,
}

#[derive(Debug, Default)]
struct Dynamic {
    buckets: HashMap<Vec<String>, (Arc<TokenBucket>, u64)>,
    clock: u64,
}

impl Descriptor {
    /// The bucket for `request` (a request descriptor), if this descriptor matches it.
    fn bucket(&self, request: &[(String, String)]) -> Option<Arc<TokenBucket>> {
        if request.len() != self.entries.len() {
            return None;
        }
        let mut wild = Vec::new();
        for ((k, v), (rk, rv)) in self.entries.iter().zip(request) {
            if k != rk {
                return None;
            }
            if v.is_empty() {
                wild.push(rv.clone());
            } else if v != rv {
                return None;
            }
        }
        if let Some(b) = &self.fixed {
            return Some(b.clone());
        }
        let mut d = self.dynamic.lock().expect("rate limit descriptors");
        d.clock += 1;
        let now = d.clock;
        if let Some((b, used)) = d.buckets.get_mut(&wild) {
            *used = now;
            return Some(b.clone());
        }
        if d.buckets.len() >= self.max_dynamic {
            // Evict the least recently used (a scan: only when a new value comes to a
            // full table).
            if let Some(oldest) = d
                .buckets
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            {
                d.buckets.remove(&oldest);
            }
        }
        let b = Arc::new(TokenBucket::new(&self.params));
        d.buckets.insert(wild, (b.clone(), now));
        Some(b)
    }

    /// How many dynamic buckets it holds.
    fn dynamic_len(&self) -> usize {
        self.dynamic
            .lock()
            .expect("rate limit descriptors")
            .buckets
            .len()
    }
}

/// The filter's (or a route's) configuration, with its buckets.
#[derive(Debug)]
pub struct LocalRateLimit {
    /// Its stats prefix.
    pub stat_prefix: String,
    status: StatusCode,
    default: Option<Arc<TokenBucket>>,
    descriptors: Vec<Descriptor>,
    /// Each produces one request descriptor.
    rate_limits: Vec<Vec<Action>>,
    always_consume_default: bool,
    enabled: f64,
    enforced: f64,
    x_ratelimit_headers: bool,
    retry_after: bool,
    response_headers_to_add: Vec<crate::config::HeaderOp>,
}

/// What the filter decided for a request.
#[derive(Debug)]
pub enum Decision {
    /// It does not apply (no bucket, or not enabled for this request).
    NotApplied,
    /// Allowed; these headers go on the response.
    Allowed(HeaderMap),
    /// Limited but not enforced (shadow): allowed, and counted.
    Shadowed(HeaderMap),
    /// Answered with this instead.
    Limited(http::Response<crate::body::ProxyBody>),
}

impl LocalRateLimit {
    /// Does it do anything at all (a filter without a bucket waits for routes' own)?
    pub fn is_active(&self) -> bool {
        self.default.is_some() || !self.descriptors.is_empty()
    }

    /// Judges a request.
    pub fn check(&self, f: &Facts) -> Decision {
        if !self.is_active() || !draw(self.enabled) {
            return Decision::NotApplied;
        }
        let mut buckets: Vec<Arc<TokenBucket>> = Vec::new();
        for actions in &self.rate_limits {
            let mut entries = Vec::new();
            let produced = actions.iter().try_for_each(|a| {
                if let Some(e) = a.entry(f)? {
                    entries.push(e);
                }
                Ok::<_, ()>(())
            });
            if produced.is_err() || entries.is_empty() {
                continue;
            }
            let exact = self
                .descriptors
                .iter()
                .filter(|d| d.fixed.is_some())
                .find_map(|d| d.bucket(&entries));
            let matched = exact.or_else(|| {
                self.descriptors
                    .iter()
                    .filter(|d| d.fixed.is_none())
                    .find_map(|d| d.bucket(&entries))
            });
            buckets.extend(matched);
        }
        // The slowest first (Envoy's order: a refusal stops there).
        buckets.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        if buckets.is_empty() || self.always_consume_default {
            buckets.extend(self.default.clone());
        }
        if buckets.is_empty() {
            return Decision::NotApplied;
        }
        // Tokens are taken in order until a bucket has none.
        let mut shown = None;
        let mut denied = None;
        for b in &buckets {
            let t = b.take();
            shown.get_or_insert((t, b.max));
            if !t.allowed {
                shown = Some((t, b.max));
                denied = Some(t);
                break;
            }
        }
        let (take, max) = shown.expect("a bucket");
        let mut headers = HeaderMap::new();
        if self.x_ratelimit_headers {
            let n = |v: u64| HeaderValue::from(v);
            headers.insert("x-ratelimit-limit", n(max as u64));
            headers.insert("x-ratelimit-remaining", n(u64::from(take.remaining)));
            headers.insert("x-ratelimit-reset", n(whole_secs(take.until_next)));
        }
        let Some(denied) = denied else {
            return Decision::Allowed(headers);
        };
        if !draw(self.enforced) {
            return Decision::Shadowed(headers);
        }
        let mut r = crate::body::text(self.status, "local_rate_limited");
        let h = r.headers_mut();
        h.extend(headers);
        if self.retry_after && self.status == StatusCode::TOO_MANY_REQUESTS {
            let secs = whole_secs(denied.until_next).max(1);
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        crate::proxy::edit_headers(h, &self.response_headers_to_add, &[]);
        Decision::Limited(r)
    }

    /// How many per-value buckets its descriptors hold (for tests and the admin dump).
    pub fn dynamic_buckets(&self) -> usize {
        self.descriptors.iter().map(Descriptor::dynamic_len).sum()
    }
}

/// Whole seconds, rounded up.
fn whole_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil() as u64
}

fn draw(p: f64) -> bool {
    p >= 1.0 || (p > 0.0 && fastrand::f64() < p)
}

fn fraction(
    f: &Option<envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent>,
) -> Result<f64, Error> {
    match f {
        // Envoy's default: 0 %.
        None => Ok(0.0),
        Some(f) => decode::probability(&f.default_value),
    }
}

fn action(a: &route::rate_limit::Action) -> Result<Action, Error> {
    use route::rate_limit::action::ActionSpecifier as A;
    match &a.action_specifier {
        Some(A::RequestHeaders(h)) => Ok(Action::Header {
            name: HeaderName::from_bytes(h.header_name.as_bytes())
                .map_err(|_| format!("{:?} is not a header name", h.header_name))?,
            key: h.descriptor_key.clone(),
            skip_if_absent: h.skip_if_absent,
        }),
        Some(A::RemoteAddress(_)) => Ok(Action::RemoteAddress),
        Some(A::GenericKey(g)) => Ok(Action::Generic {
            key: if g.descriptor_key.is_empty() {
                "generic_key".into()
            } else {
                g.descriptor_key.clone()
            },
            value: g.descriptor_value.clone(),
        }),
        Some(A::Extension(e)) => {
            let any = e
                .typed_config
                .as_ref()
                .ok_or("an extension needs a typed_config")?;
            let d: expr::Descriptor = decode::unpack(any, ambit_xds::type_url::DESCRIPTOR_EXPR)?;
            match &d.expr_specifier {
                Some(expr::descriptor::ExprSpecifier::Text(t))
                    if t.trim() == ambit_xds::waypoint::PEER_URI_SAN =>
                {
                    Ok(Action::PeerUriSan {
                        key: d.descriptor_key.clone(),
                        skip_if_error: d.skip_if_error,
                    })
                }
                other => Err(format!(
                    "the descriptor expression {other:?} is not supported (only {:?})",
                    ambit_xds::waypoint::PEER_URI_SAN
                )),
            }
        }
        other => Err(format!(
            "rate limit action {other:?} is not supported (request_headers, remote_address, generic_key, and the {:?} expression)",
            ambit_xds::waypoint::PEER_URI_SAN
        )),
    }
}

/// Decodes a `LocalRateLimit` (the filter's, or a route's).
pub fn decode(any: &protobuf::Any) -> Result<LocalRateLimit, Error> {
    let c: lrl::LocalRateLimit = decode::unpack(any, ambit_xds::type_url::HTTP_LOCAL_RATELIMIT)?;
    let unsupported = [
        (
            "request_headers_to_add_when_not_enforced",
            !c.request_headers_to_add_when_not_enforced.is_empty(),
        ),
        ("stage", c.stage != 0),
        (
            "local_rate_limit_per_downstream_connection",
            c.local_rate_limit_per_downstream_connection,
        ),
        (
            "local_cluster_rate_limit",
            c.local_cluster_rate_limit.is_some(),
        ),
        ("vh_rate_limits", c.vh_rate_limits != 0),
        (
            "rate_limited_as_resource_exhausted",
            c.rate_limited_as_resource_exhausted,
        ),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(format!("{name} is not supported"));
    }
    let status = match &c.status {
        None => StatusCode::TOO_MANY_REQUESTS,
        Some(s) => match StatusCode::from_u16(s.code as u16) {
            // Envoy: below 400 means 429.
            Ok(s) if s.as_u16() >= 400 => s,
            _ => StatusCode::TOO_MANY_REQUESTS,
        },
    };
    let default = c
        .token_bucket
        .as_ref()
        .map(|b| bucket_params(b).map(|p| Arc::new(TokenBucket::new(&p))))
        .transpose()?;
    let max_dynamic = c
        .max_dynamic_descriptors
        .map_or(DEFAULT_MAX_DYNAMIC, |v| v.value as usize);
    if max_dynamic == 0 {
        return Err("max_dynamic_descriptors must be at least 1".into());
    }
    let mut descriptors = Vec::new();
    for (i, d) in c.descriptors.iter().enumerate() {
        let at = |e: Error| format!("descriptors[{i}]: {e}");
        let params = bucket_params(
            d.token_bucket
                .as_ref()
                .ok_or("needs a token_bucket")
                .map_err(|e| at(e.into()))?,
        )
        .map_err(at)?;
        if d.shadow_mode {
            return Err(at("shadow_mode is not supported".into()));
        }
        if d.entries.is_empty() {
            return Err(at("needs entries".into()));
        }
        let entries: Vec<(String, String)> = d
            .entries
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect();
        let wild = entries.iter().any(|(_, v)| v.is_empty());
        descriptors.push(Descriptor {
            entries,
            params,
            fixed: (!wild).then(|| Arc::new(TokenBucket::new(&params))),
            dynamic: Mutex::default(),
            max_dynamic,
        });
    }
    let mut rate_limits = Vec::new();
    for (i, r) in c.rate_limits.iter().enumerate() {
        if r.stage.is_some()
            || !r.disable_key.is_empty()
            || r.limit.is_some()
            || r.hits_addend.is_some()
            || r.apply_on_stream_done
        {
            return Err(format!(
                "rate_limits[{i}]: only actions are supported (not stage, disable_key, limit, hits_addend, apply_on_stream_done)"
            ));
        }
        rate_limits.push(
            r.actions
                .iter()
                .map(action)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("rate_limits[{i}]: {e}"))?,
        );
    }
    if !descriptors.is_empty() && rate_limits.is_empty() {
        return Err("descriptors need rate_limits actions to match (route- or virtual-host-level rate_limits are not supported)".into());
    }
    if default.is_none() && !descriptors.is_empty() {
        return Err("descriptors need the token_bucket as well (Envoy requires it)".into());
    }
    let x = c.enable_x_ratelimit_headers;
    let x_ratelimit_headers = match common::XRateLimitHeadersRfcVersion::try_from(x) {
        Ok(common::XRateLimitHeadersRfcVersion::Off) => false,
        Ok(common::XRateLimitHeadersRfcVersion::DraftVersion03) => true,
        _ => return Err(format!("enable_x_ratelimit_headers {x} is not known")),
    };
    Ok(LocalRateLimit {
        stat_prefix: c.stat_prefix.clone(),
        status,
        default,
        descriptors,
        rate_limits,
        always_consume_default: c
            .always_consume_default_token_bucket
            .is_none_or(|b| b.value),
        enabled: fraction(&c.filter_enabled)?,
        enforced: fraction(&c.filter_enforced)?,
        x_ratelimit_headers,
        retry_after: c.enable_retry_after_header,
        response_headers_to_add: decode::header_ops(&c.response_headers_to_add)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(max: u32, per_fill: u32, ms: u64) -> TokenBucket {
        TokenBucket::new(&BucketParams {
            max_tokens: max,
            per_fill,
            fill_interval: Duration::from_millis(ms),
        })
    }

    #[test]
    fn a_bucket_starts_full_and_refills_continuously() {
        let b = bucket(3, 1, 1000);
        let takes: Vec<bool> = (0..4).map(|_| b.take().allowed).collect();
        assert_eq!(takes, [true, true, true, false]);
        let t = b.take();
        assert_eq!(t.remaining, 0);
        assert!(
            t.until_next <= Duration::from_secs(1) && t.until_next > Duration::from_millis(900)
        );
        assert!(t.until_full > Duration::from_millis(2900), "{t:?}");
        // 50 tokens per second: one is back after 20 ms.
        let b = bucket(1, 50, 1000);
        assert!(b.take().allowed);
        assert!(!b.take().allowed);
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.take().allowed);
    }

    #[test]
    fn a_wildcard_descriptor_keeps_a_bucket_per_value_and_forgets_the_least_recently_used() {
        let d = Descriptor {
            entries: vec![("p".into(), String::new())],
            params: BucketParams {
                max_tokens: 1,
                per_fill: 1,
                fill_interval: Duration::from_secs(60),
            },
            fixed: None,
            dynamic: Mutex::default(),
            max_dynamic: 2,
        };
        let e = |v: &str| vec![("p".to_owned(), v.to_owned())];
        assert!(d.bucket(&e("a")).unwrap().take().allowed);
        assert!(!d.bucket(&e("a")).unwrap().take().allowed);
        assert!(d.bucket(&e("b")).unwrap().take().allowed);
        assert!(d.bucket(&[("q".to_owned(), "a".to_owned())]).is_none());
        // A third value evicts a (b was used since).
        let _ = d.bucket(&e("b"));
        assert!(d.bucket(&e("c")).unwrap().take().allowed);
        assert_eq!(d.dynamic_len(), 2);
        assert!(d.bucket(&e("a")).unwrap().take().allowed, "a was forgotten");
    }
}
