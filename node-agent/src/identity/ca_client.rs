//! Keeps [`Certificates`] in line with the local workloads: for each identity the agent
//! makes a fresh ECDSA P-256 key, sends a CSR over the shared control-plane channel
//! (authenticated with the node's credential) and keeps the certificate. It renews at
//! half-life; a failed request is retried with exponential backoff (1 s to 60 s) while a
//! still-valid certificate stays in use. Identities no local workload has any more are
//! dropped.
//!
//! What to request and when to wake is decided by [`Schedule`], a pure function of the
//! clock, the certificates held and past failures, so it is tested without a CA.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use ambit_identity::Identity;
pub use ambit_xds::ca::RequestError;
use ambit_xds::ca::unix;
use ambit_xds::channel::ControlPlane;
use tracing::{info, warn};

use super::{Certificates, WorkloadCert};
use crate::state::Store;

/// First retry delay after a failed request.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The retry state of the identities whose last request failed.
#[derive(Debug, Default)]
pub struct Schedule {
    /// identity → (current backoff, next attempt, seconds since the epoch).
    retry: HashMap<Identity, (Duration, u64)>,
}

impl Schedule {
    /// Which of `wanted` to request now (`now`: seconds since the epoch): those without
    /// a certificate or due for renewal, unless they are backing off.
    pub fn due(
        &mut self,
        now: u64,
        wanted: &HashSet<Identity>,
        held: impl Fn(&Identity) -> Option<Arc<WorkloadCert>>,
    ) -> Vec<Identity> {
        self.retry.retain(|id, _| wanted.contains(id));
        let mut due: Vec<Identity> = wanted
            .iter()
            .filter(|id| held(id).is_none_or(|c| now >= c.renew_at()))
            .filter(|id| self.retry.get(*id).is_none_or(|(_, at)| now >= *at))
            .cloned()
            .collect();
        due.sort();
        due
    }

    /// Records a success: the identity stops backing off.
    pub fn succeeded(&mut self, id: &Identity) {
        self.retry.remove(id);
    }

    /// Records a failure at `now`; returns how long until the next attempt (doubling
    /// from [`BACKOFF_MIN`] to [`BACKOFF_MAX`]).
    pub fn failed(&mut self, id: &Identity, now: u64) -> Duration {
        let backoff = self
            .retry
            .get(id)
            .map_or(BACKOFF_MIN, |(b, _)| (*b * 2).min(BACKOFF_MAX));
        self.retry
            .insert(id.clone(), (backoff, now + backoff.as_secs()));
        backoff
    }

    /// How long to sleep (at most a second, at least 100 ms): until the next renewal or
    /// retry, whichever is first.
    pub fn next_wake(&self, now: u64, certs: &[Arc<WorkloadCert>]) -> Duration {
        certs
            .iter()
            .map(|c| c.renew_at())
            .chain(self.retry.values().map(|(_, at)| *at))
            .min()
            .map(|t| Duration::from_secs(t.saturating_sub(now)))
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

/// What the CA client needs.
#[derive(Clone, Debug)]
pub struct CaClient {
    /// The shared control-plane channel (with the node credential).
    pub control_plane: ControlPlane,
    /// Requested lifetime; zero: the CA's default.
    pub ttl: Duration,
}

/// Keeps `certs` in line with the store's local identities until the task is dropped.
pub async fn run(client: CaClient, store: Arc<Store>, certs: Arc<Certificates>) {
    let mut changes = store.changes();
    let mut schedule = Schedule::default();
    loop {
        let wanted = store.read(|s| s.local_identities());
        certs.retain(|id| wanted.contains(id));
        let now = unix(SystemTime::now());
        for id in schedule.due(now, &wanted, |id| certs.get(id)) {
            match request(&client, &id).await {
                Ok(cert) => {
                    info!(identity = %id, serial = %cert.serial, not_after = cert.not_after, "workload certificate issued");
                    certs.insert(cert);
                    certs.issued.fetch_add(1, Ordering::Relaxed);
                    schedule.succeeded(&id);
                }
                Err(e) => {
                    let backoff = schedule.failed(&id, now);
                    let still = certs.get(&id).is_some_and(|c| now < c.not_after);
                    warn!(identity = %id, retry_in_s = backoff.as_secs(), keeping_valid_cert = still, "certificate request failed: {e}");
                    certs.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let next = schedule.next_wake(unix(SystemTime::now()), &certs.all());
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// One CSR → certificate round trip.
pub async fn request(client: &CaClient, identity: &Identity) -> Result<WorkloadCert, RequestError> {
    ambit_xds::ca::request(&client.control_plane, identity, client.ttl).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> Identity {
        Identity::new("td", "ns", sa).unwrap()
    }

    fn cert(
        identity: Identity,
        received: u64,
        not_before: u64,
        not_after: u64,
    ) -> Arc<WorkloadCert> {
        Arc::new(WorkloadCert {
            identity,
            serial: "01".into(),
            not_before,
            not_after,
            received,
            key_pem: String::new(),
            chain_pem: vec![],
        })
    }

    #[test]
    fn renewal_is_at_half_of_the_remaining_life_not_of_the_backdated_one() {
        // Backdated by a minute, 24 h: renew 12 h after arrival, not 11 h 59.5 min.
        let c = cert(id("a"), 1_000, 940, 1_000 + 86_400);
        assert_eq!(c.renew_at(), 1_000 + 43_200);
        // A 2 s certificate received late in its life: half of what is left.
        let c = cert(id("a"), 1_001, 999, 1_002);
        assert_eq!(c.renew_at(), 1_001);
    }

    #[test]
    fn due_identities_missing_or_half_spent_and_not_backing_off() {
        let (a, b, c) = (id("a"), id("b"), id("c"));
        let wanted: HashSet<Identity> = [a.clone(), b.clone(), c.clone()].into();
        let held = |i: &Identity| {
            if *i == a {
                Some(cert(a.clone(), 100, 100, 200)) // renew at 150
            } else if *i == b {
                Some(cert(b.clone(), 100, 100, 1_000)) // renew at 550
            } else {
                None
            }
        };
        let mut s = Schedule::default();
        assert_eq!(s.due(120, &wanted, held), vec![c.clone()]);
        assert_eq!(s.due(150, &wanted, held), vec![a.clone(), c.clone()]);
        // c fails: it waits 1 s, then 2, 4, ... up to 60.
        assert_eq!(s.failed(&c, 150), Duration::from_secs(1));
        assert_eq!(s.due(150, &wanted, held), vec![a.clone()]);
        assert_eq!(s.due(151, &wanted, held), vec![a.clone(), c.clone()]);
        let backoffs: Vec<u64> = (0..8).map(|_| s.failed(&c, 151).as_secs()).collect();
        assert_eq!(backoffs, [2, 4, 8, 16, 32, 60, 60, 60]);
        s.succeeded(&c);
        assert_eq!(s.due(151, &wanted, held), vec![a.clone(), c.clone()]);
        // An identity no longer wanted is forgotten, backoff and all.
        s.failed(&c, 151);
        let only_a: HashSet<Identity> = [a.clone()].into();
        s.due(151, &only_a, held);
        assert!(s.retry.is_empty());
    }

    #[test]
    fn wakes_for_the_next_renewal_or_retry_within_bounds() {
        let mut s = Schedule::default();
        let certs = vec![cert(id("a"), 100, 100, 200)];
        assert_eq!(s.next_wake(100, &[]), Duration::from_secs(1));
        assert_eq!(s.next_wake(150, &certs), Duration::from_millis(100));
        assert_eq!(s.next_wake(100, &certs), Duration::from_secs(1));
        s.failed(&id("b"), 149);
        assert_eq!(s.next_wake(150, &certs), Duration::from_millis(100));
    }
}
