//! A socket read in large chunks, for TLS to read from.
//!
//! rustls asks its transport for at most 4 KiB per read (its deframer grows by 4 KiB at
//! a time), so a TLS stream over a bare socket makes four or five `recvfrom` calls per
//! 16 KiB record: at 5 Gbit/s that would be ~150,000 reads per second on the receiving
//! agent, each taking the socket lock and perhaps sending an ACK. [`ReadAhead`] reads what the
//! socket has (up to [`CHUNK`]) in one call and serves rustls's small reads from it,
//! one cheap in-cache copy instead of a syscall each. The buffer is allocated when a
//! read needs it and freed when the socket runs dry, so an idle connection holds none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes taken from the socket per read.
pub const CHUNK: usize = 64 * 1024;

/// `inner`, read ahead in chunks of up to [`CHUNK`]; writes pass straight through.
#[derive(Debug)]
pub struct ReadAhead<T> {
    inner: T,
    /// Read from `inner`, not yet handed on. Empty (no allocation) when idle.
    buf: BytesMut,
}

impl<T> ReadAhead<T> {
    /// Reads `inner` ahead.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
        }
    }

    /// The transport.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// How many bytes were read from the transport and not yet handed on.
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes of buffer held (0 when the last read found the socket empty).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            if out.remaining() >= CHUNK {
                // A large read gains nothing from the buffer.
                this.buf = BytesMut::new();
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buf.reserve(CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Dry: hold no memory while the connection waits.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
            }
            if this.buf.is_empty() {
                this.buf = BytesMut::new();
                return Poll::Ready(Ok(())); // EOF
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the reads that reach the transport.
    struct Counted<T> {
        inner: T,
        reads: usize,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let r = Pin::new(&mut self.inner).poll_read(cx, buf);
            if r.is_ready() {
                self.reads += 1;
            }
            r
        }
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read_byte_exact_and_idle_holds_nothing() {
        let (mut far, near) = tokio::io::duplex(4 * CHUNK);
        let data: Vec<u8> = (0..3 * CHUNK + 123).map(|i| (i * 7 % 251) as u8).collect();
        far.write_all(&data).await.unwrap();
        let mut r = ReadAhead::new(Counted {
            inner: near,
            reads: 0,
        });
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        while got.len() < data.len() {
            let n = r.read(&mut small).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, data);
        // 3 full chunks and the rest: 4 reads of the transport for 193 small reads.
        assert_eq!(r.get_ref().reads, 4);
        assert_eq!(r.buffered(), 0);

        // Dry: the next read waits and frees the buffer.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut rb = ReadBuf::new(&mut small);
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut rb).is_pending());
        assert_eq!(r.capacity(), 0);

        // A large read bypasses the buffer; EOF is EOF.
        far.write_all(&data[..CHUNK]).await.unwrap();
        drop(far);
        let mut large = vec![0u8; 2 * CHUNK];
        let n = r.read(&mut large).await.unwrap();
        assert_eq!(&large[..n], &data[..n]);
        assert_eq!(r.capacity(), 0);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert_eq!(n + rest.len(), CHUNK);
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (mut far, near) = tokio::io::duplex(1024);
        let mut r = ReadAhead::new(near);
        r.write_all(b"hello").await.unwrap();
        r.shutdown().await.unwrap();
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
    }
}
