//! Ambit's control plane.
//!
//! - [`model`]: the one internal model of the mesh, validated and derived;
//! - [`source`]: where the model comes from (a YAML file today);
//! - [`translate`]: the model as xDS resources, and each node's view of them;
//! - [`ads`]: the Aggregated Discovery Service (state of the world and delta);
//! - [`auth`]: who is calling (a node's bearer credential);
//! - [`ca`]: the certificate authority (workload certificates, node-scoped);
//! - [`metrics`]: Prometheus metrics.

use std::sync::Arc;

use tokio::sync::watch;

use crate::model::Model;
use crate::translate::Snapshot;

/// Turns every model the source publishes into a [`Snapshot`] (translated once, shared
/// by every stream).
pub fn snapshots(mut models: watch::Receiver<Arc<Model>>) -> watch::Receiver<Arc<Snapshot>> {
    let mut model = models.borrow_and_update().clone();
    let mut snapshot = Arc::new(Snapshot::from_model(&model));
    let (tx, rx) = watch::channel(snapshot.clone());
    tokio::spawn(async move {
        while models.changed().await.is_ok() {
            let started = std::time::Instant::now();
            let next = models.borrow_and_update().clone();
            // What did not change is taken from the last snapshot, not encoded again.
            snapshot = Arc::new(Snapshot::from_model_reusing(
                &next,
                Some((&model, &snapshot)),
            ));
            model = next;
            tracing::debug!(
                translate_ms = started.elapsed().as_secs_f64() * 1e3,
                version = snapshot.version(),
                "snapshot translated"
            );
            if tx.send(snapshot.clone()).is_err() {
                return;
            }
        }
    });
    rx
}
pub mod ads;
pub mod auth;
pub mod ca;
pub mod metrics;
pub mod model;
pub mod source;
pub mod translate;
