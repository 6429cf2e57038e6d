//! HTTP/2 CONNECT tunnels, as HBONE carries them inside mutual TLS.
//!
//! Client: `CONNECT` with `:authority` = `ip:port` of the original destination and the
//! headers `forwarded: for=<source ip>` and `traceparent`; a 200 means the far side
//! reached the application, and the stream is then the connection's bytes.
//!
//! Server: anything but `CONNECT` gets 400; an `:authority` that is not `ip:port` gets
//! 400; the handler decides the rest: it returns the connection to the application
//! (then 200), or a [`Refusal`]: 401 for a policy denial, 503 when the application is
//! unreachable. Requests with header blocks over [`MAX_HEADER_LIST`] are refused by h2.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use crate::stream::{H2Stream, Job, Runner};

/// Per-stream receive window: enough for a few milliseconds of a fast stream in flight.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection receive window, shared by its streams.
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME: u32 = 256 * 1024;
/// Largest header block a server accepts (HBONE requests are a few hundred bytes).
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Streams per connection a server allows; a client opens another connection beyond it.
pub const MAX_STREAMS: u32 = 100;
/// How often an idle client connection checks its peer is alive, and how long it waits.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a keepalive PING may go unanswered.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a client retries a stream the server refused unprocessed.
const REFUSED_RETRIES: usize = 5;

/// Why a tunnel was not set up.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// The HTTP/2 connection or stream failed.
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    /// The peer denied the tunnel by policy (401).
    #[error("refused by policy (401)")]
    Denied,
    /// The peer could not reach the application (503).
    #[error("the destination is unreachable (503)")]
    Unreachable,
    /// Any other answer.
    #[error("the peer answered {0}")]
    Status(StatusCode),
    /// The request could not be built.
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
    /// I/O under the tunnel.
    #[error("tunnel: {0}")]
    Io(#[from] std::io::Error),
}

/// What a CONNECT asked for.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// The original destination.
    pub authority: SocketAddr,
    /// `forwarded: for=...`: the source workload's IP.
    pub forwarded_for: Option<IpAddr>,
    /// `forwarded: ...;host=...`: the service the client dialed (its host name), as
    /// ztunnel sends it; a claim, to be checked against the destination's services.
    pub forwarded_host: Option<String>,
    /// The W3C trace context the client sent.
    pub traceparent: Option<String>,
    /// The client's `baggage` (peer metadata for telemetry; see [`crate::baggage`]), if
    /// it sent one no longer than [`crate::baggage::MAX_LEN`].
    pub baggage: Option<String>,
}

/// What a CONNECT carries besides its authority.
#[derive(Clone, Copy, Debug)]
pub struct ConnectHeaders<'a> {
    /// The source workload's IP (`forwarded: for=`).
    pub source: IpAddr,
    /// The W3C trace context.
    pub traceparent: &'a str,
    /// Peer metadata ([`crate::baggage::PeerMetadata::to_header`]), if any.
    pub baggage: Option<&'a str>,
    /// The service host name the client dialed, if it dialed one (`forwarded: host=`).
    pub host: Option<&'a str>,
}

impl ConnectRequest {
    /// Reads a request head as the server receives it: only `CONNECT` with an
    /// `ip:port` authority is an HBONE request (anything else is a 400).
    pub fn from_head(
        method: &Method,
        uri: &http::Uri,
        headers: &http::HeaderMap,
    ) -> Result<Self, Refusal> {
        if method != Method::CONNECT {
            return Err(Refusal::BadRequest);
        }
        let authority = uri
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
            .ok_or(Refusal::BadRequest)?;
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
        Ok(Self {
            authority,
            forwarded_for: header("forwarded").and_then(parse_forwarded),
            forwarded_host: header("forwarded").and_then(parse_forwarded_host),
            traceparent: header("traceparent").map(str::to_owned),
            baggage: header("baggage")
                .filter(|b| b.len() <= crate::baggage::MAX_LEN)
                .map(str::to_owned),
        })
    }
}

/// Why the server refuses a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 401: authorization denied it.
    Denied,
    /// 503: the application could not be reached.
    Unreachable,
    /// 400: it names something this server does not serve.
    BadRequest,
    /// 429: a connection rate limit has no room for the caller now.
    RateLimited,
}

/// The client half of one HBONE connection. Cheap to clone; every clone opens streams on
/// the same connection.
#[derive(Clone, Debug)]
pub struct HboneClient {
    send: h2::client::SendRequest<Bytes>,
    /// Set when the connection has ended (closed, failed, or missed a keepalive).
    closed: Arc<AtomicBool>,
    /// Runs work in the connection's task (each stream carries it).
    runner: Runner,
}

impl HboneClient {
    /// Speaks HTTP/2 over `io` (a TLS stream with ALPN h2). The connection is driven by a
    /// task on the current runtime until it closes.
    pub async fn handshake<IO>(io: IO) -> Result<Self, HboneError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let (runner, jobs) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(drive_client(conn, closed.clone(), jobs));
        Ok(Self {
            send,
            closed,
            runner: Runner(runner),
        })
    }

    /// Opens a tunnel to `authority` for `source`.
    pub async fn connect(
        &self,
        authority: SocketAddr,
        source: IpAddr,
        traceparent: &str,
    ) -> Result<H2Stream, HboneError> {
        let headers = ConnectHeaders {
            source,
            traceparent,
            baggage: None,
            host: None,
        };
        self.connect_with(authority, &headers).await
    }

    /// Opens a tunnel to `authority` with these headers.
    pub async fn connect_with(
        &self,
        authority: SocketAddr,
        headers: &ConnectHeaders<'_>,
    ) -> Result<H2Stream, HboneError> {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.to_string())
            .header("forwarded", forwarded(headers.source, headers.host))
            .header("traceparent", headers.traceparent);
        if let Some(b) = headers.baggage {
            req = req.header("baggage", b);
        }
        let req = req.body(())?;
        // REFUSED_STREAM means the server did not process the stream (RFC 9113 §8.7), e.g.
        // one opened before its SETTINGS lowered the stream limit: safe to retry.
        let mut attempts = 0;
        let (response, stream) = loop {
            let mut send = self.send.clone().ready().await?;
            let (response, stream) = send.send_request(req.clone(), false)?;
            match response.await {
                Ok(r) => break (r, stream),
                Err(e)
                    if e.reason() == Some(h2::Reason::REFUSED_STREAM)
                        && attempts < REFUSED_RETRIES =>
                {
                    attempts += 1
                }
                Err(e) => return Err(e.into()),
            }
        };
        match response.status() {
            StatusCode::OK => {
                Ok(H2Stream::new(stream, response.into_body()).with_runner(self.runner.clone()))
            }
            StatusCode::UNAUTHORIZED => Err(HboneError::Denied),
            StatusCode::SERVICE_UNAVAILABLE => Err(HboneError::Unreachable),
            s => Err(HboneError::Status(s)),
        }
    }

    /// True once the connection is gone: it cannot carry new tunnels.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Runs a client connection, sending a PING every [`KEEPALIVE_INTERVAL`]; a peer that
/// does not answer within [`KEEPALIVE_TIMEOUT`] is given up on (a dead node or a silent
/// middlebox must not keep tunnels waiting forever). The [`Job`]s its streams' users
/// hand it ([`Runner`]) run here too, so they share the connection's task, as the
/// server's tunnels do ([`serve`]); once the connection has ended they run until they
/// have seen that.
async fn drive_client<IO>(
    mut conn: h2::client::Connection<IO, Bytes>,
    closed: Arc<AtomicBool>,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<Job>,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut ping = conn.ping_pong();
    let mut tick = keepalive_ticks();
    // While a PING is unanswered: when it is given up on.
    let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut running = FuturesUnordered::new();
    let mut taking = true;
    crate::task::coalesced(|cx| {
        // As in `serve`: the connection, then the jobs (whose writes queue frames),
        // then the connection again to send them.
        for pass in 0..2 {
            if let Poll::Ready(r) = Pin::new(&mut conn).poll(cx) {
                if let Err(e) = r {
                    debug!("HBONE client connection ended: {e}");
                }
                return Poll::Ready(());
            }
            if pass == 1 {
                break;
            }
            while taking {
                match jobs.poll_recv(cx) {
                    Poll::Ready(Some(job)) => running.push(job),
                    Poll::Ready(None) => taking = false,
                    Poll::Pending => break,
                }
            }
            while let Poll::Ready(Some(())) = running.poll_next_unpin(cx) {}
            let Some(p) = ping.as_mut() else { continue };
            if deadline.is_none() && tick.poll_tick(cx).is_ready() {
                if p.send_ping(h2::Ping::opaque()).is_err() {
                    return Poll::Ready(());
                }
                deadline = Some(Box::pin(tokio::time::sleep(KEEPALIVE_TIMEOUT)));
            }
            if let Some(d) = deadline.as_mut() {
                match p.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => deadline = None,
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending if d.as_mut().poll(cx).is_ready() => {
                        warn!("HBONE peer missed a keepalive; closing the connection");
                        return Poll::Ready(());
                    }
                    Poll::Pending => {}
                }
            }
        }
        Poll::Pending
    })
    .await;
    closed.store(true, Ordering::Release);
    // Dropping the connection ends its streams with an error; a job sent from now on
    // comes back to its sender. Those already here run until they have seen the end.
    drop(ping);
    drop(conn);
    jobs.close();
    while let Ok(job) = jobs.try_recv() {
        running.push(job);
    }
    while running.next().await.is_some() {}
}

/// When a client connection sends its PINGs: every [`KEEPALIVE_INTERVAL`], the first one
/// interval after connecting. (Not `interval()`, whose first tick is immediate: awaiting
/// it before driving the connection held every new connection's first request until
/// the timer wheel's next slot, ~1 ms, the most of a new tunnel's time.)
fn keepalive_ticks() -> tokio::time::Interval {
    tokio::time::interval_at(
        tokio::time::Instant::now() + KEEPALIVE_INTERVAL,
        KEEPALIVE_INTERVAL,
    )
}

/// RFC 7239 quotes IPv6 addresses: `for="[::1]"`.
fn forwarded_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("\"[{a}]\""),
    }
}

/// A `forwarded` header value: `for=<source>`, and `;host=<host>` when the client
/// dialed a service (a host name that is not an RFC 7230 token is left out).
fn forwarded(source: IpAddr, host: Option<&str>) -> String {
    let for_ = forwarded_ip(source);
    match host.filter(|h| is_host_name(h)) {
        Some(h) => format!("for={for_};host={h}"),
        None => format!("for={for_}"),
    }
}

/// A DNS name (letters, digits, `-`, `.`), at most 253 bytes: safe as a bare token.
fn is_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The first value of parameter `param` (any case) among `pairs` (`name=value` pieces),
/// unquoted.
fn forwarded_param<'a>(mut pairs: impl Iterator<Item = &'a str>, param: &str) -> Option<&'a str> {
    let value = pairs.find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case(param)
            .then_some(value.trim())
    })?;
    Some(
        value
            .strip_prefix('"')
            .and_then(|n| n.strip_suffix('"'))
            .unwrap_or(value),
    )
}

/// The `host=` of a `forwarded` header's first element, quoted or not, if it is a DNS
/// name (lowercased).
pub fn parse_forwarded_host(v: &str) -> Option<String> {
    let value = forwarded_param(v.split(',').next()?.split(';'), "host")?;
    is_host_name(value).then(|| value.to_ascii_lowercase())
}

/// The first `for=` address of a `forwarded` header (RFC 7239): the parameter name in
/// any case, the node bare (`10.0.0.1`) or quoted, with or without a port
/// (`"10.0.0.1:4711"`, `"[fd00::1]"`, `"[fd00::1]:4711"`). Obfuscated and `unknown`
/// nodes give `None`.
pub fn parse_forwarded(v: &str) -> Option<IpAddr> {
    let node = forwarded_param(v.split([';', ',']), "for")?;
    if let Some(rest) = node.strip_prefix('[') {
        let (ip, port) = rest.split_once(']')?;
        return match port {
            "" => ip.parse().ok(),
            p if p
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok()) =>
            {
                ip.parse().ok()
            }
            _ => None,
        };
    }
    match node.split_once(':') {
        Some((ip, port)) if port.parse::<u16>().is_ok() => ip.parse().ok(),
        _ => node.parse().ok(),
    }
}

/// What a server does with an accepted tunnel once it has answered 200: typically copy
/// bytes between the tunnel and the application ([`Pipe`]).
pub trait Tunnel: Send + 'static {
    /// Runs the tunnel to its end.
    fn run(self, stream: H2Stream) -> impl Future<Output = ()> + Send;
}

/// The plain [`Tunnel`]: copies bytes both ways between the tunnel and `S` until both
/// sides have ended.
#[derive(Debug)]
pub struct Pipe<S>(pub S);

impl<S> Tunnel for Pipe<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn run(self, mut stream: H2Stream) {
        let mut app = crate::copy::Socket::new(self.0);
        let mut moved = crate::copy::Moved::default();
        if let Err(e) = crate::copy::copy_bidirectional(&mut stream, &mut app, &mut moved).await {
            debug!("HBONE tunnel ended: {e}");
        }
    }
}

/// Serves HBONE on `io` until the connection and all its tunnels have ended.
///
/// Each CONNECT's `handler` reaches the application (or refuses); after the 200 its
/// [`Tunnel`] runs. Tunnels run *in this connection's task*, not each in its own: the
/// bytes of a stream then move between its socket and the TLS connection without a hop
/// between tasks (with a multi-threaded runtime, often a wake-up of another thread per
/// write: one worker against two cut both agents' CPU per GB by a fifth in
/// `cargo xtask bench hbone`). One connection's tunnels therefore share one core at a
/// time, as an Envoy worker's do.
pub async fn serve<IO, H, F, U>(io: IO, handler: H) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(ConnectRequest) -> F + Clone + Send + 'static,
    F: Future<Output = Result<U, Refusal>> + Send + 'static,
    U: Tunnel,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_STREAMS)
        .handshake(io)
        .await?;
    let mut tunnels = FuturesUnordered::new();
    let ended = crate::task::coalesced(|cx| {
        // Drive the connection (reading frames hands DATA to the tunnels), run the
        // tunnels (their writes queue frames), then drive it again to send those: one
        // wake-up moves a write through. What remains is woken by its own socket.
        for pass in 0..2 {
            loop {
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
                        let handler = handler.clone();
                        tunnels.push(async move {
                            if let Err(e) = tunnel(req, respond, handler).await {
                                debug!("HBONE stream ended: {e}");
                            }
                        });
                    }
                    // One bad stream; the rest go on.
                    Poll::Ready(Some(Err(e))) if e.is_reset() => {}
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            if pass == 0 {
                while let Poll::Ready(Some(())) = tunnels.poll_next_unpin(cx) {}
            }
        }
        Poll::Pending
    })
    .await;
    // The connection is gone (dropping it ends its streams with an error): let each
    // tunnel see that and finish (close its socket, report) before returning.
    drop(conn);
    while tunnels.next().await.is_some() {}
    ended.map_err(HboneError::from)
}

async fn tunnel<H, F, U>(
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    handler: H,
) -> Result<(), HboneError>
where
    H: Fn(ConnectRequest) -> F,
    F: Future<Output = Result<U, Refusal>>,
    U: Tunnel,
{
    let status = |code| {
        Response::builder()
            .status(code)
            .body(())
            .expect("static response")
    };
    let request = match ConnectRequest::from_head(req.method(), req.uri(), req.headers()) {
        Ok(r) => r,
        Err(_) => {
            respond.send_response(status(StatusCode::BAD_REQUEST), true)?;
            return Ok(());
        }
    };
    match handler(request).await {
        Ok(tunnel) => {
            let send = respond.send_response(status(StatusCode::OK), false)?;
            tunnel.run(H2Stream::new(send, req.into_body())).await;
            Ok(())
        }
        Err(r) => {
            let code = match r {
                Refusal::Denied => StatusCode::UNAUTHORIZED,
                Refusal::Unreachable => StatusCode::SERVICE_UNAVAILABLE,
                Refusal::BadRequest => StatusCode::BAD_REQUEST,
                Refusal::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            };
            respond.send_response(status(code), true)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new connection is driven at once: its keepalive timer has nothing due before
    /// the first interval has passed (virtual time, so exact).
    #[tokio::test(start_paused = true)]
    async fn the_first_keepalive_is_one_interval_after_connecting() {
        let start = tokio::time::Instant::now();
        let mut ticks = keepalive_ticks();
        ticks.tick().await;
        assert_eq!(start.elapsed(), KEEPALIVE_INTERVAL);
        ticks.tick().await;
        assert_eq!(start.elapsed(), 2 * KEEPALIVE_INTERVAL);
    }

    #[test]
    fn forwarded_round_trips() {
        for ip in ["10.244.1.10", "fd00:10:244:1::a"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(
                parse_forwarded(&format!("for={}", forwarded_ip(ip))),
                Some(ip)
            );
        }
        assert_eq!(
            parse_forwarded("proto=https;for=10.0.0.1"),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(parse_forwarded("by=x"), None);
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // RFC 7239 section 4 and 6: any case, quoted, with ports, in a list.
        assert_eq!(parse_forwarded("For=\"10.0.0.1:4711\""), ip("10.0.0.1"));
        assert_eq!(parse_forwarded("for=\"[fd00::1]:4711\""), ip("fd00::1"));
        assert_eq!(parse_forwarded("for=unknown, for=10.0.0.2"), None);
        assert_eq!(parse_forwarded("for=_hidden;proto=http"), None);
        assert_eq!(parse_forwarded("for=\"[fd00::1]x\""), None);
        // ztunnel's form: the quoted node with a port, then the service host name.
        let zt = "for=\"10.244.1.10:41234\";host=reviews.shop.svc.cluster.local";
        assert_eq!(parse_forwarded(zt), ip("10.244.1.10"));
        assert_eq!(
            parse_forwarded_host(zt).as_deref(),
            Some("reviews.shop.svc.cluster.local")
        );
        assert_eq!(
            parse_forwarded_host("for=10.0.0.1;Host=\"Web.X\"").as_deref(),
            Some("web.x")
        );
        for bad in [
            "for=10.0.0.1",
            "for=1.2.3.4;host=a/b",
            "for=1.2.3.4;host=",
            "for=1.2.3.4, for=5.6.7.8;host=x",
        ] {
            assert_eq!(parse_forwarded_host(bad), None, "{bad}");
        }
        // What we send parses back.
        let v = forwarded(
            "10.0.0.9".parse().unwrap(),
            Some("web.shop.svc.cluster.local"),
        );
        assert_eq!(v, "for=10.0.0.9;host=web.shop.svc.cluster.local");
        assert_eq!(
            forwarded("10.0.0.9".parse().unwrap(), Some("bad host")),
            "for=10.0.0.9"
        );
    }
}
