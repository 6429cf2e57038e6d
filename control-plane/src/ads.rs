//! The Aggregated Discovery Service: state-of-the-world (`StreamAggregatedResources`) and
//! incremental (`DeltaAggregatedResources`) xDS over one gRPC stream per node agent, as
//! Envoy's xDS protocol specifies.
//!
//! Each stream runs as one task that owns its protocol state (subscriptions, nonces,
//! what the client has) and reacts to two things: a request from the client, or a new
//! [`Snapshot`]. The node is named by the first request's `node.id`; it sees
//! what [`Snapshot::resources`] gives that node.
//!
//! - A response is only sent when something the client subscribed to differs from what
//!   it was last sent, so a NACKed version is never resent in a loop: the server waits for
//!   the next model change.
//! - A request whose `response_nonce` is not the latest one sent for its type is stale:
//!   its ACK/NACK is ignored (its delta subscription changes still apply).
//! - NACKs are logged with the client's `error_detail` and recorded in [`AdsStats`].

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ambit_xds::envoy::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use indexmap::IndexMap;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::auth::{Authenticator, Caller, authenticate, workload_of};
use crate::translate::{Snapshot, VersionedResource, set_version};

/// What the server has seen, for metrics, the admin endpoint and tests.
#[derive(Debug, Default)]
pub struct AdsStats {
    /// Streams opened (either protocol).
    pub streams_opened: AtomicU64,
    /// Responses sent (either protocol).
    pub responses_sent: AtomicU64,
    /// Responses accepted: ACKs to the latest nonce of their type.
    pub acks: AtomicU64,
    nacks: Mutex<Vec<Nack>>,
    /// NACKs by (node, type URL), never trimmed.
    nack_counts: Mutex<BTreeMap<(String, String), u64>>,
}

/// One rejected response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nack {
    /// The node whose agent rejected it.
    pub node: String,
    /// The response's type URL.
    pub type_url: String,
    /// The response's nonce.
    pub nonce: String,
    /// The client's `error_detail` message.
    pub message: String,
}

impl AdsStats {
    /// The last 1000 NACKs.
    pub fn nacks(&self) -> Vec<Nack> {
        self.nacks.lock().unwrap().clone()
    }

    /// NACK counts by (node, type URL).
    pub fn nack_counts(&self) -> BTreeMap<(String, String), u64> {
        self.nack_counts.lock().unwrap().clone()
    }

    fn nack(&self, n: Nack) {
        warn!(node = %n.node, type_url = %n.type_url, nonce = %n.nonce, "client rejected a response: {}", n.message);
        *self
            .nack_counts
            .lock()
            .unwrap()
            .entry((n.node.clone(), n.type_url.clone()))
            .or_default() += 1;
        let mut v = self.nacks.lock().unwrap();
        if v.len() == 1000 {
            v.remove(0);
        }
        v.push(n);
    }
}

/// The ADS service.
#[derive(Clone, Debug)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stats: Arc<AdsStats>,
    auth: Option<Arc<dyn Authenticator>>,
}

impl AdsServer {
    /// Serves each snapshot published on `snapshots`.
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>) -> Self {
        Self {
            snapshots,
            stats: Arc::default(),
            auth: None,
        }
    }

    /// Serves only callers `auth` authenticates, each only its own node's view: a stream
    /// whose `node.id` is not the node its credential names is refused
    /// (`PERMISSION_DENIED`). Without this (in-process tests and benchmarks), the first
    /// request's `node.id` is believed.
    pub fn authenticated_by(mut self, auth: Arc<dyn Authenticator>) -> Self {
        self.auth = Some(auth);
        self
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Option<Caller>, Status> {
        if self.auth.is_none() {
            return Ok(None);
        }
        // A verified client certificate (a waypoint's SPIFFE identity) comes first.
        if let Some(id) = workload_of(request)? {
            return Ok(Some(Caller::Workload(id)));
        }
        match &self.auth {
            Some(auth) => match authenticate(&**auth, request.metadata()).await? {
                Caller::Pod { namespace, uid } => Err(Status::permission_denied(format!(
                    "pod {namespace}/{uid}: a workload subscribes with its mesh certificate, not a token"
                ))),
                caller => Ok(Some(caller)),
            },
            None => Ok(None),
        }
    }

    /// What the server has seen, shared and live.
    pub fn stats(&self) -> Arc<AdsStats> {
        self.stats.clone()
    }

    /// The gRPC service, ready to add to a server.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(open::<SotwStream>(
            self,
            caller,
            request.into_inner(),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(open::<DeltaStream>(
            self,
            caller,
            request.into_inner(),
        )))
    }
}

/// Types this server serves; requests for others are answered with nothing.
fn known_type(type_url: &str) -> Option<&'static str> {
    ambit_xds::type_url::NODE_AGENT
        .into_iter()
        .chain(ambit_xds::type_url::WAYPOINT)
        .find(|t| *t == type_url)
}

/// What a subscription covers.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Names {
    Wildcard,
    Only(BTreeSet<String>),
}

impl Names {
    fn from_request(names: &[String]) -> Self {
        if names.is_empty() || names.iter().any(|n| n == "*") {
            Names::Wildcard
        } else {
            Names::Only(names.iter().cloned().collect())
        }
    }

    fn covers(&self, name: &str) -> bool {
        match self {
            Names::Wildcard => true,
            Names::Only(s) => s.contains(name),
        }
    }
}

/// Nonces are unique per stream: a counter is enough.
#[derive(Debug, Default)]
struct Nonces(u64);

impl Nonces {
    fn next(&mut self) -> String {
        self.0 += 1;
        self.0.to_string()
    }
}

// ---------------------------------------------------------------- the stream loop

/// What every stream has, whichever protocol variant it speaks.
struct Core<R> {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stats: Arc<AdsStats>,
    tx: mpsc::Sender<Result<R, Status>>,
    /// Named by the first request.
    node: Option<String>,
    /// Who the caller authenticated as, if the server authenticates.
    caller: Option<Caller>,
    nonces: Nonces,
}

/// A protocol variant (state of the world or delta): its state per stream, and what it
/// does on a request and on a new snapshot. [`drive`] runs the loop.
trait Protocol: Sized + Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    /// For logs.
    const NAME: &'static str;
    fn new(core: Core<Self::Response>) -> Self;
    fn core(&mut self) -> &mut Core<Self::Response>;
    /// Handles one request; an error ends the stream with that status.
    fn on_request(&mut self, r: Self::Request) -> impl Future<Output = Result<(), Status>> + Send;
    /// Pushes what a new snapshot changed for every subscribed type; an error means the
    /// client is gone.
    fn on_snapshot(&mut self) -> impl Future<Output = Result<(), ()>> + Send;
}

/// Opens a stream of protocol `P`: its task and the response stream tonic sends.
fn open<P: Protocol>(
    server: &AdsServer,
    caller: Option<Caller>,
    requests: Streaming<P::Request>,
) -> ResponseStream<P::Response>
where
    Streaming<P::Request>: Send,
{
    server.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(16);
    let core = Core {
        snapshots: server.snapshots.clone(),
        stats: server.stats.clone(),
        tx,
        node: None,
        caller,
        nonces: Nonces::default(),
    };
    tokio::spawn(drive(P::new(core), requests));
    Box::pin(ReceiverStream::new(rx))
}

/// The stream's one task: requests and snapshot changes, one at a time, until either
/// side goes away.
async fn drive<P: Protocol>(mut p: P, mut requests: Streaming<P::Request>) {
    loop {
        tokio::select! {
            req = requests.message() => match req {
                Ok(Some(r)) => if let Err(e) = p.on_request(r).await {
                    let _ = p.core().tx.send(Err(e)).await;
                    return;
                },
                Ok(None) | Err(_) => break,
            },
            changed = p.core().snapshots.changed() => {
                if changed.is_err() || p.on_snapshot().await.is_err() { break }
            }
        }
    }
    debug!(node = ?p.core().node, "{} stream closed", P::NAME);
}

// ---------------------------------------------------------------- state of the world

#[derive(Debug)]
struct SotwType {
    names: Names,
    /// Version of the last response sent, and its nonce.
    sent: Option<(String, String)>,
}

struct SotwStream {
    core: Core<DiscoveryResponse>,
    /// In the order the client first asked for them: a new snapshot is pushed in that
    /// order ([`DeltaStream::types`]).
    types: IndexMap<&'static str, SotwType>,
}

impl Protocol for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const NAME: &'static str = "state-of-the-world";

    fn new(core: Core<DiscoveryResponse>) -> Self {
        Self {
            core,
            types: IndexMap::new(),
        }
    }

    fn core(&mut self) -> &mut Core<DiscoveryResponse> {
        &mut self.core
    }

    async fn on_snapshot(&mut self) -> Result<(), ()> {
        let types: Vec<_> = self.types.keys().copied().collect();
        for t in types {
            self.push(t, None).await?;
        }
        Ok(())
    }

    async fn on_request(&mut self, r: DiscoveryRequest) -> Result<(), Status> {
        let node = node_of(
            &mut self.core.node,
            self.core.caller.as_ref(),
            &self.core.snapshots,
            r.node.as_ref().map(|n| n.id.as_str()),
        )?;
        let Some(type_url) = known_type(&r.type_url) else {
            warn!(%node, type_url = %r.type_url, "ignoring a request for an unknown type");
            return Ok(());
        };
        let names = Names::from_request(&r.resource_names);
        let Some(t) = self.types.get_mut(type_url) else {
            // First request for this type: answer unless the client already has it.
            self.types.insert(type_url, SotwType { names, sent: None });
            let has = (!r.version_info.is_empty()).then_some(r.version_info);
            return self
                .push(type_url, has)
                .await
                .map_err(|_| Status::cancelled("stream closed"));
        };
        let latest_nonce = t.sent.as_ref().map(|(_, n)| n.as_str()).unwrap_or("");
        if r.response_nonce != latest_nonce {
            debug!(%node, type_url, nonce = %r.response_nonce, "ignoring a stale request");
            return Ok(());
        }
        if let Some(err) = r.error_detail {
            self.core.stats.nack(Nack {
                node,
                type_url: type_url.into(),
                nonce: r.response_nonce,
                message: err.message,
            });
        } else {
            self.core.stats.acks.fetch_add(1, Ordering::Relaxed);
        }
        if t.names != names {
            t.names = names;
            return self
                .push(type_url, None)
                .await
                .map_err(|_| Status::cancelled("stream closed"));
        }
        Ok(())
    }
}

impl SotwStream {
    /// Sends the current set for `type_url` unless the client has that version (`has`, or
    /// what we last sent).
    async fn push(&mut self, type_url: &'static str, has: Option<String>) -> Result<(), ()> {
        let Some(node) = self.core.node.clone() else {
            return Ok(());
        };
        let snapshot = self.core.snapshots.borrow_and_update().clone();
        let t = self.types.get_mut(type_url).expect("subscribed");
        let set: BTreeMap<String, Arc<VersionedResource>> = snapshot
            .resources(&node, type_url)
            .filter(|r| t.names.covers(&r.name))
            .map(|r| (r.name.clone(), r.clone()))
            .collect();
        let version = set_version(&set);
        if has.as_deref() == Some(version.as_str()) {
            // The client (re)connected with the current version: nothing to send, and
            // its empty nonce stays the latest.
            t.sent = Some((version, String::new()));
            return Ok(());
        }
        if t.sent.as_ref().is_some_and(|(v, _)| *v == version) {
            return Ok(());
        }
        let nonce = self.core.nonces.next();
        t.sent = Some((version.clone(), nonce.clone()));
        let response = DiscoveryResponse {
            version_info: version,
            resources: set.values().map(|r| r.resource.clone()).collect(),
            type_url: type_url.into(),
            nonce,
            ..Default::default()
        };
        self.core
            .stats
            .responses_sent
            .fetch_add(1, Ordering::Relaxed);
        debug!(
            %node,
            type_url,
            resources = response.resources.len(),
            version = %response.version_info,
            "xDS response sent"
        );
        self.core.tx.send(Ok(response)).await.map_err(drop)
    }
}

/// The node named by the stream's first request; later requests may omit it. An
/// authenticated caller may name only its own node (or none: then it is its own).
fn node_of(
    node: &mut Option<String>,
    caller: Option<&Caller>,
    snapshot: &watch::Receiver<Arc<Snapshot>>,
    id: Option<&str>,
) -> Result<String, Status> {
    let id = id.filter(|i| !i.is_empty());
    if let Some(n) = node.as_ref() {
        return Ok(n.clone());
    }
    let chosen = match (caller, id) {
        (Some(Caller::Node(c)), Some(id)) if c != id => {
            warn!(
                claimed = id,
                authenticated = %c,
                "refused a stream claiming another node's id"
            );
            return Err(Status::permission_denied(format!(
                "the credential is node {c:?}'s; it cannot subscribe as node {id:?}"
            )));
        }
        (Some(Caller::Node(c)), _) => c.clone(),
        (Some(Caller::Workload(who)), Some(id)) => {
            let allowed = snapshot.borrow().waypoint_identity(id) == Some(who);
            if !allowed {
                warn!(claimed = id, authenticated = %who, "refused a workload stream for a waypoint it is not");
                return Err(Status::permission_denied(format!(
                    "{who} is not the identity of waypoint {id:?}"
                )));
            }
            id.to_owned()
        }
        (Some(Caller::Workload(who)), None) => {
            return Err(Status::invalid_argument(format!(
                "{who}: a waypoint's first request must carry node.id <namespace>/<name>"
            )));
        }
        (Some(Caller::Pod { .. }), _) => {
            return Err(Status::permission_denied(
                "a pod's token does not subscribe to xDS",
            ));
        }
        (None, Some(id)) => id.to_owned(),
        (None, None) => {
            return Err(Status::invalid_argument(
                "the first request of a stream must carry node.id",
            ));
        }
    };
    info!(node = %chosen, "xDS client connected");
    *node = Some(chosen.clone());
    Ok(chosen)
}

// ---------------------------------------------------------------- incremental (delta)

#[derive(Debug)]
struct DeltaType {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What we believe the client has: name → version.
    client: BTreeMap<String, String>,
    /// The snapshot `client` is the whole view of (wildcard, since its last push), so
    /// the next push can diff snapshots instead of scanning every resource.
    synced_to: Option<Arc<Snapshot>>,
    nonce: String,
}

struct DeltaStream {
    core: Core<DeltaDiscoveryResponse>,
    /// In the order the client first asked for them. A new snapshot is pushed in that
    /// order, so what a client lists first (what the others refer to: workloads before
    /// the services whose endpoints name them, clusters before listeners) arrives first
    /// on every stream. (In a hash map's order, an agent got services before the
    /// workloads of their endpoints in some runs, and then held each endpoint's uid twice.)
    types: IndexMap<&'static str, DeltaType>,
}

impl Protocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";

    fn new(core: Core<DeltaDiscoveryResponse>) -> Self {
        Self {
            core,
            types: IndexMap::new(),
        }
    }

    fn core(&mut self) -> &mut Core<DeltaDiscoveryResponse> {
        &mut self.core
    }

    async fn on_snapshot(&mut self) -> Result<(), ()> {
        let types: Vec<_> = self.types.keys().copied().collect();
        for t in types {
            self.push(t, false, BTreeSet::new()).await?;
        }
        Ok(())
    }

    async fn on_request(&mut self, r: DeltaDiscoveryRequest) -> Result<(), Status> {
        let node = node_of(
            &mut self.core.node,
            self.core.caller.as_ref(),
            &self.core.snapshots,
            r.node.as_ref().map(|n| n.id.as_str()),
        )?;
        let Some(type_url) = known_type(&r.type_url) else {
            warn!(%node, type_url = %r.type_url, "ignoring a request for an unknown type");
            return Ok(());
        };
        let first = !self.types.contains_key(type_url);
        let t = self.types.entry(type_url).or_insert_with(|| DeltaType {
            // Legacy wildcard: a first request that names nothing.
            wildcard: r.resource_names_subscribe.is_empty(),
            names: BTreeSet::new(),
            client: r.initial_resource_versions.clone().into_iter().collect(),
            synced_to: None,
            nonce: String::new(),
        });
        if !first && !r.response_nonce.is_empty() {
            if r.response_nonce != t.nonce {
                debug!(%node, type_url, nonce = %r.response_nonce, "stale ACK/NACK ignored");
            } else if let Some(err) = &r.error_detail {
                self.core.stats.nack(Nack {
                    node: node.clone(),
                    type_url: type_url.into(),
                    nonce: r.response_nonce.clone(),
                    message: err.message.clone(),
                });
            } else {
                self.core.stats.acks.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut newly = BTreeSet::new();
        for n in &r.resource_names_subscribe {
            if n == "*" {
                t.wildcard = true;
            } else if t.names.insert(n.clone()) {
                newly.insert(n.clone());
            }
        }
        for n in &r.resource_names_unsubscribe {
            if n == "*" {
                t.wildcard = false;
            }
            t.names.remove(n);
            if !t.wildcard {
                t.client.remove(n);
            }
        }
        if first || !newly.is_empty() || !r.resource_names_unsubscribe.is_empty() {
            // What the client is meant to have changed: scan for the next push.
            t.synced_to = None;
            return self
                .push(type_url, first, newly)
                .await
                .map_err(|_| Status::cancelled("stream closed"));
        }
        Ok(())
    }
}

impl DeltaStream {
    /// Sends what changed since what the client has. `always`: respond even when nothing
    /// did (the first request of a type, so the client knows it is in sync). `newly`:
    /// names just subscribed, reported as removed if they do not exist.
    async fn push(
        &mut self,
        type_url: &'static str,
        always: bool,
        newly: BTreeSet<String>,
    ) -> Result<(), ()> {
        let Some(node) = self.core.node.clone() else {
            return Ok(());
        };
        let snapshot = self.core.snapshots.borrow_and_update().clone();
        let t = self.types.get_mut(type_url).expect("subscribed");
        let covers = |n: &str| t.wildcard || t.names.contains(n);
        // The client holds all of the last snapshot pushed: what changed since is a
        // diff of the two (O(changes)); otherwise compare versions in place, without a
        // copy of the node's view (O(resources)).
        let diffed = t
            .synced_to
            .as_ref()
            .filter(|_| t.wildcard)
            .and_then(|prev| snapshot.changes_since(prev, &node, type_url));
        let (changed, mut removed) = match diffed {
            Some(d) => {
                debug_assert_eq!(
                    names_of(&d),
                    names_of(&scan(&snapshot, &node, type_url, &t.client, covers)),
                    "the snapshot diff disagrees with the scan"
                );
                d
            }
            None => scan(&snapshot, &node, type_url, &t.client, covers),
        };
        removed.extend(
            newly.into_iter().filter(|n| {
                snapshot.get(&node, type_url, n).is_none() && !t.client.contains_key(n)
            }),
        );
        if changed.is_empty() && removed.is_empty() && !always {
            return Ok(());
        }
        for r in &changed {
            t.client.insert(r.name.clone(), r.version.clone());
        }
        for n in &removed {
            t.client.remove(n);
        }
        t.synced_to = t.wildcard.then(|| snapshot.clone());
        t.nonce = self.core.nonces.next();
        let response = DeltaDiscoveryResponse {
            system_version_info: snapshot.version().to_owned(),
            resources: changed
                .iter()
                .map(|r| Resource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: Some(r.resource.clone()),
                    ..Default::default()
                })
                .collect(),
            type_url: type_url.into(),
            removed_resources: removed,
            nonce: t.nonce.clone(),
            ..Default::default()
        };
        self.core
            .stats
            .responses_sent
            .fetch_add(1, Ordering::Relaxed);
        debug!(
            %node,
            type_url,
            changed = response.resources.len(),
            removed = response.removed_resources.len(),
            version = %response.system_version_info,
            "xDS response sent"
        );
        self.core.tx.send(Ok(response)).await.map_err(drop)
    }
}

/// What differs between the client's versions and `snapshot`'s view for `node`:
/// (resources it lacks or holds in another version, names it holds that are gone or no
/// longer covered).
fn scan(
    snapshot: &Snapshot,
    node: &str,
    type_url: &str,
    client: &BTreeMap<String, String>,
    covers: impl Fn(&str) -> bool,
) -> (Vec<Arc<VersionedResource>>, Vec<String>) {
    let changed = snapshot
        .resources(node, type_url)
        .filter(|r| covers(&r.name) && client.get(&r.name) != Some(&r.version))
        .cloned()
        .collect();
    let removed = client
        .keys()
        .filter(|n| !covers(n) || snapshot.get(node, type_url, n).is_none())
        .cloned()
        .collect();
    (changed, removed)
}

/// The names a push would send, sorted (to compare two ways of finding them).
fn names_of(d: &(Vec<Arc<VersionedResource>>, Vec<String>)) -> (Vec<String>, Vec<String>) {
    let mut changed: Vec<String> =
        d.0.iter()
            .map(|r| format!("{}@{}", r.name, r.version))
            .collect();
    let mut removed = d.1.clone();
    changed.sort();
    removed.sort();
    (changed, removed)
}
