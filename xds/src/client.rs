//! The xDS client every Ambit process shares: incremental (delta) ADS.
//!
//! [`XdsClient::spawn`] keeps one stream to the control plane open for as long as the
//! process runs:
//! - it connects with exponential backoff and jitter (reset after a response is applied);
//! - it subscribes (wildcard) to each configured type, telling the server which versions
//!   it already has (`initial_resource_versions`, from [`Handler::held`]: the handler
//!   keeps each resource's version beside the resource), so a reconnect resends only
//!   what changed;
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
pub use crate::versions::{Version, Versions};

/// Applies configuration. Called on the client's task, one response at a time.
pub trait Handler: Send + 'static {
    /// Validates the whole update for `type_url` and, only if all of it is valid, applies
    /// it, returning how many resources of the type it then holds. An `Err` NACKs the
    /// response with its message and must leave state unchanged.
    ///
    /// A resource's name is the client's own fresh copy: a handler that keys what it
    /// keeps by name can hold that allocation itself. It keeps each resource's version
    /// too, for [`held`](Handler::held).
    fn apply(
        &mut self,
        type_url: &str,
        updated: Vec<Update>,
        removed: Vec<String>,
    ) -> Result<usize, ApplyError>;

    /// Calls `each` with the name and version of every resource of `type_url` it holds:
    /// what the client tells the server it has when it reconnects
    /// (`initial_resource_versions`), so that only what changed is sent again.
    fn held(&self, type_url: &str, each: &mut dyn FnMut(&str, &Version));
}

/// One resource of a response.
#[derive(Clone, Debug)]
pub struct Update {
    /// Its name (a fresh allocation, not the decoder's).
    pub name: Arc<str>,
    /// Its version.
    pub version: Version,
    /// Its body (of the response's type).
    pub body: Any,
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
    let mut backoff = config.backoff_min;
    let jitter = RandomState::new();
    for attempt in 0u64.. {
        let applied_any = match session(&config, &mut handler, &status).await {
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
) -> Result<bool, (String, bool)> {
    let (tx, rx) = mpsc::channel(64);
    for (i, type_url) in config.types.iter().enumerate() {
        // What the handler holds (kept across reconnects): the server resends only what
        // changed.
        let mut initial = HashMap::new();
        handler.held(type_url, &mut |name, v| {
            initial.insert(name.to_owned(), v.to_string());
        });
        let req = DeltaDiscoveryRequest {
            node: (i == 0).then(|| Node {
                id: config.node_id.clone(),
                ..Default::default()
            }),
            type_url: (*type_url).into(),
            initial_resource_versions: initial,
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
        let ack = on_response(type_url, r, handler, status);
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
) -> DeltaDiscoveryRequest {
    let mut updated = Vec::with_capacity(r.resources.len());
    let mut malformed = None;
    for res in r.resources {
        match res.resource {
            Some(any) if any.type_url == type_url => {
                // A fresh allocation, not the decoder's (which sits among the response's
                // buffers, soon freed, and would pin their pages).
                updated.push(Update {
                    name: res.name.as_str().into(),
                    version: Version::new(&res.version),
                    body: any,
                });
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
    let (n_updated, n_removed) = (updated.len(), removed.len());
    let started = std::time::Instant::now();
    let result = match malformed {
        Some(e) => Err(e),
        None => handler.apply(type_url, updated, removed),
    };
    debug!(
        type_url,
        updated = n_updated,
        removed = n_removed,
        version = %r.system_version_info,
        apply_ms = started.elapsed().as_secs_f64() * 1e3,
        ok = result.is_ok(),
        "xDS response applied"
    );
    let mut types = status.types.lock().unwrap();
    let ts = types.entry(type_url.to_owned()).or_default();
    match result {
        Ok(held) => {
            ts.last_version = r.system_version_info;
            ts.resources = held;
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
