//! The L7 authorization table the waypoint test and the Envoy cross-check share: a mesh
//! with Istio AuthorizationPolicies on a waypoint's services, callers (identity and
//! address: loopback addresses, so that Envoy can see them as connection sources too),
//! and requests with their expected answers.

pub const MESH: &str = r#"
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
  - {name: api, namespace: shop, vips: [10.96.3.10], ports: [{name: http, port: 8000, targetPort: 8080}],
     selector: {app: api}, labels: {ambit.dev/waypoint: wp}}
  - {name: other, namespace: shop, vips: [10.96.3.11], ports: [{name: http, port: 8000, targetPort: 8080}],
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
      - from: [{ipBlocks: [127.9.0.0/24]}]
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

pub const READER: (&str, &str) = ("spiffe://cluster.local/ns/shop/sa/reader", "127.1.1.10");
pub const WRITER: (&str, &str) = ("spiffe://cluster.local/ns/shop/sa/writer", "127.1.1.11");
pub const OPS: (&str, &str) = ("spiffe://cluster.local/ns/shop/sa/ops", "127.1.1.12");
pub const PARTNER: (&str, &str) = ("spiffe://cluster.local/ns/lab/sa/tool", "127.9.0.5");
pub const LEGACY: (&str, &str) = ("spiffe://cluster.local/ns/legacy/sa/old", "127.9.0.6");
pub const ROBOT: (&str, &str) = ("spiffe://cluster.local/ns/lab/sa/robot", "127.1.1.14");

/// (caller, method, host, path, headers, expected status)
pub type Case = (
    (&'static str, &'static str),
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    u16,
);

pub const API: &str = "api.shop.svc.cluster.local";

/// The table: every policy's effect, for and against.
pub const CASES: &[Case] = &[
    (READER, "GET", API, "/items", &[], 200),
    (READER, "HEAD", API, "/items", &[], 200),
    (READER, "POST", API, "/items", &[], 403),
    (READER, "GET", API, "/admin", &[], 403),
    (READER, "GET", API, "/admin/users", &[], 403),
    (READER, "GET", API, "/administrator", &[], 200),
    // One path for authorization, routes and the backend (RFC 3986 normalization).
    (READER, "GET", API, "/items/../admin/users", &[], 403),
    (READER, "GET", API, "/items/%2e%2e/admin", &[], 403),
    (READER, "GET", API, "/%61dmin/users", &[], 403),
    (READER, "GET", API, "/items/./x/../7", &[], 200),
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
pub fn vip_of(host: &str) -> &'static str {
    if host.starts_with("other.") {
        "10.96.3.11:8000"
    } else {
        "10.96.3.10:8000"
    }
}
