//! The certificate authority: signs short-lived workload certificates with SPIFFE
//! identities, for node agents, one node's workloads at a time.
//!
//! - The root (ECDSA P-256) is read from `<ca-dir>/root-cert.pem` and `root-key.pem`, or
//!   generated on first start and written there (the key with mode 0600); on Kubernetes
//!   it lives in a Secret shared by the replicas ([`secret`]).
//! - A caller authenticates as a node ([`crate::auth`]) and may obtain certificates only for identities of workloads
//!   that the current model places on that node; or as a waypoint's pod (by its bound
//!   ServiceAccount token), and then only for that waypoint's identity. Everything else
//!   is refused and logged.
//! - Only the CSR's public key and its single SPIFFE URI SAN are used: the certificate's
//!   other fields are the CA's own (validity, key usages, no subject).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambit_xds::ambit::certificate_service_server::{CertificateService, CertificateServiceServer};
use ambit_xds::ambit::{CreateCertificateRequest, CreateCertificateResponse};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use ambit_identity::Identity;

pub mod secret;

use crate::auth::{Authenticator, Caller};
use crate::model::Model;

/// Why the CA could not start.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CA directory or a root file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Reading, generating or signing the root failed.
    #[error("{what}: {source}")]
    Crypto {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: rcgen::Error,
    },
}

/// A new self-signed root (ECDSA P-256, ten years): `(certificate PEM, key PEM)`.
pub fn generate_root() -> Result<(String, String), CaError> {
    let crypto = |what| move |source| CaError::Crypto { what, source };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(crypto("generating the root key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Ambit");
    params
        .distinguished_name
        .push(DnType::CommonName, "Ambit root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    params.serial_number = Some(random_serial());
    let cert = params
        .self_signed(&key)
        .map_err(crypto("signing the root"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The signing half of the CA.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    default_ttl: Duration,
    max_ttl: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("default_ttl", &self.default_ttl)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the root from `dir`, or creates and persists one there.
    pub fn load_or_create(
        dir: &Path,
        default_ttl: Duration,
        max_ttl: Duration,
    ) -> Result<Self, CaError> {
        let (cert_path, key_path) = (dir.join("root-cert.pem"), dir.join("root-key.pem"));
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Io { path, source }
        };
        let (cert_pem, key_pem) = if cert_path.exists() {
            let pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
            info!(cert = %cert_path.display(), "loaded the root CA");
            (pem, key_pem)
        } else {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            let (cert, key) = generate_root()?;
            write_private(&key_path, &key).map_err(io_err(&key_path))?;
            std::fs::write(&cert_path, &cert).map_err(io_err(&cert_path))?;
            info!(cert = %cert_path.display(), "generated a new root CA");
            (cert, key)
        };
        Self::from_pem(&cert_pem, &key_pem, default_ttl, max_ttl)
    }

    /// The CA of this root certificate and key (PEM).
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        default_ttl: Duration,
        max_ttl: Duration,
    ) -> Result<Self, CaError> {
        let crypto = |what| move |source| CaError::Crypto { what, source };
        let key = KeyPair::from_pem(key_pem).map_err(crypto("reading the root key"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(crypto("reading the root certificate"))?;
        Ok(Self {
            issuer,
            root_pem: cert_pem.to_owned(),
            default_ttl,
            max_ttl,
        })
    }

    /// The root certificate (PEM), the trust anchor for workload certificates.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// A fresh key and a certificate for the control plane's own TLS server, valid for
    /// `names` (DNS names or IP addresses) for `ttl`: `(certificate chain PEM, key PEM)`.
    /// Agents trust it because they trust the root.
    pub fn server_certificate(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        let crypto = |what| move |source| CaError::Crypto { what, source };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(crypto("generating the server key"))?;
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(crypto("the server's names"))?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "ambit-control-plane");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.is_ca = IsCa::ExplicitNoCa;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::try_from(ttl).unwrap_or(time::Duration::days(365));
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(crypto("signing the server certificate"))?;
        info!(names = ?names, "issued the control plane's server certificate");
        Ok((
            format!("{}{}", cert.pem(), self.root_pem),
            key.serialize_pem(),
        ))
    }

    /// Signs `csr_pem` for `caller` if its one SPIFFE identity is one `caller` may have
    /// in `model`: a node, the identity of a workload on that node; a pod (by its
    /// bound token), its own identity if it is a waypoint's pod (other pods get theirs
    /// from their node agent). Returns the PEM chain, leaf first.
    pub fn sign(
        &self,
        model: &Model,
        caller: &Caller,
        csr_pem: &str,
        requested: Duration,
    ) -> Result<Vec<String>, Status> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Status::invalid_argument(format!("unreadable CSR: {e}")))?;
        let uris: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::URI(u) => Some(u.as_str().to_owned()),
                _ => None,
            })
            .collect();
        let [id] = uris.as_slice() else {
            return Err(Status::invalid_argument(format!(
                "the CSR must carry exactly one URI SAN, not {}",
                uris.len()
            )));
        };
        if csr.params.subject_alt_names.len() != 1 {
            return Err(Status::invalid_argument(
                "the CSR may carry no SAN but its SPIFFE ID",
            ));
        }
        let id = Identity::parse(id)
            .ok()
            .filter(|id| id.trust_domain() == model.trust_domain)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "{id} is not a SPIFFE ID of trust domain {}",
                    model.trust_domain
                ))
            })?;
        if !model.identity_current(&id) {
            warn!(caller = ?caller, identity = %id, "refused a certificate: its ServiceAccount does not exist");
            return Err(Status::permission_denied(format!(
                "the ServiceAccount {}/{} of {id} does not exist (deleted?): the identity is revoked",
                id.namespace(),
                id.service_account()
            )));
        }
        match caller {
            Caller::Node(node) => {
                let local = model
                    .workloads
                    .values()
                    .any(|w| &w.node == node && w.identity == id);
                if !local {
                    warn!(node, identity = %id, "refused a certificate for an identity with no workload on the asking node");
                    return Err(Status::permission_denied(format!(
                        "node {node} runs no workload with identity {id}"
                    )));
                }
            }
            Caller::Pod { namespace, uid } => {
                let Some(w) = model
                    .workloads
                    .get(uid)
                    .filter(|w| &w.namespace == namespace)
                else {
                    warn!(namespace, uid, identity = %id, "refused a certificate for a pod the mesh does not know");
                    return Err(Status::permission_denied(format!(
                        "pod {uid} of {namespace} is not in the mesh (yet)"
                    )));
                };
                if !w.native_tunnel {
                    warn!(pod = %w.name, namespace, identity = %id, "refused a certificate to a pod that is not a waypoint's");
                    return Err(Status::permission_denied(format!(
                        "pod {namespace}/{} is not a waypoint's: its node agent holds its identity",
                        w.name
                    )));
                }
                if w.identity != id {
                    warn!(pod = %w.name, namespace, identity = %id, "refused a certificate for another identity");
                    return Err(Status::permission_denied(format!(
                        "pod {namespace}/{} is {}, not {id}",
                        w.name, w.identity
                    )));
                }
            }
            Caller::Workload(_) => {
                return Err(Status::permission_denied(
                    "certificates are issued to node agents and to waypoint pods by their tokens",
                ));
            }
        }
        let ttl = if requested.is_zero() {
            self.default_ttl
        } else {
            requested.min(self.max_ttl)
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|_| Status::invalid_argument("bad URI"))?,
        )];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        let now = time::OffsetDateTime::now_utc();
        // A little backdating absorbs clock skew between nodes.
        params.not_before = now - time::Duration::minutes(1);
        params.not_after =
            now + time::Duration::try_from(ttl).map_err(|_| Status::invalid_argument("bad TTL"))?;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let leaf = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(|e| Status::internal(format!("signing: {e}")))?;
        info!(caller = ?caller, identity = %id, ttl_s = ttl.as_secs(), "issued a workload certificate");
        Ok(vec![leaf.pem(), self.root_pem.clone()])
    }
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system RNG works");
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

pub(crate) fn write_private(path: &Path, contents: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

/// The gRPC `CertificateService`.
#[derive(Clone)]
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    auth: Arc<dyn Authenticator>,
    models: watch::Receiver<Arc<Model>>,
}

impl CaService {
    /// Signs with `ca` for callers `auth` authenticates, checked against the latest of `models`.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        auth: Arc<dyn Authenticator>,
        models: watch::Receiver<Arc<Model>>,
    ) -> Self {
        Self { ca, auth, models }
    }

    /// The gRPC service, ready to add to a server.
    pub fn into_service(self) -> CertificateServiceServer<Self> {
        CertificateServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let caller = crate::auth::authenticate(&*self.auth, request.metadata()).await?;
        let req = request.into_inner();
        let ttl = Duration::from_secs(req.validity_seconds.max(0) as u64);
        let model = self.models.borrow().clone();
        let chain = self.ca.sign(&model, &caller, &req.csr, ttl)?;
        Ok(Response::new(CreateCertificateResponse {
            cert_chain: chain,
        }))
    }
}
