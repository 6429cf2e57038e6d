//! L7 authorization at the waypoint: Istio AuthorizationPolicies with `targetRefs`, from
//! the mesh file through the control plane's translator (Envoy RBAC filters) into the
//! waypoint, judged against a table of callers and requests, each with its expected
//! answer. The same policies, fed to a stock Envoy, are checked in
//! `envoy_cross_check_policy.rs`.

mod common;

use common::*;

use common::authz::*;

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
    // The backend gets the path that was authorized, not the one that was sent.
    let mut c = wp.http1_as(READER.0, READER.1, vip_of(API)).await;
    let a = send1(&mut c, req("GET", API, "/items/./x/../%37?q=%2e", &[])).await;
    assert!(a.body.starts_with("api GET /items/7?q=%2e "), "{}", a.body);

    // What each denial and audit is counted under.
    let metrics = wp.metrics.encode();
    for line in [
        r#"ambit_waypoint_rbac_decisions_total{listener="api.shop.svc.cluster.local:8000",action="DENY",decision="denied",policy="ns[shop]-policy[deny-admin]-rule[0]"} 7"#,
        r#"ambit_waypoint_rbac_decisions_total{listener="api.shop.svc.cluster.local:8000",action="DENY",decision="denied",policy="ns[shop]-policy[deny-legacy]-rule[0]"} 1"#,
        r#"ambit_waypoint_rbac_decisions_total{listener="api.shop.svc.cluster.local:8000",action="ALLOW",decision="denied",policy="none"} 8"#,
        r#"ambit_waypoint_rbac_decisions_total{listener="api.shop.svc.cluster.local:8000",action="LOG",decision="logged",policy="ns[shop]-policy[audit-deletes]-rule[0]"} 1"#,
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
