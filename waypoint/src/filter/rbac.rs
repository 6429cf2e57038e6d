//! Envoy's RBAC HTTP filter (`envoy.filters.http.rbac`), with Envoy's semantics: a
//! filter's policies are tried in name order; a policy matches when one of its
//! permissions (what is asked) and one of its principals (who asks) match.
//!
//! - `ALLOW`: a request no policy matches is denied (no policies at all: every request);
//! - `DENY`: a request some policy matches is denied;
//! - `LOG`: nothing is denied; a match marks the request for the access log (Istio's
//!   `AUDIT`).
//!
//! A denied request is answered `403 RBAC: access denied`, as Envoy answers it. The
//! control plane writes Istio's AuthorizationPolicies as a chain of these filters (AUDIT,
//! DENY, ALLOW), so DENY beats ALLOW by order. What a request is matched against —
//! the caller's verified identity, its addresses, the destination, the request's
//! headers and path, and what earlier filters learnt (JWT payloads, as dynamic metadata)
//! — is a [`Facts`].

use std::net::{IpAddr, SocketAddr};

use ambit_identity::Identity;
use ambit_policy::Cidr;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_rbac;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf;

use super::Metadata;
use crate::config::decode::{self, Error};
use crate::config::{HeaderMatch, StringMatch};
use crate::router;

/// What a filter does with the requests its policies match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RbacAction {
    /// Only matching requests pass.
    Allow,
    /// Matching requests are denied.
    Deny,
    /// Every request passes; matching ones are marked for the access log.
    Log,
}

impl RbacAction {
    /// As Envoy names it.
    pub fn as_str(self) -> &'static str {
        match self {
            RbacAction::Allow => "ALLOW",
            RbacAction::Deny => "DENY",
            RbacAction::Log => "LOG",
        }
    }
}

/// One RBAC filter's rules.
#[derive(Clone, Debug)]
pub struct Rbac {
    /// What a match does.
    pub action: RbacAction,
    /// Policies, by name in Envoy's order (sorted).
    pub policies: Vec<(String, Policy)>,
}

/// A policy: some permission and some principal must match.
#[derive(Clone, Debug)]
pub struct Policy {
    /// What is asked for; any may match.
    pub permissions: Vec<Permission>,
    /// Who asks; any may match.
    pub principals: Vec<Principal>,
}

/// Envoy's `Permission` subset.
#[derive(Clone, Debug)]
pub enum Permission {
    /// All of them.
    And(Vec<Permission>),
    /// Any of them.
    Or(Vec<Permission>),
    /// Anything.
    Any,
    /// A request header (`:method`, `:authority` and `:path` too).
    Header(HeaderMatch),
    /// The path without its query.
    UrlPath(StringMatch),
    /// The destination address (the VIP or pod IP the caller asked for).
    DestinationIp(Cidr),
    /// The destination port.
    DestinationPort(u16),
    /// A destination port in `[start, end)`.
    DestinationPortRange(u16, u32),
    /// Dynamic metadata (a JWT payload).
    Metadata(MetadataMatch),
    /// Not this.
    Not(Box<Permission>),
}

/// Envoy's `Principal` subset.
#[derive(Clone, Debug)]
pub enum Principal {
    /// All of them.
    And(Vec<Principal>),
    /// Any of them.
    Or(Vec<Principal>),
    /// Anyone.
    Any,
    /// A caller authenticated by mutual TLS whose identity (URI SAN) matches; `None`: any
    /// authenticated caller.
    Authenticated(Option<StringMatch>),
    /// The address of the caller's connection (its pod's IP; `source_ip` and
    /// `direct_remote_ip` are the same here: no PROXY protocol).
    DirectRemoteIp(Cidr),
    /// The original client's address: the last `x-forwarded-for` entry if there is one
    /// (Envoy's default, with no trusted hops), else the connection's.
    RemoteIp(Cidr),
    /// A request header.
    Header(HeaderMatch),
    /// The path without its query.
    UrlPath(StringMatch),
    /// Dynamic metadata (a JWT payload: request principals and claims).
    Metadata(MetadataMatch),
    /// Not this.
    Not(Box<Principal>),
}

/// Envoy's `MetadataMatcher` over dynamic metadata.
#[derive(Clone, Debug)]
pub struct MetadataMatch {
    /// The namespace (`envoy.filters.http.jwt_authn`).
    pub filter: String,
    /// Keys into nested structs.
    pub path: Vec<String>,
    /// What the value there must be.
    pub value: ValueMatch,
    /// Negate the result.
    pub invert: bool,
}

/// Envoy's `ValueMatcher`.
#[derive(Clone, Debug)]
pub enum ValueMatch {
    /// A null.
    Null,
    /// A number, exactly.
    Number(f64),
    /// A number in `[start, end)`.
    NumberRange(f64, f64),
    /// A string.
    String(StringMatch),
    /// A boolean.
    Bool(bool),
    /// Present (true) or absent (false).
    Present(bool),
    /// A list one of whose items matches.
    ListOneOf(Box<ValueMatch>),
    /// Any of these.
    Or(Vec<ValueMatch>),
}

/// What a request is judged on.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// The request's head (none for a TCP connection).
    pub parts: Option<&'a http::request::Parts>,
    /// The caller's identity, proven by mutual TLS (none: plaintext).
    pub peer: Option<&'a Identity>,
    /// The caller's address (its pod's, from the tunnel), if known.
    pub source: Option<IpAddr>,
    /// The destination the caller asked for (the CONNECT authority).
    pub destination: SocketAddr,
    /// What earlier filters learnt.
    pub metadata: &'a Metadata,
}

impl Facts<'_> {
    /// Envoy's remote address with no trusted hops: the last `x-forwarded-for` entry,
    /// else the connection's.
    fn remote(&self) -> Option<IpAddr> {
        let Some(parts) = self.parts else {
            return self.source;
        };
        let last = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim);
        match last {
            Some(s) => s.parse().ok(),
            None => self.source,
        }
    }
}

/// What one filter decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Passes (for `LOG`: and whether a policy matched, by name).
    Allowed {
        /// The policy that matched, if any.
        matched: Option<String>,
    },
    /// Denied, by this policy (`None`: an ALLOW filter none of whose policies matched).
    Denied {
        /// The policy that matched, if any.
        matched: Option<String>,
    },
}

impl Rbac {
    /// Judges a request.
    pub fn check(&self, f: &Facts<'_>) -> Verdict {
        let matched = self
            .policies
            .iter()
            .find(|(_, p)| p.matches(f))
            .map(|(n, _)| n.clone());
        match self.action {
            RbacAction::Allow if matched.is_some() => Verdict::Allowed { matched },
            RbacAction::Allow => Verdict::Denied { matched: None },
            RbacAction::Deny if matched.is_some() => Verdict::Denied { matched },
            RbacAction::Deny | RbacAction::Log => Verdict::Allowed { matched },
        }
    }
}

impl Policy {
    fn matches(&self, f: &Facts<'_>) -> bool {
        self.permissions.iter().any(|p| p.matches(f))
            && self.principals.iter().any(|p| p.matches(f))
    }
}

impl Permission {
    fn matches(&self, f: &Facts<'_>) -> bool {
        match self {
            Permission::And(v) => v.iter().all(|p| p.matches(f)),
            Permission::Or(v) => v.iter().any(|p| p.matches(f)),
            Permission::Any => true,
            Permission::Header(h) => f.parts.is_some_and(|p| router::header_matches(h, p)),
            Permission::UrlPath(m) => f
                .parts
                .is_some_and(|p| router::string_matches(m, p.uri.path())),
            Permission::DestinationIp(c) => c.contains(f.destination.ip()),
            Permission::DestinationPort(p) => f.destination.port() == *p,
            Permission::DestinationPortRange(a, b) => {
                let p = f.destination.port();
                p >= *a && u32::from(p) < *b
            }
            Permission::Metadata(m) => m.matches(f.metadata),
            Permission::Not(p) => !p.matches(f),
        }
    }
}

impl Principal {
    fn matches(&self, f: &Facts<'_>) -> bool {
        match self {
            Principal::And(v) => v.iter().all(|p| p.matches(f)),
            Principal::Or(v) => v.iter().any(|p| p.matches(f)),
            Principal::Any => true,
            Principal::Authenticated(m) => match (f.peer, m) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(id), Some(m)) => router::string_matches(m, id.as_str()),
            },
            Principal::DirectRemoteIp(c) => f.source.is_some_and(|ip| c.contains(ip)),
            Principal::RemoteIp(c) => f.remote().is_some_and(|ip| c.contains(ip)),
            Principal::Header(h) => f.parts.is_some_and(|p| router::header_matches(h, p)),
            Principal::UrlPath(m) => f
                .parts
                .is_some_and(|p| router::string_matches(m, p.uri.path())),
            Principal::Metadata(m) => m.matches(f.metadata),
            Principal::Not(p) => !p.matches(f),
        }
    }
}

impl MetadataMatch {
    fn matches(&self, md: &Metadata) -> bool {
        let value = md.get(&self.filter, &self.path);
        self.value.matches(value) != self.invert
    }
}

impl ValueMatch {
    fn matches(&self, v: Option<&serde_json::Value>) -> bool {
        use serde_json::Value;
        match (self, v) {
            // As Envoy: `present_match: true` matches any value there; `false` nothing.
            (ValueMatch::Present(p), v) => *p && v.is_some(),
            (ValueMatch::Or(ms), v) => ms.iter().any(|m| m.matches(v)),
            (_, None) => false,
            (ValueMatch::Null, Some(v)) => v.is_null(),
            (ValueMatch::Number(n), Some(Value::Number(x))) => x.as_f64() == Some(*n),
            (ValueMatch::NumberRange(a, b), Some(Value::Number(x))) => {
                x.as_f64().is_some_and(|x| x >= *a && x < *b)
            }
            (ValueMatch::String(m), Some(Value::String(s))) => router::string_matches(m, s),
            (ValueMatch::Bool(b), Some(Value::Bool(x))) => b == x,
            (ValueMatch::ListOneOf(m), Some(Value::Array(items))) => {
                items.iter().any(|i| m.matches(Some(i)))
            }
            _ => false,
        }
    }
}

// ---- Decoding Envoy's protos.

/// An `envoy.filters.http.rbac` filter's config: `None` if it has no rules (Envoy's
/// filter then does nothing).
pub fn decode(any: &protobuf::Any) -> Result<Option<Rbac>, Error> {
    let f: http_rbac::Rbac = decode::unpack(any, ambit_xds::type_url::HTTP_RBAC)?;
    if f.shadow_rules.is_some() || f.matcher.is_some() || f.shadow_matcher.is_some() {
        return Err("RBAC shadow_rules, matcher and shadow_matcher are not supported".into());
    }
    f.rules.as_ref().map(rules).transpose()
}

/// An `envoy.filters.network.rbac` filter's config (a TCP listener's): `None` if it has
/// no rules. It is decided once, when the tunnel arrives (Envoy's default enforcement,
/// on the first byte, sees the same facts: nothing of a TCP connection's data).
pub fn decode_network(any: &protobuf::Any) -> Result<Option<Rbac>, Error> {
    use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as network_rbac;
    let f: network_rbac::Rbac = decode::unpack(any, ambit_xds::type_url::NETWORK_RBAC)?;
    if f.shadow_rules.is_some()
        || f.matcher.is_some()
        || f.shadow_matcher.is_some()
        || f.delay_deny.is_some()
        || f.enforcement_type != network_rbac::rbac::EnforcementType::OneTimeOnFirstByte as i32
    {
        return Err("network RBAC shadow rules, matchers, delay_deny and CONTINUOUS enforcement are not supported".into());
    }
    let Some(r) = f.rules.as_ref().map(rules).transpose()? else {
        return Ok(None);
    };
    let http_only = |p: &Policy| {
        p.permissions.iter().any(Permission::needs_http)
            || p.principals.iter().any(Principal::needs_http)
    };
    if let Some((name, _)) = r.policies.iter().find(|(_, p)| http_only(p)) {
        return Err(format!(
            "network RBAC policy {name:?} matches HTTP attributes (headers, paths, metadata)"
        ));
    }
    Ok(Some(r))
}

fn rules(rules: &rbac::Rbac) -> Result<Rbac, Error> {
    if rules.audit_logging_options.is_some() {
        return Err("RBAC audit_logging_options are not supported".into());
    }
    let action = match rbac::rbac::Action::try_from(rules.action) {
        Ok(rbac::rbac::Action::Allow) => RbacAction::Allow,
        Ok(rbac::rbac::Action::Deny) => RbacAction::Deny,
        Ok(rbac::rbac::Action::Log) => RbacAction::Log,
        Err(_) => return Err(format!("RBAC action {}", rules.action)),
    };
    let mut policies = rules
        .policies
        .iter()
        .map(|(name, p)| {
            policy(p)
                .map(|p| (name.clone(), p))
                .map_err(|e| format!("RBAC policy {name:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    policies.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Rbac { action, policies })
}

impl Permission {
    fn needs_http(&self) -> bool {
        match self {
            Permission::And(v) | Permission::Or(v) => v.iter().any(Permission::needs_http),
            Permission::Not(p) => p.needs_http(),
            Permission::Header(_) | Permission::UrlPath(_) | Permission::Metadata(_) => true,
            _ => false,
        }
    }
}

impl Principal {
    fn needs_http(&self) -> bool {
        match self {
            Principal::And(v) | Principal::Or(v) => v.iter().any(Principal::needs_http),
            Principal::Not(p) => p.needs_http(),
            Principal::Header(_)
            | Principal::UrlPath(_)
            | Principal::Metadata(_)
            | Principal::RemoteIp(_) => true,
            _ => false,
        }
    }
}

#[allow(deprecated)]
fn policy(p: &rbac::Policy) -> Result<Policy, Error> {
    if p.condition.is_some() || p.checked_condition.is_some() || p.cel_config.is_some() {
        return Err("CEL conditions are not supported".into());
    }
    if p.permissions.is_empty() || p.principals.is_empty() {
        return Err("a policy needs permissions and principals".into());
    }
    Ok(Policy {
        permissions: p
            .permissions
            .iter()
            .map(permission)
            .collect::<Result<_, _>>()?,
        principals: p
            .principals
            .iter()
            .map(principal)
            .collect::<Result<_, _>>()?,
    })
}

fn cidr(c: &core::CidrRange) -> Result<Cidr, Error> {
    let ip: IpAddr = c
        .address_prefix
        .parse()
        .map_err(|_| format!("{:?} is not an IP address", c.address_prefix))?;
    let len = c
        .prefix_len
        .map_or(if ip.is_ipv4() { 32 } else { 128 }, |l| l.value);
    u8::try_from(len)
        .ok()
        .and_then(|len| Cidr::new(ip, len))
        .ok_or_else(|| format!("{ip}/{len} is not a CIDR range"))
}

fn path_matcher(m: &matcher::PathMatcher) -> Result<StringMatch, Error> {
    match &m.rule {
        Some(matcher::path_matcher::Rule::Path(s)) => decode::string_match(s),
        None => Err("a path matcher needs a rule".into()),
    }
}

// The deprecated `metadata` still configures a stock Envoy, so it is honoured.
#[allow(deprecated)]
fn permission(p: &rbac::Permission) -> Result<Permission, Error> {
    use rbac::permission::Rule;
    let set = |s: &rbac::permission::Set| -> Result<Vec<Permission>, Error> {
        s.rules.iter().map(permission).collect()
    };
    Ok(match &p.rule {
        Some(Rule::AndRules(s)) => Permission::And(set(s)?),
        Some(Rule::OrRules(s)) => Permission::Or(set(s)?),
        Some(Rule::Any(true)) => Permission::Any,
        Some(Rule::Header(h)) => Permission::Header(decode::header_matcher(h)?),
        Some(Rule::UrlPath(m)) => Permission::UrlPath(path_matcher(m)?),
        Some(Rule::DestinationIp(c)) => Permission::DestinationIp(cidr(c)?),
        Some(Rule::DestinationPort(port)) => Permission::DestinationPort(
            u16::try_from(*port).map_err(|_| format!("destination_port {port}"))?,
        ),
        Some(Rule::DestinationPortRange(r)) => {
            let start = u16::try_from(r.start).map_err(|_| format!("port range {r:?}"))?;
            let end = u32::try_from(r.end).map_err(|_| format!("port range {r:?}"))?;
            Permission::DestinationPortRange(start, end)
        }
        Some(Rule::Metadata(m)) => Permission::Metadata(metadata_matcher(m)?),
        Some(Rule::SourcedMetadata(m)) => Permission::Metadata(sourced_metadata(m)?),
        Some(Rule::NotRule(p)) => Permission::Not(Box::new(permission(p)?)),
        _ => return Err(
            "unsupported permission (any: false, SNI, matchers, URI templates, sourced metadata)"
                .into(),
        ),
    })
}

#[allow(deprecated)]
fn principal(p: &rbac::Principal) -> Result<Principal, Error> {
    use rbac::principal::Identifier;
    let set = |s: &rbac::principal::Set| -> Result<Vec<Principal>, Error> {
        s.ids.iter().map(principal).collect()
    };
    Ok(match &p.identifier {
        Some(Identifier::AndIds(s)) => Principal::And(set(s)?),
        Some(Identifier::OrIds(s)) => Principal::Or(set(s)?),
        Some(Identifier::Any(true)) => Principal::Any,
        Some(Identifier::Authenticated(a)) => Principal::Authenticated(
            a.principal_name
                .as_ref()
                .map(decode::string_match)
                .transpose()?,
        ),
        Some(Identifier::SourceIp(c)) | Some(Identifier::DirectRemoteIp(c)) => {
            Principal::DirectRemoteIp(cidr(c)?)
        }
        Some(Identifier::RemoteIp(c)) => Principal::RemoteIp(cidr(c)?),
        Some(Identifier::Header(h)) => Principal::Header(decode::header_matcher(h)?),
        Some(Identifier::UrlPath(m)) => Principal::UrlPath(path_matcher(m)?),
        Some(Identifier::Metadata(m)) => Principal::Metadata(metadata_matcher(m)?),
        Some(Identifier::SourcedMetadata(m)) => Principal::Metadata(sourced_metadata(m)?),
        Some(Identifier::NotId(p)) => Principal::Not(Box::new(principal(p)?)),
        _ => {
            return Err(
                "unsupported principal (any: false, filter state, sourced metadata, custom)".into(),
            );
        }
    })
}

/// Metadata from a source: only dynamic metadata (the JWT filter's) is kept per request.
fn sourced_metadata(m: &rbac::SourcedMetadata) -> Result<MetadataMatch, Error> {
    if m.metadata_source != rbac::MetadataSource::Dynamic as i32 {
        return Err("only DYNAMIC sourced metadata is supported".into());
    }
    metadata_matcher(
        m.metadata_matcher
            .as_ref()
            .ok_or("sourced metadata needs a matcher")?,
    )
}

fn metadata_matcher(m: &matcher::MetadataMatcher) -> Result<MetadataMatch, Error> {
    use matcher::metadata_matcher::path_segment::Segment;
    let path = m
        .path
        .iter()
        .map(|s| match &s.segment {
            Some(Segment::Key(k)) => Ok(k.clone()),
            None => Err("a metadata path segment needs a key".to_owned()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if path.is_empty() {
        return Err("a metadata matcher needs a path".into());
    }
    Ok(MetadataMatch {
        filter: m.filter.clone(),
        path,
        value: value_matcher(m.value.as_ref().ok_or("a metadata matcher needs a value")?)?,
        invert: m.invert,
    })
}

fn value_matcher(v: &matcher::ValueMatcher) -> Result<ValueMatch, Error> {
    use matcher::double_matcher::MatchPattern as Double;
    use matcher::value_matcher::MatchPattern;
    Ok(match &v.match_pattern {
        Some(MatchPattern::NullMatch(_)) => ValueMatch::Null,
        Some(MatchPattern::DoubleMatch(d)) => match &d.match_pattern {
            Some(Double::Exact(x)) => ValueMatch::Number(*x),
            Some(Double::Range(r)) => ValueMatch::NumberRange(r.start, r.end),
            None => return Err("a double matcher needs a pattern".into()),
        },
        Some(MatchPattern::StringMatch(s)) => ValueMatch::String(decode::string_match(s)?),
        Some(MatchPattern::BoolMatch(b)) => ValueMatch::Bool(*b),
        Some(MatchPattern::PresentMatch(p)) => ValueMatch::Present(*p),
        Some(MatchPattern::ListMatch(l)) => match &l.match_pattern {
            Some(matcher::list_matcher::MatchPattern::OneOf(m)) => {
                ValueMatch::ListOneOf(Box::new(value_matcher(m)?))
            }
            None => return Err("a list matcher needs one_of".into()),
        },
        Some(MatchPattern::OrMatch(o)) => ValueMatch::Or(
            o.value_matchers
                .iter()
                .map(value_matcher)
                .collect::<Result<_, _>>()?,
        ),
        None => return Err("a value matcher needs a pattern".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn facts<'a>(
        parts: &'a http::request::Parts,
        peer: Option<&'a Identity>,
        md: &'a Metadata,
    ) -> Facts<'a> {
        Facts {
            parts: Some(parts),
            peer,
            source: Some("10.244.1.10".parse().unwrap()),
            destination: "10.96.0.20:80".parse().unwrap(),
            metadata: md,
        }
    }

    fn allow(permissions: Vec<Permission>, principals: Vec<Principal>) -> Rbac {
        Rbac {
            action: RbacAction::Allow,
            policies: vec![(
                "p".into(),
                Policy {
                    permissions,
                    principals,
                },
            )],
        }
    }

    #[test]
    fn actions_decide_as_envoy_decides() {
        let p = parts("GET", "/", &[]);
        let md = Metadata::default();
        let f = facts(&p, None, &md);
        let none = |action| Rbac {
            action,
            policies: vec![],
        };
        assert_eq!(
            none(RbacAction::Allow).check(&f),
            Verdict::Denied { matched: None },
            "ALLOW with no policy denies everything"
        );
        assert!(matches!(
            none(RbacAction::Deny).check(&f),
            Verdict::Allowed { .. }
        ));
        let any = |action| Rbac {
            action,
            ..allow(vec![Permission::Any], vec![Principal::Any])
        };
        assert_eq!(
            any(RbacAction::Deny).check(&f),
            Verdict::Denied {
                matched: Some("p".into())
            }
        );
        assert_eq!(
            any(RbacAction::Log).check(&f),
            Verdict::Allowed {
                matched: Some("p".into())
            },
            "LOG never denies"
        );
    }

    #[test]
    fn principals_need_mutual_tls_and_match_the_uri_san() {
        let p = parts("GET", "/", &[]);
        let md = Metadata::default();
        let id = Identity::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let exact = allow(
            vec![Permission::Any],
            vec![Principal::Authenticated(Some(StringMatch::Exact(
                "spiffe://cluster.local/ns/shop/sa/web".into(),
            )))],
        );
        assert!(matches!(
            exact.check(&facts(&p, Some(&id), &md)),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            exact.check(&facts(&p, None, &md)),
            Verdict::Denied { .. }
        ));
        let anyone = allow(vec![Permission::Any], vec![Principal::Authenticated(None)]);
        assert!(matches!(
            anyone.check(&facts(&p, None, &md)),
            Verdict::Denied { .. }
        ));
        // not_id of an authenticated principal: plaintext callers are "not" it.
        let not = allow(
            vec![Permission::Any],
            vec![Principal::Not(Box::new(Principal::Authenticated(None)))],
        );
        assert!(matches!(
            not.check(&facts(&p, None, &md)),
            Verdict::Allowed { .. }
        ));
    }

    #[test]
    fn permissions_see_the_request_and_the_destination() {
        let md = Metadata::default();
        let get = parts("GET", "/api/v1?x=1", &[("x-team", "a")]);
        let post = parts("POST", "/api/v1", &[]);
        let rule = allow(
            vec![Permission::And(vec![
                Permission::Header(HeaderMatch {
                    name: ":method".into(),
                    value: StringMatch::Exact("GET".into()),
                    invert: false,
                }),
                Permission::UrlPath(StringMatch::Prefix("/api/".into())),
                Permission::DestinationPort(80),
                Permission::DestinationIp("10.96.0.0/16".parse().unwrap()),
                Permission::Not(Box::new(Permission::DestinationPortRange(8000, 9000))),
            ])],
            vec![Principal::Any],
        );
        assert!(matches!(
            rule.check(&facts(&get, None, &md)),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            rule.check(&facts(&post, None, &md)),
            Verdict::Denied { .. }
        ));
        // url_path ignores the query.
        let exact = allow(
            vec![Permission::UrlPath(StringMatch::Exact("/api/v1".into()))],
            vec![Principal::Any],
        );
        assert!(matches!(
            exact.check(&facts(&get, None, &md)),
            Verdict::Allowed { .. }
        ));
    }

    #[test]
    fn remote_ip_is_the_last_forwarded_for_entry() {
        let md = Metadata::default();
        let rule = allow(
            vec![Permission::Any],
            vec![Principal::RemoteIp("192.0.2.0/24".parse().unwrap())],
        );
        let direct = allow(
            vec![Permission::Any],
            vec![Principal::DirectRemoteIp("10.244.1.10/32".parse().unwrap())],
        );
        let xff = parts("GET", "/", &[("x-forwarded-for", "203.0.113.9, 192.0.2.7")]);
        let plain = parts("GET", "/", &[]);
        assert!(matches!(
            rule.check(&facts(&xff, None, &md)),
            Verdict::Allowed { .. }
        ));
        assert!(matches!(
            rule.check(&facts(&plain, None, &md)),
            Verdict::Denied { .. }
        ));
        assert!(matches!(
            direct.check(&facts(&xff, None, &md)),
            Verdict::Allowed { .. }
        ));
    }

    #[test]
    fn metadata_matchers_read_jwt_payloads() {
        let p = parts("GET", "/", &[]);
        let mut md = Metadata::default();
        md.insert(
            "envoy.filters.http.jwt_authn",
            "payload",
            json!({"iss": "https://idp", "sub": "alice", "groups": ["dev", "ops"], "level": 3, "admin": true}),
        );
        let m = |path: &[&str], value: ValueMatch| {
            allow(
                vec![Permission::Any],
                vec![Principal::Metadata(MetadataMatch {
                    filter: "envoy.filters.http.jwt_authn".into(),
                    path: std::iter::once("payload")
                        .chain(path.iter().copied())
                        .map(String::from)
                        .collect(),
                    value,
                    invert: false,
                })],
            )
        };
        let ok = |r: Rbac| matches!(r.check(&facts(&p, None, &md)), Verdict::Allowed { .. });
        assert!(ok(m(
            &["iss"],
            ValueMatch::String(StringMatch::Exact("https://idp".into()))
        )));
        assert!(!ok(m(
            &["iss"],
            ValueMatch::String(StringMatch::Exact("x".into()))
        )));
        assert!(ok(m(
            &["groups"],
            ValueMatch::ListOneOf(Box::new(ValueMatch::String(StringMatch::Exact(
                "ops".into()
            ))))
        )));
        assert!(
            !ok(m(
                &["sub"],
                ValueMatch::ListOneOf(Box::new(ValueMatch::String(StringMatch::Exact(
                    "alice".into()
                ))))
            )),
            "a string is not a list"
        );
        assert!(ok(m(&[], ValueMatch::Present(true))));
        assert!(!ok(m(&["nope"], ValueMatch::Present(true))));
        assert!(ok(m(&["level"], ValueMatch::NumberRange(1.0, 5.0))));
        assert!(ok(m(&["admin"], ValueMatch::Bool(true))));
        let empty = Metadata::default();
        let r = m(&[], ValueMatch::Present(true));
        assert!(matches!(
            r.check(&facts(&p, None, &empty)),
            Verdict::Denied { .. }
        ));
    }
}
