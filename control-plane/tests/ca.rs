//! The CA's gRPC service: node-scoped signing, chains, SANs, lifetimes, persistence.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambit_control_plane::auth::NodeTokens;
use ambit_control_plane::ca::{CaService, CertificateAuthority};
use ambit_control_plane::source::file::parse;
use ambit_xds::ambit::CreateCertificateRequest;
use ambit_xds::ambit::certificate_service_client::CertificateServiceClient;
use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

const MESH: &str = "
namespaces: [{name: shop}]
nodes: [{name: node-1}, {name: node-2}]
workloads:
  - {name: web-0, namespace: shop, node: node-1, serviceAccount: web, ips: [10.244.1.10]}
  - {name: db-0, namespace: shop, node: node-2, serviceAccount: db, ips: [10.244.2.10]}
";

struct Ca {
    dir: std::path::PathBuf,
    addr: std::net::SocketAddr,
    root_pem: String,
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start(dir: &Path) -> (std::net::SocketAddr, String) {
    let model = Arc::new(parse(Path::new("t.yaml"), MESH).unwrap());
    let ca = Arc::new(
        CertificateAuthority::load_or_create(
            &dir.join("ca"),
            Duration::from_secs(86400),
            Duration::from_secs(3600 * 48),
        )
        .unwrap(),
    );
    let tokens = NodeTokens::new(dir.join("tokens")).unwrap();
    tokens.ensure(&model).unwrap();
    // The sender may go: receivers keep reading the last model.
    let (_, rx) = watch::channel(model);
    let root = ca.root_pem().to_owned();
    let svc = CaService::new(ca, Arc::new(tokens), rx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc.into_service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, root)
}

async fn ca() -> Ca {
    let dir = std::env::temp_dir().join(format!(
        "ambit-ca-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let (addr, root_pem) = start(&dir).await;
    Ca {
        dir,
        addr,
        root_pem,
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(0u8)
}

fn csr(sans: &[&str]) -> String {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI((*s).try_into().unwrap()))
        .collect();
    p.serialize_request(&key).unwrap().pem().unwrap()
}

impl Ca {
    fn token(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.join("tokens").join(format!("{node}.token"))).unwrap()
    }

    async fn request(
        &self,
        token: Option<&str>,
        csr: String,
        ttl: i64,
    ) -> Result<Vec<String>, tonic::Status> {
        let mut client = CertificateServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap();
        let mut req = tonic::Request::new(CreateCertificateRequest {
            csr,
            validity_seconds: ttl,
        });
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        client
            .create_certificate(req)
            .await
            .map(|r| r.into_inner().cert_chain)
    }
}

fn der(pem: &str) -> Vec<u8> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    p.contents
}

#[tokio::test]
async fn signs_local_identities_and_refuses_the_rest() {
    let ca = ca().await;
    let id = "spiffe://cluster.local/ns/shop/sa/web";
    let chain = ca
        .request(Some(&ca.token("node-1")), csr(&[id]), 3600)
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], ca.root_pem);

    let (leaf_der, root_der) = (der(&chain[0]), der(&ca.root_pem));
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    leaf.verify_signature(Some(root.public_key()))
        .expect("the leaf chains to the root");
    assert!(!leaf.is_ca());
    let sans: Vec<String> = leaf
        .extensions()
        .iter()
        .filter_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(s) => {
                Some(s.general_names.iter().map(|g| match g {
                    GeneralName::URI(u) => u.to_string(),
                    other => format!("{other:?}"),
                }))
            }
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(sans, [id]);
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(
        (3600..=3600 + 120).contains(&lifetime),
        "lifetime {lifetime}"
    );

    // db runs on node-2: node-1 may not have it.
    let err = ca
        .request(
            Some(&ca.token("node-1")),
            csr(&["spiffe://cluster.local/ns/shop/sa/db"]),
            0,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // node-2 may.
    ca.request(
        Some(&ca.token("node-2")),
        csr(&["spiffe://cluster.local/ns/shop/sa/db"]),
        0,
    )
    .await
    .unwrap();
    // Other trust domain, several SANs, garbage.
    let err = ca
        .request(
            Some(&ca.token("node-1")),
            csr(&["spiffe://evil/ns/shop/sa/web"]),
            0,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = ca
        .request(
            Some(&ca.token("node-1")),
            csr(&[id, "spiffe://cluster.local/ns/shop/sa/db"]),
            0,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = ca
        .request(
            Some(&ca.token("node-1")),
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
            0,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn refuses_unknown_callers_caps_lifetimes_and_keeps_its_root() {
    let ca = ca().await;
    let id = "spiffe://cluster.local/ns/shop/sa/web";
    assert_eq!(
        ca.request(None, csr(&[id]), 0).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        ca.request(Some("not-a-token"), csr(&[id]), 0)
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );

    // Default lifetime 24 h; a week is capped at the 48 h maximum.
    let chain = ca
        .request(Some(&ca.token("node-1")), csr(&[id]), 0)
        .await
        .unwrap();
    let d = der(&chain[0]);
    let (_, leaf) = X509Certificate::from_der(&d).unwrap();
    assert!(
        (leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp() - 86400)
            .abs()
            <= 120
    );
    let chain = ca
        .request(Some(&ca.token("node-1")), csr(&[id]), 7 * 86400)
        .await
        .unwrap();
    let d = der(&chain[0]);
    let (_, leaf) = X509Certificate::from_der(&d).unwrap();
    assert!(
        leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp()
            <= 48 * 3600 + 120
    );

    // Restarting from the same directory keeps the root and the node credentials.
    let (_, root_again) = start(&ca.dir).await;
    assert_eq!(root_again, ca.root_pem);
}
