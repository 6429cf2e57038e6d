//! Workload certificates: one per SPIFFE identity of the enrolled workloads on this node,
//! from the control plane's CA.
//!
//! For each identity the agent makes a fresh ECDSA P-256 key, sends a CSR (authenticated
//! with the node's bootstrap credential), and keeps the certificate. It renews at
//! half-life; a failed request is retried with exponential backoff (1 s to 60 s), and a
//! still-valid certificate stays in use meanwhile. Identities that no local workload
//! has any more are dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ambit_xds::ambit::CreateCertificateRequest;
use ambit_xds::ambit::certificate_service_client::CertificateServiceClient;
use rcgen::{CertificateParams, KeyPair, SanType};
use serde::Serialize;
use tracing::{info, warn};

use crate::store::Store;

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A certificate and its key.
#[derive(Clone, Serialize)]
pub struct WorkloadCert {
    pub identity: String,
    /// Hex serial number.
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_before: u64,
    pub not_after: u64,
    /// When we got it (seconds since the epoch, local clock).
    pub received: u64,
    #[serde(skip)]
    pub key_pem: String,
    /// Leaf first, root last.
    #[serde(skip)]
    pub chain_pem: Vec<String>,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("serial", &self.serial)
            .finish()
    }
}

impl WorkloadCert {
    /// When to renew: half-way through its remaining life when we got it. Not from
    /// `not_before`: the CA backdates that to absorb clock skew, which would make a
    /// short-lived certificate look half-spent on arrival.
    fn renew_at(&self) -> u64 {
        let start = self.received.max(self.not_before);
        start + self.not_after.saturating_sub(start) / 2
    }
}

/// The certificates this node holds, by identity.
#[derive(Debug, Default)]
pub struct Certificates {
    certs: RwLock<BTreeMap<String, Arc<WorkloadCert>>>,
    pub issued: AtomicU64,
    pub failures: AtomicU64,
    /// Woken when a certificate is stored.
    stored: tokio::sync::Notify,
}

impl Certificates {
    pub fn get(&self, identity: &str) -> Option<Arc<WorkloadCert>> {
        self.certs.read().unwrap().get(identity).cloned()
    }

    pub fn all(&self) -> Vec<Arc<WorkloadCert>> {
        self.certs.read().unwrap().values().cloned().collect()
    }

    /// The certificate for `identity`, waiting up to `timeout` for one to arrive (a pod's
    /// first connection can race its first certificate).
    pub async fn wait_for(
        &self,
        identity: &str,
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
            .unwrap()
            .insert(cert.identity.clone(), Arc::new(cert));
        self.stored.notify_waiters();
    }
}

/// How to reach the CA.
#[derive(Clone, Debug)]
pub struct CaClientConfig {
    pub address: String,
    pub node: String,
    pub credential: String,
    /// Requested lifetime; zero: the CA's default.
    pub ttl: Duration,
}

/// Keeps [`Certificates`] in line with the store until the task is dropped.
pub async fn run(config: CaClientConfig, store: Arc<Store>, certs: Arc<Certificates>) {
    let mut changes = store.changes();
    let mut retry: HashMap<String, (Duration, SystemTime)> = HashMap::new();
    loop {
        let wanted: BTreeSet<String> = store
            .snapshot()
            .workloads
            .values()
            .filter(|w| w.node == config.node && w.enrolled)
            .map(|w| w.identity.clone())
            .collect();
        certs
            .certs
            .write()
            .unwrap()
            .retain(|id, _| wanted.contains(id));
        retry.retain(|id, _| wanted.contains(id));

        let now = SystemTime::now();
        for id in &wanted {
            let due = certs.get(id).is_none_or(|c| unix(now) >= c.renew_at());
            let allowed = retry.get(id).is_none_or(|(_, at)| now >= *at);
            if !(due && allowed) {
                continue;
            }
            match request(&config, id).await {
                Ok(cert) => {
                    info!(identity = %id, serial = %cert.serial, not_after = cert.not_after, "workload certificate issued");
                    certs.insert(cert);
                    certs.issued.fetch_add(1, Ordering::Relaxed);
                    retry.remove(id);
                }
                Err(e) => {
                    let backoff = retry
                        .get(id)
                        .map_or(BACKOFF_MIN, |(b, _)| (*b * 2).min(BACKOFF_MAX));
                    let still = certs.get(id).is_some_and(|c| unix(now) < c.not_after);
                    warn!(identity = %id, retry_in_s = backoff.as_secs(), keeping_valid_cert = still, "certificate request failed: {e}");
                    certs.failures.fetch_add(1, Ordering::Relaxed);
                    retry.insert(id.clone(), (backoff, now + backoff));
                }
            }
        }

        // Sleep until the next renewal or retry, a store change, or at most a second.
        let next = certs
            .all()
            .iter()
            .map(|c| c.renew_at())
            .chain(retry.values().map(|(_, at)| unix(*at)))
            .min()
            .map(|t| Duration::from_secs(t.saturating_sub(unix(SystemTime::now()))))
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

async fn request(config: &CaClientConfig, identity: &str) -> Result<WorkloadCert, String> {
    let key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| format!("key: {e}"))?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        identity
            .try_into()
            .map_err(|_| format!("bad identity {identity}"))?,
    )];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| format!("CSR: {e}"))?;

    let endpoint = tonic::transport::Endpoint::from_shared(config.address.clone())
        .map_err(|e| format!("bad CA address: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    let mut client = CertificateServiceClient::new(
        endpoint
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?,
    );
    let ttl = config.ttl.as_secs() as i64;
    let mut req = tonic::Request::new(CreateCertificateRequest {
        csr,
        validity_seconds: ttl,
    });
    let auth = format!("Bearer {}", config.credential)
        .parse()
        .map_err(|_| "the node credential is not valid in a header".to_string())?;
    req.metadata_mut().insert("authorization", auth);
    let chain = client
        .create_certificate(req)
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner()
        .cert_chain;
    let leaf = chain.first().ok_or("the CA returned no certificate")?;
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(leaf.as_bytes()).map_err(|e| format!("leaf: {e}"))?;
    let cert = pem.parse_x509().map_err(|e| format!("leaf: {e}"))?;
    Ok(WorkloadCert {
        identity: identity.to_owned(),
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp().max(0) as u64,
        not_after: cert.validity().not_after.timestamp().max(0) as u64,
        received: unix(SystemTime::now()),
        key_pem: key.serialize_pem(),
        chain_pem: chain,
    })
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
