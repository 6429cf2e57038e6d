//! A stand-in for the Kubernetes API server, for testing the control plane's Kubernetes
//! source with the real kube-rs client (and `kubectl`) here, where no API server can be
//! installed.
//!
//! It speaks the API server's HTTP protocol for reading, as clients use it:
//! - discovery (`/api`, `/api/v1`, `/apis`, `/apis/<group>/<version>`) for the types it
//!   serves;
//! - LIST of a type (cluster-wide or in a namespace) and GET of one object, with the
//!   collection's `metadata.resourceVersion`;
//! - WATCH (`?watch=true`): newline-delimited `ADDED`/`MODIFIED`/`DELETED` events from a
//!   resourceVersion (replayed from its event log), `BOOKMARK`s when asked
//!   (`allowWatchBookmarks`), `timeoutSeconds`, and — for a resourceVersion older than
//!   the log keeps — an `ERROR` event with a 410 `Expired` Status, as the real server
//!   sends once its watch cache has moved on;
//! - 403 `Forbidden` Status objects for types the test forbids (RBAC), 404 for unknown
//!   objects;
//! - Kubernetes' `Table` rendering when a client asks for it (`kubectl get`).
//!
//! The test writes objects through [`ApiServer::apply`] and [`ApiServer::delete`] (so it
//! controls every resourceVersion), and injects faults: [`ApiServer::compact`] (the
//! event log forgets: old resourceVersions get 410), [`ApiServer::drop_watches`] (every
//! open watch ends, as when a load balancer cuts them), [`ApiServer::restart`] (the
//! listener and every connection go away, then come back with the same objects).
//!
//! Over HTTP it takes one kind of write: JSON merge patches of an object's `status`
//! subresource (what a controller writes). Not implemented: other writes, label and field
//! selectors, paginated lists (the
//! whole list is one page, which clients must accept), protobuf encoding, TLS and
//! authentication.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

/// A type the stand-in serves.
#[derive(Clone, Debug)]
pub struct ApiType {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// API version (`v1`).
    pub version: &'static str,
    /// The `kind`.
    pub kind: &'static str,
    /// The URL's plural name.
    pub plural: &'static str,
    /// Objects live in namespaces.
    pub namespaced: bool,
}

impl ApiType {
    /// `group/plural`: unique among the served types.
    fn key(&self) -> &'static str {
        // Leaked once per type and call site is wasteful; the table is static, so build
        // the keys once.
        static KEYS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        let keys = KEYS.get_or_init(|| {
            TYPES
                .iter()
                .map(|t| format!("{}/{}", t.group, t.plural))
                .collect()
        });
        let i = TYPES
            .iter()
            .position(|t| t.group == self.group && t.plural == self.plural)
            .expect("a served type");
        keys[i].as_str()
    }

    /// Whether `status` is a subresource (as for CRDs declaring one), not part of the
    /// object written through the main resource.
    fn status_subresource(&self) -> bool {
        matches!(
            self.group,
            "ambit.dev" | "security.istio.io" | "gateway.networking.k8s.io"
        )
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// The types a Kubernetes mesh source reads.
pub static TYPES: &[ApiType] = &[
    ApiType {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        namespaced: false,
    },
    ApiType {
        group: "",
        version: "v1",
        kind: "Node",
        plural: "nodes",
        namespaced: false,
    },
    ApiType {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        namespaced: true,
    },
    ApiType {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        namespaced: true,
    },
    ApiType {
        group: "",
        version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        namespaced: true,
    },
    ApiType {
        group: "ambit.dev",
        version: "v1alpha1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        namespaced: true,
    },
    ApiType {
        group: "ambit.dev",
        version: "v1alpha1",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        namespaced: true,
    },
    ApiType {
        group: "ambit.dev",
        version: "v1alpha1",
        kind: "RequestAuthentication",
        plural: "requestauthentications",
        namespaced: true,
    },
    ApiType {
        group: "security.istio.io",
        version: "v1",
        kind: "RequestAuthentication",
        plural: "requestauthentications",
        namespaced: true,
    },
    ApiType {
        group: "security.istio.io",
        version: "v1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        namespaced: true,
    },
    ApiType {
        group: "security.istio.io",
        version: "v1",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        namespaced: true,
    },
    ApiType {
        group: "",
        version: "v1",
        kind: "Secret",
        plural: "secrets",
        namespaced: true,
    },
    ApiType {
        group: "",
        version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        namespaced: true,
    },
    ApiType {
        group: "authentication.k8s.io",
        version: "v1",
        kind: "TokenReview",
        plural: "tokenreviews",
        namespaced: false,
    },
    ApiType {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
    },
    ApiType {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "Gateway",
        plural: "gateways",
        namespaced: true,
    },
    ApiType {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "HTTPRoute",
        plural: "httproutes",
        namespaced: true,
    },
];

/// How long the event log is: older resourceVersions get 410 Gone.
const LOG_LEN: usize = 100_000;

#[derive(Clone, Debug)]
struct WatchEvent {
    rv: u64,
    plural: &'static str,
    namespace: String,
    kind: &'static str,
    object: Value,
}

struct State {
    /// The last resourceVersion handed out.
    rv: u64,
    /// (type, namespace, name) → object; the type is `group/plural`.
    objects: BTreeMap<(&'static str, String, String), Value>,
    /// Recent events, oldest first.
    log: VecDeque<Arc<WatchEvent>>,
    /// Watches from before this resourceVersion get 410 Gone.
    oldest: u64,
    forbidden: HashSet<&'static str>,
    uids: u64,
    /// Status subresource writes taken.
    status_writes: u64,
    /// ServiceAccount tokens TokenReview knows, with the uid of the pod each was bound to.
    tokens: HashMap<String, (Token, Option<Value>)>,
    /// TokenReviews answered.
    reviews: u64,
}

/// A ServiceAccount token the stand-in's TokenReview knows, as the kubelet would get it
/// for a pod through the TokenRequest API.
#[derive(Clone, Debug)]
pub struct Token {
    /// Its ServiceAccount `(namespace, name)`.
    pub service_account: (String, String),
    /// The pod it is bound to, by name, in the ServiceAccount's namespace (`None`: a
    /// legacy, unbound token). The token is valid only while that pod exists with the
    /// uid it had when the token was issued.
    pub pod: Option<String>,
    /// Put the pod's node in the review's `extra` (as Kubernetes 1.32 does), or not (as
    /// older API servers do).
    pub node_in_extra: bool,
    /// Its audiences.
    pub audiences: Vec<String>,
    /// Past its expiry.
    pub expired: bool,
}

struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<Arc<WatchEvent>>,
    /// Bumped to end every open watch.
    cut: watch::Sender<u64>,
    /// Bumped to send a bookmark on every open watch that asked for them.
    bookmark: watch::Sender<u64>,
    /// Watches answered with 410 Gone.
    expired: std::sync::atomic::AtomicUsize,
    /// Between `stop` and `resume`: watches still open deliver nothing more (the
    /// server is down, whatever its connection tasks have yet to notice).
    down: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Creates or replaces an object (`kind`, `apiVersion`, `metadata.name` and, for a
    /// namespaced type, `metadata.namespace` must be set); returns its resourceVersion.
    fn apply(&self, mut object: Value) -> u64 {
        let ty = type_of(&object);
        let name = object["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        let namespace = if ty.namespaced {
            object["metadata"]["namespace"]
                .as_str()
                .expect("metadata.namespace")
                .to_owned()
        } else {
            String::new()
        };
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let key = (ty.key(), namespace.clone(), name);
        let old = st.objects.get(&key).cloned();
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        if meta.get("uid").and_then(Value::as_str).is_none() {
            meta["uid"] = match &old {
                Some(o) => o["metadata"]["uid"].clone(),
                None => {
                    st.uids += 1;
                    json!(format!("00000000-0000-4000-8000-{:012}", st.uids))
                }
            };
        }
        // As the API server does: generation counts spec changes, not status writes.
        let generation = match &old {
            Some(o) if o.get("spec") == object.get("spec") => o["metadata"]["generation"].clone(),
            Some(o) => json!(o["metadata"]["generation"].as_i64().unwrap_or(0) + 1),
            None => json!(1),
        };
        object["metadata"]["generation"] = generation;
        // Types with a status subresource (the policy CRDs) keep their status when the
        // main resource is written; `status` is written through `/status` only.
        if ty.status_subresource() {
            match old.as_ref().and_then(|o| o.get("status")) {
                Some(status) => object["status"] = status.clone(),
                None => {
                    if let Some(o) = object.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
        }
        if object["metadata"].get("creationTimestamp").is_none() {
            object["metadata"]["creationTimestamp"] = match &old {
                Some(o) => o["metadata"]["creationTimestamp"].clone(),
                None => json!("2026-12-02T00:00:00Z"),
            };
        }
        st.objects.insert(key, object.clone());
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.record(&mut st, ty, namespace, kind, object, rv);
        rv
    }

    fn record(
        &self,
        st: &mut State,
        ty: &'static ApiType,
        namespace: String,
        kind: &'static str,
        object: Value,
        rv: u64,
    ) {
        let ev = Arc::new(WatchEvent {
            rv,
            plural: ty.key(),
            namespace,
            kind,
            object,
        });
        st.log.push_back(ev.clone());
        while st.log.len() > LOG_LEN {
            let gone = st.log.pop_front().expect("not empty");
            st.oldest = gone.rv;
        }
        // Sent under the lock, so watchers see events in resourceVersion order.
        let _ = self.events.send(ev);
    }
}

/// A running stand-in; dropping it stops it.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    /// Stops the accept loop and every connection of the current "process".
    stop: Option<watch::Sender<bool>>,
    /// Says when the accept loop has let go of its listener.
    stopped: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl ApiServer {
    /// Serves on `listener` (bound by the caller, perhaps inside a network namespace).
    pub fn start(listener: std::net::TcpListener) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1000,
                objects: BTreeMap::new(),
                log: VecDeque::new(),
                oldest: 1000,
                forbidden: HashSet::new(),
                uids: 0,
                status_writes: 0,
                tokens: HashMap::new(),
                reviews: 0,
            }),
            events: broadcast::channel(65_536).0,
            cut: watch::channel(0).0,
            bookmark: watch::channel(0).0,
            expired: Default::default(),
            down: Default::default(),
        });
        let addr = listener.local_addr()?;
        let mut s = Self {
            addr,
            shared,
            runtime: Some(runtime),
            stop: None,
            stopped: Mutex::new(None),
        };
        s.serve(listener)?;
        Ok(s)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig pointing at the stand-in (no credentials: it has no
    /// authentication).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://{}\nusers:\n- name: tester\n  user: {{}}\ncontexts:\n- name: stand-in\n  context: {{cluster: stand-in, user: tester}}\ncurrent-context: stand-in\n",
                self.addr
            ),
        )
    }

    fn serve(&mut self, listener: std::net::TcpListener) -> anyhow::Result<()> {
        listener.set_nonblocking(true)?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = self.shared.clone();
        let rt = self.runtime.as_ref().expect("running");
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            accept_loop(listener, shared, stop_rx).await;
            let _ = done_tx.send(());
        });
        self.stop = Some(stop_tx);
        *self.stopped.lock().unwrap() = Some(done_rx);
        Ok(())
    }

    /// Creates or replaces an object (`kind`, `apiVersion`, `metadata.name` and, for a
    /// namespaced type, `metadata.namespace` must be set); returns its resourceVersion.
    pub fn apply(&self, object: Value) -> u64 {
        self.shared.apply(object)
    }

    /// Issues `token` for TokenReview to know.
    pub fn issue_token(&self, token: &str, t: Token) {
        let mut st = self.shared.state.lock().unwrap();
        let uid = t.pod.as_ref().map(|p| {
            let key = ("/pods", t.service_account.0.clone(), p.clone());
            st.objects
                .get(&key)
                .unwrap_or_else(|| panic!("no pod {p} to bind the token to"))["metadata"]["uid"]
                .clone()
        });
        st.tokens.insert(token.to_owned(), (t, uid));
    }

    /// How many TokenReviews were answered.
    pub fn token_reviews(&self) -> u64 {
        self.shared.state.lock().unwrap().reviews
    }

    /// Deletes an object (`kind`: `Pod`, or `security.istio.io/v1/AuthorizationPolicy`
    /// where a kind is served in two groups); returns the deletion's resourceVersion, or
    /// `None` if there was no such object.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Option<u64> {
        let ty = served(kind);
        let namespace = if ty.namespaced { namespace } else { "" };
        let mut st = self.shared.state.lock().unwrap();
        let mut object = st
            .objects
            .remove(&(ty.key(), namespace.to_owned(), name.to_owned()))?;
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.shared
            .record(&mut st, ty, namespace.to_owned(), "DELETED", object, rv);
        Some(rv)
    }

    /// An object as stored, if it exists.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let ty = served(kind);
        let namespace = if ty.namespaced { namespace } else { "" };
        let st = self.shared.state.lock().unwrap();
        st.objects
            .get(&(ty.key(), namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The event log forgets everything up to now: watches from an older
    /// resourceVersion get 410 Gone and their clients must list again.
    pub fn compact(&self) {
        let mut st = self.shared.state.lock().unwrap();
        st.log.clear();
        st.oldest = st.rv;
    }

    /// Ends every open watch stream (cleanly, as a proxy's idle timeout would).
    pub fn drop_watches(&self) {
        self.shared.cut.send_modify(|g| *g += 1);
    }

    /// Writes an object's status as a controller would (a JSON merge patch of
    /// `{"status": …}` to its `/status`); `None` if there is no such object.
    pub fn patch_status(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        patch: Value,
    ) -> Option<Value> {
        let ty = served(kind);
        let namespace = if ty.namespaced { namespace } else { "" };
        self.shared.patch_status(ty, namespace, name, patch)
    }

    /// How many status writes the stand-in has taken.
    pub fn status_writes(&self) -> u64 {
        self.shared.state.lock().unwrap().status_writes
    }

    /// How many watches were answered with 410 Gone so far.
    pub fn expired_watches(&self) -> usize {
        self.shared
            .expired
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends a bookmark now on every watch that allows them.
    pub fn bookmark(&self) {
        self.shared.bookmark.send_modify(|g| *g += 1);
    }

    /// Refuses (403) or allows listing and watching a type, by its plural.
    pub fn forbid(&self, plural: &'static str, forbidden: bool) {
        let mut st = self.shared.state.lock().unwrap();
        if forbidden {
            st.forbidden.insert(plural);
        } else {
            st.forbidden.remove(plural);
        }
    }

    /// Stops listening and drops every connection, as a stopped server would; objects can
    /// still be changed meanwhile through [`ApiServer::apply`] and [`ApiServer::delete`].
    pub fn stop(&mut self) {
        self.shared
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(stopped) = self.stopped.lock().unwrap().take() {
            let _ = stopped.recv_timeout(Duration::from_secs(5));
        }
    }

    /// Serves again on the same address with the same objects after [`ApiServer::stop`];
    /// the event log starts afresh (a restarted server's watch cache begins at the
    /// current resourceVersion, so clients resuming an older one get 410 Gone).
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.compact();
        self.shared
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let listener = std::net::TcpListener::bind(self.addr)?;
        self.serve(listener)
    }
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The type named `Kind` (the first served) or `apiVersion/Kind`.
fn served(kind: &str) -> &'static ApiType {
    TYPES
        .iter()
        .find(|t| t.kind == kind || format!("{}/{}", t.api_version(), t.kind) == kind)
        .unwrap_or_else(|| panic!("the stand-in does not serve {kind}"))
}

fn type_of(object: &Value) -> &'static ApiType {
    let kind = object["kind"].as_str().expect("kind");
    let api_version = object["apiVersion"].as_str().expect("apiVersion");
    TYPES
        .iter()
        .find(|t| t.kind == kind && t.api_version() == api_version)
        .unwrap_or_else(|| panic!("the stand-in does not serve {api_version} {kind}"))
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            _ = stop.changed() => return,
        };
        // As the API server's: Go sets TCP_NODELAY on every connection. Without it a
        // watch event written after another waits for the client's delayed ACK.
        let _ = stream.set_nodelay(true);
        let (shared, mut stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.changed() => {}
            }
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("valid response")
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// What a request's path names.
enum Target<'a> {
    Discovery(Value),
    Collection {
        ty: &'static ApiType,
        namespace: Option<&'a str>,
    },
    Object {
        ty: &'static ApiType,
        namespace: &'a str,
        name: &'a str,
    },
}

fn route(path: &str) -> Option<Target<'_>> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api"] => {
            return Some(Target::Discovery(json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "stand-in"}]
            })));
        }
        ["apis"] => return Some(Target::Discovery(group_list())),
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let find = |plural: &str| {
        TYPES
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
    };
    match rest {
        [] => {
            let resources: Vec<Value> = TYPES
                .iter()
                .filter(|t| t.group == group && t.version == version)
                .map(|t| {
                    json!({"name": t.plural, "singularName": t.kind.to_lowercase(),
                           "namespaced": t.namespaced, "kind": t.kind,
                           "verbs": ["get", "list", "watch", "patch"]})
                })
                .collect();
            if resources.is_empty() {
                return None;
            }
            Some(Target::Discovery(json!({
                "kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") },
                "resources": resources
            })))
        }
        [plural] => Some(Target::Collection {
            ty: find(plural)?,
            namespace: None,
        }),
        ["namespaces", ns, plural] => Some(Target::Collection {
            ty: find(plural).filter(|t| t.namespaced)?,
            namespace: Some(ns),
        }),
        ["namespaces", ns, plural, name] => Some(Target::Object {
            ty: find(plural).filter(|t| t.namespaced)?,
            namespace: ns,
            name,
        }),
        [plural, name] => Some(Target::Object {
            ty: find(plural).filter(|t| !t.namespaced)?,
            namespace: "",
            name,
        }),
        _ => None,
    }
}

fn group_list() -> Value {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for t in TYPES.iter().filter(|t| !t.group.is_empty()) {
        let v = groups.entry(t.group).or_default();
        if !v.contains(&t.version) {
            v.push(t.version);
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn query(req: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.replace("%2C", ","))
        })
        .collect()
}

async fn handle(shared: &Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    if req.method() == hyper::Method::PATCH {
        return patch_status(shared, req).await;
    }
    if req.method() == hyper::Method::POST || req.method() == hyper::Method::PUT {
        return write(shared, req).await;
    }
    if req.method() != hyper::Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("the stand-in does not serve {}", req.method()),
        );
    }
    let q = query(&req);
    let table = req
        .headers()
        .get("accept")
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    let path = req.uri().path().to_owned();
    let Some(target) = route(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        );
    };
    let (ty, namespace) = match &target {
        Target::Discovery(v) => return json_response(StatusCode::OK, v),
        Target::Collection { ty, namespace } => (*ty, namespace.map(str::to_owned)),
        Target::Object { ty, namespace, .. } => (*ty, Some((*namespace).to_owned())),
    };
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    {
        let st = shared.state.lock().unwrap();
        if st.forbidden.contains(ty.plural) {
            let verb = if watching { "watch" } else { "list" };
            let scope = match &namespace {
                Some(ns) if ty.namespaced => format!("in the namespace \"{ns}\""),
                _ => "at the cluster scope".into(),
            };
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "{} is forbidden: User \"system:serviceaccount:ambit-system:ambit-control-plane\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
                    ty.plural, ty.plural, ty.group
                ),
            );
        }
    }
    match target {
        Target::Object {
            ty,
            namespace,
            name,
        } => {
            let st = shared.state.lock().unwrap();
            match st
                .objects
                .get(&(ty.key(), namespace.to_owned(), name.to_owned()))
            {
                Some(o) if table => json_response(StatusCode::OK, &to_table(ty, [o])),
                Some(o) => json_response(StatusCode::OK, o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} \"{name}\" not found", ty.plural),
                ),
            }
        }
        Target::Collection { ty, namespace } if watching => {
            watch_response(shared, ty, namespace.map(str::to_owned), &q)
        }
        Target::Collection { ty, namespace } => {
            let st = shared.state.lock().unwrap();
            let items: Vec<&Value> = st
                .objects
                .iter()
                .filter(|((p, ns, _), _)| *p == ty.key() && namespace.is_none_or(|n| n == ns))
                .map(|(_, o)| o)
                .collect();
            if table {
                let mut t = to_table(ty, items);
                t["metadata"] = json!({"resourceVersion": st.rv.to_string()});
                return json_response(StatusCode::OK, &t);
            }
            json_response(
                StatusCode::OK,
                &json!({"kind": format!("{}List", ty.kind), "apiVersion": ty.api_version(),
                        "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            )
        }
        Target::Discovery(_) => unreachable!("answered above"),
    }
}

/// `PATCH .../<name>/status` with a JSON merge patch: the status subresource, the one
/// write the stand-in takes over HTTP (the control plane writes policy conditions).
async fn patch_status(shared: &Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let ctype = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let Some(object_path) = path.strip_suffix("/status") else {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the stand-in takes writes to the status subresource only".into(),
        );
    };
    let Some(Target::Object {
        ty,
        namespace,
        name,
    }) = route(object_path)
    else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no such object: {path}"),
        );
    };
    if ctype != "application/merge-patch+json" {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the stand-in takes application/merge-patch+json, not {ctype:?}"),
        );
    }
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "unreadable body".into(),
        );
    };
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the patch is not JSON".into(),
        );
    };
    match shared.patch_status(ty, namespace, name, patch) {
        Some(object) => json_response(StatusCode::OK, &object),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{name}\" not found", ty.plural),
        ),
    }
}

impl Shared {
    /// Merges `patch`'s `status` into an object's, as a PATCH to its `/status` does;
    /// `None` if there is no such object.
    fn patch_status(
        &self,
        ty: &'static ApiType,
        namespace: &str,
        name: &str,
        patch: Value,
    ) -> Option<Value> {
        let mut st = self.state.lock().unwrap();
        let key = (ty.key(), namespace.to_owned(), name.to_owned());
        let mut object = st.objects.get(&key).cloned()?;
        merge_patch(
            &mut object["status"],
            patch.get("status").cloned().unwrap_or(Value::Null),
        );
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.objects.insert(key, object.clone());
        st.status_writes += 1;
        self.record(
            &mut st,
            ty,
            namespace.to_owned(),
            "MODIFIED",
            object.clone(),
            rv,
        );
        Some(object)
    }
}

/// POST to a collection (create; TokenReview) or PUT to an object (replace, refused
/// with 409 Conflict if the body's resourceVersion is not the stored one).
async fn write(shared: &Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let put = req.method() == hyper::Method::PUT;
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "unreadable body".into(),
        );
    };
    let Ok(mut object) = serde_json::from_slice::<Value>(&body) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON".into(),
        );
    };
    let (ty, namespace, name) = match route(&path) {
        Some(Target::Collection { ty, namespace }) if !put => {
            if ty.kind == "TokenReview" {
                return json_response(StatusCode::CREATED, &token_review(shared, object));
            }
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            (ty, namespace.unwrap_or_default().to_owned(), name)
        }
        Some(Target::Object {
            ty,
            namespace,
            name,
        }) if put => (ty, namespace.to_owned(), name.to_owned()),
        _ => {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("the stand-in cannot write {path} this way"),
            );
        }
    };
    if name.is_empty() || object["metadata"]["name"].as_str() != Some(name.as_str()) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "metadata.name is missing or is not the path's".into(),
        );
    }
    object["apiVersion"] = json!(ty.api_version());
    object["kind"] = json!(ty.kind);
    if ty.namespaced {
        object["metadata"]["namespace"] = json!(namespace);
    }
    {
        let st = shared.state.lock().unwrap();
        let stored = st.objects.get(&(ty.key(), namespace.clone(), name.clone()));
        match (put, stored) {
            (false, Some(_)) => {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", ty.plural),
                );
            }
            (true, None) => {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} \"{name}\" not found", ty.plural),
                );
            }
            (true, Some(o)) => {
                let sent = object["metadata"]["resourceVersion"].as_str();
                if sent.is_some_and(|v| Some(v) != o["metadata"]["resourceVersion"].as_str()) {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                            ty.plural
                        ),
                    );
                }
            }
            (false, None) => {}
        }
    }
    shared.apply(object);
    let stored = shared.state.lock().unwrap().objects[&(ty.key(), namespace, name)].clone();
    let code = if put {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    json_response(code, &stored)
}

/// Answers a TokenReview as the API server's ServiceAccount token authenticator does.
fn token_review(shared: &Shared, mut review: Value) -> Value {
    const DEFAULT_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
    let mut st = shared.state.lock().unwrap();
    st.reviews += 1;
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = match review["spec"]["audiences"].as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => vec![DEFAULT_AUDIENCE.to_owned()],
    };
    let refuse = |why: String| json!({"authenticated": false, "error": format!("[invalid bearer token, {why}]")});
    let answer = match st.tokens.get(token) {
        None => refuse("square/go-jose: error in cryptographic primitive".into()),
        Some((t, _)) if t.expired => refuse("service account token has expired".into()),
        Some((t, uid)) => {
            let both: Vec<&String> = t.audiences.iter().filter(|a| wanted.contains(a)).collect();
            let (ns, sa) = &t.service_account;
            let pod = t
                .pod
                .as_ref()
                .map(|p| st.objects.get(&("/pods", ns.clone(), p.clone())))
                .map(|p| p.filter(|p| Some(&p["metadata"]["uid"]) == uid.as_ref()));
            if both.is_empty() {
                refuse(format!(
                    "token audiences {:?} is invalid for the target audiences {:?}",
                    t.audiences, wanted
                ))
            } else if let Some(None) = pod {
                refuse(format!(
                    "pod \"{}\" not found",
                    t.pod.as_deref().unwrap_or_default()
                ))
            } else {
                let mut extra = serde_json::Map::new();
                if let Some(Some(p)) = &pod {
                    extra.insert(
                        "authentication.kubernetes.io/pod-name".into(),
                        json!([p["metadata"]["name"]]),
                    );
                    extra.insert(
                        "authentication.kubernetes.io/pod-uid".into(),
                        json!([p["metadata"]["uid"]]),
                    );
                    if t.node_in_extra {
                        extra.insert(
                            "authentication.kubernetes.io/node-name".into(),
                            json!([p["spec"]["nodeName"]]),
                        );
                    }
                }
                json!({"authenticated": true, "audiences": both,
                       "user": {"username": format!("system:serviceaccount:{ns}:{sa}"),
                                "uid": format!("uid-sa-{ns}-{sa}"),
                                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                                "extra": extra}})
            }
        }
    };
    review["status"] = answer;
    review["metadata"] = json!({"creationTimestamp": null});
    review
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge_patch(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other,
    }
}

/// The `meta.k8s.io/v1` Table a client such as `kubectl get` asks for: name, namespace
/// (for namespaced types) and age columns.
fn to_table<'a>(ty: &ApiType, items: impl IntoIterator<Item = &'a Value>) -> Value {
    let rows: Vec<Value> = items
        .into_iter()
        .map(|o| {
            let m = &o["metadata"];
            json!({"cells": [m["name"], "0s"],
                   "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": m}})
        })
        .collect();
    let _ = ty;
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {},
        "columnDefinitions": [
            {"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0},
            {"name": "Age", "type": "string", "format": "", "description": "Age", "priority": 0}
        ],
        "rows": rows
    })
}

fn watch_response(
    shared: &Arc<Shared>,
    ty: &'static ApiType,
    namespace: Option<String>,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let from: Option<u64> = q
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
        .map(|v| v.parse().unwrap_or(0));
    let line = |ev_type: &str, object: &Value| {
        let mut s = json!({"type": ev_type, "object": object}).to_string();
        s.push('\n');
        Bytes::from(s)
    };
    let matches = move |ev: &WatchEvent| {
        ev.plural == ty.key() && namespace.as_deref().is_none_or(|n| n == ev.namespace)
    };
    // Subscribe before reading the log, so nothing falls between the two.
    let mut live = shared.events.subscribe();
    let watching = shared.clone();
    let mut cut = shared.cut.subscribe();
    let mut bookmark = shared.bookmark.subscribe();
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let mut first = Vec::new();
    let mut last_rv;
    {
        let st = shared.state.lock().unwrap();
        last_rv = st.rv;
        match from {
            Some(rv) if rv < st.oldest => {
                shared
                    .expired
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                first.push(line(
                    "ERROR",
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": format!("too old resource version: {rv} ({})", st.oldest),
                            "reason": "Expired", "code": 410}),
                ));
                // The stream ends after the error, as the real server's does.
                let _ = tx.try_send(first.remove(0));
                drop(tx);
                return stream_response(rx);
            }
            Some(rv) => {
                for ev in st.log.iter().filter(|e| e.rv > rv && matches(e)) {
                    first.push(line(ev.kind, &ev.object));
                }
            }
            None => {
                // No resourceVersion: every current object as ADDED, then changes.
                for ((p, ns, _), o) in &st.objects {
                    if *p == ty.key()
                        && matches(&WatchEvent {
                            rv: 0,
                            plural: p,
                            namespace: ns.clone(),
                            kind: "",
                            object: Value::Null,
                        })
                    {
                        first.push(line("ADDED", o));
                    }
                }
            }
        }
    }
    let bookmark_line = move |rv: u64| {
        line(
            "BOOKMARK",
            &json!({"kind": ty.kind, "apiVersion": ty.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()}}),
        )
    };
    tokio::spawn(async move {
        for l in first {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            let out = tokio::select! {
                ev = live.recv() => match ev {
                    _ if watching.down.load(std::sync::atomic::Ordering::SeqCst) => return,
                    Ok(ev) if ev.rv > last_rv => {
                        last_rv = ev.rv;
                        if !matches(&ev) { continue }
                        line(ev.kind, &ev.object)
                    }
                    Ok(_) => continue,
                    // Too slow a reader: end the watch; the client resumes from its
                    // last resourceVersion (or gets 410 and lists again).
                    Err(_) => return,
                },
                _ = bookmark.changed(), if bookmarks => bookmark_line(last_rv),
                _ = every.tick(), if bookmarks => bookmark_line(last_rv),
                _ = cut.changed() => return,
                _ = &mut deadline => return,
            };
            if tx.send(out).await.is_err() {
                return;
            }
        }
    });
    stream_response(rx)
}

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    use futures::StreamExt;
    let body = StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|b| Ok::<_, Infallible>(Frame::data(b))),
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed(body))
        .expect("valid response")
}
