//! Relaying a connection both ways in whole chunks, without copying through a buffer.
//!
//! `tokio::io::copy_bidirectional` moves bytes through a buffer of its own: from a
//! socket into it, then (for an HTTP/2 stream) into a fresh `Bytes` for h2, and from
//! each received DATA frame into it before the socket write. Here every side hands out
//! and takes [`Bytes`]: a socket is read straight into the chunk that h2 then frames,
//! and a received DATA frame is written to the socket from where h2 parsed it. Two
//! user-space copies of every tunnelled byte fewer per agent pair.
//!
//! Semantics are those of `copy_bidirectional`: each direction runs until its source
//! ends, then ends its sink's writing (TCP FIN, HTTP/2 END_STREAM); the relay finishes
//! when both have, or at the first error. Receive windows are handed back only as the
//! bytes are delivered, so a slow reader still slows the sender.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// A socket side's read size: what one read may take from the kernel.
pub const CHUNK: usize = 64 * 1024;
/// Below this much free room, a socket side allocates a fresh read buffer.
const MIN_ROOM: usize = 4 * 1024;

/// One end of a relay, moving bytes as [`Bytes`].
pub trait Side {
    /// The next bytes read, or `None` at the end of the stream.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>>;

    /// `n` bytes of what [`Side::poll_chunk`] gave have reached the other end: a side
    /// with flow control hands the window back now.
    fn delivered(&mut self, n: usize) {
        let _ = n;
    }

    /// Writes a prefix of `data` (at least one byte when ready), advancing it.
    fn poll_put(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>>;

    /// Ends writing: what was put is then the whole stream.
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// A byte stream (a TCP socket) as a [`Side`]: read into chunks of up to [`CHUNK`] that
/// are handed on whole.
#[derive(Debug)]
pub struct Socket<T> {
    io: T,
    /// Room for the next read: the tail of the last allocation until it runs low.
    buf: BytesMut,
}

impl<T> Socket<T> {
    /// `io` as a side of a relay.
    pub fn new(io: T) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
        }
    }

    /// The stream.
    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Side for Socket<T> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        // Read into the tail of the last buffer while it has room (a run of small
        // messages shares one allocation); the chunks handed out keep theirs alive.
        if self.buf.capacity() - self.buf.len() < MIN_ROOM {
            self.buf = BytesMut::with_capacity(CHUNK);
        }
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        Poll::Ready(Ok((n > 0).then(|| self.buf.split().freeze())))
    }

    fn poll_put(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(&mut self.io).poll_write(cx, data))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        data.advance(n);
        Poll::Ready(Ok(()))
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<S: Side + ?Sized> Side for &mut S {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        (**self).poll_chunk(cx)
    }
    fn delivered(&mut self, n: usize) {
        (**self).delivered(n)
    }
    fn poll_put(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        (**self).poll_put(cx, data)
    }
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_finish(cx)
    }
}

/// Bytes moved by [`copy_bidirectional`], each way; kept up to date as it runs, so
/// they are right also when it fails or is cancelled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
}

/// One direction's state.
#[derive(Default)]
struct Direction {
    /// Read, not yet (all) written.
    chunk: Bytes,
    read_done: bool,
    done: bool,
}

impl Direction {
    fn poll<R: Side, W: Side>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        moved: &mut u64,
    ) -> Poll<io::Result<()>> {
        while !self.done {
            if self.chunk.is_empty() {
                if self.read_done {
                    ready!(to.poll_finish(cx))?;
                    self.done = true;
                    break;
                }
                match ready!(from.poll_chunk(cx))? {
                    Some(chunk) => self.chunk = chunk,
                    None => self.read_done = true,
                }
                continue;
            }
            let before = self.chunk.len();
            ready!(to.poll_put(cx, &mut self.chunk))?;
            let n = before - self.chunk.len();
            from.delivered(n);
            *moved += n as u64;
        }
        Poll::Ready(Ok(()))
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions have ended (each ending its
/// sink's writing when its source ends), or one fails. `moved` counts as it goes.
pub async fn copy_bidirectional<A: Side, B: Side>(
    a: &mut A,
    b: &mut B,
    moved: &mut Moved,
) -> io::Result<()> {
    let (mut ab, mut ba) = (Direction::default(), Direction::default());
    poll_fn(|cx| {
        let there = ab.poll(cx, a, b, &mut moved.a_to_b)?;
        let back = ba.poll(cx, b, a, &mut moved.b_to_a)?;
        if there.is_ready() && back.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn sockets_relay_byte_exact_both_ways_with_half_close() {
        let (mut left, near_a) = tokio::io::duplex(8 * 1024);
        let (near_b, mut right) = tokio::io::duplex(8 * 1024);
        let up: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let down: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
        let relay = tokio::spawn(async move {
            let mut moved = Moved::default();
            let (mut a, mut b) = (Socket::new(near_a), Socket::new(near_b));
            copy_bidirectional(&mut a, &mut b, &mut moved)
                .await
                .unwrap();
            moved
        });
        let (up2, down2) = (up.clone(), down.clone());
        let l = tokio::spawn(async move {
            left.write_all(&up2).await.unwrap();
            left.shutdown().await.unwrap(); // half-close: the answer still comes
            let mut got = Vec::new();
            left.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, down2);
        });
        let mut got = Vec::new();
        right.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, up);
        right.write_all(&down).await.unwrap();
        right.shutdown().await.unwrap();
        l.await.unwrap();
        let moved = relay.await.unwrap();
        assert_eq!(
            moved,
            Moved {
                a_to_b: up.len() as u64,
                b_to_a: down.len() as u64
            }
        );
    }

    /// A side whose writes fail after `ok` bytes.
    struct Failing {
        ok: usize,
    }

    impl Side for Failing {
        fn poll_chunk(&mut self, _: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
            Poll::Pending
        }
        fn poll_put(&mut self, _: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
            if self.ok == 0 {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            let n = self.ok.min(data.len());
            self.ok -= n;
            data.advance(n);
            Poll::Ready(Ok(()))
        }
        fn poll_finish(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn an_error_ends_the_relay_with_what_was_moved_counted() {
        let (mut left, near) = tokio::io::duplex(64 * 1024);
        left.write_all(&[7u8; 10_000]).await.unwrap();
        let mut moved = Moved::default();
        let (mut a, mut b) = (Socket::new(near), Failing { ok: 6_000 });
        let e = copy_bidirectional(&mut a, &mut b, &mut moved)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(moved.a_to_b, 6_000);
    }
}
