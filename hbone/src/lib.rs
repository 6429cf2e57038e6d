//! HBONE: the mutual-TLS tunnel between node agents (HTTP/2 CONNECT inside TLS 1.3,
//! SPIFFE identities), wire-compatible with Istio's.
//!
//! - [`tls`]: TLS configuration and SPIFFE peer verification;
//! - [`baggage`]: the peer metadata ztunnel sends in a `baggage` header;
//! - [`connect`]: HTTP/2 CONNECT client and server;
//! - [`pool`]: connections shared by tunnels, single-flight dialing, idle timeout;
//! - [`stream`]: an HTTP/2 stream as a byte pipe;
//! - [`copy`]: relaying both ways in whole chunks (no copy through a buffer);
//! - [`read_ahead`]: a socket read in large chunks under TLS.
pub mod baggage;
pub mod connect;
pub mod copy;
pub mod pool;
pub mod read_ahead;
pub mod stream;
mod task;
pub mod tls;
pub mod tls_stream;
