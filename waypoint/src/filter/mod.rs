//! The HTTP filters of a listener's connection manager that the waypoint implements,
//! each with the semantics of the Envoy filter whose configuration it takes, run in the
//! order the listener lists them, before the router:
//!
//! - [`jwt`]: `envoy.filters.http.jwt_authn` (Istio's RequestAuthentications);
//! - [`rbac`]: `envoy.filters.http.rbac` (Istio's AuthorizationPolicies);
//! - [`ratelimit`]: `envoy.filters.http.local_ratelimit` (token buckets, mostly per
//!   route);
//! - [`fault`]: `envoy.filters.http.fault` (delays and aborts).
//!
//! What a filter learns about a request and a later one reads (a verified JWT's payload,
//! for RBAC to match claims) is [`Metadata`], as Envoy's dynamic metadata is.

pub mod fault;
pub mod jwt;
pub mod ratelimit;
pub mod rbac;

use std::collections::BTreeMap;
use std::sync::Arc;

/// One HTTP filter, configured.
#[derive(Clone, Debug)]
pub enum HttpFilter {
    /// JWT authentication.
    Jwt(Arc<jwt::JwtAuthn>),
    /// Role-based access control.
    Rbac(Arc<rbac::Rbac>),
    /// Local rate limiting, with the filter's own buckets (a route's own replace them).
    RateLimit(Arc<ratelimit::LocalRateLimit>),
    /// Fault injection, with the filter's own fault for every route if it has one (a
    /// route's own replaces it).
    Fault(Option<Arc<fault::Fault>>),
}

impl HttpFilter {
    /// Its kind, as Envoy names the filter.
    pub fn kind(&self) -> &'static str {
        match self {
            HttpFilter::Jwt(_) => "envoy.filters.http.jwt_authn",
            HttpFilter::Rbac(_) => "envoy.filters.http.rbac",
            HttpFilter::RateLimit(_) => "envoy.filters.http.local_ratelimit",
            HttpFilter::Fault(_) => "envoy.filters.http.fault",
        }
    }
}

/// A filter as a listener lists it.
#[derive(Clone, Debug)]
pub struct NamedFilter {
    /// Its name in the listener (stats, per-route configuration).
    pub name: String,
    /// What it does.
    pub filter: HttpFilter,
}

/// Dynamic metadata: per namespace (a filter's name), a JSON object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata(BTreeMap<String, serde_json::Map<String, serde_json::Value>>);

impl Metadata {
    /// Sets `key` in `namespace`.
    pub fn insert(&mut self, namespace: &str, key: &str, value: serde_json::Value) {
        self.0
            .entry(namespace.to_owned())
            .or_default()
            .insert(key.to_owned(), value);
    }

    /// The value at `path` (keys into nested objects) in `namespace`.
    pub fn get(&self, namespace: &str, path: &[String]) -> Option<&serde_json::Value> {
        let (first, rest) = path.split_first()?;
        let mut v = self.0.get(namespace)?.get(first)?;
        for k in rest {
            v = v.as_object()?.get(k)?;
        }
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_paths_walk_nested_objects() {
        let mut m = Metadata::default();
        m.insert(
            "ns",
            "payload",
            serde_json::json!({"a": {"b": "c"}, "l": [1]}),
        );
        let p = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            m.get("ns", &p(&["payload", "a", "b"])),
            Some(&serde_json::json!("c"))
        );
        assert_eq!(
            m.get("ns", &p(&["payload", "l", "0"])),
            None,
            "lists have no keys"
        );
        assert_eq!(m.get("other", &p(&["payload"])), None);
        assert_eq!(m.get("ns", &[]), None);
    }
}
