//! The CA root on Kubernetes: kept in a Secret (`kubernetes.io/tls`: `tls.crt`,
//! `tls.key`) of the control plane's namespace, created by the first replica to start,
//! read by every other; and published, certificate only, in a ConfigMap
//! (`root-cert.pem`) that node agents mount to verify the control plane.
//!
//! Replicas that start together race to create the Secret: the API server lets exactly
//! one create succeed (the others get 409 Conflict and read the winner's), so every
//! replica signs with the same root.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::info;

use super::{CaError, generate_root};

/// The Secret's keys.
const CERT: &str = "tls.crt";
const KEY: &str = "tls.key";
/// The ConfigMap's key (the file agents read with `--xds-root-cert`).
pub const ROOT_CERT_KEY: &str = "root-cert.pem";

/// Why the root could not be read or stored.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The API server refused or failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// Why.
        source: kube::Error,
    },
    /// The Secret exists but does not hold a root.
    #[error(
        "the Secret {0} has no {CERT} and {KEY} (PEM): fill it with the mesh root, or delete it to have one generated"
    )]
    NotARoot(String),
    /// Generating the root failed.
    #[error(transparent)]
    Ca(#[from] CaError),
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// The root `(certificate PEM, key PEM)` in Secret `namespace/name`, generated and
/// stored there first if the Secret does not exist.
pub async fn load_or_create(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(String, String), SecretError> {
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let place = format!("{namespace}/{name}");
    let api_err = |what: &str| {
        let what = format!("{what} the Secret {place}");
        move |source| SecretError::Api { what, source }
    };
    // Three rounds cover "created by another replica meanwhile" and "deleted meanwhile".
    for _ in 0..3 {
        if let Some(s) = api.get_opt(name).await.map_err(api_err("reading"))? {
            let data = s.data.unwrap_or_default();
            let text = |k: &str| {
                data.get(k)
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
                    .filter(|t| t.contains("-----BEGIN"))
            };
            return match (text(CERT), text(KEY)) {
                (Some(cert), Some(key)) => {
                    info!(secret = %place, "loaded the root CA");
                    Ok((cert, key))
                }
                _ => Err(SecretError::NotARoot(place)),
            };
        }
        let (cert, key) = generate_root()?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".to_owned(),
                    "ambit".to_owned(),
                )])),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(BTreeMap::from([
                (CERT.to_owned(), ByteString(cert.clone().into_bytes())),
                (KEY.to_owned(), ByteString(key.clone().into_bytes())),
            ])),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                info!(secret = %place, "generated a new root CA");
                return Ok((cert, key));
            }
            // Another replica created it first: use theirs.
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(api_err("creating")(e)),
        }
    }
    Err(SecretError::NotARoot(place))
}

/// Makes ConfigMap `namespace/name` hold `cert_pem` under [`ROOT_CERT_KEY`].
pub async fn publish_root(
    client: &Client,
    namespace: &str,
    name: &str,
    cert_pem: &str,
) -> Result<(), SecretError> {
    let api = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let place = format!("{namespace}/{name}");
    let api_err = |what: &str| {
        let what = format!("{what} the ConfigMap {place}");
        move |source| SecretError::Api { what, source }
    };
    let data = BTreeMap::from([(ROOT_CERT_KEY.to_owned(), cert_pem.to_owned())]);
    for _ in 0..3 {
        match api.get_opt(name).await.map_err(api_err("reading"))? {
            Some(cm) if cm.data.as_ref() == Some(&data) => return Ok(()),
            Some(mut cm) => {
                // Replaced with its resourceVersion: a concurrent writer makes this 409.
                cm.data = Some(data.clone());
                match api.replace(name, &PostParams::default(), &cm).await {
                    Ok(_) => {
                        info!(configmap = %place, "published the root certificate");
                        return Ok(());
                    }
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(api_err("replacing")(e)),
                }
            }
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.to_owned()),
                        namespace: Some(namespace.to_owned()),
                        ..Default::default()
                    },
                    data: Some(data.clone()),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &cm).await {
                    Ok(_) => {
                        info!(configmap = %place, "published the root certificate");
                        return Ok(());
                    }
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(api_err("creating")(e)),
                }
            }
        }
    }
    Err(SecretError::Api {
        what: format!("publishing to the ConfigMap {place}"),
        source: kube::Error::Service("it kept changing under three attempts".into()),
    })
}

/// Keeps the root certificate published in ConfigMap `name` of every namespace that has
/// a waypoint (as Istio publishes `istio-ca-root-cert`): a waypoint's pods verify the
/// control plane with it, and a pod can mount only a ConfigMap of its own namespace.
/// Runs until `models` closes; a namespace that could not be written is tried again
/// with the next model, or after 10 s.
pub async fn publish_root_to_waypoints(
    client: Client,
    name: String,
    cert_pem: String,
    mut models: tokio::sync::watch::Receiver<std::sync::Arc<crate::model::Model>>,
) {
    let mut done = std::collections::BTreeSet::new();
    loop {
        let wanted: std::collections::BTreeSet<String> = models
            .borrow_and_update()
            .waypoints
            .keys()
            .map(|k| k.namespace.clone())
            .collect();
        let mut failed = false;
        for ns in wanted.difference(&done.clone()) {
            match publish_root(&client, ns, &name, &cert_pem).await {
                Ok(()) => {
                    done.insert(ns.clone());
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(namespace = %ns, "the waypoints of this namespace cannot verify the control plane yet: {e}");
                }
            }
        }
        done.retain(|ns| wanted.contains(ns));
        let retry = async {
            if failed {
                tokio::time::sleep(std::time::Duration::from_secs(10)).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            changed = models.changed() => if changed.is_err() { return },
            _ = retry => {}
        }
    }
}
