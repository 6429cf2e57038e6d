//! Inbound: HBONE (mutual TLS + HTTP/2 CONNECT) on the waypoint's `:15008`.
//!
//! Each CONNECT names a service VIP and port (or an address of one): its listener says
//! what the tunnel carries. HTTP ports are served by hyper on the tunnel's bytes (HTTP/1.1
//! or HTTP/2 with prior knowledge, told apart by the HTTP/2 preface, never by sniffing
//! the application); TCP ports are forwarded to an endpoint of the listener's cluster.
//! An authority no listener answers for gets 400.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::connect::{ConnectRequest, Refusal, Tunnel};
use ambit_hbone::stream::H2Stream;
use ambit_identity::Identity;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::config::{Config, Endpoint, FrontedWorkload, ListenerKind};
use crate::identity::Certs;
use crate::proxy::{self, RequestContext};
use crate::telemetry::TcpLabels;
use crate::upstream::Upstreams;

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the inbound side needs.
#[derive(Clone, Debug)]
pub struct Inbound {
    /// The current configuration.
    pub config: watch::Receiver<Arc<Config>>,
    /// The current certificate.
    pub certs: watch::Receiver<Option<Arc<Certs>>>,
    /// Upstream connections.
    pub upstreams: Arc<Upstreams>,
    /// Istio's HTTP metrics.
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// Where request spans go, if anywhere.
    pub tracing: Option<ambit_otel::Tracing>,
    /// The buckets of the connection rate limits that select the waypoint's pods.
    pub limiter: Arc<ambit_policy::limiter::ConnLimiter>,
}

impl Inbound {
    /// Accepts HBONE connections on `listener` until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let (tcp, peer) = accept(&listener).await;
            let me = self.clone();
            tokio::spawn(async move { me.connection(tcp, peer).await });
        }
    }

    async fn connection(self, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let Some(certs) = self.certs.borrow().clone() else {
            debug!(%peer, "no certificate yet; closing");
            return;
        };
        let accept = ambit_hbone::tls_stream::accept(certs.server(), tcp);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                debug!(%peer, "TLS handshake failed: {e}");
                return;
            }
            Err(_) => return,
        };
        let identity = tls.peer_identity();
        let me = self.clone();
        let handler = move |req: ConnectRequest| {
            let me = me.clone();
            let identity = identity.clone();
            async move { me.admit(req, peer, identity) }
        };
        if let Err(e) = ambit_hbone::connect::serve(tls, handler).await {
            debug!(%peer, "HBONE connection ended: {e}");
        }
    }

    fn admit(
        &self,
        req: ConnectRequest,
        from: SocketAddr,
        peer: Option<Identity>,
    ) -> Result<WaypointTunnel, Refusal> {
        let config = self.config.borrow().clone();
        // A service VIP:port is its listener's; a fronted workload's IP:port is carried
        // to that workload at L4 (workload-addressed traffic, which its agent accepts
        // only from this waypoint); anything else is not this waypoint's to carry.
        let carry = match config.listener(req.authority) {
            Some(l) => Carry::Listener(l.clone()),
            None => match config.fronted(req.authority.ip()) {
                Some(w) => Carry::Workload(w.clone()),
                None => {
                    debug!(authority = %req.authority, "no listener or fronted workload for this authority");
                    return Err(Refusal::BadRequest);
                }
            },
        };
        // L4 policy on the waypoint's own pods: the caller's identity and its pod's IP
        // (the client agent dials from inside the client pod), the service port.
        let conn = ambit_policy::Connection {
            src_identity: peer.as_ref(),
            src_ip: from.ip(),
            dst_port: req.authority.port(),
        };
        if let Err(reason) = config.authorize(&conn) {
            warn!(
                peer = peer.as_ref().map_or("-", |p| p.as_str()),
                src = %from,
                authority = %req.authority,
                "tunnel denied: {reason}"
            );
            return Err(Refusal::Denied);
        }
        // Connection rate limits on the waypoint's own pods, per caller (its identity,
        // or its IP for plaintext), after authorization as in the node agents.
        for (policy, rate) in config.rate_limits(&conn) {
            let source = peer
                .as_ref()
                .map_or_else(|| from.ip().to_string(), ToString::to_string);
            if !self.limiter.admit(&policy, "", &source, rate) {
                warn!(
                    peer = peer.as_ref().map_or("-", |p| p.as_str()),
                    src = %from,
                    authority = %req.authority,
                    "tunnel refused: rate limited by {policy}"
                );
                return Err(Refusal::RateLimited);
            }
        }
        // A TCP port's authorization policies (network RBAC), decided now: nothing of
        // the connection's data is needed, and a refused CONNECT fails the caller's
        // connect at once.
        if let Carry::Listener(l) = &carry
            && let ListenerKind::Tcp { rbac, .. } = &l.kind
        {
            let facts = crate::filter::rbac::Facts {
                parts: None,
                peer: peer.as_ref(),
                source: req.forwarded_for.or(Some(from.ip())),
                destination: req.authority,
                metadata: &crate::filter::Metadata::default(),
            };
            for r in rbac {
                if let crate::filter::rbac::Verdict::Denied { matched } = r.check(&facts) {
                    let policy = matched.as_deref().unwrap_or("none");
                    self.metrics
                        .rbac(&l.name, r.action.as_str(), "denied", policy);
                    warn!(
                        peer = peer.as_ref().map_or("-", |p| p.as_str()),
                        authority = %req.authority,
                        "tunnel denied: rbac_access_denied_matched_policy[{policy}]"
                    );
                    return Err(Refusal::Denied);
                }
            }
        }
        let meta = req
            .baggage
            .as_deref()
            .map(ambit_hbone::baggage::PeerMetadata::parse)
            .unwrap_or_default();
        let trace = req
            .traceparent
            .as_deref()
            .and_then(ambit_otel::parse_traceparent);
        Ok(self.tunnel(carry, req.authority, peer, req.forwarded_for, &meta, trace))
    }

    fn tunnel(
        &self,
        carry: Carry,
        authority: SocketAddr,
        peer: Option<Identity>,
        client: Option<std::net::IpAddr>,
        meta: &ambit_hbone::baggage::PeerMetadata,
        trace: Option<ambit_otel::SpanContext>,
    ) -> WaypointTunnel {
        let name = match &carry {
            Carry::Listener(l) => l.name.clone(),
            Carry::Workload(w) => format!("{}/{}", w.namespace, w.name),
        };
        WaypointTunnel {
            carry,
            authority,
            meta: meta.clone(),
            ctx: Arc::new(RequestContext {
                config: self.config.clone(),
                upstreams: self.upstreams.clone(),
                authority,
                series: crate::telemetry::TunnelSeries::new(
                    crate::telemetry::RequestLabels::tunnel(peer.as_ref(), &name, meta),
                ),
                listener: name,
                peer,
                client,
                metrics: self.metrics.clone(),
                tracing: self.tracing.clone(),
                tunnel_trace: trace,
            }),
        }
    }

    /// For benchmarks and debugging only, never in a deployment: serves on `listener`, in
    /// plaintext, what an HBONE tunnel to `authority` (a service VIP:port) would carry —
    /// without mutual TLS, so without the caller's identity and without the waypoint's L4
    /// policy. It lets a load generator or a person with curl reach the L7 proxy alone,
    /// as they reach a stock Envoy's plain HTTP listener.
    pub async fn serve_plaintext(self, listener: TcpListener, authority: SocketAddr) {
        loop {
            let (tcp, peer) = accept(&listener).await;
            let _ = tcp.set_nodelay(true);
            let config = self.config.borrow().clone();
            let Some(l) = config.listener(authority) else {
                debug!(%authority, "plaintext listener: no listener for this authority");
                continue;
            };
            let tunnel = self.tunnel(
                Carry::Listener(l.clone()),
                authority,
                None,
                Some(peer.ip()),
                &Default::default(),
                None,
            );
            tokio::spawn(tunnel.serve(tcp));
        }
    }
}

/// The next connection on `listener`. Accept errors (typically EMFILE) are logged and
/// waited out instead of spun on.
pub async fn accept(listener: &TcpListener) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(c) => return c,
            Err(e) => {
                warn!(addr = ?listener.local_addr().ok(), "accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What a tunnel carries.
enum Carry {
    /// A service port: HTTP routed, or TCP to an endpoint of the listener's cluster.
    Listener(Arc<crate::config::Listener>),
    /// Workload-addressed: the bytes to the CONNECT's IP:port.
    Workload(Arc<FrontedWorkload>),
}

/// One accepted CONNECT.
pub struct WaypointTunnel {
    carry: Carry,
    authority: SocketAddr,
    meta: ambit_hbone::baggage::PeerMetadata,
    ctx: Arc<RequestContext>,
}

impl Tunnel for WaypointTunnel {
    async fn run(self, stream: H2Stream) {
        // HTTP's own framing says whether a response was whole; the tunnel is ended, not
        // reset, when hyper lets go of it.
        self.serve(Finishing(stream)).await
    }
}

impl WaypointTunnel {
    /// Serves the listener's protocol on `io`.
    async fn serve<S>(self, io: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let kind = match self.carry {
            Carry::Listener(l) => l.kind.clone(),
            Carry::Workload(w) => {
                let ep = Endpoint {
                    addr: self.authority,
                    hbone: w.hbone.clone(),
                    weight: 1,
                    workload: None,
                };
                let labels = TcpLabels::of(
                    &self.ctx,
                    &self.meta,
                    "unknown",
                    Some((&w.namespace, &w.name)),
                    &ep,
                );
                return forward(&self.ctx, &ep, None, WORKLOAD_CONNECT_TIMEOUT, labels, io)
                    .await
                    .unwrap_or_else(
                        |e| debug!(authority = %self.authority, "workload-addressed tunnel: {e}"),
                    );
            }
        };
        match kind {
            ListenerKind::Http { .. } => {
                let ctx = self.ctx;
                // Boxed: a request's future is ~3 KB (routing, retries, the upstream
                // exchange; ~8 KB before new upstream connections were boxed), and
                // hyper's HTTP/2 server spawns a task per stream, which moved it into the
                // task and again out of it: the profile showed those copies at 8% of the
                // waypoint's CPU under HTTP/2 load.
                let service = hyper::service::service_fn(move |req| {
                    Box::pin(proxy::handle(ctx.clone(), req))
                });
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .max_buf_size(64 * 1024)
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30));
                builder.http2().max_header_list_size(64 * 1024);
                if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
                    debug!("HTTP on a tunnel ended: {e}");
                }
            }
            ListenerKind::Tcp { cluster, .. } => tcp(&self.ctx, &self.meta, &cluster, io).await,
        }
    }
}

/// How long a workload-addressed tunnel's upstream connection may take (Envoy's default
/// cluster connect timeout).
const WORKLOAD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Carries `stream` to `ep`, counted in Istio's TCP metrics.
async fn forward<S>(
    ctx: &RequestContext,
    ep: &Endpoint,
    service: Option<&str>,
    connect_timeout: Duration,
    labels: TcpLabels,
    mut stream: S,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut up = ctx
        .upstreams
        .dial(
            ep,
            ctx.client,
            service,
            connect_timeout,
            ctx.tunnel_trace
                .as_ref()
                .map(ambit_otel::traceparent)
                .as_deref(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let _guard = ctx.upstreams.start(ep.addr);
    let m = &ctx.metrics;
    m.tcp_opened.get_or_create(&labels).inc();
    // Counted as read, so that a connection ended by a reset still reports its bytes.
    let (mut down, mut up) = (ReadCount::new(&mut stream), ReadCount::new(&mut up));
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        debug!(upstream = %ep.addr, "TCP tunnel ended: {e}");
    }
    m.tcp_closed.get_or_create(&labels).inc();
    m.tcp_sent.get_or_create(&labels).inc_by(down.count);
    m.tcp_received.get_or_create(&labels).inc_by(up.count);
    Ok(())
}

/// A stream counting the bytes read from it.
struct ReadCount<S> {
    inner: S,
    count: u64,
}

impl<S> ReadCount<S> {
    fn new(inner: S) -> Self {
        Self { inner, count: 0 }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ReadCount<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.count += (buf.filled().len() - before) as u64;
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ReadCount<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TCP port: the bytes go to one endpoint of the cluster (another if the first
/// cannot be reached).
async fn tcp<S>(
    ctx: &RequestContext,
    meta: &ambit_hbone::baggage::PeerMetadata,
    cluster: &str,
    mut stream: S,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let config = ctx.config.borrow().clone();
    let Some((c, eps)) = config.cluster(cluster) else {
        debug!(cluster, "TCP listener without its cluster");
        return;
    };
    let service = ctx.listener.rsplit_once(':').map_or("unknown", |(h, _)| h);
    // The cluster's max_connections: over it, the connection is refused (Envoy's
    // tcp_proxy closes it, `UO`).
    let Some(_open) = c.load.open_connection(c.limits.max_connections) else {
        ctx.metrics
            .overflow(cluster, crate::config::Overflow::Connections);
        debug!(cluster, "TCP connection refused: max_connections");
        return;
    };
    let mut tried = Vec::new();
    for _ in 0..2 {
        let Some(ep) = ctx.upstreams.choose(c, &eps, &tried) else {
            return;
        };
        tried.push(ep.addr);
        let workload = ep
            .workload
            .as_deref()
            .map(|w| (w.namespace.as_str(), w.name.as_str()));
        let labels = TcpLabels::of(ctx, meta, service, workload, &ep);
        match forward(
            ctx,
            &ep,
            c.service_host(),
            c.connect_timeout,
            labels,
            &mut stream,
        )
        .await
        {
            Ok(()) => return,
            Err(e) => {
                debug!(endpoint = %ep.addr, "TCP upstream: {e}");
                ctx.upstreams.failed(ep.addr);
            }
        }
    }
}

/// The tunnel under an HTTP connection: when hyper lets go of it (even without shutting
/// it down, as after answering a malformed request with 400), the stream is ended, not
/// reset, so the answer it queued is delivered. HTTP's own framing says whether a
/// response was whole.
struct Finishing(H2Stream);

impl Drop for Finishing {
    fn drop(&mut self) {
        let _ = self.0.finish();
    }
}

impl tokio::io::AsyncRead for Finishing {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Finishing {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
