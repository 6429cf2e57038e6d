//! Request and response bodies.
//!
//! A request whose route may retry is read into memory up to [`RETRY_BUFFER`] bytes
//! ([`buffer`]): if it ends within the limit, each attempt replays it; if not, the
//! request is sent once, the buffered part followed by the rest as it arrives, and is
//! never retried (Envoy does the same past its buffer limit). Everything else streams.

use std::collections::VecDeque;
use std::pin::Pin;
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

/// A streamed body.
pub fn stream(b: Incoming) -> ProxyBody {
    b.map_err(BoxError::from).boxed()
}

/// A request body, as read for retries.
pub enum Buffered {
    /// Wholly in memory: replayable.
    Whole(Vec<Frame<Bytes>>),
    /// Over the limit: what was read, and the rest. Sent once.
    Partial(Vec<Frame<Bytes>>, Incoming),
}

/// Reads `body` until it ends or more than `limit` bytes have arrived.
pub async fn buffer(mut body: Incoming, limit: usize) -> Result<Buffered, hyper::Error> {
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
    rest: Option<Incoming>,
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
    pub fn then(frames: Vec<Frame<Bytes>>, rest: Incoming) -> Self {
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
