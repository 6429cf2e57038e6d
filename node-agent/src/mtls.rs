//! rustls configurations for HBONE, built from the current workload certificates.
//!
//! A configuration is built once per certificate (and, for clients, per destination
//! identity) and reused until the certificate is renewed: the next handshake after a
//! renewal picks up the new one, while connections already open keep theirs, so a rotation
//! never breaks a connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ambit_hbone::tls::{self, MeshRoots, WorkloadKey};

use crate::identity::{Certificates, WorkloadCert};

/// A configuration and the serial of the certificate it was built from.
type Cached<C> = (String, Arc<C>);

/// Cached TLS configurations, keyed by identity (and destination identity for clients).
#[derive(Debug)]
pub struct TlsConfigs {
    certs: Arc<Certificates>,
    servers: Mutex<HashMap<String, Cached<rustls::ServerConfig>>>,
    clients: Mutex<HashMap<(String, String), Cached<rustls::ClientConfig>>>,
}

impl TlsConfigs {
    pub fn new(certs: Arc<Certificates>) -> Self {
        Self {
            certs,
            servers: Mutex::default(),
            clients: Mutex::default(),
        }
    }

    /// The server side for a local workload's `identity`: requires clients of its trust
    /// domain chaining to the mesh root.
    pub fn server(&self, identity: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        let cert = self.cert(identity)?;
        let mut cache = self.servers.lock().unwrap();
        if let Some((serial, c)) = cache.get(identity)
            && *serial == cert.serial
        {
            return Ok(c.clone());
        }
        let (key, roots) = material(&cert)?;
        let td = tls::trust_domain_of(identity)
            .ok_or_else(|| format!("{identity} has no trust domain"))?;
        let config = tls::server_config(&key, &roots, td).map_err(|e| e.to_string())?;
        cache.insert(identity.to_owned(), (cert.serial.clone(), config.clone()));
        Ok(config)
    }

    /// The client side for a local workload's `identity` dialing a workload that must
    /// present `peer`.
    pub fn client(&self, identity: &str, peer: &str) -> Result<Arc<rustls::ClientConfig>, String> {
        let cert = self.cert(identity)?;
        let k = (identity.to_owned(), peer.to_owned());
        let mut cache = self.clients.lock().unwrap();
        if let Some((serial, c)) = cache.get(&k)
            && *serial == cert.serial
        {
            return Ok(c.clone());
        }
        let (key, roots) = material(&cert)?;
        let config =
            tls::client_config(&key, &roots, [peer.to_owned()]).map_err(|e| e.to_string())?;
        // Bounded: entries for identities no longer held are dropped on the way.
        cache.retain(|(id, _), _| self.certs.get(id).is_some());
        cache.insert(k, (cert.serial.clone(), config.clone()));
        Ok(config)
    }

    fn cert(&self, identity: &str) -> Result<Arc<WorkloadCert>, String> {
        self.certs
            .get(identity)
            .ok_or_else(|| format!("no certificate for {identity} yet"))
    }
}

/// The workload key and the mesh root (the last certificate of the CA's chain).
fn material(cert: &WorkloadCert) -> Result<(WorkloadKey, MeshRoots), String> {
    let key = WorkloadKey::from_pem(&cert.chain_pem, &cert.key_pem).map_err(|e| e.to_string())?;
    let root = cert.chain_pem.last().ok_or("empty certificate chain")?;
    let roots = MeshRoots::from_pem(root).map_err(|e| e.to_string())?;
    Ok((key, roots))
}

/// Opens HBONE connections for the pool: TCP from inside the source pod's netns (so the
/// pod's IP is the source), mutual TLS as the source identity expecting the destination
/// identity, then HTTP/2.
#[derive(Debug)]
pub struct HboneDialer {
    pub pods: Arc<crate::pods::PodRegistry>,
    pub dialer: Arc<crate::dialer::NetnsDialer>,
    pub tls: Arc<TlsConfigs>,
    pub timeout: std::time::Duration,
    pub dials: prometheus_client::metrics::counter::Counter,
}

impl ambit_hbone::pool::Dialer for HboneDialer {
    async fn dial(
        &self,
        key: &ambit_hbone::pool::PoolKey,
    ) -> Result<ambit_hbone::connect::HboneClient, ambit_hbone::connect::HboneError> {
        use std::io;
        let err = |m: String| ambit_hbone::connect::HboneError::Io(io::Error::other(m));
        let pod = self
            .pods
            .by_ip(key.src)
            .ok_or_else(|| err(format!("no captured pod has the source IP {}", key.src)))?;
        let config = self
            .tls
            .client(&key.src_identity, &key.dst_identity)
            .map_err(err)?;
        let work = async {
            let tcp = self
                .dialer
                .connect(&pod.netns, pod.netns_cookie, key.dst)
                .await?;
            let name = rustls::pki_types::ServerName::IpAddress(key.dst.ip().into());
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            self.dials.inc();
            ambit_hbone::connect::HboneClient::handshake(tls).await
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| err(format!("dialing {} timed out", key.dst)))?
    }
}
