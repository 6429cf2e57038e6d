//! Outlier detection, with the semantics of Envoy's `outlier_detection` (without
//! splitting local-origin errors, as Istio configures it).
//!
//! Every answer from an endpoint is recorded: a 5xx, or a failure of the waypoint's own
//! (connection failure or reset: 503; timeout: 504), counts towards the endpoint's
//! consecutive 5xx and — 502, 503 and 504 only — consecutive gateway failures; anything
//! else resets both (a 5xx that is not a gateway failure resets the gateway run). When a
//! run reaches its threshold for an endpoint not ejected, it is reset, and the endpoint
//! is ejected — with the enforcing probability — unless that would put more than
//! `max_ejection_percent` of the cluster's endpoints out at once (unless
//! `always_eject_one_host` and none is). An ejection lasts `base_ejection_time` times the
//! endpoint's ejection count (each ejection adds one; each review that finds it back for
//! an `interval` takes one off), at most `max_ejection_time`, plus a random jitter up to
//! `max_ejection_time_jitter`, and ends at the first review after that: ejections are
//! reviewed every `interval`, as Envoy's timer does; a returning endpoint's runs start
//! from zero.
//!
//! Ejected endpoints get no requests while enough are left: below the cluster's panic
//! threshold (`healthy_panic_threshold`, Envoy's default 50 %, Istio's 0) of endpoints
//! not ejected, all of them are used again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Envoy's `outlier_detection`, decoded (the consecutive-error detectors).
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierConfig {
    /// 5xx in a row that eject (Envoy's default 5).
    pub consecutive_5xx: u32,
    /// The probability that reaching it ejects (`enforcing_consecutive_5xx`, default 1).
    pub enforcing_5xx: f64,
    /// Gateway failures (502, 503, 504) in a row that eject (default 5).
    pub consecutive_gateway: u32,
    /// The probability that reaching it ejects (default 0: off).
    pub enforcing_gateway: f64,
    /// How often ejections are reviewed (default 10 s).
    pub interval: Duration,
    /// An ejection's unit (default 30 s).
    pub base_ejection_time: Duration,
    /// An ejection's cap (default 300 s, never below the base).
    pub max_ejection_time: Duration,
    /// At most this percentage of the endpoints out at once (default 10).
    pub max_ejection_percent: u32,
    /// One endpoint may always be ejected, whatever the percentage (default false).
    pub always_eject_one_host: bool,
    /// Up to this much is added, at random, to each ejection (default 0).
    pub max_ejection_time_jitter: Duration,
}

impl OutlierConfig {
    fn max_jitter_ms(&self) -> u64 {
        u64::try_from(self.max_ejection_time_jitter.as_millis()).unwrap_or(u64::MAX)
    }
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            enforcing_5xx: 1.0,
            consecutive_gateway: 5,
            enforcing_gateway: 0.0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            always_eject_one_host: false,
            max_ejection_time_jitter: Duration::ZERO,
        }
    }
}

/// What an endpoint answered, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP status from the endpoint.
    Status(u16),
    /// No connection (counted as 503).
    ConnectFailed,
    /// The connection or stream reset before the answer (counted as 500).
    Reset,
    /// No answer in time (counted as 504).
    TimedOut,
}

impl Answer {
    fn status(self) -> u16 {
        match self {
            Answer::Status(s) => s,
            Answer::ConnectFailed => 503,
            Answer::Reset => 500,
            Answer::TimedOut => 504,
        }
    }
}

/// Why an endpoint was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `consecutive_5xx`.
    Consecutive5xx,
    /// `consecutive_gateway_failure`.
    ConsecutiveGatewayFailure,
}

impl Reason {
    /// As Envoy's `OutlierEjectionType` names it, lowercased.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Consecutive5xx => "consecutive_5xx",
            Reason::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
        }
    }
}

/// What recording an answer did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing.
    None,
    /// The endpoint was ejected.
    Ejected(Reason),
    /// It should have been, but `max_ejection_percent` was reached (Envoy's
    /// `ejections_overflow`).
    Overflow(Reason),
}

#[derive(Debug, Default)]
struct Host {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Since when, if ejected now.
    ejected_at: Option<Instant>,
    /// Ejections that count towards the next one's length.
    backoff: u32,
    /// Added to this ejection's length.
    jitter: Duration,
    returned_at: Option<Instant>,
}

/// One cluster's outlier detection: its configuration and every endpoint's state.
#[derive(Debug)]
pub struct Outlier {
    config: OutlierConfig,
    hosts: Mutex<HashMap<SocketAddr, Host>>,
    /// Endpoints ejected now (read without the lock on every request).
    ejected: AtomicUsize,
    reviewing: AtomicBool,
}

impl Outlier {
    /// Outlier detection as `config` says, no endpoint ejected.
    pub fn new(config: OutlierConfig) -> Self {
        Self {
            config,
            hosts: Mutex::default(),
            ejected: AtomicUsize::new(0),
            reviewing: AtomicBool::new(false),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &OutlierConfig {
        &self.config
    }

    fn hosts(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Host>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `answer` from `addr`, one of `endpoints` endpoints of the cluster.
    pub fn record(self: &Arc<Self>, addr: SocketAddr, endpoints: usize, answer: Answer) -> Verdict {
        let status = answer.status();
        let c = &self.config;
        let mut hosts = self.hosts();
        let host = hosts.entry(addr).or_default();
        if !(500..600).contains(&status) {
            host.consecutive_5xx = 0;
            host.consecutive_gateway = 0;
            return Verdict::None;
        }
        // As Envoy's monitor: a gateway failure extends its run, another 5xx ends it;
        // either extends the 5xx run. Reaching a threshold fires its detector.
        let mut fired: [Option<Reason>; 2] = [None, None];
        if matches!(status, 502..=504) {
            host.consecutive_gateway += 1;
            if host.consecutive_gateway == c.consecutive_gateway {
                fired[0] = Some(Reason::ConsecutiveGatewayFailure);
            }
        } else {
            host.consecutive_gateway = 0;
        }
        host.consecutive_5xx += 1;
        if host.consecutive_5xx == c.consecutive_5xx {
            fired[1] = Some(Reason::Consecutive5xx);
        }
        // A detector firing for an endpoint that is not ejected tries to eject it, and
        // resets its run whatever came of that.
        let mut verdict = Verdict::None;
        for reason in fired.into_iter().flatten() {
            if host.ejected_at.is_some() {
                break;
            }
            let active = self.ejected.load(Ordering::Relaxed);
            let percent = 100.0 * (active + 1) as f64 / endpoints.max(1) as f64;
            let allowed = percent <= f64::from(c.max_ejection_percent)
                || (c.always_eject_one_host && active == 0);
            let enforcing = match reason {
                Reason::ConsecutiveGatewayFailure => {
                    host.consecutive_gateway = 0;
                    c.enforcing_gateway
                }
                Reason::Consecutive5xx => {
                    host.consecutive_5xx = 0;
                    c.enforcing_5xx
                }
            };
            if !allowed {
                verdict = Verdict::Overflow(reason);
            } else if fastrand::f64() < enforcing {
                host.ejected_at = Some(Instant::now());
                host.jitter = Duration::from_millis(fastrand::u64(..=c.max_jitter_ms()));
                // The length grows with each ejection up to the cap (and one step past
                // it, as Envoy's counter does).
                if c.base_ejection_time * host.backoff < c.max_ejection_time + c.base_ejection_time
                {
                    host.backoff += 1;
                }
                self.ejected.fetch_add(1, Ordering::Relaxed);
                verdict = Verdict::Ejected(reason);
            }
        }
        drop(hosts);
        if let Verdict::Ejected(_) = verdict {
            self.review_periodically();
        }
        verdict
    }

    /// Starts the review every `interval` (once; it ends with the cluster).
    fn review_periodically(self: &Arc<Self>) {
        if self.reviewing.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak = Arc::downgrade(self);
        let interval = self.config.interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
            loop {
                tick.tick().await;
                let Some(o) = weak.upgrade() else { return };
                o.review(Instant::now());
            }
        });
    }

    /// Envoy's interval review: ejections that have lasted long enough end (and the
    /// endpoint's runs start again from zero); an endpoint back for an `interval` or
    /// more counts one ejection less towards the next one's length.
    fn review(&self, now: Instant) {
        let c = &self.config;
        let mut hosts = self.hosts();
        let mut returned = 0;
        for host in hosts.values_mut() {
            if let Some(at) = host.ejected_at {
                let length = (c.base_ejection_time * host.backoff).min(c.max_ejection_time);
                if length + host.jitter <= now.duration_since(at) {
                    host.ejected_at = None;
                    host.returned_at = Some(now);
                    host.consecutive_5xx = 0;
                    host.consecutive_gateway = 0;
                    returned += 1;
                }
            }
        }
        self.ejected.fetch_sub(returned, Ordering::Relaxed);
        for host in hosts.values_mut() {
            if host.ejected_at.is_none()
                && host
                    .returned_at
                    .is_some_and(|r| now.duration_since(r) >= c.interval)
            {
                host.backoff = host.backoff.saturating_sub(1);
            }
        }
        // Endpoints with nothing to remember are forgotten (endpoints come and go).
        hosts.retain(|_, h| {
            h.ejected_at.is_some()
                || h.backoff > 0
                || h.consecutive_5xx > 0
                || h.consecutive_gateway > 0
        });
    }

    /// Whether any endpoint is ejected now (no lock).
    pub fn any_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed) > 0
    }

    /// Calls `f` with a test for "is ejected" over one lock.
    pub fn with_ejected<R>(&self, f: impl FnOnce(&dyn Fn(SocketAddr) -> bool) -> R) -> R {
        let hosts = self.hosts();
        f(&|a| hosts.get(&a).is_some_and(|h| h.ejected_at.is_some()))
    }

    /// The endpoints ejected now, for the config dump.
    pub fn ejected(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self
            .hosts()
            .iter()
            .filter(|(_, h)| h.ejected_at.is_some())
            .map(|(a, _)| *a)
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    fn outlier() -> Arc<Outlier> {
        Arc::new(Outlier::new(OutlierConfig {
            consecutive_5xx: 3,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            max_ejection_percent: 50,
            ..Default::default()
        }))
    }

    #[tokio::test]
    async fn consecutive_5xx_eject_for_a_growing_time_and_a_success_resets_the_count() {
        let o = outlier();
        let a = addr(1);
        assert_eq!(o.record(a, 4, Answer::Status(500)), Verdict::None);
        assert_eq!(o.record(a, 4, Answer::Reset), Verdict::None);
        assert_eq!(o.record(a, 4, Answer::Status(200)), Verdict::None);
        assert_eq!(o.record(a, 4, Answer::Status(500)), Verdict::None);
        assert_eq!(o.record(a, 4, Answer::TimedOut), Verdict::None);
        assert_eq!(
            o.record(a, 4, Answer::Status(503)),
            Verdict::Ejected(Reason::Consecutive5xx)
        );
        assert_eq!(o.ejected(), [a]);
        // Back at the first review 10 s on.
        let t0 = Instant::now();
        o.review(t0 + Duration::from_secs(9));
        assert_eq!(o.ejected(), [a]);
        o.review(t0 + Duration::from_secs(10));
        assert!(o.ejected().is_empty());
        // Ejected again at once: twice as long (20 s), then capped at 25 s.
        for _ in 0..3 {
            o.record(a, 4, Answer::Status(500));
        }
        let t1 = t0 + Duration::from_secs(10);
        let hosts_at = |o: &Outlier| o.hosts().get(&a).map(|h| h.ejected_at);
        assert!(hosts_at(&o).flatten().is_some());
        let at = hosts_at(&o).flatten().unwrap();
        o.review(at + Duration::from_secs(19));
        assert_eq!(o.ejected(), [a]);
        o.review(at + Duration::from_secs(20));
        assert!(o.ejected().is_empty(), "{t1:?}");
        for _ in 0..3 {
            o.record(a, 4, Answer::Status(500));
        }
        let at = hosts_at(&o).flatten().unwrap();
        o.review(at + Duration::from_secs(24));
        assert_eq!(o.ejected(), [a]);
        o.review(at + Duration::from_secs(25));
        assert!(o.ejected().is_empty());
    }

    #[tokio::test]
    async fn max_ejection_percent_holds_but_one_may_always_go() {
        let o = outlier();
        let fail = |o: &Arc<Outlier>, a| {
            let mut v = Verdict::None;
            for _ in 0..3 {
                v = o.record(a, 3, Answer::Status(500));
            }
            v
        };
        // 50 % of 3: one out (33 %), a second (67 %) would be too many.
        assert_eq!(fail(&o, addr(1)), Verdict::Ejected(Reason::Consecutive5xx));
        assert_eq!(fail(&o, addr(2)), Verdict::Overflow(Reason::Consecutive5xx));
        assert_eq!(o.ejected(), [addr(1)]);
        // Of one endpoint at 10 %: only if one may always go.
        for (always, verdict) in [
            (false, Verdict::Overflow(Reason::Consecutive5xx)),
            (true, Verdict::Ejected(Reason::Consecutive5xx)),
        ] {
            let o = Arc::new(Outlier::new(OutlierConfig {
                consecutive_5xx: 1,
                always_eject_one_host: always,
                ..Default::default()
            }));
            assert_eq!(o.record(addr(1), 1, Answer::Status(500)), verdict);
        }
    }

    #[tokio::test]
    async fn gateway_failures_eject_only_when_enforced_and_other_5xx_break_their_run() {
        let o = Arc::new(Outlier::new(OutlierConfig {
            consecutive_5xx: 100,
            consecutive_gateway: 2,
            enforcing_gateway: 1.0,
            max_ejection_percent: 100,
            ..Default::default()
        }));
        assert_eq!(o.record(addr(1), 2, Answer::Status(502)), Verdict::None);
        // A 500 is a 5xx but not a gateway failure: it ends the run.
        assert_eq!(o.record(addr(1), 2, Answer::Status(500)), Verdict::None);
        assert_eq!(o.record(addr(1), 2, Answer::ConnectFailed), Verdict::None);
        assert_eq!(
            o.record(addr(1), 2, Answer::TimedOut),
            Verdict::Ejected(Reason::ConsecutiveGatewayFailure)
        );
        // Not enforced: counted, never ejected.
        let o = Arc::new(Outlier::new(OutlierConfig {
            consecutive_5xx: 2,
            enforcing_5xx: 0.0,
            max_ejection_percent: 100,
            ..Default::default()
        }));
        for _ in 0..10 {
            assert_eq!(o.record(addr(1), 1, Answer::Status(500)), Verdict::None);
        }
    }
}
