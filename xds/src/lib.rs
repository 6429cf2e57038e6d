//! Ambit's xDS API.
//!
//! - [`ambit`]: Ambit's own resource types (`ambit.v1.Workload`, `Service`,
//!   `Authorization`) and the CA service, generated from `proto/`;
//! - [`envoy`]: Envoy's discovery types (ADS requests and responses), re-exported;
//! - [`type_url`]: the type URLs resources are served under;
//! - [`client`]: the delta ADS client every Ambit process shares;
//! - [`channel`]: the connection to the control plane that the xDS and CA clients share;
//! - [`convert`]: the wire form of shared types (policies, addresses, ports).

pub mod channel;
pub mod client;
pub mod convert;

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
