//! Workload certificates: one per SPIFFE identity of the enrolled workloads on this
//! node, from the control plane's CA ([`ca_client`]), and the TLS configurations built
//! from them ([`tls`]).

pub mod ca_client;
pub mod sds;
pub mod tls;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use ambit_identity::Identity;

pub use ambit_xds::ca::WorkloadCert;

/// The certificates this node holds, by identity.
#[derive(Debug, Default)]
pub struct Certificates {
    certs: RwLock<BTreeMap<Identity, Arc<WorkloadCert>>>,
    /// Certificates obtained.
    pub issued: AtomicU64,
    /// Failed requests.
    pub failures: AtomicU64,
    /// Woken when a certificate is stored.
    stored: tokio::sync::Notify,
    /// Bumped when a certificate is stored (SDS pushes renewals on it).
    generation: tokio::sync::watch::Sender<u64>,
}

impl Certificates {
    /// The certificate for `identity`, if we hold one.
    pub fn get(&self, identity: &Identity) -> Option<Arc<WorkloadCert>> {
        self.certs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(identity)
            .cloned()
    }

    /// Every certificate held.
    pub fn all(&self) -> Vec<Arc<WorkloadCert>> {
        self.certs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The certificate for `identity`, waiting up to `timeout` for one to arrive (a pod's
    /// first connection can race its first certificate).
    pub async fn wait_for(
        &self,
        identity: &Identity,
        timeout: std::time::Duration,
    ) -> Option<Arc<WorkloadCert>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let stored = self.stored.notified();
            if let Some(c) = self.get(identity) {
                return Some(c);
            }
            if tokio::time::timeout_at(deadline, stored).await.is_err() {
                return None;
            }
        }
    }

    /// Stores (or replaces) the certificate for its identity.
    pub fn insert(&self, cert: WorkloadCert) {
        self.certs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cert.identity.clone(), Arc::new(cert));
        self.stored.notify_waiters();
        self.generation.send_modify(|g| *g += 1);
    }

    /// Changes whenever a certificate is stored.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Drops the certificates of identities `keep` refuses.
    pub fn retain(&self, keep: impl Fn(&Identity) -> bool) {
        self.certs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| keep(id));
    }
}
