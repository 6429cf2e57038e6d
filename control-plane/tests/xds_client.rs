//! The shared xDS client against the control plane's ADS server.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_control_plane::ads::AdsServer;
use ambit_control_plane::source::file::parse;
use ambit_control_plane::translate::Snapshot;
use ambit_xds::client::{ApplyError, Handler, Update, Version, XdsClient, XdsClientConfig};
use ambit_xds::envoy::Any;
use ambit_xds::type_url::{NODE_AGENT, WORKLOAD};
use tokio::sync::watch;

const BASE: &str = "
namespaces: [{name: shop, labels: {ambit.dev/dataplane: ambient}}]
nodes: [{name: node-1}]
workloads:
  - {name: a, namespace: shop, node: node-1, ips: [10.244.1.10]}
  - {name: b, namespace: shop, node: node-1, ips: [10.244.1.11]}
";

fn snapshot(yaml: &str) -> Arc<Snapshot> {
    Arc::new(Snapshot::from_model(
        &parse(Path::new("t.yaml"), yaml).unwrap(),
    ))
}

/// One type's resources by name, with their versions.
type Held = BTreeMap<String, (Version, Any)>;

/// Keeps resources by type and name; refuses any update containing `refuse`.
#[derive(Clone, Default)]
struct Store {
    state: Arc<Mutex<BTreeMap<String, Held>>>,
    applies: Arc<Mutex<Vec<(String, usize, usize)>>>,
    refuse: Arc<Mutex<Option<String>>>,
}

impl Handler for Store {
    fn apply(
        &mut self,
        type_url: &str,
        updated: Vec<Update>,
        removed: Vec<String>,
    ) -> Result<usize, ApplyError> {
        if let Some(bad) = self.refuse.lock().unwrap().as_ref()
            && updated.iter().any(|u| *u.name == **bad)
        {
            return Err(ApplyError::Resource {
                name: bad.clone(),
                source: ambit_xds::convert::DecodeError::Field {
                    field: "uid",
                    problem: "is unacceptable".into(),
                },
            });
        }
        self.applies
            .lock()
            .unwrap()
            .push((type_url.into(), updated.len(), removed.len()));
        let mut s = self.state.lock().unwrap();
        let t = s.entry(type_url.into()).or_default();
        for n in removed {
            t.remove(&n);
        }
        t.extend(
            updated
                .into_iter()
                .map(|u| (u.name.to_string(), (u.version, u.body))),
        );
        Ok(t.len())
    }

    fn held(&self, type_url: &str, each: &mut dyn FnMut(&str, &Version)) {
        for (name, (v, _)) in self
            .state
            .lock()
            .unwrap()
            .get(type_url)
            .into_iter()
            .flatten()
        {
            each(name, v);
        }
    }
}

impl Store {
    fn workloads(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .get(WORKLOAD)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

async fn serve(
    snapshots: watch::Receiver<Arc<Snapshot>>,
    listener: tokio::net::TcpListener,
) -> Arc<ambit_control_plane::ads::AdsStats> {
    let server = AdsServer::new(snapshots);
    let stats = server.stats();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server.into_service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    stats
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn config(addr: std::net::SocketAddr) -> XdsClientConfig {
    XdsClientConfig {
        control_plane: ambit_xds::channel::ControlPlane::new(&format!("http://{addr}"), None, None)
            .unwrap(),
        node_id: "node-1".into(),
        types: NODE_AGENT.to_vec(),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
    }
}

#[tokio::test]
async fn syncs_updates_removes_and_nacks_with_the_handlers_reason() {
    let (tx, rx) = watch::channel(snapshot(BASE));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = serve(rx, listener).await;
    let store = Store::default();
    let client = XdsClient::spawn(config(addr), store.clone());

    eventually("initial sync", || client.status.synced(&NODE_AGENT)).await;
    assert_eq!(store.workloads(), ["shop/a", "shop/b"]);
    assert!(
        client
            .status
            .connected
            .load(std::sync::atomic::Ordering::Acquire)
    );

    // Delta removal reaches the store.
    tx.send(snapshot(&BASE.replace(
        "  - {name: b, namespace: shop, node: node-1, ips: [10.244.1.11]}\n",
        "",
    )))
    .unwrap();
    eventually("removal", || store.workloads() == ["shop/a"]).await;

    // The handler refuses c: NACK with its reason, state unchanged, server counts it.
    *store.refuse.lock().unwrap() = Some("shop/c".into());
    tx.send(snapshot(&format!(
        "{BASE}  - {{name: c, namespace: shop, node: node-1, ips: [10.244.1.12]}}\n"
    )))
    .unwrap();
    eventually("NACK at the server", || !stats.nacks().is_empty()).await;
    assert_eq!(
        stats.nacks()[0].message,
        "resource shop/c: uid: is unacceptable"
    );
    assert_eq!(
        store.workloads(),
        ["shop/a"],
        "a refused update changed state"
    );
    let t = &client.status.types()[WORKLOAD];
    assert_eq!(
        (t.nacks, t.last_error.as_deref()),
        (1, Some("resource shop/c: uid: is unacceptable"))
    );
}

#[tokio::test]
async fn keeps_state_while_the_server_is_away_and_resumes_with_known_versions() {
    let (tx, rx) = watch::channel(snapshot(BASE));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Run the server on a runtime we can drop, to kill it.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let std_listener = listener.into_std().unwrap();
    let rx2 = rx.clone();
    server_rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(std_listener).unwrap();
        serve(rx2, l).await;
        std::future::pending::<()>().await;
    });
    let store = Store::default();
    let client = XdsClient::spawn(config(addr), store.clone());
    eventually("initial sync", || client.status.synced(&NODE_AGENT)).await;
    let applies_before = store.applies.lock().unwrap().len();

    server_rt.shutdown_background();
    eventually("disconnect noticed", || {
        !client
            .status
            .connected
            .load(std::sync::atomic::Ordering::Acquire)
    })
    .await;
    assert_eq!(
        store.workloads(),
        ["shop/a", "shop/b"],
        "state dropped while the server was away"
    );

    // A new server on the same address, same model: the client resubscribes with its
    // versions and gets nothing it already has.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _stats = serve(rx, listener).await;
    eventually("reconnect", || {
        client
            .status
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after: Vec<_> = store.applies.lock().unwrap()[applies_before..].to_vec();
    assert!(
        after
            .iter()
            .all(|(_, updated, removed)| *updated == 0 && *removed == 0),
        "resent known resources: {after:?}"
    );
    drop(tx);
}
