//! An in-process waypoint for the HTTP behaviour tests, on loopback: the control
//! plane's own translator makes its Envoy resources from a mesh file, endpoint addresses
//! are pointed at backends listening on 127.0.0.1, and clients reach it as node agents
//! do, over HBONE with a mesh certificate.

#![allow(dead_code, missing_docs)]

pub mod authz;
pub mod envoy;
pub mod jwt;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_control_plane::model::Model;
use ambit_control_plane::translate::waypoint as tw;
use ambit_hbone::connect::HboneClient;
use ambit_hbone::tls::{MeshRoots, WorkloadKey, client_config};
use ambit_identity::Identity;
use ambit_waypoint::config::xds::ConfigHandler;
use ambit_waypoint::identity::Certs;
use ambit_waypoint::inbound::Inbound;
use ambit_waypoint::upstream::Upstreams;
use ambit_xds::client::{ApplyError, Handler, Update, Version};
use ambit_xds::envoy::Any;
use ambit_xds::type_url;
use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use http_body_util::{BodyExt, Full};
use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/shop/sa/wp";
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";

/// A test CA.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    pub root: String,
}

impl Pki {
    pub fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let root = p.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::from_ca_cert_pem(&root, key).unwrap(),
            root,
        }
    }

    pub fn leaf(&self, id: &str) -> (Vec<String>, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.is_ca = IsCa::ExplicitNoCa;
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.pem(), self.root.clone()], key.serialize_pem())
    }
}

impl Pki {
    /// A server certificate for `ip` (an IP SAN), as the control plane's CA issues its own.
    pub fn server_for_ip(&self, ip: std::net::IpAddr) -> (Vec<String>, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::IpAddress(ip)];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.is_ca = IsCa::ExplicitNoCa;
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.pem()], key.serialize_pem())
    }
}

/// A backend's knobs and counters.
#[derive(Default)]
pub struct BackendState {
    pub requests: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Answer every other request with 503.
    pub flaky: AtomicBool,
    /// Answer every request with this status (0: 200).
    pub status: AtomicU64,
    /// Delay every answer this long (milliseconds).
    pub delay_ms: AtomicU64,
    /// The last request as its answer's body describes it, with `body=<bytes>`.
    pub last: std::sync::Mutex<String>,
    /// Answer every request with this body instead (a JWKS server's document).
    pub document: std::sync::Mutex<Option<String>>,
}

/// An HTTP backend on loopback (HTTP/1.1 and HTTP/2). It answers with `x-backend: <name>`
/// and a body `<name> <method> <path?query> <request headers as name=value;...>`.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub state: Arc<BackendState>,
}

impl Backend {
    pub async fn start(name: &str) -> Self {
        Self::start_at(name, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_at(name: &str, at: SocketAddr) -> Self {
        let listener = TcpListener::bind(at).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BackendState::default());
        let (n, st) = (name.to_owned(), state.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let (n, st) = (n.clone(), st.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (n, st) = (n.clone(), st.clone());
                            async move {
                                let count = st.requests.fetch_add(1, Ordering::SeqCst) + 1;
                                let delay = st.delay_ms.load(Ordering::SeqCst);
                                if delay > 0 {
                                    tokio::time::sleep(Duration::from_millis(delay)).await;
                                }
                                let mut headers: Vec<String> = req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
                                    .collect();
                                headers.sort();
                                let line = format!(
                                    "{n} {} {} {}",
                                    req.method(),
                                    req.uri().path_and_query().map_or("", |p| p.as_str()),
                                    headers.join(";")
                                );
                                // Drain the body, counting it.
                                let size = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes().len())
                                    .unwrap_or(0);
                                *st.last.lock().unwrap() = format!("{line} body={size}");
                                let mut status = match st.status.load(Ordering::SeqCst) {
                                    0 => 200,
                                    s => s as u16,
                                };
                                if st.flaky.load(Ordering::SeqCst) && count % 2 == 1 {
                                    status = 503;
                                }
                                let body = st.document.lock().unwrap().clone().unwrap_or(line);
                                let resp = http::Response::builder()
                                    .status(status)
                                    .header("x-backend", n.as_str())
                                    .header("x-body-bytes", size.to_string())
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap();
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
                });
            }
        });
        Self {
            name: name.to_owned(),
            addr,
            state,
        }
    }
}

/// The waypoint under test.
pub struct TestWaypoint {
    pub addr: SocketAddr,
    pub pki: Pki,
    handler: Mutex<ConfigHandler>,
    held: Mutex<BTreeMap<&'static str, Vec<String>>>,
    /// Mesh endpoint address → where it really listens.
    pub endpoints: Mutex<HashMap<SocketAddr, SocketAddr>>,
    /// Mesh workload IP → the loopback IP it really has (workload-addressed tunnels dial
    /// the CONNECT's own address).
    pub workload_ips: Mutex<HashMap<std::net::IpAddr, std::net::IpAddr>>,
    _certs: watch::Sender<Option<Arc<Certs>>>,
    pub metrics: Arc<ambit_waypoint::telemetry::Metrics>,
    pub config: watch::Receiver<Arc<ambit_waypoint::config::Config>>,
    pub inbound: Inbound,
}

pub fn model(yaml: &str) -> Model {
    ambit_control_plane::source::file::parse(Path::new("mesh.yaml"), yaml)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The `baggage` the test client sends.
pub const CLIENT_BAGGAGE: &str = "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=client,service.name=client-svc,service.version=v7";

impl TestWaypoint {
    pub async fn start() -> Self {
        let pki = Pki::new();
        let (chain, key) = pki.leaf(WAYPOINT_ID);
        let certs = Certs::from_pem(
            Identity::parse(WAYPOINT_ID).unwrap(),
            &chain,
            &key,
            &pki.root,
        )
        .unwrap();
        let (certs_tx, certs_rx) = watch::channel(Some(Arc::new(certs)));
        let (handler, config) = ConfigHandler::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(ambit_waypoint::telemetry::Metrics::default());
        let inbound = Inbound {
            tracing: None,
            limiter: Default::default(),
            config: config.clone(),
            upstreams: Upstreams::new(
                certs_rx.clone(),
                Some(ambit_waypoint::telemetry::baggage("shop", "wp")),
            ),
            certs: certs_rx,
            metrics: metrics.clone(),
        };
        tokio::spawn(inbound.clone().serve(listener));
        Self {
            inbound,
            addr,
            pki,
            handler: Mutex::new(handler),
            held: Mutex::default(),
            endpoints: Mutex::default(),
            workload_ips: Mutex::default(),
            _certs: certs_tx,
            config,
            metrics,
        }
    }

    /// Points mesh endpoint `mesh` (ip:targetPort) at `real`.
    pub fn map(&self, mesh: &str, real: SocketAddr) {
        self.endpoints
            .lock()
            .unwrap()
            .insert(mesh.parse().unwrap(), real);
    }

    /// Applies what the control plane would send waypoint `shop/wp` for `m`.
    pub fn apply(&self, m: &Model) -> Result<(), ApplyError> {
        let wp = m.waypoints.values().next().expect("a waypoint");
        let mut resources = tw::resources(m, wp);
        // And the L4 policies selecting its pods, as the control plane sends them.
        let snapshot = ambit_control_plane::translate::Snapshot::from_model(m);
        resources.insert(
            type_url::AUTHORIZATION,
            snapshot
                .resources(
                    &tw::node_id(&wp.namespace, &wp.name),
                    type_url::AUTHORIZATION,
                )
                .map(|r| (r.name.clone(), r.clone()))
                .collect(),
        );
        // And the workloads it fronts.
        resources.insert(
            type_url::WORKLOAD,
            snapshot
                .resources(&tw::node_id(&wp.namespace, &wp.name), type_url::WORKLOAD)
                .map(|r| (r.name.clone(), r.clone()))
                .collect(),
        );
        for t in type_url::WAYPOINT
            .into_iter()
            .chain(type_url::WAYPOINT_AMBIT)
        {
            let rs = resources.get(t).cloned().unwrap_or_default();
            let updated: Vec<(String, Any)> = rs
                .iter()
                .map(|(name, r)| {
                    let mut any = r.resource.clone();
                    if t == type_url::ENDPOINT {
                        any.value = self.remap(&any.value);
                    }
                    if t == type_url::WORKLOAD {
                        any.value = self.remap_workload(&any.value);
                    }
                    (name.clone(), any)
                })
                .collect();
            let names: Vec<String> = rs.keys().cloned().collect();
            let removed: Vec<String> = self
                .held
                .lock()
                .unwrap()
                .get(t)
                .into_iter()
                .flatten()
                .filter(|n| !names.contains(n))
                .cloned()
                .collect();
            self.apply_raw(t, updated, removed)?;
            self.held.lock().unwrap().insert(t, names);
        }
        Ok(())
    }

    pub fn apply_raw(
        &self,
        t: &str,
        updated: Vec<(String, Any)>,
        removed: Vec<String>,
    ) -> Result<(), ApplyError> {
        let updated = updated
            .into_iter()
            .map(|(n, body)| Update {
                name: n.into(),
                version: Version::new("1"),
                body,
            })
            .collect();
        self.handler.lock().unwrap().apply(t, updated, removed)?;
        Ok(())
    }

    fn remap_workload(&self, bytes: &[u8]) -> Vec<u8> {
        let mut w = ambit_xds::ambit::Workload::decode(bytes).unwrap();
        let map = self.workload_ips.lock().unwrap();
        for ip in &mut w.ips {
            let mesh = ambit_xds::convert::ip_from_bytes(ip).unwrap();
            if let Some(real) = map.get(&mesh) {
                *ip = ambit_xds::convert::ip_to_bytes(real);
            }
        }
        w.encode_to_vec()
    }

    fn remap(&self, bytes: &[u8]) -> Vec<u8> {
        let mut cla = endpoint::ClusterLoadAssignment::decode(bytes).unwrap();
        let map = self.endpoints.lock().unwrap();
        for loc in &mut cla.endpoints {
            for e in &mut loc.lb_endpoints {
                let Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) =
                    &mut e.host_identifier
                else {
                    continue;
                };
                let Some(core::Address {
                    address: Some(core::address::Address::SocketAddress(sa)),
                }) = &mut ep.address
                else {
                    continue;
                };
                let Some(core::socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier
                else {
                    continue;
                };
                let mesh: SocketAddr = format!("{}:{port}", sa.address).parse().unwrap();
                // Unmapped endpoints point at a port nobody listens on.
                let real = map
                    .get(&mesh)
                    .copied()
                    .unwrap_or_else(|| "127.0.0.1:1".parse().unwrap());
                sa.address = real.ip().to_string();
                sa.port_specifier = Some(core::socket_address::PortSpecifier::PortValue(
                    real.port().into(),
                ));
            }
        }
        cla.encode_to_vec()
    }

    /// An HBONE tunnel to `authority` (a service VIP:port) as the test client.
    pub async fn tunnel(
        &self,
        authority: &str,
    ) -> Result<ambit_hbone::stream::H2Stream, ambit_hbone::connect::HboneError> {
        self.tunnel_as(CLIENT_ID, "10.244.1.10", authority).await
    }

    /// An HBONE tunnel to `authority` as workload `id` (a SPIFFE ID) at `source` (its
    /// pod's IP, sent as `forwarded: for=`).
    pub async fn tunnel_as(
        &self,
        id: &str,
        source: &str,
        authority: &str,
    ) -> Result<ambit_hbone::stream::H2Stream, ambit_hbone::connect::HboneError> {
        let (chain, key) = self.pki.leaf(id);
        let key = WorkloadKey::from_pem(&chain, &key).unwrap();
        let roots = MeshRoots::from_pem(&self.pki.root).unwrap();
        let config = client_config(&key, &roots, [Identity::parse(WAYPOINT_ID).unwrap()]).unwrap();
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(self.addr.ip().into());
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .unwrap();
        let client = HboneClient::handshake(tls).await?;
        // Peer metadata as Istio's ztunnel sends it.
        let headers = ambit_hbone::connect::ConnectHeaders {
            source: source.parse().unwrap(),
            traceparent: "00-0-0-00",
            baggage: Some(CLIENT_BAGGAGE),
            host: None,
        };
        client
            .connect_with(authority.parse().unwrap(), &headers)
            .await
    }

    /// An HTTP/1.1 client connection through a tunnel to `authority`.
    pub async fn http1(
        &self,
        authority: &str,
    ) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let s = self.tunnel(authority).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    /// An HTTP/1.1 client connection through a tunnel to `authority` as `id` at `source`.
    pub async fn http1_as(
        &self,
        id: &str,
        source: &str,
        authority: &str,
    ) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let s = self.tunnel_as(id, source, authority).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    /// An HTTP/2 client connection through a tunnel to `authority`.
    pub async fn http2(
        &self,
        authority: &str,
    ) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        http2_over(self.tunnel(authority).await.unwrap()).await
    }
}

/// What a response said.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn backend(&self) -> &str {
        self.headers
            .get("x-backend")
            .map_or("-", |v| v.to_str().unwrap())
    }
}

/// A request with `headers`, and an empty body.
pub fn req(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

pub fn get(host: &str, path: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

pub async fn send1(
    c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> Answer {
    c.ready().await.unwrap();
    let r = c.send_request(req).await.unwrap();
    let (parts, body) = r.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// `count` concurrent GETs of `http://<host>/` on one HTTP/2 connection; their statuses.
pub async fn concurrent_gets(
    c: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    host: &str,
    count: usize,
) -> Vec<u16> {
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let mut c = c.clone();
            let uri = format!("http://{host}/");
            tokio::spawn(async move {
                let r = http::Request::builder()
                    .uri(uri)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                c.ready().await.unwrap();
                c.send_request(r).await.unwrap().status().as_u16()
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// An HTTP/2 (prior knowledge) client connection over `io`, its connection driven by a
/// task of its own.
pub async fn http2_over<S>(io: S) -> hyper::client::conn::http2::SendRequest<Full<Bytes>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}
