//! The xDS [`Handler`]: each response is decoded whole (any bad resource NACKs all of it
//! and changes nothing), then a new [`Config`] is published.

use std::collections::HashMap;
use std::sync::Arc;

use ambit_xds::client::{ApplyError, Handler, Update, Version, Versions};
use ambit_xds::convert::DecodeError;
use ambit_xds::type_url;
use tokio::sync::watch;

use super::{Config, Resources, decode};

/// Keeps the decoded resources and publishes each new [`Config`].
#[derive(Debug)]
pub struct ConfigHandler {
    resources: Resources,
    /// The version of each resource held, by type (what a reconnect says it has).
    versions: HashMap<String, Versions>,
    tx: watch::Sender<Arc<Config>>,
}

impl ConfigHandler {
    /// A handler publishing on a new channel, and that channel's receiver.
    pub fn new() -> (Self, watch::Receiver<Arc<Config>>) {
        let (tx, rx) = watch::channel(Arc::new(Config::default()));
        (
            Self {
                resources: Resources::default(),
                versions: HashMap::new(),
                tx,
            },
            rx,
        )
    }
}

fn refuse(name: &str, problem: String) -> ApplyError {
    ApplyError::Resource {
        name: name.to_owned(),
        source: DecodeError::Field {
            field: "resource",
            problem,
        },
    }
}

impl Handler for ConfigHandler {
    fn apply(
        &mut self,
        type_url: &str,
        updated: Vec<Update>,
        removed: Vec<String>,
    ) -> Result<usize, ApplyError> {
        let mut next = self.resources.clone();
        for Update {
            name, body: any, ..
        } in &updated
        {
            if any.type_url != type_url {
                return Err(ApplyError::WrongType {
                    name: name.to_string(),
                    found: any.type_url.clone(),
                    expected: type_url.to_owned(),
                });
            }
        }
        let versions: Vec<(Arc<str>, Version)> = updated
            .iter()
            .map(|u| (u.name.clone(), u.version.clone()))
            .collect();
        let updated = updated.into_iter().map(|u| (u.name, u.body));
        let held = match type_url {
            type_url::LISTENER => {
                for (name, any) in updated {
                    let l = decode::listener(&any).map_err(|e| refuse(&name, e))?;
                    next.listeners.insert(name.to_string(), Arc::new(l));
                }
                for n in &removed {
                    next.listeners.remove(n);
                }
                next.listeners.len()
            }
            type_url::ROUTE => {
                for (name, any) in updated {
                    let r = decode::route_config(&any).map_err(|e| refuse(&name, e))?;
                    next.routes.insert(name.to_string(), Arc::new(r));
                }
                for n in &removed {
                    next.routes.remove(n);
                }
                next.routes.len()
            }
            type_url::CLUSTER => {
                for (name, any) in updated {
                    let c = decode::cluster(&any).map_err(|e| refuse(&name, e))?;
                    next.clusters.insert(name.to_string(), Arc::new(c));
                }
                for n in &removed {
                    next.clusters.remove(n);
                }
                next.clusters.len()
            }
            type_url::ENDPOINT => {
                for (name, any) in updated {
                    let (_, eps) = decode::endpoints(&any).map_err(|e| refuse(&name, e))?;
                    next.endpoints.insert(name.to_string(), Arc::new(eps));
                }
                for n in &removed {
                    next.endpoints.remove(n);
                }
                next.endpoints.len()
            }
            type_url::AUTHORIZATION => {
                use prost::Message;
                for (name, any) in updated {
                    let p = ambit_xds::ambit::Authorization::decode(any.value.as_slice())
                        .map_err(|e| DecodeError::protobuf("Authorization", e))
                        .and_then(ambit_xds::convert::authorization_from_proto)
                        .map_err(|source| ApplyError::Resource {
                            name: name.to_string(),
                            source,
                        })?;
                    next.policies.insert(name.to_string(), Arc::new(p));
                }
                for n in &removed {
                    next.policies.remove(n);
                }
                next.policies.len()
            }
            type_url::WORKLOAD => {
                for (name, any) in updated {
                    let w = decode::fronted_workload(&any).map_err(|e| refuse(&name, e))?;
                    next.workloads.insert(name.to_string(), Arc::new(w));
                }
                for n in &removed {
                    next.workloads.remove(n);
                }
                next.workloads.len()
            }
            other => return Err(ApplyError::UnexpectedType(other.to_owned())),
        };
        self.resources = next;
        self.versions
            .entry(type_url.to_owned())
            .or_default()
            .update(&removed, versions);
        self.tx
            .send_replace(Arc::new(Config::join(self.resources.clone())));
        Ok(held)
    }

    fn held(&self, type_url: &str, each: &mut dyn FnMut(&str, &Version)) {
        for (name, v) in self
            .versions
            .get(type_url)
            .into_iter()
            .flat_map(Versions::iter)
        {
            each(name, v);
        }
    }
}
