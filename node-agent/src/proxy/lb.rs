//! Endpoint choice for connections to a service: round robin, with endpoints that failed
//! recently (refused, unreachable, denied) tried last rather than not at all, so a service
//! whose endpoints all failed once still gets its connections tried.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a failed endpoint is passed over.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
/// Round robin per service, remembering failed endpoints.
pub struct LoadBalancer {
    next: Mutex<HashMap<String, usize>>,
    failed: Mutex<HashMap<String, Instant>>,
}

impl LoadBalancer {
    /// Orders `targets` (a service's endpoints) for one connection: the round-robin turn
    /// first, recently failed endpoints last.
    pub fn order<T>(&self, service: &str, targets: &mut [T], uid: impl Fn(&T) -> &str) {
        if targets.is_empty() {
            return;
        }
        let turn = {
            let mut next = self.next.lock().unwrap();
            let n = next.entry(service.to_owned()).or_insert(0);
            let turn = *n;
            *n = n.wrapping_add(1);
            turn
        };
        targets.rotate_left(turn % targets.len());
        let now = Instant::now();
        let mut failed = self.failed.lock().unwrap();
        failed.retain(|_, at| now.duration_since(*at) < FAILURE_MEMORY);
        if !failed.is_empty() {
            // Stable: the round-robin order holds within each group.
            targets.sort_by_key(|t| failed.contains_key(uid(t)));
        }
    }

    /// Remembers that connecting to the endpoint `uid` failed just now.
    pub fn failed(&self, uid: &str) {
        self.failed
            .lock()
            .unwrap()
            .insert(uid.to_owned(), Instant::now());
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
}
