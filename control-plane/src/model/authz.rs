//! Authorization policies that waypoints enforce: Istio `AuthorizationPolicy`s with
//! `targetRefs` (a Service whose traffic crosses a waypoint, or the waypoint's Gateway
//! itself), with every L7 attribute Istio has for HTTP — request principals (JWT),
//! hosts, methods, paths, `when` conditions on headers and claims — and the AUDIT
//! action.
//!
//! [`WaypointPolicySpec`] is the policy as a source reads it, its values still strings;
//! [`validate`] checks it against the model (targets that exist and have a waypoint,
//! patterns, addresses, ports, condition keys) and gives a [`WaypointPolicy`] whose
//! values are parsed. The translator writes it as Envoy RBAC filters, as Istio does.
//!
//! Istio's semantics: a policy matches a request if any of its rules does; a rule
//! matches if one of its `from` sources, one of its `to` operations and all of its
//! `when` conditions match (absent parts match anything); within a source or operation
//! every field set must match one of its values and no `not*` field may match any.
//! Then DENY beats ALLOW: a request a DENY policy matches is denied; if ALLOW policies
//! apply, one must match; AUDIT only marks requests for the access log.

use std::collections::BTreeMap;

use super::{NamespacedName, Problems, Service, Waypoint};
pub use ambit_mesh::cidr::Cidr;
pub use ambit_policy::PrincipalPattern;

/// What a matching policy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L7Action {
    /// Only matching requests pass (once any ALLOW policy applies).
    Allow,
    /// Matching requests are denied (403), whatever ALLOW policies say.
    Deny,
    /// Matching requests are marked in the access log; nothing is denied.
    Audit,
}

/// A waypoint's authorization policy as a source reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaypointPolicySpec {
    /// Its name, unique among its namespace's authorization policies.
    pub name: String,
    /// Its namespace: its targets' too.
    pub namespace: String,
    /// What it applies to; at least one.
    pub target_refs: Vec<TargetRefSpec>,
    /// What a match does (ALLOW if `None`).
    pub action: Option<L7Action>,
    /// Any matching rule makes the policy match; none: it matches nothing.
    pub rules: Vec<L7RuleSpec>,
}

/// Istio's `PolicyTargetReference`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetRefSpec {
    /// `""` for a Service, `gateway.networking.k8s.io` for a Gateway.
    pub group: String,
    /// `Service` or `Gateway`.
    pub kind: String,
    /// Its name, in the policy's namespace.
    pub name: String,
}

/// A rule as written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L7RuleSpec {
    /// Sources; any.
    pub from: Vec<SourceSpec>,
    /// Operations; any.
    pub to: Vec<OperationSpec>,
    /// Conditions; all.
    pub when: Vec<ConditionSpec>,
}

/// `from[].source`, as written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceSpec {
    /// Peer identities (`<td>/ns/<ns>/sa/<sa>`, `*`, `prefix*`, `*suffix`).
    pub principals: Vec<String>,
    /// Peer identities that must not match.
    pub not_principals: Vec<String>,
    /// JWT principals (`<iss>/<sub>`, with `*` patterns).
    pub request_principals: Vec<String>,
    /// JWT principals that must not match.
    pub not_request_principals: Vec<String>,
    /// The peer identity's namespace.
    pub namespaces: Vec<String>,
    /// Namespaces that must not match.
    pub not_namespaces: Vec<String>,
    /// The caller's address (CIDRs or addresses).
    pub ip_blocks: Vec<String>,
    /// Addresses that must not match.
    pub not_ip_blocks: Vec<String>,
    /// The original client's address (`x-forwarded-for`).
    pub remote_ip_blocks: Vec<String>,
    /// Original client addresses that must not match.
    pub not_remote_ip_blocks: Vec<String>,
}

/// `to[].operation`, as written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperationSpec {
    /// `Host`s (case-insensitive, `*` patterns).
    pub hosts: Vec<String>,
    /// Hosts that must not match.
    pub not_hosts: Vec<String>,
    /// Service ports.
    pub ports: Vec<String>,
    /// Ports that must not match.
    pub not_ports: Vec<String>,
    /// Methods.
    pub methods: Vec<String>,
    /// Methods that must not match.
    pub not_methods: Vec<String>,
    /// Paths (without the query; `*` patterns).
    pub paths: Vec<String>,
    /// Paths that must not match.
    pub not_paths: Vec<String>,
}

/// `when[]`, as written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConditionSpec {
    /// The attribute: `request.headers[<name>]`, `source.ip`, `remote.ip`,
    /// `source.namespace`, `source.principal`, `request.auth.principal`,
    /// `request.auth.audiences`, `request.auth.presenter`,
    /// `request.auth.claims[<claim>]` (`[a][b]` for nested claims), `destination.ip`,
    /// `destination.port`.
    pub key: String,
    /// One of these must match.
    pub values: Vec<String>,
    /// None of these may match.
    pub not_values: Vec<String>,
}

/// A validated waypoint policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointPolicy {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// What it applies to.
    pub targets: Vec<PolicyTarget>,
    /// What a match does.
    pub action: L7Action,
    /// Its rules.
    pub rules: Vec<L7Rule>,
}

/// What a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PolicyTarget {
    /// The requests to this service (of the policy's namespace) that cross its waypoint.
    Service(String),
    /// Every request this waypoint (of the policy's namespace) serves.
    Waypoint(String),
}

/// A rule, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L7Rule {
    /// Sources; any.
    pub from: Vec<Source>,
    /// Operations; any.
    pub to: Vec<Operation>,
    /// Conditions; all.
    pub when: Vec<Condition>,
}

/// A source, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    /// Peer identities.
    pub principals: Vec<PrincipalPattern>,
    /// ... that must not match.
    pub not_principals: Vec<PrincipalPattern>,
    /// JWT principals (`iss/sub`).
    pub request_principals: Vec<Pattern>,
    /// ... that must not match.
    pub not_request_principals: Vec<Pattern>,
    /// Peer namespaces.
    pub namespaces: Vec<String>,
    /// ... that must not match.
    pub not_namespaces: Vec<String>,
    /// Caller addresses.
    pub ip_blocks: Vec<Cidr>,
    /// ... that must not match.
    pub not_ip_blocks: Vec<Cidr>,
    /// Original client addresses.
    pub remote_ip_blocks: Vec<Cidr>,
    /// ... that must not match.
    pub not_remote_ip_blocks: Vec<Cidr>,
}

/// An operation, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    /// Hosts (case-insensitive).
    pub hosts: Vec<Pattern>,
    /// ... that must not match.
    pub not_hosts: Vec<Pattern>,
    /// Ports.
    pub ports: Vec<u16>,
    /// ... that must not match.
    pub not_ports: Vec<u16>,
    /// Methods.
    pub methods: Vec<String>,
    /// ... that must not match.
    pub not_methods: Vec<String>,
    /// Paths.
    pub paths: Vec<Pattern>,
    /// ... that must not match.
    pub not_paths: Vec<Pattern>,
}

/// A `when` condition, parsed: what it tests, and its values and not-values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// What it tests.
    pub attribute: Attribute,
    /// One must match (none given: no constraint).
    pub values: Values,
    /// None may match.
    pub not_values: Values,
}

/// The attribute a condition tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute {
    /// A request header (lowercase name).
    RequestHeader(String),
    /// The caller's address.
    SourceIp,
    /// The original client's address.
    RemoteIp,
    /// The peer identity's namespace.
    SourceNamespace,
    /// The peer identity.
    SourcePrincipal,
    /// The JWT principal (`iss/sub`).
    RequestPrincipal,
    /// A JWT claim, by path (`aud` for `request.auth.audiences`, `azp` for
    /// `request.auth.presenter`): a string, or a list one of whose strings matches.
    Claim(Vec<String>),
    /// The destination (VIP) address.
    DestinationIp,
    /// The destination (service) port.
    DestinationPort,
}

/// A condition's values, typed by its attribute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Values {
    /// String patterns.
    Patterns(Vec<Pattern>),
    /// Address blocks.
    Cidrs(Vec<Cidr>),
    /// Ports.
    Ports(Vec<u16>),
    /// Identity patterns.
    Principals(Vec<PrincipalPattern>),
    /// Exact names.
    Names(Vec<String>),
}

impl Values {
    /// No values.
    pub fn is_empty(&self) -> bool {
        match self {
            Values::Patterns(v) => v.is_empty(),
            Values::Cidrs(v) => v.is_empty(),
            Values::Ports(v) => v.is_empty(),
            Values::Principals(v) => v.is_empty(),
            Values::Names(v) => v.is_empty(),
        }
    }
}

/// Istio's string pattern: `*` alone, `*` at the start (suffix) or at the end (prefix),
/// or none (exact).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// `*`: any value, even empty (present).
    Any,
    /// Exactly this.
    Exact(String),
    /// Starts with this.
    Prefix(String),
    /// Ends with this.
    Suffix(String),
}

impl Pattern {
    /// Parses an Istio pattern.
    pub fn parse(s: &str) -> Result<Pattern, String> {
        if s.is_empty() {
            return Err("an empty value matches nothing: leave it out".into());
        }
        let p = if s == "*" {
            Pattern::Any
        } else if let Some(rest) = s.strip_prefix('*') {
            Pattern::Suffix(rest.to_owned())
        } else if let Some(rest) = s.strip_suffix('*') {
            Pattern::Prefix(rest.to_owned())
        } else {
            Pattern::Exact(s.to_owned())
        };
        match &p {
            Pattern::Exact(v) | Pattern::Prefix(v) | Pattern::Suffix(v) if v.contains('*') => Err(
                format!("{s:?}: '*' is allowed only alone, at the start or at the end"),
            ),
            _ => Ok(p),
        }
    }

    /// Does `v` match?
    pub fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => v == s,
            Pattern::Prefix(s) => v.starts_with(s.as_str()),
            Pattern::Suffix(s) => v.ends_with(s.as_str()),
        }
    }
}

impl WaypointPolicy {
    /// Does it apply to requests for `service` through waypoint `waypoint` (both of
    /// `namespace`)?
    pub fn applies_to(&self, namespace: &str, service: &str, waypoint: &str) -> bool {
        self.namespace == namespace
            && self.targets.iter().any(|t| match t {
                PolicyTarget::Service(s) => s == service,
                PolicyTarget::Waypoint(w) => w == waypoint,
            })
    }
}

/// What is wrong with `rules`' values alone, which needs no other object to tell, as
/// `rules[i]…: problem; …`: the Kubernetes source refuses an object for it at once and
/// keeps the object's last valid version applied (the model's build would drop the
/// whole policy, which for an ALLOW policy would open what it closes).
pub fn check_rules(rules: &[L7RuleSpec]) -> Result<(), String> {
    let mut p = Problems::default();
    for (r, rule) in rules.iter().enumerate() {
        validate_rule(&mut p, &format!("rules[{r}]"), rule);
    }
    super::joined(p)
}

/// Checks `policies` against the services and waypoints; `taken` holds the names of
/// the namespace's other authorization policies (L4), which share their name space.
pub(super) fn validate(
    p: &mut Problems,
    policies: Vec<WaypointPolicySpec>,
    services: &imbl::OrdMap<NamespacedName, std::sync::Arc<Service>>,
    waypoints: &BTreeMap<NamespacedName, Waypoint>,
    taken: &dyn Fn(&NamespacedName) -> bool,
) -> BTreeMap<NamespacedName, WaypointPolicy> {
    let mut out = BTreeMap::new();
    for pol in policies {
        let place = format!("policies ({}/{}, targetRefs)", pol.namespace, pol.name);
        let before = p.0.len();
        let key = NamespacedName {
            namespace: pol.namespace.clone(),
            name: pol.name.clone(),
        };
        if !super::is_dns_subdomain(&pol.name) {
            p.add(&place, "name must be a DNS name");
        }
        if out.contains_key(&key) || taken(&key) {
            p.add(&place, format!("policy {key} is defined twice"));
        }
        if pol.target_refs.is_empty() {
            p.add(&place, "targetRefs is empty");
        }
        let targets = targets(
            p,
            &place,
            &pol.namespace,
            &pol.target_refs,
            services,
            waypoints,
        );
        let mut rules = Vec::new();
        for (r, rule) in pol.rules.iter().enumerate() {
            if let Some(rule) = validate_rule(p, &format!("{place}.rules[{r}]"), rule) {
                rules.push(rule);
            }
        }
        if p.0.len() > before {
            continue;
        }
        out.insert(
            key,
            WaypointPolicy {
                name: pol.name,
                namespace: pol.namespace,
                targets,
                action: pol.action.unwrap_or(L7Action::Allow),
                rules,
            },
        );
    }
    out
}

/// The targets `refs` name (Services that have a waypoint, or waypoints' Gateways, of
/// `namespace`), each problem reported at `place`.
pub(super) fn targets(
    p: &mut Problems,
    place: &str,
    namespace: &str,
    refs: &[TargetRefSpec],
    services: &imbl::OrdMap<NamespacedName, std::sync::Arc<Service>>,
    waypoints: &BTreeMap<NamespacedName, Waypoint>,
) -> Vec<PolicyTarget> {
    let mut targets = Vec::new();
    for (j, t) in refs.iter().enumerate() {
        let at = format!("{place}.targetRefs[{j}]");
        match (t.group.as_str(), t.kind.as_str()) {
        ("" | "core", "Service") => {
            let svc = NamespacedName {
            namespace: namespace.to_owned(),
            name: t.name.clone(),
            };
            match services.get(&svc) {
            None => p.add(&at, format!("service {svc} is not defined")),
            Some(s) if s.is_waypoint => p.add(
                &at,
                format!("{svc} is a waypoint's own service: target the Gateway (kind: Gateway, group: gateway.networking.k8s.io)"),
            ),
            Some(s) if s.waypoint.is_none() => p.add(
                &at,
                format!(
                "service {svc} has no waypoint, so nothing would enforce this policy's L7 rules: give it one ({} label) or write an L4 policy with a selector",
                super::WAYPOINT_LABEL
                ),
            ),
            Some(s) if !s.waypoint.as_ref().is_some_and(|w| waypoints.contains_key(&NamespacedName {
                namespace: namespace.to_owned(),
                name: w.clone(),
            })) => p.add(
                &at,
                format!(
                "service {svc} has no waypoint (its {} label names {}, which is not defined), so nothing would enforce this policy's L7 rules",
                super::WAYPOINT_LABEL,
                s.waypoint.as_deref().unwrap_or_default()
                ),
            ),
            Some(_) => targets.push(PolicyTarget::Service(t.name.clone())),
            }
        }
        ("gateway.networking.k8s.io", "Gateway") => {
            let wp = NamespacedName {
            namespace: namespace.to_owned(),
            name: t.name.clone(),
            };
            if waypoints.contains_key(&wp) {
            targets.push(PolicyTarget::Waypoint(t.name.clone()));
            } else {
            p.add(&at, format!("waypoint {wp} is not defined"));
            }
        }
        (g, k) => p.add(
            &at,
            format!(
            "{k} (group {g:?}) cannot be targeted: a Service (group \"\") or a waypoint's Gateway (group gateway.networking.k8s.io)"
            ),
        ),
        }
    }
    targets
}

fn each<T>(
    p: &mut Problems,
    at: &str,
    field: &str,
    values: &[String],
    parse: impl Fn(&str) -> Result<T, String>,
) -> Vec<T> {
    let mut out = Vec::new();
    for (k, v) in values.iter().enumerate() {
        match parse(v) {
            Ok(x) => out.push(x),
            Err(e) => p.add(&format!("{at}.{field}[{k}]"), e),
        }
    }
    out
}

fn cidr(s: &str) -> Result<Cidr, String> {
    s.parse().map_err(|e| format!("{s:?}: {e}"))
}

fn port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("port {s:?} is not 1-65535")),
    }
}

fn principal(s: &str) -> Result<PrincipalPattern, String> {
    PrincipalPattern::parse(s)
}

fn method(s: &str) -> Result<String, String> {
    http::Method::from_bytes(s.as_bytes())
        .map(|m| m.as_str().to_owned())
        .map_err(|_| format!("{s:?} is not an HTTP method"))
}

fn path(s: &str) -> Result<Pattern, String> {
    if s.contains('{') {
        return Err(format!("{s:?}: path templates are not supported"));
    }
    if s != "*" && !s.starts_with('/') && !s.starts_with('*') {
        return Err(format!("{s:?}: a path starts with '/'"));
    }
    Pattern::parse(s)
}

fn host(s: &str) -> Result<Pattern, String> {
    Pattern::parse(&s.to_ascii_lowercase())
}

fn name(s: &str) -> Result<String, String> {
    if super::is_dns_label(s) {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a namespace name"))
    }
}

fn validate_rule(p: &mut Problems, at: &str, r: &L7RuleSpec) -> Option<L7Rule> {
    let before = p.0.len();
    let from = r
        .from
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let at = format!("{at}.from[{k}]");
            Source {
                principals: each(p, &at, "principals", &s.principals, principal),
                not_principals: each(p, &at, "notPrincipals", &s.not_principals, principal),
                request_principals: each(
                    p,
                    &at,
                    "requestPrincipals",
                    &s.request_principals,
                    Pattern::parse,
                ),
                not_request_principals: each(
                    p,
                    &at,
                    "notRequestPrincipals",
                    &s.not_request_principals,
                    Pattern::parse,
                ),
                namespaces: each(p, &at, "namespaces", &s.namespaces, name),
                not_namespaces: each(p, &at, "notNamespaces", &s.not_namespaces, name),
                ip_blocks: each(p, &at, "ipBlocks", &s.ip_blocks, cidr),
                not_ip_blocks: each(p, &at, "notIpBlocks", &s.not_ip_blocks, cidr),
                remote_ip_blocks: each(p, &at, "remoteIpBlocks", &s.remote_ip_blocks, cidr),
                not_remote_ip_blocks: each(
                    p,
                    &at,
                    "notRemoteIpBlocks",
                    &s.not_remote_ip_blocks,
                    cidr,
                ),
            }
        })
        .collect();
    let to =
        r.to.iter()
            .enumerate()
            .map(|(k, o)| {
                let at = format!("{at}.to[{k}]");
                Operation {
                    hosts: each(p, &at, "hosts", &o.hosts, host),
                    not_hosts: each(p, &at, "notHosts", &o.not_hosts, host),
                    ports: each(p, &at, "ports", &o.ports, port),
                    not_ports: each(p, &at, "notPorts", &o.not_ports, port),
                    methods: each(p, &at, "methods", &o.methods, method),
                    not_methods: each(p, &at, "notMethods", &o.not_methods, method),
                    paths: each(p, &at, "paths", &o.paths, path),
                    not_paths: each(p, &at, "notPaths", &o.not_paths, path),
                }
            })
            .collect();
    let mut when = Vec::new();
    for (k, c) in r.when.iter().enumerate() {
        let at = format!("{at}.when[{k}]");
        let Some(attribute) = attribute(p, &at, &c.key) else {
            continue;
        };
        if c.values.is_empty() && c.not_values.is_empty() {
            p.add(&at, "needs values or notValues");
            continue;
        }
        let typed = |p: &mut Problems, field: &str, v: &[String]| match &attribute {
            Attribute::SourceIp | Attribute::RemoteIp | Attribute::DestinationIp => {
                Values::Cidrs(each(p, &at, field, v, cidr))
            }
            Attribute::DestinationPort => Values::Ports(each(p, &at, field, v, port)),
            Attribute::SourcePrincipal => Values::Principals(each(p, &at, field, v, principal)),
            Attribute::SourceNamespace => Values::Names(each(p, &at, field, v, name)),
            Attribute::RequestHeader(_) | Attribute::RequestPrincipal | Attribute::Claim(_) => {
                Values::Patterns(each(p, &at, field, v, Pattern::parse))
            }
        };
        let values = typed(p, "values", &c.values);
        let not_values = typed(p, "notValues", &c.not_values);
        when.push(Condition {
            attribute,
            values,
            not_values,
        });
    }
    (p.0.len() == before).then_some(L7Rule { from, to, when })
}

/// A `when` key, as Istio spells it.
fn attribute(p: &mut Problems, at: &str, key: &str) -> Option<Attribute> {
    // `[a][b]...` after a prefix.
    let brackets = |rest: &str| -> Option<Vec<String>> {
        let mut out = Vec::new();
        let mut s = rest;
        while !s.is_empty() {
            let inner = s.strip_prefix('[')?;
            let (seg, tail) = inner.split_once(']')?;
            if seg.is_empty() {
                return None;
            }
            out.push(seg.to_owned());
            s = tail;
        }
        (!out.is_empty()).then_some(out)
    };
    let a = match key {
        "source.ip" => Attribute::SourceIp,
        "remote.ip" => Attribute::RemoteIp,
        "source.namespace" => Attribute::SourceNamespace,
        "source.principal" => Attribute::SourcePrincipal,
        "request.auth.principal" => Attribute::RequestPrincipal,
        "request.auth.audiences" => Attribute::Claim(vec!["aud".into()]),
        "request.auth.presenter" => Attribute::Claim(vec!["azp".into()]),
        "destination.ip" => Attribute::DestinationIp,
        "destination.port" => Attribute::DestinationPort,
        k if k.starts_with("request.headers") => {
            match brackets(&k["request.headers".len()..]).as_deref() {
                Some([name]) if http::HeaderName::from_bytes(name.as_bytes()).is_ok() => {
                    Attribute::RequestHeader(name.to_ascii_lowercase())
                }
                _ => {
                    p.add(
                        at,
                        format!("key {k:?}: write request.headers[<header name>]"),
                    );
                    return None;
                }
            }
        }
        k if k.starts_with("request.auth.claims") => {
            match brackets(&k["request.auth.claims".len()..]) {
                Some(path) => Attribute::Claim(path),
                None => {
                    p.add(
                        at,
                        format!("key {k:?}: write request.auth.claims[<claim>] (or [a][b] for a nested one)"),
                    );
                    return None;
                }
            }
        }
        k => {
            p.add(
                at,
                format!(
                    "key {k:?} is not supported (request.headers[..], source.ip, remote.ip, source.namespace, source.principal, request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[..], destination.ip, destination.port)"
                ),
            );
            return None;
        }
    };
    Some(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_istios() {
        assert_eq!(Pattern::parse("*").unwrap(), Pattern::Any);
        assert_eq!(
            Pattern::parse("/a/*").unwrap(),
            Pattern::Prefix("/a/".into())
        );
        assert_eq!(
            Pattern::parse("*.html").unwrap(),
            Pattern::Suffix(".html".into())
        );
        assert_eq!(Pattern::parse("/x").unwrap(), Pattern::Exact("/x".into()));
        assert!(Pattern::parse("/a/*/b").is_err());
        assert!(Pattern::parse("**").is_err());
        assert!(Pattern::parse("").is_err());
        assert!(Pattern::Prefix("/a/".into()).matches("/a/b"));
        assert!(!Pattern::Prefix("/a/".into()).matches("/a"));
    }

    #[test]
    fn condition_keys_are_parsed_or_explained() {
        let mut p = Problems::default();
        assert_eq!(
            attribute(&mut p, "x", "request.headers[X-Team]"),
            Some(Attribute::RequestHeader("x-team".into()))
        );
        assert_eq!(
            attribute(&mut p, "x", "request.auth.claims[groups]"),
            Some(Attribute::Claim(vec!["groups".into()]))
        );
        assert_eq!(
            attribute(&mut p, "x", "request.auth.claims[realm][role]"),
            Some(Attribute::Claim(vec!["realm".into(), "role".into()]))
        );
        assert!(p.0.is_empty());
        for bad in [
            "request.headers",
            "request.headers[]",
            "request.auth.claims",
            "request.auth.claims[a",
            "connection.sni",
            "experimental.envoy.filters.network.mysql_proxy[db.table]",
        ] {
            assert_eq!(attribute(&mut p, "x", bad), None, "{bad}");
        }
        assert_eq!(p.0.len(), 6);
    }

    #[test]
    fn rules_report_every_bad_value_with_its_place() {
        let mut p = Problems::default();
        let r = L7RuleSpec {
            from: vec![SourceSpec {
                principals: vec!["spiffe://x".into()],
                ip_blocks: vec!["10.0.0.0/33".into()],
                ..Default::default()
            }],
            to: vec![OperationSpec {
                methods: vec!["G ET".into()],
                paths: vec!["/a/{*}".into(), "noslash".into()],
                ports: vec!["http".into()],
                ..Default::default()
            }],
            when: vec![ConditionSpec {
                key: "destination.port".into(),
                values: vec!["x".into()],
                ..Default::default()
            }],
        };
        assert_eq!(validate_rule(&mut p, "r", &r), None);
        let places: Vec<&str> = p.0.iter().map(|x| x.place.as_str()).collect();
        assert_eq!(
            places,
            [
                "r.from[0].principals[0]",
                "r.from[0].ipBlocks[0]",
                "r.to[0].ports[0]",
                "r.to[0].methods[0]",
                "r.to[0].paths[0]",
                "r.to[0].paths[1]",
                "r.when[0].values[0]",
            ]
        );
    }
}
