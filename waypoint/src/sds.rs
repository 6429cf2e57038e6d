//! The waypoint's certificate, from its node agent's SDS (Envoy's Secret Discovery
//! Service) on a unix socket: `default` (certificate and key) and `ROOTCA` (the mesh
//! roots). The agent decides whose certificate the caller gets from the caller's own
//! process, so the waypoint holds no secret of its own. Renewals arrive on the same
//! stream and are published as a new [`Certs`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambit_identity::Identity;
use ambit_xds::envoy::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::identity::Certs;

/// What the waypoint asks for.
const NAMES: [&str; 2] = [
    ambit_xds::waypoint::SDS_CERTIFICATE,
    ambit_xds::waypoint::SDS_ROOTS,
];

/// The PEM blocks of `pem`, one string each.
pub fn split_pem(pem: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    pem.split_inclusive(END)
        .map(str::trim)
        .filter(|b| b.contains("-----BEGIN"))
        .map(|b| format!("{b}\n"))
        .collect()
}

fn inline(d: &Option<core::DataSource>) -> Option<String> {
    match d.as_ref()?.specifier.as_ref()? {
        core::data_source::Specifier::InlineBytes(b) => String::from_utf8(b.clone()).ok(),
        core::data_source::Specifier::InlineString(s) => Some(s.clone()),
        _ => None,
    }
}

/// The certificate and roots in a response.
fn material(resp: &DiscoveryResponse) -> Result<Material, String> {
    let (mut chain, mut key, mut roots) = (None, None, None);
    for any in &resp.resources {
        let s = tls::Secret::decode(any.value.as_slice()).map_err(|e| format!("Secret: {e}"))?;
        match s.r#type {
            Some(tls::secret::Type::TlsCertificate(c)) => {
                chain = inline(&c.certificate_chain);
                key = inline(&c.private_key);
            }
            Some(tls::secret::Type::ValidationContext(v)) => roots = inline(&v.trusted_ca),
            _ => {}
        }
    }
    let (chain, key, roots) = match (chain, key, roots) {
        (Some(c), Some(k), Some(r)) => (c, k, r),
        _ => return Err("the response lacks the certificate, its key or the roots".into()),
    };
    let blocks = split_pem(&chain);
    let leaf = blocks.first().ok_or("an empty certificate chain")?;
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(leaf.as_bytes())
        .map_err(|e: rustls::pki_types::pem::Error| e.to_string())?;
    let identity: Identity = ambit_hbone::tls::single_spiffe_id(&der)?;
    let certs = Certs::from_pem(identity, &blocks, &key, &roots).map_err(|e| e.to_string())?;
    Ok(Material {
        certs: Arc::new(certs),
        chain_pem: chain,
        key_pem: key,
        roots_pem: roots,
    })
}

/// What the SDS client publishes: the TLS material, and the PEM the xDS channel needs.
#[derive(Clone, Debug)]
pub struct Material {
    /// For HBONE.
    pub certs: Arc<Certs>,
    /// The chain, PEM.
    pub chain_pem: String,
    /// The key, PEM.
    pub key_pem: String,
    /// The mesh roots, PEM.
    pub roots_pem: String,
}

/// Keeps a stream to the agent's SDS socket open, publishing every certificate it
/// delivers; reconnects with backoff.
pub async fn run(socket: PathBuf, tx: watch::Sender<Option<Material>>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&socket, &tx).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => warn!(socket = %socket.display(), "SDS: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(socket: &Path, tx: &watch::Sender<Option<Material>>) -> Result<(), String> {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://sds.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let (req_tx, req_rx) = mpsc::channel(4);
    let request = |version: String, nonce: String, error: Option<String>| DiscoveryRequest {
        version_info: version,
        resource_names: NAMES.iter().map(|s| s.to_string()).collect(),
        type_url: ambit_xds::type_url::SECRET.into(),
        response_nonce: nonce,
        error_detail: error.map(|message| envoy_types::pb::google::rpc::Status {
            code: 3,
            message,
            details: vec![],
        }),
        ..Default::default()
    };
    req_tx
        .send(request(String::new(), String::new(), None))
        .await
        .map_err(|_| "closed")?;
    let mut responses = client
        .stream_secrets(ReceiverStream::new(req_rx))
        .await
        .map_err(|e| format!("{}: {}", e.code(), e.message()))?
        .into_inner();
    while let Some(resp) = responses
        .message()
        .await
        .map_err(|e| format!("{}: {}", e.code(), e.message()))?
    {
        match material(&resp) {
            Ok(m) => {
                info!(identity = %m.certs.identity, version = %resp.version_info, "certificate from SDS");
                tx.send_replace(Some(m));
                let _ = req_tx
                    .send(request(resp.version_info.clone(), resp.nonce.clone(), None))
                    .await;
            }
            Err(e) => {
                warn!("refusing an SDS response: {e}");
                let _ = req_tx
                    .send(request(String::new(), resp.nonce.clone(), Some(e)))
                    .await;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_chains_split_into_blocks() {
        let a = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n";
        let b = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----";
        assert_eq!(
            split_pem(&format!("{a}{b}\n")),
            [a.to_owned(), format!("{b}\n")]
        );
        assert!(split_pem("").is_empty());
    }
}
