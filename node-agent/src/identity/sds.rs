//! Envoy's Secret Discovery Service on a unix socket, for the waypoints running on this
//! node: a caller gets the certificate of the pod it runs in, and nothing else.
//!
//! Who is calling is never taken from the request: the socket's peer credentials give
//! the caller's pid, `/proc/<pid>/ns/net` its network namespace, and that namespace is
//! matched (device and inode) against the pods this agent knows. The pod must be a
//! waypoint's (a `native_tunnel` workload of this node). Resources are named as Istio
//! names them: `default` (the workload certificate and key) and `ROOTCA` (the mesh
//! roots), so a stock Envoy's SDS config works unchanged. Renewals are pushed.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use ambit_identity::Identity;
use ambit_xds::envoy::{
    Any, DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use super::{Certificates, WorkloadCert};
use crate::capture::pods::PodRegistry;
use crate::state::Store;

use ambit_xds::waypoint::{SDS_CERTIFICATE as DEFAULT, SDS_ROOTS as ROOTCA};

/// The SDS service.
#[derive(Clone)]
pub struct Sds {
    /// The mesh as xDS describes it.
    pub state: Arc<Store>,
    /// This node's certificates.
    pub certs: Arc<Certificates>,
    /// The pods this agent knows.
    pub pods: Arc<PodRegistry>,
}

impl std::fmt::Debug for Sds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sds").finish_non_exhaustive()
    }
}

/// `(device, inode)` of a namespace file.
fn ns_id(path: &Path) -> std::io::Result<(u64, u64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

impl Sds {
    /// The gRPC service.
    pub fn into_service(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self)
    }

    /// The identity the calling process may have.
    fn caller<T>(&self, req: &Request<T>) -> Result<Identity, Status> {
        let pid = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .and_then(|c| c.pid())
            .ok_or_else(|| Status::unauthenticated("no peer credentials on the socket"))?;
        let theirs = ns_id(Path::new(&format!("/proc/{pid}/ns/net")))
            .map_err(|e| Status::unauthenticated(format!("pid {pid}: {e}")))?;
        let pod = self
            .pods
            .known()
            .into_iter()
            .find(|p| ns_id(Path::new(&p.netns)).is_ok_and(|id| id == theirs))
            .ok_or_else(|| {
                Status::permission_denied(format!("pid {pid} runs in no pod this agent knows"))
            })?;
        let w = self
            .state
            .read(|s| s.workload(&pod.uid).cloned())
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "pod {}/{} is not in the mesh",
                    pod.namespace, pod.name
                ))
            })?;
        if !w.native_tunnel() {
            return Err(Status::permission_denied(format!(
                "pod {} is not a waypoint's; only waypoints get certificates over SDS",
                w.display_name()
            )));
        }
        Ok((**w.identity()).clone())
    }
}

fn secret(name: &str, cert: &WorkloadCert) -> Option<Any> {
    let inline = |s: String| core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineBytes(s.into_bytes())),
        ..Default::default()
    };
    let r#type = match name {
        DEFAULT => tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: Some(inline(cert.chain_pem.concat())),
            private_key: Some(inline(cert.key_pem.clone())),
            ..Default::default()
        }),
        ROOTCA => tls::secret::Type::ValidationContext(tls::CertificateValidationContext {
            trusted_ca: Some(inline(cert.chain_pem.last()?.clone())),
            ..Default::default()
        }),
        _ => return None,
    };
    Some(Any {
        type_url: ambit_xds::type_url::SECRET.into(),
        value: tls::Secret {
            name: name.to_owned(),
            r#type: Some(r#type),
        }
        .encode_to_vec(),
    })
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = Stream_<DeltaDiscoveryResponse>;
    type StreamSecretsStream = Stream_<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "use StreamSecrets (state of the world)",
        ))
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let identity = self.caller(&req)?;
        info!(%identity, "SDS client connected");
        let mut requests = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let certs = self.certs.clone();
        tokio::spawn(async move {
            let mut changes = certs.changes();
            let mut names: BTreeSet<String> = BTreeSet::new();
            let mut sent: Option<String> = None;
            let mut nonce = 0u64;
            loop {
                tokio::select! {
                    r = requests.message() => match r {
                        Ok(Some(r)) => {
                            if let Some(e) = &r.error_detail {
                                warn!(%identity, "SDS client rejected a secret: {}", e.message);
                            }
                            names = r.resource_names.into_iter().collect();
                        }
                        _ => return,
                    },
                    c = changes.changed() => if c.is_err() { return },
                }
                let Some(cert) = certs.get(&identity) else {
                    continue;
                };
                // Send when the certificate or the names asked for changed.
                let version = format!("{}:{names:?}", cert.serial);
                if sent.as_ref() == Some(&version) || names.is_empty() {
                    continue;
                }
                nonce += 1;
                let resources: Vec<Any> = names.iter().filter_map(|n| secret(n, &cert)).collect();
                let resp = DiscoveryResponse {
                    version_info: cert.serial.clone(),
                    resources,
                    type_url: ambit_xds::type_url::SECRET.into(),
                    nonce: nonce.to_string(),
                    ..Default::default()
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
                sent = Some(version);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let identity = self.caller(&req)?;
        let cert = self
            .certs
            .get(&identity)
            .ok_or_else(|| Status::unavailable(format!("no certificate for {identity} yet")))?;
        let r = req.into_inner();
        Ok(Response::new(DiscoveryResponse {
            version_info: cert.serial.clone(),
            resources: r
                .resource_names
                .iter()
                .filter_map(|n| secret(n, &cert))
                .collect(),
            type_url: ambit_xds::type_url::SECRET.into(),
            ..Default::default()
        }))
    }
}
