//! Waypoint authorization policies as Envoy RBAC filters, as Istio writes them: for a
//! service's listener, one filter per action among the policies that apply to it — LOG
//! (AUDIT) first, so that every request is audited, then DENY, then ALLOW — each with one
//! Envoy policy per rule, named `ns[<namespace>]-policy[<name>]-rule[<index>]`.
//!
//! A rule's `to` operations and destination conditions become its permission; its
//! `from` sources and the other conditions its principal. JWT request principals and
//! claims are matched in the payload the JWT filter writes to dynamic metadata
//! (`envoy.filters.http.jwt_authn` / `jwt_payload`); a request principal `<iss>/<sub>` is
//! matched exactly, for any `/` inside either part, by trying every split.

use ambit_xds::type_url;
use ambit_xds::waypoint::{JWT_FILTER, JWT_PAYLOAD, RBAC_FILTER};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_rbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as network_rbac;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf;

use crate::model::authz::{
    Attribute, Cidr, Condition, L7Action, L7Rule, Operation, Pattern, PrincipalPattern, Source,
    Values, WaypointPolicy,
};

use rbac::permission::Rule as P;
use rbac::principal::Identifier as Id;

/// The RBAC HTTP filters of an HTTP listener for `policies` (those that apply to it),
/// in order.
pub fn rbac_filters<'a>(
    policies: impl IntoIterator<Item = &'a WaypointPolicy> + Clone,
) -> Vec<hcm::HttpFilter> {
    rules(policies, false)
        .into_iter()
        .map(|rules| hcm::HttpFilter {
            name: RBAC_FILTER.into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(protobuf::Any {
                type_url: type_url::HTTP_RBAC.into(),
                value: prost::Message::encode_to_vec(&http_rbac::Rbac {
                    rules: Some(rules),
                    ..Default::default()
                }),
            })),
            ..Default::default()
        })
        .collect()
}

/// The RBAC network filters of a TCP listener for `policies`, in order. What a TCP
/// connection cannot show (HTTP attributes, JWTs, `x-forwarded-for`) fails closed, as in
/// Istio: an ALLOW rule that needs it matches nothing; a DENY or AUDIT rule is applied
/// without it (so it matches more).
pub fn rbac_network_filters<'a>(
    policies: impl IntoIterator<Item = &'a WaypointPolicy> + Clone,
) -> Vec<listener::Filter> {
    rules(policies, true)
        .into_iter()
        .map(|rules| listener::Filter {
            name: "envoy.filters.network.rbac".into(),
            config_type: Some(listener::filter::ConfigType::TypedConfig(protobuf::Any {
                type_url: type_url::NETWORK_RBAC.into(),
                value: prost::Message::encode_to_vec(&network_rbac::Rbac {
                    rules: Some(rules),
                    stat_prefix: "rbac".into(),
                    ..Default::default()
                }),
            })),
        })
        .collect()
}

fn rules<'a>(
    policies: impl IntoIterator<Item = &'a WaypointPolicy> + Clone,
    tcp: bool,
) -> Vec<rbac::Rbac> {
    let mut out = Vec::new();
    for (action, envoy_action) in [
        (L7Action::Audit, rbac::rbac::Action::Log),
        (L7Action::Deny, rbac::rbac::Action::Deny),
        (L7Action::Allow, rbac::rbac::Action::Allow),
    ] {
        let of_action: Vec<&WaypointPolicy> = policies
            .clone()
            .into_iter()
            .filter(|p| p.action == action)
            .collect();
        if of_action.is_empty() {
            continue;
        }
        let mut envoy_policies = std::collections::HashMap::new();
        for p in of_action {
            for (i, r) in p.rules.iter().enumerate() {
                let rule = if tcp {
                    match for_tcp(r, action) {
                        Some(r) => std::borrow::Cow::Owned(r),
                        None => continue,
                    }
                } else {
                    std::borrow::Cow::Borrowed(r)
                };
                envoy_policies.insert(
                    format!("ns[{}]-policy[{}]-rule[{i}]", p.namespace, p.name),
                    policy(&rule),
                );
            }
        }
        out.push(rbac::Rbac {
            action: envoy_action as i32,
            policies: envoy_policies,
            ..Default::default()
        });
    }
    out
}

/// A rule as a TCP connection can be judged by it: `None` (matches nothing) for an ALLOW
/// rule that needs HTTP, else without its HTTP parts.
fn for_tcp(r: &L7Rule, action: L7Action) -> Option<L7Rule> {
    let http_condition = |c: &Condition| {
        !matches!(
            c.attribute,
            Attribute::SourceIp
                | Attribute::SourceNamespace
                | Attribute::SourcePrincipal
                | Attribute::DestinationIp
                | Attribute::DestinationPort
        )
    };
    let needs_http = r.from.iter().any(|s| {
        !s.request_principals.is_empty()
            || !s.not_request_principals.is_empty()
            || !s.remote_ip_blocks.is_empty()
            || !s.not_remote_ip_blocks.is_empty()
    }) || r.to.iter().any(|o| {
        !o.hosts.is_empty()
            || !o.not_hosts.is_empty()
            || !o.methods.is_empty()
            || !o.not_methods.is_empty()
            || !o.paths.is_empty()
            || !o.not_paths.is_empty()
    }) || r.when.iter().any(http_condition);
    if !needs_http {
        return Some(r.clone());
    }
    if action == L7Action::Allow {
        return None;
    }
    Some(L7Rule {
        from: r
            .from
            .iter()
            .map(|s| Source {
                request_principals: vec![],
                not_request_principals: vec![],
                remote_ip_blocks: vec![],
                not_remote_ip_blocks: vec![],
                ..s.clone()
            })
            .collect(),
        to: r
            .to
            .iter()
            .map(|o| Operation {
                ports: o.ports.clone(),
                not_ports: o.not_ports.clone(),
                ..Default::default()
            })
            .collect(),
        when: r
            .when
            .iter()
            .filter(|c| !http_condition(c))
            .cloned()
            .collect(),
    })
}

fn policy(r: &L7Rule) -> rbac::Policy {
    let mut permissions = Vec::new();
    if !r.to.is_empty() {
        permissions.push(or_rules(r.to.iter().map(operation).collect()));
    }
    let mut principals = Vec::new();
    if !r.from.is_empty() {
        principals.push(or_ids(r.from.iter().map(source).collect()));
    }
    for c in &r.when {
        match condition(c) {
            Side::Permission(p) => permissions.push(p),
            Side::Principal(p) => principals.push(p),
        }
    }
    rbac::Policy {
        permissions: vec![and_rules(permissions)],
        principals: vec![and_ids(principals)],
        ..Default::default()
    }
}

// ---- Permissions and principals, built up.

fn perm(rule: P) -> rbac::Permission {
    rbac::Permission { rule: Some(rule) }
}

fn id(identifier: Id) -> rbac::Principal {
    rbac::Principal {
        identifier: Some(identifier),
    }
}

/// All of `v` (anything, if empty; the one itself, if one).
fn and_rules(mut v: Vec<rbac::Permission>) -> rbac::Permission {
    match v.len() {
        0 => perm(P::Any(true)),
        1 => v.pop().expect("one"),
        _ => perm(P::AndRules(rbac::permission::Set { rules: v })),
    }
}

fn or_rules(mut v: Vec<rbac::Permission>) -> rbac::Permission {
    match v.len() {
        1 => v.pop().expect("one"),
        _ => perm(P::OrRules(rbac::permission::Set { rules: v })),
    }
}

fn not_rule(p: rbac::Permission) -> rbac::Permission {
    perm(P::NotRule(Box::new(p)))
}

fn and_ids(mut v: Vec<rbac::Principal>) -> rbac::Principal {
    match v.len() {
        0 => id(Id::Any(true)),
        1 => v.pop().expect("one"),
        _ => id(Id::AndIds(rbac::principal::Set { ids: v })),
    }
}

fn or_ids(mut v: Vec<rbac::Principal>) -> rbac::Principal {
    match v.len() {
        1 => v.pop().expect("one"),
        _ => id(Id::OrIds(rbac::principal::Set { ids: v })),
    }
}

fn not_id(p: rbac::Principal) -> rbac::Principal {
    id(Id::NotId(Box::new(p)))
}

/// `field` (any of its values) and not `not_field` (none of them), each only if given.
fn both_ids(
    values: Vec<rbac::Principal>,
    not_values: Vec<rbac::Principal>,
    out: &mut Vec<rbac::Principal>,
) {
    if !values.is_empty() {
        out.push(or_ids(values));
    }
    if !not_values.is_empty() {
        out.push(not_id(or_ids(not_values)));
    }
}

fn both_rules(
    values: Vec<rbac::Permission>,
    not_values: Vec<rbac::Permission>,
    out: &mut Vec<rbac::Permission>,
) {
    if !values.is_empty() {
        out.push(or_rules(values));
    }
    if !not_values.is_empty() {
        out.push(not_rule(or_rules(not_values)));
    }
}

// ---- Matchers.

fn string(
    pattern: matcher::string_matcher::MatchPattern,
    ignore_case: bool,
) -> matcher::StringMatcher {
    matcher::StringMatcher {
        match_pattern: Some(pattern),
        ignore_case,
    }
}

fn exact(s: &str) -> matcher::StringMatcher {
    string(
        matcher::string_matcher::MatchPattern::Exact(s.to_owned()),
        false,
    )
}

fn regex(r: &str) -> matcher::StringMatcher {
    string(
        matcher::string_matcher::MatchPattern::SafeRegex(matcher::RegexMatcher {
            regex: r.to_owned(),
            ..Default::default()
        }),
        false,
    )
}

/// An Istio pattern as a string matcher; `None` for `*` (presence).
fn pattern(p: &Pattern, ignore_case: bool) -> Option<matcher::StringMatcher> {
    use matcher::string_matcher::MatchPattern as M;
    Some(match p {
        Pattern::Any => return None,
        Pattern::Exact(s) => string(M::Exact(s.clone()), ignore_case),
        Pattern::Prefix(s) if s.is_empty() => return None,
        Pattern::Prefix(s) => string(M::Prefix(s.clone()), ignore_case),
        Pattern::Suffix(s) if s.is_empty() => return None,
        Pattern::Suffix(s) => string(M::Suffix(s.clone()), ignore_case),
    })
}

fn header(name: &str, m: Option<matcher::StringMatcher>) -> route::HeaderMatcher {
    use route::header_matcher::HeaderMatchSpecifier as H;
    route::HeaderMatcher {
        name: name.to_owned(),
        header_match_specifier: Some(match m {
            Some(m) => H::StringMatch(m),
            None => H::PresentMatch(true),
        }),
        ..Default::default()
    }
}

fn cidr(c: &Cidr) -> core::CidrRange {
    core::CidrRange {
        address_prefix: c.addr.to_string(),
        prefix_len: Some(protobuf::UInt32Value {
            value: u32::from(c.len),
        }),
    }
}

/// An identity pattern (no scheme) against the peer certificate's URI SAN.
fn authenticated(p: &PrincipalPattern) -> rbac::Principal {
    use matcher::string_matcher::MatchPattern as M;
    let name = match p {
        PrincipalPattern::Any => None,
        PrincipalPattern::Exact(s) => Some(string(M::Exact(format!("spiffe://{s}")), false)),
        PrincipalPattern::Prefix(s) => Some(string(M::Prefix(format!("spiffe://{s}")), false)),
        PrincipalPattern::Suffix(s) => Some(string(M::Suffix(s.clone()), false)),
    };
    id(Id::Authenticated(rbac::principal::Authenticated {
        principal_name: name,
    }))
}

/// The peer identity's namespace.
fn namespace(ns: &str) -> rbac::Principal {
    id(Id::Authenticated(rbac::principal::Authenticated {
        principal_name: Some(regex(&format!(
            "spiffe://[^/]+/ns/{}/sa/[^/]+",
            regex_escape(ns)
        ))),
    }))
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A value of the verified JWT's payload at `path`.
fn claim(path: &[&str], value: matcher::value_matcher::MatchPattern) -> rbac::Principal {
    use matcher::metadata_matcher::{PathSegment, path_segment::Segment};
    id(Id::SourcedMetadata(rbac::SourcedMetadata {
        metadata_matcher: Some(matcher::MetadataMatcher {
            filter: JWT_FILTER.into(),
            path: std::iter::once(JWT_PAYLOAD)
                .chain(path.iter().copied())
                .map(|k| PathSegment {
                    segment: Some(Segment::Key(k.to_owned())),
                })
                .collect(),
            value: Some(matcher::ValueMatcher {
                match_pattern: Some(value),
            }),
            invert: false,
        }),
        metadata_source: rbac::MetadataSource::Dynamic as i32,
    }))
}

fn claim_is(path: &[&str], m: matcher::StringMatcher) -> rbac::Principal {
    claim(path, matcher::value_matcher::MatchPattern::StringMatch(m))
}

fn claim_present(path: &[&str]) -> rbac::Principal {
    claim(
        path,
        matcher::value_matcher::MatchPattern::PresentMatch(true),
    )
}

/// A claim that is a string matching `p`, or a list one of whose items does (Istio's
/// claims, audiences).
fn claim_matches(path: &[&str], p: &Pattern) -> rbac::Principal {
    use matcher::value_matcher::MatchPattern as V;
    let Some(m) = pattern(p, false) else {
        return claim_present(path);
    };
    let one = matcher::ValueMatcher {
        match_pattern: Some(V::StringMatch(m)),
    };
    claim(
        path,
        V::OrMatch(matcher::OrMatcher {
            value_matchers: vec![
                one.clone(),
                matcher::ValueMatcher {
                    match_pattern: Some(V::ListMatch(Box::new(matcher::ListMatcher {
                        match_pattern: Some(matcher::list_matcher::MatchPattern::OneOf(Box::new(
                            one,
                        ))),
                    }))),
                },
            ],
        }),
    )
}

/// The request principal `<iss>/<sub>` matches `p`: every way the pattern can split at
/// a `/` into the issuer's part and the subject's is tried.
fn request_principal(p: &Pattern) -> rbac::Principal {
    use matcher::string_matcher::MatchPattern as M;
    let both = |a: rbac::Principal, b: rbac::Principal| and_ids(vec![a, b]);
    let slashes = |s: &str| -> Vec<usize> { s.match_indices('/').map(|(i, _)| i).collect() };
    let (iss, sub) = (&["iss"][..], &["sub"][..]);
    let mut any = Vec::new();
    match p {
        Pattern::Any => any.push(both(claim_present(iss), claim_present(sub))),
        Pattern::Exact(s) => {
            for k in slashes(s) {
                let (a, b) = (&s[..k], &s[k + 1..]);
                if !a.is_empty() && !b.is_empty() {
                    any.push(both(claim_is(iss, exact(a)), claim_is(sub, exact(b))));
                }
            }
        }
        Pattern::Prefix(s) => {
            // Inside the issuer, or past it into the subject.
            any.push(both(
                claim_is(iss, string(M::Prefix(s.clone()), false)),
                claim_present(sub),
            ));
            for k in slashes(s) {
                let (a, b) = (&s[..k], &s[k + 1..]);
                if a.is_empty() {
                    continue;
                }
                let subject = if b.is_empty() {
                    claim_present(sub)
                } else {
                    claim_is(sub, string(M::Prefix(b.to_owned()), false))
                };
                any.push(both(claim_is(iss, exact(a)), subject));
            }
        }
        Pattern::Suffix(s) => {
            any.push(both(
                claim_present(iss),
                claim_is(sub, string(M::Suffix(s.clone()), false)),
            ));
            for k in slashes(s) {
                let (a, b) = (&s[..k], &s[k + 1..]);
                if b.is_empty() {
                    continue;
                }
                let issuer = if a.is_empty() {
                    claim_present(iss)
                } else {
                    claim_is(iss, string(M::Suffix(a.to_owned()), false))
                };
                any.push(both(issuer, claim_is(sub, exact(b))));
            }
        }
    }
    if any.is_empty() {
        // A principal without a '/' (or with an empty part) names no token.
        return not_id(id(Id::Any(true)));
    }
    or_ids(any)
}

fn source(s: &Source) -> rbac::Principal {
    let mut all = Vec::new();
    both_ids(
        s.principals.iter().map(authenticated).collect(),
        s.not_principals.iter().map(authenticated).collect(),
        &mut all,
    );
    both_ids(
        s.request_principals.iter().map(request_principal).collect(),
        s.not_request_principals
            .iter()
            .map(request_principal)
            .collect(),
        &mut all,
    );
    both_ids(
        s.namespaces.iter().map(|n| namespace(n)).collect(),
        s.not_namespaces.iter().map(|n| namespace(n)).collect(),
        &mut all,
    );
    both_ids(
        s.ip_blocks
            .iter()
            .map(|c| id(Id::DirectRemoteIp(cidr(c))))
            .collect(),
        s.not_ip_blocks
            .iter()
            .map(|c| id(Id::DirectRemoteIp(cidr(c))))
            .collect(),
        &mut all,
    );
    both_ids(
        s.remote_ip_blocks
            .iter()
            .map(|c| id(Id::RemoteIp(cidr(c))))
            .collect(),
        s.not_remote_ip_blocks
            .iter()
            .map(|c| id(Id::RemoteIp(cidr(c))))
            .collect(),
        &mut all,
    );
    and_ids(all)
}

fn host(p: &Pattern) -> rbac::Permission {
    perm(P::Header(header(":authority", pattern(p, true))))
}

fn method(m: &str) -> rbac::Permission {
    perm(P::Header(header(":method", Some(exact(m)))))
}

fn path(p: &Pattern) -> rbac::Permission {
    match pattern(p, false) {
        None => perm(P::Any(true)),
        Some(m) => perm(P::UrlPath(matcher::PathMatcher {
            rule: Some(matcher::path_matcher::Rule::Path(m)),
        })),
    }
}

fn port(p: u16) -> rbac::Permission {
    perm(P::DestinationPort(u32::from(p)))
}

fn operation(o: &Operation) -> rbac::Permission {
    let mut all = Vec::new();
    both_rules(
        o.hosts.iter().map(host).collect(),
        o.not_hosts.iter().map(host).collect(),
        &mut all,
    );
    both_rules(
        o.ports.iter().copied().map(port).collect(),
        o.not_ports.iter().copied().map(port).collect(),
        &mut all,
    );
    both_rules(
        o.methods.iter().map(|m| method(m)).collect(),
        o.not_methods.iter().map(|m| method(m)).collect(),
        &mut all,
    );
    both_rules(
        o.paths.iter().map(path).collect(),
        o.not_paths.iter().map(path).collect(),
        &mut all,
    );
    and_rules(all)
}

enum Side {
    Permission(rbac::Permission),
    Principal(rbac::Principal),
}

fn condition(c: &Condition) -> Side {
    let principals = |v: &Values| -> Vec<rbac::Principal> {
        match (&c.attribute, v) {
            (Attribute::SourceIp, Values::Cidrs(cs)) => {
                cs.iter().map(|x| id(Id::DirectRemoteIp(cidr(x)))).collect()
            }
            (Attribute::RemoteIp, Values::Cidrs(cs)) => {
                cs.iter().map(|x| id(Id::RemoteIp(cidr(x)))).collect()
            }
            (Attribute::SourceNamespace, Values::Names(ns)) => {
                ns.iter().map(|n| namespace(n)).collect()
            }
            (Attribute::SourcePrincipal, Values::Principals(ps)) => {
                ps.iter().map(authenticated).collect()
            }
            (Attribute::RequestPrincipal, Values::Patterns(ps)) => {
                ps.iter().map(request_principal).collect()
            }
            (Attribute::Claim(path), Values::Patterns(ps)) => {
                let path: Vec<&str> = path.iter().map(String::as_str).collect();
                ps.iter().map(|p| claim_matches(&path, p)).collect()
            }
            _ => Vec::new(),
        }
    };
    let permissions = |v: &Values| -> Vec<rbac::Permission> {
        match (&c.attribute, v) {
            (Attribute::RequestHeader(name), Values::Patterns(ps)) => ps
                .iter()
                .map(|p| perm(P::Header(header(name, pattern(p, false)))))
                .collect(),
            (Attribute::DestinationIp, Values::Cidrs(cs)) => {
                cs.iter().map(|x| perm(P::DestinationIp(cidr(x)))).collect()
            }
            (Attribute::DestinationPort, Values::Ports(ps)) => {
                ps.iter().copied().map(port).collect()
            }
            _ => Vec::new(),
        }
    };
    match &c.attribute {
        Attribute::RequestHeader(_) | Attribute::DestinationIp | Attribute::DestinationPort => {
            let mut all = Vec::new();
            both_rules(permissions(&c.values), permissions(&c.not_values), &mut all);
            Side::Permission(and_rules(all))
        }
        _ => {
            let mut all = Vec::new();
            both_ids(principals(&c.values), principals(&c.not_values), &mut all);
            Side::Principal(and_ids(all))
        }
    }
}
