//! The client side of the control plane's CA: one CSR → certificate round trip, for a
//! node agent (its workloads' identities, with its node credential) or a waypoint (its
//! own identity, with its pod's token). A fresh ECDSA P-256 key is made for every
//! request; only its CSR leaves the process.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ambit_identity::Identity;
use rcgen::{CertificateParams, KeyPair, SanType};
use serde::Serialize;

use crate::ambit::CreateCertificateRequest;
use crate::ambit::certificate_service_client::CertificateServiceClient;
use crate::channel::ControlPlane;

/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate and its key.
#[derive(Clone, Serialize)]
pub struct WorkloadCert {
    /// The identity it proves.
    pub identity: Identity,
    /// Hex serial number.
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_before: u64,
    /// Seconds since the Unix epoch.
    pub not_after: u64,
    /// When we got it (seconds since the epoch, local clock).
    pub received: u64,
    /// The private key (PKCS#8 PEM).
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
    pub fn renew_at(&self) -> u64 {
        let start = self.received.max(self.not_before);
        start + self.not_after.saturating_sub(start) / 2
    }
}

/// Why a certificate request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Making the key or the CSR failed.
    #[error("CSR: {0}")]
    Csr(#[from] rcgen::Error),
    /// The identity cannot be a URI SAN.
    #[error("{0} cannot be put in a certificate")]
    Identity(Identity),
    /// The CA refused or could not be reached.
    #[error("{}: {}", .0.code(), .0.message())]
    Ca(Box<tonic::Status>),
    /// The CA did not answer in time.
    #[error("no answer from the CA within {0:?}")]
    Timeout(Duration),
    /// The CA answered with something that is not a certificate for us.
    #[error("the CA's answer: {0}")]
    BadAnswer(String),
}

/// Asks the CA behind `control_plane` (which presents the caller's credential) for a
/// certificate of `identity`, valid for `ttl` (zero: the CA's default).
pub async fn request(
    control_plane: &ControlPlane,
    identity: &Identity,
    ttl: Duration,
) -> Result<WorkloadCert, RequestError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        identity
            .as_str()
            .try_into()
            .map_err(|_| RequestError::Identity(identity.clone()))?,
    )];
    let csr = params.serialize_request(&key)?.pem()?;
    let mut ca = CertificateServiceClient::new(control_plane.channel());
    let mut req = tonic::Request::new(CreateCertificateRequest {
        csr,
        validity_seconds: ttl.as_secs() as i64,
    });
    req.set_timeout(REQUEST_TIMEOUT);
    control_plane.authorize(&mut req);
    let chain = tokio::time::timeout(REQUEST_TIMEOUT, ca.create_certificate(req))
        .await
        .map_err(|_| RequestError::Timeout(REQUEST_TIMEOUT))?
        .map_err(|s| RequestError::Ca(Box::new(s)))?
        .into_inner()
        .cert_chain;
    let bad = |m: String| RequestError::BadAnswer(m);
    let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(leaf.as_bytes()).map_err(|e| bad(format!("leaf: {e}")))?;
    let cert = pem.parse_x509().map_err(|e| bad(format!("leaf: {e}")))?;
    Ok(WorkloadCert {
        identity: identity.clone(),
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp().max(0) as u64,
        not_after: cert.validity().not_after.timestamp().max(0) as u64,
        received: unix(SystemTime::now()),
        key_pem: key.serialize_pem(),
        chain_pem: chain,
    })
}

/// Seconds since the Unix epoch.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
