//! xDS over TLS with authenticated callers: the node id is the credential's, not the
//! caller's claim; plaintext and untrusted servers fail.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambit_control_plane::ads::AdsServer;
use ambit_control_plane::auth::NodeTokens;
use ambit_control_plane::ca::CertificateAuthority;
use ambit_control_plane::source::file::parse;
use ambit_control_plane::translate::Snapshot;
use ambit_xds::channel::ControlPlane;
use ambit_xds::envoy::{AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest, Node};
use tokio::sync::watch;

const MESH: &str = "
namespaces: [{name: shop, labels: {ambit.dev/dataplane: ambient}}]
nodes: [{name: node-1}, {name: node-2}]
workloads:
  - {name: web-0, namespace: shop, node: node-1, serviceAccount: web, ips: [10.244.1.10]}
  - {name: db-0, namespace: shop, node: node-2, serviceAccount: db, ips: [10.244.2.10]}
";

struct Server {
    dir: std::path::PathBuf,
    addr: std::net::SocketAddr,
    root: String,
    /// Kept: the server ends its streams when the snapshot sender goes.
    _snapshots: watch::Sender<Arc<Snapshot>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    fn token(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.join("tokens").join(format!("{node}.token")))
            .unwrap()
            .trim()
            .to_owned()
    }
}

async fn start(name: &str) -> Server {
    let dir = std::env::temp_dir().join(format!("ambit-xds-auth-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model = Arc::new(parse(Path::new("t.yaml"), MESH).unwrap());
    let ca = CertificateAuthority::load_or_create(
        &dir.join("ca"),
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    )
    .unwrap();
    let tokens = Arc::new(NodeTokens::new(dir.join("tokens")).unwrap());
    tokens.ensure(&model).unwrap();
    let (cert, key) = ca
        .server_certificate(&["127.0.0.1".into()], Duration::from_secs(3600))
        .unwrap();
    let (tx, rx) = watch::channel(Arc::new(Snapshot::from_model(&model)));
    let ads = AdsServer::new(rx).authenticated_by(tokens);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    ambit_hbone::tls::install_default();
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key));
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(ads.into_service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Server {
        dir,
        addr,
        root: ca.root_pem().to_owned(),
        _snapshots: tx,
    }
}

/// Opens a delta stream as `claimed` with `credential`; the first response's resource
/// names, or the status the server ended the stream with.
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

use tokio_stream::StreamExt;

#[tokio::test]
async fn a_caller_gets_its_own_nodes_view_and_cannot_claim_another_node() {
    let s = start("claims").await;
    let url = format!("https://{}", s.addr);
    let node1 = ControlPlane::new(&url, Some(&s.token("node-1")), Some(&s.root)).unwrap();
    let names = subscribe(&node1, "node-1").await.unwrap();
    assert_eq!(names.len(), 2, "the workloads: {names:?}");
    // Naming no node: the credential's node.
    assert!(subscribe(&node1, "").await.is_ok());

    let e = subscribe(&node1, "node-2").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains("cannot subscribe as node \"node-2\""),
        "{e}"
    );
    // A made-up node id with no credential, or a made-up credential: nothing.
    let anonymous = ControlPlane::new(&url, None, Some(&s.root)).unwrap();
    let e = subscribe(&anonymous, "made-up").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let forged = ControlPlane::new(&url, Some("0123abcd"), Some(&s.root)).unwrap();
    let e = subscribe(&forged, "node-1").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
}

#[tokio::test]
async fn plaintext_and_servers_outside_the_mesh_root_fail() {
    let s = start("tls").await;
    // Plaintext to the TLS port.
    let plain = ControlPlane::new(
        &format!("http://{}", s.addr),
        Some(&s.token("node-1")),
        None,
    )
    .unwrap();
    assert!(subscribe(&plain, "node-1").await.is_err());
    // A client that trusts another root refuses the server.
    let other = start("other-root").await;
    let wrong = ControlPlane::new(
        &format!("https://{}", s.addr),
        Some(&s.token("node-1")),
        Some(&other.root),
    )
    .unwrap();
    let e = subscribe(&wrong, "node-1").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
}
