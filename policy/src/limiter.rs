//! Connection rate limits (`RATE_LIMIT` policies, Ambit's extension): a token bucket per
//! (policy, destination workload, source) — the source is the caller's identity, or its
//! IP for plaintext — refilled continuously and starting full. A connection finding its
//! bucket empty is refused (HBONE: 429) before the application is dialed. Node agents
//! keep one for their workloads, a waypoint one for its own pods.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::ConnectionRate;

/// How many buckets are kept; beyond, the full ones (indistinguishable from new) go, and
/// if that is not enough, all.
const MAX_BUCKETS: usize = 65_536;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    rate: ConnectionRate,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let per_sec = f64::from(self.rate.connections) / f64::from(self.rate.per_seconds);
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * per_sec)
            .min(f64::from(self.rate.burst));
        self.at = now;
    }
}

/// Every bucket of an agent (or a waypoint).
#[derive(Debug, Default)]
pub struct ConnLimiter {
    buckets: Mutex<HashMap<(String, String, String), Bucket>>,
}

impl ConnLimiter {
    /// Takes a token for a connection of `source` to `workload` under `policy`; false
    /// if there is none.
    pub fn admit(&self, policy: &str, workload: &str, source: &str, rate: ConnectionRate) -> bool {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() >= MAX_BUCKETS {
            b.retain(|_, x| {
                x.refill(now);
                x.tokens < f64::from(x.rate.burst)
            });
            if b.len() >= MAX_BUCKETS {
                b.clear();
            }
        }
        let bucket = b
            .entry((policy.to_owned(), workload.to_owned(), source.to_owned()))
            .or_insert(Bucket {
                tokens: f64::from(rate.burst),
                at: now,
                rate,
            });
        if bucket.rate != rate {
            // The policy changed: a bucket of the new size, as full as the old one was.
            bucket.rate = rate;
            bucket.tokens = bucket.tokens.min(f64::from(rate.burst));
        }
        bucket.refill(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_gets_its_burst_then_the_rate() {
        let l = ConnLimiter::default();
        let r = ConnectionRate {
            connections: 1,
            per_seconds: 60,
            burst: 3,
        };
        let a: Vec<bool> = (0..4).map(|_| l.admit("p", "w", "a", r)).collect();
        assert_eq!(a, [true, true, true, false]);
        assert!(
            l.admit("p", "w", "b", r),
            "another source has its own bucket"
        );
        assert!(l.admit("q", "w", "a", r), "another policy too");
        let fast = ConnectionRate {
            connections: 100,
            per_seconds: 1,
            burst: 1,
        };
        assert!(l.admit("f", "w", "a", fast));
        assert!(!l.admit("f", "w", "a", fast));
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(l.admit("f", "w", "a", fast), "refilled");
    }
}
