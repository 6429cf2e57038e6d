//! Request and response bodies.
//!
//! A request whose route may retry is read into memory up to [`RETRY_BUFFER`] bytes
//! ([`buffer`]): if it ends within the limit, each attempt replays it; if not, the
//! request is sent once, the buffered part followed by the rest as it arrives, and is
//! never retried (Envoy does the same past its buffer limit). Everything else streams;
//! a mirrored request's copy is fed from the original as it is read ([`Tee`]).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// Errors of any body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends.
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// How much of a request body is held to make it retryable.
pub const RETRY_BUFFER: usize = 1024 * 1024;

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(b.into())
        .map_err(|e| match e {})
        .boxed()
}

/// A short plain-text answer (Envoy's local replies).
pub fn text(status: http::StatusCode, body: &'static str) -> http::Response<ProxyBody> {
    let mut r = http::Response::new(full(body));
    *r.status_mut() = status;
    if !body.is_empty() {
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
    }
    r
}

/// A streamed body.
pub fn stream(b: Incoming) -> ProxyBody {
    b.map_err(BoxError::from).boxed()
}

/// A request body as it arrives, counting its bytes into a counter the request's report
/// reads when the response ends.
pub struct Counted {
    inner: Incoming,
    bytes: Arc<AtomicU64>,
}

impl Counted {
    /// `inner`, counted into `bytes`.
    pub fn new(inner: Incoming, bytes: Arc<AtomicU64>) -> Self {
        Self { inner, bytes }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled
            && let Some(d) = f.data_ref()
        {
            self.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body, as read for retries.
pub enum Buffered {
    /// Wholly in memory: replayable.
    Whole(Vec<Frame<Bytes>>),
    /// Over the limit: what was read, and the rest. Sent once.
    Partial(Vec<Frame<Bytes>>, Counted),
}

/// Reads `body` until it ends or more than `limit` bytes have arrived.
pub async fn buffer(mut body: Counted, limit: usize) -> Result<Buffered, hyper::Error> {
    let mut frames = Vec::new();
    let mut size = 0;
    while let Some(f) = body.frame().await {
        let f = f?;
        if let Some(d) = f.data_ref() {
            size += d.len();
        }
        frames.push(f);
        if size > limit {
            return Ok(Buffered::Partial(frames, body));
        }
    }
    Ok(Buffered::Whole(frames))
}

fn copy(f: &Frame<Bytes>) -> Frame<Bytes> {
    match f.data_ref() {
        Some(d) => Frame::data(d.clone()),
        None => Frame::trailers(f.trailers_ref().cloned().unwrap_or_default()),
    }
}

/// A body made of buffered frames, then (maybe) the rest of a streamed one.
pub struct Replay {
    frames: VecDeque<Frame<Bytes>>,
    rest: Option<Counted>,
    remaining: u64,
}

impl Replay {
    /// A replay of `frames` (cloned; the bytes are shared).
    pub fn of(frames: &[Frame<Bytes>]) -> Self {
        let remaining = frames
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        Self {
            frames: frames.iter().map(copy).collect(),
            rest: None,
            remaining,
        }
    }

    /// The buffered frames followed by `rest`.
    pub fn then(frames: Vec<Frame<Bytes>>, rest: Counted) -> Self {
        Self {
            frames: frames.into(),
            rest: Some(rest),
            remaining: 0,
        }
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        match self.rest.as_mut() {
            None => Poll::Ready(None),
            Some(rest) => Pin::new(rest)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(BoxError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.rest {
            None => SizeHint::with_exact(self.remaining),
            Some(_) => SizeHint::default(),
        }
    }
}

/// How many frames a mirror's copy of a streamed body may fall behind the original
/// before the copy is given up (the original never waits for a mirror).
pub const MIRROR_LAG: usize = 64;

/// What a mirror's copy of a body receives.
enum Copied {
    Frame(Frame<Bytes>),
    End,
}

/// A request body that hands a copy of every frame to mirrors as the upstream reads it.
/// A mirror that falls [`MIRROR_LAG`] frames behind loses its copy (its request is
/// reset): the original is never slowed down by a mirror.
pub struct Tee<B> {
    inner: B,
    copies: Vec<tokio::sync::mpsc::Sender<Copied>>,
}

impl<B: Body<Data = Bytes> + Unpin> Tee<B> {
    /// `inner`, and `mirrors` bodies that copy it.
    pub fn new(inner: B, mirrors: usize) -> (Self, Vec<Mirrored>) {
        let (copies, bodies) = (0..mirrors)
            .map(|_| {
                let (tx, rx) = tokio::sync::mpsc::channel(MIRROR_LAG);
                (tx, Mirrored { rx, ended: false })
            })
            .unzip();
        let mut tee = Self { inner, copies };
        // A sender asks whether a body is over before reading it, and after each frame.
        tee.end_if_over();
        (tee, bodies)
    }

    fn end_if_over(&mut self) {
        if self.inner.is_end_stream() {
            for tx in self.copies.drain(..) {
                let _ = tx.try_send(Copied::End);
            }
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tee<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                self.copies
                    .retain(|tx| tx.try_send(Copied::Frame(copy(f))).is_ok());
                self.end_if_over();
            }
            Poll::Ready(None) => {
                for tx in self.copies.drain(..) {
                    let _ = tx.try_send(Copied::End);
                }
            }
            // Copies that never see their end fail.
            Poll::Ready(Some(Err(_))) => self.copies.clear(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A mirror's copy of a request body, from a [`Tee`]: it fails if the original failed,
/// or if the copy fell behind.
pub struct Mirrored {
    rx: tokio::sync::mpsc::Receiver<Copied>,
    ended: bool,
}

impl Body for Mirrored {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Copied::Frame(f))) => Poll::Ready(Some(Ok(f))),
            Poll::Ready(Some(Copied::End)) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some(Err(
                    "the mirrored request's body fell behind or failed".into(),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// How a response body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Its last byte was sent.
    Complete,
    /// The upstream failed mid-body.
    UpstreamFailed,
    /// Dropped unfinished: the client went away.
    Abandoned,
}

/// What a response's end reports: its body's size and, for gRPC, the status its
/// trailers carried. Called exactly once: at the end, on an error, or when the body is
/// dropped unfinished.
pub trait OnEnd: Send + 'static {
    /// `bytes`: the body's size as sent; `grpc_status` from the trailers.
    fn end(self, bytes: u64, grpc_status: Option<u32>, end: End);
}

/// A response body that reports its end.
pub struct Reported<R: OnEnd> {
    inner: ProxyBody,
    bytes: u64,
    grpc_status: Option<u32>,
    report: Option<R>,
}

impl<R: OnEnd> Reported<R> {
    /// `inner`, reporting to `report`.
    pub fn new(inner: ProxyBody, report: R) -> Self {
        let mut r = Self {
            inner,
            bytes: 0,
            grpc_status: None,
            report: Some(report),
        };
        // An empty body is never polled: it is done as soon as it exists.
        if r.inner.is_end_stream() {
            r.finish(End::Complete);
        }
        r
    }

    fn finish(&mut self, end: End) {
        if let Some(r) = self.report.take() {
            r.end(self.bytes, self.grpc_status, end);
        }
    }
}

impl<R: OnEnd> Drop for Reported<R> {
    fn drop(&mut self) {
        self.finish(End::Abandoned);
    }
}

// Nothing in it is pinned structurally: the inner body is a `Box`.
impl<R: OnEnd> Unpin for Reported<R> {}

impl<R: OnEnd> Body for Reported<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                } else if let Some(t) = f.trailers_ref() {
                    self.grpc_status = grpc_status(t);
                }
                // A body that says it is done may never be polled again.
                if self.inner.is_end_stream() {
                    self.finish(End::Complete);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(End::UpstreamFailed),
            Poll::Ready(None) => self.finish(End::Complete),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The `grpc-status` of a header map (trailers, or a trailers-only response's headers).
pub fn grpc_status(h: &http::HeaderMap) -> Option<u32> {
    h.get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
