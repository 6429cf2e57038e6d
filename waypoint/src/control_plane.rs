//! The waypoint's channel to the control plane: gRPC over TLS 1.3, authenticated with the
//! waypoint's own certificate, which the node agent renews (SDS) while the channel lives.
//!
//! tonic's own TLS settings fix one certificate for the channel's life, so after the
//! first renewal's expiry (24 h by default) a reconnect would present an expired one and
//! be refused. Here every new connection — the first and each reconnect — is made with
//! the certificate and roots current at that moment ([`connect_tls`]).

use std::io;

use anyhow::Context;
use http::Uri;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;

use crate::sds::Material;

/// A lazily connecting channel to `address` (`https://host:port`) that presents the
/// certificate current in `material` on every connection.
pub fn channel(
    address: &str,
    material: watch::Receiver<Option<Material>>,
) -> anyhow::Result<ambit_xds::channel::ControlPlane> {
    anyhow::ensure!(
        address.starts_with("https://"),
        "{address:?}: the waypoint authenticates with its certificate and needs https://"
    );
    // The connector does the TLS itself; tonic refuses an https:// endpoint without its
    // own TLS settings, so the endpoint is given as http:// to the same host and port.
    let plain = address.replacen("https://", "http://", 1);
    let endpoint = tonic::transport::Endpoint::from_shared(plain)
        .with_context(|| format!("{address:?}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |uri: Uri| {
        let current = material.borrow().clone();
        async move {
            let m = current
                .ok_or_else(|| io::Error::other("no certificate from the node agent yet"))?;
            connect_tls(&uri, &m.chain_pem, &m.key_pem, &m.roots_pem)
                .await
                .map(hyper_util::rt::TokioIo::new)
        }
    }));
    Ok(ambit_xds::channel::ControlPlane::from_channel(
        address, channel,
    ))
}

/// One TLS 1.3 connection (ALPN h2) to `uri`'s host and port, presenting the chain and
/// key given, the server verified against `roots_pem` for `uri`'s host (an IP or DNS
/// name).
pub async fn connect_tls(
    uri: &Uri,
    chain_pem: &str,
    key_pem: &str,
    roots_pem: &str,
) -> io::Result<TlsStream<TcpStream>> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{what}: {e}"))
    };
    let host = uri
        .host()
        .ok_or_else(|| bad("control plane address", &"no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots
            .add(c.map_err(|e| bad("mesh roots", &e))?)
            .map_err(|e| bad("mesh roots", &e))?;
    }
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("certificate chain", &e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad("key", &e))?;
    let mut config = rustls::ClientConfig::builder_with_provider(ambit_hbone::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad("TLS", &e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad("client certificate", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(host.clone()).map_err(|e| bad("server name", &e))?;
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    let _ = tcp.set_nodelay(true);
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
}
