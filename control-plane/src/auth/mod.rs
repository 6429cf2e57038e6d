//! Who is calling the control plane: a bearer credential in the request's
//! `authorization` metadata, mapped to the node it speaks for. The CA signs only that
//! node's identities, and the xDS server serves only that node's view, whatever node id
//! the caller claims.
//!
//! - [`NodeTokens`]: the file source's per-node bootstrap tokens (the simulated cluster);
//! - [`kubernetes::TokenReviews`]: pod-bound Kubernetes ServiceAccount tokens, checked
//!   with the API server's TokenReview; a node agent's speaks for the node its pod runs
//!   on, any other for its pod (a waypoint's, for its own certificate).

pub mod kubernetes;

use std::io;
use std::path::PathBuf;

use ring::rand::SecureRandom;
use tonic::Status;
use tonic::metadata::MetadataMap;
use tracing::{info, warn};

use crate::ca::write_private;
use crate::model::Model;

/// Who a call comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A node agent, by its credential: the node it speaks for.
    Node(String),
    /// A workload (a waypoint) by its mesh certificate, verified against the mesh root
    /// during the TLS handshake.
    Workload(ambit_identity::Identity),
    /// A pod, by a ServiceAccount token bound to it that is not a node agent's (a
    /// waypoint asking the CA for its first certificate): what it may have is decided
    /// by what the model says that pod is.
    Pod {
        /// The pod's namespace.
        namespace: String,
        /// The pod's uid (the token dies with that pod).
        uid: String,
    },
}

/// The SPIFFE identity of the request's TLS client certificate, if it presented one (the
/// TLS layer has verified it chains to the mesh root). A certificate without exactly one
/// mesh URI SAN is refused.
pub fn workload_of<T>(
    request: &tonic::Request<T>,
) -> Result<Option<ambit_identity::Identity>, Status> {
    let Some(certs) = request.peer_certs() else {
        return Ok(None);
    };
    let Some(leaf) = certs.first() else {
        return Ok(None);
    };
    ambit_identity::Identity::from_certificate(leaf.as_ref())
        .map(Some)
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))
}

/// Who the request's `authorization: Bearer <credential>` authenticates (a node, or a
/// pod), or the gRPC status refusing it.
pub async fn authenticate(
    auth: &dyn Authenticator,
    metadata: &MetadataMap,
) -> Result<Caller, Status> {
    let credential = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <node credential>`")
        })?;
    auth.caller_of(credential).await.inspect_err(|e| {
        warn!(code = ?e.code(), "refused a caller: {}", e.message());
    })
}

/// Who is calling: maps a bearer credential to a node (or a pod).
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + std::fmt::Debug + 'static {
    /// Who `credential` authenticates: [`Caller::Node`] or [`Caller::Pod`]; or why not,
    /// as the status to answer with (`UNAUTHENTICATED` for a bad credential,
    /// `PERMISSION_DENIED` for a good one that may not act as a caller,
    /// `UNAVAILABLE` when it cannot be checked now).
    async fn caller_of(&self, credential: &str) -> Result<Caller, Status>;
}

/// File-mode bootstrap credentials: `<dir>/<node>.token`, one random token per node,
/// created (mode 0600) for every node of the model that has none. A node agent is given
/// its file (`--node-credential-file`); Kubernetes service-account tokens can replace
/// this by implementing [`Authenticator`].
///
/// The tokens are read once (at start, and when [`NodeTokens::ensure`] creates one) and
/// kept in memory, so authenticating a request touches no file.
#[derive(Debug)]
pub struct NodeTokens {
    dir: PathBuf,
    /// node → token.
    tokens: std::sync::RwLock<std::collections::BTreeMap<String, String>>,
}

impl NodeTokens {
    /// The tokens of `dir` (created if missing).
    pub fn new(dir: PathBuf) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let t = Self {
            dir,
            tokens: Default::default(),
        };
        t.reload()?;
        Ok(t)
    }

    /// Reads every `<node>.token` of the directory.
    fn reload(&self) -> io::Result<()> {
        let mut tokens = std::collections::BTreeMap::new();
        for e in std::fs::read_dir(&self.dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(node) = name.strip_suffix(".token") {
                let token = std::fs::read_to_string(e.path())?;
                tokens.insert(node.to_owned(), token.trim().to_owned());
            }
        }
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = tokens;
        Ok(())
    }

    /// Makes sure every node of the model has a token.
    pub fn ensure(&self, model: &Model) -> io::Result<()> {
        let mut created = false;
        for node in &model.nodes {
            let path = self.dir.join(format!("{node}.token"));
            if !path.exists() {
                let mut b = [0u8; 32];
                ring::rand::SystemRandom::new()
                    .fill(&mut b)
                    .map_err(|_| io::Error::other("RNG"))?;
                let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
                write_private(&path, &token)?;
                info!(node, file = %path.display(), "created a node credential");
                created = true;
            }
        }
        if created {
            self.reload()?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Authenticator for NodeTokens {
    async fn caller_of(&self, credential: &str) -> Result<Caller, Status> {
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        // Compare with every token, so the time taken says nothing about which matched.
        let mut found = None;
        for (node, token) in tokens.iter() {
            if constant_time_eq(token.as_bytes(), credential.as_bytes()) {
                found = Some(node.clone());
            }
        }
        found
            .map(Caller::Node)
            .ok_or_else(|| Status::unauthenticated("unknown node credential"))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn node_tokens_are_created_kept_in_memory_and_matched() {
        let dir = std::env::temp_dir().join(format!("ambit-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tokens = NodeTokens::new(dir.clone()).unwrap();
        let model = Model {
            nodes: ["n1".to_string(), "n2".to_string()].into(),
            ..Default::default()
        };
        tokens.ensure(&model).unwrap();
        let t1 = std::fs::read_to_string(dir.join("n1.token")).unwrap();
        assert_eq!(
            tokens.caller_of(&t1).await.unwrap(),
            Caller::Node("n1".into())
        );
        assert!(tokens.caller_of("nope").await.is_err());
        assert!(tokens.caller_of("").await.is_err());
        // Authentication reads no file: removing them changes nothing until a reload.
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            tokens.caller_of(&t1).await.unwrap(),
            Caller::Node("n1".into())
        );
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
