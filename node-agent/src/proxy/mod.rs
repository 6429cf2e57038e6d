//! The proxy: serves a captured pod's listeners. Outbound ([`outbound`]): captured
//! connects, passed through or tunnelled over HBONE. Inbound ([`inbound`]): HBONE
//! tunnels and steered plaintext, authorized and delivered as the caller.
//!
//! The proxy is handed a narrow [`Inputs`] (the state, certificates, the HBONE pool,
//! the socket factory, telemetry) and never reaches for anything else. Its decisions
//! are pure functions of the state ([`outbound::plan`], [`inbound::authorize`], ...)
//! with unit tests that need no root.
//!
//! - [`error`]: every way a connection fails, naming its metric reason;
//! - [`dialer`]: sockets made inside pods' namespaces;
//! - [`hbone_dialer`]: how the pool dials a new HBONE connection;
//! - [`lb`]: endpoint order for a service;
//! - [`relay`]: copying bytes both ways;
//! - [`tracker`]: open inbound connections, re-authorized when policy changes;
//! - [`workers`]: the data plane's threads, a single-threaded runtime each.

pub mod dialer;
pub mod error;
pub mod hbone_dialer;
pub mod inbound;
pub mod lb;
pub mod outbound;
pub mod relay;
pub mod tracker;
pub mod workers;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::warn;

use self::error::Error;
use self::workers::Workers;
use crate::capture::OriginalDestinations;
use crate::capture::listeners::PodListeners;
use crate::capture::pods::Pod;
use crate::identity::Certificates;
use crate::identity::tls::TlsConfigs;
use crate::state::{Service, Store, Workload};
use crate::telemetry::{Direction, Refused, SecurityPolicy, Started, Telemetry};

/// The HBONE connection pool the proxy dials through.
pub type HbonePool = ambit_hbone::pool::Pool<hbone_dialer::HboneDialer>;

/// Everything the proxy needs, and nothing more.
pub struct Inputs {
    /// How long dialing (a destination, a tunnel, an application) may take.
    pub connect_timeout: Duration,
    /// The mesh as the control plane describes it.
    pub state: Arc<Store>,
    /// This node's workload certificates.
    pub certs: Arc<Certificates>,
    /// TLS configurations built from them.
    pub tls: Arc<TlsConfigs>,
    /// HBONE connections to other agents.
    pub pool: Arc<HbonePool>,
    /// Makes sockets in pods' namespaces.
    pub sockets: Arc<dialer::NetnsDialer>,
    /// Where captured connections were going.
    pub orig_dst: Arc<dyn OriginalDestinations>,
    /// Open inbound connections.
    pub conns: tracker::ConnTracker,
    /// Endpoint order per service.
    pub lb: lb::LoadBalancer,
    /// Metrics and access log.
    pub telemetry: Arc<Telemetry>,
    /// The last captured connections (`/debug/connections`).
    pub recent: Arc<RecentConnections>,
    /// Where connection spans go, if anywhere.
    pub tracing: Option<ambit_otel::Tracing>,
    /// Connection rate limits' buckets.
    pub limiter: ambit_policy::limiter::ConnLimiter,
}

impl std::fmt::Debug for Inputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs")
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// Serves pods' listeners on the data plane's workers.
#[derive(Debug)]
pub struct Proxy {
    inputs: Arc<Inputs>,
    workers: Arc<Workers>,
}

impl Proxy {
    /// A proxy running its connections on `workers`.
    pub fn new(inputs: Arc<Inputs>, workers: Arc<Workers>) -> Self {
        Self { inputs, workers }
    }
}

impl crate::capture::PodServer for Proxy {
    fn serve(
        &self,
        pod: &Arc<Pod>,
        listeners: PodListeners,
    ) -> std::io::Result<Vec<JoinHandle<()>>> {
        let mut tasks = Vec::new();
        let result = (|| {
            for l in listeners.outbound {
                tasks.push(self.spawn(pod, l, "outbound", outbound::connection)?);
            }
            for l in listeners.hbone {
                tasks.push(self.spawn(pod, l, "hbone", inbound::hbone_connection)?);
            }
            for (_, l) in listeners.plaintext {
                tasks.push(self.spawn(pod, l, "plaintext", inbound::plaintext_connection)?);
            }
            Ok(())
        })();
        if let Err(e) = result {
            tasks.iter().for_each(|t| t.abort());
            return Err(e);
        }
        Ok(tasks)
    }
}

impl Proxy {
    /// Accepts on `listener` in the next worker; the connections go round robin.
    fn spawn<F>(
        &self,
        pod: &Arc<Pod>,
        listener: std::net::TcpListener,
        what: &'static str,
        handler: Handler<F>,
    ) -> std::io::Result<JoinHandle<()>>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (_, worker) = self.workers.pick();
        let l = {
            let _rt = worker.enter();
            TcpListener::from_std(listener)?
        };
        Ok(worker.spawn(accept_loop(
            self.inputs.clone(),
            pod.clone(),
            l,
            what,
            handler,
            self.workers.clone(),
        )))
    }
}

/// A per-connection task: given the inputs, the pod, the accepted stream and its peer.
type Handler<F> = fn(Arc<Inputs>, Arc<Pod>, TcpStream, SocketAddr) -> F;

/// Accepts connections on one of a pod's listeners until the task is aborted, running
/// `handle` for each on its own task, in the next worker (the socket moves to that
/// worker's runtime). An accept error (typically EMFILE) backs off instead of spinning.
async fn accept_loop<F>(
    inputs: Arc<Inputs>,
    pod: Arc<Pod>,
    listener: TcpListener,
    what: &'static str,
    handle: Handler<F>,
    workers: Arc<Workers>,
) where
    F: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let (i, worker) = workers.pick();
                if Workers::current() == Some(i) {
                    tokio::spawn(handle(inputs.clone(), pod.clone(), tcp, peer));
                    continue;
                }
                // Registered with this worker's epoll; the other one's from now on.
                let std = match tcp.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(uid = %pod.spec.uid, listener = what, "handing a connection over failed: {e}");
                        continue;
                    }
                };
                let (inputs, pod) = (inputs.clone(), pod.clone());
                worker.spawn(async move {
                    match TcpStream::from_std(std) {
                        Ok(tcp) => handle(inputs, pod, tcp, peer).await,
                        Err(e) => {
                            warn!(uid = %pod.spec.uid, listener = what, "handing a connection over failed: {e}")
                        }
                    }
                });
            }
            Err(e) => {
                warn!(uid = %pod.spec.uid, listener = what, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Closes with RST rather than FIN, so the peer sees a failure, not a clean end.
pub fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// A refused or failed connection, for [`Telemetry::refused`].
pub(crate) struct Failure<'a> {
    pub direction: Direction,
    pub pod: &'a Pod,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_workload: Option<&'a Workload>,
    pub dst_workload: Option<&'a Workload>,
    pub src_identity: Option<&'a ambit_identity::Identity>,
    pub service: Option<&'a Service>,
    pub security: SecurityPolicy,
    pub started: Started,
}

impl Failure<'_> {
    /// Counts, logs and access-logs `e`.
    pub fn record(&self, telemetry: &Telemetry, e: &Error) {
        telemetry.refused(&Refused {
            direction: self.direction,
            local: (&self.pod.spec.name, &self.pod.spec.namespace),
            src: self.src,
            dst: self.dst,
            src_workload: self.src_workload,
            dst_workload: self.dst_workload,
            src_identity: self.src_identity,
            service: self.service,
            security: self.security,
            result: e.result(),
            reason: e.reason(),
            detail: &e.to_string(),
            started: self.started,
        });
    }
}

/// How many recent connections `/debug/connections` remembers.
const RECENT: usize = 1024;

/// One captured connection, as `/debug/connections` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct CapturedConnection {
    /// The pod's uid.
    pub uid: String,
    /// The pod's name.
    pub workload: String,
    /// Its namespace.
    pub namespace: String,
    /// The application's side of the redirected connection (loopback, ephemeral port).
    pub client: SocketAddr,
    /// Where the application asked to connect.
    pub original_destination: SocketAddr,
    /// Seconds since the Unix epoch.
    pub at: f64,
    /// Order of capture (the list's order).
    #[serde(skip)]
    seq: u64,
}

impl CapturedConnection {
    // Copies, not the pod's `Arc`: the list must not keep a deleted pod (its namespace
    // and sockets) alive.
    fn new(pod: &Pod, client: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            uid: pod.spec.uid.clone(),
            workload: pod.spec.name.clone(),
            namespace: pod.spec.namespace.clone(),
            client,
            original_destination: dst,
            at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            seq: 0,
        }
    }
}

/// Shards of [`RecentConnections`]: connections are dealt to them in turn.
const RECENT_SHARDS: usize = 8;
const _: () = assert!(RECENT.is_multiple_of(RECENT_SHARDS), "rings of equal size");

/// The last [`RECENT`] captured connections.
///
/// Connections are dealt round robin to [`RECENT_SHARDS`] rings of `RECENT /
/// RECENT_SHARDS`, so workers recording at once rarely share a lock, and the rings
/// together hold exactly the last `RECENT` (each holds the latest of its turns).
#[derive(Debug, Default)]
pub struct RecentConnections {
    next: AtomicU64,
    shards: [Mutex<VecDeque<CapturedConnection>>; RECENT_SHARDS],
}

impl RecentConnections {
    fn push(&self, mut c: CapturedConnection) {
        c.seq = self.next.fetch_add(1, Ordering::Relaxed);
        let shard = &self.shards[(c.seq % RECENT_SHARDS as u64) as usize];
        let mut q = shard.lock().unwrap_or_else(|e| e.into_inner());
        // Two pushes to one shard can race between taking their turn and the lock: each
        // ring keeps the latest turns it was dealt, in order.
        if q.len() == RECENT / RECENT_SHARDS {
            if q.front().is_some_and(|o| o.seq > c.seq) {
                return;
            }
            q.pop_front();
        }
        let at = q.iter().rposition(|o| o.seq < c.seq).map_or(0, |i| i + 1);
        q.insert(at, c);
    }

    /// A copy of the list, oldest first: every ring at one moment (all locked, in order;
    /// a push holds one at a time).
    pub fn snapshot(&self) -> Vec<CapturedConnection> {
        let rings: Vec<_> = self
            .shards
            .iter()
            .map(|q| q.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let mut all: Vec<CapturedConnection> =
            rings.iter().flat_map(|q| q.iter().cloned()).collect();
        drop(rings);
        all.sort_unstable_by_key(|c| c.seq);
        all
    }
}

#[cfg(test)]
mod recent_tests {
    use super::*;

    fn conn(port: u16) -> CapturedConnection {
        CapturedConnection {
            uid: "u".into(),
            workload: "w".into(),
            namespace: "n".into(),
            client: SocketAddr::from(([127, 0, 0, 1], port)),
            original_destination: SocketAddr::from(([10, 0, 0, 1], 80)),
            at: 0.0,
            seq: 0,
        }
    }

    /// Workers recording at once: the list is still exactly the last `RECENT`, in order.
    #[test]
    fn concurrent_pushes_keep_exactly_the_last_ones_in_order() {
        let recent = RecentConnections::default();
        assert!(recent.snapshot().is_empty());
        let (threads, each) = (4u16, 1_000u16);
        std::thread::scope(|s| {
            for t in 0..threads {
                let recent = &recent;
                s.spawn(move || (0..each).for_each(|i| recent.push(conn(t * each + i))));
            }
        });
        let list = recent.snapshot();
        assert_eq!(list.len(), RECENT);
        let total = u64::from(threads * each);
        let seqs: Vec<u64> = list.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, (total - RECENT as u64..total).collect::<Vec<_>>());
        let json = serde_json::to_value(&list[0]).unwrap();
        assert!(json.get("seq").is_none() && json["uid"] == "u", "{json}");
    }
}
