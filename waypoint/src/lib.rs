//! `ambit-waypoint`: Ambit's per-service L7 proxy.
//!
//! A waypoint is a mesh workload with its own identity. Node agents send it the traffic
//! of the services that name it (`ambit.dev/waypoint`), as HBONE tunnels to its `:15008`
//! whose CONNECT authority is the service VIP and port the client dialed. It routes each
//! HTTP request as Envoy would with the same configuration — which it receives as
//! standard Envoy xDS (Listener, RouteConfiguration, Cluster, ClusterLoadAssignment) —
//! and sends it to an endpoint over HBONE (mesh workloads) or plaintext.
//!
//! - [`config`]: the Envoy subset, decoded and checked (`decode`), and the xDS handler;
//! - [`path`]: path normalization (RFC 3986), before filters and routes;
//! - [`router`]: virtual host and route selection;
//! - [`filter`]: the HTTP filters before the router (RBAC, fault injection);
//! - [`proxy`]: one request: filters, then actions, header changes, retries, timeouts;
//! - [`upstream`]: endpoint choice and pooled upstream connections (HBONE or plaintext);
//! - [`outlier`]: outlier detection (endpoints ejected after consecutive failures);
//! - [`inbound`]: the HBONE server;
//! - [`identity`]: the waypoint's certificate and TLS configurations;
//! - [`sds`]: that certificate, from the node agent's SDS socket;
//! - [`ca`]: or from the control plane's CA, with the pod's ServiceAccount token;
//! - [`body`]: request buffering for retries, byte counting, the report at a response's end;
//! - [`telemetry`]: Istio's HTTP metrics;
//! - [`trace`]: W3C `traceparent`, propagated or started;
//! - [`admin`]: `/metrics`, `/healthz/ready` and `/debug/config_dump`.

pub mod admin;
pub mod body;
pub mod ca;
pub mod config;
pub mod control_plane;
pub mod filter;
pub mod identity;
pub mod inbound;
pub mod outlier;
pub mod path;
pub mod proxy;
pub mod router;
pub mod sds;
pub mod telemetry;
pub mod trace;
pub mod upstream;
