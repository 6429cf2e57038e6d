//! The xDS client every Ambit process shares: incremental (delta) ADS.
//!
//! [`XdsClient::spawn`] keeps one stream to the control plane open for as long as the
//! process runs:
//! - it connects with exponential backoff and jitter (reset after a response is applied);
//! - it subscribes (wildcard) to each configured type, telling the server which versions
//!   it already has (`initial_resource_versions`), so a reconnect resends only what
//!   changed;
//! - every response goes to the [`Handler`], which validates it *whole* and applies it or
//!   refuses it; the client ACKs or NACKs with the handler's error as `error_detail`;
//! - while the control plane is away nothing is cleared: the handler keeps the last good
//!   state.
//!
//! [`XdsStatus`] says what is going on (connected, per-type versions, rejects).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::channel::ControlPlane;
use crate::convert::DecodeError;
use crate::envoy::{Any, DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};
use crate::grpc;

/// Applies configuration. Called on the client's task, one response at a time.
pub trait Handler: Send + 'static {
    /// Validates the whole update for `type_url` and, only if all of it is valid, applies
    /// it. An `Err` NACKs the response with its message and must leave state unchanged.
    ///
    /// A resource's name is the client's own shared copy: a handler that keys what it
    /// keeps by name can hold the same allocation instead of a second one.
    fn apply(
        &mut self,
        type_url: &str,
        updated: Vec<(Arc<str>, Any)>,
        removed: Vec<String>,
    ) -> Result<(), ApplyError>;
}

/// A resource's version as the client remembers it for a reconnect
/// (`initial_resource_versions`). Versions are opaque strings; Ambit's control plane
/// sends 16 hex digits (a hash), kept here as the number itself so that an agent holding
/// 10k workloads does not hold 10k more strings. Anything else is kept as it came.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Version {
    /// Exactly 16 lowercase hex digits.
    Hex(u64),
    /// Any other string (boxed twice so that a version is 16 bytes, not 24).
    Text(Box<Box<str>>),
}

impl Version {
    fn new(v: &str) -> Self {
        if v.len() == 16
            && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && let Ok(n) = u64::from_str_radix(v, 16)
        {
            return Self::Hex(n);
        }
        Self::Text(Box::new(v.into()))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hex(n) => write!(f, "{n:016x}"),
            Self::Text(t) => f.write_str(t),
        }
    }
}

/// Name → version of what the handler holds, for one type: a vector sorted by name, 32
/// bytes a name. (A hash map's slots come in powers of two: at 10k names it was 55 bytes
/// a name, and an agent keeps one per workload.) A response of a few names is inserted
/// by binary search; a large one is appended and merged by one sort.
#[derive(Debug, Default)]
struct Known(Vec<(Arc<str>, Version)>);

/// Up to this many names, a change is made one binary search at a time.
const FEW: usize = 32;

impl Known {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> impl Iterator<Item = &(Arc<str>, Version)> {
        self.0.iter()
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| (**n).cmp(name))
    }

    /// Records `versions` (a name given twice keeps the last).
    fn upsert(&mut self, versions: Vec<(Arc<str>, Version)>) {
        if versions.len() <= FEW {
            for (name, v) in versions {
                match self.find(&name) {
                    Ok(i) => self.0[i].1 = v,
                    Err(i) => self.0.insert(i, (name, v)),
                }
            }
            return;
        }
        self.0.extend(versions);
        // Stable: of one name's entries, the older comes first; the newer is kept.
        self.0.sort_by(|a, b| a.0.cmp(&b.0));
        self.0.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
    }

    /// Forgets `names` (those it has).
    fn remove(&mut self, names: &[String]) {
        if names.len() <= FEW {
            for n in names {
                if let Ok(i) = self.find(n) {
                    self.0.remove(i);
                }
            }
        } else {
            let gone: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
            self.0.retain(|(n, _)| !gone.contains(&**n));
        }
        if self.0.capacity() > 2 * self.0.len() + FEW {
            self.0.shrink_to_fit();
        }
    }
}

/// Why a response was refused (its text is the NACK's `error_detail`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// A resource did not decode or validate.
    #[error("resource {name}: {source}")]
    Resource {
        /// The resource's name.
        name: String,
        /// What is wrong with it.
        source: DecodeError,
    },
    /// A resource of another type inside the response.
    #[error("resource {name}: type {found} inside a {expected} response")]
    WrongType {
        /// The resource's name.
        name: String,
        /// Its type.
        found: String,
        /// The response's type.
        expected: String,
    },
    /// A resource without a body.
    #[error("resource {0}: no body")]
    NoBody(String),
    /// A type the handler does not handle.
    #[error("unexpected type {0}")]
    UnexpectedType(String),
}

/// Where and who.
#[derive(Clone, Debug)]
pub struct XdsClientConfig {
    /// The control plane (shared with the CA client).
    pub control_plane: ControlPlane,
    /// Sent as `node.id`: the node agent's node name.
    pub node_id: String,
    /// The types to subscribe to (wildcard).
    pub types: Vec<&'static str>,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

/// What the client is doing, for metrics and the config dump.
#[derive(Debug, Default)]
pub struct XdsStatus {
    /// A stream is open now.
    pub connected: AtomicBool,
    /// Streams opened so far.
    pub connects: AtomicU64,
    /// Responses applied.
    pub acks: AtomicU64,
    /// Responses refused.
    pub nacks: AtomicU64,
    types: Mutex<BTreeMap<String, TypeStatus>>,
}

/// Per type URL.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TypeStatus {
    /// `system_version_info` of the last applied response.
    pub last_version: String,
    /// Resources held.
    pub resources: usize,
    /// Responses refused.
    pub nacks: u64,
    /// The last rejection's reason.
    pub last_error: Option<String>,
    /// Set once the first response for the type was applied.
    pub synced: bool,
}

impl XdsStatus {
    /// Per-type state.
    pub fn types(&self) -> BTreeMap<String, TypeStatus> {
        self.types.lock().unwrap().clone()
    }

    /// True once every subscribed type has had one response applied.
    pub fn synced(&self, types: &[&str]) -> bool {
        let t = self.types.lock().unwrap();
        types.iter().all(|ty| t.get(*ty).is_some_and(|s| s.synced))
    }
}

/// Handle on a running client.
#[derive(Debug)]
pub struct XdsClient {
    /// What the client is doing.
    pub status: Arc<XdsStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for XdsClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl XdsClient {
    /// Starts the client on the current tokio runtime.
    pub fn spawn(config: XdsClientConfig, handler: impl Handler) -> Self {
        Self::spawn_with_status(config, handler, Arc::default())
    }

    /// Like [`XdsClient::spawn`], reporting into an existing status.
    pub fn spawn_with_status(
        config: XdsClientConfig,
        handler: impl Handler,
        status: Arc<XdsStatus>,
    ) -> Self {
        let task = tokio::spawn(run(config, handler, status.clone()));
        Self { status, task }
    }
}

async fn run(config: XdsClientConfig, mut handler: impl Handler, status: Arc<XdsStatus>) {
    // name → version of what the handler holds, per type: survives reconnects.
    let mut known: HashMap<&'static str, Known> = HashMap::new();
    let mut backoff = config.backoff_min;
    let jitter = RandomState::new();
    for attempt in 0u64.. {
        let applied_any = match session(&config, &mut handler, &status, &mut known).await {
            Ok(applied) => {
                debug!("xDS stream ended");
                applied
            }
            Err((e, applied)) => {
                warn!(address = %config.control_plane.address(), "xDS: {e}");
                applied
            }
        };
        status.connected.store(false, Ordering::Release);
        if applied_any {
            backoff = config.backoff_min;
        }
        // Full jitter in [backoff/2, backoff].
        let j = jitter.hash_one(attempt) % 1000;
        let sleep = backoff / 2 + backoff.mul_f64(j as f64 / 2000.0);
        tokio::time::sleep(sleep).await;
        backoff = (backoff * 2).min(config.backoff_max);
    }
}

/// The ADS method the client calls.
const DELTA_ADS: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// The largest response accepted (a 10k-workload mesh's first sync is about 1.9 MB).
const MAX_MESSAGE: usize = 64 << 20;

/// One connection. Returns whether any response was applied (and why it ended).
async fn session(
    config: &XdsClientConfig,
    handler: &mut impl Handler,
    status: &XdsStatus,
    known: &mut HashMap<&'static str, Known>,
) -> Result<bool, (String, bool)> {
    let (tx, rx) = mpsc::channel(64);
    for (i, type_url) in config.types.iter().enumerate() {
        let initial = known
            .get(type_url)
            .into_iter()
            .flat_map(Known::iter)
            .map(|(name, v)| (name.to_string(), v.to_string()));
        let req = DeltaDiscoveryRequest {
            node: (i == 0).then(|| Node {
                id: config.node_id.clone(),
                ..Default::default()
            }),
            type_url: (*type_url).into(),
            initial_resource_versions: initial.collect(),
            ..Default::default()
        };
        tx.send(req).await.expect("receiver alive");
    }
    let mut credential = tonic::Request::new(());
    config.control_plane.authorize(&mut credential);
    let mut responses: grpc::Call<DeltaDiscoveryResponse> = grpc::bidi(
        &config.control_plane.channel(),
        DELTA_ADS,
        credential.into_parts().0,
        rx,
        MAX_MESSAGE,
    )
    .await
    .map_err(|e| (format!("opening the stream: {e}"), false))?;
    status.connected.store(true, Ordering::Release);
    status.connects.fetch_add(1, Ordering::Relaxed);
    info!(address = %config.control_plane.address(), node = %config.node_id, "xDS connected");
    let mut applied = false;
    loop {
        let r = match responses.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(applied),
            Err(e) => return Err((format!("stream: {e}"), applied)),
        };
        let Some(type_url) = config.types.iter().copied().find(|t| *t == r.type_url) else {
            warn!(type_url = %r.type_url, "xDS: response for a type we did not ask for; ignored");
            continue;
        };
        let ack = on_response(
            type_url,
            r,
            handler,
            status,
            known.entry(type_url).or_default(),
        );
        applied |= ack.error_detail.is_none();
        if tx.send(ack).await.is_err() {
            return Ok(applied);
        }
    }
}

/// Hands a response to the handler and builds the ACK or NACK.
fn on_response(
    type_url: &'static str,
    r: DeltaDiscoveryResponse,
    handler: &mut impl Handler,
    status: &XdsStatus,
    known: &mut Known,
) -> DeltaDiscoveryRequest {
    let mut versions = Vec::with_capacity(r.resources.len());
    let mut updated = Vec::with_capacity(r.resources.len());
    let mut malformed = None;
    for res in r.resources {
        match res.resource {
            Some(any) if any.type_url == type_url => {
                // A fresh allocation, not the decoder's (which sits among the response's
                // buffers, soon freed, and would pin their pages).
                let name: Arc<str> = res.name.as_str().into();
                versions.push((name.clone(), Version::new(&res.version)));
                updated.push((name, any));
            }
            Some(any) => {
                malformed = Some(ApplyError::WrongType {
                    name: res.name,
                    found: any.type_url,
                    expected: type_url.to_owned(),
                })
            }
            None => malformed = Some(ApplyError::NoBody(res.name)),
        }
    }
    let removed = r.removed_resources;
    let result = match malformed {
        Some(e) => Err(e),
        None => handler.apply(type_url, updated, removed.clone()),
    };
    let mut types = status.types.lock().unwrap();
    let ts = types.entry(type_url.to_owned()).or_default();
    match result {
        Ok(()) => {
            known.remove(&removed);
            known.upsert(versions);
            ts.last_version = r.system_version_info;
            ts.resources = known.len();
            ts.synced = true;
            status.acks.fetch_add(1, Ordering::Relaxed);
            DeltaDiscoveryRequest {
                type_url: type_url.into(),
                response_nonce: r.nonce,
                ..Default::default()
            }
        }
        Err(e) => {
            warn!(type_url, nonce = %r.nonce, "xDS: rejecting a response, keeping the previous state: {e}");
            ts.nacks += 1;
            let e = e.to_string();
            ts.last_error = Some(e.clone());
            status.nacks.fetch_add(1, Ordering::Relaxed);
            DeltaDiscoveryRequest {
                type_url: type_url.into(),
                response_nonce: r.nonce,
                // INVALID_ARGUMENT
                error_detail: Some(Status {
                    code: 3,
                    message: e,
                    ..Default::default()
                }),
                ..Default::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Known, Version};
    use std::sync::Arc;

    #[test]
    fn known_versions_behave_as_a_map_whatever_the_batch_sizes() {
        use std::collections::BTreeMap;
        let mut known = Known::default();
        let mut model: BTreeMap<String, String> = BTreeMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..300 {
            // Batches of 1 to 200 names out of 400: both the few and the many path, with
            // names repeated inside a batch.
            let size = 1 + next(if round % 3 == 0 { 200 } else { 8 }) as usize;
            let batch: Vec<(String, String)> = (0..size)
                .map(|_| {
                    let v = if next(4) == 0 {
                        format!("v{}", next(9))
                    } else {
                        format!("{:016x}", next(u64::MAX))
                    };
                    (format!("ns/w-{}", next(400)), v)
                })
                .collect();
            if next(3) == 0 {
                let names: Vec<String> = batch.into_iter().map(|(n, _)| n).collect();
                for n in &names {
                    model.remove(n);
                }
                known.remove(&names);
            } else {
                for (n, v) in &batch {
                    model.insert(n.clone(), v.clone());
                }
                known.upsert(
                    batch
                        .into_iter()
                        .map(|(n, v)| (Arc::from(n.as_str()), Version::new(&v)))
                        .collect(),
                );
            }
            let got: Vec<(String, String)> = known
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect();
            let want: Vec<(String, String)> = model.clone().into_iter().collect();
            assert_eq!(got, want, "round {round}");
        }
    }

    #[test]
    fn a_version_is_sent_back_exactly_as_it_came() {
        for v in [
            "00a1b2c3d4e5f607",
            "ffffffffffffffff",
            "0000000000000000",
            // Not ours: upper case, other lengths, other characters, empty.
            "00A1B2C3D4E5F607",
            "a1b2c3d4e5f607",
            "00a1b2c3d4e5f6070",
            "2026-12-07T05:00:00Z",
            "",
            "+0a1b2c3d4e5f607",
        ] {
            assert_eq!(Version::new(v).to_string(), v);
        }
        assert!(matches!(Version::new("00a1b2c3d4e5f607"), Version::Hex(_)));
        assert!(matches!(Version::new("00A1B2C3D4E5F607"), Version::Text(_)));
        // 10k of them are held per agent.
        assert_eq!(std::mem::size_of::<Version>(), 16);
    }
}
