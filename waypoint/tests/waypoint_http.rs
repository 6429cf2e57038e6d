//! The waypoint's HTTP behaviour, in process on loopback: routing, weights, retries,
//! timeouts, HTTP/2 multiplexing, TCP ports at L4, bad xDS and config changes. The configuration is the
//! control plane's own translation of the mesh file below.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;

const MESH: &str = r#"
namespaces:
  - name: shop
nodes: [{name: node-1}, {name: node-2}]
waypoints: [{name: wp, namespace: shop}]
workloads:
  - {name: wp-0, namespace: shop, node: node-1, serviceAccount: wp, ips: [10.244.1.20],
     labels: {gateway.networking.k8s.io/gateway-name: wp}}
  - {name: v1, namespace: shop, node: node-2, ips: [10.244.2.10], labels: {app: web, v: "1"}}
  - {name: v2, namespace: shop, node: node-2, ips: [10.244.2.11], labels: {app: web, v: "2"}}
  - {name: flaky, namespace: shop, node: node-2, ips: [10.244.2.12], labels: {app: flaky}}
  - {name: broken, namespace: shop, node: node-2, ips: [10.244.2.13], labels: {app: broken}}
  - {name: dead, namespace: shop, node: node-2, ips: [10.244.2.14], labels: {app: failover}}
  - {name: alive, namespace: shop, node: node-2, ips: [10.244.2.15], labels: {app: failover}}
  - {name: slow, namespace: shop, node: node-2, ips: [10.244.2.16], labels: {app: pertry}}
  - {name: fast, namespace: shop, node: node-2, ips: [10.244.2.17], labels: {app: pertry}}
  - {name: stuck, namespace: shop, node: node-2, ips: [10.244.2.18], labels: {app: stuck}}
  - {name: db, namespace: shop, node: node-2, ips: [10.244.2.19], labels: {app: db}}
  - {name: lazy, namespace: shop, node: node-2, ips: [10.244.2.20], labels: {app: balance}}
  - {name: quick, namespace: shop, node: node-2, ips: [10.244.2.21], labels: {app: balance}}
  - {name: direct, namespace: shop, node: node-2, ips: [10.244.2.22], labels: {app: direct}}
  - {name: storm, namespace: shop, node: node-2, ips: [10.244.2.23], labels: {app: storm}}
  - {name: crowd, namespace: shop, node: node-2, ips: [10.244.2.24], labels: {app: crowd}}
  - {name: shadow, namespace: shop, node: node-2, ips: [10.244.2.25], labels: {app: shadow}}
  - {name: void, namespace: shop, node: node-2, ips: [10.244.2.26], labels: {app: void}}
  - {name: od-0, namespace: shop, node: node-2, ips: [10.244.2.27], labels: {app: od}}
  - {name: od-1, namespace: shop, node: node-2, ips: [10.244.2.28], labels: {app: od}}
  - {name: od-2, namespace: shop, node: node-2, ips: [10.244.2.29], labels: {app: od}}
services:
  - {name: web, namespace: shop, vips: [10.96.0.10], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: web}, labels: {ambit.dev/waypoint: wp}}
  - {name: web-v1, namespace: shop, vips: [10.96.0.11], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: web, v: "1"}}
  - {name: web-v2, namespace: shop, vips: [10.96.0.12], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: web, v: "2"}}
  - {name: split, namespace: shop, vips: [10.96.0.20], ports: [{name: http, port: 80}],
     selector: {app: nothing}, labels: {ambit.dev/waypoint: wp}}
  - {name: flaky, namespace: shop, vips: [10.96.0.30], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: flaky}, labels: {ambit.dev/waypoint: wp}}
  - {name: broken, namespace: shop, vips: [10.96.0.31], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: broken}, labels: {ambit.dev/waypoint: wp}}
  - {name: failover, namespace: shop, vips: [10.96.0.40], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: failover}, labels: {ambit.dev/waypoint: wp}}
  - {name: pertry, namespace: shop, vips: [10.96.0.50], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: pertry}, labels: {ambit.dev/waypoint: wp}}
  - {name: stuck, namespace: shop, vips: [10.96.0.60], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: stuck}, labels: {ambit.dev/waypoint: wp}}
  - {name: db, namespace: shop, vips: [10.96.0.70], ports: [{name: tcp-db, port: 5432}],
     selector: {app: db}, labels: {ambit.dev/waypoint: wp}}
  - {name: balance-rr, namespace: shop, vips: [10.96.0.80], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: balance}, labels: {ambit.dev/waypoint: wp}}
  - {name: balance-lr, namespace: shop, vips: [10.96.0.81], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: balance}, labels: {ambit.dev/waypoint: wp}}
  - {name: direct, namespace: shop, vips: [10.96.0.90], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: direct}, labels: {ambit.dev/waypoint: wp}}
  - {name: storm, namespace: shop, vips: [10.96.0.100], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: storm}, labels: {ambit.dev/waypoint: wp}}
  - {name: storm-capped, namespace: shop, vips: [10.96.0.101], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: storm}, labels: {ambit.dev/waypoint: wp}}
  - {name: cb-requests, namespace: shop, vips: [10.96.0.102], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: crowd}, labels: {ambit.dev/waypoint: wp}}
  - {name: cb-pending, namespace: shop, vips: [10.96.0.103], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: crowd}, labels: {ambit.dev/waypoint: wp}}
  - {name: cb-tcp, namespace: shop, vips: [10.96.0.104], ports: [{name: tcp-db, port: 5432}],
     selector: {app: db}, labels: {ambit.dev/waypoint: wp}}
  - {name: chaos, namespace: shop, vips: [10.96.0.105], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: web, v: "1"}, labels: {ambit.dev/waypoint: wp}}
  - {name: mirrored, namespace: shop, vips: [10.96.0.106], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: web, v: "1"}, labels: {ambit.dev/waypoint: wp}}
  - {name: shadow, namespace: shop, vips: [10.96.0.107], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: shadow}}
  - {name: void, namespace: shop, vips: [10.96.0.108], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: void}}
  - {name: od, namespace: shop, vips: [10.96.0.109], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: od}, labels: {ambit.dev/waypoint: wp}}
  - {name: od-capped, namespace: shop, vips: [10.96.0.110], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: od}, labels: {ambit.dev/waypoint: wp}}
  - {name: limited, namespace: shop, vips: [10.96.0.111], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: web, v: "1"}, labels: {ambit.dev/waypoint: wp}}
destinationRules:
  - name: od
    namespace: shop
    host: od
    trafficPolicy:
      outlierDetection: {consecutive5xxErrors: 3, interval: 100ms, baseEjectionTime: 1s, maxEjectionPercent: 100}
  - name: od-capped
    namespace: shop
    host: od-capped
    trafficPolicy:
      outlierDetection: {consecutive5xxErrors: 3, interval: 100ms, baseEjectionTime: 10s, maxEjectionPercent: 34}
  - name: cb-requests
    namespace: shop
    host: cb-requests
    trafficPolicy: {connectionPool: {http: {http2MaxRequests: 10}}}
  - name: cb-pending
    namespace: shop
    host: cb-pending
    trafficPolicy: {connectionPool: {tcp: {maxConnections: 2}, http: {http1MaxPendingRequests: 3}}}
  - name: cb-tcp
    namespace: shop
    host: cb-tcp
    trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}
  - name: balance-lr
    namespace: shop
    host: balance-lr
    trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
  - name: storm-capped
    namespace: shop
    host: storm-capped.shop.svc.cluster.local
    trafficPolicy: {connectionPool: {http: {maxRetries: 0}}}
httpRoutes:
  - name: web
    namespace: shop
    parentRefs: [{kind: Service, name: web, port: 80}]
    rules:
      - matches: [{path: {type: Exact, value: /exact}}]
        backendRefs: [{name: web-v2, port: 80}]
      - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-version, value: v2}]}]
        backendRefs: [{name: web-v2, port: 80}]
      - matches: [{path: {type: PathPrefix, value: /api}}]
        filters:
          - type: RequestHeaderModifier
            requestHeaderModifier: {set: [{name: x-added, value: "yes"}], remove: [x-secret]}
          - type: ResponseHeaderModifier
            responseHeaderModifier: {add: [{name: x-resp, value: r}]}
        backendRefs: [{name: web-v1, port: 80}]
      - matches: [{path: {type: RegularExpression, value: "/users/[0-9]+"}}]
        backendRefs: [{name: web-v2, port: 80}]
      - matches: [{queryParams: [{name: debug, value: "1"}]}]
        backendRefs: [{name: web-v2, port: 80}]
      - matches: [{method: POST, path: {type: Exact, value: /submit}}]
        backendRefs: [{name: web-v1, port: 80}]
      - matches: [{path: {type: PathPrefix, value: /old}}]
        filters:
          - type: RequestRedirect
            requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}
      - matches: [{path: {type: PathPrefix, value: /rewrite}}]
        filters:
          - type: URLRewrite
            urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
        backendRefs: [{name: web-v1, port: 80}]
  - name: split
    namespace: shop
    parentRefs: [{kind: Service, name: split}]
    rules:
      - backendRefs: [{name: web-v1, port: 80, weight: 80}, {name: web-v2, port: 80, weight: 20}]
  - name: retries
    namespace: shop
    parentRefs: [{kind: Service, name: flaky}, {kind: Service, name: broken}, {kind: Service, name: failover}]
    rules:
      - backendRefs: []
        retry: {attempts: 2, codes: [503], backoff: 1ms}
  - name: pertry
    namespace: shop
    parentRefs: [{kind: Service, name: pertry}]
    rules:
      - backendRefs: [{name: pertry, port: 80}]
        timeouts: {request: 5s, backendRequest: 300ms}
        retry: {attempts: 2, backoff: 1ms}
  - name: stuck
    namespace: shop
    parentRefs: [{kind: Service, name: stuck}]
    rules:
      - backendRefs: [{name: stuck, port: 80}]
        timeouts: {request: 500ms}
  - name: storm
    namespace: shop
    parentRefs: [{kind: Service, name: storm}]
    rules:
      - backendRefs: [{name: storm, port: 80}]
        retry: {attempts: 1, codes: [503], backoff: 1ms}
  - name: chaos
    namespace: shop
    parentRefs: [{kind: Service, name: chaos}]
    rules:
      - matches: [{path: {type: PathPrefix, value: /abort}}]
        backendRefs: [{name: chaos, port: 80}]
        fault: {abort: {percentage: {value: 50}, httpStatus: 503}}
      - matches: [{path: {type: PathPrefix, value: /delay}}]
        backendRefs: [{name: chaos, port: 80}]
        fault: {delay: {fixedDelay: 200ms}}
      - matches: [{path: {type: PathPrefix, value: /tagged}}]
        backendRefs: [{name: chaos, port: 80}]
        fault: {abort: {httpStatus: 418}, headers: [{name: x-chaos, value: "1"}]}
      - matches: [{path: {type: PathPrefix, value: /grpc}}]
        backendRefs: [{name: chaos, port: 80}]
        fault: {abort: {grpcStatus: UNAVAILABLE}}
      - backendRefs: [{name: chaos, port: 80}]
  - name: mirrored
    namespace: shop
    parentRefs: [{kind: Service, name: mirrored}]
    rules:
      - matches: [{path: {type: PathPrefix, value: /half}}]
        filters:
          - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}, percent: 50}}
        backendRefs: [{name: mirrored, port: 80}]
      - matches: [{path: {type: PathPrefix, value: /broken-mirrors}}]
        filters:
          - {type: RequestMirror, requestMirror: {backendRef: {name: void, port: 80}}}
          - {type: RequestMirror, requestMirror: {backendRef: {name: stuck, port: 80}}}
        backendRefs: [{name: mirrored, port: 80}]
      - filters:
          - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}
        backendRefs: [{name: mirrored, port: 80}]
        retry: {attempts: 1, codes: [503], backoff: 1ms}
  - name: limited
    namespace: shop
    parentRefs: [{kind: Service, name: limited}]
    rules:
      - matches: [{path: {type: PathPrefix, value: /shared}}]
        backendRefs: [{name: limited, port: 80}]
        rateLimit: {requests: 10, unit: Second}
      - matches: [{path: {type: PathPrefix, value: /mine}}]
        backendRefs: [{name: limited, port: 80}]
        rateLimit: {requests: 1, unit: Minute, burst: 5, perSourcePrincipal: true}
      - backendRefs: [{name: limited, port: 80}]
  - name: storm-capped
    namespace: shop
    parentRefs: [{kind: Service, name: storm-capped}]
    rules:
      - backendRefs: [{name: storm-capped, port: 80}]
        retry: {attempts: 1, codes: [503], backoff: 1ms}
"#;

/// The mesh with the retries route sending each service to itself.
fn mesh() -> String {
    MESH.replace(
        "      - backendRefs: []\n        retry: {attempts: 2, codes: [503], backoff: 1ms}",
        "      - matches: [{headers: [{name: host, value: flaky}]}]\n        backendRefs: [{name: flaky, port: 80}]\n        retry: {attempts: 2, codes: [503], backoff: 1ms}\n      - matches: [{headers: [{name: host, value: broken}]}]\n        backendRefs: [{name: broken, port: 80}]\n        retry: {attempts: 2, codes: [503], backoff: 1ms}\n      - matches: [{headers: [{name: host, value: failover}]}]\n        backendRefs: [{name: failover, port: 80}]\n        retry: {attempts: 2, codes: [503], backoff: 1ms}",
    )
}

struct World {
    wp: TestWaypoint,
    backends: std::collections::HashMap<&'static str, Backend>,
}

async fn world() -> World {
    let wp = TestWaypoint::start().await;
    let mut backends = std::collections::HashMap::new();
    for (name, ip) in [
        ("v1", "10.244.2.10"),
        ("v2", "10.244.2.11"),
        ("flaky", "10.244.2.12"),
        ("broken", "10.244.2.13"),
        ("alive", "10.244.2.15"),
        ("slow", "10.244.2.16"),
        ("fast", "10.244.2.17"),
        ("stuck", "10.244.2.18"),
        ("lazy", "10.244.2.20"),
        ("quick", "10.244.2.21"),
        ("storm", "10.244.2.23"),
        ("crowd", "10.244.2.24"),
        ("shadow", "10.244.2.25"),
        ("od0", "10.244.2.27"),
        ("od1", "10.244.2.28"),
        ("od2", "10.244.2.29"),
    ] {
        let b = Backend::start(name).await;
        wp.map(&format!("{ip}:8080"), b.addr);
        backends.insert(name, b);
    }
    // `dead` (10.244.2.14) and `void` (10.244.2.26) are left unmapped: nothing listens
    // there.
    backends["broken"].state.status.store(500, Ordering::SeqCst);
    backends["flaky"].state.flaky.store(true, Ordering::SeqCst);
    backends["slow"]
        .state
        .delay_ms
        .store(2_000, Ordering::SeqCst);
    backends["stuck"]
        .state
        .delay_ms
        .store(3_000, Ordering::SeqCst);
    backends["lazy"].state.delay_ms.store(100, Ordering::SeqCst);
    backends["storm"].state.status.store(503, Ordering::SeqCst);
    backends["crowd"]
        .state
        .delay_ms
        .store(300, Ordering::SeqCst);
    backends["storm"]
        .state
        .delay_ms
        .store(300, Ordering::SeqCst);
    wp.apply(&model(&mesh())).unwrap();
    World { wp, backends }
}

#[tokio::test]
async fn waypoint_carries_workload_addressed_tunnels_at_l4_only_for_the_workloads_it_fronts() {
    let w = world().await;
    // A workload behind the waypoint (its service names it), listening for real on a
    // loopback address: a CONNECT to its IP:port, not to a VIP, goes to it at L4.
    let direct = Backend::start_at("direct", "127.0.0.77:8080".parse().unwrap()).await;
    w.wp.workload_ips.lock().unwrap().insert(
        "10.244.2.22".parse().unwrap(),
        "127.0.0.77".parse().unwrap(),
    );
    w.wp.apply(&model(&mesh())).unwrap();
    let mut c = w.wp.http1("127.0.0.77:8080").await;
    let a = send1(&mut c, req("GET", "anything", "/whatever", &[])).await;
    // Not routed (no route would match this host): the workload itself answered.
    assert_eq!((a.status, a.backend()), (200, "direct"), "{a:?}");
    assert_eq!(direct.state.requests.load(Ordering::SeqCst), 1);
    drop(c);
    // Counted as Istio counts the waypoint's TCP traffic.
    let labels = [
        "reporter=\"waypoint\"",
        "destination_workload=\"direct\"",
        "destination_workload_namespace=\"shop\"",
        "destination_service=\"unknown\"",
        "source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"",
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(
        &w.wp.metrics.encode(),
        "istio_tcp_connections_closed_total",
        &labels,
    ) < 1.0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = w.wp.metrics.encode();
    assert_eq!(
        sample(&m, "istio_tcp_connections_opened_total", &labels),
        1.0,
        "{m}"
    );
    assert!(
        sample(&m, "istio_tcp_sent_bytes_total", &labels) > 0.0,
        "{m}"
    );
    assert!(
        sample(&m, "istio_tcp_received_bytes_total", &labels) > 0.0,
        "{m}"
    );
    // The waypoint's own pod, or an address no workload has, is not its to carry: a
    // client cannot use the waypoint as a relay to arbitrary addresses.
    for authority in ["10.244.1.20:8080", "10.244.9.9:80"] {
        let err = w.wp.tunnel(authority).await.err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("400")),
            "{authority}: {err:?}"
        );
    }
}

#[tokio::test]
async fn waypoint_balances_round_robin_or_least_request_as_the_destination_rule_says() {
    let w = world().await;
    // 8 clients, 10 requests each, to two endpoints of which one answers in 100 ms and
    // the other at once. Returns how many requests the slow one got.
    let lazy_share = |vip: &'static str| {
        let w = &w;
        async move {
            let before = w.backends["lazy"].state.requests.load(Ordering::SeqCst);
            let clients = (0..8).map(|_| async {
                let mut c = w.wp.http1(vip).await;
                for _ in 0..10 {
                    let a = send1(&mut c, req("GET", "balance", "/", &[])).await;
                    assert_eq!(a.status, 200, "{a:?}");
                }
            });
            futures::future::join_all(clients).await;
            w.backends["lazy"].state.requests.load(Ordering::SeqCst) - before
        }
    };
    // Round robin alternates, whatever the endpoints' latency.
    let rr = lazy_share("10.96.0.80:80").await;
    assert_eq!(rr, 40, "round robin sent {rr} of 80 to the slow endpoint");
    // Least request (the DestinationRule) sends to the less busy one: the slow endpoint
    // gets only what arrives while the fast one is as busy.
    let lr = lazy_share("10.96.0.81:80").await;
    eprintln!("least request: {lr} of 80 to the slow endpoint (round robin: {rr})");
    assert!(
        lr <= 24,
        "least request sent {lr} of 80 to the slow endpoint"
    );
}

#[tokio::test]
async fn waypoint_routes_by_path_header_query_and_method_first_match_wins() {
    let w = world().await;
    let mut c = w.wp.http1("10.96.0.10:80").await;
    let host = "web.shop.svc.cluster.local";
    // (method, path, headers, status, backend)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], u16, &'a str);
    let cases: &[Case] = &[
        ("GET", "/exact", &[], 200, "v2"),
        ("GET", "/exact/more", &[], 404, "-"),
        ("GET", "/api/x", &[("x-version", "v2")], 200, "v2"),
        ("GET", "/api/x", &[], 200, "v1"),
        ("GET", "/api", &[], 200, "v1"),
        ("GET", "/apix", &[], 404, "-"),
        ("GET", "/users/42", &[], 200, "v2"),
        ("GET", "/users/x", &[], 404, "-"),
        ("GET", "/anything?debug=1", &[], 200, "v2"),
        ("GET", "/anything?debug=2", &[], 404, "-"),
        ("POST", "/submit", &[], 200, "v1"),
        ("GET", "/submit", &[], 404, "-"),
        ("GET", "/", &[], 404, "-"),
    ];
    for (method, path, headers, status, backend) in cases {
        let a = send1(&mut c, req(method, host, path, headers)).await;
        assert_eq!(
            (a.status, a.backend()),
            (*status, *backend),
            "{method} {path} {headers:?}: {a:?}"
        );
    }
}

#[tokio::test]
async fn waypoint_redirects_rewrites_and_edits_headers() {
    let w = world().await;
    let mut c = w.wp.http1("10.96.0.10:80").await;
    let host = "web.shop.svc.cluster.local";
    let a = send1(&mut c, req("GET", host, "/old/page?q=1", &[])).await;
    assert_eq!(a.status, 301);
    assert_eq!(
        a.headers["location"],
        "http://web.shop.svc.cluster.local/new/page?q=1"
    );
    let a = send1(&mut c, req("GET", host, "/rewrite/x?y=2", &[])).await;
    assert_eq!((a.status, a.backend()), (200, "v1"));
    assert!(a.body.starts_with("v1 GET /v2/x?y=2 "), "{}", a.body);
    assert!(a.body.contains("host=rewritten.example"), "{}", a.body);
    let a = send1(
        &mut c,
        req(
            "GET",
            host,
            "/api/h",
            &[("x-secret", "s"), ("x-added", "no")],
        ),
    )
    .await;
    assert!(a.body.contains("x-added=yes"), "{}", a.body);
    assert!(
        !a.body.contains("x-added=no") && !a.body.contains("x-secret"),
        "{}",
        a.body
    );
    assert_eq!(a.headers["x-resp"], "r");
    // Hop-by-hop headers never reach the backend.
    let a = send1(
        &mut c,
        req("GET", host, "/api/h", &[("keep-alive", "timeout=5")]),
    )
    .await;
    assert!(!a.body.contains("keep-alive"), "{}", a.body);
}

#[tokio::test]
async fn waypoint_splits_by_weight() {
    let w = world().await;
    let mut c = w.wp.http1("10.96.0.20:80").await;
    let mut v1 = 0;
    for _ in 0..1000 {
        let a = send1(&mut c, req("GET", "split", "/", &[])).await;
        assert_eq!(a.status, 200, "{a:?}");
        if a.backend() == "v1" {
            v1 += 1;
        }
    }
    // 80/20 within ±5 points.
    assert!((750..=850).contains(&v1), "v1 got {v1} of 1000");
    // One client, one request at a time: each backend was reached over one kept-alive
    // upstream connection (returned to the pool as each response ended).
    for b in ["v1", "v2"] {
        let conns = w.backends[b].state.connections.load(Ordering::SeqCst);
        assert_eq!(
            conns, 1,
            "{b}: {conns} upstream connections for 1,000 requests"
        );
    }
    // The caller's baggage names it in Istio's request labels.
    let m = w.wp.metrics.encode();
    let line = m
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("split.shop"))
        .unwrap_or_else(|| panic!("{m}"));
    for label in [
        "source_workload=\"client\"",
        "source_canonical_service=\"client-svc\"",
        "source_canonical_revision=\"v7\"",
        "source_cluster=\"Kubernetes\"",
        "source_workload_namespace=\"shop\"",
        "destination_service_name=\"split\"",
    ] {
        assert!(line.contains(label), "{label} missing: {line}");
    }
    // And the upstream that answered, from its endpoint's metadata: one series per
    // backend workload, whose counts add up to the split.
    let v1_line = m
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("split.shop")
                && l.contains("destination_workload=\"v1\"")
        })
        .unwrap_or_else(|| panic!("{m}"));
    for label in [
        "destination_workload_namespace=\"shop\"",
        "destination_canonical_service=\"web\"",
        "destination_app=\"web\"",
        "destination_canonical_revision=\"latest\"",
        "destination_cluster=\"Kubernetes\"",
        // Plaintext backends (the namespace is not enrolled) prove no identity.
        "destination_principal=\"unknown\"",
        "response_code=\"200\"",
        "grpc_response_status=\"\"",
        "response_flags=\"-\"",
    ] {
        assert!(v1_line.contains(label), "{label} missing: {v1_line}");
    }
    assert_eq!(
        v1_line.rsplit(' ').next().unwrap().parse::<f64>().unwrap(),
        f64::from(v1)
    );
}

/// The sum of the samples of `name` whose labels contain all of `labels`.
fn sample(m: &str, name: &str, labels: &[&str]) -> f64 {
    m.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn waypoint_propagates_trace_context_and_reports_sizes_when_the_response_ends() {
    let w = world().await;
    let mut c = w.wp.http1("10.96.0.10:80").await;
    let seen_traceparent = |a: &Answer| {
        let at = a
            .body
            .find("traceparent=")
            .expect("the backend saw a traceparent");
        a.body[at + "traceparent=".len()..][..55].to_owned()
    };
    // A valid trace context reaches the backend as it came.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let a = send1(&mut c, req("GET", "web", "/exact", &[("traceparent", tp)])).await;
    assert_eq!(seen_traceparent(&a), tp);
    // Without one, or with a malformed one, a new trace starts.
    let mut started = std::collections::BTreeSet::new();
    for headers in [&[][..], &[("traceparent", "00-not-a-trace-01")][..]] {
        let a = send1(&mut c, req("GET", "web", "/exact", headers)).await;
        let got = seen_traceparent(&a);
        assert!(ambit_waypoint::trace::is_valid(got.as_bytes()), "{got}");
        assert_ne!(got, tp);
        started.insert(got);
    }
    assert_eq!(started.len(), 2, "each request starts its own trace");

    // Sizes: a 10,000-byte POST to web-v1 (the only request to it here).
    let post = http::Request::builder()
        .method("POST")
        .uri("/submit")
        .header("host", "web")
        .body(Full::new(Bytes::from(vec![b'x'; 10_000])))
        .unwrap();
    let a = send1(&mut c, post).await;
    assert_eq!((a.status, a.backend()), (200, "v1"), "{a:?}");
    let m = w.wp.metrics.encode();
    let v1 = [
        "destination_workload=\"v1\"",
        "destination_service_name=\"web\"",
    ];
    assert_eq!(sample(&m, "istio_request_bytes_count", &v1), 1.0, "{m}");
    let sent = sample(&m, "istio_request_bytes_sum", &v1);
    // The body and its headers (method, path, host, content-length): within 200 bytes.
    assert!((10_000.0..10_200.0).contains(&sent), "request bytes {sent}");
    let got = sample(&m, "istio_response_bytes_sum", &v1);
    let body = a.body.len() as f64;
    assert!(
        (body..body + 300.0).contains(&got),
        "response bytes {got}, body {body}"
    );
    assert_eq!(
        sample(&m, "istio_request_duration_milliseconds_count", &v1),
        1.0
    );
}

#[tokio::test]
async fn waypoint_retries_hide_a_flaky_backend_and_only_what_is_retriable() {
    let w = world().await;
    let mut c = w.wp.http1("10.96.0.30:80").await;
    for _ in 0..20 {
        let a = send1(&mut c, req("GET", "flaky", "/", &[])).await;
        assert_eq!(a.status, 200, "{a:?}");
    }
    // Every other attempt failed and was retried: 20 answers took 40 attempts.
    assert_eq!(
        w.backends["flaky"].state.requests.load(Ordering::SeqCst),
        40
    );
    // And the waypoint says so, per attempt, as Envoy's upstream_rq_* statistics do.
    let m = w.wp.metrics.encode();
    let series = |name: &str, labels: &str| {
        m.lines()
            .find(|l| l.starts_with(name) && l.contains(labels))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cluster = "cluster=\"outbound|80||flaky.shop.svc.cluster.local\"";
    assert_eq!(
        series("ambit_waypoint_upstream_retries_total", cluster),
        20.0,
        "{m}"
    );
    assert_eq!(
        series(
            "ambit_waypoint_upstream_requests_total",
            &format!("{cluster},response_code=\"503\"")
        ),
        20.0,
        "{m}"
    );

    // 500 is not in the codes: answered as is, tried once.
    let mut c = w.wp.http1("10.96.0.31:80").await;
    let a = send1(&mut c, req("GET", "broken", "/", &[])).await;
    assert_eq!(a.status, 500);
    assert_eq!(
        w.backends["broken"].state.requests.load(Ordering::SeqCst),
        1
    );

    // A dead endpoint: the connection failure is retried on the other one.
    let mut c = w.wp.http1("10.96.0.40:80").await;
    for _ in 0..10 {
        let a = send1(&mut c, req("GET", "failover", "/", &[])).await;
        assert_eq!((a.status, a.backend()), (200, "alive"), "{a:?}");
    }
}

#[tokio::test]
async fn a_retry_budget_keeps_a_failing_backend_from_multiplying_its_load() {
    let w = world().await;
    let storm = &w.backends["storm"].state;
    let m = || w.wp.metrics.encode();
    let series = |m: &str, name: &str, cluster: &str| {
        m.lines()
            .find(|l| {
                l.starts_with(name) && l.contains(&format!("cluster=\"outbound|80||{cluster}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Alone, a failed request is retried: the budget never drops below 3 retries.
    let mut c = w.wp.http1("10.96.0.100:80").await;
    let a = send1(&mut c, req("GET", "storm.shop.svc.cluster.local", "/", &[])).await;
    assert_eq!(a.status, 503);
    assert_eq!(storm.requests.load(Ordering::SeqCst), 2);

    // 40 at once, all failing: retries may be at most 20 % of the requests in flight,
    // so most are not retried (Envoy's retry budget, which the control plane sets on
    // every waypoint cluster). Without it the backend would see 80 requests.
    storm.requests.store(0, Ordering::SeqCst);
    let c = w.wp.http2("10.96.0.100:80").await;
    let statuses = concurrent_gets(c, "storm.shop.svc.cluster.local", 40).await;
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    let hits = storm.requests.load(Ordering::SeqCst);
    let m = m();
    let cluster = "storm.shop.svc.cluster.local";
    let retried = series(&m, "ambit_waypoint_upstream_retries_total", cluster);
    let overflow = m
        .lines()
        .find(|l| {
            l.starts_with("ambit_waypoint_upstream_overflow_total")
                && l.contains(&format!("cluster=\"outbound|80||{cluster}\""))
                && l.contains("limit=\"retries\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    eprintln!(
        "40 failing requests at once: {hits} upstream attempts, {retried} retries (1 before), {overflow} overflows"
    );
    assert!(
        (41..=52).contains(&hits),
        "{hits} upstream requests for 40 failing requests"
    );
    assert_eq!(retried - 1.0 + overflow, 40.0, "{m}");
    assert!(overflow >= 28.0, "{m}");
    // Each overflow is flagged UO on the request's series.
    let uo: f64 = m
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("destination_service=\"storm.shop.svc.cluster.local\"")
                && l.contains("response_flags=\"UO\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(uo, overflow, "{m}");

    // A DestinationRule's `maxRetries: 0` replaces the budget: nothing is retried.
    storm.requests.store(0, Ordering::SeqCst);
    let mut c = w.wp.http1("10.96.0.101:80").await;
    let a = send1(
        &mut c,
        req("GET", "storm-capped.shop.svc.cluster.local", "/", &[]),
    )
    .await;
    assert_eq!(a.status, 503);
    assert_eq!(storm.requests.load(Ordering::SeqCst), 1);
    assert!(
        w.wp.metrics.encode().contains(
            "ambit_waypoint_upstream_overflow_total{cluster=\"outbound|80||storm-capped.shop.svc.cluster.local\",limit=\"retries\"} 1"
        )
    );
}

#[tokio::test]
async fn circuit_breakers_turn_away_what_is_over_their_limits_and_recover() {
    let w = world().await;
    let m = || w.wp.metrics.encode();
    let overflow = |m: &str, svc: &str, limit: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("ambit_waypoint_upstream_overflow_total{")
                    && l.contains(&format!(
                        "cluster=\"outbound|80||{svc}.shop.svc.cluster.local\""
                    ))
                    && l.contains(&format!("limit=\"{limit}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // max_requests 10 (http2MaxRequests): of 50 slow requests at once, 10 are served and
    // 40 answered 503 at once, flagged UO.
    let c = w.wp.http2("10.96.0.102:80").await;
    let started = Instant::now();
    let statuses = concurrent_gets(c, "cb-requests.shop.svc.cluster.local", 50).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        (ok, statuses.iter().filter(|s| **s == 503).count()),
        (10, 40),
        "{statuses:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let text = m();
    assert_eq!(overflow(&text, "cb-requests", "requests"), 40.0, "{text}");
    let uo: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("destination_service=\"cb-requests.shop.svc.cluster.local\"")
                && l.contains("response_flags=\"UO\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(uo, 40.0, "{text}");
    // It recovers when the load drops.
    let mut c1 = w.wp.http1("10.96.0.102:80").await;
    let a = send1(
        &mut c1,
        req("GET", "cb-requests.shop.svc.cluster.local", "/", &[]),
    )
    .await;
    assert_eq!(a.status, 200);

    // max_connections 2 with max_pending_requests 3 (HTTP/1.1 upstream): a request
    // without a ready connection is pending (as Envoy's: while one is made for it, or
    // until one comes free), so of 10 at once 3 to 5 are served — 5 when the first two
    // connections are up before the rest arrive — and the others turned away.
    let c = w.wp.http2("10.96.0.103:80").await;
    let statuses = concurrent_gets(c, "cb-pending.shop.svc.cluster.local", 10).await;
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!((3..=5).contains(&served), "{statuses:?}");
    let text = m();
    assert_eq!(
        overflow(&text, "cb-pending", "pending"),
        (10 - served) as f64,
        "{text}"
    );
    let dump = ambit_waypoint::admin::config_dump(&w.wp.config.borrow());
    let cb = dump["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "outbound|80||cb-pending.shop.svc.cluster.local")
        .unwrap()
        .clone();
    assert_eq!(cb["circuit_breakers"]["max_connections"], 2, "{cb}");
    assert_eq!(cb["connections_open"], 2, "idle, kept: {cb}");
    assert_eq!(cb["requests_pending"], 0, "{cb}");

    // A TCP port's max_connections: the second connection at once is refused.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    w.wp.map("10.244.2.19:5432", tcp_echo().await);
    w.wp.apply(&model(&mesh())).unwrap();
    let mut first = w.wp.tunnel("10.96.0.104:5432").await.unwrap();
    let mut greeting = [0u8; 13];
    first.read_exact(&mut greeting).await.unwrap();
    let mut buf = [0u8; 5];
    let mut second = w.wp.tunnel("10.96.0.104:5432").await.unwrap();
    let _ = second.write_all(b"hello").await;
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .expect("closed, not left hanging");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let text = m();
    assert!(
        text.contains("ambit_waypoint_upstream_overflow_total{cluster=\"outbound|5432||cb-tcp.shop.svc.cluster.local\",limit=\"connections\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn faults_delay_and_abort_their_share_of_requests_and_only_tagged_ones_when_scoped() {
    let w = world().await;
    let host = "chaos.shop.svc.cluster.local";
    let mut c = w.wp.http1("10.96.0.105:80").await;
    // 50 % aborted with 503: over 400 requests, within 4 standard deviations (±40).
    let mut aborted = 0;
    for _ in 0..400 {
        let a = send1(&mut c, req("GET", host, "/abort", &[])).await;
        match a.status {
            503 => {
                assert_eq!(a.body, "fault filter abort");
                aborted += 1;
            }
            200 => {}
            s => panic!("{s}: {a:?}"),
        }
    }
    eprintln!("fault abort 50 %: {aborted} of 400 aborted");
    assert!((160..=240).contains(&aborted), "{aborted} of 400");
    // A 200 ms delay shows in the latency, and the request goes on.
    for _ in 0..3 {
        let t = Instant::now();
        let a = send1(&mut c, req("GET", host, "/delay", &[])).await;
        assert_eq!(a.status, 200);
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
    }
    // Scoped to a header: only tagged requests get the fault.
    let a = send1(&mut c, req("GET", host, "/tagged", &[])).await;
    assert_eq!(a.status, 200);
    let a = send1(&mut c, req("GET", host, "/tagged", &[("x-chaos", "1")])).await;
    assert_eq!((a.status, a.body.as_str()), (418, "fault filter abort"));
    // A gRPC abort: to a gRPC request, HTTP 200 with the gRPC status in a trailers-only
    // answer; to any other, a plain 200 (as Envoy's local reply).
    let a = send1(
        &mut c,
        req(
            "GET",
            host,
            "/grpc",
            &[("content-type", "application/grpc")],
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["grpc-status"], "14");
    let a = send1(&mut c, req("GET", host, "/grpc", &[])).await;
    assert_eq!((a.status, a.body.as_str()), (200, "fault filter abort"));
    // Flagged as Envoy flags them: FI for an abort, DI for a delay.
    let m = w.wp.metrics.encode();
    let count = |flags: &str| -> f64 {
        m.lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!("destination_service=\"{host}\""))
                    && l.contains(&format!("response_flags=\"{flags}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(count("FI"), (aborted + 3) as f64, "{m}");
    assert_eq!(count("DI"), 3.0, "{m}");
}

#[tokio::test]
async fn rate_limits_answer_429_beyond_their_bucket_and_keep_one_per_principal_when_asked() {
    let w = world().await;
    let host = "limited.shop.svc.cluster.local";
    let mut c = w.wp.http1("10.96.0.111:80").await;
    // 10 a second with a burst of 10, asked 50 times a second for 2 s: the burst, then
    // 10 a second (the bucket refills continuously), the rest 429.
    let start = Instant::now();
    let (mut ok, mut limited) = (0u32, 0u32);
    for i in 0..100u32 {
        let due = start + Duration::from_millis(20 * u64::from(i));
        tokio::time::sleep_until(due.into()).await;
        let a = send1(&mut c, req("GET", host, "/shared", &[])).await;
        assert_eq!(a.headers["x-ratelimit-limit"], "10", "{a:?}");
        match a.status {
            200 => ok += 1,
            429 => {
                assert_eq!(a.body, "local_rate_limited");
                assert_eq!(a.headers["x-ratelimit-remaining"], "0");
                assert_eq!(a.headers["retry-after"], "1");
                limited += 1;
            }
            s => panic!("{s}: {a:?}"),
        }
    }
    let took = start.elapsed().as_secs_f64();
    let expected = 10.0 + 10.0 * took;
    eprintln!(
        "rate limit 10/s: {ok} allowed, {limited} limited in {took:.2} s (expected {expected:.1})"
    );
    assert!(
        (f64::from(ok) - expected).abs() <= 3.0,
        "{ok} allowed in {took:.2} s, expected {expected:.1}"
    );
    // A route without a limit says nothing of one.
    let a = send1(&mut c, req("GET", host, "/free", &[])).await;
    assert_eq!(a.status, 200);
    assert!(a.headers.get("x-ratelimit-limit").is_none(), "{a:?}");

    // A bucket of 5 per caller (refilled once a minute): each caller gets its 5.
    for caller in [
        "spiffe://cluster.local/ns/shop/sa/a",
        "spiffe://cluster.local/ns/shop/sa/b",
    ] {
        let mut c = w.wp.http1_as(caller, "10.244.1.10", "10.96.0.111:80").await;
        let statuses: Vec<u16> = {
            let mut v = Vec::new();
            for _ in 0..7 {
                v.push(send1(&mut c, req("GET", host, "/mine", &[])).await.status);
            }
            v
        };
        assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429], "{caller}");
    }
    // Counted, and flagged RL in the request metrics (Envoy's response flag).
    let m = w.wp.metrics.encode();
    assert_eq!(
        sample(
            &m,
            "ambit_waypoint_local_rate_limit_total",
            &[r#"decision="rate_limited""#]
        ),
        f64::from(limited + 4),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "istio_requests_total",
            &[r#"response_flags="RL""#, r#"response_code="429""#]
        ),
        f64::from(limited + 4),
        "{m}"
    );
}

/// Waits (at most 5 s) until `backend` has answered `n` requests.
async fn answered(w: &World, backend: &str, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = w.backends[backend].state.requests.load(Ordering::SeqCst);
        if got >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn mirrors_get_copies_of_their_share_and_never_touch_the_original() {
    let w = world().await;
    let host = "mirrored.shop.svc.cluster.local";
    let mut c = w.wp.http1("10.96.0.106:80").await;
    // Every request copied, body and all, with Envoy's shadow Host; the original's
    // answer is the primary's.
    for i in 0..20 {
        let post = http::Request::builder()
            .method("POST")
            .uri(format!("/all/{i}"))
            .header("host", host)
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap();
        let a = send1(&mut c, post).await;
        assert_eq!(
            (a.status, a.headers["x-backend"].to_str().unwrap()),
            (200, "v1"),
            "{a:?}"
        );
    }
    assert_eq!(answered(&w, "shadow", 20).await, 20);
    let last = w.backends["shadow"].state.last.lock().unwrap().clone();
    assert!(last.starts_with("shadow POST /all/"), "{last}");
    assert!(last.contains(&format!("host={host}-shadow;")), "{last}");
    assert!(last.ends_with(" body=5"), "{last}");
    // A streamed body (over the retry buffer, so the original's is not held) is copied
    // as it goes: both get all of it.
    let big = vec![b'x'; 2 * 1024 * 1024];
    let post = http::Request::builder()
        .method("POST")
        .uri("/all/big")
        .header("host", host)
        .body(Full::new(Bytes::from(big)))
        .unwrap();
    let a = send1(&mut c, post).await;
    assert_eq!(
        (a.status, a.headers["x-body-bytes"].to_str().unwrap()),
        (200, "2097152")
    );
    assert_eq!(answered(&w, "shadow", 21).await, 21);
    let last = w.backends["shadow"].state.last.lock().unwrap().clone();
    assert!(last.ends_with(" body=2097152"), "{last}");

    // 50 %: over 400 requests, within 4 standard deviations (±40).
    for _ in 0..400 {
        let a = send1(&mut c, req("GET", host, "/half", &[])).await;
        assert_eq!(a.status, 200);
    }
    // The copies are on their way when the originals are answered: let them land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let copied = w.backends["shadow"].state.requests.load(Ordering::SeqCst) - 21;
    eprintln!("mirror 50 %: {copied} of 400 copied");
    assert!((160..=240).contains(&copied), "{copied} of 400");

    // A mirror that refuses connections and one that answers in 3 s change nothing: the
    // originals are answered at once, none retried.
    let v1_before = w.backends["v1"].state.requests.load(Ordering::SeqCst);
    let t = Instant::now();
    for _ in 0..5 {
        let a = send1(&mut c, req("GET", host, "/broken-mirrors", &[])).await;
        assert_eq!(
            (a.status, a.headers["x-backend"].to_str().unwrap()),
            (200, "v1"),
            "{a:?}"
        );
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(
        w.backends["v1"].state.requests.load(Ordering::SeqCst) - v1_before,
        5
    );
    assert_eq!(answered(&w, "stuck", 5).await, 5);
    // Counted in the mirror clusters' upstream requests, as Envoy's shadows are.
    let m = w.wp.metrics.encode();
    let upstream = |cluster: &str, code: &str| {
        sample(
            &m,
            "ambit_waypoint_upstream_requests_total",
            &[
                &format!("cluster=\"outbound|80||{cluster}.shop.svc.cluster.local\""),
                &format!("response_code=\"{code}\""),
            ],
        )
    };
    assert_eq!(upstream("shadow", "200"), (21 + copied) as f64, "{m}");
    assert_eq!(upstream("void", "0"), 5.0, "{m}");
}

/// Requests each of `backends` has answered.
fn answered_by(w: &World, backends: &[&str]) -> Vec<u64> {
    backends
        .iter()
        .map(|b| w.backends[b].state.requests.load(Ordering::SeqCst))
        .collect()
}

#[tokio::test]
async fn outlier_detection_ejects_a_failing_endpoint_for_a_growing_time_and_takes_it_back() {
    let w = world().await;
    w.backends["od2"].state.status.store(500, Ordering::SeqCst);
    let host = "od.shop.svc.cluster.local";
    let od = ["od0", "od1", "od2"];
    let mut c = w.wp.http1("10.96.0.109:80").await;
    let mut round = async |n: usize| {
        let mut failed = 0;
        for _ in 0..n {
            if send1(&mut c, req("GET", host, "/", &[])).await.status == 500 {
                failed += 1;
            }
        }
        failed
    };
    // Round robin: od-2 answers every third request until its third 500 in a row
    // ejects it; then the other two take everything.
    let mut failed = 0;
    while answered_by(&w, &od)[2] < 3 {
        failed += round(1).await;
    }
    let mut ejected = Instant::now();
    failed += round(30 - 9).await;
    assert_eq!(failed, 3);
    let counts = answered_by(&w, &od);
    assert_eq!(counts[2], 3, "{counts:?}");
    assert_eq!(counts[0] + counts[1], 27, "{counts:?}");
    let dump = ambit_waypoint::admin::config_dump(&w.wp.config.borrow());
    let cluster = dump["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "outbound|80||od.shop.svc.cluster.local")
        .unwrap()
        .clone();
    assert_eq!(
        cluster["outlier_detection"]["ejected"],
        // (the test maps 10.244.2.29:8080 to its backend on loopback)
        serde_json::json!([w.backends["od2"].addr.to_string()]),
        "{cluster}"
    );
    assert_eq!(cluster["healthy_panic_threshold"], 0.0, "{cluster}");
    // Back after its 1 s (at the first review past it), and out again at its third 500
    // in a row; ejected again before a review finds it back for an interval, its
    // second ejection lasts twice as long (2 s).
    let mut out_for = Vec::new();
    for (returns_at, ejected_at) in [(4, 6), (7, 9)] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while answered_by(&w, &od)[2] < returns_at && Instant::now() < deadline {
            round(1).await;
        }
        out_for.push(ejected.elapsed());
        while answered_by(&w, &od)[2] < ejected_at && Instant::now() < deadline {
            round(1).await;
        }
        ejected = Instant::now();
        assert_eq!(answered_by(&w, &od)[2], ejected_at);
    }
    eprintln!("outlier: ejected for {out_for:?}");
    // (The review that ends an ejection may come a tick's rounding early of the
    // moment this test saw the ejection.)
    assert!(out_for[0] >= Duration::from_millis(950), "{out_for:?}");
    assert!(out_for[1] >= Duration::from_millis(1_950), "{out_for:?}");
    // Counted as Envoy's ejections_enforced_consecutive_5xx.
    let m = w.wp.metrics.encode();
    assert_eq!(
        sample(
            &m,
            "ambit_waypoint_outlier_ejections_total",
            &[
                "cluster=\"outbound|80||od.shop.svc.cluster.local\"",
                "reason=\"consecutive_5xx\"",
                "outcome=\"ejected\""
            ]
        ),
        3.0,
        "{m}"
    );
}

#[tokio::test]
async fn outlier_detection_never_ejects_more_than_max_ejection_percent() {
    let w = world().await;
    let od = ["od0", "od1", "od2"];
    for b in od {
        w.backends[b].state.status.store(500, Ordering::SeqCst);
    }
    // All three fail; at most 34 % may be out: one endpoint, never two — the others
    // keep taking requests (and their ejections are counted as overflow).
    let mut c = w.wp.http1("10.96.0.110:80").await;
    for _ in 0..60 {
        let a = send1(
            &mut c,
            req("GET", "od-capped.shop.svc.cluster.local", "/", &[]),
        )
        .await;
        assert_eq!(a.status, 500);
    }
    let mut counts = answered_by(&w, &od);
    counts.sort();
    assert_eq!(counts[0], 3, "one ejected at its third failure: {counts:?}");
    assert_eq!(counts[1] + counts[2], 57, "{counts:?}");
    let m = w.wp.metrics.encode();
    let outcome = |o: &str| {
        sample(
            &m,
            "ambit_waypoint_outlier_ejections_total",
            &[
                "cluster=\"outbound|80||od-capped.shop.svc.cluster.local\"",
                &format!("outcome=\"{o}\""),
            ],
        )
    };
    assert_eq!(outcome("ejected"), 1.0, "{m}");
    assert!(outcome("overflow") >= 10.0, "{m}");
}

#[tokio::test]
async fn the_config_dump_shows_every_resource_the_waypoint_runs() {
    let w = world().await;
    let dump = ambit_waypoint::admin::config_dump(&w.wp.config.borrow());
    let text = serde_json::to_string_pretty(&dump).unwrap();
    let listener = dump["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "web.shop.svc.cluster.local:80")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(listener["kind"], "http", "{text}");
    assert_eq!(listener["addresses"][0], "10.96.0.10:80", "{text}");
    let cluster = |name: &str| {
        dump["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == format!("outbound|80||{name}.shop.svc.cluster.local"))
            .unwrap_or_else(|| panic!("{name}: {text}"))
            .clone()
    };
    assert_eq!(
        cluster("storm")["retry_limit"]["retry_budget"]["budget_percent"],
        20.0
    );
    assert_eq!(
        cluster("storm-capped")["retry_limit"]["max_retries"],
        0,
        "{text}"
    );
    assert_eq!(cluster("balance-lr")["lb_policy"], "LeastRequest");
    let eps = &dump["endpoints"]["outbound|80||web-v1.shop.svc.cluster.local"];
    // (The test maps the pod's address to its backend on loopback.)
    let v1 = w.backends["v1"].addr.to_string();
    assert_eq!(eps[0]["address"], v1.as_str(), "{text}");
    assert_eq!(eps[0]["workload"], "shop/v1", "{text}");
    // The route table as the waypoint matches it: the first web route is /exact.
    let routes = &dump["route_configs"].as_array().unwrap()[0]["virtual_hosts"][0]["routes"];
    assert!(text.contains("\"path\": \"/exact\""), "{text}");
    assert!(routes.as_array().is_some_and(|r| !r.is_empty()), "{text}");
}

#[tokio::test]
async fn waypoint_never_retries_a_body_over_the_buffer() {
    let w = world().await;
    let mut c = w.wp.http1("10.96.0.30:80").await;
    // The flaky backend fails its first request: a 2 MiB POST cannot be replayed.
    let big = vec![b'x'; 2 * 1024 * 1024];
    let post = http::Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", "flaky")
        .body(Full::new(Bytes::from(big)))
        .unwrap();
    let a = send1(&mut c, post).await;
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(w.backends["flaky"].state.requests.load(Ordering::SeqCst), 1);
    // A small one is buffered and retried.
    let post = http::Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", "flaky")
        .body(Full::new(Bytes::from_static(b"small")))
        .unwrap();
    let a = send1(&mut c, post).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.headers["x-body-bytes"], "5");
}

#[tokio::test]
async fn a_request_the_client_abandons_is_still_counted_and_logged_with_dc() {
    let w = world().await;
    // web-v1 answers in 2 s; the client gives up (resets its stream) after 200 ms, while
    // the waypoint still waits for the upstream.
    w.backends["v1"]
        .state
        .delay_ms
        .store(2_000, Ordering::SeqCst);
    let mut c = w.wp.http2("10.96.0.10:80").await;
    c.ready().await.unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        c.send_request(get("web.shop.svc.cluster.local", "/api/slow")),
    )
    .await;
    assert!(gave_up.is_err(), "answered before the client gave up");
    let dc = [
        "response_code=\"0\"",
        "response_flags=\"DC\"",
        "destination_service_name=\"web\"",
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(&w.wp.metrics.encode(), "istio_requests_total", &dc) < 1.0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = w.wp.metrics.encode();
    assert_eq!(sample(&m, "istio_requests_total", &dc), 1.0, "{m}");
}

#[tokio::test]
async fn waypoint_per_try_timeout_retries_and_the_route_timeout_answers_504_on_time() {
    let w = world().await;
    let mut c = w.wp.http1("10.96.0.50:80").await;
    for _ in 0..4 {
        let t = Instant::now();
        let a = send1(&mut c, req("GET", "pertry", "/", &[])).await;
        assert_eq!((a.status, a.backend()), (200, "fast"), "{a:?}");
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
    }
    assert!(w.backends["slow"].state.requests.load(Ordering::SeqCst) >= 1);

    let mut c = w.wp.http1("10.96.0.60:80").await;
    let t = Instant::now();
    let a = send1(&mut c, req("GET", "stuck", "/", &[])).await;
    let took = t.elapsed();
    assert_eq!(a.status, 504, "{a:?}");
    assert_eq!(a.body, "upstream request timeout");
    // 500 ms ± 20%.
    assert!(
        took >= Duration::from_millis(400) && took <= Duration::from_millis(600),
        "{took:?}"
    );
}

#[tokio::test]
async fn waypoint_multiplexes_100_streams_on_one_http2_connection() {
    let w = world().await;
    let c = w.wp.http2("10.96.0.10:80").await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let r = http::Request::builder()
                .uri(format!("http://web.shop.svc.cluster.local/api/{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            c.ready().await.unwrap();
            let r = c.send_request(r).await.unwrap();
            r.status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
}

#[tokio::test]
async fn waypoint_refuses_bad_xds_and_keeps_the_last_good_config() {
    let w = world().await;
    let before = w.wp.config.borrow().clone();
    let garbage = ambit_xds::envoy::Any {
        type_url: ambit_xds::type_url::LISTENER.into(),
        value: vec![0xff, 0xff, 0xff],
    };
    let e =
        w.wp.apply_raw(
            ambit_xds::type_url::LISTENER,
            vec![("bad".into(), garbage)],
            vec![],
        )
        .unwrap_err();
    assert!(e.to_string().contains("resource bad"), "{e}");
    // An unsupported behaviour-changing field is refused with its reason, too.
    use envoy_types::pb::envoy::config::cluster::v3 as cluster;
    use prost::Message;
    let c = cluster::Cluster {
        name: "c".into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::StrictDns as i32,
        )),
        ..Default::default()
    };
    let any = ambit_xds::envoy::Any {
        type_url: ambit_xds::type_url::CLUSTER.into(),
        value: c.encode_to_vec(),
    };
    let e =
        w.wp.apply_raw(
            ambit_xds::type_url::CLUSTER,
            vec![("c".into(), any)],
            vec![],
        )
        .unwrap_err();
    assert!(e.to_string().contains("only EDS clusters"), "{e}");
    // A mirror policy naming its cluster by header is refused, not ignored.
    use envoy_types::pb::envoy::config::route::v3 as route;
    let rc = route::RouteConfiguration {
        name: "web.shop.svc.cluster.local:80".into(),
        virtual_hosts: vec![route::VirtualHost {
            name: "any".into(),
            domains: vec!["*".into()],
            routes: vec![route::Route {
                r#match: Some(route::RouteMatch {
                    path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::route::Action::Route(route::RouteAction {
                    cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                        "outbound|80||web-v1.shop.svc.cluster.local".into(),
                    )),
                    request_mirror_policies: vec![route::route_action::RequestMirrorPolicy {
                        cluster_header: "x-mirror-to".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let any = ambit_xds::envoy::Any {
        type_url: ambit_xds::type_url::ROUTE.into(),
        value: rc.encode_to_vec(),
    };
    let e =
        w.wp.apply_raw(
            ambit_xds::type_url::ROUTE,
            vec![(rc.name.clone(), any)],
            vec![],
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("cluster_header is not supported"),
        "{e}"
    );
    assert!(std::sync::Arc::ptr_eq(&before, &w.wp.config.borrow()));
    // And it still serves.
    let mut c = w.wp.http1("10.96.0.10:80").await;
    let a = send1(&mut c, req("GET", "web", "/api", &[])).await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn waypoint_config_changes_do_not_drop_requests_in_flight() {
    let w = world().await;
    w.backends["v1"].state.delay_ms.store(500, Ordering::SeqCst);
    let mut c = w.wp.http1("10.96.0.20:80").await;
    // Force v1 by making the split 100/0.
    let m = mesh().replace(
        "weight: 80}, {name: web-v2, port: 80, weight: 20}",
        "weight: 1}, {name: web-v2, port: 80, weight: 0}",
    );
    w.wp.apply(&model(&m)).unwrap();
    let inflight = tokio::spawn(async move { send1(&mut c, req("GET", "split", "/", &[])).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Now send everything to v2 instead, while the request is waiting on v1.
    let m = mesh().replace(
        "weight: 80}, {name: web-v2, port: 80, weight: 20}",
        "weight: 0}, {name: web-v2, port: 80, weight: 1}",
    );
    w.wp.apply(&model(&m)).unwrap();
    let a = inflight.await.unwrap();
    assert_eq!((a.status, a.backend()), (200, "v1"));
    let mut c = w.wp.http1("10.96.0.20:80").await;
    let a = send1(&mut c, req("GET", "split", "/", &[])).await;
    assert_eq!((a.status, a.backend()), (200, "v2"));
}

#[tokio::test]
async fn waypoint_refuses_tunnels_to_what_it_does_not_serve() {
    let w = world().await;
    // web-v1 has no waypoint: this waypoint has no listener for it.
    let e = w.wp.tunnel("10.96.0.11:80").await.unwrap_err();
    assert!(e.to_string().contains("400"), "{e}");
}

#[tokio::test]
async fn waypoint_enforces_the_l4_policies_that_select_its_pods() {
    let w = world().await;
    let policy = |action: &str, principal: &str| {
        format!(
            "{}\npolicies:\n  - name: wp-l4\n    namespace: shop\n    selector: {{gateway.networking.k8s.io/gateway-name: wp}}\n    action: {action}\n    rules: [{{from: [{{principals: [{principal}]}}], to: [{{ports: [80]}}]}}]\n",
            mesh()
        )
    };
    // Only another identity is allowed: the test client's tunnel is refused (401).
    w.wp.apply(&model(&policy("ALLOW", "cluster.local/ns/shop/sa/other")))
        .unwrap();
    let e = w.wp.tunnel("10.96.0.10:80").await.unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");
    // Allowed by name.
    w.wp.apply(&model(&policy("ALLOW", "cluster.local/ns/shop/sa/client")))
        .unwrap();
    let mut c = w.wp.http1("10.96.0.10:80").await;
    assert_eq!(
        send1(&mut c, req("GET", "web", "/api", &[])).await.status,
        200
    );
    // Denied by name.
    w.wp.apply(&model(&policy("DENY", "cluster.local/ns/shop/sa/client")))
        .unwrap();
    assert!(w.wp.tunnel("10.96.0.10:80").await.is_err());
    // A connection rate limit on the waypoint's pods: the burst, then 429, per caller.
    w.wp.apply(&model(&format!(
        "{}\npolicies:\n  - name: wp-rate\n    namespace: shop\n    selector: {{gateway.networking.k8s.io/gateway-name: wp}}\n    action: RATE_LIMIT\n    connectionRateLimit: {{connections: 1, unit: Hour, burst: 2}}\n",
        mesh()
    )))
    .unwrap();
    for _ in 0..2 {
        let mut c = w.wp.http1("10.96.0.10:80").await;
        assert_eq!(
            send1(&mut c, req("GET", "web", "/api", &[])).await.status,
            200
        );
    }
    let e = w.wp.tunnel("10.96.0.10:80").await.unwrap_err();
    assert!(e.to_string().contains("429"), "{e}");
    // No policy: open again.
    w.wp.apply(&model(&mesh())).unwrap();
    assert!(w.wp.tunnel("10.96.0.10:80").await.is_ok());
}

/// Raw bytes through a tunnel; what comes back until the waypoint closes or 2 s pass.
async fn raw(w: &World, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = w.wp.tunnel("10.96.0.10:80").await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn waypoint_refuses_malformed_http_and_keeps_serving() {
    let w = world().await;
    // Conflicting framing (request smuggling's raw material).
    let r = raw(
        &w,
        b"POST /api HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r:?}");
    let r = raw(
        &w,
        b"POST /api HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r:?}");
    // Oversized headers.
    let big = format!(
        "GET /api HTTP/1.1\r\nHost: web\r\nx-big: {}\r\n\r\n",
        "a".repeat(128 * 1024)
    );
    let r = raw(&w, big.as_bytes()).await;
    assert!(
        r.starts_with("HTTP/1.1 431") || r.starts_with("HTTP/1.1 400") || r.is_empty(),
        "{r:?}"
    );
    // Not HTTP at all, and a broken HTTP/2 connection (preface, then a frame of an
    // unknown stream state: DATA on stream 0).
    let _ = raw(&w, b"\x00\x01\x02garbage\r\n\r\n").await;
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
    h2.extend_from_slice(&[0, 0, 4, 0, 0, 0, 0, 0, 0, b'x', b'x', b'x', b'x']); // DATA on 0
    let r = raw(&w, &h2).await;
    // A GOAWAY (type 7) comes back before the close.
    assert!(
        r.as_bytes().windows(2).any(|x| x == [7, 0]) || r.is_empty(),
        "{r:?}"
    );
    // Nothing else was disturbed.
    let mut c = w.wp.http1("10.96.0.10:80").await;
    assert_eq!(
        send1(&mut c, req("GET", "web", "/api", &[])).await.status,
        200
    );
    let c2 = w.wp.http2("10.96.0.10:80").await;
    let mut c2 = c2.clone();
    c2.ready().await.unwrap();
    let r = c2
        .send_request(
            http::Request::builder()
                .uri("http://web/api")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A server-first TCP service: greets, then echoes every byte.
async fn tcp_echo() -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                s.write_all(b"220 db ready\n").await?;
                let (mut r, mut w) = s.split();
                tokio::io::copy(&mut r, &mut w).await?;
                w.shutdown().await
            });
        }
    });
    addr
}

#[tokio::test]
async fn waypoint_forwards_tcp_ports_at_l4_without_waiting_for_the_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = world().await;
    w.wp.map("10.244.2.19:5432", tcp_echo().await);
    w.wp.apply(&model(&mesh())).unwrap();
    let mut s = w.wp.tunnel("10.96.0.70:5432").await.unwrap();
    // The server speaks first: its greeting arrives before the client sends anything (the
    // port's declared protocol decides, nothing is sniffed).
    let mut greeting = [0u8; 13];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greeting))
        .await
        .expect("the greeting was held back")
        .unwrap();
    assert_eq!(&greeting, b"220 db ready\n");
    // Then 1 MiB both ways, byte exact, and the client's half-close reaches the server.
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let (mut r, mut wr) = tokio::io::split(s);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await.unwrap();
        wr.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut back))
        .await
        .expect("the echo did not end")
        .unwrap();
    writer.await.unwrap();
    assert!(back == data, "{} bytes came back", back.len());
}

#[tokio::test]
async fn waypoint_plaintext_listener_serves_one_service_without_tls() {
    let w = world().await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        w.wp.inbound
            .clone()
            .serve_plaintext(l, "10.96.0.10:80".parse().unwrap()),
    );
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut c, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    // The service's routes, as over HBONE.
    let a = send1(&mut c, req("GET", "web", "/exact", &[])).await;
    assert_eq!((a.status, a.backend()), (200, "v2"), "{a:?}");
    let a = send1(&mut c, req("GET", "web", "/api", &[])).await;
    assert_eq!((a.status, a.backend()), (200, "v1"), "{a:?}");
    // Without TLS there is no caller identity.
    let m = w.wp.metrics.encode();
    assert!(m.contains("source_principal=\"unknown\""), "{m}");
}
