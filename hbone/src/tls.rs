//! Mutual TLS between node agents, as HBONE (and Istio) do it:
//! - TLS 1.3 only, AES-GCM suites, ALPN `h2`, no SNI;
//! - certificates carry one SPIFFE URI SAN, `spiffe://<trust domain>/ns/<ns>/sa/<sa>`;
//! - the **client** requires the server's identity to be one the destination may have
//!   (from xDS) and its chain to reach the mesh root;
//! - the **server** requires the client to chain to the mesh root and to belong to the
//!   trust domain, then hands the client's identity to authorization.
//!
//! A certificate that chains to the root but names an unexpected identity is refused.
//! DNS names play no part: [`SpiffeVerifier`] verifies chains with webpki directly.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use ambit_identity::Identity;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};

/// The ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The PEM held no certificate.
    #[error("no certificate in the PEM chain")]
    NoCertificate,
    /// The PEM could not be read.
    #[error("reading PEM: {0}")]
    Pem(String),
    /// The root is not usable as a trust anchor.
    #[error("the root certificate cannot be a trust anchor: {0}")]
    Root(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A peer proved an identity, but not one this side accepts (the certificate chains to
/// the mesh root). Carried inside the handshake's `rustls::Error` so a caller can tell
/// an impostor from a broken handshake.
#[derive(Debug, Clone, thiserror::Error)]
#[error("peer identity {found} is not acceptable here")]
pub struct UnexpectedIdentity {
    /// The identity the peer presented.
    pub found: Identity,
}

impl UnexpectedIdentity {
    /// The `rustls::Error` a verifier returns for `found`.
    pub fn rustls_error(found: Identity) -> rustls::Error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(Self { found }),
        )))
    }

    /// The unexpected identity inside a handshake error, if that is what it was.
    pub fn from_rustls(e: &rustls::Error) -> Option<&Self> {
        match e {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
                o.0.downcast_ref::<Self>()
            }
            _ => None,
        }
    }
}

/// A workload's certificate chain (leaf first) and private key.
pub struct WorkloadKey {
    /// Leaf first; without the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadKey")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl WorkloadKey {
    /// From PEM: the chain as the CA returned it (leaf first; a trailing self-signed root
    /// is dropped, peers have it) and the PKCS#8 key.
    pub fn from_pem(chain: &[String], key_pem: &str) -> Result<Self, TlsError> {
        let mut certs = Vec::new();
        for pem in chain {
            certs.push(
                CertificateDer::from_pem_slice(pem.as_bytes())
                    .map_err(|e| TlsError::Pem(e.to_string()))?,
            );
        }
        if certs.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        if certs.len() > 1 {
            certs.pop();
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        Ok(Self { chain: certs, key })
    }
}

/// The mesh root(s) peers must chain to.
#[derive(Clone, Debug)]
pub struct MeshRoots(Arc<Vec<TrustAnchor<'static>>>);

impl MeshRoots {
    /// Every certificate of `pem` as a trust anchor.
    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let mut anchors = Vec::new();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| TlsError::Pem(e.to_string()))?;
            let anchor = webpki::anchor_from_trusted_cert(&cert)
                .map_err(|e| TlsError::Root(e.to_string()))?;
            anchors.push(anchor.to_owned());
        }
        if anchors.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        Ok(Self(Arc::new(anchors)))
    }
}

/// Which peer identities a side accepts.
#[derive(Clone, Debug)]
enum Accept {
    /// Exactly one of these SPIFFE IDs (a client dialing a workload).
    Identities(BTreeSet<Identity>),
    /// Any SPIFFE ID of this trust domain (a server; authorization decides later).
    TrustDomain(String),
}

/// Verifies a peer's chain against the mesh roots and its SPIFFE identity against a
/// policy. Used on both sides of HBONE.
#[derive(Debug)]
pub struct SpiffeVerifier {
    roots: MeshRoots,
    accept: Accept,
    provider: Arc<CryptoProvider>,
}

impl SpiffeVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<Identity, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots.0,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(webpki_error)?;
        let id = single_spiffe_id(end_entity).map_err(rustls::Error::General)?;
        let ok = match &self.accept {
            Accept::Identities(set) => set.contains(&id),
            Accept::TrustDomain(td) => id.trust_domain() == td,
        };
        if !ok {
            return Err(UnexpectedIdentity::rustls_error(id));
        }
        Ok(id)
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use rustls::CertificateError as C;
    rustls::Error::InvalidCertificate(match e {
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        other => C::Other(rustls::OtherError(Arc::new(WebpkiError(other)))),
    })
}

#[derive(Debug)]
struct WebpkiError(webpki::Error);

impl fmt::Display for WebpkiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::error::Error for WebpkiError {}

/// The library behind a provider's ciphers, signatures and key loading. Key exchange is
/// always aws-lc-rs's (see [`KX_GROUPS`]): ring has no ML-KEM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crypto {
    /// ring: Ambit's choice. On this machine class (AMD EPYC, AVX2 + VAES, no AVX-512)
    /// `cargo xtask bench tls` measured it 1.2x aws-lc-rs's AES-128-GCM bulk rate and
    /// 1.09x its mutual-TLS handshakes (ECDSA P-256).
    Ring,
    /// AWS-LC (aws-lc-rs): kept to compare against in the benchmark.
    AwsLcRs,
}

impl Crypto {
    /// What Ambit uses.
    pub const DEFAULT: Crypto = Crypto::Ring;
}

/// Key exchange, best first: the hybrid post-quantum X25519MLKEM768 (what Istio's
/// ztunnel offers first and, under `COMPLIANCE_POLICY=pqc`, requires), then X25519 and
/// P-256 for peers without it. A client's first flight carries an X25519MLKEM768 share
/// and (rustls reuses its X25519 half) an X25519 one, so either kind of server answers
/// without a HelloRetryRequest.
pub static KX_GROUPS: &[&dyn rustls::crypto::SupportedKxGroup] = &[
    rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768,
    rustls::crypto::aws_lc_rs::kx_group::X25519,
    rustls::crypto::aws_lc_rs::kx_group::SECP256R1,
];

/// The provider every TLS config Ambit makes shares: [`Crypto::DEFAULT`], TLS 1.3 AES-GCM
/// suites only, key exchange [`KX_GROUPS`].
pub fn provider() -> Arc<CryptoProvider> {
    provider_with(Crypto::DEFAULT, KX_GROUPS)
}

/// Makes [`provider`] the process's default, for the libraries that build their TLS
/// configs on rustls's default (tonic, kube, hyper-rustls): with two libraries compiled in
/// (ring, and aws-lc-rs for ML-KEM), rustls cannot pick one and would panic. Every Ambit
/// binary calls it first; calling it again does nothing.
pub fn install_default() {
    if CryptoProvider::get_default().is_none() {
        // Err: another thread installed one in between, which is as good.
        let _ = CryptoProvider::clone(&provider()).install_default();
    }
}

/// A provider on `crypto` offering `kx_groups`, with [`provider`]'s suites (the
/// benchmark compares libraries, tests play peers of other kinds; everything else uses
/// [`provider`]).
pub fn provider_with(
    crypto: Crypto,
    kx_groups: &[&'static dyn rustls::crypto::SupportedKxGroup],
) -> Arc<CryptoProvider> {
    use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    let base = match crypto {
        Crypto::Ring => rustls::crypto::ring::default_provider(),
        Crypto::AwsLcRs => rustls::crypto::aws_lc_rs::default_provider(),
    };
    // TLS 1.3 AES-GCM only, AES-128 first.
    let cipher_suites = [TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384]
        .iter()
        .filter_map(|id| {
            base.cipher_suites
                .iter()
                .find(|s| s.suite() == *id)
                .copied()
        })
        .collect();
    Arc::new(CryptoProvider {
        cipher_suites,
        kx_groups: kx_groups.to_vec(),
        ..base
    })
}

/// Server side: requires a client certificate of `trust_domain` chaining to `roots`.
pub fn server_config(
    key: &WorkloadKey,
    roots: &MeshRoots,
    trust_domain: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_with(provider(), key, roots, trust_domain)
}

/// [`server_config`] on another provider (the benchmark's and tests' way to try one).
pub fn server_config_with(
    provider: Arc<CryptoProvider>,
    key: &WorkloadKey,
    roots: &MeshRoots,
    trust_domain: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = Arc::new(SpiffeVerifier {
        roots: roots.clone(),
        accept: Accept::TrustDomain(trust_domain.to_owned()),
        provider: provider.clone(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(key.chain.clone(), key.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // The agents frame records themselves once the handshake is done
    // (`crate::tls_stream`), which takes the traffic secrets.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// Client side: presents `key`, accepts only a server whose identity is in `allowed`.
pub fn client_config(
    key: &WorkloadKey,
    roots: &MeshRoots,
    allowed: impl IntoIterator<Item = Identity>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_with(provider(), key, roots, allowed)
}

/// [`client_config`] on another provider (the benchmark's and tests' way to try one).
pub fn client_config_with(
    provider: Arc<CryptoProvider>,
    key: &WorkloadKey,
    roots: &MeshRoots,
    allowed: impl IntoIterator<Item = Identity>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let verifier = Arc::new(SpiffeVerifier {
        roots: roots.clone(),
        accept: Accept::Identities(allowed.into_iter().collect()),
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(key.chain.clone(), key.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The SPIFFE identity of a (verified) peer: its end-entity certificate's one SPIFFE URI.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    single_spiffe_id(conn.peer_certificates()?.first()?).ok()
}

/// The certificate's SPIFFE ID; an error unless it has exactly one URI SAN and it is a
/// mesh identity.
pub fn single_spiffe_id(cert: &CertificateDer<'_>) -> Result<Identity, String> {
    Identity::from_certificate(cert)
}
