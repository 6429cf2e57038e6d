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

/// The `baggage` [`hbone_probe`] sends: ztunnel's form, for a deployment `ratings-v1`.
pub const PROBE_BAGGAGE: &str = "k8s.cluster.name=east,k8s.namespace.name=default,\
    k8s.deployment.name=ratings-v1,service.name=ratings,service.version=v1";

/// Connects to `addr` from node `n`'s namespace (outside every pod), presenting `client`
/// and expecting the server to be `server_id`; opens one CONNECT to `authority` (with
/// [`PROBE_BAGGAGE`]).
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
            // It says who it is as a ztunnel's peer would: the agent cannot know it (it
            // dials from the node, not from a pod), so its telemetry takes these names.
            let headers = ambit_hbone::connect::ConnectHeaders {
                source: "172.18.0.1".parse().unwrap(),
                traceparent: "00-0-0-00",
                baggage: Some(PROBE_BAGGAGE),
                host: None,
            };
            let mut s = client
                .connect_with(authority, &headers)
                .await
                .map_err(|e| e.to_string())?;
            use tokio::io::AsyncReadExt;
            let mut hello = [0u8; 5];
            s.read_exact(&mut hello).await.map_err(|e| e.to_string())?;
            Ok(())
        })
    })
}
