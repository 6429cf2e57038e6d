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

/// The connections `listener` accepts, as the xDS and CA server takes them: with
/// `TCP_NODELAY`. (tonic sets it only on listeners it binds itself. Without it, a
/// response written in more than one piece — HTTP/2 headers, data, trailers — waits for
/// the peer's delayed ACK: 40 ms per certificate request, and as much on xDS pushes.)
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

pub mod ads;
pub mod auth;
pub mod ca;
pub mod metrics;
pub mod model;
pub mod source;
pub mod translate;

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn accepted_connections_do_not_wait_to_coalesce_small_writes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = super::incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY is off");
    }
}
