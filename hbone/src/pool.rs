//! A pool of HBONE connections, keyed by (source identity, destination identity,
//! destination address).
//!
//! - A connection carries at most `max_streams` tunnels at once; beyond that another
//!   connection is opened.
//! - Dialing is single-flight per key: a burst of tunnels to a new destination opens one
//!   connection (then more only as streams fill up), not one each.
//! - A connection unused for `idle_timeout` is closed; one the peer closed is dropped.
//! - The bookkeeping is bounded by what is open: a key's dial gate is dropped as soon as
//!   nobody dials it, and a key without connections is forgotten by the next reap, so
//!   pods coming and going leave nothing behind.
//! - No lock is shared by all tunnels: the maps are [`SHARDS`] shards by key, so workers
//!   opening tunnels to different destinations never wait for each other; tunnels of one
//!   key share its shard, as they share its connections.

use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasher;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use ambit_identity::Identity;

use crate::connect::{ConnectHeaders, HboneClient, HboneError};
use crate::stream::H2Stream;

/// Identifies a pool of connections. The source IP is part of it: the connection's TCP
/// source is the source workload's own IP, which the far side delivers as.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Who the connection authenticates as.
    pub src_identity: Identity,
    /// The source workload's IP: the connection's TCP source.
    pub src: IpAddr,
    /// Who the peer must prove to be.
    pub dst_identity: Identity,
    /// The peer agent's address (`pod ip:15008`).
    pub dst: SocketAddr,
}

/// Makes a new HBONE connection for a key (TCP, then mutual TLS, then HTTP/2).
pub trait Dialer: Send + Sync + 'static {
    /// What the caller hands the dialer besides the key (e.g. the source pod, whose
    /// namespace the socket is made in), so the dialer never has to look it up.
    type Target: Send + Sync;
    /// Why a dial failed.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Opens a connection for `key`.
    fn dial(
        &self,
        key: &PoolKey,
        target: &Self::Target,
    ) -> impl Future<Output = Result<HboneClient, Self::Error>> + Send;
}

/// Why [`Pool::connect`] gave no tunnel.
#[derive(Debug, thiserror::Error)]
pub enum PoolError<E: std::error::Error + 'static> {
    /// No connection could be dialed.
    #[error(transparent)]
    Dial(E),
    /// The connection was there, the tunnel was not set up.
    #[error(transparent)]
    Tunnel(#[from] HboneError),
}

struct Conn {
    client: HboneClient,
    active: Arc<AtomicUsize>,
    last_used: Mutex<Instant>,
}

/// Pool settings.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Tunnels per connection at most.
    pub max_streams: usize,
    /// Unused connections close after this long.
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams: crate::connect::MAX_STREAMS as usize,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Shards of the pool's maps; a key always lands in the same one.
pub const SHARDS: usize = 16;

type Gates = Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>;

/// One shard: the connections of its keys, and the keys being dialed.
#[derive(Default)]
struct Shard {
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>,
    /// One dial at a time per key.
    dialing: Gates,
}

/// The pool.
pub struct Pool<D> {
    dialer: D,
    config: PoolConfig,
    shards: [Shard; SHARDS],
    /// Picks a key's shard.
    hasher: std::hash::RandomState,
    /// Connections opened so far (for metrics and tests).
    pub dials: AtomicU64,
}

impl<D> std::fmt::Debug for Pool<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<D: Dialer> Pool<D> {
    /// A pool dialing with `dialer`.
    pub fn new(dialer: D, config: PoolConfig) -> Arc<Self> {
        Arc::new(Self {
            dialer,
            config,
            shards: Default::default(),
            hasher: std::hash::RandomState::new(),
            dials: AtomicU64::new(0),
        })
    }

    /// Opens a tunnel to `authority` over a pooled connection for `key`.
    pub async fn connect(
        &self,
        key: &PoolKey,
        target: &D::Target,
        authority: SocketAddr,
        source: IpAddr,
        traceparent: &str,
    ) -> Result<PooledStream, PoolError<D::Error>> {
        let headers = ConnectHeaders {
            source,
            traceparent,
            baggage: None,
            host: None,
        };
        self.connect_with(key, target, authority, &headers).await
    }

    /// [`connect`](Self::connect) with every header given.
    pub async fn connect_with(
        &self,
        key: &PoolKey,
        target: &D::Target,
        authority: SocketAddr,
        headers: &ConnectHeaders<'_>,
    ) -> Result<PooledStream, PoolError<D::Error>> {
        let conn = self.checkout(key, target).await.map_err(PoolError::Dial)?;
        match conn.client.connect_with(authority, headers).await {
            Ok(stream) => Ok(PooledStream {
                stream,
                _lease: Lease(conn),
            }),
            Err(e) => {
                drop(Lease(conn));
                Err(e.into())
            }
        }
    }

    fn shard(&self, key: &PoolKey) -> &Shard {
        &self.shards[(self.hasher.hash_one(key) % SHARDS as u64) as usize]
    }

    /// A connection with a free stream slot, reserved (its `active` count taken).
    async fn checkout(&self, key: &PoolKey, target: &D::Target) -> Result<Arc<Conn>, D::Error> {
        let shard = self.shard(key);
        if let Some(c) = self.reserve(shard, key) {
            return Ok(c);
        }
        let gate = DialGate::enter(&shard.dialing, key);
        let _single_flight = gate.gate.lock().await;
        // Whoever dialed while we waited may have made room.
        if let Some(c) = self.reserve(shard, key) {
            return Ok(c);
        }
        let client = self.dialer.dial(key, target).await?;
        self.dials.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            client,
            active: Arc::new(AtomicUsize::new(1)),
            last_used: Mutex::new(Instant::now()),
        });
        shard
            .conns
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        Ok(conn)
    }

    fn reserve(&self, shard: &Shard, key: &PoolKey) -> Option<Arc<Conn>> {
        let mut conns = shard.conns.lock().unwrap();
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.client.is_closed());
        for c in list.iter() {
            let n = c.active.load(Ordering::Acquire);
            if n < self.config.max_streams
                && c.active
                    .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Some(c.clone());
            }
        }
        None
    }

    /// Closes connections idle for longer than the idle timeout (and forgets closed ones).
    /// Returns how many were closed. Run it periodically ([`Pool::reap_periodically`]).
    pub fn reap(&self) -> usize {
        let now = Instant::now();
        let mut closed = 0;
        for shard in &self.shards {
            let mut conns = shard.conns.lock().unwrap();
            for list in conns.values_mut() {
                let before = list.len();
                list.retain(|c| {
                    let idle = c.active.load(Ordering::Acquire) == 0
                        && now.duration_since(*c.last_used.lock().unwrap())
                            >= self.config.idle_timeout;
                    !(idle || c.client.is_closed())
                });
                closed += before - list.len();
            }
            conns.retain(|_, l| !l.is_empty());
        }
        closed
    }

    /// Open connections, all keys.
    pub fn connections(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.conns
                    .lock()
                    .unwrap()
                    .values()
                    .map(Vec::len)
                    .sum::<usize>()
            })
            .sum()
    }

    /// What the pool keeps track of: (keys with connections, keys being dialed).
    pub fn bookkeeping(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(c, d), s| {
            (
                c + s.conns.lock().unwrap().len(),
                d + s.dialing.lock().unwrap().len(),
            )
        })
    }

    /// Runs [`Pool::reap`] every `idle_timeout / 2` until the pool is dropped.
    pub fn reap_periodically(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = (self.config.idle_timeout / 2).max(Duration::from_millis(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match weak.upgrade() {
                    Some(pool) => {
                        pool.reap();
                    }
                    None => return,
                }
            }
        });
    }
}

/// One caller's place at a key's dial gate. The gate is shared by the callers dialing
/// the key at the same time, and removed by the last one to leave.
struct DialGate<'a> {
    map: &'a Gates,
    key: &'a PoolKey,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> DialGate<'a> {
    fn enter(map: &'a Gates, key: &'a PoolKey) -> Self {
        let gate = map.lock().unwrap().entry(key.clone()).or_default().clone();
        Self { map, key, gate }
    }
}

impl Drop for DialGate<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap();
        // Two references: the map's and ours. Anyone else would have cloned it under
        // this lock, so nobody can be about to use it.
        if map
            .get(self.key)
            .is_some_and(|g| Arc::ptr_eq(g, &self.gate))
            && Arc::strong_count(&self.gate) == 2
        {
            map.remove(self.key);
        }
    }
}

/// Holds a stream slot on a pooled connection until dropped.
struct Lease(Arc<Conn>);

impl Drop for Lease {
    fn drop(&mut self) {
        *self.0.last_used.lock().unwrap() = Instant::now();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A tunnel on a pooled connection; releases its slot when dropped.
pub struct PooledStream {
    stream: H2Stream,
    _lease: Lease,
}

impl PooledStream {
    /// Where to run this stream's copy loop: its connection's task
    /// ([`crate::stream::Runner`]).
    pub fn runner(&self) -> Option<crate::stream::Runner> {
        self.stream.runner().cloned()
    }
}

impl crate::copy::Side for PooledStream {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<bytes::Bytes>>> {
        self.stream.poll_chunk(cx)
    }
    fn delivered(&mut self, n: usize) {
        self.stream.delivered(n)
    }
    fn poll_put(&mut self, cx: &mut Context<'_>, data: &mut bytes::Bytes) -> Poll<io::Result<()>> {
        self.stream.poll_put(cx, data)
    }
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.poll_finish(cx)
    }
}

impl std::fmt::Debug for PooledStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledStream").finish_non_exhaustive()
    }
}

impl AsyncRead for PooledStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PooledStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
