//! The waypoint's channel to the control plane presents, on every (re)connection, the
//! certificate current at that moment: after the node agent renews it (SDS), the next
//! connection shows the new one. (With a certificate fixed at start, a reconnect after
//! the first certificate's expiry would be refused.)

mod common;

use std::sync::{Arc, Mutex};

use ambit_identity::Identity;
use ambit_waypoint::identity::Certs;
use ambit_waypoint::sds::Material;
use common::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

const WP: &str = "spiffe://cluster.local/ns/shop/sa/wp";

fn material(pki: &Pki) -> Material {
    let (chain, key) = pki.leaf(WP);
    Material {
        certs: Arc::new(
            Certs::from_pem(Identity::parse(WP).unwrap(), &chain, &key, &pki.root).unwrap(),
        ),
        chain_pem: chain.concat(),
        key_pem: key,
        roots_pem: pki.root.clone(),
    }
}

/// A TLS server on loopback that requires a client certificate of the mesh root, records
/// each one, and closes the connection.
async fn recording_server(pki: &Pki) -> (std::net::SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let (chain, key) = pki.server_for_ip("127.0.0.1".parse().unwrap());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.root.as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        ambit_hbone::tls::provider(),
    )
    .build()
    .unwrap();
    let certs = chain
        .iter()
        .map(|c| CertificateDer::from_pem_slice(c.as_bytes()).unwrap())
        .collect();
    let mut config = rustls::ServerConfig::builder_with_provider(ambit_hbone::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs,
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(tls) = acceptor.accept(tcp).await {
                let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
                record.lock().unwrap().push(leaf);
            }
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn every_connection_to_the_control_plane_presents_the_current_certificate() {
    let pki = Pki::new();
    let (addr, seen) = recording_server(&pki).await;
    let first = material(&pki);
    let (tx, rx) = tokio::sync::watch::channel(Some(first.clone()));
    let cp = ambit_waypoint::control_plane::channel(&format!("https://{addr}"), rx).unwrap();
    let mut client = tonic::client::Grpc::new(cp.channel());

    // A call makes the channel connect; the server closes after the handshake, so the
    // call fails, but the connection shows which certificate was presented.
    let call = |client: &mut tonic::client::Grpc<tonic::transport::Channel>| {
        let mut client = client.clone();
        async move {
            let _ = client.ready().await;
            let path = http::uri::PathAndQuery::from_static("/x.X/Y");
            let _: Result<tonic::Response<()>, _> =
                client.unary(tonic::Request::new(()), path, NoCodec).await;
        }
    };
    let wait_for = |n: usize| {
        let seen = seen.clone();
        async move {
            for _ in 0..200 {
                if seen.lock().unwrap().len() >= n {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            panic!("no connection {n}");
        }
    };
    call(&mut client).await;
    wait_for(1).await;
    // The agent renews the certificate.
    let renewed = material(&pki);
    assert_ne!(renewed.chain_pem, first.chain_pem);
    tx.send_replace(Some(renewed.clone()));
    call(&mut client).await;
    wait_for(2).await;

    let leaf = |m: &Material| {
        CertificateDer::from_pem_slice(m.chain_pem.as_bytes())
            .unwrap()
            .to_vec()
    };
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen[0],
        leaf(&first),
        "the first connection used the first certificate"
    );
    assert_eq!(
        seen.last().unwrap(),
        &leaf(&renewed),
        "the reconnection used the renewed certificate"
    );
}

/// A codec that sends and expects nothing (the call only has to make a connection).
#[derive(Default)]
struct NoCodec;

impl tonic::codec::Codec for NoCodec {
    type Encode = ();
    type Decode = ();
    type Encoder = NoCodec;
    type Decoder = NoCodec;
    fn encoder(&mut self) -> Self::Encoder {
        NoCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        NoCodec
    }
}

impl tonic::codec::Encoder for NoCodec {
    type Item = ();
    type Error = tonic::Status;
    fn encode(&mut self, _: (), _: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl tonic::codec::Decoder for NoCodec {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, _: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, Self::Error> {
        Ok(Some(()))
    }
}
