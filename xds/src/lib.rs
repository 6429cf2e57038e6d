//! Ambit's xDS API.
//!
//! - [`ambit`]: Ambit's own resource types (`ambit.v1.Workload`, `Service`,
//!   `Authorization`) and the CA service, generated from `proto/`;
//! - [`envoy`]: Envoy's discovery types (ADS requests and responses), re-exported;
//! - [`type_url`]: the type URLs resources are served under;
//! - [`client`]: the delta ADS client every Ambit process shares;
//! - [`channel`]: the connection to the control plane that the xDS and CA clients share;
//! - [`grpc`]: one bidirectional gRPC call whose receive buffer does not outlive a large
//!   message (the ADS stream's);
//! - [`ca`]: the CA client (CSR → certificate);
//! - [`convert`]: the wire form of shared types (policies, addresses, ports);
//! - [`istio`]: Istio's telemetry conventions (canonical names, endpoint workload metadata);
//! - [`versions`]: resource versions, as handlers keep them for the client's reconnects.

pub mod ca;
pub mod channel;
pub mod client;
pub mod convert;
pub mod grpc;
pub mod istio;
pub mod versions;

/// Generated from `proto/ambit/v1`.
pub mod ambit {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("ambit.v1");
}

/// Envoy's discovery protocol types.
pub mod envoy {
    pub use envoy_types::pb::envoy::config::core::v3::Node;
    pub use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        Resource,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        aggregated_discovery_service_server::{
            AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
        },
    };
    pub use envoy_types::pb::google::protobuf::Any;
    pub use envoy_types::pb::google::rpc::Status;
}

/// Names the control plane, node agents and waypoints must agree on.
pub mod waypoint {
    /// The HTTP filter name of fault injection (a route's `typed_per_filter_config` key).
    pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
    /// The HTTP filter name of local rate limiting (a route's `typed_per_filter_config`
    /// key).
    pub const RATELIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";
    /// The rate-limit descriptor key of the caller's SPIFFE ID.
    pub const SOURCE_PRINCIPAL_KEY: &str = "source_principal";
    /// The CEL attribute of the caller's SPIFFE ID (its certificate's URI SAN), as
    /// Envoy's `envoy.rate_limit_descriptors.expr` extension evaluates it.
    pub const PEER_URI_SAN: &str = "connection.uri_san_peer_certificate";
    /// The HTTP filter name of RBAC (Istio's AuthorizationPolicies).
    pub const RBAC_FILTER: &str = "envoy.filters.http.rbac";
    /// The HTTP filter name of JWT authentication; also the dynamic-metadata namespace a
    /// verified token's payload is written to.
    pub const JWT_FILTER: &str = "envoy.filters.http.jwt_authn";
    /// In [`JWT_FILTER`]'s metadata: the verified token's payload (every provider's
    /// `payload_in_metadata`), which RBAC matches request principals and claims in.
    pub const JWT_PAYLOAD: &str = "jwt_payload";

    /// The xDS node id of waypoint `name` of `namespace`: `<namespace>/<name>` (node names
    /// are DNS names, so it can never be a node's).
    pub fn node_id(namespace: &str, name: &str) -> String {
        format!("{namespace}/{name}")
    }

    /// The endpoint filter-metadata namespace of Ambit's facts.
    pub const METADATA: &str = "ambit";
    /// In [`METADATA`]: the identity of an endpoint reached over HBONE (an enrolled
    /// workload, through its node agent); endpoints without it are reached in plaintext.
    pub const HBONE_IDENTITY: &str = "hbone_identity";
    /// SDS: the workload certificate and key (Istio's name).
    pub const SDS_CERTIFICATE: &str = "default";
    /// SDS: the mesh roots (Istio's name).
    pub const SDS_ROOTS: &str = "ROOTCA";
}

/// Type URLs of Ambit's resources.
pub mod type_url {
    /// `ambit.v1.Workload`.
    pub const WORKLOAD: &str = "type.googleapis.com/ambit.v1.Workload";
    /// `ambit.v1.Service`.
    pub const SERVICE: &str = "type.googleapis.com/ambit.v1.Service";
    /// `ambit.v1.Authorization`.
    pub const AUTHORIZATION: &str = "type.googleapis.com/ambit.v1.Authorization";
    /// Every type an Ambit node agent subscribes to.
    pub const NODE_AGENT: [&str; 3] = [WORKLOAD, SERVICE, AUTHORIZATION];

    /// Envoy `Listener`.
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    /// Envoy `RouteConfiguration`.
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// Envoy `Cluster`.
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    /// Envoy `ClusterLoadAssignment`.
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    /// Envoy `Secret` (SDS).
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    /// Every type a waypoint subscribes to, in the order Envoy's xDS protocol wants them
    /// applied (clusters before endpoints, listeners before routes).
    pub const WAYPOINT: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];
    /// Ambit's types an `ambit-waypoint` also subscribes to (a stock Envoy does not): the
    /// L4 policies that select its pods, and the workloads it fronts (whose pod IPs it
    /// takes workload-addressed tunnels for).
    pub const WAYPOINT_AMBIT: [&str; 2] = [AUTHORIZATION, WORKLOAD];

    /// The HTTP connection manager network filter.
    pub const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    /// The TCP proxy network filter.
    pub const TCP_PROXY: &str =
        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
    /// The router HTTP filter.
    pub const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
    /// Envoy's fault injection filter (`HTTPFault`).
    pub const HTTP_FAULT: &str =
        "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
    /// Envoy's JWT authentication HTTP filter.
    pub const HTTP_JWT_AUTHN: &str =
        "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication";
    /// Envoy's local rate limit HTTP filter.
    pub const HTTP_LOCAL_RATELIMIT: &str =
        "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
    /// Envoy's rate-limit descriptor of a CEL expression.
    pub const DESCRIPTOR_EXPR: &str =
        "type.googleapis.com/envoy.extensions.rate_limit_descriptors.expr.v3.Descriptor";
    /// Envoy's RBAC network filter.
    pub const NETWORK_RBAC: &str =
        "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
    /// Envoy's RBAC HTTP filter.
    pub const HTTP_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
    /// Upstream HTTP protocol options of a cluster.
    pub const HTTP_PROTOCOL_OPTIONS: &str =
        "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn resources_round_trip() {
        let w = ambit::Workload {
            uid: "u".into(),
            ips: vec![vec![10, 0, 0, 1]],
            enrolled: true,
            ..Default::default()
        };
        let any = envoy::Any {
            type_url: type_url::WORKLOAD.into(),
            value: w.encode_to_vec(),
        };
        assert_eq!(ambit::Workload::decode(any.value.as_slice()).unwrap(), w);
    }
}
