//! Test PKI: root CAs and workload certificates made the way Ambit's CA makes them.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ambit_hbone::connect::{ConnectRequest, HboneClient, Pipe, Refusal, serve};
use ambit_hbone::tls::{MeshRoots, WorkloadKey, client_config, server_config};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

pub struct Ca {
    pub issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

/// A root CA named `name` (two CAs with one name: an impostor root).
pub fn ca_named(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).unwrap();
    let pem = cert.pem();
    Ca {
        issuer: Issuer::from_ca_cert_pem(&pem, key).unwrap(),
        pem,
    }
}

pub const ROOT_NAME: &str = "Ambit root CA";

pub fn ca() -> Ca {
    ca_named(ROOT_NAME)
}

/// A workload certificate as Ambit's CA makes them.
pub fn leaf(ca: &Ca, id: &str) -> WorkloadKey {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.is_ca = IsCa::ExplicitNoCa;
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    WorkloadKey::from_pem(&[cert.pem(), ca.pem.clone()], &key.serialize_pem()).unwrap()
}

pub const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
pub const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

/// An echo server on loopback; returns its address.
pub async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An HBONE server (identity WEB) whose handler refuses `denied` ports, reports 503 for
/// `unreachable` ports, and otherwise dials the authority. Records every request.
pub async fn hbone_server(
    ca: &Ca,
    denied: u16,
    unreachable: u16,
) -> (SocketAddr, Arc<Mutex<Vec<ConnectRequest>>>) {
    let roots = MeshRoots::from_pem(&ca.pem).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(
        server_config(&leaf(ca, WEB), &roots, "cluster.local").unwrap(),
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = serve(tls, move |req: ConnectRequest| {
                    let log = log.clone();
                    async move {
                        log.lock().unwrap().push(req.clone());
                        match req.authority.port() {
                            p if p == denied => Err(Refusal::Denied),
                            p if p == unreachable => Err(Refusal::Unreachable),
                            _ => TcpStream::connect(req.authority)
                                .await
                                .map(Pipe)
                                .map_err(|_| Refusal::Unreachable),
                        }
                    }
                })
                .await;
            });
        }
    });
    (addr, seen)
}

pub async fn client(ca: &Ca, server: SocketAddr) -> HboneClient {
    let roots = MeshRoots::from_pem(&ca.pem).unwrap();
    let connector = tokio_rustls::TlsConnector::from(
        client_config(
            &leaf(ca, FRONTEND),
            &roots,
            [ambit_identity::Identity::parse(WEB).unwrap()],
        )
        .unwrap(),
    );
    let tcp = TcpStream::connect(server).await.unwrap();
    let tls = connector
        .connect(ServerName::IpAddress(server.ip().into()), tcp)
        .await
        .unwrap();
    HboneClient::handshake(tls).await.unwrap()
}

pub fn pattern(n: usize, seed: usize) -> Vec<u8> {
    (0..n).map(|i| ((i + seed * 7) % 251) as u8).collect()
}
