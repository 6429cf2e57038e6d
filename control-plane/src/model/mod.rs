//! The control plane's one internal model of the mesh.
//!
//! Sources (the YAML file today, Kubernetes later) fill [`MeshSpec`] with what they read;
//! [`Model::build`] validates it and derives everything the translator needs (which
//! workloads are enrolled, each service's endpoints), so every source gets the same
//! rules and the translator never looks at a source.

pub mod authn;
pub mod authz;
pub mod http;
pub mod incremental;
pub mod ratelimit;
pub mod traffic;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

pub use http::{HttpRoute, HttpRouteSpec, Protocol};

/// Namespace label that enrolls a namespace's pods (`ambient`), and pod label that opts
/// one out (`none`).
pub const DATAPLANE_LABEL: &str = "ambit.dev/dataplane";
/// Label value that enrolls a namespace.
pub const DATAPLANE_AMBIENT: &str = "ambient";
/// Label value that opts a pod out.
pub const DATAPLANE_NONE: &str = "none";
/// Namespace or service label naming a waypoint.
pub const WAYPOINT_LABEL: &str = "ambit.dev/waypoint";
/// Label of a waypoint's pods naming their waypoint (as Gateway API implementations
/// label the pods of a Gateway's deployment).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The port a waypoint accepts HBONE on.
pub const WAYPOINT_PORT: u16 = 15008;

/// Namespace or pod label choosing how an enrolled workload's agent treats plaintext
/// inbound connections: `STRICT` (refused; the default) or `PERMISSIVE` (accepted, with
/// policy applied by source IP). A pod's label overrides its namespace's.
pub const MTLS_LABEL: &str = "ambit.dev/mtls";

/// Kubernetes-style labels: key → value.
pub type Labels = BTreeMap<String, String>;

/// How plaintext inbound connections to an enrolled workload are treated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MtlsMode {
    /// Plaintext inbound connections are refused.
    #[default]
    Strict,
    /// Plaintext inbound connections are accepted, with policy applied by source IP.
    Permissive,
}

impl MtlsMode {
    fn parse(v: &str) -> Option<Self> {
        match v {
            "STRICT" => Some(Self::Strict),
            "PERMISSIVE" => Some(Self::Permissive),
            _ => None,
        }
    }
}

/// `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    /// The namespace.
    pub namespace: String,
    /// The name within the namespace.
    pub name: String,
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a source read, before validation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshSpec {
    /// The SPIFFE trust domain (a DNS name).
    pub trust_domain: String,
    /// The namespaces.
    pub namespaces: Vec<NamespaceSpec>,
    /// The nodes workloads run on.
    pub nodes: Vec<NodeSpec>,
    /// The workloads (pods).
    pub workloads: Vec<WorkloadSpec>,
    /// The services.
    pub services: Vec<ServiceSpec>,
    /// The authorization policies node agents enforce (L4, by selector).
    pub policies: Vec<PolicySpec>,
    /// The authorization policies waypoints enforce (L7, by `targetRefs`).
    pub waypoint_policies: Vec<authz::WaypointPolicySpec>,
    /// The JWTs waypoints accept (Istio `RequestAuthentication`s with `targetRefs`).
    pub request_authentications: Vec<authn::RequestAuthenticationSpec>,
    /// The waypoints.
    pub waypoints: Vec<WaypointSpec>,
    /// The HTTP routes.
    pub http_routes: Vec<HttpRouteSpec>,
    /// Istio `DestinationRule`s: traffic policy per service.
    pub destination_rules: Vec<traffic::DestinationRuleSpec>,
    /// The ServiceAccounts that exist, where the source knows them (Kubernetes): an
    /// identity whose ServiceAccount is gone is issued no certificate. `None`: every
    /// identity a workload names is valid (the mesh file).
    pub service_accounts: Option<Vec<NamespacedName>>,
}

/// A waypoint as a source reads it (a Gateway of Ambit's waypoint class). Its pods are
/// the workloads of its namespace labelled [`GATEWAY_NAME_LABEL`]`: <name>`; it gets a
/// service of its name whose endpoints they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaypointSpec {
    /// Its name (a DNS label), unique among the namespace's services.
    pub name: String,
    /// Its namespace; it serves services of this namespace.
    pub namespace: String,
    /// Its service's virtual IPs (may be empty: agents reach its pods directly).
    pub vips: Vec<IpAddr>,
}

/// A namespace as a source reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceSpec {
    /// Its name (a DNS label).
    pub name: String,
    /// Its labels (enrollment, mTLS mode, waypoint).
    pub labels: Labels,
}

/// A node as a source reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSpec {
    /// Its name (a DNS name).
    pub name: String,
}

/// A workload (pod) as a source reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// Defaults to `namespace/name`.
    pub uid: Option<String>,
    /// Its name (a DNS name).
    pub name: String,
    /// Its namespace, which must be defined.
    pub namespace: String,
    /// The node it runs on, which must be defined.
    pub node: String,
    /// Defaults to `default`.
    pub service_account: Option<String>,
    /// Its IPs: at least one, at most one per family.
    pub ips: Vec<IpAddr>,
    /// Its labels (selected by services and policies; may opt out or set the mTLS mode).
    pub labels: Labels,
    /// Shutting down (a Kubernetes pod with a deletion timestamp): still a member of the
    /// mesh, so its connections keep their identity, but no longer a service endpoint.
    pub terminating: bool,
}

impl WorkloadSpec {
    /// What the model keys the workload by: its uid, else `namespace/name`.
    pub fn key(&self) -> String {
        self.uid
            .clone()
            .unwrap_or_else(|| format!("{}/{}", self.namespace, self.name))
    }
}

/// A service as a source reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Its name (a DNS label).
    pub name: String,
    /// Its namespace, which must be defined.
    pub namespace: String,
    /// Its virtual IPs: at least one, at most one per family.
    pub vips: Vec<IpAddr>,
    /// Its ports: at least one, each port number listed once.
    pub ports: Vec<ServicePort>,
    /// Workloads in the service's namespace whose labels contain all of these. An empty
    /// selector selects nothing (a service without endpoints), as in Kubernetes.
    pub selector: Labels,
    /// A service without a selector: its endpoints as listed elsewhere (Kubernetes
    /// EndpointSlices), as uids of workloads of its namespace. Ignored with a selector.
    pub endpoints: Option<Vec<String>>,
    /// Its labels (may name a waypoint).
    pub labels: Labels,
}

/// One port of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// An optional name for the port.
    pub name: Option<String>,
    /// The port clients dial on the service's VIPs.
    pub port: u16,
    /// The port of the endpoints that connections to it go to.
    pub target_port: u16,
    /// `tcp`, `http`, `http2`, `grpc` (or `kubernetes.io/h2c`); without it the name's
    /// prefix decides (`http-web`), and otherwise the port is TCP.
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// The port's protocol (TCP if its `appProtocol` is not valid: the model refuses
    /// such ports, so this only matters before validation).
    pub fn protocol(&self) -> Protocol {
        Protocol::of(self.app_protocol.as_deref(), self.name.as_deref()).unwrap_or_default()
    }
}

/// An authorization policy as a source reads it, before validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySpec {
    /// Its name, unique in its namespace.
    pub name: String,
    /// The namespace whose workloads it applies to.
    pub namespace: String,
    /// Workloads of the namespace it applies to; `None`: all of them.
    pub selector: Option<Labels>,
    /// What a match does.
    pub action: Action,
    /// The policy matches a connection if any rule matches; with no rules it matches
    /// nothing, whatever its action (as in Istio).
    pub rules: Vec<Rule>,
}

use ambit_identity::Identity;
pub use ambit_mesh::cidr::Cidr;
pub use ambit_policy::{
    Action, Authorization as Policy, Destination, PrincipalPattern, Rule, Source,
};

/// A validated mesh with derived fields.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// By name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Node names.
    pub nodes: BTreeSet<String>,
    /// By uid. A persistent map of shared entries: a model derived from another (a
    /// change to one pod) shares all that did not change with it, and cloning a model
    /// copies nothing.
    pub workloads: imbl::OrdMap<String, Arc<Workload>>,
    /// By namespace and name, shared as workloads are.
    pub services: imbl::OrdMap<NamespacedName, Arc<Service>>,
    /// Authorization policies node agents enforce, by namespace and name.
    pub policies: BTreeMap<NamespacedName, Policy>,
    /// Authorization policies waypoints enforce, by namespace and name.
    pub waypoint_policies: BTreeMap<NamespacedName, authz::WaypointPolicy>,
    /// Request authentications waypoints apply, by namespace and name.
    pub request_authentications: BTreeMap<NamespacedName, authn::RequestAuthentication>,
    /// Waypoints, by namespace and name.
    pub waypoints: BTreeMap<NamespacedName, Waypoint>,
    /// HTTP routes, by namespace and name.
    pub http_routes: BTreeMap<NamespacedName, HttpRoute>,
    /// The ServiceAccounts that exist (`None`: the source does not say, and every
    /// identity a workload names is valid).
    pub service_accounts: Option<BTreeSet<NamespacedName>>,
}

impl Model {
    /// Whether `identity` may be issued a certificate: its ServiceAccount exists (a
    /// deleted ServiceAccount revokes the identity, as it revokes its tokens; the pods
    /// keep running and stay captured, but their next certificate is refused, so their
    /// connections fail closed instead of going on as a revoked identity).
    pub fn identity_current(&self, identity: &Identity) -> bool {
        self.service_accounts.as_ref().is_none_or(|sas| {
            sas.contains(&NamespacedName {
                namespace: identity.namespace().to_owned(),
                name: identity.service_account().to_owned(),
            })
        })
    }
}

/// What deriving a workload needs of the rest of the model.
pub(crate) struct Context<'a> {
    trust_domain: &'a str,
    /// The trust domain is valid (its problem is reported once, not per workload).
    trust_domain_ok: bool,
    namespaces: &'a BTreeMap<String, Namespace>,
    nodes: &'a BTreeSet<String>,
    /// Whether a waypoint of this namespace and name is declared.
    is_waypoint: &'a dyn Fn(&NamespacedName) -> bool,
}

/// A workload as its spec and the model make it (all but `waypoint`, which needs the
/// services), or `None` with its problems added to `p`. Its IPs are claimed in
/// `ip_owner`; `known` says whether a uid is taken already.
fn derive_workload(
    p: &mut Problems,
    place: &str,
    w: WorkloadSpec,
    cx: &Context<'_>,
    ip_owner: &mut HashMap<IpAddr, String>,
    known: &dyn Fn(&str) -> bool,
) -> Option<Workload> {
    let before = p.0.len();
    if !is_dns_subdomain(&w.name) {
        p.add(place, "name must be a DNS name");
    }
    let ns = cx.namespaces.get(&w.namespace);
    if ns.is_none() {
        p.add(
            place,
            format!(
                "namespace {:?} is not defined under namespaces",
                w.namespace
            ),
        );
    }
    if !cx.nodes.contains(&w.node) {
        p.add(
            place,
            format!("node {:?} is not defined under nodes", w.node),
        );
    }
    let sa = w
        .service_account
        .clone()
        .unwrap_or_else(|| "default".into());
    if !is_dns_subdomain(&sa) {
        p.add(&format!("{place}.serviceAccount"), "must be a DNS name");
    }
    check_ips(
        p,
        place,
        &w.ips,
        &format!("workload {}/{}", w.namespace, w.name),
        ip_owner,
    );
    let uid = w.key();
    if known(&uid) {
        p.add(place, format!("uid {uid:?} is used twice"));
    }
    check_mtls_label(p, place, &w.labels);
    if p.0.len() > before {
        return None;
    }
    let identity = match Identity::new(cx.trust_domain, &w.namespace, &sa) {
        Ok(id) => id,
        Err(e) => {
            // An invalid trust domain is reported once, by the caller.
            if cx.trust_domain_ok {
                p.add(place, e.to_string());
            }
            return None;
        }
    };
    let ns = ns.expect("checked above");
    let opted_out = w.labels.get(DATAPLANE_LABEL).map(String::as_str) == Some(DATAPLANE_NONE);
    let native_tunnel = w.labels.get(GATEWAY_NAME_LABEL).is_some_and(|g| {
        (cx.is_waypoint)(&NamespacedName {
            namespace: w.namespace.clone(),
            name: g.clone(),
        })
    });
    Some(Workload {
        enrolled: ns.enrolled() && !opted_out && !native_tunnel,
        native_tunnel,
        // Derived once services are known.
        waypoint: None,
        mtls: w
            .labels
            .get(MTLS_LABEL)
            .or_else(|| ns.labels.get(MTLS_LABEL))
            .and_then(|v| MtlsMode::parse(v))
            .unwrap_or_default(),
        uid,
        identity,
        name: w.name,
        namespace: w.namespace,
        node: w.node,
        service_account: sa,
        ips: w.ips,
        labels: w.labels,
        terminating: w.terminating,
    })
}

/// The endpoints of a service of `namespace_workloads` (its namespace's, in uid order):
/// those its selector selects, or, without a selector, those `listed` (in their order);
/// never a terminating one.
fn endpoints_of(
    selector: &Labels,
    listed: Option<&[String]>,
    namespace_workloads: &[&Workload],
) -> Vec<String> {
    match (listed, selector.is_empty()) {
        (Some(listed), true) => {
            let here: HashMap<&str, &&Workload> = namespace_workloads
                .iter()
                .map(|w| (w.uid.as_str(), w))
                .collect();
            listed
                .iter()
                .filter(|uid| here.get(uid.as_str()).is_some_and(|w| !w.terminating))
                .cloned()
                .collect()
        }
        _ => namespace_workloads
            .iter()
            .filter(|w| !w.terminating && selects(selector, &w.labels))
            .map(|w| w.uid.clone())
            .collect(),
    }
}

/// Which waypoint a workload's traffic must come through: its namespace's, or that of
/// a service selecting it (`via`), if that waypoint exists.
fn waypoint_of<'a>(
    w: &Workload,
    namespaces: &BTreeMap<String, Namespace>,
    waypoints: &BTreeMap<NamespacedName, Waypoint>,
    via: impl Fn(&str) -> Option<&'a String>,
) -> Option<String> {
    namespaces
        .get(&w.namespace)
        .and_then(|ns| ns.labels.get(WAYPOINT_LABEL))
        .or_else(|| via(&w.uid))
        .filter(|wp| {
            waypoints.contains_key(&NamespacedName {
                namespace: w.namespace.clone(),
                name: (*wp).clone(),
            })
        })
        .cloned()
}

/// A validated waypoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waypoint {
    /// Its name (also its service's).
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its pods' identity (`None` while it has no pods).
    pub identity: Option<Identity>,
    /// uids of its pods.
    pub replicas: Vec<String>,
}

/// A validated namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: Labels,
}

impl Namespace {
    /// Pods of this namespace join the mesh.
    pub fn enrolled(&self) -> bool {
        self.labels.get(DATAPLANE_LABEL).map(String::as_str) == Some(DATAPLANE_AMBIENT)
    }
}

/// A validated workload, with derived fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Unique id: the source's, or `namespace/name`.
    pub uid: String,
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// The node it runs on.
    pub node: String,
    /// Its service account (`default` if the source named none).
    pub service_account: String,
    /// Its IPs (at most one per family).
    pub ips: Vec<IpAddr>,
    /// Its labels.
    pub labels: Labels,
    /// Shutting down: in the mesh, but no service's endpoint.
    pub terminating: bool,
    /// Derived: its namespace is enrolled and it did not opt out (never for a
    /// waypoint's pod).
    pub enrolled: bool,
    /// Derived: a waypoint's pod, which speaks HBONE itself and is never captured.
    pub native_tunnel: bool,
    /// Derived: the waypoint its traffic must come through: its namespace's, or that of
    /// a service selecting it (never for a waypoint's own pods).
    pub waypoint: Option<String>,
    /// Derived: from its own or its namespace's [`MTLS_LABEL`].
    pub mtls: MtlsMode,
    /// Derived: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub identity: Identity,
}

/// A validated service, with derived fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// `<name>.<namespace>.svc.cluster.local`.
    pub hostname: String,
    /// Its virtual IPs.
    pub vips: Vec<IpAddr>,
    /// Its ports.
    pub ports: Vec<ServicePort>,
    /// Selects its endpoints among its namespace's workloads (empty: none).
    pub selector: Labels,
    /// Derived: uids of the selected workloads.
    pub endpoints: Vec<String>,
    /// From the service's or its namespace's `ambit.dev/waypoint` label.
    pub waypoint: Option<String>,
    /// This is a waypoint's own service (its endpoints are the waypoint's pods).
    pub is_waypoint: bool,
    /// How waypoints send requests to it (its `DestinationRule`).
    pub traffic: traffic::TrafficPolicy,
}

/// One problem with a source's input: where, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// e.g. `workloads[2] (shop/web-0).ips[1]`.
    pub place: String,
    /// What is wrong there.
    pub problem: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.place, self.problem)
    }
}

fn check_mtls_label(p: &mut Problems, place: &str, labels: &Labels) {
    if let Some(v) = labels.get(MTLS_LABEL)
        && MtlsMode::parse(v).is_none()
    {
        p.add(
            &format!("{place}.labels.{MTLS_LABEL}"),
            format!("{v:?} is not STRICT or PERMISSIVE"),
        );
    }
}

impl Model {
    /// Validates `spec` and derives the model. All problems are reported, not just the
    /// first.
    pub fn build(spec: MeshSpec) -> Result<Model, Vec<Problem>> {
        let (m, p) = Self::build_lenient(spec);
        if p.is_empty() { Ok(m) } else { Err(p) }
    }

    /// Validates `spec` and derives the model of what is valid in it, leaving out each
    /// item that has a problem, and says why. A file is one document, accepted or
    /// rejected whole ([`Model::build`]); a Kubernetes cluster is many objects written
    /// by many hands, and one bad object must not stop the rest of the mesh.
    pub fn build_lenient(spec: MeshSpec) -> (Model, Vec<Problem>) {
        let mut p = Problems::default();
        let mut m = Model {
            trust_domain: spec.trust_domain.clone(),
            ..Default::default()
        };
        let td_ok = is_dns_subdomain(&spec.trust_domain);
        if !td_ok {
            p.add(
                "trustDomain",
                format!(
                    "{:?} is not a valid trust domain (a DNS name)",
                    spec.trust_domain
                ),
            );
        }

        for (i, ns) in spec.namespaces.into_iter().enumerate() {
            let place = format!("namespaces[{i}] ({})", ns.name);
            check_mtls_label(&mut p, &place, &ns.labels);
            if !is_dns_label(&ns.name) {
                p.add(
                    &place,
                    "name must be a DNS label (lowercase letters, digits, '-', at most 63)",
                );
            } else if m.namespaces.contains_key(&ns.name) {
                p.add(&place, format!("namespace {:?} is defined twice", ns.name));
            } else {
                m.namespaces.insert(
                    ns.name.clone(),
                    Namespace {
                        name: ns.name,
                        labels: ns.labels,
                    },
                );
            }
        }
        for (i, n) in spec.nodes.into_iter().enumerate() {
            let place = format!("nodes[{i}] ({})", n.name);
            if !is_dns_subdomain(&n.name) {
                p.add(&place, "name must be a DNS name");
            } else if !m.nodes.insert(n.name.clone()) {
                p.add(&place, format!("node {:?} is defined twice", n.name));
            }
        }

        // Waypoints first: whether a workload is a waypoint's pod depends on them.
        let mut declared: BTreeMap<NamespacedName, WaypointSpec> = BTreeMap::new();
        for (i, wp) in spec.waypoints.into_iter().enumerate() {
            let place = format!("waypoints[{i}] ({}/{})", wp.namespace, wp.name);
            let key = NamespacedName {
                namespace: wp.namespace.clone(),
                name: wp.name.clone(),
            };
            if !is_dns_label(&wp.name) {
                p.add(&place, "name must be a DNS label");
            } else if !m.namespaces.contains_key(&wp.namespace) {
                p.add(
                    &place,
                    format!(
                        "namespace {:?} is not defined under namespaces",
                        wp.namespace
                    ),
                );
            } else {
                match declared.entry(key) {
                    std::collections::btree_map::Entry::Occupied(e) => {
                        p.add(&place, format!("waypoint {} is defined twice", e.key()));
                    }
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(wp);
                    }
                }
            }
        }

        let mut ip_owner: HashMap<IpAddr, String> = HashMap::new();
        for (i, w) in spec.workloads.into_iter().enumerate() {
            let place = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
            let known = |uid: &str| m.workloads.contains_key(uid);
            let derived = derive_workload(
                &mut p,
                &place,
                w,
                &Context {
                    trust_domain: &spec.trust_domain,
                    trust_domain_ok: td_ok,
                    namespaces: &m.namespaces,
                    nodes: &m.nodes,
                    is_waypoint: &|k| declared.contains_key(k),
                },
                &mut ip_owner,
                &known,
            );
            if let Some(w) = derived {
                m.workloads.insert(w.uid.clone(), Arc::new(w));
            }
        }

        let mut by_namespace: HashMap<&str, Vec<&Workload>> = HashMap::new();
        for w in m.workloads.values() {
            by_namespace
                .entry(w.namespace.as_str())
                .or_default()
                .push(w);
        }
        for (i, s) in spec.services.into_iter().enumerate() {
            let place = format!("services[{i}] ({}/{})", s.namespace, s.name);
            let before = p.0.len();
            if !is_dns_label(&s.name) {
                p.add(&place, "name must be a DNS label");
            }
            let ns = m.namespaces.get(&s.namespace);
            if ns.is_none() {
                p.add(
                    &place,
                    format!(
                        "namespace {:?} is not defined under namespaces",
                        s.namespace
                    ),
                );
            }
            let key = NamespacedName {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
            };
            if m.services.contains_key(&key) {
                p.add(&place, format!("service {key} is defined twice"));
            }
            check_ips(
                &mut p,
                &place,
                &s.vips,
                &format!("service {key}"),
                &mut ip_owner,
            );
            if s.ports.is_empty() {
                p.add(&place, "ports is empty");
            }
            if declared.contains_key(&key) {
                p.add(
                    &place,
                    format!("{key} is a waypoint, which has a service of its own by that name"),
                );
            }
            let mut seen = BTreeSet::new();
            for (j, port) in s.ports.iter().enumerate() {
                if port.port == 0 || port.target_port == 0 {
                    p.add(&format!("{place}.ports[{j}]"), "ports must be 1-65535");
                }
                if let Err(e) = Protocol::of(port.app_protocol.as_deref(), port.name.as_deref()) {
                    p.add(&format!("{place}.ports[{j}]"), e);
                }
                if !seen.insert(port.port) {
                    p.add(
                        &format!("{place}.ports[{j}]"),
                        format!("port {} is listed twice", port.port),
                    );
                }
            }
            if p.0.len() > before {
                continue;
            }
            let ns = ns.expect("checked above");
            // Only the service's namespace can hold its endpoints: look there, not at the
            // whole mesh (services × workloads would dominate a large mesh's build).
            let endpoints = endpoints_of(
                &s.selector,
                s.endpoints.as_deref(),
                by_namespace
                    .get(s.namespace.as_str())
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
            );
            m.services.insert(
                key,
                Arc::new(Service {
                    hostname: format!("{}.{}.svc.cluster.local", s.name, s.namespace),
                    waypoint: s
                        .labels
                        .get(WAYPOINT_LABEL)
                        .or_else(|| ns.labels.get(WAYPOINT_LABEL))
                        .cloned(),
                    name: s.name,
                    namespace: s.namespace,
                    vips: s.vips,
                    ports: s.ports,
                    selector: s.selector,
                    endpoints,
                    is_waypoint: false,
                    traffic: Default::default(),
                }),
            );
        }
        // A waypoint label must name a waypoint of the same namespace.
        for s in m.services.values() {
            if let Some(wp) = &s.waypoint {
                let key = NamespacedName {
                    namespace: s.namespace.clone(),
                    name: wp.clone(),
                };
                if !declared.contains_key(&key) {
                    p.add(
                        &format!("services ({}/{})", s.namespace, s.name),
                        format!("waypoint {key} is not defined under waypoints"),
                    );
                }
            }
        }
        for ns in m.namespaces.values() {
            if let Some(wp) = ns.labels.get(WAYPOINT_LABEL) {
                let key = NamespacedName {
                    namespace: ns.name.clone(),
                    name: wp.clone(),
                };
                if !declared.contains_key(&key) {
                    p.add(
                        &format!("namespaces ({}).labels.{WAYPOINT_LABEL}", ns.name),
                        format!("waypoint {key} is not defined under waypoints"),
                    );
                }
            }
        }
        // Each waypoint: its pods, their one identity, and its own service.
        for (i, (key, wp)) in declared.into_iter().enumerate() {
            let place = format!("waypoints ({key})");
            let pods: Vec<&Workload> = by_namespace
                .get(key.namespace.as_str())
                .into_iter()
                .flatten()
                .filter(|w| w.native_tunnel && w.labels.get(GATEWAY_NAME_LABEL) == Some(&key.name))
                .copied()
                .collect();
            let identities: BTreeSet<&Identity> = pods.iter().map(|w| &w.identity).collect();
            if identities.len() > 1 {
                p.add(
                    &place,
                    format!(
                        "its pods run as {} different service accounts; a waypoint has one identity",
                        identities.len()
                    ),
                );
                continue;
            }
            // A waypoint's service may have no VIP: agents reach its pods directly.
            if !wp.vips.is_empty() {
                check_ips(
                    &mut p,
                    &format!("waypoints[{i}] ({key})"),
                    &wp.vips,
                    &format!("waypoint {key}"),
                    &mut ip_owner,
                );
            }
            let ready: Vec<String> = pods
                .iter()
                .filter(|w| !w.terminating)
                .map(|w| w.uid.clone())
                .collect();
            m.services.insert(
                key.clone(),
                Arc::new(Service {
                    name: key.name.clone(),
                    namespace: key.namespace.clone(),
                    hostname: format!("{}.{}.svc.cluster.local", key.name, key.namespace),
                    vips: wp.vips,
                    ports: vec![ServicePort {
                        name: Some("mesh".into()),
                        port: WAYPOINT_PORT,
                        target_port: WAYPOINT_PORT,
                        app_protocol: None,
                    }],
                    selector: [(GATEWAY_NAME_LABEL.to_owned(), key.name.clone())].into(),
                    endpoints: ready.clone(),
                    waypoint: None,
                    is_waypoint: true,
                    traffic: Default::default(),
                }),
            );
            m.waypoints.insert(
                key.clone(),
                Waypoint {
                    name: key.name,
                    namespace: key.namespace,
                    identity: identities.into_iter().next().cloned(),
                    replicas: ready,
                },
            );
        }
        // Which waypoint a workload's traffic must come through: its namespace's, or
        // (for the workloads a service with a waypoint selects) the service's.
        let mut via: HashMap<String, String> = HashMap::new();
        for s in m.services.values() {
            if let Some(wp) = &s.waypoint {
                for uid in &s.endpoints {
                    via.entry(uid.clone()).or_insert_with(|| wp.clone());
                }
            }
        }
        drop(by_namespace);
        let updates: Vec<(String, Option<String>)> = m
            .workloads
            .values()
            .filter(|w| !w.native_tunnel)
            .filter_map(|w| {
                let wp = waypoint_of(w, &m.namespaces, &m.waypoints, |uid| via.get(uid));
                (wp != w.waypoint).then(|| (w.uid.clone(), wp))
            })
            .collect();
        for (uid, wp) in updates {
            if let Some(w) = m.workloads.get_mut(&uid) {
                Arc::make_mut(w).waypoint = wp;
            }
        }

        for (i, pol) in spec.policies.into_iter().enumerate() {
            let place = format!("policies[{i}] ({}/{})", pol.namespace, pol.name);
            let before = p.0.len();
            if !is_dns_subdomain(&pol.name) {
                p.add(&place, "name must be a DNS name");
            }
            if !m.namespaces.contains_key(&pol.namespace) {
                p.add(
                    &place,
                    format!(
                        "namespace {:?} is not defined under namespaces",
                        pol.namespace
                    ),
                );
            }
            let key = NamespacedName {
                namespace: pol.namespace.clone(),
                name: pol.name.clone(),
            };
            if m.policies.contains_key(&key) {
                p.add(&place, format!("policy {key} is defined twice"));
            }
            for (r, rule) in pol.rules.iter().enumerate() {
                for (t, dst) in rule.to.iter().enumerate() {
                    if dst
                        .ports
                        .iter()
                        .chain(&dst.not_ports)
                        .any(|&port| port == 0)
                    {
                        p.add(
                            &format!("{place}.rules[{r}].to[{t}]"),
                            "ports must be 1-65535",
                        );
                    }
                }
            }
            if p.0.len() > before {
                continue;
            }
            m.policies.insert(
                key,
                Policy {
                    name: pol.name,
                    namespace: pol.namespace,
                    selector: pol.selector,
                    action: pol.action,
                    rules: pol.rules,
                },
            );
        }
        m.waypoint_policies = authz::validate(
            &mut p,
            spec.waypoint_policies,
            &m.services,
            &m.waypoints,
            &|k| m.policies.contains_key(k),
        );
        m.request_authentications = authn::validate(
            &mut p,
            spec.request_authentications,
            &m.services,
            &m.waypoints,
        );
        m.http_routes = http::validate(&mut p, spec.http_routes, &m.services);
        m.service_accounts = spec.service_accounts.map(|sas| sas.into_iter().collect());
        traffic::apply(&mut p, spec.destination_rules, &mut m.services);
        (m, p.0)
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, place: &str, problem: impl Into<String>) {
        self.0.push(Problem {
            place: place.to_owned(),
            problem: problem.into(),
        });
    }
}

/// `Ok` without problems, else them as `place: problem; …`.
fn joined(p: Problems) -> Result<(), String> {
    if p.0.is_empty() {
        return Ok(());
    }
    Err(p
        .0
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("; "))
}

fn check_ips(
    p: &mut Problems,
    place: &str,
    ips: &[IpAddr],
    owner: &str,
    owners: &mut HashMap<IpAddr, String>,
) {
    if ips.is_empty() {
        p.add(place, "needs at least one IP");
    }
    if ips.iter().filter(|ip| ip.is_ipv4()).count() > 1
        || ips.iter().filter(|ip| ip.is_ipv6()).count() > 1
    {
        p.add(place, "at most one IP per family");
    }
    for (j, ip) in ips.iter().enumerate() {
        if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
            p.add(&format!("{place}.ips[{j}]"), format!("{ip} cannot be used"));
        } else if let Some(other) = owners.get(ip) {
            p.add(
                &format!("{place}.ips[{j}]"),
                format!("{ip} is already used by {other}"),
            );
        } else {
            owners.insert(*ip, owner.to_owned());
        }
    }
}

/// Does a (non-empty) selector select these labels?
pub fn selects(selector: &Labels, labels: &Labels) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn base() -> MeshSpec {
        MeshSpec {
            trust_domain: "cluster.local".into(),
            namespaces: vec![
                NamespaceSpec {
                    name: "shop".into(),
                    labels: labels(&[(DATAPLANE_LABEL, DATAPLANE_AMBIENT)]),
                },
                NamespaceSpec {
                    name: "legacy".into(),
                    labels: Labels::new(),
                },
            ],
            nodes: vec![NodeSpec {
                name: "node-1".into(),
            }],
            workloads: vec![
                WorkloadSpec {
                    name: "web-0".into(),
                    namespace: "shop".into(),
                    node: "node-1".into(),
                    service_account: Some("web".into()),
                    ips: vec!["10.244.1.10".parse().unwrap()],
                    labels: labels(&[("app", "web")]),
                    ..Default::default()
                },
                WorkloadSpec {
                    name: "old-0".into(),
                    namespace: "legacy".into(),
                    node: "node-1".into(),
                    ips: vec!["10.244.1.11".parse().unwrap()],
                    ..Default::default()
                },
            ],
            services: vec![ServiceSpec {
                name: "web".into(),
                namespace: "shop".into(),
                vips: vec!["10.96.0.10".parse().unwrap()],
                ports: vec![ServicePort {
                    name: None,
                    port: 80,
                    target_port: 8080,
                    app_protocol: None,
                }],
                selector: labels(&[("app", "web")]),
                endpoints: None,
                labels: Labels::new(),
            }],
            policies: vec![],
            waypoints: vec![],
            request_authentications: vec![],
            waypoint_policies: vec![],
            http_routes: vec![],
            destination_rules: vec![],
            service_accounts: None,
        }
    }

    #[test]
    fn derives_enrollment_endpoints_and_identity() {
        let m = Model::build(base()).unwrap();
        let web = &m.workloads["shop/web-0"];
        assert!(web.enrolled);
        assert_eq!(
            web.identity.as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert!(!m.workloads["legacy/old-0"].enrolled);
        assert_eq!(m.workloads["legacy/old-0"].service_account, "default");
        let svc = &m.services[&NamespacedName {
            namespace: "shop".into(),
            name: "web".into(),
        }];
        assert_eq!(svc.endpoints, vec!["shop/web-0".to_string()]);
        assert_eq!(svc.hostname, "web.shop.svc.cluster.local");
    }

    #[test]
    fn mtls_mode_is_strict_by_default_and_labels_choose_it() {
        let mut s = base();
        s.namespaces[0]
            .labels
            .insert(MTLS_LABEL.into(), "PERMISSIVE".into());
        let m = Model::build(s.clone()).unwrap();
        assert_eq!(m.workloads["shop/web-0"].mtls, MtlsMode::Permissive);
        assert_eq!(m.workloads["legacy/old-0"].mtls, MtlsMode::Strict);
        s.workloads[0]
            .labels
            .insert(MTLS_LABEL.into(), "STRICT".into());
        assert_eq!(
            Model::build(s.clone()).unwrap().workloads["shop/web-0"].mtls,
            MtlsMode::Strict
        );
        s.workloads[0]
            .labels
            .insert(MTLS_LABEL.into(), "strict".into());
        let problems = Model::build(s).unwrap_err();
        assert_eq!(
            problems[0].to_string(),
            "workloads[0] (shop/web-0).labels.ambit.dev/mtls: \"strict\" is not STRICT or PERMISSIVE"
        );
    }

    #[test]
    fn a_pod_label_opts_out() {
        let mut s = base();
        s.workloads[0]
            .labels
            .insert(DATAPLANE_LABEL.into(), DATAPLANE_NONE.into());
        assert!(!Model::build(s).unwrap().workloads["shop/web-0"].enrolled);
    }

    #[test]
    fn reports_every_problem_with_its_place() {
        let mut s = base();
        s.workloads[1].namespace = "nowhere".into();
        s.workloads[1].node = "node-9".into();
        s.services[0].vips = vec!["10.244.1.10".parse().unwrap()]; // a workload's IP
        s.namespaces.push(NamespaceSpec {
            name: "shop".into(),
            labels: Labels::new(),
        });
        let problems = Model::build(s).unwrap_err();
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let has = |needle: &str| text.iter().any(|t| t.contains(needle));
        assert!(
            has("namespaces[2] (shop): namespace \"shop\" is defined twice"),
            "{text:#?}"
        );
        assert!(
            has("workloads[1] (nowhere/old-0): namespace \"nowhere\" is not defined"),
            "{text:#?}"
        );
        assert!(
            has("workloads[1] (nowhere/old-0): node \"node-9\" is not defined"),
            "{text:#?}"
        );
        assert!(
            has(
                "services[0] (shop/web).ips[0]: 10.244.1.10 is already used by workload shop/web-0"
            ),
            "{text:#?}"
        );
    }

    #[test]
    fn rejects_duplicate_workload_ips_and_zero_ports() {
        let mut s = base();
        s.workloads[1].ips = s.workloads[0].ips.clone();
        s.policies.push(PolicySpec {
            name: "p".into(),
            namespace: "shop".into(),
            selector: None,
            action: Action::Allow,
            rules: vec![Rule {
                from: vec![],
                to: vec![Destination {
                    ports: vec![0],
                    not_ports: vec![],
                }],
            }],
        });
        let text: Vec<String> = Model::build(s)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            text.iter()
                .any(|t| t.contains("already used by workload shop/web-0")),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t == "policies[0] (shop/p).rules[0].to[0]: ports must be 1-65535"),
            "{text:#?}"
        );
    }

    #[test]
    fn cidrs_parse() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().len, 8);
        assert_eq!("10.1.2.3".parse::<Cidr>().unwrap().len, 32);
        assert!("10.0.0.0/40".parse::<Cidr>().is_err());
    }
}
