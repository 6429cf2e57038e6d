//! Authorization policies with Istio `AuthorizationPolicy` semantics (the L4 subset), and
//! their evaluator.
//!
//! One set of types serves every part of Ambit: the control plane validates and
//! translates them, the node agent enforces them on every inbound connection, the
//! waypoint will enforce them too. The wire form (`ambit.v1.Authorization`) converts
//! to and from these types in `ambit-xds`.
//!
//! The policies that apply to a destination workload are those of its namespace that
//! have no selector or whose selector matches its labels. Then, in order:
//! 1. a matching DENY policy denies;
//! 2. with no ALLOW policy at all, the connection is allowed;
//! 3. a matching ALLOW policy allows;
//! 4. otherwise it is denied.
//!
//! A policy matches if any of its rules does (a policy without rules matches nothing);
//! a rule matches if any of its `from` and any of its `to` entries match (an absent
//! list matches anything); an entry matches if every field it sets matches and none of
//! its negated fields does. Principals and namespaces come from the verified peer
//! identity: a plaintext connection cannot match them, nor satisfy their negations.

pub mod limiter;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ambit_identity::Identity;
pub use ambit_mesh::cidr::Cidr;
use serde::Serialize;

/// Kubernetes-style labels.
pub type Labels = BTreeMap<String, String>;

/// What a matching policy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    /// Allow matching connections (and, once any ALLOW applies, only those).
    Allow,
    /// Deny matching connections, whatever ALLOW policies say.
    Deny,
    /// Ambit's extension: admit matching connections (all, without rules) at most at
    /// this rate per source identity (per source IP for plaintext); never allows or
    /// denies otherwise.
    RateLimit(ConnectionRate),
}

/// A connection rate: a token bucket of `burst` that gains `connections` every
/// `per_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ConnectionRate {
    /// Connections per period.
    pub connections: u32,
    /// The period, in seconds.
    pub per_seconds: u32,
    /// The bucket's size.
    pub burst: u32,
}

/// Why a written connection rate is not one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateError {
    /// The unit is not `Second`, `Minute` or `Hour`.
    Unit(String),
    /// `connections` or `burst` is 0.
    Zero,
}

impl fmt::Display for RateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateError::Unit(u) => write!(f, "{u:?} is not Second, Minute or Hour"),
            RateError::Zero => f.write_str("connections and burst must be at least 1"),
        }
    }
}

impl ConnectionRate {
    /// `connections` per `unit` (`Second`, `Minute` or `Hour`, as Gateway API writes
    /// rate units), in a bucket of `burst` (default: `connections`): the one reading of
    /// a written rate that the mesh file and the Kubernetes source share.
    pub fn new(connections: u32, unit: &str, burst: Option<u32>) -> Result<Self, RateError> {
        let per_seconds = match unit {
            "Second" => 1,
            "Minute" => 60,
            "Hour" => 3600,
            u => return Err(RateError::Unit(u.to_owned())),
        };
        let burst = burst.unwrap_or(connections);
        if connections == 0 || burst == 0 {
            return Err(RateError::Zero);
        }
        Ok(Self {
            connections,
            per_seconds,
            burst,
        })
    }
}

/// An authorization policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Authorization {
    /// Its name, unique in its namespace.
    pub name: String,
    /// It applies to workloads of this namespace only.
    pub namespace: String,
    /// What a match does.
    pub action: Action,
    /// The workloads of the namespace it applies to (all of them if `None`). A
    /// selector with no labels selects nothing.
    pub selector: Option<Labels>,
    /// It matches a connection if any rule does; no rules match nothing.
    pub rules: Vec<Rule>,
}

/// Matches if (no `from` or any of them matches) and (no `to` or any of them matches).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Sources; any may match.
    pub from: Vec<Source>,
    /// Destinations; any may match.
    pub to: Vec<Destination>,
}

/// A source: every non-empty field must match, and no `not_*` field may.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Source {
    /// Peer principals (identities without the scheme), possibly with wildcards.
    pub principals: Vec<PrincipalPattern>,
    /// Principals that must not match.
    pub not_principals: Vec<PrincipalPattern>,
    /// Namespaces of the peer identity.
    pub namespaces: Vec<String>,
    /// Namespaces the peer identity must not be in.
    pub not_namespaces: Vec<String>,
    /// Source address blocks.
    pub ip_blocks: Vec<Cidr>,
    /// Source address blocks that must not contain the source.
    pub not_ip_blocks: Vec<Cidr>,
}

/// A destination: every non-empty field must match, and no `not_*` field may.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Destination {
    /// Destination ports.
    pub ports: Vec<u16>,
    /// Destination ports that must not match.
    pub not_ports: Vec<u16>,
}

/// A principal in a policy: `*`, `*suffix`, `prefix*` or an exact principal
/// (`cluster.local/ns/shop/sa/web`: an identity without `spiffe://`, as Istio writes it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PrincipalPattern {
    /// `*`: any authenticated peer.
    Any,
    /// The principal exactly.
    Exact(String),
    /// Principals starting with this (`prefix*`).
    Prefix(String),
    /// Principals ending with this (`*suffix`).
    Suffix(String),
}

impl PrincipalPattern {
    /// Parses a pattern; says what is wrong with a bad one.
    pub fn parse(p: &str) -> Result<Self, String> {
        if p.is_empty() {
            return Err("empty principal".into());
        }
        if p.starts_with(ambit_identity::SCHEME) {
            return Err(format!(
                "principal {p:?}: write it without the spiffe:// scheme"
            ));
        }
        let pattern = if p == "*" {
            Self::Any
        } else if let Some(s) = p.strip_prefix('*') {
            Self::Suffix(s.to_owned())
        } else if let Some(s) = p.strip_suffix('*') {
            Self::Prefix(s.to_owned())
        } else {
            Self::Exact(p.to_owned())
        };
        match &pattern {
            Self::Exact(s) | Self::Prefix(s) | Self::Suffix(s) if s.contains('*') => Err(format!(
                "principal {p:?}: '*' is allowed only at the start or the end"
            )),
            _ => Ok(pattern),
        }
    }

    /// Does `principal` (an identity without the scheme) match?
    pub fn matches(&self, principal: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(s) => principal == s,
            Self::Prefix(s) => principal.starts_with(s.as_str()),
            Self::Suffix(s) => principal.ends_with(s.as_str()),
        }
    }
}

impl fmt::Display for PrincipalPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(s) => f.write_str(s),
            Self::Prefix(s) => write!(f, "{s}*"),
            Self::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

impl std::str::FromStr for PrincipalPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

/// As the pattern's text.
impl Serialize for PrincipalPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What is known about a connection when it is authorized.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    /// The peer's identity, proven by mutual TLS; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    /// The peer's address.
    pub src_ip: IpAddr,
    /// The port the peer asked for.
    pub dst_port: u16,
}

/// The workload a connection is for, as far as policy targeting goes.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its labels (for policy selectors).
    pub labels: &'a Labels,
}

/// A verdict, naming the policy that decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Allowed, by this ALLOW policy (none: no ALLOW policy applies).
    Allow {
        /// The ALLOW policy that matched.
        by: Option<&'a Authorization>,
    },
    /// Denied.
    Deny {
        /// Why.
        reason: DenyReason<'a>,
    },
}

/// Why a connection was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason<'a> {
    /// This DENY policy matched.
    Policy(&'a Authorization),
    /// ALLOW policies apply and none matched.
    NoAllowMatched,
}

impl fmt::Display for DenyReason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Policy(p) => write!(f, "denied by policy {}/{}", p.namespace, p.name),
            Self::NoAllowMatched => f.write_str("no ALLOW policy matches"),
        }
    }
}

impl Decision<'_> {
    /// Was it allowed?
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

impl Authorization {
    /// Does this policy apply to `target`?
    pub fn applies_to(&self, target: Target<'_>) -> bool {
        self.namespace == target.namespace
            && match &self.selector {
                None => true,
                Some(sel) => {
                    !sel.is_empty() && sel.iter().all(|(k, v)| target.labels.get(k) == Some(v))
                }
            }
    }

    /// Does this policy match `conn` (whatever its action)?
    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(conn))
    }
}

impl Rule {
    /// Does the rule match `conn`?
    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(conn)))
            && (self.to.is_empty() || self.to.iter().any(|d| d.matches(conn.dst_port)))
    }
}

impl Source {
    /// Does the source entry match `conn`?
    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        let principal = conn.src_identity.map(Identity::principal);
        let namespace = conn.src_identity.map(Identity::namespace);
        let any_principal = |set: &[PrincipalPattern]| {
            principal.is_some_and(|p| set.iter().any(|pat| pat.matches(p)))
        };
        let any_namespace = |set: &[String]| namespace.is_some_and(|n| set.iter().any(|s| s == n));
        (self.principals.is_empty() || any_principal(&self.principals))
            && (self.not_principals.is_empty()
                || (principal.is_some() && !any_principal(&self.not_principals)))
            && (self.namespaces.is_empty() || any_namespace(&self.namespaces))
            && (self.not_namespaces.is_empty()
                || (namespace.is_some() && !any_namespace(&self.not_namespaces)))
            && (self.ip_blocks.is_empty() || self.ip_blocks.iter().any(|c| c.contains(conn.src_ip)))
            && !self.not_ip_blocks.iter().any(|c| c.contains(conn.src_ip))
    }
}

impl Destination {
    /// Does the destination entry match `port`?
    pub fn matches(&self, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port)
    }
}

/// Authorizes `conn` to `target` under `policies` (those that do not apply to `target`
/// are skipped, so passing more than needed is safe).
pub fn authorize<'a>(
    policies: impl IntoIterator<Item = &'a Authorization>,
    target: Target<'_>,
    conn: &Connection<'_>,
) -> Decision<'a> {
    decide(policies.into_iter().filter(|p| p.applies_to(target)), conn)
}

/// The rate limits among `policies` that apply to `target` and limit `conn` (its rules
/// match it, or it has none).
pub fn rate_limits<'a>(
    policies: impl IntoIterator<Item = &'a Authorization>,
    target: Target<'_>,
    conn: &Connection<'_>,
) -> Vec<(&'a Authorization, ConnectionRate)> {
    limits(policies.into_iter().filter(|p| p.applies_to(target)), conn)
}

/// The rate limits among `policies`, all of which apply to `conn`'s destination (as in
/// [`decide`]), that limit `conn`.
pub fn limits<'a>(
    policies: impl IntoIterator<Item = &'a Authorization>,
    conn: &Connection<'_>,
) -> Vec<(&'a Authorization, ConnectionRate)> {
    policies
        .into_iter()
        .filter_map(|p| match p.action {
            Action::RateLimit(r) if p.rules.is_empty() || p.matches(conn) => Some((p, r)),
            _ => None,
        })
        .collect()
}

/// Decides `conn` under `policies`, all of which apply to its destination (a waypoint is
/// sent only the policies that select its pods): a matching DENY denies; otherwise, if
/// any ALLOW applies, one must match.
pub fn decide<'a>(
    policies: impl IntoIterator<Item = &'a Authorization>,
    conn: &Connection<'_>,
) -> Decision<'a> {
    let mut any_allow = false;
    let mut allowed_by = None;
    for p in policies {
        match p.action {
            Action::Deny if p.matches(conn) => {
                return Decision::Deny {
                    reason: DenyReason::Policy(p),
                };
            }
            Action::Deny => {}
            Action::Allow => {
                any_allow = true;
                if allowed_by.is_none() && p.matches(conn) {
                    allowed_by = Some(p);
                }
            }
            Action::RateLimit(_) => {}
        }
    }
    match (any_allow, allowed_by) {
        (false, _) => Decision::Allow { by: None },
        (true, Some(p)) => Decision::Allow { by: Some(p) },
        (true, None) => Decision::Deny {
            reason: DenyReason::NoAllowMatched,
        },
    }
}

#[cfg(test)]
mod tests;
