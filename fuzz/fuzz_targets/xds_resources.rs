//! xDS as the node agent receives it: a sequence of delta updates, each resource either
//! raw bytes or a protobuf built from arbitrary field values (so validation is reached,
//! not only the protobuf decoder). A rejected update must leave the state exactly as it
//! was, and after every update the state's indexes must agree with its entries, and what
//! the handler says it holds (for a reconnect) must be what the store holds, at the
//! versions last applied.
#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;

use ambit_node_agent::state::Store;
use ambit_node_agent::state::xds::StoreHandler;
use ambit_xds::client::{Handler, Version};
use ambit_xds::envoy::Any;
use ambit_xds::{ambit, type_url};
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use prost::Message;

const NODE: &str = "node-a";

/// Names from a small set, so updates replace and remove what earlier ones put.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Name(u8);

impl Name {
    fn get(self) -> String {
        format!("n{}", self.0 % 6)
    }
}

/// Mostly well-formed addresses, drawn from a small pool so that they collide.
#[derive(Arbitrary, Debug)]
enum Ip<'a> {
    V4(u8),
    V6(u8),
    Raw(&'a [u8]),
}

impl Ip<'_> {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Ip::V4(n) => vec![10, 0, 0, n % 8],
            Ip::V6(n) => {
                let mut b = vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                b[15] = n % 8;
                b
            }
            Ip::Raw(b) => b.to_vec(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct W<'a> {
    name: Option<&'a str>,
    namespace: &'a str,
    local: bool,
    service_account: &'a str,
    ips: Vec<Ip<'a>>,
    enrolled: bool,
    native_tunnel: bool,
    waypoint: &'a str,
    labels: Vec<(&'a str, &'a str)>,
    /// None: the identity its namespace and service account imply.
    identity: Option<&'a str>,
    mtls: i32,
}

#[derive(Arbitrary, Debug)]
struct S<'a> {
    namespace: &'a str,
    vips: Vec<Ip<'a>>,
    ports: Vec<(u32, u32)>,
    endpoints: Vec<Name>,
}

#[derive(Arbitrary, Debug)]
struct Src<'a> {
    principals: Vec<&'a str>,
    namespaces: Vec<&'a str>,
    ip_blocks: Vec<(Ip<'a>, u32)>,
}

/// Ports and not-ports.
type Dst = (Vec<u32>, Vec<u32>);

#[derive(Arbitrary, Debug)]
struct A<'a> {
    namespace: &'a str,
    action: i32,
    namespace_wide: bool,
    selector: Vec<(&'a str, &'a str)>,
    rules: Vec<(Vec<Src<'a>>, Vec<Dst>)>,
    /// (connections, per_seconds, burst) of a RATE_LIMIT (zeros are invalid).
    rate: Option<(u32, u32, u32)>,
}

#[derive(Arbitrary, Debug)]
enum Body<'a> {
    Raw(&'a [u8]),
    Workload(W<'a>),
    Service(S<'a>),
    Authorization(A<'a>),
}

#[derive(Arbitrary, Debug)]
struct Update<'a> {
    /// 0–2: the agent's three types; anything else a type it does not know.
    kind: u8,
    updated: Vec<(Name, Body<'a>, Ver<'a>)>,
    removed: Vec<Name>,
}

/// A resource version: mostly Ambit's 16 hex digits, sometimes any text.
#[derive(Arbitrary, Debug)]
enum Ver<'a> {
    Hex(u64),
    Text(&'a str),
}

impl Ver<'_> {
    fn get(&self) -> String {
        match self {
            Ver::Hex(n) => format!("{n:016x}"),
            Ver::Text(t) => t.to_string(),
        }
    }
}

fn s(v: &str) -> String {
    v.to_owned()
}

fn encode(name: &str, body: &Body<'_>) -> Vec<u8> {
    match body {
        Body::Raw(b) => b.to_vec(),
        Body::Workload(w) => ambit::Workload {
            uid: w.name.map_or_else(|| s(name), s),
            name: s(name),
            namespace: s(w.namespace),
            node: if w.local { s(NODE) } else { s("node-b") },
            service_account: s(w.service_account),
            ips: w.ips.iter().map(Ip::bytes).collect(),
            enrolled: w.enrolled,
            native_tunnel: w.native_tunnel,
            waypoint: s(w.waypoint),
            labels: w.labels.iter().map(|(k, v)| (s(k), s(v))).collect(),
            identity: w.identity.map_or_else(
                || {
                    format!(
                        "spiffe://cluster.local/ns/{}/sa/{}",
                        w.namespace, w.service_account
                    )
                },
                s,
            ),
            mtls: w.mtls % 3,
        }
        .encode_to_vec(),
        Body::Service(v) => ambit::Service {
            name: s(name),
            namespace: s(v.namespace),
            hostname: format!("{name}.{}.svc.cluster.local", v.namespace),
            vips: v.vips.iter().map(Ip::bytes).collect(),
            ports: v
                .ports
                .iter()
                .map(|&(port, target_port)| ambit::Port {
                    port,
                    target_port,
                    name: String::new(),
                })
                .collect(),
            endpoints: v.endpoints.iter().map(|n| n.get()).collect(),
            waypoint: String::new(),
        }
        .encode_to_vec(),
        Body::Authorization(a) => ambit::Authorization {
            name: s(name),
            namespace: s(a.namespace),
            // ALLOW, DENY, RATE_LIMIT, and one unknown.
            action: a.action % 4,
            rate: a.rate.map(|(connections, per_seconds, burst)| ambit::ConnectionRate {
                connections,
                per_seconds,
                burst,
            }),
            namespace_wide: a.namespace_wide,
            selector: a.selector.iter().map(|(k, v)| (s(k), s(v))).collect(),
            rules: a
                .rules
                .iter()
                .map(|(from, to)| ambit::Rule {
                    from: from
                        .iter()
                        .map(|f| ambit::SourceMatch {
                            principals: f.principals.iter().copied().map(s).collect(),
                            namespaces: f.namespaces.iter().copied().map(s).collect(),
                            ip_blocks: f
                                .ip_blocks
                                .iter()
                                .map(|(ip, length)| ambit::Cidr {
                                    address: ip.bytes(),
                                    length: length % 160,
                                })
                                .collect(),
                            ..Default::default()
                        })
                        .collect(),
                    to: to
                        .iter()
                        .map(|(ports, not_ports)| ambit::DestinationMatch {
                            ports: ports.clone(),
                            not_ports: not_ports.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }
        .encode_to_vec(),
    }
}

fuzz_target!(|updates: Vec<Update<'_>>| {
    let store = Arc::new(Store::new(NODE));
    let mut handler = StoreHandler::new(store.clone());
    for u in updates.iter().take(16) {
        let type_url = match u.kind {
            0 => type_url::WORKLOAD,
            1 => type_url::SERVICE,
            2 => type_url::AUTHORIZATION,
            _ => "type.googleapis.com/ambit.v1.Unknown",
        };
        let updated = u
            .updated
            .iter()
            .map(|(n, body, v)| {
                let name = n.get();
                let value = encode(&name, body);
                let any = Any {
                    type_url: type_url.to_owned(),
                    value,
                };
                ambit_xds::client::Update {
                    name: name.into(),
                    version: Version::new(&v.get()),
                    body: any,
                }
            })
            .collect::<Vec<_>>();
        let mut versions = held(&handler, type_url);
        let removed: Vec<String> = u.removed.iter().map(|n| n.get()).collect();
        let before = store.read(|m| serde_json::to_string(m).unwrap());
        let version = *store.changes().borrow();
        let given: Vec<(String, String)> = updated
            .iter()
            .map(|u| (u.name.to_string(), u.version.to_string()))
            .collect();
        let removed_names: Vec<String> = removed.clone();
        match handler.apply(type_url, updated, removed) {
            Err(_) => {
                assert_eq!(store.read(|m| serde_json::to_string(m).unwrap()), before);
                assert_eq!(*store.changes().borrow(), version);
                assert_eq!(held(&handler, type_url), versions, "a refused update changed versions");
            }
            Ok(count) => {
                for n in &removed_names {
                    versions.remove(n);
                }
                versions.extend(given);
                assert_eq!(held(&handler, type_url), versions, "after {u:?}");
                assert_eq!(count, versions.len());
                let (w, s, p) = store.read(|m| m.counts());
                let in_store = [w, s, p][usize::from(u.kind.min(2))];
                assert_eq!(count, in_store);
            }
        }
        if let Err(e) = store.read(|m| m.check_indexes()) {
            panic!("indexes disagree after {u:?}: {e}");
        }
    }
});

/// What the handler says it holds of `type_url`, name → version.
fn held(h: &StoreHandler, type_url: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    h.held(type_url, &mut |n, v| {
        assert!(out.insert(n.to_owned(), v.to_string()).is_none(), "{n} held twice");
    });
    out
}
