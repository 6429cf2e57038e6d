//! Endpoint choice for connections to a service: round robin, with endpoints that failed
//! recently (refused, unreachable, denied) tried last rather than not at all, so a service
//! whose endpoints all failed once still gets its connections tried.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a failed endpoint is passed over.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
/// Round robin per service, remembering failed endpoints.
///
/// Read-mostly: a connection takes its turn with an atomic add under a shared read lock
/// (a service's first connection inserts its counter) and checks failures under another,
/// so workers choosing endpoints at once never wait for each other and nothing is
/// allocated per connection.
pub struct LoadBalancer {
    next: RwLock<HashMap<Box<str>, AtomicUsize>>,
    /// Endpoint uid → when connecting to it last failed. Expired entries are ignored and
    /// dropped at the next failure.
    failed: RwLock<HashMap<Box<str>, Instant>>,
}

impl LoadBalancer {
    /// Orders `targets` (a service's endpoints) for one connection: the round-robin turn
    /// first, recently failed endpoints last.
    pub fn order<T>(&self, service: &str, targets: &mut [T], uid: impl Fn(&T) -> &str) {
        if targets.is_empty() {
            return;
        }
        let turn = self.turn(service);
        targets.rotate_left(turn % targets.len());
        let failed = self.failed.read().unwrap_or_else(|e| e.into_inner());
        if failed.is_empty() {
            return;
        }
        let now = Instant::now();
        let recent = |at: &Instant| now.duration_since(*at) < FAILURE_MEMORY;
        // Stable: the round-robin order holds within each group.
        targets.sort_by_key(|t| failed.get(uid(t)).is_some_and(recent));
        let stale = failed.values().any(|at| !recent(at));
        drop(failed);
        if stale {
            // Forgotten failures go, so that the common case (none) is free again; by
            // whoever gets the lock first, never waiting for it.
            if let Ok(mut failed) = self.failed.try_write() {
                failed.retain(|_, at| recent(at));
            }
        }
    }

    /// The service's next round-robin turn.
    fn turn(&self, service: &str) -> usize {
        if let Some(n) = self
            .next
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
        {
            return n.fetch_add(1, Ordering::Relaxed);
        }
        self.next
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(service.into())
            .or_default()
            .fetch_add(1, Ordering::Relaxed)
    }

    /// Remembers that connecting to the endpoint `uid` failed just now.
    pub fn failed(&self, uid: &str) {
        let now = Instant::now();
        let mut failed = self.failed.write().unwrap_or_else(|e| e.into_inner());
        failed.retain(|_, at| now.duration_since(*at) < FAILURE_MEMORY);
        failed.insert(uid.into(), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_and_failed_endpoints_last() {
        let lb = LoadBalancer::default();
        let firsts: Vec<&str> = (0..6)
            .map(|_| {
                let mut t = ["a", "b", "c"];
                lb.order("svc", &mut t, |s| s);
                t[0]
            })
            .collect();
        assert_eq!(firsts, ["a", "b", "c", "a", "b", "c"]);
        lb.failed("a");
        for _ in 0..6 {
            let mut t = ["a", "b", "c"];
            lb.order("svc", &mut t, |s| s);
            assert_eq!(t[2], "a", "{t:?}");
        }
    }

    /// A failure older than [`FAILURE_MEMORY`] no longer demotes its endpoint, and the
    /// next connection forgets it.
    #[test]
    fn old_failures_are_ignored_then_forgotten() {
        let lb = LoadBalancer::default();
        let long_ago = Instant::now()
            .checked_sub(FAILURE_MEMORY + Duration::from_secs(1))
            .unwrap();
        lb.failed.write().unwrap().insert("a".into(), long_ago);
        let mut t = ["a", "b", "c"];
        lb.order("svc", &mut t, |s| s);
        assert_eq!(t, ["a", "b", "c"], "an expired failure does not demote");
        assert!(lb.failed.read().unwrap().is_empty(), "and is forgotten");
    }

    /// Turns taken from several threads at once are still a fair round robin: every
    /// endpoint comes first equally often, and each service counts on its own.
    #[test]
    fn concurrent_turns_stay_a_fair_round_robin_per_service() {
        let lb = LoadBalancer::default();
        let (threads, per_thread) = (4, 3_000);
        let firsts = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|i| {
                    let lb = &lb;
                    s.spawn(move || {
                        let mut counts = HashMap::<(&str, &str), usize>::new();
                        for _ in 0..per_thread {
                            for svc in ["one", "two"] {
                                let mut t = ["a", "b", "c"];
                                lb.order(svc, &mut t, |s| s);
                                *counts.entry((svc, t[0])).or_default() += 1;
                            }
                            if i == 0 {
                                // Failures come and go beside the turns.
                                lb.failed("elsewhere");
                            }
                        }
                        counts
                    })
                })
                .collect();
            let mut all = HashMap::<(&str, &str), usize>::new();
            for h in handles {
                for (k, n) in h.join().unwrap() {
                    *all.entry(k).or_default() += n;
                }
            }
            all
        });
        for svc in ["one", "two"] {
            for ep in ["a", "b", "c"] {
                assert_eq!(firsts[&(svc, ep)], threads * per_thread / 3, "{svc} {ep}");
            }
        }
    }
}
