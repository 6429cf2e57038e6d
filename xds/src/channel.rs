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
    credential: Option<Credential>,
}

/// What the caller presents.
#[derive(Clone, Debug)]
enum Credential {
    /// A fixed token.
    Token(MetadataValue<tonic::metadata::Ascii>),
    /// A token file read again for every call (a Kubernetes projected ServiceAccount
    /// token, which the kubelet rotates), with the last good value for when a read fails.
    File(
        std::path::PathBuf,
        std::sync::Arc<std::sync::Mutex<Option<MetadataValue<tonic::metadata::Ascii>>>>,
    ),
}

fn bearer(token: &str) -> Result<MetadataValue<tonic::metadata::Ascii>, ChannelError> {
    format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| ChannelError::Credential)
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
        let credential = credential.map(bearer).transpose()?.map(Credential::Token);
        Ok(Self {
            address: address.to_owned(),
            channel: endpoint.connect_lazy(),
            credential,
        })
    }

    /// A channel the caller built (for example with its own TLS connector, to present a
    /// certificate that is renewed while the channel lives), with no bearer credential.
    pub fn from_channel(address: &str, channel: Channel) -> Self {
        Self {
            address: address.to_owned(),
            channel,
            credential: None,
        }
    }

    /// Presents the token in `path` instead, read again for every call, so a rotated
    /// token (the kubelet refreshes projected ServiceAccount tokens) is picked up. Fails
    /// if the file cannot be read now.
    pub fn with_credential_file(mut self, path: &std::path::Path) -> Result<Self, ChannelError> {
        let token = std::fs::read_to_string(path).map_err(|_| ChannelError::Credential)?;
        let value = bearer(&token)?;
        self.credential = Some(Credential::File(
            path.to_owned(),
            std::sync::Arc::new(std::sync::Mutex::new(Some(value))),
        ));
        Ok(self)
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
        let value = match &self.credential {
            None => return,
            Some(Credential::Token(v)) => v.clone(),
            Some(Credential::File(path, last)) => {
                let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                match std::fs::read_to_string(path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| bearer(&t).map_err(|e| e.to_string()))
                {
                    Ok(v) => *last = Some(v),
                    Err(e) => tracing::warn!(
                        file = %path.display(),
                        "re-reading the credential: {e}; presenting the last one read"
                    ),
                }
                match last.clone() {
                    Some(v) => v,
                    None => return,
                }
            }
        };
        req.metadata_mut().insert("authorization", value);
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

        // A token file is read again for every call; a failed read keeps the last token.
        let path = std::env::temp_dir().join(format!("ambit-credential-{}", std::process::id()));
        std::fs::write(&path, "one\n").unwrap();
        let cp = cp.with_credential_file(&path).unwrap();
        let header = |cp: &ControlPlane| {
            let mut req = tonic::Request::new(());
            cp.authorize(&mut req);
            req.metadata().get("authorization").unwrap().clone()
        };
        assert_eq!(header(&cp), "Bearer one");
        std::fs::write(&path, "two").unwrap();
        assert_eq!(header(&cp), "Bearer two");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(header(&cp), "Bearer two");
        assert!(matches!(
            cp.with_credential_file(&path),
            Err(ChannelError::Credential)
        ));
    }
}
