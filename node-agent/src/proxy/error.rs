//! Every way a proxied connection can fail, as one type: its variant names the metric
//! reason ([`Error::reason`]) and its text goes to the log and the access log.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ambit_hbone::connect::HboneError;
use ambit_hbone::tls::UnexpectedIdentity;
use ambit_identity::Identity;

use crate::identity::tls::TlsConfigError;

/// Why a connection was refused or could not be proxied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Outbound: nothing recorded where the connection was going (someone dialed the
    /// capture port directly).
    #[error("no original destination: the connection was not redirected by Ambit's programs")]
    NoOriginalDestination,
    /// Outbound: the VIP's service has no such port.
    #[error("service {service} has no port {port}")]
    ServicePortNotFound {
        /// The service's hostname.
        service: String,
        /// The port asked for.
        port: u16,
    },
    /// Outbound: the service has no endpoint of the connection's family.
    #[error("service {0} has no endpoint to send the connection to")]
    NoHealthyUpstream(String),
    /// The service or workload has a waypoint and none of its pods is ready: fail closed.
    #[error("{service} goes through waypoint {waypoint}, which has no ready pod")]
    NoWaypoint {
        /// The service's hostname, or the workload's `namespace/name`.
        service: String,
        /// `namespace/name` of its waypoint.
        waypoint: String,
    },
    /// Inbound: the workload takes traffic only through its waypoint.
    #[error("{workload} takes traffic only through waypoint {waypoint}; the caller is {caller}")]
    NotFromWaypoint {
        /// The local workload.
        workload: String,
        /// Its waypoint.
        waypoint: String,
        /// Who called (`plaintext` without an identity).
        caller: String,
    },
    /// Outbound: the source pod has no IP of the destination's family.
    #[error("the source pod has no IP of the destination's address family")]
    NoSourceIp,
    /// A local workload has no certificate (yet).
    #[error("no certificate for {0} yet")]
    NoCertificate(Identity),
    /// A TLS configuration could not be built.
    #[error(transparent)]
    TlsConfig(TlsConfigError),
    /// Connecting was refused (RST).
    #[error("{0} refused the connection")]
    ConnectRefused(SocketAddr),
    /// Connecting took too long.
    #[error("connecting to {addr} timed out after {after:?}")]
    ConnectTimeout {
        /// Where.
        addr: SocketAddr,
        /// How long we waited.
        after: Duration,
    },
    /// Connecting failed otherwise.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// What the kernel said.
        source: io::Error,
    },
    /// Outbound: the HBONE peer presented a certificate of another identity.
    #[error("the HBONE peer {peer} presented {found}, not {expected}")]
    PeerIdentity {
        /// The peer's address.
        peer: SocketAddr,
        /// Who it should have been.
        expected: Identity,
        /// Who it was.
        found: Identity,
    },
    /// The TLS handshake failed (untrusted chain, expired certificate, protocol).
    #[error("TLS handshake with {peer}: {source}")]
    TlsHandshake {
        /// The peer's address.
        peer: SocketAddr,
        /// What rustls said.
        source: io::Error,
    },
    /// Inbound: the TLS handshake did not finish in time.
    #[error("TLS handshake with {0} timed out")]
    TlsHandshakeTimeout(SocketAddr),
    /// Outbound: the far agent refused the tunnel by policy (401).
    #[error("the destination's agent denied the tunnel (policy)")]
    TunnelDenied,
    /// Outbound: the far agent could not reach the application (503).
    #[error("the destination's agent could not reach the application")]
    TunnelUnreachable,
    /// Outbound: any other HBONE failure (HTTP/2, unexpected status).
    #[error("HBONE: {0}")]
    Hbone(HboneError),
    /// Inbound: the local workload is not (or no longer) known to the control plane.
    #[error("the workload is unknown to the control plane")]
    UnknownWorkload,
    /// Inbound: the client presented no SPIFFE identity.
    #[error("the client presented no SPIFFE identity")]
    NoClientIdentity,
    /// Inbound: the CONNECT names another pod, or one of the agent's own ports.
    #[error("CONNECT authority {0} is not a port of this pod")]
    BadAuthority(SocketAddr),
    /// Inbound plaintext steered here for an address that is not this pod's.
    #[error("{0} is not an application port of this pod")]
    BadDestination(SocketAddr),
    /// Inbound: authorization denied it.
    #[error("{0}")]
    PolicyDenied(String),
    /// Inbound: a connection rate limit (`namespace/name`) had no token for the caller.
    #[error("over the connection rate of policy {0}")]
    RateLimited(String),
    /// Inbound plaintext to a STRICT workload.
    #[error("STRICT: the workload accepts mutual TLS only")]
    StrictMtls,
    /// Inbound: the application refused or could not be reached.
    #[error("the application at {addr} is unreachable: {source}")]
    AppUnreachable {
        /// Where.
        addr: SocketAddr,
        /// What the kernel said.
        source: io::Error,
    },
    /// Inbound: the application did not accept in time.
    #[error("the application at {0} did not accept in time")]
    AppTimeout(SocketAddr),
}

impl Error {
    /// The metric reason (`ambit_outbound_failures_total{reason}`,
    /// `ambit_inbound_refused_total{reason}`) and access-log `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoOriginalDestination => "no_original_destination",
            Self::ServicePortNotFound { .. } => "service_port_not_found",
            Self::NoHealthyUpstream(_) => "no_healthy_upstream",
            Self::NoWaypoint { .. } => "no_waypoint",
            Self::NotFromWaypoint { .. } => "not_from_waypoint",
            Self::NoSourceIp => "no_source_ip_of_family",
            Self::NoCertificate(_) => "no_certificate",
            Self::TlsConfig(_) => "tls_config",
            Self::ConnectRefused(_) => "refused",
            Self::ConnectTimeout { .. } => "connect_timeout",
            Self::Connect { .. } => "connect_error",
            Self::PeerIdentity { .. } => "peer_identity_mismatch",
            Self::TlsHandshake { .. } => "tls_handshake",
            Self::TlsHandshakeTimeout(_) => "tls_handshake_timeout",
            Self::TunnelDenied => "denied",
            Self::TunnelUnreachable => "upstream_unreachable",
            Self::Hbone(_) => "hbone_error",
            Self::UnknownWorkload => "unknown_workload",
            Self::NoClientIdentity => "no_client_identity",
            Self::BadAuthority(_) => "bad_authority",
            Self::BadDestination(_) => "bad_destination",
            Self::PolicyDenied(_) => "policy_denied",
            Self::RateLimited(_) => "rate_limited",
            Self::StrictMtls => "strict_mtls",
            Self::AppUnreachable { .. } => "app_unreachable",
            Self::AppTimeout(_) => "app_timeout",
        }
    }

    /// The access log's `result`: `denied` for policy, `refused` for what the agent
    /// turns away, `failed` for what it tried and could not do.
    pub fn result(&self) -> &'static str {
        match self {
            Self::PolicyDenied(_)
            | Self::RateLimited(_)
            | Self::TunnelDenied
            | Self::StrictMtls
            | Self::NotFromWaypoint { .. } => "denied",
            Self::NoOriginalDestination
            | Self::BadAuthority(_)
            | Self::BadDestination(_)
            | Self::NoClientIdentity
            | Self::UnknownWorkload => "refused",
            _ => "failed",
        }
    }

    /// A failed connect to `addr`, classified.
    pub fn connect(addr: SocketAddr, e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::ConnectionRefused {
            Self::ConnectRefused(addr)
        } else {
            Self::Connect { addr, source: e }
        }
    }

    /// A failed TLS handshake with `peer` (expecting `expected`), classified: a peer of
    /// the wrong identity is named as such.
    pub fn handshake(peer: SocketAddr, expected: &Identity, e: io::Error) -> Self {
        let found = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .and_then(UnexpectedIdentity::from_rustls)
            .map(|u| u.found.clone());
        match found {
            Some(found) => Self::PeerIdentity {
                peer,
                expected: expected.clone(),
                found,
            },
            None => Self::TlsHandshake { peer, source: e },
        }
    }
}

impl From<TlsConfigError> for Error {
    fn from(e: TlsConfigError) -> Self {
        match e {
            TlsConfigError::NoCertificate(id) => Self::NoCertificate(id),
            other => Self::TlsConfig(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct_and_wrong_identities_are_named() {
        let id = Identity::parse("spiffe://td/ns/a/sa/b").unwrap();
        let found = Identity::parse("spiffe://td/ns/a/sa/impostor").unwrap();
        let peer: SocketAddr = "10.0.0.1:15008".parse().unwrap();
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            UnexpectedIdentity::rustls_error(found.clone()),
        );
        let err = Error::handshake(peer, &id, e);
        assert_eq!(err.reason(), "peer_identity_mismatch");
        assert!(err.to_string().contains("impostor"), "{err}");
        let other = Error::handshake(peer, &id, io::Error::other("boom"));
        assert_eq!(other.reason(), "tls_handshake");
        assert_eq!(
            Error::connect(peer, io::ErrorKind::ConnectionRefused.into()).reason(),
            "refused"
        );
        assert_eq!(Error::PolicyDenied("x".into()).result(), "denied");
    }
}
