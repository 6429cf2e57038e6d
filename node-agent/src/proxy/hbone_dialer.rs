//! How the HBONE pool dials a new connection: TCP from inside the source pod's netns (so
//! the pod's IP is the source), mutual TLS as the source identity expecting the
//! destination identity, then HTTP/2.

use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::connect::HboneClient;
use ambit_hbone::pool::{Dialer, PoolKey};
use prometheus_client::metrics::counter::Counter;

use super::dialer::NetnsDialer;
use super::error::Error;
use crate::capture::pods::Pod;
use crate::identity::tls::TlsConfigs;

/// The pool's dialer. The caller hands it the source pod, so it never looks one up.
#[derive(Debug)]
pub struct HboneDialer {
    /// Makes the TCP socket in the source pod's namespace.
    pub sockets: Arc<NetnsDialer>,
    /// Client TLS configurations.
    pub tls: Arc<TlsConfigs>,
    /// How long TCP, TLS and the HTTP/2 handshake may take together.
    pub timeout: Duration,
    /// Counts finished mutual-TLS handshakes (`ambit_hbone_dials_total`).
    pub dials: Counter,
}

impl Dialer for HboneDialer {
    type Target = Arc<Pod>;
    type Error = Error;

    async fn dial(&self, key: &PoolKey, pod: &Arc<Pod>) -> Result<HboneClient, Error> {
        let config = self.tls.client(&key.src_identity, &key.dst_identity)?;
        let work = async {
            let tcp = self
                .sockets
                .connect(pod, key.dst)
                .await
                .map_err(|e| Error::connect(key.dst, e))?;
            let name = rustls::pki_types::ServerName::IpAddress(key.dst.ip().into());
            let tls = ambit_hbone::tls_stream::connect(config, name, tcp)
                .await
                .map_err(|e| Error::handshake(key.dst, &key.dst_identity, e))?;
            self.dials.inc();
            HboneClient::handshake(tls).await.map_err(Error::Hbone)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| Error::ConnectTimeout {
                addr: key.dst,
                after: self.timeout,
            })?
    }
}
