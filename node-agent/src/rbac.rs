//! L4 authorization, evaluated by the destination's agent for every inbound connection.
//!
//! The policies that apply to a destination workload are those of its namespace that
//! are namespace-wide or whose selector matches its labels. Then, in order:
//! 1. a matching DENY policy denies;
//! 2. with no ALLOW policy at all, the connection is allowed;
//! 3. a matching ALLOW policy allows;
//! 4. otherwise it is denied.
//!
//! A policy matches if any of its rules does; a rule matches if any of its `from` and
//! any of its `to` entries match (an absent list matches anything); an entry matches if
//! every field it sets matches and none of its negated fields does.

use std::net::IpAddr;

use crate::store::{Action, Authorization, DestinationMatch, SourceMatch, Workload};

/// What is known about a connection when it is authorized.
#[derive(Clone, Debug)]
pub struct Connection<'a> {
    /// The client's SPIFFE ID (`spiffe://...`), if it presented one (mTLS).
    pub src_identity: Option<&'a str>,
    pub src_ip: IpAddr,
    pub dst_port: u16,
}

/// The verdict, with the policy that decided (for logs and metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow { by: Option<String> },
    Deny { reason: String },
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// Authorizes `conn` to `dst` under `policies` (all policies the agent knows; the ones
/// that do not apply to `dst` are ignored).
pub fn authorize<'a>(
    policies: impl IntoIterator<Item = &'a Authorization>,
    dst: &Workload,
    conn: &Connection<'_>,
) -> Decision {
    let applicable: Vec<&Authorization> =
        policies.into_iter().filter(|p| applies(p, dst)).collect();
    if let Some(p) = applicable
        .iter()
        .find(|p| p.action == Action::Deny && matches(p, conn))
    {
        return Decision::Deny {
            reason: format!("denied by policy {}/{}", p.namespace, p.name),
        };
    }
    let allows: Vec<_> = applicable
        .iter()
        .filter(|p| p.action == Action::Allow)
        .collect();
    if allows.is_empty() {
        return Decision::Allow { by: None };
    }
    match allows.iter().find(|p| matches(p, conn)) {
        Some(p) => Decision::Allow {
            by: Some(format!("{}/{}", p.namespace, p.name)),
        },
        None => Decision::Deny {
            reason: "no ALLOW policy matches".into(),
        },
    }
}

fn applies(p: &Authorization, dst: &Workload) -> bool {
    p.namespace == dst.namespace
        && (p.namespace_wide
            || (!p.selector.is_empty()
                && p.selector.iter().all(|(k, v)| dst.labels.get(k) == Some(v))))
}

fn matches(p: &Authorization, conn: &Connection<'_>) -> bool {
    p.rules.iter().any(|r| {
        (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, conn)))
            && (r.to.is_empty() || r.to.iter().any(|d| destination_matches(d, conn.dst_port)))
    })
}

fn source_matches(s: &SourceMatch, conn: &Connection<'_>) -> bool {
    // Principals and namespaces come from the verified identity; without one (plaintext)
    // a rule that needs them cannot match, and a negation of them cannot be satisfied.
    let principal = conn
        .src_identity
        .and_then(|id| id.strip_prefix("spiffe://"));
    let namespace = principal.and_then(namespace_of);
    let any = |set: &[String], v: Option<&str>, f: fn(&str, &str) -> bool| {
        v.is_some_and(|v| set.iter().any(|p| f(p, v)))
    };
    let eq = |a: &str, b: &str| a == b;
    (s.principals.is_empty() || any(&s.principals, principal, principal_matches))
        && (s.not_principals.is_empty()
            || (principal.is_some() && !any(&s.not_principals, principal, principal_matches)))
        && (s.namespaces.is_empty() || any(&s.namespaces, namespace, eq))
        && (s.not_namespaces.is_empty()
            || (namespace.is_some() && !any(&s.not_namespaces, namespace, eq)))
        && (s.ip_blocks.is_empty() || s.ip_blocks.iter().any(|c| c.contains(conn.src_ip)))
        && !s.not_ip_blocks.iter().any(|c| c.contains(conn.src_ip))
}

fn destination_matches(d: &DestinationMatch, port: u16) -> bool {
    (d.ports.is_empty() || d.ports.contains(&port)) && !d.not_ports.contains(&port)
}

/// `td/ns/<ns>/sa/<sa>` → `<ns>`.
fn namespace_of(principal: &str) -> Option<&str> {
    let mut parts = principal.split('/');
    let (_td, ns_kw, ns) = (parts.next()?, parts.next()?, parts.next()?);
    (ns_kw == "ns").then_some(ns)
}

/// `*` alone, `*suffix`, `prefix*`, or exact.
fn principal_matches(pattern: &str, principal: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        principal.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        principal.starts_with(prefix)
    } else {
        pattern == principal
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::Rule;

    fn web() -> Workload {
        Workload {
            uid: "shop/web-0".into(),
            name: "web-0".into(),
            namespace: "shop".into(),
            node: "n1".into(),
            service_account: "web".into(),
            ips: vec!["10.244.2.10".parse().unwrap()],
            enrolled: true,
            waypoint: None,
            identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            mtls: Default::default(),
        }
    }

    fn policy(
        name: &str,
        action: Action,
        selector: &[(&str, &str)],
        rules: Vec<Rule>,
    ) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: "shop".into(),
            action,
            namespace_wide: selector.is_empty(),
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            rules,
        }
    }

    fn from(s: SourceMatch) -> Rule {
        Rule {
            from: vec![s],
            to: vec![],
        }
    }

    fn cidr(s: &str) -> ambit_mesh::cidr::Cidr {
        s.parse().unwrap()
    }

    const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
    const LEGACY: &str = "spiffe://cluster.local/ns/legacy/sa/batch";

    /// (description, policies, source identity, source IP, port, allowed?)
    type Case<'a> = (
        &'a str,
        Vec<&'a Authorization>,
        Option<&'a str>,
        &'a str,
        u16,
        bool,
    );

    #[test]
    fn allow_deny_table() {
        let s = |f: fn(&mut SourceMatch)| {
            let mut m = SourceMatch::default();
            f(&mut m);
            m
        };
        let allow_frontend = policy(
            "allow-frontend",
            Action::Allow,
            &[("app", "web")],
            vec![from(s(|m| {
                m.principals = vec!["cluster.local/ns/shop/sa/frontend".into()]
            }))],
        );
        let deny_legacy = policy(
            "deny-legacy",
            Action::Deny,
            &[],
            vec![from(s(|m| m.namespaces = vec!["legacy".into()]))],
        );
        let allow_port = policy(
            "allow-8080",
            Action::Allow,
            &[],
            vec![Rule {
                from: vec![],
                to: vec![DestinationMatch {
                    ports: vec![8080],
                    not_ports: vec![],
                }],
            }],
        );
        let allow_not_9090 = policy(
            "not-9090",
            Action::Allow,
            &[],
            vec![Rule {
                from: vec![],
                to: vec![DestinationMatch {
                    ports: vec![],
                    not_ports: vec![9090],
                }],
            }],
        );
        let allow_cidr = policy(
            "cidr",
            Action::Allow,
            &[],
            vec![from(s(|m| m.ip_blocks = vec![cidr("10.244.1.0/24")]))],
        );
        let allow_not_cidr = policy(
            "not-cidr",
            Action::Allow,
            &[],
            vec![from(s(|m| m.not_ip_blocks = vec![cidr("10.244.9.0/24")]))],
        );
        let allow_suffix = policy(
            "suffix",
            Action::Allow,
            &[],
            vec![from(s(|m| m.principals = vec!["*/sa/frontend".into()]))],
        );
        let allow_prefix = policy(
            "prefix",
            Action::Allow,
            &[],
            vec![from(s(|m| {
                m.principals = vec!["cluster.local/ns/shop/*".into()]
            }))],
        );
        let allow_not_ns = policy(
            "not-legacy",
            Action::Allow,
            &[],
            vec![from(s(|m| m.not_namespaces = vec!["legacy".into()]))],
        );
        let deny_not_principal = policy(
            "only-frontend",
            Action::Deny,
            &[],
            vec![from(s(|m| {
                m.not_principals = vec!["cluster.local/ns/shop/sa/frontend".into()]
            }))],
        );
        let other_selector = policy(
            "other-app",
            Action::Allow,
            &[("app", "db")],
            vec![from(s(|m| m.namespaces = vec!["nowhere".into()]))],
        );
        let no_rules = policy("empty", Action::Allow, &[], vec![]);
        let other_ns = Authorization {
            namespace: "legacy".into(),
            ..policy("other-ns", Action::Deny, &[], vec![Rule::default()])
        };

        let v4 = "10.244.1.10";
        let cases: Vec<Case> = vec![
            ("no policies: allow", vec![], Some(FRONTEND), v4, 8080, true),
            (
                "ALLOW by principal: frontend allowed",
                vec![&allow_frontend],
                Some(FRONTEND),
                v4,
                8080,
                true,
            ),
            (
                "ALLOW by principal: legacy denied",
                vec![&allow_frontend],
                Some(LEGACY),
                v4,
                8080,
                false,
            ),
            (
                "ALLOW by principal: plaintext denied",
                vec![&allow_frontend],
                None,
                v4,
                8080,
                false,
            ),
            (
                "DENY beats ALLOW",
                vec![&allow_port, &deny_legacy],
                Some(LEGACY),
                v4,
                8080,
                false,
            ),
            (
                "DENY of another namespace's source does not hit frontend",
                vec![&deny_legacy],
                Some(FRONTEND),
                v4,
                8080,
                true,
            ),
            (
                "ALLOW by port: 8080 allowed",
                vec![&allow_port],
                Some(LEGACY),
                v4,
                8080,
                true,
            ),
            (
                "ALLOW by port: 9000 denied",
                vec![&allow_port],
                Some(LEGACY),
                v4,
                9000,
                false,
            ),
            (
                "notPorts: 9090 denied",
                vec![&allow_not_9090],
                Some(FRONTEND),
                v4,
                9090,
                false,
            ),
            (
                "notPorts: 80 allowed",
                vec![&allow_not_9090],
                Some(FRONTEND),
                v4,
                80,
                true,
            ),
            (
                "ipBlocks: inside allowed (even plaintext)",
                vec![&allow_cidr],
                None,
                v4,
                80,
                true,
            ),
            (
                "ipBlocks: outside denied",
                vec![&allow_cidr],
                None,
                "10.244.2.11",
                80,
                false,
            ),
            (
                "ipBlocks: v4-mapped source matches",
                vec![&allow_cidr],
                None,
                "::ffff:10.244.1.10",
                80,
                true,
            ),
            (
                "notIpBlocks: inside denied",
                vec![&allow_not_cidr],
                None,
                "10.244.9.9",
                80,
                false,
            ),
            (
                "notIpBlocks: outside allowed",
                vec![&allow_not_cidr],
                None,
                v4,
                80,
                true,
            ),
            (
                "principal suffix wildcard",
                vec![&allow_suffix],
                Some(FRONTEND),
                v4,
                80,
                true,
            ),
            (
                "principal suffix wildcard, other sa",
                vec![&allow_suffix],
                Some(LEGACY),
                v4,
                80,
                false,
            ),
            (
                "principal prefix wildcard",
                vec![&allow_prefix],
                Some(FRONTEND),
                v4,
                80,
                true,
            ),
            (
                "principal prefix wildcard, other ns",
                vec![&allow_prefix],
                Some(LEGACY),
                v4,
                80,
                false,
            ),
            (
                "notNamespaces: legacy denied",
                vec![&allow_not_ns],
                Some(LEGACY),
                v4,
                80,
                false,
            ),
            (
                "notNamespaces: shop allowed",
                vec![&allow_not_ns],
                Some(FRONTEND),
                v4,
                80,
                true,
            ),
            (
                "notNamespaces cannot be met in plaintext",
                vec![&allow_not_ns],
                None,
                v4,
                80,
                false,
            ),
            (
                "DENY notPrincipals: others denied",
                vec![&deny_not_principal],
                Some(LEGACY),
                v4,
                80,
                false,
            ),
            (
                "DENY notPrincipals: frontend passes",
                vec![&deny_not_principal],
                Some(FRONTEND),
                v4,
                80,
                true,
            ),
            (
                "a policy selecting other workloads does not apply",
                vec![&other_selector],
                Some(LEGACY),
                v4,
                80,
                true,
            ),
            (
                "an ALLOW with no rules matches nothing",
                vec![&no_rules],
                Some(FRONTEND),
                v4,
                80,
                false,
            ),
            (
                "another namespace's DENY does not apply",
                vec![&other_ns],
                Some(FRONTEND),
                v4,
                80,
                true,
            ),
        ];
        let dst = web();
        for (what, policies, id, ip, port, want) in cases {
            let conn = Connection {
                src_identity: id,
                src_ip: ip.parse().unwrap(),
                dst_port: port,
            };
            let d = authorize(policies, &dst, &conn);
            assert_eq!(d.allowed(), want, "{what}: {d:?}");
        }
    }
}
