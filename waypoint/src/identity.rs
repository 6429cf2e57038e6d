//! The waypoint's own certificate and the TLS configurations made from it.
//!
//! Whoever obtains the certificate (SDS from the node agent, or a test) publishes a new
//! [`Certs`] on a watch channel; each new connection takes the current one, so a renewal
//! is used by the next handshake and never disturbs open connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ambit_hbone::tls::{MeshRoots, TlsError, WorkloadKey, client_config, server_config};
use ambit_identity::Identity;

/// One certificate generation.
pub struct Certs {
    /// The waypoint's identity (its certificate's SPIFFE ID).
    pub identity: Identity,
    roots: MeshRoots,
    key: WorkloadKey,
    server: Arc<rustls::ServerConfig>,
    clients: Mutex<HashMap<Identity, Arc<rustls::ClientConfig>>>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Certs {
    /// From PEM: the certificate chain (leaf first), its key, and the mesh roots.
    pub fn from_pem(
        identity: Identity,
        chain: &[String],
        key_pem: &str,
        roots_pem: &str,
    ) -> Result<Self, TlsError> {
        let key = WorkloadKey::from_pem(chain, key_pem)?;
        let roots = MeshRoots::from_pem(roots_pem)?;
        let server = server_config(&key, &roots, identity.trust_domain())?;
        Ok(Self {
            identity,
            roots,
            key,
            server,
            clients: Mutex::default(),
        })
    }

    /// Inbound HBONE: requires a client certificate of the mesh's trust domain.
    pub fn server(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// Outbound HBONE to a peer that must prove to be `peer`.
    pub fn client(&self, peer: &Identity) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(peer) {
            return Ok(c.clone());
        }
        let c = client_config(&self.key, &self.roots, [peer.clone()])?;
        clients.insert(peer.clone(), c.clone());
        Ok(c)
    }
}
