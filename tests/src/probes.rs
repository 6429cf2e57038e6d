//! Probes the end-to-end tests run from outside every pod: code in a node's namespace,
//! and a hand-made HBONE client that presents a chosen certificate.

use crate::{Cluster, pki};

/// Runs `f` on a tokio runtime whose sockets are created inside `netns`.
pub fn in_netns<T: Send + 'static>(
    netns: std::path::PathBuf,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        ambit_mesh::netns::Netns::open(&netns)
            .unwrap()
            .enter()
            .unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// Connects to `addr` from node `n`'s namespace (outside every pod), presenting `client`
/// and expecting the server to be `server_id`; opens one CONNECT to `authority`.
pub fn hbone_probe(
    c: &Cluster,
    n: usize,
    addr: std::net::SocketAddr,
    client: (Vec<String>, String),
    server_id: &str,
    authority: std::net::SocketAddr,
) -> Result<(), String> {
    use ambit_hbone::tls::{MeshRoots, WorkloadKey};
    let roots = MeshRoots::from_pem(&pki::mesh_root(&c.ca_dir()).pem).unwrap();
    let server_id = ambit_identity::Identity::parse(server_id).map_err(|e| e.to_string())?;
    in_netns(c.node(n).netns_path(), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            let (chain, key) = client;
            let config = ambit_hbone::tls::client_config(
                &WorkloadKey::from_pem(&chain, &key).unwrap(),
                &roots,
                [server_id],
            )
            .unwrap();
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            let client = ambit_hbone::connect::HboneClient::handshake(tls)
                .await
                .map_err(|e| format!("h2: {e}"))?;
            let mut s = client
                .connect(authority, "172.18.0.1".parse().unwrap(), "00-0-0-00")
                .await
                .map_err(|e| e.to_string())?;
            use tokio::io::AsyncReadExt;
            let mut hello = [0u8; 5];
            s.read_exact(&mut hello).await.map_err(|e| e.to_string())?;
            Ok(())
        })
    })
}
