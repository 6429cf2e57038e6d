//! Copying a proxied connection's bytes both ways while counting them.
//!
//! Both sides are [`Side`]s of `ambit_hbone::copy`: sockets ([`Socket`]) and HBONE
//! streams move whole chunks, so a tunnelled byte is not copied through a relay buffer.

use std::io;

use ambit_hbone::copy::{Moved, copy_bidirectional};
pub use ambit_hbone::copy::{Side, Socket};
use tokio::sync::Notify;

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
pub async fn relay<C: Side, S: Side>(
    client: &mut C,
    server: &mut S,
    kill: Option<&Notify>,
) -> (End, u64, u64) {
    let mut moved = Moved::default();
    let copy = copy_bidirectional(client, server, &mut moved);
    let end = match kill {
        Some(kill) => tokio::select! {
            r = copy => r.map_or_else(End::Error, |_| End::Done),
            _ = kill.notified() => End::Killed,
        },
        None => copy.await.map_or_else(End::Error, |_| End::Done),
    };
    (end, moved.a_to_b, moved.b_to_a)
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
        let (end, sent, received) = relay(
            &mut Socket::new(client),
            &mut Socket::new(&mut server),
            None,
        )
        .await;
        far_task.await.unwrap();
        assert!(matches!(end, End::Done), "{end:?}");
        assert_eq!((sent, received), (5, 2));

        let (client, _keep) = tokio::io::duplex(1024);
        let (mut server, _keep2) = tokio::io::duplex(1024);
        let kill = Notify::new();
        kill.notify_one(); // a stored permit: seen even before the relay waits
        let (end, ..) = relay(
            &mut Socket::new(client),
            &mut Socket::new(&mut server),
            Some(&kill),
        )
        .await;
        assert!(matches!(end, End::Killed));
    }
}
