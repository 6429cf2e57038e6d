//! The data plane's worker threads: one single-threaded tokio runtime each, as Envoy's
//! workers are.
//!
//! With one multi-threaded runtime, the sockets of a connection are registered in an
//! epoll that every worker may be sleeping in: a socket event often woke the *other*
//! worker, which found the connection's task already running (and its wake absorbed:
//! `ambit_hbone::task::coalesced`) and went back to sleep. `cargo xtask bench hbone`
//! showed it: 20.7 context switches per MB of bulk with 2 workers against 11.7 with 1.
//! Here a connection's sockets belong to the one runtime that runs its task, so only
//! that thread wakes for them; connections are spread over the workers round robin as
//! they are accepted (and a tunnel handed to an HBONE connection's task moves its
//! client socket to that connection's worker: `proxy::outbound`).
//!
//! The trade, as with Envoy: no work stealing. One connection (and one HBONE
//! connection's tunnels) uses one core at a time; many connections use all of them.

use std::cell::Cell;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::sync::oneshot;

thread_local! {
    /// The worker this thread is, if it is one.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The data plane's workers. Worker 0 is driven by whoever holds its [`Runtime`] (the
/// agent's main thread, blocked on it until shutdown); the others by threads of their
/// own, which stop when this is dropped.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    _stop: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `n` workers (at least one). Returns worker 0's runtime, for the caller's
    /// thread to drive with `block_on` (it then counts as worker 0).
    pub fn start(n: usize) -> io::Result<(Runtime, Arc<Workers>)> {
        let build = || Builder::new_current_thread().enable_all().build();
        let first = build()?;
        WORKER.with(|w| w.set(Some(0)));
        let mut handles = vec![first.handle().clone()];
        let mut stop = Vec::new();
        for i in 1..n.max(1) {
            let rt = build()?;
            handles.push(rt.handle().clone());
            let (tx, rx) = oneshot::channel::<()>();
            stop.push(tx);
            std::thread::Builder::new()
                .name(format!("dataplane-{i}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(Some(i)));
                    // Runs the worker's tasks until the stop sender is dropped.
                    let _ = rt.block_on(rx);
                })?;
        }
        Ok((
            first,
            Arc::new(Workers {
                handles,
                next: AtomicUsize::new(0),
                _stop: stop,
            }),
        ))
    }

    /// The next worker, round robin: its index and runtime.
    pub fn pick(&self) -> (usize, &Handle) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        (i, &self.handles[i])
    }

    /// The worker whose thread this is, if it is one.
    pub fn current() -> Option<usize> {
        WORKER.with(Cell::get)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_is_spread_round_robin_and_each_worker_runs_on_its_own_thread() {
        let (rt, workers) = std::thread::spawn(|| {
            let (rt, w) = Workers::start(3).unwrap();
            (rt, w)
        })
        .join()
        .unwrap();
        assert_eq!(workers.handles.len(), 3);
        // Worker 0 runs when its runtime is driven.
        let mut seen = Vec::new();
        for _ in 0..6 {
            let (i, h) = workers.pick();
            let task = h.spawn(async move { (i, Workers::current(), std::thread::current().id()) });
            seen.push(rt.block_on(task).unwrap());
        }
        let picked: Vec<usize> = seen.iter().map(|s| s.0).collect();
        assert_eq!(picked, [0, 1, 2, 0, 1, 2]);
        for (i, current, _) in &seen {
            if *i != 0 {
                assert_eq!(
                    *current,
                    Some(*i),
                    "worker {i}'s task ran on its own thread"
                );
            }
        }
        assert_ne!(seen[1].2, seen[2].2);
        assert_eq!(seen[1].2, seen[4].2);
    }
}
