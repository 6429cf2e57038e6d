//! The Kubernetes source: the mesh as the cluster's API server describes it.
//!
//! kube-rs watchers (LIST, then WATCH from the list's resourceVersion, with bookmarks;
//! on 410 Gone or a broken watch they re-list) follow Namespaces, Nodes, Pods, Services,
//! the policy objects and Gateway API's Gateways and HTTPRoutes. Each object is converted when its event arrives ([`convert`]); the model is
//! assembled from the converted objects and built by the same [`Model::build_lenient`]
//! and guard as the file source's, so both sources follow one set of rules.
//!
//! Never a partial view:
//! - nothing is served before every watched kind has been listed once: [`KubeSource::start`]
//!   returns only then, and the xDS server starts after it;
//! - a re-list is buffered (kube's `Init` … `InitDone`) and replaces its kind's objects as
//!   one change, so a watch that restarts never looks like "every pod disappeared";
//! - a model that would still remove most of the mesh at once is held by the guard.
//!
//! Objects the mesh cannot use (a pod without an IP yet, a host-network pod, a headless
//! service) are left out quietly; objects that are wrong (an invalid label value, two
//! pods claiming one IP) are left out with a warning naming them, and the rest of the
//! mesh is served.
//!
//! Policies: Ambit's CRDs ([`policy`]: AuthorizationPolicy, PeerAuthentication,
//! RequestAuthentication) and, with `--watch-istio-policies`, Istio's; each Ambit
//! object's `Accepted` condition is written to its status ([`status`]), including what
//! the model's build found wrong with it (a target without a waypoint).
//!
//! Gateway API ([`gateway`], when its CRDs are installed): Gateways of the `ambit-waypoint`
//! class are waypoints, HTTPRoutes with Service parents their routes; both get status.
//!
//! EndpointSlices give the endpoints of services without a selector (pods only).
//! ServiceAccounts say which identities are current: deleting one revokes its identity
//! (the CA issues it no more certificates), as it revokes its tokens.

pub mod convert;
pub mod gateway;
pub mod policy;
mod status;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, SelectAll, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use self::convert::{PodView, ServiceView, SliceView};
use self::gateway::{GatewayView, RouteView};
use self::policy::Verdict;
use self::policy::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};
use self::status::{PeerView, PolicyView, StatusWriter, istio_spec, peer_view};
use super::guard::Publisher;
use crate::model::authn::RequestAuthenticationSpec;
use crate::model::incremental::IpOwners;
use crate::model::{MTLS_LABEL, MeshSpec, Model, NamespaceSpec, NodeSpec, WaypointSpec};

/// How the Kubernetes source behaves.
#[derive(Clone, Debug)]
pub struct Options {
    /// The mesh's SPIFFE trust domain (the cluster's DNS domain, usually `cluster.local`).
    pub trust_domain: String,
    /// How long a change that removes most of the mesh must persist before it is served.
    pub hold: Duration,
    /// The control plane's namespace: a PeerAuthentication there without a selector is
    /// the mesh-wide default.
    pub root_namespace: String,
    /// Also read Istio's `security.istio.io/v1` AuthorizationPolicy, PeerAuthentication
    /// and RequestAuthentication.
    pub istio_policies: bool,
    /// Read Gateway API `Gateway`s (waypoints) and `HTTPRoute`s: their CRDs are
    /// installed ([`gateway_api_installed`]).
    pub gateway_api: bool,
}

/// Whether the cluster serves Gateway API's `v1` Gateways and HTTPRoutes (their CRDs are
/// not part of Kubernetes itself). Without them the source reads neither, and says so.
pub async fn gateway_api_installed(client: &Client) -> Result<bool, kube::Error> {
    match client
        .list_api_group_resources(&format!("{}/v1", gateway::GROUP))
        .await
    {
        Ok(list) => Ok(["gateways", "httproutes"]
            .iter()
            .all(|p| list.resources.iter().any(|r| r.name == *p))),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// After an event, further events arriving within this of the previous one join its
/// build.
const QUIET: Duration = Duration::from_millis(2);
/// A build waits for at most this long after the first event of its batch.
const BATCH: Duration = Duration::from_millis(100);

/// Serves the model of the cluster, from its first complete listing on.
pub struct KubeSource {
    /// The model being served.
    pub models: watch::Receiver<Arc<Model>>,
    /// What is wrong right now (objects left out, watches failing), if anything.
    pub errors: watch::Receiver<Option<String>>,
    /// Why the cluster's latest model is held back, if it is.
    pub held: watch::Receiver<Option<String>>,
}

/// The kinds the source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1` Namespace.
    Namespaces,
    /// `v1` Node.
    Nodes,
    /// `v1` Pod.
    Pods,
    /// `v1` Service.
    Services,
    /// `discovery.k8s.io/v1` EndpointSlice (endpoints of services without a selector).
    EndpointSlices,
    /// `v1` ServiceAccount (an identity whose ServiceAccount is gone is revoked).
    ServiceAccounts,
    /// `ambit.dev/v1alpha1` AuthorizationPolicy.
    AuthorizationPolicies,
    /// `ambit.dev/v1alpha1` PeerAuthentication.
    PeerAuthentications,
    /// `ambit.dev/v1alpha1` RequestAuthentication.
    RequestAuthentications,
    /// `security.istio.io/v1` AuthorizationPolicy.
    IstioAuthorizationPolicies,
    /// `security.istio.io/v1` PeerAuthentication.
    IstioPeerAuthentications,
    /// `security.istio.io/v1` RequestAuthentication.
    IstioRequestAuthentications,
    /// `gateway.networking.k8s.io/v1` Gateway.
    Gateways,
    /// `gateway.networking.k8s.io/v1` HTTPRoute.
    HttpRoutes,
}

impl Kind {
    /// Every kind the source can watch.
    pub const ALL: [Kind; 14] = [
        Kind::Namespaces,
        Kind::Nodes,
        Kind::Pods,
        Kind::Services,
        Kind::EndpointSlices,
        Kind::ServiceAccounts,
        Kind::AuthorizationPolicies,
        Kind::PeerAuthentications,
        Kind::RequestAuthentications,
        Kind::IstioAuthorizationPolicies,
        Kind::IstioPeerAuthentications,
        Kind::IstioRequestAuthentications,
        Kind::Gateways,
        Kind::HttpRoutes,
    ];

    /// Its resource as RBAC and `kubectl` name it: `plural` or `plural.group`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespaces => "namespaces",
            Kind::Nodes => "nodes",
            Kind::Pods => "pods",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices.discovery.k8s.io",
            Kind::ServiceAccounts => "serviceaccounts",
            Kind::AuthorizationPolicies => "authorizationpolicies.ambit.dev",
            Kind::PeerAuthentications => "peerauthentications.ambit.dev",
            Kind::RequestAuthentications => "requestauthentications.ambit.dev",
            Kind::IstioAuthorizationPolicies => "authorizationpolicies.security.istio.io",
            Kind::IstioPeerAuthentications => "peerauthentications.security.istio.io",
            Kind::IstioRequestAuthentications => "requestauthentications.security.istio.io",
            Kind::Gateways => "gateways.gateway.networking.k8s.io",
            Kind::HttpRoutes => "httproutes.gateway.networking.k8s.io",
        }
    }

    /// Whether the source writes the status of this kind's objects (Ambit's own, and
    /// Gateway API's waypoints and mesh routes; never Istio's).
    pub fn writes_status(self) -> bool {
        matches!(
            self,
            Kind::AuthorizationPolicies
                | Kind::PeerAuthentications
                | Kind::RequestAuthentications
                | Kind::Gateways
                | Kind::HttpRoutes
        )
    }

    /// The kinds watched with these options.
    fn watched(options: &Options) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| match k {
                Kind::IstioAuthorizationPolicies
                | Kind::IstioPeerAuthentications
                | Kind::IstioRequestAuthentications => options.istio_policies,
                Kind::Gateways | Kind::HttpRoutes => options.gateway_api,
                _ => true,
            })
            .collect()
    }
}

/// One event of one of the watchers.
// Events are handled one at a time as they arrive: boxing the large ones would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Change {
    Namespace(Event<Namespace>),
    Node(Event<Node>),
    Pod(Event<Pod>),
    Service(Event<Service>),
    EndpointSlice(Event<EndpointSlice>),
    ServiceAccount(Event<ServiceAccount>),
    Authorization(Event<AuthorizationPolicy>),
    PeerAuthentication(Event<PeerAuthentication>),
    RequestAuthentication(Event<RequestAuthentication>),
    IstioAuthorization(Event<DynamicObject>),
    IstioPeerAuthentication(Event<DynamicObject>),
    IstioRequestAuthentication(Event<DynamicObject>),
    Gateway(Event<DynamicObject>),
    HttpRoute(Event<DynamicObject>),
}

type Changes = SelectAll<BoxStream<'static, (Kind, Result<Change, watcher::Error>)>>;

fn watch_kind<K>(
    api: Api<K>,
    kind: Kind,
    wrap: fn(Event<K>) -> Change,
) -> BoxStream<'static, (Kind, Result<Change, watcher::Error>)>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .map(move |r| (kind, r.map(wrap)))
        .boxed()
}

fn istio(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn changes(client: &Client, options: &Options) -> Changes {
    let mut all = changes_core(client);
    all.push(watch_kind(
        Api::<AuthorizationPolicy>::all(client.clone()),
        Kind::AuthorizationPolicies,
        Change::Authorization,
    ));
    all.push(watch_kind(
        Api::<PeerAuthentication>::all(client.clone()),
        Kind::PeerAuthentications,
        Change::PeerAuthentication,
    ));
    all.push(watch_kind(
        Api::<RequestAuthentication>::all(client.clone()),
        Kind::RequestAuthentications,
        Change::RequestAuthentication,
    ));
    if options.istio_policies {
        let ap = istio("AuthorizationPolicy", "authorizationpolicies");
        all.push(watch_kind(
            Api::<DynamicObject>::all_with(client.clone(), &ap),
            Kind::IstioAuthorizationPolicies,
            Change::IstioAuthorization,
        ));
        let pa = istio("PeerAuthentication", "peerauthentications");
        all.push(watch_kind(
            Api::<DynamicObject>::all_with(client.clone(), &pa),
            Kind::IstioPeerAuthentications,
            Change::IstioPeerAuthentication,
        ));
        let ra = istio("RequestAuthentication", "requestauthentications");
        all.push(watch_kind(
            Api::<DynamicObject>::all_with(client.clone(), &ra),
            Kind::IstioRequestAuthentications,
            Change::IstioRequestAuthentication,
        ));
    }
    if options.gateway_api {
        let gw = gateway::api_resource("Gateway", "gateways");
        all.push(watch_kind(
            Api::<DynamicObject>::all_with(client.clone(), &gw),
            Kind::Gateways,
            Change::Gateway,
        ));
        let routes = gateway::api_resource("HTTPRoute", "httproutes");
        all.push(watch_kind(
            Api::<DynamicObject>::all_with(client.clone(), &routes),
            Kind::HttpRoutes,
            Change::HttpRoute,
        ));
    }
    all
}

fn changes_core(client: &Client) -> Changes {
    futures::stream::select_all([
        watch_kind(
            Api::<Namespace>::all(client.clone()),
            Kind::Namespaces,
            Change::Namespace,
        ),
        watch_kind(Api::<Node>::all(client.clone()), Kind::Nodes, Change::Node),
        watch_kind(Api::<Pod>::all(client.clone()), Kind::Pods, Change::Pod),
        watch_kind(
            Api::<Service>::all(client.clone()),
            Kind::Services,
            Change::Service,
        ),
        watch_kind(
            Api::<EndpointSlice>::all(client.clone()),
            Kind::EndpointSlices,
            Change::EndpointSlice,
        ),
        watch_kind(
            Api::<ServiceAccount>::all(client.clone()),
            Kind::ServiceAccounts,
            Change::ServiceAccount,
        ),
    ])
}

impl KubeSource {
    /// Watches the cluster `client` talks to; returns once every kind has been listed
    /// and the first model is built (until then, logs what it is waiting for every ten
    /// seconds: a missing RBAC permission, an unreachable API server).
    pub async fn start(client: Client, options: Options) -> Self {
        let mut changes = changes(&client, &options);
        let mut view = View::new(&options);
        let status = StatusWriter::new(client.clone());
        let mut report = tokio::time::interval(Duration::from_secs(10));
        report.tick().await;
        while !view.synced() {
            tokio::select! {
                item = changes.next() => match item {
                    Some(item) => view.take(item),
                    None => unreachable!("watchers never end"),
                },
                _ = report.tick() => {
                    let waiting: Vec<&str> = view.kinds.iter().filter(|k| !view.is_synced(**k)).map(|k| k.plural()).collect();
                    warn!(waiting = ?waiting, errors = ?view.watch_errors.values().collect::<Vec<_>>(), "not serving yet: waiting for the first complete list of every watched kind");
                }
            }
        }
        let (model, problems) = view.build(&options.trust_domain);
        status.write(&mut view);
        info!(
            namespaces = model.namespaces.len(),
            nodes = model.nodes.len(),
            workloads = model.workloads.len(),
            services = model.services.len(),
            "cluster listed"
        );
        let mut reporter = Reporter::default();
        let (err_tx, errors) = watch::channel(None);
        reporter.report(&problems, &view.watch_errors, &err_tx);
        let (mut publisher, models, held) =
            Publisher::new("Kubernetes".into(), options.hold, Arc::new(model));
        tokio::spawn(async move {
            loop {
                let held_until = publisher.held_until();
                let hold_timer = async move {
                    match held_until {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    item = changes.next() => {
                        let Some(item) = item else { return };
                        view.take(item);
                        // A burst (a rollout, a re-list, a namespace of pods created)
                        // arrives as a stream of events, each decoded only when polled:
                        // take what follows within QUIET of the previous one, for up to
                        // BATCH, then build once. A lone change waits QUIET at most.
                        let batch_end = tokio::time::Instant::now() + BATCH;
                        while let Ok(Some(item)) = tokio::time::timeout_at(
                            (tokio::time::Instant::now() + QUIET).min(batch_end),
                            changes.next(),
                        )
                        .await
                        {
                            view.take(item);
                        }
                    }
                    _ = hold_timer => {
                        if !publisher.tick() { return }
                        continue;
                    }
                }
                if !view.dirty {
                    reporter.report(&[], &view.watch_errors, &err_tx);
                    continue;
                }
                let (model, problems) = view.build(&options.trust_domain);
                status.write(&mut view);
                reporter.report(&problems, &view.watch_errors, &err_tx);
                if !publisher.offer(Arc::new(model)) {
                    return;
                }
            }
        });
        Self {
            models,
            errors,
            held,
        }
    }
}

/// Logs each problem once when it appears, and keeps `errors` current.
#[derive(Default)]
struct Reporter {
    logged: BTreeSet<String>,
    last: Option<String>,
}

impl Reporter {
    fn report(
        &mut self,
        problems: &[String],
        watch_errors: &BTreeMap<Kind, String>,
        tx: &watch::Sender<Option<String>>,
    ) {
        let now: BTreeSet<String> = problems.iter().cloned().collect();
        for p in now.difference(&self.logged) {
            warn!("in the cluster's objects: {p}");
        }
        self.logged = now;
        let mut all: Vec<String> = watch_errors
            .iter()
            .map(|(k, e)| format!("watching {}: {e}", k.plural()))
            .collect();
        all.extend(self.logged.iter().cloned());
        let summary = (!all.is_empty()).then(|| all.join("; "));
        if summary != self.last {
            self.last = summary.clone();
            let _ = tx.send(summary);
        }
    }
}

/// One kind's converted objects, and its re-list in progress.
struct Table<V> {
    live: HashMap<String, V>,
    /// Between `Init` and `InitDone`: the new listing, which replaces `live` at once.
    relist: Option<HashMap<String, V>>,
    synced: bool,
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Self {
            live: HashMap::new(),
            relist: None,
            synced: false,
        }
    }
}

/// An object's key in its [`Table`]: `namespace/name`.
fn key_of<K: Resource>(o: &K) -> String {
    let m = o.meta();
    format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or(""),
        m.name.as_deref().unwrap_or("")
    )
}

impl<V: PartialEq> Table<V> {
    /// Applies one event, converting objects with `convert(object, its live version)`;
    /// true if the live objects changed.
    fn event<K: Resource>(&mut self, ev: Event<K>, convert: impl Fn(&K, Option<&V>) -> V) -> bool {
        let key = key_of::<K>;
        match ev {
            Event::Apply(o) => {
                let k = key(&o);
                let v = convert(&o, self.live.get(&k));
                if self.live.get(&k) == Some(&v) {
                    return false;
                }
                self.live.insert(k, v);
                true
            }
            Event::Delete(o) => self.live.remove(&key(&o)).is_some(),
            Event::Init => {
                self.relist = Some(HashMap::new());
                false
            }
            Event::InitApply(o) => {
                let k = key(&o);
                let v = convert(&o, self.live.get(&k));
                self.relist.get_or_insert_default().insert(k, v);
                false
            }
            Event::InitDone => {
                let new = self.relist.take().unwrap_or_default();
                let changed = !self.synced || new != self.live;
                self.live = new;
                self.synced = true;
                changed
            }
        }
    }
}

/// Everything the watchers have said, converted.
#[derive(Default)]
struct View {
    /// What is watched.
    kinds: Vec<Kind>,
    root_namespace: String,
    namespaces: Table<Option<NamespaceSpec>>,
    nodes: Table<Option<NodeSpec>>,
    pods: Table<PodView>,
    services: Table<ServiceView>,
    slices: Table<SliceView>,
    service_accounts: Table<Option<crate::model::NamespacedName>>,
    authorizations: Table<PolicyView<policy::Authorization>>,
    peer_authentications: Table<PolicyView<PeerView>>,
    istio_authorizations: Table<PolicyView<policy::Authorization>>,
    istio_peer_authentications: Table<PolicyView<PeerView>>,
    request_authentications: Table<PolicyView<RequestAuthenticationSpec>>,
    istio_request_authentications: Table<PolicyView<RequestAuthenticationSpec>>,
    gateways: Table<GatewayView>,
    routes: Table<Option<RouteView>>,
    /// Per HTTPRoute (`namespace/name`): why the last build left it out.
    route_problems: HashMap<String, Vec<String>>,
    /// Per policy object (its model name's kind, `namespace/name`): why the last build
    /// left it out.
    policy_problems: HashMap<(PolicyKind, String), Vec<String>>,
    /// Per waypoint Gateway (`namespace/name`): its VIPs and ready pods in the last build.
    waypoint_state: HashMap<String, (Vec<std::net::IpAddr>, usize)>,
    /// The latest error of each kind's watch, until it makes progress again.
    watch_errors: BTreeMap<Kind, String>,
    /// Something changed since the last build.
    dirty: bool,
    /// The last build, which pod changes can be applied to.
    built: Option<Built>,
    /// Pods changed since the last build (by table key), with what they were then.
    changed_pods: BTreeMap<String, Option<PodView>>,
    /// Something else changed (or pods were listed again): the next build is full.
    full_build: bool,
}

/// What the last build left, for applying pod changes to it.
struct Built {
    model: Model,
    owners: IpOwners,
    problems: Vec<String>,
    /// No pod was left out with a problem (a change could then bring it back, which
    /// only a full build can tell).
    pods_ok: bool,
}

impl View {
    fn new(options: &Options) -> Self {
        Self {
            kinds: Kind::watched(options),
            root_namespace: options.root_namespace.clone(),
            ..Default::default()
        }
    }

    fn is_synced(&self, kind: Kind) -> bool {
        match kind {
            Kind::Namespaces => self.namespaces.synced,
            Kind::Nodes => self.nodes.synced,
            Kind::Pods => self.pods.synced,
            Kind::Services => self.services.synced,
            Kind::EndpointSlices => self.slices.synced,
            Kind::ServiceAccounts => self.service_accounts.synced,
            Kind::AuthorizationPolicies => self.authorizations.synced,
            Kind::PeerAuthentications => self.peer_authentications.synced,
            Kind::IstioAuthorizationPolicies => self.istio_authorizations.synced,
            Kind::IstioPeerAuthentications => self.istio_peer_authentications.synced,
            Kind::RequestAuthentications => self.request_authentications.synced,
            Kind::IstioRequestAuthentications => self.istio_request_authentications.synced,
            Kind::Gateways => self.gateways.synced,
            Kind::HttpRoutes => self.routes.synced,
        }
    }

    fn synced(&self) -> bool {
        self.kinds.iter().all(|k| self.is_synced(*k))
    }

    fn take(&mut self, (kind, item): (Kind, Result<Change, watcher::Error>)) {
        let change = match item {
            Ok(change) => {
                self.watch_errors.remove(&kind);
                change
            }
            Err(e) => {
                let msg = describe(kind, &e);
                warn!("{msg}");
                self.watch_errors.insert(kind, msg);
                return;
            }
        };
        let changed = match change {
            Change::Namespace(ev) => self.namespaces.event(ev, |n, _| convert::namespace(n)),
            Change::Node(ev) => self.nodes.event(ev, |n, _| convert::node(n)),
            Change::Pod(ev) => {
                // A pod that comes, goes or changes can be applied to the last model;
                // a re-list is built in full.
                let key = match &ev {
                    Event::Apply(o) | Event::Delete(o) => Some(key_of(o)),
                    _ => None,
                };
                let before = key.as_ref().map(|k| self.pods.live.get(k).cloned());
                let changed = self.pods.event(ev, |p, _| {
                    let v = convert::pod(p);
                    if let PodView::Skipped(why) = &v {
                        debug!(pod = ?p.metadata.name, namespace = ?p.metadata.namespace, "pod not in the mesh: {why}");
                    }
                    v
                });
                match (key, before) {
                    (Some(k), Some(before)) if changed => {
                        self.changed_pods.entry(k).or_insert(before);
                    }
                    _ if changed => self.full_build = true,
                    _ => {}
                }
                changed
            }
            Change::Service(ev) => self.services.event(ev, |s, _| convert::service(s)),
            Change::EndpointSlice(ev) => self.slices.event(ev, |s, _| convert::endpoint_slice(s)),
            Change::ServiceAccount(ev) => self.service_accounts.event(ev, |sa, _| {
                Some(crate::model::NamespacedName {
                    namespace: sa.metadata.namespace.clone()?,
                    name: sa.metadata.name.clone()?,
                })
            }),
            Change::Authorization(ev) => self.authorizations.event(ev, |p, old| {
                PolicyView::of(p, |ns, name| policy::authorization(ns, name, &p.spec))
                    .keeping_last_valid(old)
            }),
            Change::PeerAuthentication(ev) => self.peer_authentications.event(ev, |p, old| {
                PolicyView::of(p, |_, _| peer_view(&p.spec)).keeping_last_valid(old)
            }),
            Change::IstioAuthorization(ev) => self.istio_authorizations.event(ev, |o, old| {
                PolicyView::of(o, |ns, name| match istio_spec(o) {
                    Ok(spec) => policy::authorization(ns, name, &spec),
                    Err(v) => (None, v),
                })
                .keeping_last_valid(old)
            }),
            Change::IstioPeerAuthentication(ev) => {
                self.istio_peer_authentications.event(ev, |o, old| {
                    PolicyView::of(o, |_, _| match istio_spec(o) {
                        Ok(spec) => peer_view(&spec),
                        Err(v) => (None, v),
                    })
                    .keeping_last_valid(old)
                })
            }
            Change::RequestAuthentication(ev) => {
                self.request_authentications.event(ev, |p, old| {
                    PolicyView::of(p, |ns, name| {
                        policy::request_authentication(ns, name, &p.spec)
                    })
                    .keeping_last_valid(old)
                })
            }
            Change::IstioRequestAuthentication(ev) => {
                self.istio_request_authentications.event(ev, |o, old| {
                    PolicyView::of(o, |ns, name| match istio_spec(o) {
                        Ok(spec) => policy::request_authentication(ns, name, &spec),
                        Err(v) => (None, v),
                    })
                    .keeping_last_valid(old)
                })
            }
            Change::Gateway(ev) => self.gateways.event(ev, |o, _| gateway::gateway(o)),
            Change::HttpRoute(ev) => self
                .routes
                .event(ev, |o, old| gateway::route(o, old.and_then(Option::as_ref))),
        };
        if changed && kind != Kind::Pods {
            self.full_build = true;
        }
        self.dirty |= changed;
    }

    /// The model of what the watchers have said, and what was left out and why: the
    /// last model with the changed pods applied when only pods changed
    /// ([`Model::apply_pod_changes`]), else built in full.
    fn build(&mut self, trust_domain: &str) -> (Model, Vec<String>) {
        let started = std::time::Instant::now();
        self.dirty = false;
        let changed = std::mem::take(&mut self.changed_pods);
        if !std::mem::take(&mut self.full_build)
            && let Some(model) = self.apply_pods(changed)
        {
            debug!(
                apply_ms = started.elapsed().as_secs_f64() * 1e3,
                workloads = model.workloads.len(),
                "pod changes applied to the model"
            );
            let problems = self.built.as_ref().map(|b| b.problems.clone());
            return (model, problems.unwrap_or_default());
        }
        let (model, problems) = self.build_full(trust_domain, started);
        self.built = Some(Built {
            model: model.clone(),
            owners: IpOwners::of(&model),
            pods_ok: !problems.iter().any(|p| p.starts_with("workloads")),
            problems: problems.clone(),
        });
        (model, problems)
    }

    /// The last model with `changed` pods applied, if that gives what a full build
    /// would: `None` when it cannot tell (then build in full).
    fn apply_pods(&mut self, changed: BTreeMap<String, Option<PodView>>) -> Option<Model> {
        let built = self.built.as_ref().filter(|b| b.pods_ok)?;
        if changed.is_empty() {
            return None;
        }
        let modes = self.peer_modes();
        let mut gone = Vec::new();
        let mut specs = Vec::new();
        let mut namespaces = BTreeSet::new();
        for (key, before) in &changed {
            if let Some(PodView::Workload { spec, .. }) = before {
                gone.push(spec.key());
                namespaces.insert(spec.namespace.clone());
            }
            if let Some(PodView::Workload { spec, .. }) = self.pods.live.get(key) {
                let mut w = spec.clone();
                if let Some(mode) = modes.for_workload(&w.namespace, &w.labels) {
                    w.labels.insert(MTLS_LABEL.into(), mode.into());
                }
                namespaces.insert(w.namespace.clone());
                specs.push(w);
            }
        }
        // A service's named target port comes from its pods' container ports: if the
        // change moves one, only a full build says where.
        for ns in &namespaces {
            let pods: Vec<_> = self
                .pods
                .live
                .values()
                .filter_map(|v| match v {
                    PodView::Workload { spec, named_ports } if &spec.namespace == ns => {
                        Some((spec, named_ports))
                    }
                    _ => None,
                })
                .collect();
            for v in self.services.live.values() {
                let ServiceView::Service {
                    namespace, name, ..
                } = v
                else {
                    continue;
                };
                if namespace != ns {
                    continue;
                }
                let key = crate::model::NamespacedName {
                    namespace: namespace.clone(),
                    name: name.clone(),
                };
                let in_model = built.model.services.get(&key);
                let a_gateways = self.gateways.live.values().any(|g| {
                    matches!(g, GatewayView::Waypoint(w) if &w.namespace == namespace && &w.name == name)
                });
                if a_gateways {
                    continue; // the waypoint's own service: not a mesh service
                }
                let slices: Vec<&SliceView> = self
                    .slices
                    .live
                    .values()
                    .filter(|sl| {
                        matches!(sl, SliceView::Slice { namespace: n, service, .. }
                            if n == namespace && service == name)
                    })
                    .collect();
                let resolved = convert::resolve_service(
                    v,
                    pods.iter().map(|(w, n)| (*w, *n)),
                    &slices,
                    &mut Vec::new(),
                )
                .ok()
                .map(|s| s.ports);
                if resolved.as_ref() != in_model.map(|s| &s.ports) {
                    return None;
                }
            }
        }
        // In place: on a refusal the full build replaces all of it.
        let b = self.built.as_mut().expect("checked above");
        match b.model.apply_pod_changes(&mut b.owners, &gone, specs) {
            // A persistent model: the copy published shares everything with it.
            Ok(()) => Some(b.model.clone()),
            Err(why) => {
                debug!(reason = why.0, "pod changes need a full build");
                None
            }
        }
    }

    /// The model of everything the watchers have said, built from scratch.
    fn build_full(
        &mut self,
        trust_domain: &str,
        started: std::time::Instant,
    ) -> (Model, Vec<String>) {
        let mut problems = Vec::new();
        let mut spec = MeshSpec {
            trust_domain: trust_domain.to_owned(),
            namespaces: self.namespaces.live.values().flatten().cloned().collect(),
            nodes: self.nodes.live.values().flatten().cloned().collect(),
            ..Default::default()
        };
        let mut by_namespace: HashMap<&str, Vec<_>> = HashMap::new();
        for v in self.pods.live.values() {
            if let PodView::Workload { spec, named_ports } = v {
                by_namespace
                    .entry(spec.namespace.as_str())
                    .or_default()
                    .push((spec, named_ports));
            }
        }
        let modes = self.peer_modes();
        spec.workloads = by_namespace
            .values()
            .flatten()
            .map(|(w, _)| {
                let mut w = (*w).clone();
                if let Some(mode) = modes.for_workload(&w.namespace, &w.labels) {
                    w.labels.insert(MTLS_LABEL.into(), mode.into());
                }
                w
            })
            .collect();
        for ns in &mut spec.namespaces {
            if let Some(mode) = modes.for_namespace(&ns.name, &ns.labels) {
                ns.labels.insert(MTLS_LABEL.into(), mode.into());
            }
        }
        for p in self
            .authorizations
            .live
            .values()
            .chain(self.istio_authorizations.live.values())
        {
            match &p.converted {
                Some(policy::Authorization::Workloads(w)) => spec.policies.push(w.clone()),
                Some(policy::Authorization::Waypoint(w)) => spec.waypoint_policies.push(w.clone()),
                None => {}
            }
        }
        spec.request_authentications = self
            .request_authentications
            .live
            .values()
            .chain(self.istio_request_authentications.live.values())
            .filter_map(|p| p.converted.clone())
            .collect();
        spec.policies
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        spec.waypoint_policies
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        spec.request_authentications
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        // Waypoints: the Gateways of Ambit's class. The Service of a Gateway's name is
        // the waypoint's own (its VIPs), not a service of the mesh.
        let mut waypoints: BTreeMap<String, WaypointSpec> = BTreeMap::new();
        let mut waypoint_names = BTreeSet::new();
        for g in self.gateways.live.values() {
            if let GatewayView::Waypoint(w) = g {
                let key = format!("{}/{}", w.namespace, w.name);
                waypoint_names.insert(key.clone());
                if matches!(w.verdict, Verdict::Refused(..)) {
                    continue;
                }
                waypoints.insert(
                    key,
                    WaypointSpec {
                        name: w.name.clone(),
                        namespace: w.namespace.clone(),
                        vips: Vec::new(),
                    },
                );
            }
        }
        let mut slices_of: HashMap<(&str, &str), Vec<&SliceView>> = HashMap::new();
        for sl in self.slices.live.values() {
            if let SliceView::Slice {
                namespace, service, ..
            } = sl
            {
                slices_of
                    .entry((namespace.as_str(), service.as_str()))
                    .or_default()
                    .push(sl);
            }
        }
        for (key, v) in &self.services.live {
            if let ServiceView::Service {
                namespace,
                name,
                vips,
                ..
            } = v
            {
                let own = format!("{namespace}/{name}");
                if waypoint_names.contains(&own) {
                    if let Some(w) = waypoints.get_mut(&own) {
                        w.vips = vips.clone();
                    }
                    continue;
                }
                let pods = by_namespace.get(namespace.as_str()).into_iter().flatten();
                let slices = slices_of
                    .get(&(namespace.as_str(), name.as_str()))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                match convert::resolve_service(
                    v,
                    pods.map(|(w, n)| (*w, *n)),
                    slices,
                    &mut problems,
                ) {
                    Ok(s) => spec.services.push(s),
                    Err(e) => problems.push(format!("service {key}: {e}")),
                }
            }
        }
        spec.waypoints = waypoints.into_values().collect();
        spec.service_accounts = Some(
            self.service_accounts
                .live
                .values()
                .flatten()
                .cloned()
                .collect(),
        );
        spec.http_routes = self
            .routes
            .live
            .values()
            .flatten()
            .filter_map(|r| r.policy.converted.clone())
            .collect();
        spec.http_routes
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        // A deterministic order, so a problem's report does not move between builds.
        spec.namespaces.sort_by(|a, b| a.name.cmp(&b.name));
        spec.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        spec.workloads
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        spec.services
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let assembled = started.elapsed();
        let (model, model_problems) = Model::build_lenient(spec);
        debug!(
            assemble_ms = assembled.as_secs_f64() * 1e3,
            build_ms = (started.elapsed() - assembled).as_secs_f64() * 1e3,
            workloads = model.workloads.len(),
            "model built"
        );
        self.route_problems.clear();
        self.policy_problems.clear();
        for p in &model_problems {
            // The file source's places carry list indexes; here the name says it.
            let place = match (p.place.find('['), p.place.find("] ")) {
                (Some(a), Some(b)) if a < b => format!("{}{}", &p.place[..a], &p.place[b + 1..]),
                _ => p.place.clone(),
            };
            // `httpRoutes (ns/name).rules[0]…`, `policies (ns/name[, targetRefs])…`,
            // `requestAuthentications (ns/name)…`: the object's own status says it too.
            if let Some((key, msg)) = placed(&place, "httpRoutes (", &p.problem) {
                self.route_problems.entry(key).or_default().push(msg);
            }
            for (prefix, kind) in [
                ("policies (", PolicyKind::Authorization),
                (
                    "requestAuthentications (",
                    PolicyKind::RequestAuthentication,
                ),
            ] {
                if let Some((key, msg)) = placed(&place, prefix, &p.problem) {
                    let key = key.trim_end_matches(", targetRefs").to_owned();
                    self.policy_problems
                        .entry((kind, key))
                        .or_default()
                        .push(msg);
                }
            }
            problems.push(format!("{place}: {}", p.problem));
        }
        self.waypoint_state = model
            .waypoints
            .iter()
            .map(|(key, w)| {
                let vips = model
                    .services
                    .get(key)
                    .map(|s| s.vips.clone())
                    .unwrap_or_default();
                (key.to_string(), (vips, w.replicas.len()))
            })
            .collect();
        (model, problems)
    }
}

/// A model problem at `place` (`<prefix>ns/name).rest`) as the object's key and the
/// message its status gives (`rest: problem`, or the problem alone).
fn placed(place: &str, prefix: &str, problem: &str) -> Option<(String, String)> {
    let (key, at) = place.strip_prefix(prefix)?.split_once(')')?;
    let at = at.trim_start_matches('.');
    let msg = if at.is_empty() {
        problem.to_owned()
    } else {
        format!("{at}: {problem}")
    };
    Some((key.to_owned(), msg))
}

/// The model's two kinds of policy object, by which its problems are placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum PolicyKind {
    /// `policies` (AuthorizationPolicies, L4 and L7).
    Authorization,
    /// `requestAuthentications`.
    RequestAuthentication,
}

/// A watch error as an operator needs to read it.
fn describe(kind: Kind, e: &watcher::Error) -> String {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.as_ref()),
        watcher::Error::WatchError(s) => Some(s.as_ref()),
        _ => None,
    };
    match status {
        Some(s) if s.code == 403 => format!(
            "the API server refuses to let the control plane list/watch {} ({}): grant its ServiceAccount `list` and `watch` on them (deploy/control-plane/rbac.yaml does)",
            kind.plural(),
            s.message
        ),
        Some(s) if s.code == 410 => format!(
            "{} watch expired (410 Gone: {}); listing them again",
            kind.plural(),
            s.message
        ),
        _ => format!("{} watch failed, retrying: {e}", kind.plural()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, enrolled: bool) -> Namespace {
        let mut n = Namespace::default();
        n.metadata.name = Some(name.into());
        if enrolled {
            n.metadata.labels = Some(
                [(
                    crate::model::DATAPLANE_LABEL.to_string(),
                    crate::model::DATAPLANE_AMBIENT.to_string(),
                )]
                .into(),
            );
        }
        n
    }

    #[test]
    fn a_relist_replaces_a_kind_at_once_and_never_shows_half_of_it() {
        let mut t: Table<Option<NamespaceSpec>> = Table::default();
        let conv = |n: &_, _: Option<&_>| convert::namespace(n);
        assert!(!t.event(Event::Init, conv));
        assert!(!t.event(Event::InitApply(ns("a", true)), conv));
        assert!(!t.synced && t.live.is_empty(), "nothing before InitDone");
        assert!(
            t.event(Event::InitDone, conv),
            "the first listing is a change"
        );
        assert!(t.synced && t.live.len() == 1);
        assert!(t.event(Event::Apply(ns("b", true)), conv));
        assert!(!t.event(Event::Apply(ns("b", true)), conv), "same object");
        // A re-list in progress leaves the live objects alone ...
        assert!(!t.event(Event::Init, conv));
        assert!(!t.event(Event::InitApply(ns("a", true)), conv));
        assert_eq!(t.live.len(), 2);
        // ... and replaces them at InitDone: b is gone (deleted while the watch was down).
        assert!(t.event(Event::InitDone, conv));
        assert_eq!(t.live.keys().collect::<Vec<_>>(), ["/a"]);
        // A re-list that finds what we had is no change.
        t.event(Event::Init, conv);
        t.event(Event::InitApply(ns("a", true)), conv);
        assert!(!t.event(Event::InitDone, conv));
        assert!(t.event(Event::Delete(ns("a", true)), conv));
    }

    fn pod(name: &str, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "good", "uid": name},
            "spec": {"nodeName": "node-1", "containers": []},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]}
        }))
        .unwrap()
    }

    fn pod_with(name: &str, ns: &str, ip: &str, app: &str, ready: bool) -> Pod {
        let mut p = pod(name, ip);
        p.metadata.namespace = Some(ns.into());
        p.metadata.uid = Some(format!("uid-{ns}-{name}"));
        p.metadata.labels = Some([("app".to_string(), app.to_string())].into());
        if !ready {
            p.metadata.deletion_timestamp =
                Some(serde_json::from_value(serde_json::json!("2026-12-04T10:00:00Z")).unwrap());
        }
        p
    }

    /// Pod events applied to the last model (the short way) give, after every build, the
    /// model and problems a full build of the same objects gives.
    #[test]
    fn pod_changes_applied_to_the_last_model_give_what_a_full_build_gives() {
        let mut fast = View::default();
        let mut full = View::default();
        let feed = |v: &mut View, c: Change| v.take((kind_of(&c), Ok(c)));
        fn kind_of(c: &Change) -> Kind {
            match c {
                Change::Namespace(_) => Kind::Namespaces,
                Change::Node(_) => Kind::Nodes,
                Change::Pod(_) => Kind::Pods,
                Change::Service(_) => Kind::Services,
                _ => unreachable!(),
            }
        }
        let mut objects: Vec<Change> = vec![
            Change::Namespace(Event::Apply(ns("good", true))),
            Change::Namespace(Event::Apply(ns("lab", false))),
        ];
        let mut node = Node::default();
        node.metadata.name = Some("node-1".into());
        objects.push(Change::Node(Event::Apply(node)));
        for (nsn, app, vip) in [
            ("good", "web", "10.96.0.1"),
            ("good", "db", "10.96.0.2"),
            ("lab", "web", "10.96.0.3"),
        ] {
            let svc: Service = serde_json::from_value(serde_json::json!({
                "metadata": {"name": app, "namespace": nsn},
                "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": {"app": app},
                         "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
            }))
            .unwrap();
            objects.push(Change::Service(Event::Apply(svc)));
        }
        for c in objects {
            feed(&mut fast, clone_change(&c));
            feed(&mut full, c);
        }
        let (a, _) = fast.build("cluster.local");
        let (b, _) = full.build("cluster.local");
        assert_eq!(a, b);
        let mut rng = fastrand::Rng::with_seed(11);
        let (mut short, mut long) = (0, 0);
        let mut names: Vec<(String, String)> = Vec::new();
        for step in 0..300 {
            let ev = if names.is_empty() || rng.u8(..4) == 0 {
                let n = format!("p{step}");
                let nsn = if rng.bool() { "good" } else { "lab" };
                names.push((nsn.into(), n.clone()));
                let ip = format!("10.244.1.{}", rng.u8(1..60));
                Event::Apply(pod_with(&n, nsn, &ip, ["web", "db"][rng.usize(..2)], true))
            } else {
                let (nsn, n) = names[rng.usize(..names.len())].clone();
                if rng.u8(..5) == 0 {
                    names.retain(|x| x.1 != n);
                    Event::Delete(pod_with(&n, &nsn, "10.244.0.1", "web", true))
                } else {
                    let ip = format!("10.244.1.{}", rng.u8(1..60));
                    let app = ["web", "db"][rng.usize(..2)];
                    Event::Apply(pod_with(&n, &nsn, &ip, app, rng.u8(..6) != 0))
                }
            };
            let c = Change::Pod(ev);
            feed(&mut fast, clone_change(&c));
            feed(&mut full, c);
            let shortcut = !fast.full_build && fast.built.as_ref().is_some_and(|b| b.pods_ok);
            let (a, pa) = fast.build("cluster.local");
            full.full_build = true;
            let (b, pb) = full.build("cluster.local");
            assert_eq!(a, b, "step {step}");
            assert_eq!(pa, pb, "step {step}");
            if shortcut { short += 1 } else { long += 1 }
        }
        assert!(short > 100, "{short} short, {long} full");
    }

    fn clone_change(c: &Change) -> Change {
        match c {
            Change::Namespace(Event::Apply(o)) => Change::Namespace(Event::Apply(o.clone())),
            Change::Node(Event::Apply(o)) => Change::Node(Event::Apply(o.clone())),
            Change::Service(Event::Apply(o)) => Change::Service(Event::Apply(o.clone())),
            Change::Pod(Event::Apply(o)) => Change::Pod(Event::Apply(o.clone())),
            Change::Pod(Event::Delete(o)) => Change::Pod(Event::Delete(o.clone())),
            _ => unreachable!(),
        }
    }

    #[test]
    fn one_bad_object_is_named_and_the_rest_of_the_mesh_is_served() {
        let mut v = View::default();
        let mut bad = ns("bad", true);
        bad.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(crate::model::MTLS_LABEL.into(), "SOMETIMES".into());
        for n in [ns("good", true), bad] {
            v.take((Kind::Namespaces, Ok(Change::Namespace(Event::Apply(n)))));
        }
        let mut node = Node::default();
        node.metadata.name = Some("node-1".into());
        v.take((Kind::Nodes, Ok(Change::Node(Event::Apply(node)))));
        for p in [
            pod("a", "10.244.1.10"),
            pod("b", "10.244.1.10"),
            pod("c", "10.244.1.11"),
        ] {
            v.take((Kind::Pods, Ok(Change::Pod(Event::Apply(p)))));
        }
        let (m, problems) = v.build("cluster.local");
        // A namespace with a bad label value keeps its pods in the mesh (STRICT, the safe
        // default); a pod claiming another's IP is left out.
        assert_eq!(m.namespaces.keys().collect::<Vec<_>>(), ["bad", "good"]);
        assert_eq!(m.workloads.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(
            problems,
            [
                "namespaces (bad).labels.ambit.dev/mtls: \"SOMETIMES\" is not STRICT or PERMISSIVE",
                "workloads (good/b).ips[0]: 10.244.1.10 is already used by workload good/a",
            ]
        );
    }
}
