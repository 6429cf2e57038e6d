//! Local rate limits at waypoints: a token bucket on an HTTPRoute rule (Ambit's
//! extension, as `fault` is; Envoy's `local_ratelimit` filter on the route), shared by
//! all the rule's requests or kept per calling identity. Requests beyond it are answered
//! 429 with `x-ratelimit-*` and `retry-after` headers.

use std::time::Duration;

use serde::Deserialize;

use super::Problems;

/// `rateLimit` of an HTTPRoute rule, as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Requests allowed per `unit`.
    pub requests: u32,
    /// `Second`, `Minute` or `Hour` (Envoy Gateway's units).
    pub unit: String,
    /// The bucket's size: how many requests may come at once (default: `requests`).
    #[serde(default)]
    pub burst: Option<u32>,
    /// One bucket per calling workload identity (its SPIFFE ID), not one for all.
    #[serde(default)]
    pub per_source_principal: bool,
}

/// A validated rate limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Tokens added per `per`.
    pub requests: u32,
    /// The refill period.
    pub per: Duration,
    /// The bucket's size.
    pub burst: u32,
    /// A bucket per source principal.
    pub per_source_principal: bool,
}

/// Checks `rateLimit` at `at`.
pub(super) fn validate(p: &mut Problems, at: &str, r: RateLimitSpec) -> Option<RateLimit> {
    let before = p.0.len();
    if r.requests == 0 {
        p.add(&format!("{at}.requests"), "must be at least 1");
    }
    let per = match r.unit.as_str() {
        "Second" => Duration::from_secs(1),
        "Minute" => Duration::from_secs(60),
        "Hour" => Duration::from_secs(3600),
        u => {
            p.add(
                &format!("{at}.unit"),
                format!("{u:?} is not Second, Minute or Hour"),
            );
            Duration::from_secs(1)
        }
    };
    let burst = r.burst.unwrap_or(r.requests);
    if burst == 0 {
        p.add(&format!("{at}.burst"), "must be at least 1");
    }
    (p.0.len() == before).then_some(RateLimit {
        requests: r.requests,
        per,
        burst,
        per_source_principal: r.per_source_principal,
    })
}
