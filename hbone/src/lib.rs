//! HBONE: the mutual-TLS tunnel between node agents (HTTP/2 CONNECT inside TLS 1.3,
//! SPIFFE identities), wire-compatible with Istio's.
//!
//! - [`tls`]: TLS configuration and SPIFFE peer verification.
pub mod tls;
