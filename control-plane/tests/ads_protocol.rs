//! Protocol tests of the ADS server, driven by a client written here from Envoy's xDS
//! protocol description (raw requests), not from the server's code.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambit_control_plane::ads::{AdsServer, AdsStats};
use ambit_control_plane::source::file::parse;
use ambit_control_plane::translate::Snapshot;
use ambit_xds::envoy::{
    AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    DiscoveryRequest, DiscoveryResponse, Node, Status as RpcStatus,
};
use ambit_xds::type_url::{SERVICE, WORKLOAD};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const BASE: &str = "
namespaces: [{name: shop, labels: {ambit.dev/dataplane: ambient}}]
nodes: [{name: node-1}, {name: node-2}]
workloads:
  - {name: a, namespace: shop, node: node-1, ips: [10.244.1.10]}
  - {name: b, namespace: shop, node: node-2, ips: [10.244.2.10]}
services:
  - {name: web, namespace: shop, vips: [10.96.0.10], ports: [{port: 80}], selector: {app: web}}
";

fn snapshot(yaml: &str) -> Arc<Snapshot> {
    Arc::new(Snapshot::from_model(
        &parse(Path::new("test.yaml"), yaml).unwrap_or_else(|e| panic!("{e}")),
    ))
}

/// BASE with an extra workload on node-1 (workloads are the last list but one).
fn base_plus(name: &str, ip: &str) -> String {
    BASE.replace(
        "services:",
        &format!("  - {{name: {name}, namespace: shop, node: node-1, ips: [{ip}]}}\nservices:"),
    )
}

struct Harness {
    snapshots: watch::Sender<Arc<Snapshot>>,
    stats: Arc<AdsStats>,
    client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
}

async fn start() -> Harness {
    let (tx, rx) = watch::channel(snapshot(BASE));
    let server = AdsServer::new(rx);
    let stats = server.stats();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server.into_service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Harness {
        snapshots: tx,
        stats,
        client,
    }
}

fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.into(),
        ..Default::default()
    })
}

/// One ADS stream, driven by hand: requests in, responses out.
struct Rpc<Req, Resp> {
    tx: mpsc::Sender<Req>,
    rx: Streaming<Resp>,
}

impl<Req, Resp> Rpc<Req, Resp> {
    async fn send(&self, r: Req) {
        self.tx.send(r).await.unwrap();
    }

    async fn recv(&mut self) -> Resp {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("no response")
            .unwrap()
            .unwrap()
    }

    /// Nothing arrives for a while.
    async fn quiet(&mut self) {
        if tokio::time::timeout(Duration::from_millis(300), self.rx.message())
            .await
            .is_ok()
        {
            panic!("unexpected response");
        }
    }
}

type Sotw = Rpc<DiscoveryRequest, DiscoveryResponse>;
type Delta = Rpc<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

impl Sotw {
    async fn open(h: &mut Harness) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let rx = h
            .client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }
}

impl Delta {
    async fn open(h: &mut Harness) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let rx = h
            .client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }
}

fn names(r: &DiscoveryResponse) -> Vec<String> {
    use prost::Message;
    r.resources
        .iter()
        .map(|a| {
            ambit_xds::ambit::Workload::decode(a.value.as_slice())
                .unwrap()
                .uid
        })
        .collect()
}

#[tokio::test]
async fn sotw_first_response_ack_and_update() {
    let mut h = start().await;
    let mut s = Sotw::open(&mut h).await;
    s.send(DiscoveryRequest {
        node: node("node-1"),
        type_url: WORKLOAD.into(),
        ..Default::default()
    })
    .await;
    let r1 = s.recv().await;
    assert_eq!(r1.type_url, WORKLOAD);
    assert!(!r1.version_info.is_empty() && !r1.nonce.is_empty());
    assert_eq!(names(&r1), ["shop/a", "shop/b"]);

    // ACK: version and nonce of what we got. The server then stays quiet.
    s.send(DiscoveryRequest {
        type_url: WORKLOAD.into(),
        version_info: r1.version_info.clone(),
        response_nonce: r1.nonce.clone(),
        ..Default::default()
    })
    .await;
    s.quiet().await;

    h.snapshots
        .send(snapshot(&base_plus("c", "10.244.1.11")))
        .unwrap();
    let r2 = s.recv().await;
    assert_ne!(r2.version_info, r1.version_info);
    assert_ne!(r2.nonce, r1.nonce);
    assert_eq!(names(&r2), ["shop/a", "shop/b", "shop/c"]);
    assert_eq!(h.stats.acks.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test]
async fn sotw_nack_is_recorded_and_the_bad_version_not_resent() {
    let mut h = start().await;
    let mut s = Sotw::open(&mut h).await;
    s.send(DiscoveryRequest {
        node: node("node-1"),
        type_url: WORKLOAD.into(),
        ..Default::default()
    })
    .await;
    let r1 = s.recv().await;
    s.send(DiscoveryRequest {
        type_url: WORKLOAD.into(),
        version_info: String::new(), // we keep what we had before: nothing
        response_nonce: r1.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "workload shop/a: bad IP".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    s.quiet().await;
    let nacks = h.stats.nacks();
    assert_eq!(nacks.len(), 1);
    // Counted where operators look: the control plane's metrics.
    let (_, models) = watch::channel(Arc::new(parse(Path::new("t.yaml"), BASE).unwrap()));
    let (_, errors) = watch::channel(None);
    let text = ambit_control_plane::metrics::ControlPlaneMetrics::new(
        h.stats.clone(),
        models,
        errors,
        tokio::sync::watch::channel(None).1,
    )
    .encode();
    assert!(
        text.contains(&format!(
            "ambit_xds_nacks_total{{node=\"node-1\",type_url=\"{WORKLOAD}\"}} 1"
        )),
        "{text}"
    );
    assert!(text.contains("ambit_mesh_source_valid 1"), "{text}");
    assert_eq!(
        (nacks[0].node.as_str(), nacks[0].message.as_str()),
        ("node-1", "workload shop/a: bad IP")
    );

    // The next good version is served normally.
    h.snapshots
        .send(snapshot(&base_plus("c", "10.244.1.11")))
        .unwrap();
    let r2 = s.recv().await;
    assert_ne!(r2.version_info, r1.version_info);
}

#[tokio::test]
async fn sotw_stale_nonces_are_ignored_and_known_versions_not_resent() {
    let mut h = start().await;
    let mut s = Sotw::open(&mut h).await;
    s.send(DiscoveryRequest {
        node: node("node-1"),
        type_url: WORKLOAD.into(),
        ..Default::default()
    })
    .await;
    let r1 = s.recv().await;
    // A request answering a nonce we never got is stale: no NACK recorded, no response.
    s.send(DiscoveryRequest {
        type_url: WORKLOAD.into(),
        response_nonce: "not-a-nonce".into(),
        error_detail: Some(RpcStatus {
            message: "x".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    s.quiet().await;
    assert!(h.stats.nacks().is_empty());

    // Reconnecting with the version we have: the server has nothing to say until it changes.
    let mut s2 = Sotw::open(&mut h).await;
    s2.send(DiscoveryRequest {
        node: node("node-1"),
        type_url: WORKLOAD.into(),
        version_info: r1.version_info.clone(),
        ..Default::default()
    })
    .await;
    s2.quiet().await;
}

#[tokio::test]
async fn sotw_named_subscriptions_and_per_node_views() {
    let mut h = start().await;
    let mut s = Sotw::open(&mut h).await;
    s.send(DiscoveryRequest {
        node: node("node-2"),
        type_url: WORKLOAD.into(),
        resource_names: vec!["shop/b".into()],
        ..Default::default()
    })
    .await;
    assert_eq!(names(&s.recv().await), ["shop/b"]);
}

#[tokio::test]
async fn the_first_request_must_name_the_node() {
    let mut h = start().await;
    let mut s = Sotw::open(&mut h).await;
    s.send(DiscoveryRequest {
        type_url: WORKLOAD.into(),
        ..Default::default()
    })
    .await;
    let err = tokio::time::timeout(Duration::from_secs(5), s.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

fn delta_names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test]
async fn delta_wildcard_adds_updates_and_removes() {
    let mut h = start().await;
    let mut d = Delta::open(&mut h).await;
    d.send(DeltaDiscoveryRequest {
        node: node("node-1"),
        type_url: WORKLOAD.into(),
        ..Default::default()
    })
    .await;
    let r1 = d.recv().await;
    assert_eq!(delta_names(&r1), ["shop/a", "shop/b"]);
    assert!(
        r1.resources
            .iter()
            .all(|r| !r.version.is_empty() && r.resource.is_some())
    );
    d.ack(&r1).await;
    d.quiet().await;

    // Add c: only c is sent.
    h.snapshots
        .send(snapshot(&base_plus("c", "10.244.1.11")))
        .unwrap();
    let r2 = d.recv().await;
    assert_eq!(delta_names(&r2), ["shop/c"]);
    assert!(r2.removed_resources.is_empty());
    d.ack(&r2).await;

    // Back to BASE: c is removed, nothing else is sent.
    h.snapshots.send(snapshot(BASE)).unwrap();
    let r3 = d.recv().await;
    assert!(r3.resources.is_empty());
    assert_eq!(r3.removed_resources, ["shop/c"]);
    d.ack(&r3).await;
    d.quiet().await;
}

#[tokio::test]
async fn delta_resumes_from_initial_resource_versions() {
    let mut h = start().await;
    let mut d = Delta::open(&mut h).await;
    d.send(DeltaDiscoveryRequest {
        node: node("node-1"),
        type_url: WORKLOAD.into(),
        ..Default::default()
    })
    .await;
    let r1 = d.recv().await;
    let have: std::collections::HashMap<String, String> = r1
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();

    // Reconnect knowing a's current version, an old version of b and a workload that is gone.
    let mut initial = have.clone();
    initial.insert("shop/b".into(), "0000000000000000".into());
    initial.insert("shop/gone".into(), "1".into());
    let mut d2 = Delta::open(&mut h).await;
    d2.send(DeltaDiscoveryRequest {
        node: node("node-1"),
        type_url: WORKLOAD.into(),
        initial_resource_versions: initial,
        ..Default::default()
    })
    .await;
    let r = d2.recv().await;
    assert_eq!(delta_names(&r), ["shop/b"]);
    assert_eq!(r.removed_resources, ["shop/gone"]);

    // Knowing everything: an empty response that says "in sync".
    let mut d3 = Delta::open(&mut h).await;
    d3.send(DeltaDiscoveryRequest {
        node: node("node-1"),
        type_url: WORKLOAD.into(),
        initial_resource_versions: have,
        ..Default::default()
    })
    .await;
    let r = d3.recv().await;
    assert!(
        r.resources.is_empty() && r.removed_resources.is_empty(),
        "{r:?}"
    );
}

#[tokio::test]
async fn delta_named_subscribe_unsubscribe_and_nack() {
    let mut h = start().await;
    let mut d = Delta::open(&mut h).await;
    d.send(DeltaDiscoveryRequest {
        node: node("node-1"),
        type_url: SERVICE.into(),
        resource_names_subscribe: vec!["shop/web".into()],
        ..Default::default()
    })
    .await;
    let r1 = d.recv().await;
    assert_eq!(delta_names(&r1), ["shop/web"]);
    // Subscribing to something that does not exist: told it is absent.
    d.send(DeltaDiscoveryRequest {
        type_url: SERVICE.into(),
        response_nonce: r1.nonce.clone(),
        resource_names_subscribe: vec!["shop/nope".into()],
        ..Default::default()
    })
    .await;
    let r2 = d.recv().await;
    assert!(r2.resources.is_empty());
    assert_eq!(r2.removed_resources, ["shop/nope"]);
    // NACK it: recorded with the detail, nothing resent.
    d.send(DeltaDiscoveryRequest {
        type_url: SERVICE.into(),
        response_nonce: r2.nonce.clone(),
        error_detail: Some(RpcStatus {
            message: "no".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    d.quiet().await;
    assert_eq!(h.stats.nacks()[0].message, "no");
}

/// A new snapshot reaches every delta stream type by type in the order the client first
/// subscribed to them (what it lists first is what the others refer to: an agent asks
/// for workloads before the services whose endpoints name them). Several streams, each
/// order twice, so a hash map's order would fail it.
#[tokio::test]
async fn delta_pushes_a_snapshot_in_the_order_types_were_subscribed() {
    let mut h = start().await;
    let mut streams = Vec::new();
    for i in 0..8 {
        let order = if i % 2 == 0 {
            [WORKLOAD, SERVICE]
        } else {
            [SERVICE, WORKLOAD]
        };
        let mut d = Delta::open(&mut h).await;
        for t in order {
            d.send(DeltaDiscoveryRequest {
                node: node("node-1"),
                type_url: t.into(),
                ..Default::default()
            })
            .await;
            let r = d.recv().await;
            assert_eq!(r.type_url, t);
            d.ack(&r).await;
        }
        streams.push((order, d));
    }
    // A web pod: a new workload and a new endpoint of the web service, in one snapshot.
    let yaml = BASE.replace(
        "services:",
        "  - {name: c, namespace: shop, node: node-1, ips: [10.244.1.11], labels: {app: web}}\nservices:",
    );
    h.snapshots.send(snapshot(&yaml)).unwrap();
    for (order, d) in &mut streams {
        for t in *order {
            let r = d.recv().await;
            assert_eq!(
                r.type_url, t,
                "pushed out of the subscription order {order:?}"
            );
            assert_eq!(r.resources.len(), 1);
            d.ack(&r).await;
        }
        d.quiet().await;
    }
}
