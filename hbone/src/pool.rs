//! A pool of HBONE connections, keyed by (source identity, destination identity,
//! destination address).
//!
//! - A connection carries at most `max_streams` tunnels at once; beyond that another
//!   connection is opened.
//! - Dialing is single-flight per key: a burst of tunnels to a new destination opens one
//!   connection (then more only as streams fill up), not one each.
//! - A connection unused for `idle_timeout` is closed; one the peer closed is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::connect::{HboneClient, HboneError};
use crate::stream::H2Stream;

/// Identifies a pool of connections. The source IP is part of it: the connection's TCP
/// source is the source workload's own IP, which the far side delivers as.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_identity: String,
    pub src: IpAddr,
    pub dst_identity: String,
    /// The peer agent's address (`pod ip:15008`).
    pub dst: SocketAddr,
}

/// Makes a new HBONE connection for a key (TCP, then mutual TLS, then HTTP/2).
pub trait Dialer: Send + Sync + 'static {
    fn dial(&self, key: &PoolKey) -> impl Future<Output = Result<HboneClient, HboneError>> + Send;
}

struct Conn {
    client: HboneClient,
    active: Arc<AtomicUsize>,
    last_used: Mutex<Instant>,
}

/// Pool settings.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub max_streams: usize,
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

/// The pool.
pub struct Pool<D> {
    dialer: D,
    config: PoolConfig,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>,
    /// One dial at a time per key.
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
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
    pub fn new(dialer: D, config: PoolConfig) -> Arc<Self> {
        Arc::new(Self {
            dialer,
            config,
            conns: Mutex::default(),
            dialing: Mutex::default(),
            dials: AtomicU64::new(0),
        })
    }

    /// Opens a tunnel to `authority` over a pooled connection for `key`.
    pub async fn connect(
        &self,
        key: &PoolKey,
        authority: SocketAddr,
        source: IpAddr,
        traceparent: &str,
    ) -> Result<PooledStream, HboneError> {
        let conn = self.checkout(key).await?;
        match conn.client.connect(authority, source, traceparent).await {
            Ok(stream) => Ok(PooledStream {
                stream,
                _lease: Lease(conn),
            }),
            Err(e) => {
                drop(Lease(conn));
                Err(e)
            }
        }
    }

    /// A connection with a free stream slot, reserved (its `active` count taken).
    async fn checkout(&self, key: &PoolKey) -> Result<Arc<Conn>, HboneError> {
        if let Some(c) = self.reserve(key) {
            return Ok(c);
        }
        let gate = self
            .dialing
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        let _single_flight = gate.lock().await;
        // Whoever dialed while we waited may have made room.
        if let Some(c) = self.reserve(key) {
            return Ok(c);
        }
        let client = self.dialer.dial(key).await?;
        self.dials.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            client,
            active: Arc::new(AtomicUsize::new(1)),
            last_used: Mutex::new(Instant::now()),
        });
        self.conns
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        Ok(conn)
    }

    fn reserve(&self, key: &PoolKey) -> Option<Arc<Conn>> {
        let mut conns = self.conns.lock().unwrap();
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
        let mut conns = self.conns.lock().unwrap();
        for list in conns.values_mut() {
            let before = list.len();
            list.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && now.duration_since(*c.last_used.lock().unwrap()) >= self.config.idle_timeout;
                !(idle || c.client.is_closed())
            });
            closed += before - list.len();
        }
        conns.retain(|_, l| !l.is_empty());
        closed
    }

    /// Open connections, all keys.
    pub fn connections(&self) -> usize {
        self.conns.lock().unwrap().values().map(Vec::len).sum()
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
