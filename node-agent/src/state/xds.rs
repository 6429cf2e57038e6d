//! The xDS handler that feeds the [`Store`]: it decodes and validates a whole response
//! before applying any of it, so a bad resource NACKs the response and the store keeps
//! its previous state.

use std::sync::Arc;

use ambit_identity::Identity;
use ambit_policy::Authorization;
use ambit_xds::ambit;
use ambit_xds::client::{ApplyError, Handler};
use ambit_xds::convert::{DecodeError, authorization_from_proto, ip_from_bytes, port_from_u32};
use ambit_xds::envoy::Any;
use ambit_xds::type_url;
use prost::Message;

use super::{Canonical, MtlsMode, Service, Store, Workload};

/// Feeds a [`Store`] from xDS.
#[derive(Debug, Clone)]
pub struct StoreHandler {
    /// Where decoded resources go.
    pub store: Arc<Store>,
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
    ) -> Result<(), ApplyError> {
        let large = updated.len() > TRIM_AFTER;
        // Decode and validate everything before touching the store.
        match type_url {
            type_url::WORKLOAD => {
                let d = decode_all(updated, decode_workload)?;
                self.store.update(|m| {
                    removed.iter().for_each(|n| m.remove_workload(n));
                    d.into_iter().for_each(|(_, w)| m.put_workload(w));
                });
            }
            type_url::SERVICE => {
                let d = decode_all(updated, decode_service)?;
                self.store.update(|m| {
                    removed.iter().for_each(|n| m.remove_service(n));
                    d.into_iter().for_each(|(n, s)| m.put_service(n, s));
                });
            }
            type_url::AUTHORIZATION => {
                let d = decode_all(updated, decode_authorization)?;
                self.store.update(|m| {
                    removed.iter().for_each(|n| m.remove_policy(n));
                    d.into_iter().for_each(|(n, p)| m.put_policy(n, p));
                });
            }
            other => return Err(ApplyError::UnexpectedType(other.to_owned())),
        }
        if large {
            trim_heap();
        }
        Ok(())
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

fn decode_all<T>(
    updated: Vec<(String, Any)>,
    decode: impl Fn(&str, &[u8]) -> Result<T, DecodeError>,
) -> Result<Vec<(String, T)>, ApplyError> {
    updated
        .into_iter()
        .map(|(name, any)| match decode(&name, &any.value) {
            Ok(v) => Ok((name, v)),
            Err(source) => Err(ApplyError::Resource { name, source }),
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
    let w = ambit::Workload::decode(bytes).map_err(|e| DecodeError::protobuf("Workload", e))?;
    let field = |field, problem: &str| DecodeError::Field {
        field,
        problem: problem.to_owned(),
    };
    if w.uid != name {
        return Err(field("uid", "differs from the resource name"));
    }
    if w.ips.is_empty() {
        return Err(field("ips", "no IPs"));
    }
    let ips = w
        .ips
        .iter()
        .map(|b| ip_from_bytes(b))
        .collect::<Result<Vec<_>, _>>()?;
    if ips.iter().filter(|ip| ip.is_ipv4()).count() > 1
        || ips.iter().filter(|ip| ip.is_ipv6()).count() > 1
    {
        return Err(field("ips", "more than one address of a family"));
    }
    let identity = Identity::parse(&w.identity)?;
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
    let labels = w.labels.into_iter().collect();
    Ok(Workload {
        canonical: Canonical::derive(&w.name, &labels),
        uid: w.uid.into(),
        name: w.name,
        namespace: w.namespace,
        node: w.node,
        service_account: w.service_account,
        ips,
        enrolled: w.enrolled,
        native_tunnel: w.native_tunnel,
        waypoint: Some(w.waypoint).filter(|s| !s.is_empty()),
        identity,
        labels,
        mtls,
    })
}

/// Decodes and validates one `ambit.v1.Service`.
pub fn decode_service(_name: &str, bytes: &[u8]) -> Result<Service, DecodeError> {
    let s = ambit::Service::decode(bytes).map_err(|e| DecodeError::protobuf("Service", e))?;
    Ok(Service {
        vips: s
            .vips
            .iter()
            .map(|b| ip_from_bytes(b))
            .collect::<Result<_, _>>()?,
        ports: s
            .ports
            .iter()
            .map(|p| Ok((port_from_u32(p.port)?, port_from_u32(p.target_port)?)))
            .collect::<Result<_, DecodeError>>()?,
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        endpoints: s.endpoints.into_iter().map(Into::into).collect(),
        waypoint: Some(s.waypoint).filter(|w| !w.is_empty()),
    })
}
