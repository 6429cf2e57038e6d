//! Upstream connections: choosing an endpoint, and HTTP connections to it, pooled.
//!
//! An endpoint with an HBONE identity (an enrolled workload) is reached through a
//! CONNECT tunnel to its node agent's `:15008`, as the waypoint's identity, with
//! `forwarded: for=<original client>` so the application still sees its caller; the
//! tunnels share pooled HBONE connections per destination agent. Other endpoints are
//! dialed in plaintext.
//!
//! HTTP connections are pooled per (endpoint, original client, protocol): HTTP/2
//! connections are shared by concurrent requests; HTTP/1.1 connections carry one
//! request at a time and go back to the pool once their response has been read.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ambit_hbone::connect::HboneClient;
use ambit_hbone::pool::{Dialer, Pool, PoolConfig, PoolError, PoolKey, PooledStream};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::debug;

use crate::body::ProxyBody;
use crate::config::{
    Cluster, ClusterLoad, ConnectionGuard, Endpoint, LbPolicy, Overflow, UpstreamProtocol,
};
use crate::identity::Certs;

/// The port node agents accept HBONE on.
pub const HBONE_PORT: u16 = 15008;
/// Idle HTTP/1.1 connections kept per key: as many as were needed at once, up to this
/// (64 made 100 concurrent HTTP/2 streams to an HTTP/1.1 backend reconnect constantly).
const MAX_IDLE: usize = 512;
/// An idle HTTP/1.1 connection unused this long is closed.
const IDLE_FOR: Duration = Duration::from_secs(60);
/// An endpoint that failed this recently is tried after the others.
const FAILED_FOR: Duration = Duration::from_secs(10);

/// Why no response came from an upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The connection (TCP, HBONE or the HTTP handshake) could not be made.
    #[error("connection failure: {0}")]
    Connect(String),
    /// The upstream refused the stream before processing it (HTTP/2 REFUSED_STREAM).
    #[error("refused stream")]
    Refused,
    /// The connection or stream ended before a response.
    #[error("reset before headers: {0}")]
    Reset(String),
    /// A circuit breaker of the cluster turned it away (Envoy's `UO`).
    #[error("overflow: {}", .0.as_str())]
    Overflow(crate::config::Overflow),
}

type Sender1 = http1::SendRequest<ProxyBody>;
type Sender2 = http2::SendRequest<ProxyBody>;
/// Idle HTTP/1.1 connections per key, with when each was last used.
type IdlePool = HashMap<ConnKey, Vec<(Sender1, Instant)>>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ConnKey {
    /// Per cluster, as Envoy's pools: each cluster's circuit breakers count its own.
    cluster: Arc<str>,
    addr: SocketAddr,
    client: Option<IpAddr>,
    protocol: UpstreamProtocol,
}

/// Dials HBONE connections to node agents as the waypoint's identity.
#[derive(Debug)]
pub struct HboneDialer {
    certs: watch::Receiver<Option<Arc<Certs>>>,
    timeout: Duration,
}

/// Why an HBONE dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// No certificate yet.
    #[error("the waypoint has no certificate yet")]
    NoCertificate,
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] ambit_hbone::tls::TlsError),
    /// TCP or the handshake.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// HTTP/2.
    #[error(transparent)]
    Hbone(#[from] ambit_hbone::connect::HboneError),
    /// Took too long.
    #[error("timed out")]
    Timeout,
}

impl Dialer for HboneDialer {
    type Target = ();
    type Error = DialError;

    async fn dial(&self, key: &PoolKey, _: &()) -> Result<HboneClient, DialError> {
        let certs = self
            .certs
            .borrow()
            .clone()
            .ok_or(DialError::NoCertificate)?;
        let config = certs.client(&key.dst_identity)?;
        let work = async {
            let tcp = TcpStream::connect(key.dst).await?;
            let _ = tcp.set_nodelay(true);
            let name = rustls::pki_types::ServerName::IpAddress(key.dst.ip().into());
            let tls = ambit_hbone::tls_stream::connect(config, name, tcp).await?;
            Ok::<_, DialError>(HboneClient::handshake(tls).await?)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| DialError::Timeout)?
    }
}

/// What waiting for a connection gave.
enum Waited {
    /// An idle one of the key.
    Idle(Sender1),
    /// Room for a new one.
    Capacity(ConnectionGuard),
}

/// The bytes under an upstream HTTP connection.
pub enum UpstreamIo {
    /// Plaintext TCP.
    Tcp(TcpStream),
    /// A CONNECT tunnel.
    Hbone(PooledStream),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Hbone(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Hbone(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Hbone(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Hbone(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Upstream connections and the load-balancing state.
pub struct Upstreams {
    hbone: Arc<Pool<HboneDialer>>,
    certs: watch::Receiver<Option<Arc<Certs>>>,
    /// Per key, most recently used last.
    idle1: Arc<Mutex<IdlePool>>,
    shared2: Mutex<HashMap<ConnKey, Sender2>>,
    /// Round-robin position per cluster.
    next: Mutex<HashMap<String, usize>>,
    /// Requests in flight per endpoint (least request).
    active: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
    failed: Mutex<HashMap<SocketAddr, Instant>>,
    /// What the waypoint says about itself on every tunnel (`baggage`).
    baggage: Option<String>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

/// Counts a request against its endpoint while it lives.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstreams {
    /// Upstream connections with the waypoint's certificate from `certs`; its tunnels
    /// carry `baggage` (peer metadata, as ztunnel's do).
    pub fn new(certs: watch::Receiver<Option<Arc<Certs>>>, baggage: Option<String>) -> Arc<Self> {
        let hbone = Pool::new(
            HboneDialer {
                certs: certs.clone(),
                timeout: Duration::from_secs(5),
            },
            PoolConfig::default(),
        );
        hbone.reap_periodically();
        let idle1: Arc<Mutex<IdlePool>> = Arc::default();
        // Idle HTTP/1.1 connections past IDLE_FOR are closed, also for keys no longer used.
        let weak = Arc::downgrade(&idle1);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(IDLE_FOR / 2).await;
                let Some(idle) = weak.upgrade() else { return };
                let now = Instant::now();
                idle.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|_, v| {
                        v.retain(|(s, t)| now.duration_since(*t) <= IDLE_FOR && !s.is_closed());
                        !v.is_empty()
                    });
            }
        });
        Arc::new(Self {
            hbone,
            certs,
            idle1,
            shared2: Mutex::default(),
            next: Mutex::default(),
            active: Mutex::default(),
            failed: Mutex::default(),
            baggage,
        })
    }

    /// The endpoint of `cluster` to try next: the balancer's choice among the endpoints
    /// outlier detection has not ejected, unless it was already tried (`tried`) or
    /// failed recently, in which case the next one after it that was not; if every
    /// endpoint was, the balancer's choice anyway. Below the cluster's panic threshold
    /// of endpoints not ejected, all are candidates. `None` without a candidate.
    pub fn choose(
        &self,
        cluster: &Cluster,
        endpoints: &[Endpoint],
        tried: &[SocketAddr],
    ) -> Option<Endpoint> {
        let all = endpoints.len();
        // Only while something is ejected: no lock, no list otherwise.
        let healthy: Option<smallvec::SmallVec<[usize; 16]>> = cluster
            .outlier
            .as_deref()
            .filter(|o| o.any_ejected())
            .and_then(|o| {
                o.with_ejected(|ejected| {
                    let h: smallvec::SmallVec<[usize; 16]> =
                        (0..all).filter(|&i| !ejected(endpoints[i].addr)).collect();
                    let percent = 100.0 * h.len() as f64 / all.max(1) as f64;
                    // Envoy's panic mode: too few left, so all are used.
                    (percent >= cluster.panic_threshold).then_some(h)
                })
            });
        let n = healthy.as_ref().map_or(all, |h| h.len());
        if n == 0 {
            return None;
        }
        let at = |k: usize| &endpoints[healthy.as_ref().map_or(k, |h| h[k])];
        let first = match cluster.lb {
            LbPolicy::RoundRobin => {
                let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
                // No allocation per request: the key is inserted once per cluster.
                let i = match next.get_mut(&cluster.name) {
                    Some(i) => i,
                    None => next.entry(cluster.name.clone()).or_default(),
                };
                let first = *i % n;
                *i = i.wrapping_add(1);
                first
            }
            LbPolicy::LeastRequest => {
                // Power of two choices, two different endpoints (with two, the less
                // busy one always; drawing the same one twice would make half the
                // choices random).
                let a = fastrand::usize(..n);
                let b = if n > 1 {
                    (a + 1 + fastrand::usize(..n - 1)) % n
                } else {
                    a
                };
                let load = |i: usize| self.load(at(i).addr);
                if load(b) < load(a) { b } else { a }
            }
        };
        let now = Instant::now();
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let bad = |e: &Endpoint| {
            tried.contains(&e.addr)
                || failed
                    .get(&e.addr)
                    .is_some_and(|t| now.duration_since(*t) < FAILED_FOR)
        };
        let pick = (0..n)
            .map(|k| at((first + k) % n))
            .find(|e| !bad(e))
            .unwrap_or(at(first));
        Some(pick.clone())
    }

    /// Requests in flight to `addr`.
    fn load(&self, addr: SocketAddr) -> usize {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn counter(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr)
            .or_default()
            .clone()
    }

    /// Counts a request to `addr` until the guard is dropped.
    pub fn start(&self, addr: SocketAddr) -> InFlight {
        let c = self.counter(addr);
        c.fetch_add(1, Ordering::Relaxed);
        InFlight(c)
    }

    /// Remembers that `addr` failed (it is tried last for a while).
    pub fn failed(&self, addr: SocketAddr) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, Instant::now());
    }

    /// Sends `req` to `ep` (`client`: the original caller, for `forwarded`).
    pub async fn send(
        &self,
        cluster: &Cluster,
        ep: &Endpoint,
        client: Option<IpAddr>,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<ProxyBody>, UpstreamError> {
        let key = ConnKey {
            cluster: cluster.pool.clone(),
            addr: ep.addr,
            client: ep.hbone.as_ref().and(client),
            protocol: cluster.protocol,
        };
        // A new connection's HBONE CONNECT names the request's span as its parent.
        let traceparent = req
            .headers()
            .get(crate::trace::TRACEPARENT)
            .and_then(|v| v.to_str().ok());
        match cluster.protocol {
            UpstreamProtocol::Http2 => {
                let mut sender = self.sender2(&key, ep, cluster, traceparent).await?;
                sender
                    .ready()
                    .await
                    .map_err(|e| UpstreamError::Reset(e.to_string()))?;
                let resp = sender.send_request(req).await.map_err(classify)?;
                Ok(resp.map(crate::body::stream))
            }
            UpstreamProtocol::Http1 => {
                let mut sender = self.sender1(&key, ep, cluster, traceparent).await?;
                let resp = sender.send_request(req).await.map_err(classify)?;
                // Back to the pool when the response body has been read to its end (by
                // the body itself: no task per response). Dropped unfinished, the
                // connection cannot be reused and goes with it.
                let mut ret = PoolReturn {
                    sender: Some(sender),
                    key: Some(key),
                    pool: self.idle1.clone(),
                    load: cluster.load.clone(),
                };
                Ok(resp.map(|inner| {
                    // An empty body is never polled: its connection is free already.
                    if http_body::Body::is_end_stream(&inner) {
                        ret.give_back();
                    }
                    http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(
                        ReturningBody { inner, ret },
                        crate::body::BoxError::from,
                    ))
                }))
            }
        }
    }

    /// An idle HTTP/1.1 connection of `key`, if one is ready.
    async fn idle1(&self, key: &ConnKey) -> Option<Sender1> {
        loop {
            let popped = {
                let mut idle = self.idle1.lock().unwrap_or_else(|e| e.into_inner());
                idle.get_mut(key).and_then(Vec::pop)
            };
            let (mut s, _) = popped?;
            if s.is_ready() {
                return Some(s);
            }
            // Returned as its response ended, the connection may not have seen that end
            // yet; a closed one is dropped.
            if !s.is_closed() && s.ready().await.is_ok() {
                return Some(s);
            }
        }
    }

    async fn sender1(
        &self,
        key: &ConnKey,
        ep: &Endpoint,
        cluster: &Cluster,
        traceparent: Option<&str>,
    ) -> Result<Sender1, UpstreamError> {
        if let Some(s) = self.idle1(key).await {
            return Ok(s);
        }
        // As Envoy's: a request without a ready connection is pending — waiting for a new
        // one to be made, or for one to come free — within max_pending_requests.
        let load: &ClusterLoad = &cluster.load;
        let _pending = load
            .wait_for_connection(cluster.limits.max_pending_requests)
            .ok_or(UpstreamError::Overflow(Overflow::Pending))?;
        let guard = match load.open_connection(cluster.limits.max_connections) {
            Some(g) => g,
            // Boxed, as the dial below: rare and large.
            None => match Box::pin(self.wait_for_connection(key, cluster)).await {
                Waited::Idle(s) => return Ok(s),
                Waited::Capacity(g) => g,
            },
        };
        // Boxed: a new connection is rare (they are pooled) and its future is large;
        // inline, it would make every request's future that much bigger.
        Box::pin(async {
            let io = self.dial_for(key, ep, cluster, traceparent).await?;
            let (sender, conn) = http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| UpstreamError::Connect(e.to_string()))?;
            tokio::spawn(async move {
                // Counted against the cluster's max_connections while it is open.
                let _guard = guard;
                if let Err(e) = conn.await {
                    debug!("upstream HTTP/1.1 connection ended: {e}");
                }
            });
            Ok(sender)
        })
        .await
    }

    /// With the cluster's `max_connections` open: waits for an idle connection of `key`
    /// or room for a new one (the caller holds its pending slot).
    async fn wait_for_connection(&self, key: &ConnKey, cluster: &Cluster) -> Waited {
        let load: &ClusterLoad = &cluster.load;
        loop {
            // Armed before looking, so that a connection freed meanwhile is not missed.
            let freed = load.freed();
            if let Some(s) = self.idle1(key).await {
                return Waited::Idle(s);
            }
            if let Some(g) = load.open_connection(cluster.limits.max_connections) {
                return Waited::Capacity(g);
            }
            freed.await;
        }
    }

    /// A new upstream connection's bytes, for `key` to `ep` of `cluster`.
    async fn dial_for(
        &self,
        key: &ConnKey,
        ep: &Endpoint,
        cluster: &Cluster,
        traceparent: Option<&str>,
    ) -> Result<UpstreamIo, UpstreamError> {
        let host = cluster.service_host();
        self.dial(ep, key.client, host, cluster.connect_timeout, traceparent)
            .await
    }

    async fn sender2(
        &self,
        key: &ConnKey,
        ep: &Endpoint,
        cluster: &Cluster,
        traceparent: Option<&str>,
    ) -> Result<Sender2, UpstreamError> {
        let shared = |key: &ConnKey| {
            self.shared2
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(key)
                .filter(|s| !s.is_closed())
                .cloned()
        };
        if let Some(s) = shared(key) {
            return Ok(s);
        }
        let load: &ClusterLoad = &cluster.load;
        let _pending = load
            .wait_for_connection(cluster.limits.max_pending_requests)
            .ok_or(UpstreamError::Overflow(Overflow::Pending))?;
        let guard = match load.open_connection(cluster.limits.max_connections) {
            Some(g) => g,
            None => loop {
                let freed = load.freed();
                if let Some(s) = shared(key) {
                    return Ok(s);
                }
                if let Some(g) = load.open_connection(cluster.limits.max_connections) {
                    break g;
                }
                freed.await;
            },
        };
        // Boxed, as for HTTP/1.1.
        let sender = Box::pin(async {
            let io = self.dial_for(key, ep, cluster, traceparent).await?;
            let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(|e| UpstreamError::Connect(e.to_string()))?;
            tokio::spawn(async move {
                let _guard = guard;
                if let Err(e) = conn.await {
                    debug!("upstream HTTP/2 connection ended: {e}");
                }
            });
            Ok::<_, UpstreamError>(sender)
        })
        .await?;
        self.shared2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), sender.clone());
        Ok(sender)
    }

    /// A byte stream to `ep`: HBONE if it has an identity, else plaintext TCP, within
    /// `connect_timeout`; `service`: the host name of the service it is an endpoint of
    /// (`forwarded: host=` on the tunnel, for the far side's telemetry).
    pub async fn dial(
        &self,
        ep: &Endpoint,
        client: Option<IpAddr>,
        service: Option<&str>,
        connect_timeout: Duration,
        traceparent: Option<&str>,
    ) -> Result<UpstreamIo, UpstreamError> {
        let connect = async {
            match &ep.hbone {
                None => {
                    let s = TcpStream::connect(ep.addr)
                        .await
                        .map_err(|e| UpstreamError::Connect(format!("{}: {e}", ep.addr)))?;
                    let _ = s.set_nodelay(true);
                    Ok(UpstreamIo::Tcp(s))
                }
                Some(dst) => {
                    let certs = self
                        .certs
                        .borrow()
                        .clone()
                        .ok_or_else(|| UpstreamError::Connect("no certificate yet".into()))?;
                    let key = PoolKey {
                        src_identity: certs.identity.clone(),
                        src: IpAddr::from([0, 0, 0, 0]),
                        dst_identity: dst.clone(),
                        dst: SocketAddr::new(ep.addr.ip(), HBONE_PORT),
                    };
                    // The span that asked for the connection is the far side's parent.
                    let tp = traceparent
                        .map(str::to_owned)
                        .unwrap_or_else(crate::trace::new_traceparent);
                    let headers = ambit_hbone::connect::ConnectHeaders {
                        source: client.unwrap_or(key.src),
                        traceparent: &tp,
                        baggage: self.baggage.as_deref(),
                        host: service,
                    };
                    match self.hbone.connect_with(&key, &(), ep.addr, &headers).await {
                        Ok(s) => Ok(UpstreamIo::Hbone(s)),
                        Err(PoolError::Dial(e)) => {
                            Err(UpstreamError::Connect(format!("HBONE to {}: {e}", key.dst)))
                        }
                        Err(PoolError::Tunnel(e)) => Err(UpstreamError::Connect(format!(
                            "HBONE tunnel to {}: {e}",
                            ep.addr
                        ))),
                    }
                }
            }
        };
        tokio::time::timeout(connect_timeout, connect)
            .await
            .map_err(|_| UpstreamError::Connect(format!("{}: connect timeout", ep.addr)))?
    }
}

fn classify(e: hyper::Error) -> UpstreamError {
    use std::error::Error as _;
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return UpstreamError::Refused;
        }
        source = s.source();
    }
    UpstreamError::Reset(e.to_string())
}

/// Puts an HTTP/1.1 connection back into its idle pool.
struct PoolReturn {
    sender: Option<Sender1>,
    key: Option<ConnKey>,
    pool: Arc<Mutex<IdlePool>>,
    /// Its cluster's: requests waiting for a connection are woken.
    load: Arc<ClusterLoad>,
}

impl PoolReturn {
    fn give_back(&mut self) {
        let (Some(sender), Some(key)) = (self.sender.take(), self.key.take()) else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let v = idle.entry(key).or_default();
        // The least recently used are first: close those idle too long.
        let stale = v
            .iter()
            .take_while(|(_, t)| now.duration_since(*t) > IDLE_FOR)
            .count();
        v.drain(..stale);
        if v.len() < MAX_IDLE {
            v.push((sender, now));
        }
        drop(idle);
        self.load.connection_freed();
    }
}

/// An upstream HTTP/1.1 response body that returns its connection to the pool when it
/// has been read to its end.
pub struct ReturningBody {
    inner: Incoming,
    ret: PoolReturn,
}

impl http_body::Body for ReturningBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => self.ret.give_back(),
            std::task::Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => {
                self.ret.give_back()
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
