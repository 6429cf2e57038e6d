//! One HTTP/2 stream as a byte pipe ([`AsyncRead`] + [`AsyncWrite`]), so a tunnelled
//! connection can be copied like a socket.
//!
//! Flow control is HTTP/2's: reads hand receive capacity back as the application
//! consumes data (so a slow reader slows the sender instead of growing buffers), writes
//! wait for send capacity. `shutdown` ends the stream (END_STREAM): a half-close, like
//! `shutdown(SHUT_WR)` on TCP. Dropping the pipe before both directions ended resets the
//! stream (RST_STREAM CANCEL), like closing a socket with data in flight.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

/// Work handed to an HBONE connection's task.
pub type Job = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Runs work in the task that drives one HBONE client connection: a tunnel's copy loop
/// run there moves its bytes between its socket and the TLS connection without a hop
/// between tasks (or threads) per write.
#[derive(Clone, Debug)]
pub struct Runner(pub(crate) mpsc::UnboundedSender<Job>);

impl Runner {
    /// Hands `job` to the connection's task; once that task has ended (the connection
    /// closed) the job comes back, for the caller to run itself.
    pub fn run(&self, job: Job) -> Result<(), Job> {
        self.0.send(job).map_err(|e| e.0)
    }
}

/// Largest chunk handed to h2 per write (h2 splits it into frames).
const MAX_WRITE: usize = 256 * 1024;

/// The two halves of an HTTP/2 stream.
#[derive(Debug)]
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    pending: Bytes,
    write_closed: bool,
    read_done: bool,
    /// The task of the connection this stream is on, for a client's stream.
    runner: Option<Runner>,
}

impl H2Stream {
    /// The pipe over a stream's two halves.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
            read_done: false,
            runner: None,
        }
    }

    /// The pipe, with the task of the connection it is on ([`H2Stream::runner`]).
    pub fn with_runner(mut self, runner: Runner) -> Self {
        self.runner = Some(runner);
        self
    }

    /// Where to run work that should share its connection's task: a client stream's
    /// copy loop (see [`Runner`]). `None` for a server's stream, which already runs
    /// there.
    pub fn runner(&self) -> Option<&Runner> {
        self.runner.as_ref()
    }

    /// Ends our side of the stream (END_STREAM), once: what was written is then whole.
    pub fn finish(&mut self) -> Result<(), h2::Error> {
        if !self.write_closed {
            self.write_closed = true;
            self.send.send_data(Bytes::new(), true)?;
        }
        Ok(())
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().expect("is_io");
    }
    let kind = match e.reason() {
        Some(h2::Reason::CANCEL | h2::Reason::STREAM_CLOSED) | None => {
            io::ErrorKind::ConnectionReset
        }
        Some(_) => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(kind, e)
}

impl H2Stream {
    /// Waits until `pending` holds received bytes; false at the end of the stream.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        // An empty DATA frame (legal, and how END_STREAM often arrives) is not EOF: a
        // 0-byte read would tell the caller the stream ended. Skip it.
        while self.pending.is_empty() {
            if self.read_done {
                return Poll::Ready(Ok(false));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => self.read_done = true,
            }
        }
        Poll::Ready(Ok(true))
    }

    /// Waits for send capacity; how many bytes of `want` may be sent.
    fn poll_room(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.send.reserve_capacity(want.min(MAX_WRITE));
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => return Poll::Ready(Ok(n.min(want))),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HTTP/2 stream closed",
                    )));
                }
            }
        }
    }
}

/// The stream's DATA frames are handed on as h2 parsed them, and chunks to send become
/// DATA frames as they are: no copy on either way ([`crate::copy`]).
impl crate::copy::Side for H2Stream {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !ready!(self.poll_pending(cx))? {
            return Poll::Ready(Ok(None));
        }
        // The window is handed back as the relay delivers (`delivered`).
        Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))))
    }

    fn delivered(&mut self, n: usize) {
        let _ = self.recv.flow_control().release_capacity(n);
    }

    fn poll_put(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        if data.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let n = ready!(self.poll_room(cx, data.len()))?;
        self.send
            .send_data(data.split_to(n), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(()))
    }

    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish().map_err(h2_io))
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !ready!(this.poll_pending(cx))? {
            return Poll::Ready(Ok(()));
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        // Give the window back only for what the application took.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_room(cx, data.len()))?;
        this.send
            .send_data(Bytes::copy_from_slice(&data[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames as the connection task runs: nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.finish().map_err(h2_io)?;
        Poll::Ready(Ok(()))
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        // Our side never finished: the peer must not take what it got as whole. (If it
        // did finish and the peer has not, h2 itself resets the stream once what we
        // queued is sent, so an early complete answer still arrives: RFC 9113 §8.1.)
        if !self.write_closed {
            self.send.send_reset(h2::Reason::CANCEL);
        }
    }
}
