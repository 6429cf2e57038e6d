//! The waypoint's certificate straight from the control plane's CA, where its pod cannot
//! reach a node agent's SDS socket (on Kubernetes, where that would take a hostPath
//! volume in the application's namespace). The credential is the pod's projected
//! ServiceAccount token (audience `ambit-ca`): the CA reviews it and signs only the
//! identity of the waypoint that pod belongs to. A fresh key for each certificate, which
//! is renewed at half-life; a failed request is retried with backoff while the current
//! certificate stays in use.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_identity::Identity;
use ambit_xds::ca::{WorkloadCert, unix};
use ambit_xds::channel::ControlPlane;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::identity::Certs;
use crate::sds::Material;

/// First retry delay after a failed request.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where and as whom the waypoint asks for its certificate.
#[derive(Clone, Debug)]
pub struct CaSource {
    /// The control plane, presenting the pod's token.
    pub control_plane: ControlPlane,
    /// The waypoint's identity.
    pub identity: Identity,
    /// The mesh roots (PEM), which the certificate must chain to.
    pub roots_pem: String,
    /// Requested lifetime (zero: the CA's default).
    pub ttl: Duration,
}

/// The TLS material of a certificate the CA issued.
pub fn material(cert: &WorkloadCert, roots_pem: &str) -> Result<Material, String> {
    let certs = Certs::from_pem(
        cert.identity.clone(),
        &cert.chain_pem,
        &cert.key_pem,
        roots_pem,
    )
    .map_err(|e| e.to_string())?;
    Ok(Material {
        certs: Arc::new(certs),
        chain_pem: cert.chain_pem.concat(),
        key_pem: cert.key_pem.clone(),
        roots_pem: roots_pem.to_owned(),
    })
}

/// Keeps a valid certificate published on `tx` until the task is dropped.
pub async fn run(source: CaSource, tx: watch::Sender<Option<Material>>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let wait = match ambit_xds::ca::request(&source.control_plane, &source.identity, source.ttl)
            .await
            .map_err(|e| e.to_string())
            .and_then(|cert| material(&cert, &source.roots_pem).map(|m| (cert, m)))
        {
            Ok((cert, m)) => {
                info!(identity = %cert.identity, serial = %cert.serial, not_after = cert.not_after, "certificate from the CA");
                tx.send_replace(Some(m));
                backoff = BACKOFF_MIN;
                Duration::from_secs(cert.renew_at().saturating_sub(unix(SystemTime::now())))
            }
            Err(e) => {
                let keeping = tx.borrow().is_some();
                warn!(identity = %source.identity, retry_in_s = backoff.as_secs(), keeping_current = keeping, "certificate request failed: {e}");
                let w = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                w
            }
        };
        tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
    }
}
