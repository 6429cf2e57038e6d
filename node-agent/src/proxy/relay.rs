//! Copying a proxied connection's bytes both ways while counting them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Copy buffer per direction. 64 KiB moves bulk data in few syscalls.
pub const COPY_BUF: usize = 64 * 1024;

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

impl End {
    /// As telemetry records it.
    pub fn outcome(&self) -> crate::telemetry::connection::Outcome {
        use crate::telemetry::connection::Outcome;
        match self {
            End::Done => Outcome::Done,
            End::Error(e) => Outcome::Error(e.to_string()),
            End::Killed => Outcome::ClosedByPolicy,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_both_ways_and_a_kill_ends_it() {
        let (client, mut app_side) = tokio::io::duplex(1024);
        let (mut server, mut far) = tokio::io::duplex(1024);
        let far_task = tokio::spawn(async move {
            let mut b = [0u8; 5];
            far.read_exact(&mut b).await.unwrap();
            far.write_all(b"hi").await.unwrap();
            far.shutdown().await.unwrap();
        });
        app_side.write_all(b"hello").await.unwrap();
        app_side.shutdown().await.unwrap();
        let (end, sent, received) = relay(client, &mut server, None).await;
        far_task.await.unwrap();
        assert!(matches!(end, End::Done), "{end:?}");
        assert_eq!((sent, received), (5, 2));

        let (client, _keep) = tokio::io::duplex(1024);
        let (mut server, _keep2) = tokio::io::duplex(1024);
        let kill = Notify::new();
        kill.notify_one(); // a stored permit: seen even before the relay waits
        let (end, ..) = relay(client, &mut server, Some(&kill)).await;
        assert!(matches!(end, End::Killed));
    }
}
