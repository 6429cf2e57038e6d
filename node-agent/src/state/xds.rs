//! The xDS handler that feeds the [`Store`]: it decodes and validates a whole response
//! before applying any of it, so a bad resource NACKs the response and the store keeps
//! its previous state.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ambit_policy::Authorization;
use ambit_xds::ambit;
use ambit_xds::client::{ApplyError, Handler, Update, Version, Versions};
use ambit_xds::convert::{DecodeError, authorization_from_proto, ip_from_bytes, port_from_u32};
use ambit_xds::type_url;
use prost::Message;

use super::intern::Interners;
use super::{Ips, MtlsMode, Service, Store, Uid, Workload};

/// Feeds a [`Store`] from xDS.
#[derive(Debug)]
pub struct StoreHandler {
    /// Where decoded resources go.
    pub store: Arc<Store>,
    /// What the workloads it decodes share.
    shared: Interners,
    /// The store's node (its workloads keep their labels).
    node: Arc<str>,
    /// The versions of workloads that did not come as Ambit's 16 hex digits (each
    /// workload keeps that number itself): empty but for another control plane's.
    odd_versions: HashMap<Uid, Version>,
    /// The versions of the services and policies held (a thousand, not ten thousand:
    /// kept beside them).
    versions: HashMap<&'static str, Versions>,
}

impl StoreHandler {
    /// A handler feeding `store`.
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            node: store.read(|s| s.node().into()),
            store,
            shared: Interners::default(),
            odd_versions: HashMap::new(),
            versions: HashMap::new(),
        }
    }

    /// How many node and waypoint names it holds.
    #[cfg(test)]
    pub(crate) fn shared_strings(&self) -> usize {
        self.shared.strings.len()
    }
}

/// From this many resources in one update, freed heap is handed back to the system
/// afterwards: a first sync of a large mesh decodes megabytes that are then dropped
/// (10k workloads; and 1,000 services with their endpoints free hundreds of KB). A
/// trim of the agent's few-MB heap is well under a millisecond, and updates this large
/// are rare.
const TRIM_AFTER: usize = 100;

impl Handler for StoreHandler {
    fn apply(
        &mut self,
        type_url: &str,
        updated: Vec<Update>,
        removed: Vec<String>,
    ) -> Result<usize, ApplyError> {
        let large = updated.len() >= TRIM_AFTER;
        // Decode and validate everything before touching the store.
        let held = match type_url {
            type_url::WORKLOAD => {
                let (shared, node) = (&mut self.shared, &self.node);
                let d = decode_all(updated, |uid, b| {
                    decode_workload_with(uid, b, shared, |at| at == &**node)
                })?;
                let odd = &mut self.odd_versions;
                for n in &removed {
                    odd.remove(n.as_str());
                }
                let d: Vec<Workload> = d
                    .into_iter()
                    .map(|(mut w, version)| {
                        w.version = match version.hex() {
                            Some(n) => {
                                if !odd.is_empty() {
                                    odd.remove(&w.uid);
                                }
                                n
                            }
                            None => {
                                odd.insert(w.uid.clone(), version);
                                0
                            }
                        };
                        w
                    })
                    .collect();
                self.store.update(|m| {
                    removed.iter().for_each(|n| m.remove_workload(n));
                    d.into_iter().for_each(|w| m.put_workload(w));
                    m.counts().0
                })
            }
            type_url::SERVICE => {
                // Endpoints name workloads: hold the workloads' own uids.
                let d = self.store.read(|m| {
                    decode_all(updated, |n, b| {
                        let s = decode_service_with(n, b, |uid| {
                            m.workload(uid)
                                .map_or_else(|| Uid::new(uid), |w| w.uid.clone())
                        })?;
                        Ok((n.clone(), s))
                    })
                })?;
                self.versions
                    .entry(type_url::SERVICE)
                    .or_default()
                    .update(&removed, d.iter().map(|((n, _), v)| (n.clone(), v.clone())));
                self.store.update(|m| {
                    removed.iter().for_each(|n| m.remove_service(n));
                    d.into_iter()
                        .for_each(|((n, s), _)| m.put_service(n.to_string(), s));
                    m.counts().1
                })
            }
            type_url::AUTHORIZATION => {
                let d = decode_all(updated, |n, b| {
                    decode_authorization(n, b).map(|p| (n.clone(), p))
                })?;
                self.versions
                    .entry(type_url::AUTHORIZATION)
                    .or_default()
                    .update(&removed, d.iter().map(|((n, _), v)| (n.clone(), v.clone())));
                self.store.update(|m| {
                    removed.iter().for_each(|n| m.remove_policy(n));
                    d.into_iter()
                        .for_each(|((n, p), _)| m.put_policy(n.to_string(), p));
                    m.counts().2
                })
            }
            other => return Err(ApplyError::UnexpectedType(other.to_owned())),
        };
        self.shared.sweep();
        if large {
            trim_heap();
        }
        Ok(held)
    }

    fn held(&self, type_url: &str, each: &mut dyn FnMut(&str, &Version)) {
        if type_url == type_url::WORKLOAD {
            self.store.read(|m| {
                for w in m.workloads() {
                    match self.odd_versions.get(&w.uid) {
                        Some(v) => each(&w.uid, v),
                        None => each(&w.uid, &Version::Hex(w.version)),
                    }
                }
            });
        } else if let Some(versions) = self.versions.get(type_url) {
            for (name, v) in versions.iter() {
                each(name, v);
            }
        }
    }
}

/// Returns freed heap to the system (glibc keeps it otherwise).
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Decodes every resource of an update, each with its version; the first that does not
/// decode refuses the whole update.
fn decode_all<T>(
    updated: Vec<Update>,
    mut decode: impl FnMut(&Arc<str>, &[u8]) -> Result<T, DecodeError>,
) -> Result<Vec<(T, Version)>, ApplyError> {
    updated
        .into_iter()
        .map(|u| match decode(&u.name, &u.body.value) {
            Ok(v) => Ok((v, u.version)),
            Err(source) => Err(ApplyError::Resource {
                name: u.name.to_string(),
                source,
            }),
        })
        .collect()
}

/// Decodes and validates one `ambit.v1.Authorization`.
pub fn decode_authorization(_name: &str, bytes: &[u8]) -> Result<Authorization, DecodeError> {
    let a = ambit::Authorization::decode(bytes)
        .map_err(|e| DecodeError::protobuf("Authorization", e))?;
    authorization_from_proto(a)
}

/// Decodes and validates one `ambit.v1.Workload` named `name`.
pub fn decode_workload(name: &str, bytes: &[u8]) -> Result<Workload, DecodeError> {
    decode_workload_with(&name.into(), bytes, &mut Interners::default(), |_| true)
}

/// [`decode_workload`], sharing what workloads have in common through `shared`, and
/// keeping labels only of workloads on a node for which `keep_labels` holds. The uid is
/// the resource `name`, and carries the pod's name ([`Uid`]).
pub fn decode_workload_with(
    name: &Arc<str>,
    bytes: &[u8],
    shared: &mut Interners,
    keep_labels: impl Fn(&str) -> bool,
) -> Result<Workload, DecodeError> {
    let w = ambit::Workload::decode(bytes).map_err(|e| DecodeError::protobuf("Workload", e))?;
    let field = |field, problem: &str| DecodeError::Field {
        field,
        problem: problem.to_owned(),
    };
    if *w.uid != **name {
        return Err(field("uid", "differs from the resource name"));
    }
    // Allocated now, before the decoder's strings are freed: it takes none of their
    // slots, and the next workload's decoding reuses them.
    let uid = Uid::with_name(name, &w.name).ok_or_else(|| field("uid", "holds a NUL"))?;
    if w.ips.is_empty() {
        return Err(field("ips", "no IPs"));
    }
    let ips = w
        .ips
        .iter()
        .map(|b| ip_from_bytes(b))
        .collect::<Result<Vec<_>, _>>()?;
    let ips = Ips::new(ips).map_err(|e| field("ips", e))?;
    let identity = shared.identity(&w.identity)?;
    if identity.namespace() != w.namespace || identity.service_account() != w.service_account {
        return Err(field(
            "identity",
            "does not name the workload's namespace and service account",
        ));
    }
    let mtls = match ambit::MtlsMode::try_from(w.mtls) {
        Ok(ambit::MtlsMode::Strict) => MtlsMode::Strict,
        Ok(ambit::MtlsMode::Permissive) => MtlsMode::Permissive,
        Err(_) => {
            return Err(DecodeError::UnknownEnum {
                field: "mtls",
                value: w.mtls,
            });
        }
    };
    let profile = shared.profile(&identity, &w.name, |k| w.labels.get(k).map(String::as_str));
    // Only the destination's agent evaluates selectors: others drop labels unread
    // (a map per workload, of which only this node's few are kept).
    let labels = (keep_labels(&w.node) && !w.labels.is_empty())
        .then(|| Box::new(w.labels.into_iter().collect()));
    // What is kept is allocated here, fresh (the decoder's strings are freed at once and
    // reused by the next workload's decoding, instead of pinning pages among the kept).
    Ok(Workload {
        uid,
        placement: shared.placement(
            &w.node,
            Some(w.waypoint.as_str()).filter(|s| !s.is_empty()),
            w.enrolled,
            w.native_tunnel,
            mtls,
        ),
        profile,
        ips,
        labels,
        version: 0,
    })
}

/// Decodes and validates one `ambit.v1.Service`.
pub fn decode_service(name: &str, bytes: &[u8]) -> Result<Service, DecodeError> {
    decode_service_with(name, bytes, Uid::new)
}

/// [`decode_service`], taking each endpoint's uid from `uid` (the workload's own).
pub fn decode_service_with(
    _name: &str,
    bytes: &[u8],
    uid: impl Fn(&str) -> Uid,
) -> Result<Service, DecodeError> {
    let s = ambit::Service::decode(bytes).map_err(|e| DecodeError::protobuf("Service", e))?;
    if let Some(e) = s.endpoints.iter().find(|e| e.contains('\0')) {
        return Err(DecodeError::Field {
            field: "endpoints",
            problem: format!("uid {e:?} holds a NUL"),
        });
    }
    // Exactly as long as their content: collected into a `Vec` first, a fallible
    // iterator's guess leaves up to half of it unused.
    let vips: Vec<IpAddr> = s
        .vips
        .iter()
        .map(|b| ip_from_bytes(b))
        .collect::<Result<_, _>>()?;
    let ports: Vec<(u16, u16)> = s
        .ports
        .iter()
        .map(|p| Ok((port_from_u32(p.port)?, port_from_u32(p.target_port)?)))
        .collect::<Result<_, DecodeError>>()?;
    Ok(Service {
        vips: vips.into(),
        ports: ports.into(),
        name: s.name.into(),
        namespace: s.namespace.into(),
        hostname: s.hostname.into(),
        endpoints: s.endpoints.iter().map(|e| uid(e)).collect(),
        waypoint: Some(s.waypoint).filter(|w| !w.is_empty()).map(Into::into),
    })
}
