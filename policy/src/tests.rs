use super::*;

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
        selector: (!selector.is_empty()).then(|| {
            selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        }),
        rules,
    }
}

fn from(s: Source) -> Rule {
    Rule {
        from: vec![s],
        to: vec![],
    }
}

fn to(d: Destination) -> Rule {
    Rule {
        from: vec![],
        to: vec![d],
    }
}

fn src(f: impl FnOnce(&mut Source)) -> Source {
    let mut s = Source::default();
    f(&mut s);
    s
}

fn pats(v: &[&str]) -> Vec<PrincipalPattern> {
    v.iter()
        .map(|p| PrincipalPattern::parse(p).unwrap())
        .collect()
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const LEGACY: &str = "spiffe://cluster.local/ns/legacy/sa/batch";

#[test]
fn allow_deny_table() {
    let allow_frontend = policy(
        "allow-frontend",
        Action::Allow,
        &[("app", "web")],
        vec![from(src(|m| {
            m.principals = pats(&["cluster.local/ns/shop/sa/frontend"])
        }))],
    );
    let deny_legacy = policy(
        "deny-legacy",
        Action::Deny,
        &[],
        vec![from(src(|m| m.namespaces = vec!["legacy".into()]))],
    );
    let allow_port = policy(
        "allow-8080",
        Action::Allow,
        &[],
        vec![to(Destination {
            ports: vec![8080],
            not_ports: vec![],
        })],
    );
    let allow_not_9090 = policy(
        "not-9090",
        Action::Allow,
        &[],
        vec![to(Destination {
            ports: vec![],
            not_ports: vec![9090],
        })],
    );
    let allow_cidr = policy(
        "cidr",
        Action::Allow,
        &[],
        vec![from(src(|m| m.ip_blocks = vec![cidr("10.244.1.0/24")]))],
    );
    let allow_not_cidr = policy(
        "not-cidr",
        Action::Allow,
        &[],
        vec![from(src(|m| m.not_ip_blocks = vec![cidr("10.244.9.0/24")]))],
    );
    let allow_suffix = policy(
        "suffix",
        Action::Allow,
        &[],
        vec![from(src(|m| m.principals = pats(&["*/sa/frontend"])))],
    );
    let allow_prefix = policy(
        "prefix",
        Action::Allow,
        &[],
        vec![from(src(|m| {
            m.principals = pats(&["cluster.local/ns/shop/*"])
        }))],
    );
    let allow_any = policy(
        "any",
        Action::Allow,
        &[],
        vec![from(src(|m| m.principals = pats(&["*"])))],
    );
    let allow_not_ns = policy(
        "not-legacy",
        Action::Allow,
        &[],
        vec![from(src(|m| m.not_namespaces = vec!["legacy".into()]))],
    );
    let deny_not_principal = policy(
        "only-frontend",
        Action::Deny,
        &[],
        vec![from(src(|m| {
            m.not_principals = pats(&["cluster.local/ns/shop/sa/frontend"])
        }))],
    );
    let other_selector = policy(
        "other-app",
        Action::Allow,
        &[("app", "db")],
        vec![from(src(|m| m.namespaces = vec!["nowhere".into()]))],
    );
    let empty_selector = Authorization {
        selector: Some(Labels::new()),
        ..policy("empty-selector", Action::Deny, &[], vec![Rule::default()])
    };
    let no_rules = policy("empty", Action::Allow, &[], vec![]);
    let other_ns = Authorization {
        namespace: "legacy".into(),
        ..policy("other-ns", Action::Deny, &[], vec![Rule::default()])
    };

    let v4 = "10.244.1.10";
    // (description, policies, source identity, source IP, port, allowed?)
    type Case<'a> = (
        &'a str,
        Vec<&'a Authorization>,
        Option<&'a str>,
        &'a str,
        u16,
        bool,
    );
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
            "principal * allows any identity",
            vec![&allow_any],
            Some(LEGACY),
            v4,
            80,
            true,
        ),
        (
            "principal * does not allow plaintext",
            vec![&allow_any],
            None,
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
            "an empty selector selects nothing",
            vec![&empty_selector],
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
    let labels: Labels = [("app".to_string(), "web".to_string())].into();
    let target = Target {
        namespace: "shop",
        labels: &labels,
    };
    for (what, policies, id, ip, port, want) in cases {
        let id = id.map(|s| Identity::parse(s).unwrap());
        let conn = Connection {
            src_identity: id.as_ref(),
            src_ip: ip.parse().unwrap(),
            dst_port: port,
        };
        let d = authorize(policies, target, &conn);
        assert_eq!(d.allowed(), want, "{what}: {d:?}");
    }
}

#[test]
fn decisions_name_the_deciding_policy() {
    let deny = policy("deny-all", Action::Deny, &[], vec![Rule::default()]);
    let allow = policy(
        "allow-80",
        Action::Allow,
        &[],
        vec![to(Destination {
            ports: vec![80],
            not_ports: vec![],
        })],
    );
    let labels = Labels::new();
    let target = Target {
        namespace: "shop",
        labels: &labels,
    };
    let conn = |port| Connection {
        src_identity: None,
        src_ip: "10.0.0.1".parse().unwrap(),
        dst_port: port,
    };
    match authorize([&allow], target, &conn(80)) {
        Decision::Allow { by: Some(p) } => assert_eq!(p.name, "allow-80"),
        d => panic!("{d:?}"),
    }
    let d = authorize([&allow], target, &conn(81));
    let Decision::Deny { reason } = d else {
        panic!("{d:?}")
    };
    assert_eq!(reason.to_string(), "no ALLOW policy matches");
    let d = authorize([&allow, &deny], target, &conn(80));
    let Decision::Deny { reason } = d else {
        panic!("{d:?}")
    };
    assert_eq!(reason.to_string(), "denied by policy shop/deny-all");
}

#[test]
fn principal_patterns_parse_and_print() {
    for p in [
        "*",
        "*/sa/web",
        "cluster.local/ns/a/*",
        "cluster.local/ns/a/sa/b",
    ] {
        assert_eq!(PrincipalPattern::parse(p).unwrap().to_string(), p);
    }
    for (p, want) in [
        ("", "empty"),
        (
            "spiffe://cluster.local/ns/a/sa/b",
            "without the spiffe:// scheme",
        ),
        ("a*b", "only at the start or the end"),
        ("**", "only at the start or the end"),
    ] {
        let e = PrincipalPattern::parse(p).unwrap_err();
        assert!(e.contains(want), "{p}: {e}");
    }
}
