//! The control plane's security on Kubernetes, against the API server stand-in: the CA
//! root in a Secret shared by replicas and published in a ConfigMap; callers of xDS and
//! the CA authenticated by pod-bound ServiceAccount tokens (TokenReview), each agent
//! served and certified only for its own node. Every test name starts with `kube`.

use std::sync::Arc;
use std::time::Duration;

use ambit_control_plane::ads::AdsServer;
use ambit_control_plane::auth::kubernetes::{AUDIENCE, TokenReviews};
use ambit_control_plane::ca::secret::{
    ROOT_CERT_KEY, SecretError, load_or_create, publish_root, publish_root_to_waypoints,
};
use ambit_control_plane::ca::{CaService, CertificateAuthority};
use ambit_control_plane::snapshots;
use ambit_control_plane::source::kubernetes::{KubeSource, Options};
use ambit_identity::Identity;
use ambit_node_agent::identity::ca_client::{CaClient, RequestError, request};
use ambit_tests::kube_api::{ApiServer, Token};
use ambit_xds::channel::ControlPlane;
use ambit_xds::envoy::{AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest, Node};
use serde_json::{Value, json};
use tokio_stream::StreamExt;

fn pod(ns: &str, name: &str, node: &str, ip: &str, sa: &str, host_network: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}")},
           "spec": {"nodeName": node, "serviceAccountName": sa, "hostNetwork": host_network,
                    "containers": [{"name": "c", "image": "c"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

/// Two nodes, a workload on each, and an agent pod on each.
fn cluster() -> ApiServer {
    let api = ApiServer::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": "shop", "labels": {"ambit.dev/dataplane": "ambient"}}}));
    api.apply(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ambit-system"}}),
    );
    for n in ["node-1", "node-2"] {
        api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}));
    }
    for (ns, sa) in [
        ("shop", "web"),
        ("shop", "db"),
        ("shop", "wp"),
        ("ambit-system", "ambit-agent"),
    ] {
        api.apply(ambit_tests::cluster::service_account(ns, sa));
    }
    api.apply(pod("shop", "web-0", "node-1", "10.244.1.10", "web", false));
    api.apply(pod("shop", "db-0", "node-2", "10.244.2.10", "db", false));
    api.apply(pod(
        "ambit-system",
        "agent-a",
        "node-1",
        "172.18.0.1",
        "ambit-agent",
        true,
    ));
    api.apply(pod(
        "ambit-system",
        "agent-b",
        "node-2",
        "172.18.0.2",
        "ambit-agent",
        true,
    ));
    api
}

fn token(ns: &str, sa: &str, pod: Option<&str>) -> Token {
    Token {
        service_account: (ns.into(), sa.into()),
        pod: pod.map(str::to_owned),
        node_in_extra: true,
        audiences: vec![AUDIENCE.into()],
        expired: false,
    }
}

async fn client(api: &ApiServer) -> kube::Client {
    let path = std::env::temp_dir().join(format!(
        "ambit-kube-sec-{}-{}.kubeconfig",
        std::process::id(),
        api.addr().port()
    ));
    api.write_kubeconfig(&path).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    ambit_hbone::tls::install_default();
    kube::Client::try_from(config).unwrap()
}

#[tokio::test]
async fn kube_ca_root_is_one_secret_for_every_replica_and_published_for_agents() {
    let api = cluster();
    let c = client(&api).await;
    // Three replicas starting together: one creates the Secret, all use its root.
    let (a, b, d) = tokio::join!(
        load_or_create(&c, "ambit-system", "ambit-ca"),
        load_or_create(&c, "ambit-system", "ambit-ca"),
        load_or_create(&c, "ambit-system", "ambit-ca"),
    );
    let (a, b, d) = (a.unwrap(), b.unwrap(), d.unwrap());
    assert!(a == b && b == d, "one root for every replica");
    let stored = api.get("Secret", "ambit-system", "ambit-ca").unwrap();
    assert_eq!(stored["type"], "kubernetes.io/tls");
    assert!(stored["data"]["tls.key"].is_string());
    let ca = CertificateAuthority::from_pem(
        &a.0,
        &a.1,
        Duration::from_secs(60),
        Duration::from_secs(60),
    )
    .unwrap();
    // A restart reads it again.
    assert_eq!(
        load_or_create(&c, "ambit-system", "ambit-ca")
            .await
            .unwrap(),
        a
    );

    // Published for agents; publishing again (another replica) changes nothing, and a
    // stale ConfigMap is brought up to date.
    publish_root(&c, "ambit-system", "ambit-root-cert", ca.root_pem())
        .await
        .unwrap();
    let cm = api
        .get("ConfigMap", "ambit-system", "ambit-root-cert")
        .unwrap();
    assert_eq!(cm["data"][ROOT_CERT_KEY], a.0);
    let rv = cm["metadata"]["resourceVersion"].clone();
    publish_root(&c, "ambit-system", "ambit-root-cert", ca.root_pem())
        .await
        .unwrap();
    let cm = api
        .get("ConfigMap", "ambit-system", "ambit-root-cert")
        .unwrap();
    assert_eq!(cm["metadata"]["resourceVersion"], rv, "not rewritten");
    api.apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": "ambit-root-cert", "namespace": "ambit-system"},
                     "data": {ROOT_CERT_KEY: "stale"}}));
    publish_root(&c, "ambit-system", "ambit-root-cert", ca.root_pem())
        .await
        .unwrap();
    let cm = api
        .get("ConfigMap", "ambit-system", "ambit-root-cert")
        .unwrap();
    assert_eq!(cm["data"][ROOT_CERT_KEY], a.0);

    // A Secret of that name that holds no root is an error, not overwritten.
    api.apply(json!({"apiVersion": "v1", "kind": "Secret",
                     "metadata": {"name": "other", "namespace": "ambit-system"},
                     "data": {"password": "aHVudGVyMg=="}}));
    let e = load_or_create(&c, "ambit-system", "other")
        .await
        .unwrap_err();
    assert!(matches!(e, SecretError::NotARoot(_)), "{e}");
    assert!(
        e.to_string()
            .contains("ambit-system/other has no tls.crt and tls.key"),
        "{e}"
    );
    assert_eq!(
        api.get("Secret", "ambit-system", "other").unwrap()["data"],
        json!({"password": "aHVudGVyMg=="})
    );
}

/// A control plane on the Kubernetes source with TokenReview authentication, over TLS
/// on loopback: `(address, root PEM)`. It publishes the root in ConfigMap
/// `ambit-root-cert` of every namespace with a waypoint.
async fn control_plane(api: &ApiServer) -> (String, String) {
    let c = client(api).await;
    let source = tokio::time::timeout(
        Duration::from_secs(20),
        KubeSource::start(
            c.clone(),
            Options {
                trust_domain: "cluster.local".into(),
                hold: Duration::ZERO,
                root_namespace: "ambit-system".into(),
                istio_policies: false,
                gateway_api: true,
            },
        ),
    )
    .await
    .expect("the source syncs");
    let (cert, key) = load_or_create(&c, "ambit-system", "ambit-ca")
        .await
        .unwrap();
    let ca = CertificateAuthority::from_pem(
        &cert,
        &key,
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    )
    .unwrap();
    let auth = Arc::new(TokenReviews::new(c.clone(), "ambit-system/ambit-agent").unwrap());
    let (scert, skey) = ca
        .server_certificate(&["127.0.0.1".into()], Duration::from_secs(3600))
        .unwrap();
    let root = ca.root_pem().to_owned();
    tokio::spawn(publish_root_to_waypoints(
        c.clone(),
        "ambit-root-cert".into(),
        root.clone(),
        source.models.clone(),
    ));
    let ads = AdsServer::new(snapshots(source.models.clone())).authenticated_by(auth.clone());
    let ca = CaService::new(Arc::new(ca), auth, source.models.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    ambit_hbone::tls::install_default();
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(scert, skey));
    tokio::spawn(async move {
        let _keep = source;
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(ads.into_service())
            .add_service(ca.into_service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    (format!("https://{addr}"), root)
}

/// The workload names of the first xDS answer to `claimed`, or the refusal.
async fn subscribe(cp: &ControlPlane, claimed: &str) -> Result<Vec<String>, tonic::Status> {
    let mut client = AggregatedDiscoveryServiceClient::new(cp.channel());
    let first = DeltaDiscoveryRequest {
        node: Some(Node {
            id: claimed.into(),
            ..Default::default()
        }),
        type_url: ambit_xds::type_url::WORKLOAD.into(),
        ..Default::default()
    };
    let mut req = tonic::Request::new(tokio_stream::iter([first]).chain(tokio_stream::pending()));
    cp.authorize(&mut req);
    let mut responses = client.delta_aggregated_resources(req).await?.into_inner();
    let r = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("an answer")?
        .expect("a response");
    Ok(r.resources.into_iter().map(|r| r.name).collect())
}

/// A CA client (and its control-plane channel) presenting `token`.
fn as_caller(url: &str, root: &str, token: &str) -> CaClient {
    CaClient {
        control_plane: ControlPlane::new(url, Some(token), Some(root)).unwrap(),
        ttl: Duration::from_secs(600),
    }
}

fn ca_code(r: Result<impl Sized, RequestError>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(RequestError::Ca(s)) => s.code(),
        Err(e) => panic!("not an answer from the CA: {e}"),
    }
}

#[tokio::test]
async fn kube_agents_authenticate_with_pod_bound_tokens_and_get_only_their_nodes_view_and_certs() {
    let api = cluster();
    let (url, root) = control_plane(&api).await;
    let as_caller = |token: &str| as_caller(&url, &root, token);
    let web = Identity::new("cluster.local", "shop", "web").unwrap();
    let db = Identity::new("cluster.local", "shop", "db").unwrap();

    // node-1's agent: its node's view, its node's workloads' certificates, nothing else.
    api.issue_token(
        "tok-a",
        token("ambit-system", "ambit-agent", Some("agent-a")),
    );
    let a = as_caller("tok-a");
    assert_eq!(
        subscribe(&a.control_plane, "node-1").await.unwrap().len(),
        2
    );
    let e = subscribe(&a.control_plane, "node-2").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert_eq!(ca_code(request(&a, &web).await), tonic::Code::Ok);
    assert_eq!(
        ca_code(request(&a, &db).await),
        tonic::Code::PermissionDenied
    );
    // Accepted tokens are remembered: reconnecting costs no review.
    let reviews = api.token_reviews();
    subscribe(&a.control_plane, "").await.unwrap();
    assert_eq!(api.token_reviews(), reviews);

    // An API server that does not name the node in the review: the bound pod's node.
    let mut b = token("ambit-system", "ambit-agent", Some("agent-b"));
    b.node_in_extra = false;
    api.issue_token("tok-b", b);
    let b = as_caller("tok-b");
    assert_eq!(ca_code(request(&b, &db).await), tonic::Code::Ok);
    assert_eq!(
        ca_code(request(&b, &web).await),
        tonic::Code::PermissionDenied
    );

    // Refused: an expired token, one for another audience, an unknown one, a workload's
    // own token, and an agent token not bound to a pod.
    let mut expired = token("ambit-system", "ambit-agent", Some("agent-a"));
    expired.expired = true;
    api.issue_token("tok-expired", expired);
    let mut other = token("ambit-system", "ambit-agent", Some("agent-a"));
    other.audiences = vec!["https://kubernetes.default.svc.cluster.local".into()];
    api.issue_token("tok-audience", other);
    api.issue_token("tok-web", token("shop", "web", Some("web-0")));
    api.issue_token("tok-unbound", token("ambit-system", "ambit-agent", None));
    for (t, code, says) in [
        ("tok-expired", tonic::Code::Unauthenticated, "expired"),
        (
            "tok-audience",
            tonic::Code::Unauthenticated,
            "invalid for the target audiences",
        ),
        ("made-up", tonic::Code::Unauthenticated, "refuses the token"),
        (
            "tok-web",
            tonic::Code::PermissionDenied,
            "subscribes with its mesh certificate",
        ),
        (
            "tok-unbound",
            tonic::Code::Unauthenticated,
            "not bound to a pod",
        ),
    ] {
        let c = as_caller(t);
        let e = subscribe(&c.control_plane, "node-1").await.unwrap_err();
        assert_eq!(e.code(), code, "{t}: {e}");
        assert!(e.message().contains(says), "{t}: {e}");
        assert_eq!(ca_code(request(&c, &web).await), code, "{t}");
    }

    // A token whose pod was deleted (and recreated under the same name) is dead.
    api.issue_token(
        "tok-old-b",
        token("ambit-system", "ambit-agent", Some("agent-b")),
    );
    api.delete("Pod", "ambit-system", "agent-b");
    let mut again = pod(
        "ambit-system",
        "agent-b",
        "node-2",
        "172.18.0.2",
        "ambit-agent",
        true,
    );
    again["metadata"]["uid"] = json!("uid-new-agent-b");
    api.apply(again);
    let e = subscribe(&as_caller("tok-old-b").control_plane, "node-2")
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");

    // The API server unreachable: the caller is told to come back, not that it is bad.
    drop(api);
    let e = subscribe(&as_caller("tok-new").control_plane, "node-1")
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
}

#[tokio::test]
async fn kube_a_waypoint_pod_gets_only_its_waypoints_certificate_with_its_own_token() {
    let api = cluster();
    // Waypoint shop/wp: a Gateway of class ambit-waypoint and its pod (service account wp).
    api.apply(
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": "shop"},
        "spec": {"gatewayClassName": "ambit-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
    );
    let mut wp = pod("shop", "wp-0", "node-2", "10.244.2.20", "wp", false);
    wp["metadata"]["labels"] = json!({"gateway.networking.k8s.io/gateway-name": "wp"});
    api.apply(wp);
    // A pod that claims the label without a Gateway of its name is no waypoint's.
    let mut fake = pod("shop", "fake-0", "node-1", "10.244.1.30", "wp", false);
    fake["metadata"]["labels"] = json!({"gateway.networking.k8s.io/gateway-name": "nope"});
    api.apply(fake);
    let (url, root) = control_plane(&api).await;
    let as_caller = |token: &str| as_caller(&url, &root, token);
    let wp_id = Identity::new("cluster.local", "shop", "wp").unwrap();
    let web = Identity::new("cluster.local", "shop", "web").unwrap();

    // Its own token, bound to its pod: its identity, and nothing else; no xDS by token
    // (a waypoint subscribes with the certificate it got).
    api.issue_token("tok-wp", token("shop", "wp", Some("wp-0")));
    let wp = as_caller("tok-wp");
    let cert = request(&wp, &wp_id)
        .await
        .expect("the waypoint's certificate");
    assert_eq!(cert.identity, wp_id);
    let e = request(&wp, &web).await.unwrap_err();
    assert!(
        matches!(&e, RequestError::Ca(s) if s.code() == tonic::Code::PermissionDenied && s.message().contains("is spiffe://cluster.local/ns/shop/sa/wp, not")),
        "{e}"
    );
    let e = subscribe(&wp.control_plane, "shop/wp").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    // The same service account's token bound to a pod that is not the waypoint's, and an
    // application pod's token for its own identity: refused (its agent holds that).
    api.issue_token("tok-fake", token("shop", "wp", Some("fake-0")));
    let e = request(&as_caller("tok-fake"), &wp_id).await.unwrap_err();
    assert!(
        matches!(&e, RequestError::Ca(s) if s.code() == tonic::Code::PermissionDenied && s.message().contains("not a waypoint's")),
        "{e}"
    );
    api.issue_token("tok-web", token("shop", "web", Some("web-0")));
    assert_eq!(
        ca_code(request(&as_caller("tok-web"), &web).await),
        tonic::Code::PermissionDenied
    );

    // The waypoint's namespace got the root, which its pods verify the control plane with.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(cm) = api.get("ConfigMap", "shop", "ambit-root-cert") {
            assert_eq!(cm["data"][ROOT_CERT_KEY], json!(root));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no root in shop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        api.get("ConfigMap", "ambit-system", "ambit-root-cert")
            .is_none()
    );
}

#[tokio::test]
async fn kube_a_deleted_service_account_revokes_its_identity() {
    let api = cluster();
    let (url, root) = control_plane(&api).await;
    api.issue_token(
        "tok-a",
        token("ambit-system", "ambit-agent", Some("agent-a")),
    );
    let a = as_caller(&url, &root, "tok-a");
    let web = Identity::new("cluster.local", "shop", "web").unwrap();
    assert_eq!(ca_code(request(&a, &web).await), tonic::Code::Ok);
    // `kubectl delete serviceaccount web -n shop`: web-0 keeps running (and captured),
    // but its identity is revoked: no certificate for it any more.
    api.delete("ServiceAccount", "shop", "web").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let e = loop {
        match request(&a, &web).await {
            Err(RequestError::Ca(s)) => break s,
            r => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still issued: {r:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("does not exist"), "{e:?}");
    // Created again, it is current again.
    api.apply(ambit_tests::cluster::service_account("shop", "web"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while request(&a, &web).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "not issued again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
