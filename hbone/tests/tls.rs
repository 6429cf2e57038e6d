//! HBONE's mutual TLS over loopback: who is accepted and who is refused, on both sides.

mod common;

use std::sync::Arc;

use ambit_hbone::tls::{
    ALPN_H2, Crypto, MeshRoots, WorkloadKey, client_config, client_config_with, peer_identity,
    provider_with, server_config, server_config_with,
};
use common::*;
use rustls::NamedGroup;
use rustls::crypto::{CryptoProvider, SupportedKxGroup, aws_lc_rs, ring};
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
    let server = server_config(&server_key, server_roots, "cluster.local").unwrap();
    let client = client_config(
        &client_key,
        client_roots,
        allowed
            .iter()
            .map(|s| ambit_identity::Identity::parse(s).unwrap()),
    )
    .unwrap();
    let (srv, cli) = handshake_with(server, client).await;
    (srv.map(|(id, _)| id), cli.map(|(id, _)| id))
}

type Seen = Result<(String, Option<NamedGroup>), String>;

/// Runs one handshake between these configs on every pairing of the two TLS stream
/// implementations (tokio-rustls, which the waypoint uses, and `tls_stream`, which the
/// agents use), checks that all four agree, and returns what each side of the
/// `tls_stream` pair saw: its peer's identity and the key exchange, or its error.
async fn handshake_with(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> (Seen, Seen) {
    let mut results = Vec::new();
    for ours_server in [false, true] {
        for ours_client in [false, true] {
            let r = handshake_once(server.clone(), client.clone(), ours_server, ours_client).await;
            results.push(((ours_server, ours_client), r));
        }
    }
    let ((_, last), rest) = results.split_last().unwrap();
    for (pairing, r) in rest {
        // Errors may be worded by either end's implementation; success must be identical.
        assert_eq!(
            (
                r.0.as_ref().ok(),
                r.1.as_ref().ok(),
                r.0.is_ok(),
                r.1.is_ok()
            ),
            (
                last.0.as_ref().ok(),
                last.1.as_ref().ok(),
                last.0.is_ok(),
                last.1.is_ok()
            ),
            "pairing (ours server, ours client) = {pairing:?} differs: {r:?} / {last:?}"
        );
    }
    last.clone()
}

/// After the handshake, each side echoes four bytes.
async fn ping<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut tls: S,
    first: bool,
) -> Result<(), String> {
    let mut b = [0u8; 4];
    if first {
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    } else {
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        tls.write_all(&b).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn handshake_once(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    ours_server: bool,
    ours_client: bool,
) -> (Seen, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        if ours_server {
            let tls = ambit_hbone::tls_stream::accept(server, tcp)
                .await
                .map_err(|e| e.to_string())?;
            assert_eq!(tls.alpn_protocol(), Some(ALPN_H2));
            let group = tls.key_exchange_group();
            let id = tls
                .peer_identity()
                .map(|i| i.to_string())
                .ok_or("no peer identity")?;
            ping(tls, false).await?;
            Ok((id, group))
        } else {
            let tls = tokio_rustls::TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let (_, conn) = tls.get_ref();
            assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            let group = conn.negotiated_key_exchange_group().map(|g| g.name());
            let id = peer_identity(conn)
                .map(|i| i.to_string())
                .ok_or("no peer identity".to_string())?;
            ping(tls, false).await?;
            Ok((id, group))
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let cli = async {
        if ours_client {
            let tls = ambit_hbone::tls_stream::connect(client, name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            let group = tls.key_exchange_group();
            let id = tls
                .peer_identity()
                .map(|i| i.to_string())
                .ok_or("no peer identity")?;
            ping(tls, true).await?;
            Ok::<_, String>((id, group))
        } else {
            let tls = tokio_rustls::TlsConnector::from(client)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            let conn = tls.get_ref().1;
            let group = conn.negotiated_key_exchange_group().map(|g| g.name());
            let id = peer_identity(conn)
                .map(|i| i.to_string())
                .ok_or("no peer identity".to_string())?;
            ping(tls, true).await?;
            Ok::<_, String>((id, group))
        }
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

/// Ambit's provider with only these key exchanges offered: a peer of another kind.
fn offering(groups: &[&'static dyn SupportedKxGroup]) -> Arc<CryptoProvider> {
    provider_with(Crypto::DEFAULT, groups)
}

/// Key exchange against the peers Ambit meets: another Ambit (hybrid post-quantum), a
/// peer that requires it (Istio's ztunnel under `COMPLIANCE_POLICY=pqc`, which offers and
/// accepts only X25519MLKEM768), and a peer without it (X25519 only, as ring-based
/// implementations are) — each in both directions.
#[tokio::test]
async fn post_quantum_key_exchange_is_preferred_required_peers_connect_and_classic_peers_still_do()
{
    let ca = ca();
    let roots = MeshRoots::from_pem(&ca.pem).unwrap();
    let (server_key, client_key) = (leaf(&ca, WEB), leaf(&ca, FRONTEND));
    let allowed = || [ambit_identity::Identity::parse(WEB).unwrap()];
    let ambit_server = || server_config(&server_key, &roots, "cluster.local").unwrap();
    let ambit_client = || client_config(&client_key, &roots, allowed()).unwrap();
    let peer_server = |groups: &[&'static dyn SupportedKxGroup]| {
        server_config_with(offering(groups), &server_key, &roots, "cluster.local").unwrap()
    };
    let peer_client = |groups: &[&'static dyn SupportedKxGroup]| {
        client_config_with(offering(groups), &client_key, &roots, allowed()).unwrap()
    };
    let pqc_only = [aws_lc_rs::kx_group::X25519MLKEM768];
    let classic = [ring::kx_group::X25519, ring::kx_group::SECP256R1];
    let cases = [
        (
            "Ambit to Ambit",
            ambit_server(),
            ambit_client(),
            NamedGroup::X25519MLKEM768,
        ),
        (
            "Ambit to a pqc-only server",
            peer_server(&pqc_only),
            ambit_client(),
            NamedGroup::X25519MLKEM768,
        ),
        (
            "a pqc-only client to Ambit",
            ambit_server(),
            peer_client(&pqc_only),
            NamedGroup::X25519MLKEM768,
        ),
        (
            "Ambit to a classic server",
            peer_server(&classic),
            ambit_client(),
            NamedGroup::X25519,
        ),
        (
            "a classic client to Ambit",
            ambit_server(),
            peer_client(&classic),
            NamedGroup::X25519,
        ),
    ];
    for (case, server, client, group) in cases {
        let (srv, cli) = handshake_with(server, client).await;
        assert_eq!(
            srv,
            Ok((FRONTEND.to_owned(), Some(group))),
            "{case}: the server side"
        );
        assert_eq!(
            cli,
            Ok((WEB.to_owned(), Some(group))),
            "{case}: the client side"
        );
    }

    // A peer with no group in common is refused with rustls's reason, not a hang.
    let (srv, cli) = handshake_with(
        peer_server(&pqc_only),
        peer_client(&[ring::kx_group::SECP256R1]),
    )
    .await;
    let (srv, cli) = (srv.unwrap_err(), cli.unwrap_err());
    assert!(srv.contains("NoKxGroupsInCommon"), "{srv}");
    assert!(cli.contains("HandshakeFailure"), "{cli}");
}

#[test]
fn unusable_material_is_a_clear_error() {
    assert!(MeshRoots::from_pem("").is_err());
    assert!(WorkloadKey::from_pem(&[], "").is_err());
}
