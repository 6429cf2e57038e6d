//! What the control plane says about the mesh, as this agent knows it: workloads,
//! services and L4 authorization policies, kept up to date by xDS.
//!
//! [`StoreHandler`] is the xDS client's handler: it decodes and validates a whole
//! response before applying any of it, so a bad resource NACKs the response and the
//! store keeps its previous state.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use ambit_mesh::cidr::Cidr;
use ambit_xds::ambit;
use ambit_xds::client::Handler;
use ambit_xds::envoy::Any;
use ambit_xds::type_url;
use prost::Message;
use serde::Serialize;
use tokio::sync::watch;

/// A workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub enrolled: bool,
    pub waypoint: Option<String>,
    pub identity: String,
    pub labels: BTreeMap<String, String>,
    /// How plaintext inbound connections to it are treated.
    pub mtls: MtlsMode,
}

/// How plaintext (non-HBONE) inbound connections to an enrolled workload are treated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum MtlsMode {
    /// Refused.
    #[default]
    Strict,
    /// Accepted; authorization sees only the source IP.
    Permissive,
}

/// A service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    /// (port, target port).
    pub ports: Vec<(u16, u16)>,
    /// Workload uids.
    pub endpoints: Vec<String>,
    pub waypoint: Option<String>,
}

/// An L4 authorization policy, as received (enforcement comes with mTLS).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub action: Action,
    /// Applies to every workload of the namespace (else: those `selector` selects).
    pub namespace_wide: bool,
    pub selector: BTreeMap<String, String>,
    /// Matches a connection if any rule does; no rules match nothing.
    pub rules: Vec<Rule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
}

/// Matches if (no `from` or any of them matches) and (no `to` or any of them matches).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub from: Vec<SourceMatch>,
    pub to: Vec<DestinationMatch>,
}

/// Every non-empty field must match, and no `not_*` field may.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SourceMatch {
    /// SPIFFE IDs without the scheme; `*` as a prefix or suffix wildcard.
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DestinationMatch {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

/// The agent's view of the mesh.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Mesh {
    pub workloads: BTreeMap<String, Workload>,
    pub services: BTreeMap<String, Service>,
    pub authorizations: BTreeMap<String, Authorization>,
    /// Workload IP → uid.
    #[serde(skip)]
    by_ip: HashMap<IpAddr, String>,
    /// Service VIP → service name.
    #[serde(skip)]
    by_vip: HashMap<IpAddr, String>,
}

impl Mesh {
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.workloads.get(self.by_ip.get(&ip)?)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.services.get(self.by_vip.get(&ip)?)
    }

    fn index_workloads(&mut self) {
        self.by_ip = self
            .workloads
            .values()
            .flat_map(|w| w.ips.iter().map(|ip| (*ip, w.uid.clone())))
            .collect();
    }

    fn index_services(&mut self) {
        self.by_vip = self
            .services
            .iter()
            .flat_map(|(name, s)| s.vips.iter().map(move |ip| (*ip, name.clone())))
            .collect();
    }
}

/// Shared, versioned store: readers take a cheap snapshot; every applied update bumps
/// the version on [`Store::changes`].
#[derive(Debug)]
pub struct Store {
    mesh: RwLock<Arc<Mesh>>,
    changes: watch::Sender<u64>,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            mesh: RwLock::default(),
            changes: watch::channel(0).0,
        }
    }
}

impl Store {
    pub fn snapshot(&self) -> Arc<Mesh> {
        self.mesh.read().unwrap().clone()
    }

    /// Is the workload with this uid enrolled, according to the control plane?
    pub fn enrolled(&self, uid: &str) -> bool {
        self.mesh
            .read()
            .unwrap()
            .workloads
            .get(uid)
            .is_some_and(|w| w.enrolled)
    }

    /// Bumped after every applied update.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Feeds a [`Store`] from xDS, for the agent of `node`.
#[derive(Debug, Clone)]
pub struct StoreHandler {
    pub store: Arc<Store>,
    pub node: String,
}

/// Above this many resources in one update, freed heap is handed back to the system
/// afterwards (a first sync of a large mesh decodes megabytes that are then dropped).
const TRIM_AFTER: usize = 1000;

impl Handler for StoreHandler {
    fn apply(
        &mut self,
        type_url: &str,
        updated: Vec<(String, Any)>,
        removed: Vec<String>,
    ) -> Result<(), String> {
        let large = updated.len() > TRIM_AFTER;
        // Decode and validate everything before touching the store.
        match type_url {
            type_url::WORKLOAD => {
                let mut d = decode_all(updated, decode_workload)?;
                // Labels matter only for this node's workloads (policy selectors): do not
                // keep them for the rest of the mesh.
                for (_, w) in &mut d {
                    if w.node != self.node {
                        w.labels = BTreeMap::new();
                    }
                }
                self.store.update(|m| {
                    put(&mut m.workloads, d, removed);
                    m.index_workloads();
                });
            }
            type_url::SERVICE => {
                let d = decode_all(updated, decode_service)?;
                self.store.update(|m| {
                    put(&mut m.services, d, removed);
                    m.index_services();
                });
            }
            type_url::AUTHORIZATION => {
                let d = decode_all(updated, decode_authorization)?;
                self.store
                    .update(|m| put(&mut m.authorizations, d, removed));
            }
            other => return Err(format!("unexpected type {other}")),
        }
        if large {
            // SAFETY: malloc_trim only returns free memory to the system.
            unsafe { libc::malloc_trim(0) };
        }
        Ok(())
    }
}

impl Store {
    /// Changes the mesh in place (it is copied only if a reader holds a snapshot right
    /// now) and announces the change.
    fn update(&self, f: impl FnOnce(&mut Mesh)) {
        {
            let mut guard = self.mesh.write().unwrap();
            f(Arc::make_mut(&mut guard));
        }
        self.changes.send_modify(|v| *v += 1);
    }
}

fn decode_all<T>(
    updated: Vec<(String, Any)>,
    decode: fn(&str, &[u8]) -> Result<T, String>,
) -> Result<Vec<(String, T)>, String> {
    updated
        .into_iter()
        .map(|(name, any)| {
            decode(&name, &any.value)
                .map(|v| (name.clone(), v))
                .map_err(|e| format!("resource {name}: {e}"))
        })
        .collect()
}

fn put<T>(map: &mut BTreeMap<String, T>, decoded: Vec<(String, T)>, removed: Vec<String>) {
    for n in removed {
        map.remove(&n);
    }
    map.extend(decoded);
}

fn ip(b: &[u8]) -> Result<IpAddr, String> {
    match b.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(b).expect("length checked"),
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(b).expect("length checked"),
        )),
        n => Err(format!("an IP address of {n} bytes")),
    }
}

fn decode_workload(name: &str, bytes: &[u8]) -> Result<Workload, String> {
    let w = ambit::Workload::decode(bytes).map_err(|e| format!("not a Workload: {e}"))?;
    if w.uid != name {
        return Err(format!("uid {:?} differs from the resource name", w.uid));
    }
    if w.ips.is_empty() {
        return Err("no IPs".into());
    }
    if !w.identity.starts_with("spiffe://") {
        return Err(format!("identity {:?} is not a SPIFFE ID", w.identity));
    }
    Ok(Workload {
        ips: w.ips.iter().map(|b| ip(b)).collect::<Result<_, _>>()?,
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        node: w.node,
        service_account: w.service_account,
        enrolled: w.enrolled,
        waypoint: Some(w.waypoint).filter(|s| !s.is_empty()),
        mtls: match ambit::MtlsMode::try_from(w.mtls) {
            Ok(ambit::MtlsMode::Strict) => MtlsMode::Strict,
            Ok(ambit::MtlsMode::Permissive) => MtlsMode::Permissive,
            Err(_) => return Err(format!("unknown mTLS mode {}", w.mtls)),
        },
        identity: w.identity,
        labels: w.labels.into_iter().collect(),
    })
}

fn decode_service(_name: &str, bytes: &[u8]) -> Result<Service, String> {
    let s = ambit::Service::decode(bytes).map_err(|e| format!("not a Service: {e}"))?;
    let port = |p: u32| {
        u16::try_from(p)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("bad port {p}"))
    };
    Ok(Service {
        vips: s.vips.iter().map(|b| ip(b)).collect::<Result<_, _>>()?,
        ports: s
            .ports
            .iter()
            .map(|p| Ok((port(p.port)?, port(p.target_port)?)))
            .collect::<Result<_, String>>()?,
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        endpoints: s.endpoints,
        waypoint: Some(s.waypoint).filter(|w| !w.is_empty()),
    })
}

fn decode_authorization(_name: &str, bytes: &[u8]) -> Result<Authorization, String> {
    let a =
        ambit::Authorization::decode(bytes).map_err(|e| format!("not an Authorization: {e}"))?;
    let action = match ambit::authorization::Action::try_from(a.action) {
        Ok(ambit::authorization::Action::Allow) => Action::Allow,
        Ok(ambit::authorization::Action::Deny) => Action::Deny,
        Err(_) => return Err(format!("unknown action {}", a.action)),
    };
    let cidrs = |v: &[ambit::Cidr]| -> Result<Vec<Cidr>, String> {
        v.iter()
            .map(|c| {
                let addr = ip(&c.address)?;
                u8::try_from(c.length)
                    .ok()
                    .and_then(|l| Cidr::new(addr, l))
                    .ok_or_else(|| format!("CIDR {addr}/{} has a bad prefix length", c.length))
            })
            .collect()
    };
    let ports = |v: &[u32]| -> Result<Vec<u16>, String> {
        v.iter()
            .map(|&p| {
                u16::try_from(p)
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| format!("bad port {p}"))
            })
            .collect()
    };
    let mut rules = Vec::with_capacity(a.rules.len());
    for r in &a.rules {
        let mut from = Vec::new();
        for f in &r.from {
            from.push(SourceMatch {
                principals: f.principals.clone(),
                not_principals: f.not_principals.clone(),
                namespaces: f.namespaces.clone(),
                not_namespaces: f.not_namespaces.clone(),
                ip_blocks: cidrs(&f.ip_blocks)?,
                not_ip_blocks: cidrs(&f.not_ip_blocks)?,
            });
        }
        let mut to = Vec::new();
        for t in &r.to {
            to.push(DestinationMatch {
                ports: ports(&t.ports)?,
                not_ports: ports(&t.not_ports)?,
            });
        }
        rules.push(Rule { from, to });
    }
    Ok(Authorization {
        name: a.name,
        namespace: a.namespace,
        action,
        namespace_wide: a.namespace_wide,
        selector: a.selector.into_iter().collect(),
        rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any<M: Message>(type_url: &str, m: &M) -> Any {
        Any {
            type_url: type_url.into(),
            value: m.encode_to_vec(),
        }
    }

    fn workload(uid: &str, ips: Vec<Vec<u8>>) -> ambit::Workload {
        ambit::Workload {
            uid: uid.into(),
            ips,
            enrolled: true,
            identity: "spiffe://td/ns/a/sa/b".into(),
            ..Default::default()
        }
    }

    #[test]
    fn applies_valid_updates_and_removals() {
        let store = Arc::new(Store::default());
        let mut h = StoreHandler {
            store: store.clone(),
            node: "n".into(),
        };
        let mut changes = store.changes();
        h.apply(
            type_url::WORKLOAD,
            vec![(
                "a".into(),
                any(type_url::WORKLOAD, &workload("a", vec![vec![10, 0, 0, 1]])),
            )],
            vec![],
        )
        .unwrap();
        assert!(store.enrolled("a"));
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        h.apply(type_url::WORKLOAD, vec![], vec!["a".into()])
            .unwrap();
        assert!(!store.enrolled("a"));
        assert!(changes.has_changed().unwrap());
    }

    #[test]
    fn a_bad_resource_rejects_the_whole_update() {
        let store = Arc::new(Store::default());
        let mut h = StoreHandler {
            store: store.clone(),
            node: "n".into(),
        };
        let good = (
            "a".to_string(),
            any(type_url::WORKLOAD, &workload("a", vec![vec![10, 0, 0, 1]])),
        );
        let bad = (
            "b".to_string(),
            any(type_url::WORKLOAD, &workload("b", vec![vec![1, 2, 3]])),
        );
        let err = h
            .apply(type_url::WORKLOAD, vec![good, bad], vec![])
            .unwrap_err();
        assert_eq!(err, "resource b: an IP address of 3 bytes");
        assert!(
            store.snapshot().workloads.is_empty(),
            "part of a rejected update was applied"
        );
        let garbage = (
            "c".to_string(),
            Any {
                type_url: type_url::WORKLOAD.into(),
                value: vec![0xff, 0xff, 0xff],
            },
        );
        assert!(
            h.apply(type_url::WORKLOAD, vec![garbage], vec![])
                .unwrap_err()
                .starts_with("resource c: not a Workload")
        );
        let renamed = (
            "x".to_string(),
            any(type_url::WORKLOAD, &workload("a", vec![vec![10, 0, 0, 1]])),
        );
        assert!(
            h.apply(type_url::WORKLOAD, vec![renamed], vec![])
                .unwrap_err()
                .contains("differs from the resource name")
        );
    }

    #[test]
    fn policies_keep_their_rules_and_bad_cidrs_are_refused() {
        let store = Arc::new(Store::default());
        let mut h = StoreHandler {
            store: store.clone(),
            node: "n".into(),
        };
        let rule = |len| ambit::Rule {
            from: vec![ambit::SourceMatch {
                principals: vec!["cluster.local/ns/a/sa/b".into()],
                ip_blocks: vec![ambit::Cidr {
                    address: vec![10, 0, 0, 0],
                    length: len,
                }],
                ..Default::default()
            }],
            to: vec![ambit::DestinationMatch {
                ports: vec![8080],
                not_ports: vec![],
            }],
        };
        let policy = |len| ambit::Authorization {
            name: "p".into(),
            namespace: "shop".into(),
            action: ambit::authorization::Action::Deny as i32,
            rules: vec![rule(len)],
            ..Default::default()
        };
        h.apply(
            type_url::AUTHORIZATION,
            vec![("shop/p".into(), any(type_url::AUTHORIZATION, &policy(8)))],
            vec![],
        )
        .unwrap();
        let p = &store.snapshot().authorizations["shop/p"];
        assert_eq!(p.action, Action::Deny);
        assert_eq!(
            p.rules[0].from[0].ip_blocks,
            vec!["10.0.0.0/8".parse().unwrap()]
        );
        assert_eq!(p.rules[0].to[0].ports, vec![8080]);
        let err = h
            .apply(
                type_url::AUTHORIZATION,
                vec![("shop/p".into(), any(type_url::AUTHORIZATION, &policy(33)))],
                vec![],
            )
            .unwrap_err();
        assert!(err.contains("bad prefix length"), "{err}");
    }
}
