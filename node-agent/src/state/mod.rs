//! What the control plane says about the mesh, as this agent knows it: workloads,
//! services and authorization policies, kept up to date by xDS ([`xds`]).
//!
//! The state holds every workload, service and policy behind its own `Arc`, indexed
//! by uid, IP, VIP and namespace, as ztunnel's `ProxyState` does. An update replaces
//! only the entries it names; a connection clones the two or three `Arc`s it needs and
//! holds nothing else, so no connection ever pins a copy of the whole mesh and no update
//! copies what it does not change.

mod index;
pub mod intern;
mod uid;
pub mod xds;

pub use uid::Uid;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, RwLock};

use ambit_identity::Identity;
use ambit_policy::{Authorization, Labels};
use serde::Serialize;
use tokio::sync::watch;

use index::{ByEntry, ByKey, IpIndex, Keyed, OneIpPerFamily};

/// A workload (pod).
///
/// An agent holds every workload of the mesh, so this is kept small (72 bytes; with its
/// `Arc`'s counts, one 96-byte heap chunk): what many workloads share (node, waypoint,
/// flags; identity and canonical names) is one allocation held by all of them (the xDS
/// decoder interns it: [`intern`]), the namespace and service account are read from
/// the identity (the decoder checks they agree), and the IPs are inline. At 10k
/// workloads each costs about this struct and its uid (which carries its name).
#[derive(Clone, Debug)]
pub struct Workload {
    /// The pod's uid (the resource name), which carries the pod's name: read with
    /// [`name`](Workload::name).
    pub uid: Uid,
    /// Where it runs and how the mesh treats it (shared by every workload alike).
    pub placement: Arc<Placement>,
    /// Who it is and how telemetry names it (shared by every workload alike).
    pub profile: Arc<Profile>,
    /// Its IPs, at most one per family.
    pub ips: Ips,
    /// Its labels, if any are kept: this node's workloads only (policy selectors need
    /// them), so every other workload holds one null pointer. Read with [`labels`].
    ///
    /// [`labels`]: Workload::labels
    pub labels: Option<Box<Labels>>,
    /// The xDS version it came with, when that is Ambit's 16 hex digits, as the number
    /// (any other version is kept beside the store by the [`xds::StoreHandler`]); 0 for
    /// a workload that did not come from xDS. A reconnect tells the control plane.
    pub version: u64,
}

/// Who a workload is and how telemetry names it: what the workloads of one app share
/// (one service account and one set of canonical labels), interned by the decoder.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Profile {
    /// Its SPIFFE identity: also its namespace and service account.
    pub identity: Arc<Identity>,
    /// How telemetry names it (Istio's canonical service rules, from its labels).
    pub canonical: Canonical,
}

impl Profile {
    /// What the interner hashes it by (and looks it up by, borrowed).
    pub fn key(&self) -> ProfileKey<'_> {
        (self.identity.as_str(), self.canonical.names())
    }
}

/// A [`Profile`]'s fields, borrowed: the identity's URI and the canonical names.
pub type ProfileKey<'a> = (&'a str, [&'a str; 4]);

/// Where a workload runs and how the mesh treats it: what many workloads hold alike (a
/// mesh has few nodes and waypoints), so the decoder interns it and a workload holds one
/// pointer instead of two names and three flags (32 bytes less per workload).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Placement {
    /// The node it runs on.
    pub node: Arc<str>,
    /// The waypoint (of its namespace) its inbound traffic must come through, if any.
    pub waypoint: Option<Arc<str>>,
    /// Its traffic is captured and tunnelled.
    pub enrolled: bool,
    /// A waypoint's pod: it speaks HBONE on 15008 itself (never captured), and gets its
    /// certificate from this agent's SDS if it runs here.
    pub native_tunnel: bool,
    /// How plaintext inbound connections to it are treated.
    pub mtls: MtlsMode,
}

impl Placement {
    /// What the interner hashes it by (and looks it up by, borrowed).
    pub fn key(&self) -> PlacementKey<'_> {
        (
            &self.node,
            self.waypoint.as_deref(),
            self.enrolled,
            self.native_tunnel,
            self.mtls,
        )
    }
}

/// A [`Placement`]'s fields, borrowed.
pub type PlacementKey<'a> = (&'a str, Option<&'a str>, bool, bool, MtlsMode);

/// Field by field, the name included (which [`Uid`]'s own equality leaves out).
impl PartialEq for Workload {
    fn eq(&self, o: &Self) -> bool {
        self.uid == o.uid
            && self.name() == o.name()
            && self.placement == o.placement
            && self.profile == o.profile
            && self.ips == o.ips
            && self.labels == o.labels
            && self.version == o.version
    }
}

impl Eq for Workload {}

impl Workload {
    /// The pod's name.
    pub fn name(&self) -> &str {
        self.uid.name()
    }

    /// The node it runs on.
    pub fn node(&self) -> &str {
        &self.placement.node
    }

    /// The waypoint its inbound traffic must come through, if any.
    pub fn waypoint(&self) -> Option<&str> {
        self.placement.waypoint.as_deref()
    }

    /// Is its traffic captured and tunnelled?
    pub fn enrolled(&self) -> bool {
        self.placement.enrolled
    }

    /// Is it a waypoint's pod, speaking HBONE itself?
    pub fn native_tunnel(&self) -> bool {
        self.placement.native_tunnel
    }

    /// How plaintext inbound connections to it are treated.
    pub fn mtls(&self) -> MtlsMode {
        self.placement.mtls
    }

    /// Its SPIFFE identity.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.profile.identity
    }

    /// How telemetry names it.
    pub fn canonical(&self) -> &Canonical {
        &self.profile.canonical
    }
}

/// As the config dump shows it (namespace and service account included).
impl Serialize for Workload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Workload", 13)?;
        st.serialize_field("uid", &self.uid)?;
        st.serialize_field("name", self.name())?;
        st.serialize_field("namespace", self.namespace())?;
        st.serialize_field("node", self.node())?;
        st.serialize_field("service_account", self.service_account())?;
        st.serialize_field("ips", &self.ips)?;
        st.serialize_field("enrolled", &self.enrolled())?;
        st.serialize_field("native_tunnel", &self.native_tunnel())?;
        st.serialize_field("waypoint", &self.waypoint())?;
        st.serialize_field("identity", self.identity())?;
        st.serialize_field("labels", self.labels())?;
        st.serialize_field("mtls", &self.mtls())?;
        st.serialize_field("canonical", self.canonical())?;
        st.end()
    }
}

/// A workload's addresses: at most one IPv4 and one IPv6 address, inline (a `Vec` would
/// be an allocation per workload for what is almost always one address).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Ips {
    v4: Option<std::net::Ipv4Addr>,
    v6: Option<std::net::Ipv6Addr>,
}

impl Ips {
    /// The addresses given, refusing two of one family.
    pub fn new(ips: impl IntoIterator<Item = IpAddr>) -> Result<Self, &'static str> {
        let mut out = Self::default();
        for ip in ips {
            let taken = match ip {
                IpAddr::V4(a) => out.v4.replace(a).is_some(),
                IpAddr::V6(a) => out.v6.replace(a).is_some(),
            };
            if taken {
                return Err("more than one address of a family");
            }
        }
        Ok(out)
    }

    /// The addresses, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
    }

    /// The first address (IPv4 if there is one).
    pub fn first(&self) -> Option<IpAddr> {
        self.iter().next()
    }

    /// Is `ip` one of them?
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4 == Some(*a),
            IpAddr::V6(a) => self.v6 == Some(*a),
        }
    }

    /// How many (0, 1 or 2).
    pub fn len(&self) -> usize {
        usize::from(self.v4.is_some()) + usize::from(self.v6.is_some())
    }

    /// None at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for Ips {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A list, as the `Vec` it replaced serialized.
impl Serialize for Ips {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// How Istio's telemetry names a workload, derived once from its labels. Each distinct
/// value is allocated once per workload (the canonical service and `app` are usually the
/// same label) and the defaults are shared by every workload: at 10k workloads this is
/// the difference between four strings each and about one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Canonical {
    /// `service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app`, or the name.
    pub service: Arc<str>,
    /// `service.istio.io/canonical-revision`, `app.kubernetes.io/version`, `version`,
    /// or `latest`.
    pub revision: Arc<str>,
    /// `app` or `app.kubernetes.io/name`, or `unknown`.
    pub app: Arc<str>,
    /// `version` or `app.kubernetes.io/version`, or `unknown`.
    pub version: Arc<str>,
}

impl Canonical {
    /// Istio's rules, applied to a workload's name and labels.
    pub fn derive(name: &str, labels: &Labels) -> Self {
        Self::from_names(Self::names_of(name, |k| labels.get(k).map(String::as_str)))
    }

    /// The four values Istio's rules give a workload's name and labels (looked up by
    /// `label`): service, revision, app, version.
    pub fn names_of<'a>(name: &'a str, label: impl Fn(&str) -> Option<&'a str>) -> [&'a str; 4] {
        use ambit_xds::istio;
        let label = |keys: &[&str]| istio::first(keys, &label);
        [
            label(&istio::CANONICAL_SERVICE_LABELS).unwrap_or(name),
            label(&istio::CANONICAL_REVISION_LABELS).unwrap_or(LATEST),
            label(&istio::APP_LABELS).unwrap_or(UNKNOWN),
            label(&istio::VERSION_LABELS).unwrap_or(UNKNOWN),
        ]
    }

    /// The values as [`names_of`](Self::names_of) lists them.
    pub fn names(&self) -> [&str; 4] {
        [&self.service, &self.revision, &self.app, &self.version]
    }

    /// One allocation per distinct value; the defaults are shared by every workload.
    pub fn from_names(names: [&str; 4]) -> Self {
        static LATEST_ARC: LazyLock<Arc<str>> = LazyLock::new(|| LATEST.into());
        static UNKNOWN_ARC: LazyLock<Arc<str>> = LazyLock::new(|| UNKNOWN.into());
        let mut made: Vec<Arc<str>> = Vec::with_capacity(4);
        let mut intern = |v: &str| -> Arc<str> {
            if let Some(a) = made.iter().find(|a| ***a == *v) {
                return a.clone();
            }
            let a: Arc<str> = match v {
                LATEST => LATEST_ARC.clone(),
                UNKNOWN => UNKNOWN_ARC.clone(),
                v => v.into(),
            };
            made.push(a.clone());
            a
        };
        let [service, revision, app, version] = names.map(&mut intern);
        Self {
            service,
            revision,
            app,
            version,
        }
    }
}

/// The default revision.
const LATEST: &str = "latest";
/// The default app and version.
const UNKNOWN: &str = "unknown";

impl Keyed for Workload {
    fn key(&self) -> &str {
        &self.uid
    }
}

impl OneIpPerFamily for Workload {
    fn v4(&self) -> Option<std::net::Ipv4Addr> {
        self.ips.v4
    }
    fn v6(&self) -> Option<std::net::Ipv6Addr> {
        self.ips.v6
    }
}

impl Workload {
    /// Its labels (none kept for another node's workload).
    pub fn labels(&self) -> &Labels {
        static NONE: Labels = Labels::new();
        self.labels.as_deref().unwrap_or(&NONE)
    }

    /// Its namespace.
    pub fn namespace(&self) -> &str {
        self.identity().namespace()
    }

    /// Its service account.
    pub fn service_account(&self) -> &str {
        self.identity().service_account()
    }

    /// Its IP of the same family as `like`.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.ips.iter().find(|ip| ip.is_ipv4() == like.is_ipv4())
    }

    /// `namespace/name`.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.namespace(), self.name())
    }

    /// Policy targeting: its namespace and labels.
    pub fn target(&self) -> ambit_policy::Target<'_> {
        ambit_policy::Target {
            namespace: self.namespace(),
            labels: self.labels(),
        }
    }
}

/// How plaintext (non-HBONE) inbound connections to an enrolled workload are treated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub enum MtlsMode {
    /// Refused.
    #[default]
    Strict,
    /// Accepted; authorization sees only the source IP.
    Permissive,
}

/// A service. An agent holds every service of the mesh: each field is exactly as long
/// as its content (boxed strings and slices, 112 bytes, one 144-byte heap chunk with its
/// `Arc`'s counts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    /// Its name.
    pub name: Box<str>,
    /// Its namespace.
    pub namespace: Box<str>,
    /// `<name>.<namespace>.svc.cluster.local`.
    pub hostname: Box<str>,
    /// Its virtual IPs.
    pub vips: Box<[IpAddr]>,
    /// (port, target port).
    pub ports: Box<[(u16, u16)]>,
    /// Uids of the workloads behind it (their own, when they were known first).
    pub endpoints: Box<[Uid]>,
    /// The waypoint it names, if any.
    pub waypoint: Option<Box<str>>,
}

impl Service {
    /// The target port behind `port`, if the service has that port.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports.iter().find(|(p, _)| *p == port).map(|(_, t)| *t)
    }
}

/// The agent's view of the mesh, with its indexes.
#[derive(Debug, Default)]
pub struct MeshState {
    /// This agent's node: its workloads keep their labels and need certificates.
    node: String,
    workloads: ByKey<Workload>,
    /// IP → workload: a table of the workloads themselves (one pointer a slot).
    by_ip: IpIndex<Workload, ByEntry<Workload>>,
    /// Uids of this node's workloads.
    local: HashSet<Uid>,
    services: HashMap<String, Arc<Service>>,
    by_vip: IpIndex<Service>,
    policies: HashMap<String, Arc<Authorization>>,
    policies_by_namespace: HashMap<String, Vec<Arc<Authorization>>>,
    /// Namespace → how many of its workloads are enrolled.
    enrolled_by_namespace: HashMap<String, usize>,
}

impl MeshState {
    /// An empty view for the agent of `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            ..Default::default()
        }
    }

    /// The node this view is for.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The workload with this uid.
    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// Every workload, in no order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    /// The workload with this IP.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// The service with this VIP.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip)
    }

    /// The policies of a namespace.
    pub fn policies_for(&self, namespace: &str) -> &[Arc<Authorization>] {
        self.policies_by_namespace
            .get(namespace)
            .map_or(&[], Vec::as_slice)
    }

    /// Authorizes `conn` to the local workload `dst` under its namespace's policies.
    pub fn authorize(
        &self,
        dst: &Workload,
        conn: &ambit_policy::Connection<'_>,
    ) -> ambit_policy::Decision<'_> {
        ambit_policy::authorize(
            self.policies_for(dst.namespace()).iter().map(|p| &**p),
            dst.target(),
            conn,
        )
    }

    /// The connection rate limits that apply to `conn` to `dst`: (`namespace/name`, rate).
    pub fn rate_limits(
        &self,
        dst: &Workload,
        conn: &ambit_policy::Connection<'_>,
    ) -> Vec<(String, ambit_policy::ConnectionRate)> {
        ambit_policy::rate_limits(
            self.policies_for(dst.namespace()).iter().map(|p| &**p),
            dst.target(),
            conn,
        )
        .into_iter()
        .map(|(p, r)| (format!("{}/{}", p.namespace, p.name), r))
        .collect()
    }

    /// Checks that every index agrees with the entries it indexes (for tests and the
    /// xDS fuzz target): each IP of each workload and VIP of each service finds an entry
    /// holding that IP, local uids are this node's, and each policy is listed once.
    pub fn check_indexes(&self) -> Result<(), String> {
        for w in self.workloads.values() {
            for ip in w.ips.iter() {
                match self.by_ip.get(&ip) {
                    Some(h) if h.ips.contains(&ip) && self.workloads.contains_key(&h.uid) => {}
                    other => return Err(format!("{ip} of {} finds {other:?}", w.uid)),
                }
            }
            if (*w.node() == *self.node) != self.local.contains(&w.uid) {
                return Err(format!("{} is misfiled as local or remote", w.uid));
            }
        }
        let entries: usize = self.workloads.values().map(|w| w.ips.len()).sum();
        let (current, shadowed) = self.by_ip.len();
        if current + shadowed != entries || self.local.len() > self.workloads.len() {
            return Err(format!(
                "the IP index holds {current}+{shadowed} entries for {entries} IPs"
            ));
        }
        for (name, s) in &self.services {
            for ip in &s.vips {
                if !self.by_vip.get(ip).is_some_and(|h| h.vips.contains(ip)) {
                    return Err(format!("VIP {ip} of {name} is not indexed"));
                }
            }
        }
        let mut enrolled: HashMap<&str, usize> = HashMap::new();
        for w in self.workloads.values().filter(|w| w.enrolled()) {
            *enrolled.entry(w.namespace()).or_default() += 1;
        }
        let counted: HashMap<&str, usize> = self
            .enrolled_by_namespace
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        if enrolled != counted {
            return Err(format!(
                "enrolled workloads per namespace {counted:?}, but the workloads say {enrolled:?}"
            ));
        }
        let listed: usize = self.policies_by_namespace.values().map(Vec::len).sum();
        if listed != self.policies.len() {
            return Err(format!(
                "{listed} policies listed by namespace, {} held",
                self.policies.len()
            ));
        }
        Ok(())
    }

    /// How many workloads, services and policies the view holds.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.workloads.len(),
            self.services.len(),
            self.policies.len(),
        )
    }

    /// The namespaces with an enrolled workload: what the CNI plugin treats as enrolled
    /// while the agent is down. (A namespace is known to be enrolled once the control
    /// plane has described one of its workloads as enrolled.)
    pub fn enrolled_namespaces(&self) -> std::collections::BTreeSet<String> {
        self.enrolled_by_namespace.keys().cloned().collect()
    }

    /// Is a pod of this uid and namespace to be captured? What the control plane says
    /// of the workload; for a pod it has not described yet (a pod the CNI plugin just
    /// created), whether its namespace is enrolled, so a new pod is captured before its
    /// first connect.
    pub fn captures(&self, uid: &str, namespace: &str) -> bool {
        match self.workloads.get(uid) {
            Some(w) => w.enrolled(),
            None => self.enrolled_by_namespace.contains_key(namespace),
        }
    }

    /// This node's enrolled workloads.
    pub fn local_enrolled(&self) -> Vec<Arc<Workload>> {
        self.local
            .iter()
            .filter_map(|uid| self.workloads.get(uid))
            .filter(|w| w.enrolled())
            .cloned()
            .collect()
    }

    /// The identities of this node's enrolled workloads (they need certificates).
    pub fn local_identities(&self) -> HashSet<Identity> {
        self.local
            .iter()
            .filter_map(|uid| self.workloads.get(uid))
            .filter(|w| w.enrolled() || w.native_tunnel())
            .map(|w| (**w.identity()).clone())
            .collect()
    }

    /// The service by its resource name (`namespace/name`).
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    /// Does `id` belong to a pod of `me`'s waypoint? (False without a waypoint.)
    pub fn is_from_waypoint(&self, me: &Workload, id: &Identity) -> bool {
        let Some(wp) = &me.waypoint() else {
            return false;
        };
        self.services
            .get(&format!("{}/{wp}", me.namespace()))
            .is_some_and(|s| {
                s.endpoints.iter().any(|uid| {
                    self.workloads
                        .get(uid)
                        .is_some_and(|w| w.native_tunnel() && **w.identity() == *id)
                })
            })
    }

    /// The pods of the waypoint `name` of `namespace` (its service's endpoints).
    pub fn waypoint_pods(&self, namespace: &str, name: &str) -> Vec<Arc<Workload>> {
        self.services
            .get(&format!("{namespace}/{name}"))
            .into_iter()
            .flat_map(|s| s.endpoints.iter())
            .filter_map(|uid| self.workloads.get(uid))
            .filter(|w| w.native_tunnel())
            .cloned()
            .collect()
    }

    /// Adds or replaces a workload. Remote workloads lose their labels (only the
    /// destination's agent evaluates selectors).
    pub fn put_workload(&mut self, mut w: Workload) {
        let local = *w.node() == *self.node;
        if !local {
            w.labels = None;
        }
        self.remove_workload(&w.uid);
        let w = Arc::new(w);
        for ip in w.ips.iter() {
            self.by_ip.insert(ip, w.clone());
        }
        if local {
            self.local.insert(w.uid.clone());
        }
        if w.enrolled() {
            *self
                .enrolled_by_namespace
                .entry(w.namespace().to_owned())
                .or_default() += 1;
        }
        self.workloads.insert(w);
    }

    /// Removes a workload (and its index entries).
    pub fn remove_workload(&mut self, uid: &str) {
        let Some(old) = self.workloads.remove(uid) else {
            return;
        };
        for ip in old.ips.iter() {
            self.by_ip.remove(&ip, &old);
        }
        self.local.remove(uid);
        if old.enrolled()
            && let Some(n) = self.enrolled_by_namespace.get_mut(old.namespace())
        {
            *n -= 1;
            if *n == 0 {
                self.enrolled_by_namespace.remove(old.namespace());
            }
        }
    }

    /// Adds or replaces a service under its resource name.
    pub fn put_service(&mut self, name: String, s: Service) {
        self.remove_service(&name);
        let s = Arc::new(s);
        for ip in &s.vips {
            self.by_vip.insert(*ip, s.clone());
        }
        self.services.insert(name, s);
    }

    /// Removes a service.
    pub fn remove_service(&mut self, name: &str) {
        let Some(old) = self.services.remove(name) else {
            return;
        };
        for ip in &old.vips {
            self.by_vip.remove(ip, &old);
        }
    }

    /// Adds or replaces a policy under its resource name.
    pub fn put_policy(&mut self, name: String, p: Authorization) {
        self.remove_policy(&name);
        let p = Arc::new(p);
        self.policies_by_namespace
            .entry(p.namespace.clone())
            .or_default()
            .push(p.clone());
        self.policies.insert(name, p);
    }

    /// Removes a policy.
    pub fn remove_policy(&mut self, name: &str) {
        let Some(old) = self.policies.remove(name) else {
            return;
        };
        if let Some(list) = self.policies_by_namespace.get_mut(&old.namespace) {
            list.retain(|p| !Arc::ptr_eq(p, &old));
            if list.is_empty() {
                self.policies_by_namespace.remove(&old.namespace);
            }
        }
    }
}

/// As the config dump shows it: sorted, by name.
impl Serialize for MeshState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let workloads: BTreeMap<&str, &Workload> =
            self.workloads.values().map(|v| (&*v.uid, &**v)).collect();
        let services: BTreeMap<&str, &Service> = self
            .services
            .iter()
            .map(|(k, v)| (k.as_str(), &**v))
            .collect();
        let policies: BTreeMap<&str, &Authorization> = self
            .policies
            .iter()
            .map(|(k, v)| (k.as_str(), &**v))
            .collect();
        let mut st = s.serialize_struct("MeshState", 3)?;
        st.serialize_field("workloads", &workloads)?;
        st.serialize_field("services", &services)?;
        st.serialize_field("authorizations", &policies)?;
        st.end()
    }
}

/// The shared state: readers take the lock only to clone the `Arc`s they need; every
/// applied update bumps the version on [`Store::changes`].
#[derive(Debug)]
pub struct Store {
    state: RwLock<MeshState>,
    changes: watch::Sender<u64>,
}

impl Store {
    /// An empty store for the agent of `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            state: RwLock::new(MeshState::new(node)),
            changes: watch::channel(0).0,
        }
    }

    /// Runs `f` on the current state under the read lock. Keep `f` short: clone what
    /// you need out of it.
    pub fn read<R>(&self, f: impl FnOnce(&MeshState) -> R) -> R {
        f(&self.state.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The workload with this uid.
    pub fn workload(&self, uid: &str) -> Option<Arc<Workload>> {
        self.read(|s| s.workload(uid).cloned())
    }

    /// See [`MeshState::captures`].
    pub fn captures(&self, uid: &str, namespace: &str) -> bool {
        self.read(|s| s.captures(uid, namespace))
    }

    /// Bumped after every applied update.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Changes the state in place and announces the change.
    pub fn update<R>(&self, f: impl FnOnce(&mut MeshState) -> R) -> R {
        let r = f(&mut self.state.write().unwrap_or_else(|e| e.into_inner()));
        self.changes.send_modify(|v| *v += 1);
        r
    }
}

#[cfg(test)]
mod tests;

/// Builders for the proxy's unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A workload `uid` in namespace `shop` on `node`, with one IP.
    pub fn workload(uid: &str, node: &str, ip: &str, enrolled: bool) -> Workload {
        Workload {
            uid: Uid::with_name(uid, uid).unwrap(),
            placement: Arc::new(Placement {
                node: node.into(),
                waypoint: None,
                enrolled,
                native_tunnel: false,
                mtls: MtlsMode::Strict,
            }),
            profile: Arc::new(Profile {
                identity: Arc::new(Identity::new("cluster.local", "shop", uid).unwrap()),
                canonical: Canonical::derive(uid, &Labels::new()),
            }),
            ips: Ips::new([ip.parse().unwrap()]).unwrap(),
            labels: None,
            version: 0,
        }
    }

    /// An ALLOW policy `name` for all of `namespace`, from sources matching `principal`.
    pub fn allow_from(namespace: &str, name: &str, principal: &str) -> Authorization {
        use ambit_policy::{Action, PrincipalPattern, Rule, Source};
        Authorization {
            name: name.into(),
            namespace: namespace.into(),
            action: Action::Allow,
            selector: None,
            rules: vec![Rule {
                from: vec![Source {
                    principals: vec![PrincipalPattern::parse(principal).unwrap()],
                    ..Default::default()
                }],
                to: vec![],
            }],
        }
    }

    /// A service `name` in namespace `shop` with one VIP.
    pub fn service(name: &str, vip: &str, ports: &[(u16, u16)], endpoints: &[&str]) -> Service {
        Service {
            name: name.into(),
            namespace: "shop".into(),
            hostname: format!("{name}.shop.svc.cluster.local").into(),
            vips: [vip.parse().unwrap()].into(),
            ports: ports.into(),
            endpoints: endpoints.iter().map(|e| Uid::new(e)).collect(),
            waypoint: None,
        }
    }
}
