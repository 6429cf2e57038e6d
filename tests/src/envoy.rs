//! Envoy 1.40 as an HBONE peer: the `static_resources` of a server that terminates
//! CONNECT in mutual TLS and of a client that tunnels plain connections, as YAML for
//! `--config-yaml`. Shared by the HBONE bench (Envoy as the peer every figure is a ratio
//! to) and the interop tests (Envoy as an independent TLS implementation).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Writes `name`'s certificate chain and key into `dir` as Envoy reads them; their paths.
pub fn tls_files(
    dir: &Path,
    name: &str,
    chain: &[String],
    key: &str,
) -> std::io::Result<(PathBuf, PathBuf)> {
    let (c, k) = (
        dir.join(format!("{name}-chain.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&c, chain.concat())?;
    std::fs::write(&k, key)?;
    Ok((c, k))
}

/// Circuit breakers that never trip, as Istio writes them.
const UNLIMITED: &str = "{thresholds: [{max_connections: 4294967295, max_pending_requests: 4294967295, max_requests: 4294967295, max_retries: 4294967295}]}";

/// One HBONE end's TLS: TLS 1.3, ALPN h2, its certificate, the mesh root, and the
/// peer's SPIFFE identity if it checks one.
pub struct HboneTls<'a> {
    /// The PEM chain file.
    pub chain: &'a Path,
    /// The PEM key file.
    pub key: &'a Path,
    /// The mesh root's PEM file.
    pub root: &'a Path,
    /// The peer's SPIFFE ID, checked against its certificate's URI SAN.
    pub peer: Option<&'a str>,
    /// The only key exchange offered and accepted (e.g. `X25519MLKEM768`); Envoy's
    /// defaults without it.
    pub only_curve: Option<&'a str>,
}

impl HboneTls<'_> {
    /// As an Envoy `common_tls_context`, in YAML flow style.
    pub fn yaml(&self) -> String {
        let san = self.peer.map_or(String::new(), |p| {
            format!(
                ", match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: \"{p}\"}}}}]"
            )
        });
        let curves = self
            .only_curve
            .map_or(String::new(), |c| format!(", ecdh_curves: [{c}]"));
        format!(
            "{{tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3{curves}}}, alpn_protocols: [h2], tls_certificates: [{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}], validation_context: {{trusted_ca: {{filename: {}}}{san}}}}}",
            self.chain.display(),
            self.key.display(),
            self.root.display()
        )
    }
}

/// An HBONE server: mutual TLS on `listen` (clients must chain to the root), an HTTP
/// connection manager terminating each CONNECT and dialing `app` for it.
pub fn hbone_server(listen: SocketAddr, tls: &HboneTls<'_>, app: SocketAddr) -> String {
    format!(
        r#"  listeners:
    - name: hbone
      address: {{socket_address: {{address: {lip}, port_value: {lport}}}}}
      filter_chains:
        - transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
              require_client_certificate: true
              common_tls_context: {tls}
          filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: hbone
                codec_type: HTTP2
                http2_protocol_options: {{allow_connect: true}}
                upgrade_configs: [{{upgrade_type: CONNECT}}]
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: {{connect_matcher: {{}}}}
                          route: {{cluster: app, upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]}}
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
    - name: app
      type: STATIC
      connect_timeout: 5s
      circuit_breakers: {UNLIMITED}
      load_assignment:
        cluster_name: app
        endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {aip}, port_value: {aport}}}}}}}}}]}}]
"#,
        lip = listen.ip(),
        lport = listen.port(),
        tls = tls.yaml(),
        aip = app.ip(),
        aport = app.port(),
    )
}

/// An HBONE client: a plain listener on `listen` whose every connection goes to `server`
/// as an HTTP/2 CONNECT to `authority` (`tcp_proxy` with `tunneling_config`), over
/// mutual TLS.
pub fn hbone_client(
    listen: SocketAddr,
    authority: &str,
    server: SocketAddr,
    tls: &HboneTls<'_>,
) -> String {
    format!(
        r#"  listeners:
    - name: outbound
      address: {{socket_address: {{address: {lip}, port_value: {lport}}}}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.tcp_proxy
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
                stat_prefix: outbound
                cluster: hbone
                tunneling_config: {{hostname: "{authority}"}}
  clusters:
    - name: hbone
      type: STATIC
      connect_timeout: 5s
      circuit_breakers: {UNLIMITED}
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{http2_protocol_options: {{}}}}
      load_assignment:
        cluster_name: hbone
        endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {sip}, port_value: {sport}}}}}}}}}]}}]
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          common_tls_context: {tls}
"#,
        lip = listen.ip(),
        lport = listen.port(),
        sip = server.ip(),
        sport = server.port(),
        tls = tls.yaml(),
    )
}
