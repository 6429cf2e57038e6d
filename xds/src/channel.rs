//! The one connection to the control plane: its address, transport settings and the
//! caller's credential, shared by the xDS client and the CA client so both use the same
//! HTTP/2 connection and any transport security is set up in one place.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

/// Why the control plane cannot be addressed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The address is not a URI tonic can dial.
    #[error("bad control-plane address {address:?}: {reason}")]
    Address {
        /// What was given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The credential cannot be sent as a header.
    #[error("the credential is not valid in an HTTP header")]
    Credential,
    /// An `https://` address needs the root to verify the server with.
    #[error("an https:// control-plane address needs the mesh root certificate (--xds-root-cert)")]
    NoRoot,
    /// The TLS settings were refused.
    #[error("TLS to the control plane: {0}")]
    Tls(String),
}

/// A lazily connected, shared channel to the control plane (reconnecting on demand).
#[derive(Clone, Debug)]
pub struct ControlPlane {
    address: String,
    channel: Channel,
    credential: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl ControlPlane {
    /// Addresses the control plane at `address` (`https://host:port`, its certificate
    /// verified against `root_pem`; or `http://host:port`, plaintext, for debugging);
    /// `credential`, if any, is sent as `authorization: Bearer <credential>` where a call
    /// needs it. Must be called inside a tokio runtime; nothing is dialed until the first
    /// call.
    pub fn new(
        address: &str,
        credential: Option<&str>,
        root_pem: Option<&str>,
    ) -> Result<Self, ChannelError> {
        let bad = |reason: String| ChannelError::Address {
            address: address.to_owned(),
            reason,
        };
        let endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let endpoint = if address.starts_with("https://") {
            let root = root_pem.ok_or(ChannelError::NoRoot)?;
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(root));
            endpoint
                .tls_config(tls)
                .map_err(|e| ChannelError::Tls(e.to_string()))?
        } else {
            endpoint
        };
        let credential = credential
            .map(|c| {
                format!("Bearer {c}")
                    .parse()
                    .map_err(|_| ChannelError::Credential)
            })
            .transpose()?;
        Ok(Self {
            address: address.to_owned(),
            channel: endpoint.connect_lazy(),
            credential,
        })
    }

    /// Where the control plane is.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The shared channel.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Is there a credential to present?
    pub fn has_credential(&self) -> bool {
        self.credential.is_some()
    }

    /// Adds the credential (if any) to a request.
    pub fn authorize<T>(&self, req: &mut tonic::Request<T>) {
        if let Some(c) = &self.credential {
            req.metadata_mut().insert("authorization", c.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_addresses_and_credentials_are_refused() {
        assert!(matches!(
            ControlPlane::new("not a uri", None, None),
            Err(ChannelError::Address { .. })
        ));
        assert!(matches!(
            ControlPlane::new("http://127.0.0.1:1", Some("a\nb"), None),
            Err(ChannelError::Credential)
        ));
        assert!(matches!(
            ControlPlane::new("https://127.0.0.1:1", None, None),
            Err(ChannelError::NoRoot)
        ));
        let cp = ControlPlane::new("http://127.0.0.1:1", Some("tok"), None).unwrap();
        let mut req = tonic::Request::new(());
        cp.authorize(&mut req);
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer tok");
    }
}
