//! L7 authorization at the waypoint: Istio AuthorizationPolicies with `targetRefs`, from
//! the mesh file through the control plane's translator (Envoy RBAC filters) into the
//! waypoint, judged against a table of callers and requests, each with its expected
//! answer. The same policies, fed to a stock Envoy, are checked in
//! `envoy_cross_check_authz.rs`.

mod common;

use common::*;

const MESH: &str = r#"
namespaces: [{name: shop}, {name: lab}, {name: legacy}]
nodes: [{name: node-1}]
waypoints: [{name: wp, namespace: shop}]
workloads:
  - {name: wp-0, namespace: shop, node: node-1, serviceAccount: wp, ips: [10.244.1.20],
     labels: {gateway.networking.k8s.io/gateway-name: wp}}
  - {name: api-0, namespace: shop, node: node-1, ips: [10.244.2.40], labels: {app: api}}
  - {name: other-0, namespace: shop, node: node-1, ips: [10.244.2.41], labels: {app: other}}
  - {name: tcp-0, namespace: shop, node: node-1, ips: [10.244.2.42], labels: {app: tcp}}
services:
  - {name: api, namespace: shop, vips: [10.96.3.10], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: api}, labels: {ambit.dev/waypoint: wp}}
  - {name: other, namespace: shop, vips: [10.96.3.11], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: other}, labels: {ambit.dev/waypoint: wp}}
  - {name: store, namespace: shop, vips: [10.96.3.12], ports: [{name: tcp, port: 9000, targetPort: 8080}],
     selector: {app: tcp}, labels: {ambit.dev/waypoint: wp}}
policies:
  # Only ops may reach /admin (DENY beats every ALLOW).
  - name: deny-admin
    namespace: shop
    targetRefs: [{kind: Service, name: api}]
    action: DENY
    rules:
      - from: [{notPrincipals: [cluster.local/ns/shop/sa/ops]}]
        to: [{paths: ["/admin/*", /admin]}]
  # Anyone of the namespace may read.
  - name: allow-reads
    namespace: shop
    targetRefs: [{kind: Service, name: api}]
    action: ALLOW
    rules:
      - from: [{namespaces: [shop]}]
        to: [{methods: [GET, HEAD]}]
  # Only the writer writes, and only items.
  - name: allow-writes
    namespace: shop
    targetRefs: [{kind: Service, name: api}]
    action: ALLOW
    rules:
      - from: [{principals: [cluster.local/ns/shop/sa/writer]}]
        to: [{methods: [POST], paths: [/items, "/items/*"]}]
  # Partners, from their block and with a key.
  - name: allow-partners
    namespace: shop
    targetRefs: [{kind: Service, name: api}]
    action: ALLOW
    rules:
      - from: [{ipBlocks: [10.244.9.0/24]}]
        when:
          - {key: "request.headers[x-api-key]", values: ["k-*"], notValues: [k-revoked]}
  # Robots by their service account in any namespace, on internal hosts.
  - name: allow-robots
    namespace: shop
    targetRefs: [{kind: Service, name: api}]
    action: ALLOW
    rules:
      - from: [{principals: ["*/sa/robot"]}]
        to: [{hosts: ["*.internal.example"]}]
  # Every delete is audited (and allowed or not by the rest).
  - name: audit-deletes
    namespace: shop
    targetRefs: [{kind: Service, name: api}]
    action: AUDIT
    rules:
      - to: [{methods: [DELETE]}]
  # The legacy namespace is shut out of everything the waypoint serves.
  - name: deny-legacy
    namespace: shop
    targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]
    action: DENY
    rules:
      - from: [{namespaces: [legacy]}]
  # The TCP store: only the writer (a rule needing HTTP matches nothing at L4).
  - name: allow-store
    namespace: shop
    targetRefs: [{kind: Service, name: store}]
    action: ALLOW
    rules:
      - from: [{principals: [cluster.local/ns/shop/sa/writer]}]
      - from: [{namespaces: [shop]}]
        to: [{methods: [GET]}]
"#;

const READER: (&str, &str) = ("spiffe://cluster.local/ns/shop/sa/reader", "10.244.1.10");
const WRITER: (&str, &str) = ("spiffe://cluster.local/ns/shop/sa/writer", "10.244.1.11");
const OPS: (&str, &str) = ("spiffe://cluster.local/ns/shop/sa/ops", "10.244.1.12");
const PARTNER: (&str, &str) = ("spiffe://cluster.local/ns/lab/sa/tool", "10.244.9.5");
const LEGACY: (&str, &str) = ("spiffe://cluster.local/ns/legacy/sa/old", "10.244.9.6");
const ROBOT: (&str, &str) = ("spiffe://cluster.local/ns/lab/sa/robot", "10.244.1.14");

/// (caller, method, host, path, headers, expected status)
type Case = (
    (&'static str, &'static str),
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    u16,
);

const API: &str = "api.shop.svc.cluster.local";

/// The table: every policy's effect, for and against.
const CASES: &[Case] = &[
    (READER, "GET", API, "/items", &[], 200),
    (READER, "HEAD", API, "/items", &[], 200),
    (READER, "POST", API, "/items", &[], 403),
    (READER, "GET", API, "/admin", &[], 403),
    (READER, "GET", API, "/admin/users", &[], 403),
    (READER, "GET", API, "/administrator", &[], 200),
    (OPS, "GET", API, "/admin/users", &[], 200),
    (OPS, "POST", API, "/admin/users", &[], 403),
    (WRITER, "POST", API, "/items", &[], 200),
    (WRITER, "POST", API, "/items/7", &[], 200),
    (WRITER, "POST", API, "/items?x=1", &[], 200),
    (WRITER, "POST", API, "/orders", &[], 403),
    (WRITER, "GET", API, "/items", &[], 200),
    (WRITER, "GET", API, "/admin", &[], 403),
    (PARTNER, "GET", API, "/items", &[], 403),
    (
        PARTNER,
        "GET",
        API,
        "/items",
        &[("x-api-key", "k-123")],
        200,
    ),
    (
        PARTNER,
        "POST",
        API,
        "/items",
        &[("x-api-key", "k-123")],
        200,
    ),
    (
        PARTNER,
        "GET",
        API,
        "/items",
        &[("x-api-key", "k-revoked")],
        403,
    ),
    (PARTNER, "GET", API, "/items", &[("x-api-key", "nope")], 403),
    (
        PARTNER,
        "GET",
        API,
        "/admin",
        &[("x-api-key", "k-123")],
        403,
    ),
    (LEGACY, "GET", API, "/items", &[("x-api-key", "k-123")], 403),
    (ROBOT, "GET", "a.internal.example", "/items", &[], 200),
    (ROBOT, "GET", "A.Internal.Example", "/items", &[], 200),
    (ROBOT, "GET", "a.internal.example:8080", "/items", &[], 200),
    (ROBOT, "GET", "a.example", "/items", &[], 403),
    (READER, "DELETE", API, "/items/7", &[], 403),
    (
        READER,
        "GET",
        "other.shop.svc.cluster.local",
        "/anything",
        &[],
        200,
    ),
    (
        PARTNER,
        "GET",
        "other.shop.svc.cluster.local",
        "/anything",
        &[],
        200,
    ),
    (
        LEGACY,
        "GET",
        "other.shop.svc.cluster.local",
        "/anything",
        &[],
        403,
    ),
];

/// Which service's listener a case's host is for.
fn vip_of(host: &str) -> &'static str {
    if host.starts_with("other.") {
        "10.96.3.11:80"
    } else {
        "10.96.3.10:80"
    }
}

#[tokio::test]
async fn waypoint_authorizes_requests_as_istio_authorization_policies_say() {
    let wp = TestWaypoint::start().await;
    let api = Backend::start("api").await;
    let other = Backend::start("other").await;
    wp.map("10.244.2.40:8080", api.addr);
    wp.map("10.244.2.41:8080", other.addr);
    wp.apply(&model(MESH)).unwrap();

    let mut wrong = Vec::new();
    for (caller, method, host, path, headers, want) in CASES {
        let mut c = wp.http1_as(caller.0, caller.1, vip_of(host)).await;
        let a = send1(&mut c, req(method, host, path, headers)).await;
        if a.status != *want {
            wrong.push(format!(
                "{} {method} {host}{path} {headers:?}: {} (want {want}) {}",
                caller.0, a.status, a.body
            ));
        }
        if a.status == 403 {
            assert_eq!(a.body, "RBAC: access denied");
        }
    }
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));

    // What each denial and audit is counted under.
    let metrics = wp.metrics.encode();
    for line in [
        r#"ambit_waypoint_rbac_decisions_total{listener="api.shop.svc.cluster.local:80",action="DENY",decision="denied",policy="ns[shop]-policy[deny-admin]-rule[0]"} 4"#,
        r#"ambit_waypoint_rbac_decisions_total{listener="api.shop.svc.cluster.local:80",action="DENY",decision="denied",policy="ns[shop]-policy[deny-legacy]-rule[0]"} 1"#,
        r#"ambit_waypoint_rbac_decisions_total{listener="api.shop.svc.cluster.local:80",action="ALLOW",decision="denied",policy="none"} 8"#,
        r#"ambit_waypoint_rbac_decisions_total{listener="api.shop.svc.cluster.local:80",action="LOG",decision="logged",policy="ns[shop]-policy[audit-deletes]-rule[0]"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

#[tokio::test]
async fn a_tcp_port_admits_tunnels_by_its_policies_and_fails_closed_on_http_rules() {
    let wp = TestWaypoint::start().await;
    let store = Backend::start("store").await;
    wp.map("10.244.2.42:8080", store.addr);
    wp.apply(&model(MESH)).unwrap();
    // The writer's tunnel is carried (HTTP over it is only bytes to the waypoint).
    let s = wp
        .tunnel_as(WRITER.0, WRITER.1, "10.96.3.12:9000")
        .await
        .expect("the writer may reach the store");
    let (mut c, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(send1(&mut c, get("store", "/")).await.backend(), "store");
    // A reader of the namespace matches only a rule that needs HTTP: refused, as is the
    // legacy namespace (the waypoint-wide DENY).
    for (who, caller) in [("reader", READER), ("legacy", LEGACY)] {
        let e = wp
            .tunnel_as(caller.0, caller.1, "10.96.3.12:9000")
            .await
            .err()
            .unwrap_or_else(|| panic!("the {who}'s tunnel was carried"));
        assert!(e.to_string().contains("401"), "{who}: {e}");
    }
}

#[test]
fn policies_on_services_without_a_waypoint_and_l7_rules_without_targets_are_explained() {
    let bad = |extra: &str| {
        let yaml = format!("{MESH}  - name: extra\n    namespace: shop\n{extra}");
        ambit_control_plane::source::file::parse(std::path::Path::new("mesh.yaml"), &yaml)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let no_waypoint = bad(
        "    targetRefs: [{kind: Service, name: nowhere}]\n    action: ALLOW\n    rules: [{}]\n",
    );
    assert!(
        no_waypoint.contains("service shop/nowhere is not defined"),
        "{no_waypoint}"
    );
    let l7_on_agents =
        bad("    action: ALLOW\n    rules: [{to: [{methods: [GET], ports: [80]}]}]\n");
    assert!(
        l7_on_agents.contains("uses L7 attributes (methods)")
            && l7_on_agents.contains("set targetRefs"),
        "{l7_on_agents}"
    );
    let audit_on_agents = bad("    action: AUDIT\n    rules: [{}]\n");
    assert!(
        audit_on_agents.contains("AUDIT needs targetRefs"),
        "{audit_on_agents}"
    );
    let bad_key = bad(
        "    targetRefs: [{kind: Service, name: api}]\n    action: DENY\n    rules: [{when: [{key: connection.sni, values: [x]}]}]\n",
    );
    assert!(
        bad_key.contains("key \"connection.sni\" is not supported"),
        "{bad_key}"
    );
}

#[test]
fn a_service_without_a_waypoint_cannot_be_targeted() {
    let yaml = MESH.replace(
        "  - {name: store, namespace: shop, vips: [10.96.3.12]",
        "  - {name: plain, namespace: shop, vips: [10.96.3.13], ports: [{name: http, port: 80}], selector: {app: api}}\n  - {name: store, namespace: shop, vips: [10.96.3.12]",
    ) + "  - name: on-plain\n    namespace: shop\n    targetRefs: [{kind: Service, name: plain}]\n    action: DENY\n    rules: [{}]\n";
    let e = ambit_control_plane::source::file::parse(std::path::Path::new("mesh.yaml"), &yaml)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("service shop/plain has no waypoint, so nothing would enforce"),
        "{e}"
    );
}
