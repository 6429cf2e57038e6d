//! HBONE: the mutual-TLS tunnel between node agents (HTTP/2 CONNECT inside TLS 1.3,
//! SPIFFE identities), wire-compatible with Istio's.
//!
//! - [`tls`]: TLS configuration and SPIFFE peer verification;
//! - [`tls_stream`]: the TLS 1.3 stream under every HBONE connection: rustls's handshake,
//!   records framed and decrypted in place by the stream itself;
//! - [`baggage`]: the peer metadata ztunnel sends in a `baggage` header;
//! - [`connect`]: HTTP/2 CONNECT client and server;
//! - [`pool`]: connections shared by tunnels, single-flight dialing, idle timeout;
//! - [`stream`]: an HTTP/2 stream as a byte pipe;
//! - [`copy`]: relaying both ways in whole chunks (no copy through a buffer).
pub mod baggage;
pub mod connect;
pub mod copy;
pub mod pool;
pub mod stream;
mod task;
pub mod tls;
pub mod tls_stream;
