//! What every proxied connection shares: copying bytes both ways while counting them, the
//! registry of authorized inbound connections (so a policy change can close the ones it
//! now denies), and the access log.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use crate::Agent;
use crate::pods::Pod;
use crate::rbac;
use crate::store::Mesh;

/// Copy buffer per direction. 64 KiB moves bulk data in few syscalls.
pub const COPY_BUF: usize = 64 * 1024;

/// A per-connection task: given the agent, the pod, the accepted stream and its peer.
pub type Handler<F> = fn(Arc<Agent>, Arc<Pod>, TcpStream, SocketAddr) -> F;

/// Accepts connections on one of a pod's listeners until the task is aborted, running
/// `handle` for each on its own task. An accept error (typically EMFILE) backs off
/// instead of spinning.
pub async fn accept_loop<F>(
    agent: Arc<Agent>,
    pod: Arc<Pod>,
    listener: TcpListener,
    what: &'static str,
    handle: Handler<F>,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                tokio::spawn(handle(agent.clone(), pod.clone(), tcp, peer));
            }
            Err(e) => {
                warn!(uid = %pod.spec.uid, listener = what, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both sides finished.
    Done,
    /// A side failed or reset.
    Error(io::Error),
    /// The connection was closed on purpose (a policy change denies it now).
    Killed,
}

/// Copies between `client` and `server` until both directions end, or `kill` fires.
/// Returns how it ended and the bytes (client→server, server→client), counted even when
/// it ended early.
pub async fn relay<C, S>(client: C, server: &mut S, kill: Option<&Notify>) -> (End, u64, u64)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut c = Metered {
        inner: client,
        read: 0,
        written: 0,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut c, server, COPY_BUF, COPY_BUF);
    let end = match kill {
        Some(kill) => tokio::select! {
            r = copy => r.map_or_else(End::Error, |_| End::Done),
            _ = kill.notified() => End::Killed,
        },
        None => copy.await.map_or_else(End::Error, |_| End::Done),
    };
    (end, c.read, c.written)
}

/// Counts the bytes read from and written to a stream.
struct Metered<S> {
    inner: S,
    read: u64,
    written: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An authorized inbound connection, as policy sees it.
#[derive(Debug)]
pub struct Tracked {
    pub dst_uid: String,
    pub src_identity: Option<String>,
    pub src_ip: IpAddr,
    pub dst_port: u16,
    pub kill: Arc<Notify>,
}

/// The inbound connections open now, re-authorized when policy changes.
#[derive(Debug, Default)]
pub struct ConnTracker {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Tracked>>,
}

/// Removes its connection from the tracker when dropped.
#[derive(Debug)]
pub struct TrackGuard<'a> {
    tracker: &'a ConnTracker,
    id: u64,
    pub kill: Arc<Notify>,
}

impl Drop for TrackGuard<'_> {
    fn drop(&mut self) {
        self.tracker.conns.lock().unwrap().remove(&self.id);
    }
}

impl ConnTracker {
    pub fn track(
        &self,
        dst_uid: &str,
        src_identity: Option<&str>,
        src_ip: IpAddr,
        dst_port: u16,
    ) -> TrackGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let kill = Arc::new(Notify::new());
        self.conns.lock().unwrap().insert(
            id,
            Tracked {
                dst_uid: dst_uid.to_owned(),
                src_identity: src_identity.map(str::to_owned),
                src_ip,
                dst_port,
                kill: kill.clone(),
            },
        );
        TrackGuard {
            tracker: self,
            id,
            kill,
        }
    }

    /// Authorizes every open connection again under `mesh`, closing those it denies.
    /// Returns how many were closed.
    pub fn revalidate(&self, mesh: &Mesh) -> usize {
        let conns = self.conns.lock().unwrap();
        let mut closed = 0;
        for t in conns.values() {
            let allowed = mesh.workloads.get(&t.dst_uid).is_some_and(|dst| {
                rbac::authorize(
                    mesh.authorizations.values(),
                    dst,
                    &rbac::Connection {
                        src_identity: t.src_identity.as_deref(),
                        src_ip: t.src_ip,
                        dst_port: t.dst_port,
                    },
                )
                .allowed()
            });
            if !allowed {
                // A stored permit: the relay sees it even if it is not waiting right now.
                t.kill.notify_one();
                closed += 1;
            }
        }
        closed
    }
}

/// One access-log record: a JSON line per closed (or refused) connection.
#[derive(Debug, Serialize)]
pub struct AccessRecord<'a> {
    /// RFC 3339-ish seconds since the epoch, with milliseconds.
    pub start: f64,
    pub duration_ms: f64,
    /// `outbound` (reported by the source's agent) or `inbound` (the destination's).
    pub direction: &'static str,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    pub src_identity: Option<&'a str>,
    pub dst_identity: Option<&'a str>,
    pub service: Option<&'a str>,
    /// `mutual_tls` or `none`.
    pub security: &'static str,
    /// Client → server bytes, and back.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// `ok`, `error`, `denied`, `refused`, `closed_by_policy`, ...
    pub result: &'static str,
    pub reason: Option<&'a str>,
}

/// When a connection started, for its access-log record.
#[derive(Clone, Copy, Debug)]
pub struct Started {
    wall: SystemTime,
    mono: Instant,
}

impl Started {
    pub fn now() -> Self {
        Self {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }

    pub fn epoch_secs(&self) -> f64 {
        self.wall
            .duration_since(UNIX_EPOCH)
            .map(|d| (d.as_millis() as f64) / 1000.0)
            .unwrap_or(0.0)
    }

    pub fn elapsed_ms(&self) -> f64 {
        let d: Duration = self.mono.elapsed();
        (d.as_micros() as f64) / 1000.0
    }
}

/// Writes access-log records to standard output (or nowhere).
#[derive(Debug)]
pub struct AccessLog {
    enabled: bool,
}

impl AccessLog {
    pub fn new(enabled: bool) -> Self {
        Self { enabled }
    }

    pub fn write(&self, r: &AccessRecord<'_>) {
        if !self.enabled {
            return;
        }
        if let Ok(mut line) = serde_json::to_vec(r) {
            line.push(b'\n');
            use std::io::Write;
            // One write per record: lines from concurrent connections never interleave.
            let _ = std::io::stdout().lock().write_all(&line);
        }
    }
}
