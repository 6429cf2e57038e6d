//! HBONE's mutual TLS over loopback: who is accepted and who is refused, on both sides.

mod common;

use ambit_hbone::tls::{
    ALPN_H2, MeshRoots, WorkloadKey, client_config, peer_identity, server_config,
};
use common::*;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Runs one handshake; returns what each side saw (peer identity) or its error.
async fn handshake(
    server_key: WorkloadKey,
    server_roots: &MeshRoots,
    client_key: WorkloadKey,
    client_roots: &MeshRoots,
    allowed: &[&str],
) -> (Result<String, String>, Result<String, String>) {
    let server = tokio_rustls::TlsAcceptor::from(
        server_config(&server_key, server_roots, "cluster.local").unwrap(),
    );
    let client = tokio_rustls::TlsConnector::from(
        client_config(
            &client_key,
            client_roots,
            allowed
                .iter()
                .map(|s| ambit_identity::Identity::parse(s).unwrap()),
        )
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match server.accept(tcp).await {
            Ok(mut tls) => {
                let (_, conn) = tls.get_ref();
                assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
                assert_eq!(
                    conn.protocol_version(),
                    Some(rustls::ProtocolVersion::TLSv1_3)
                );
                let id = peer_identity(conn)
                    .map(|i| i.to_string())
                    .ok_or("no peer identity".to_string());
                let mut b = [0u8; 4];
                tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
                tls.write_all(&b).await.map_err(|e| e.to_string())?;
                id
            }
            Err(e) => Err(e.to_string()),
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let cli = async {
        let mut tls = client.connect(name, tcp).await.map_err(|e| e.to_string())?;
        let id = peer_identity(tls.get_ref().1)
            .map(|i| i.to_string())
            .ok_or("no peer identity".to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 4];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(id)
    }
    .await;
    (srv.await.unwrap(), cli)
}

#[tokio::test]
async fn the_right_identities_on_the_same_root_talk() {
    let ca = ca();
    let roots = MeshRoots::from_pem(&ca.pem).unwrap();
    let (srv, cli) = handshake(leaf(&ca, WEB), &roots, leaf(&ca, FRONTEND), &roots, &[WEB]).await;
    assert_eq!(
        srv.unwrap(),
        FRONTEND,
        "the server sees the client's identity"
    );
    assert_eq!(cli.unwrap(), WEB, "the client sees the server's identity");
}

#[tokio::test]
async fn the_client_refuses_a_valid_certificate_with_the_wrong_identity() {
    let ca = ca();
    let roots = MeshRoots::from_pem(&ca.pem).unwrap();
    let (srv, cli) = handshake(
        leaf(&ca, FRONTEND),
        &roots,
        leaf(&ca, FRONTEND),
        &roots,
        &[WEB],
    )
    .await;
    let e = cli.unwrap_err();
    assert!(
        e.contains("UnexpectedIdentity") && e.contains("sa/frontend"),
        "{e}"
    );
    assert!(srv.is_err());
}

#[tokio::test]
async fn a_server_from_another_root_is_refused_by_the_client() {
    let ca = ca();
    let roots = MeshRoots::from_pem(&ca.pem).unwrap();
    // The second is an impostor: another key under the mesh root's very name.
    for (other, want) in [
        (ca_named("Some other CA"), "unknownissuer"),
        (ca_named(ROOT_NAME), "badsignature"),
    ] {
        let other_roots = MeshRoots::from_pem(&other.pem).unwrap();
        let (_, cli) = handshake(
            leaf(&other, WEB),
            &other_roots,
            leaf(&ca, FRONTEND),
            &roots,
            &[WEB],
        )
        .await;
        let e = cli.unwrap_err().to_lowercase();
        assert!(e.contains(want), "{e}");
    }
}

#[tokio::test]
async fn a_client_from_another_root_or_trust_domain_is_refused_by_the_server() {
    let ca = ca();
    let roots = MeshRoots::from_pem(&ca.pem).unwrap();
    for other in [ca_named("Some other CA"), ca_named(ROOT_NAME)] {
        let (srv, cli) = handshake(
            leaf(&ca, WEB),
            &roots,
            leaf(&other, FRONTEND),
            &roots,
            &[WEB],
        )
        .await;
        let e = srv.unwrap_err().to_lowercase();
        assert!(
            e.contains("unknownissuer") || e.contains("badsignature"),
            "{e}"
        );
        assert!(cli.is_err());
    }

    let foreign = "spiffe://elsewhere.example/ns/shop/sa/frontend";
    let (srv, _) = handshake(leaf(&ca, WEB), &roots, leaf(&ca, foreign), &roots, &[WEB]).await;
    let e = srv.unwrap_err();
    assert!(e.contains("UnexpectedIdentity"), "{e}");
}

#[test]
fn unusable_material_is_a_clear_error() {
    assert!(MeshRoots::from_pem("").is_err());
    assert!(WorkloadKey::from_pem(&[], "").is_err());
}
