//! One task for an HBONE connection and its tunnels, woken once per event.
//!
//! A connection's task polls the HTTP/2 connection and the tunnels' copy loops; each of
//! them wakes the task when it has work for another (a copy loop's write wakes the
//! connection, a received frame wakes a copy loop). Those wakes happen *while the task
//! runs*, and a multi-threaded tokio runtime answers each by queueing the task again,
//! which wakes an idle worker thread to take it: one extra sleep and wake-up per
//! message (measured: both agents' context switches per 1-byte round trip doubled).
//! [`coalesced`] instead notes a wake that arrives during the poll and polls again
//! before returning; a wake while the task sleeps wakes it as usual.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use futures::task::{ArcWake, AtomicWaker};

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN: u8 = 2;
/// Polls in a row before the task yields to the runtime's other tasks.
const MAX_ROUNDS: usize = 32;

#[derive(Default)]
struct Shared {
    state: AtomicU8,
    task: AtomicWaker,
}

impl ArcWake for Shared {
    fn wake_by_ref(shared: &Arc<Self>) {
        match shared
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            // The poll in progress sees it and polls again.
            Ok(_) => {}
            Err(IDLE) => shared.task.wake(),
            Err(_) => {} // already noted
        }
    }
}

/// Runs `poll` (one pass over everything the task owns) until it is ready, calling it
/// again at once whenever something it polled was woken during the pass.
pub(crate) fn coalesced<T>(
    mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>,
) -> impl Future<Output = T> {
    let shared = Arc::new(Shared::default());
    let waker = futures::task::waker(shared.clone());
    std::future::poll_fn(move |cx| {
        shared.task.register(cx.waker());
        shared.state.store(POLLING, Ordering::Release);
        let mut inner = Context::from_waker(&waker);
        for _ in 0..MAX_ROUNDS {
            if let Poll::Ready(v) = poll(&mut inner) {
                shared.state.store(IDLE, Ordering::Release);
                return Poll::Ready(v);
            }
            // No wake during the pass: sleep; a later wake finds IDLE and wakes us.
            if shared
                .state
                .compare_exchange(POLLING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Poll::Pending;
            }
            shared.state.store(POLLING, Ordering::Release);
        }
        // Busy: let the runtime run others first, and come back.
        shared.state.store(IDLE, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A wake during the pass polls again at once; a wake after it (from another
    /// thread, while the task sleeps) still wakes the task: nothing is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wakes_during_a_pass_repoll_and_later_wakes_are_not_lost() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let passes = Arc::new(AtomicUsize::new(0));
        let counted = passes.clone();
        let mut self_woken = false;
        let mut sum = 0;
        let done = tokio::spawn(coalesced(move |cx| {
            counted.fetch_add(1, Ordering::Relaxed);
            if !self_woken {
                // What a copy loop's write does to its connection.
                self_woken = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            loop {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(n)) => sum += n,
                    Poll::Ready(None) => return Poll::Ready(sum),
                    Poll::Pending => return Poll::Pending,
                }
            }
        }));
        for n in 1..=1000 {
            tx.send(n).unwrap();
            if n % 100 == 0 {
                tokio::task::yield_now().await;
            }
        }
        drop(tx);
        assert_eq!(done.await.unwrap(), 500_500);
        assert!(passes.load(Ordering::Relaxed) >= 2);
    }
}
