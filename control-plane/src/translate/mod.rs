//! The one translator: [`Model`] → xDS resources.
//!
//! A [`Snapshot`] holds every resource of one model version, encoded once, each with a
//! content-derived version (so an unchanged resource keeps its version across model
//! changes and is never resent). [`Snapshot::resources`] then picks what one node agent
//! needs:
//! - every workload: enrolled ones are the destinations its pods tunnel to; the others
//!   are service endpoints it dials directly, and the sources it names in telemetry and
//!   matches in IP policies (PERMISSIVE plaintext);
//! - every service (any pod may dial any VIP);
//! - the authorization policies that select a workload on that node (the destination's
//!   agent enforces them).
//!
//! A waypoint (node id `<namespace>/<name>`) is sent standard Envoy resources instead:
//! see [`waypoint`].

pub mod authn;
pub mod authz;
pub mod ratelimit;
pub mod waypoint;

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use ambit_xds::ambit;
use ambit_xds::envoy::Any;
use ambit_xds::type_url;
use prost::Message;

use ambit_xds::convert::{authorization_to_proto, ip_to_bytes};
use imbl::ordmap::DiffItem;

use crate::model::{Model, selects};

/// One encoded resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionedResource {
    /// Its name: a workload's uid, or `namespace/name` for services and policies.
    pub name: String,
    /// Hash of the encoded bytes (hex).
    pub version: String,
    /// The encoded resource, with its type URL.
    pub resource: Any,
}

/// Resources by type URL, then by name.
#[cfg(test)]
pub type ResourceMap = BTreeMap<&'static str, BTreeMap<String, Arc<VersionedResource>>>;

/// Every resource of one model version.
#[derive(Debug, Default)]
pub struct Snapshot {
    version: String,
    /// Persistent maps: the next snapshot starts from these and changes only what the
    /// model changed.
    workloads: imbl::OrdMap<String, Arc<VersionedResource>>,
    services: imbl::OrdMap<String, Arc<VersionedResource>>,
    /// XOR of a hash of each workload's and service's name and version: kept as they
    /// change, so the snapshot's version costs no pass over the whole mesh.
    entries_hash: u64,
    policies: BTreeMap<String, (Arc<VersionedResource>, BTreeSet<String>)>,
    /// By waypoint node id.
    waypoints: BTreeMap<String, waypoint::Resources>,
    /// Each waypoint's identity, by node id.
    waypoint_identities: BTreeMap<String, ambit_identity::Identity>,
    /// The workloads each waypoint fronts (uids, by node id): the `ambit.v1.Workload`s it
    /// is sent, so it knows which pod IPs it may take workload-addressed traffic for.
    waypoint_workloads: BTreeMap<String, BTreeSet<String>>,
}

impl Snapshot {
    /// Translates every resource of `m` and encodes it once.
    pub fn from_model(m: &Model) -> Self {
        Self::from_model_reusing(m, None)
    }

    /// Translates `m`, taking from `prev` (the snapshot of the model before it) every
    /// workload and service resource whose model entry has not changed, instead of
    /// encoding and hashing it again: a change to one pod of a large mesh costs one
    /// encoding, not one per workload.
    pub fn from_model_reusing(m: &Model, prev: Option<(&Model, &Snapshot)>) -> Self {
        let mut s = Snapshot::default();
        match prev {
            Some((pm, ps)) => {
                s.workloads = ps.workloads.clone();
                s.services = ps.services.clone();
                s.entries_hash = ps.entries_hash;
                s.waypoint_workloads = ps.waypoint_workloads.clone();
                // Only what differs between the two models (the maps share the rest).
                for d in pm.workloads.diff(&m.workloads) {
                    match d {
                        DiffItem::Add(_, w) => s.put_workload(w),
                        DiffItem::Update {
                            old: (_, o),
                            new: (_, w),
                        } => {
                            s.drop_workload(o);
                            s.put_workload(w);
                        }
                        DiffItem::Remove(_, o) => s.drop_workload(o),
                    }
                }
                for d in pm.services.diff(&m.services) {
                    match d {
                        DiffItem::Add(_, svc) => s.put_service(svc),
                        DiffItem::Update {
                            old: (_, o),
                            new: (_, svc),
                        } => {
                            s.drop_service(o);
                            s.put_service(svc);
                        }
                        DiffItem::Remove(_, o) => s.drop_service(o),
                    }
                }
            }
            None => {
                for w in m.workloads.values() {
                    s.put_workload(w);
                }
                for svc in m.services.values() {
                    s.put_service(svc);
                }
            }
        }
        for p in m.policies.values() {
            let name = format!("{}/{}", p.namespace, p.name);
            // The nodes of the workloads it selects; a waypoint's pods are selected for
            // their waypoint, which enforces it on its own tunnels (they are not captured).
            let nodes = m
                .workloads
                .values()
                .filter(|w| {
                    w.namespace == p.namespace
                        && p.selector
                            .as_ref()
                            .is_none_or(|sel| selects(sel, &w.labels))
                })
                .flat_map(|w| {
                    let wp = w
                        .native_tunnel
                        .then(|| w.labels.get(crate::model::GATEWAY_NAME_LABEL))
                        .flatten()
                        .map(|g| waypoint::node_id(&w.namespace, g));
                    std::iter::once(w.node.clone()).chain(wp)
                })
                .collect();
            s.policies.insert(
                name.clone(),
                (
                    encode(type_url::AUTHORIZATION, &name, &authorization_to_proto(p)),
                    nodes,
                ),
            );
        }
        for wp in m.waypoints.values() {
            let node = waypoint::node_id(&wp.namespace, &wp.name);
            if let Some(id) = &wp.identity {
                s.waypoint_identities.insert(node.clone(), id.clone());
            }
            s.waypoints.insert(node, waypoint::resources(m, wp));
        }
        s.version = s.content_version();
        s
    }

    fn put_workload(&mut self, w: &crate::model::Workload) {
        let r = ambit::Workload {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            node: w.node.clone(),
            service_account: w.service_account.clone(),
            ips: w.ips.iter().map(ip_to_bytes).collect(),
            enrolled: w.enrolled,
            waypoint: w.waypoint.clone().unwrap_or_default(),
            labels: w.labels.clone().into_iter().collect(),
            identity: w.identity.to_string(),
            mtls: match w.mtls {
                crate::model::MtlsMode::Strict => ambit::MtlsMode::Strict,
                crate::model::MtlsMode::Permissive => ambit::MtlsMode::Permissive,
            } as i32,
            native_tunnel: w.native_tunnel,
        };
        let r = encode(type_url::WORKLOAD, &w.uid, &r);
        self.entries_hash ^= entry_hash(&w.uid, &r.version);
        if let Some(old) = self.workloads.insert(w.uid.clone(), r) {
            self.entries_hash ^= entry_hash(&w.uid, &old.version);
        }
        if let Some(wp) = &w.waypoint {
            self.waypoint_workloads
                .entry(waypoint::node_id(&w.namespace, wp))
                .or_default()
                .insert(w.uid.clone());
        }
    }

    fn drop_workload(&mut self, w: &crate::model::Workload) {
        if let Some(old) = self.workloads.remove(&w.uid) {
            self.entries_hash ^= entry_hash(&w.uid, &old.version);
        }
        if let Some(wp) = &w.waypoint {
            let node = waypoint::node_id(&w.namespace, wp);
            if let Some(uids) = self.waypoint_workloads.get_mut(&node) {
                uids.remove(&w.uid);
                if uids.is_empty() {
                    self.waypoint_workloads.remove(&node);
                }
            }
        }
    }

    fn put_service(&mut self, svc: &crate::model::Service) {
        let name = format!("{}/{}", svc.namespace, svc.name);
        let r = ambit::Service {
            name: svc.name.clone(),
            namespace: svc.namespace.clone(),
            hostname: svc.hostname.clone(),
            vips: svc.vips.iter().map(ip_to_bytes).collect(),
            ports: svc
                .ports
                .iter()
                .map(|p| ambit::Port {
                    port: p.port.into(),
                    target_port: p.target_port.into(),
                    name: p.name.clone().unwrap_or_default(),
                })
                .collect(),
            endpoints: svc.endpoints.clone(),
            waypoint: svc.waypoint.clone().unwrap_or_default(),
        };
        let r = encode(type_url::SERVICE, &name, &r);
        self.entries_hash ^= entry_hash(&name, &r.version);
        if let Some(old) = self.services.insert(name.clone(), r) {
            self.entries_hash ^= entry_hash(&name, &old.version);
        }
    }

    fn drop_service(&mut self, svc: &crate::model::Service) {
        let name = format!("{}/{}", svc.namespace, svc.name);
        if let Some(old) = self.services.remove(&name) {
            self.entries_hash ^= entry_hash(&name, &old.version);
        }
    }

    /// A hash of every resource's name and version: equal snapshots have equal versions.
    fn content_version(&self) -> String {
        let mut h = std::hash::DefaultHasher::new();
        self.entries_hash.hash(&mut h);
        for (name, (r, nodes)) in &self.policies {
            name.hash(&mut h);
            r.version.hash(&mut h);
            nodes.hash(&mut h);
        }
        self.waypoint_workloads.hash(&mut h);
        for (node, types) in &self.waypoints {
            node.hash(&mut h);
            for (t, rs) in types {
                t.hash(&mut h);
                for (name, r) in rs {
                    name.hash(&mut h);
                    r.version.hash(&mut h);
                }
            }
        }
        format!("{:016x}", h.finish())
    }

    /// A version for the whole snapshot (for `system_version_info`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The resources of `type_url` that `node` is sent, without copying anything.
    pub fn resources<'a>(
        &'a self,
        node: &'a str,
        type_url: &str,
    ) -> Box<dyn Iterator<Item = &'a Arc<VersionedResource>> + 'a> {
        match type_url {
            // A waypoint gets the workloads it fronts; an agent every workload.
            type_url::WORKLOAD if self.is_waypoint(node) => Box::new(
                self.waypoint_workloads
                    .get(node)
                    .into_iter()
                    .flatten()
                    .filter_map(|uid| self.workloads.get(uid)),
            ),
            type_url::WORKLOAD => Box::new(self.workloads.values()),
            type_url::SERVICE => Box::new(self.services.values()),
            type_url::AUTHORIZATION => Box::new(
                self.policies
                    .values()
                    .filter(move |(_, nodes)| nodes.contains(node))
                    .map(|(r, _)| r),
            ),
            _ => match self.waypoints.get(node).and_then(|w| w.get(type_url)) {
                Some(rs) => Box::new(rs.values()),
                None => Box::new(std::iter::empty()),
            },
        }
    }

    /// One resource, if `node` is sent it.
    pub fn get(&self, node: &str, type_url: &str, name: &str) -> Option<&Arc<VersionedResource>> {
        match type_url {
            type_url::WORKLOAD if self.is_waypoint(node) => self
                .waypoint_workloads
                .get(node)
                .filter(|uids| uids.contains(name))
                .and_then(|_| self.workloads.get(name)),
            type_url::WORKLOAD => self.workloads.get(name),
            type_url::SERVICE => self.services.get(name),
            type_url::AUTHORIZATION => self
                .policies
                .get(name)
                .filter(|(_, nodes)| nodes.contains(node))
                .map(|(r, _)| r),
            _ => self
                .waypoints
                .get(node)
                .and_then(|w| w.get(type_url))
                .and_then(|rs| rs.get(name)),
        }
    }

    /// What changed for `node` in `type_url` since `prev`: (resources added or changed,
    /// names removed), found by diffing the persistent maps, so O(changes) where
    /// [`resources`](Self::resources) is O(all). `None` for a type or node it cannot
    /// diff that way (policies, a waypoint's view): scan those.
    pub fn changes_since(
        &self,
        prev: &Snapshot,
        node: &str,
        type_url: &str,
    ) -> Option<(Vec<Arc<VersionedResource>>, Vec<String>)> {
        let (old, new) = match type_url {
            _ if self.is_waypoint(node) || prev.is_waypoint(node) => return None,
            type_url::WORKLOAD => (&prev.workloads, &self.workloads),
            type_url::SERVICE => (&prev.services, &self.services),
            _ => return None,
        };
        let (mut changed, mut removed) = (Vec::new(), Vec::new());
        for d in old.diff(new) {
            match d {
                DiffItem::Add(_, r) => changed.push(r.clone()),
                DiffItem::Update {
                    old: (_, o),
                    new: (_, r),
                } => {
                    if o.version != r.version {
                        changed.push(r.clone());
                    }
                }
                DiffItem::Remove(name, _) => removed.push(name.clone()),
            }
        }
        Some((changed, removed))
    }

    /// The identity of the waypoint whose node id is `node` (its pods').
    pub fn waypoint_identity(&self, node: &str) -> Option<&ambit_identity::Identity> {
        self.waypoint_identities.get(node)
    }

    /// Is `node` a waypoint's node id (served Envoy types rather than Ambit's)?
    pub fn is_waypoint(&self, node: &str) -> bool {
        self.waypoints.contains_key(node)
    }

    /// What waypoint `node` is sent, as maps (copies; for tests and the admin API).
    pub fn waypoint_view(&self, node: &str) -> Option<&waypoint::Resources> {
        self.waypoints.get(node)
    }

    /// What the agent on `node` is sent, as maps (copies the view; for tests).
    #[cfg(test)]
    pub fn view_for(&self, node: &str) -> ResourceMap {
        let mut out = ResourceMap::new();
        out.insert(
            type_url::WORKLOAD,
            self.workloads
                .iter()
                .map(|(k, r)| (k.clone(), r.clone()))
                .collect(),
        );
        out.insert(
            type_url::SERVICE,
            self.services
                .iter()
                .map(|(k, r)| (k.clone(), r.clone()))
                .collect(),
        );
        out.insert(
            type_url::AUTHORIZATION,
            self.policies
                .iter()
                .filter(|(_, (_, nodes))| nodes.contains(node))
                .map(|(k, (r, _))| (k.clone(), r.clone()))
                .collect(),
        );
        out
    }
}

/// A hash of one entry's name and version (one term of [`Snapshot::entries_hash`]).
fn entry_hash(name: &str, version: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    name.hash(&mut h);
    version.hash(&mut h);
    h.finish()
}

pub(crate) fn encode(type_url: &str, name: &str, m: &impl Message) -> Arc<VersionedResource> {
    let value = m.encode_to_vec();
    let mut h = std::hash::DefaultHasher::new();
    value.hash(&mut h);
    Arc::new(VersionedResource {
        name: name.to_owned(),
        version: format!("{:016x}", h.finish()),
        resource: Any {
            type_url: type_url.to_owned(),
            value,
        },
    })
}

/// Like [`encode`], for a message whose encoding is not deterministic (prost encodes its
/// maps, such as endpoint metadata, in hash order): the version is a hash of `content`,
/// everything the message was built from.
pub(crate) fn encode_keyed(
    type_url: &str,
    name: &str,
    m: &impl Message,
    content: impl Hash,
) -> Arc<VersionedResource> {
    let mut h = std::hash::DefaultHasher::new();
    content.hash(&mut h);
    Arc::new(VersionedResource {
        name: name.to_owned(),
        version: format!("{:016x}", h.finish()),
        resource: Any {
            type_url: type_url.to_owned(),
            value: m.encode_to_vec(),
        },
    })
}

/// A version for a whole set of resources (state-of-the-world responses).
pub fn set_version(resources: &BTreeMap<String, Arc<VersionedResource>>) -> String {
    let mut h = std::hash::DefaultHasher::new();
    for (name, r) in resources {
        name.hash(&mut h);
        r.version.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::file::parse;
    use std::path::Path;

    fn model() -> Model {
        parse(
            Path::new("examples/mesh.yaml"),
            include_str!("../../../examples/mesh.yaml"),
        )
        .unwrap()
    }

    #[test]
    fn nodes_get_every_workload_and_the_policies_of_theirs() {
        let snap = Snapshot::from_model(&model());
        let n1 = snap.view_for("node-1");
        let names: Vec<_> = n1[type_url::WORKLOAD].keys().cloned().collect();
        // web-1 opted out, and is still sent: it is a service endpoint and a possible source.
        assert_eq!(
            names,
            [
                "legacy/batch-0",
                "shop/frontend-0",
                "shop/reviews-v1-0",
                "shop/reviews-v1-1",
                "shop/reviews-v2-0",
                "shop/shop-waypoint-0",
                "shop/web-0",
                "shop/web-1"
            ]
        );
        // web, reviews, reviews-v1, reviews-v2 and the waypoint's own service.
        assert_eq!(n1[type_url::SERVICE].len(), 5);
        // The web policy selects only node-2's workloads; no-legacy is namespace-wide and
        // shop has frontend-0 on node-1.
        assert_eq!(
            n1[type_url::AUTHORIZATION].keys().collect::<Vec<_>>(),
            ["shop/no-legacy"]
        );
        assert_eq!(snap.view_for("node-2")[type_url::AUTHORIZATION].len(), 2);
    }

    #[test]
    fn versions_change_only_with_content() {
        let m = model();
        let (a, b) = (Snapshot::from_model(&m), Snapshot::from_model(&m));
        assert_eq!(a.view_for("node-1"), b.view_for("node-1"));
        let mut m2 = m.clone();
        Arc::make_mut(m2.workloads.get_mut("shop/web-0").unwrap())
            .labels
            .insert("v".into(), "2".into());
        let c = Snapshot::from_model(&m2);
        let (old, new) = (
            &a.view_for("node-1")[type_url::WORKLOAD],
            &c.view_for("node-1")[type_url::WORKLOAD],
        );
        assert_ne!(old["shop/web-0"].version, new["shop/web-0"].version);
        assert_eq!(
            old["shop/frontend-0"].version,
            new["shop/frontend-0"].version
        );
        assert_ne!(set_version(old), set_version(new));
        assert_eq!(a.version(), b.version());
        assert_ne!(a.version(), c.version());
        assert_eq!(a.version().len(), 16);
    }

    #[test]
    fn reusing_the_last_snapshot_gives_what_translating_anew_gives() {
        let m = model();
        let a = Snapshot::from_model(&m);
        let mut m2 = m.clone();
        Arc::make_mut(m2.workloads.get_mut("shop/web-0").unwrap())
            .labels
            .insert("v".into(), "2".into());
        m2.workloads.remove("shop/frontend-0");
        let key = m2.services.keys().next().unwrap().clone();
        Arc::make_mut(m2.services.get_mut(&key).unwrap())
            .endpoints
            .clear();
        let anew = Snapshot::from_model(&m2);
        let reused = Snapshot::from_model_reusing(&m2, Some((&m, &a)));
        for node in ["node-1", "node-2"] {
            assert_eq!(reused.view_for(node), anew.view_for(node), "{node}");
        }
        assert_eq!(reused.version(), anew.version());
        // Unchanged entries are the very same resources, not new encodings.
        let unchanged = m2.workloads.keys().find(|k| *k != "shop/web-0").unwrap();
        assert!(Arc::ptr_eq(
            &reused.workloads[unchanged],
            &a.workloads[unchanged]
        ));
        assert!(!Arc::ptr_eq(
            &reused.workloads["shop/web-0"],
            &a.workloads["shop/web-0"]
        ));
    }

    #[test]
    fn resources_decode_to_what_the_model_says() {
        let snap = Snapshot::from_model(&model());
        let w = &snap.view_for("node-1")[type_url::WORKLOAD]["shop/frontend-0"];
        let w = ambit::Workload::decode(w.resource.value.as_slice()).unwrap();
        assert_eq!(w.identity, "spiffe://cluster.local/ns/shop/sa/frontend");
        assert!(w.enrolled);
        assert_eq!(
            w.ips,
            vec![
                vec![10, 244, 1, 10],
                "fd00:10:244:1::a"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets()
                    .to_vec()
            ]
        );
    }
}
