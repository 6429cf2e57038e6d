//! Kubernetes callers: a node agent presents its pod's projected ServiceAccount token
//! (audience [`AUDIENCE`]); the API server's TokenReview says whose it is, and the node
//! it speaks for is the one the token's bound pod is scheduled on.
//!
//! A token is accepted only if the API server authenticates it for [`AUDIENCE`], it
//! belongs to the agents' ServiceAccount, and it is bound to a pod (so it dies with the
//! pod) that is still that pod (same uid) and is scheduled on a node. The node comes
//! from the review's `authentication.kubernetes.io/node-name` extra when the API server
//! sets it (Kubernetes 1.32 does, by default), else from the bound pod's `spec.nodeName`.
//!
//! Any other ServiceAccount's pod-bound token authenticates its pod ([`Caller::Pod`]):
//! the CA then signs only what the model says that pod is (a waypoint's pod, its
//! waypoint's identity), so a waypoint needs no secret of its own and no node agent.
//!
//! Accepted tokens are remembered for [`CACHE_FOR`], so an agent's reconnects do not
//! each cost a review; a deleted pod's token therefore works for at most that long.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use tonic::Status;
use tracing::debug;

use super::{Authenticator, Caller};

/// The audience node agents' tokens must be issued for.
pub const AUDIENCE: &str = "ambit-ca";

/// How long an accepted token is remembered.
pub const CACHE_FOR: Duration = Duration::from_secs(30);

/// At most this many tokens are remembered (then the memory starts over).
const CACHE_MAX: usize = 10_000;

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// Authenticates callers with TokenReview.
pub struct TokenReviews {
    client: Client,
    /// `system:serviceaccount:<namespace>:<name>` of the node agents.
    agents: String,
    /// SHA-256 of a token → (who it is, until when that answer stands).
    cache: Mutex<HashMap<[u8; 32], (Caller, Instant)>>,
}

impl std::fmt::Debug for TokenReviews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviews")
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

impl TokenReviews {
    /// Accepts the tokens of ServiceAccount `agents` (`namespace/name`).
    pub fn new(client: Client, agents: &str) -> Result<Self, String> {
        let (ns, name) = agents
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
            .ok_or_else(|| format!("{agents:?} is not a ServiceAccount as <namespace>/<name>"))?;
        Ok(Self {
            client,
            agents: format!("system:serviceaccount:{ns}:{name}"),
            cache: Mutex::default(),
        })
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Caller> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(caller, _)| caller.clone())
    }

    async fn review(&self, token: &str) -> Result<Caller, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Status::unavailable(format!("the TokenReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(Status::unauthenticated(format!(
                "the API server refuses the token: {why}"
            )));
        }
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == AUDIENCE))
        {
            return Err(Status::unauthenticated(format!(
                "the token is not for the audience {AUDIENCE:?}"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some(namespace) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split(':').next())
            .filter(|ns| !ns.is_empty())
            .map(str::to_owned)
        else {
            return Err(Status::permission_denied(format!(
                "{username:?} is not a ServiceAccount"
            )));
        };
        let extra = user.extra.unwrap_or_default();
        let one = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let (Some(pod), Some(uid)) = (one(POD_NAME), one(POD_UID)) else {
            return Err(Status::unauthenticated(
                "the token is not bound to a pod (use a projected ServiceAccount token)",
            ));
        };
        if username != self.agents {
            // A pod of some workload: what it may have is the model's to say.
            return Ok(Caller::Pod { namespace, uid });
        }
        if let Some(node) = one(NODE_NAME).filter(|n| !n.is_empty()) {
            return Ok(Caller::Node(node));
        }
        // An API server that does not put the node in the review: the bound pod's.
        let bound = Api::<Pod>::namespaced(self.client.clone(), &namespace)
            .get_opt(&pod)
            .await
            .map_err(|e| Status::unavailable(format!("reading the bound pod {pod}: {e}")))?
            .filter(|p| p.metadata.uid.as_deref() == Some(uid.as_str()))
            .ok_or_else(|| {
                Status::unauthenticated(format!("the token's pod {namespace}/{pod} is gone"))
            })?;
        bound
            .spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .map(Caller::Node)
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "the token's pod {namespace}/{pod} is not scheduled on a node"
                ))
            })
    }
}

#[tonic::async_trait]
impl Authenticator for TokenReviews {
    async fn caller_of(&self, credential: &str) -> Result<Caller, Status> {
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, credential.as_bytes())
            .as_ref()
            .try_into()
            .expect("32 bytes");
        if let Some(caller) = self.cached(&key) {
            return Ok(caller);
        }
        let caller = self.review(credential).await?;
        debug!(?caller, "a token was reviewed");
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, (caller.clone(), Instant::now() + CACHE_FOR));
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_agents_service_account_is_namespace_slash_name() {
        ambit_hbone::tls::install_default();
        let client =
            Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
        let t = TokenReviews::new(client.clone(), "ambit-system/ambit-agent").unwrap();
        assert_eq!(t.agents, "system:serviceaccount:ambit-system:ambit-agent");
        for bad in ["ambit-agent", "/a", "a/", "a/b/c"] {
            assert!(TokenReviews::new(client.clone(), bad).is_err(), "{bad}");
        }
        // An API server that cannot be reached: unavailable, not "unauthenticated".
        let e = t.caller_of("token").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    }
}
