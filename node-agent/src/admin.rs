//! HTTP endpoints: `/metrics` (Prometheus), `/healthz/ready`, and on the localhost admin
//! listener `/debug/pods`, `/debug/connections` and `/debug/config_dump` (JSON).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::capture::pods::PodRegistry;
use crate::identity::Certificates;
use crate::proxy::{HbonePool, RecentConnections};
use crate::state::Store;
use crate::telemetry::Telemetry;

/// What the endpoints show, and nothing else.
#[derive(Debug)]
pub struct AdminState {
    /// This node's name.
    pub node: String,
    /// The control plane's address, if any.
    pub xds_address: Option<String>,
    /// True once the programs are attached and enrolled pods are taken over; false again
    /// while the agent drains at shutdown.
    pub ready: AtomicBool,
    /// Metrics.
    pub telemetry: Arc<Telemetry>,
    /// Known and captured pods.
    pub pods: Arc<PodRegistry>,
    /// The mesh as the control plane describes it.
    pub store: Arc<Store>,
    /// Workload certificates.
    pub certs: Arc<Certificates>,
    /// The xDS client's state.
    pub xds: Arc<ambit_xds::client::XdsStatus>,
    /// HBONE connections.
    pub pool: Arc<HbonePool>,
    /// Recently captured connections.
    pub recent: Arc<RecentConnections>,
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// `/metrics` only.
    Metrics,
    /// `/healthz/ready` only.
    Ready,
    /// Everything, including `/debug/*` (bind it to localhost).
    Admin,
}

/// Serves HTTP/1.1 on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, agent: Arc<AdminState>, endpoints: Endpoints) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Typically EMFILE: wait for descriptors to free up instead of spinning.
                warn!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let agent = agent.clone();
                async move { Ok::<_, Infallible>(route(&agent, endpoints, &req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!("admin connection: {e}");
            }
        });
    }
}

fn route(
    agent: &AdminState,
    endpoints: Endpoints,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    use Endpoints::*;
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match (endpoints, req.uri().path()) {
        (Metrics | Admin, "/metrics") => Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(agent.telemetry.encode())))
            .expect("static response parts are valid"),
        (Ready | Admin, "/healthz/ready") => {
            if agent.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: starting (programs not attached yet) or draining\n",
                )
            }
        }
        (Admin, "/debug/pods") => json(&agent.pods.list_known()),
        (Admin, "/debug/config_dump") => json(&serde_json::json!({
            "node": agent.node,
            "xds": {
                "address": agent.xds_address,
                "connected": agent.xds.connected.load(Ordering::Acquire),
                "connects": agent.xds.connects.load(Ordering::Relaxed),
                "acks": agent.xds.acks.load(Ordering::Relaxed),
                "nacks": agent.xds.nacks.load(Ordering::Relaxed),
                "types": agent.xds.types(),
            },
            "mesh": agent.store.read(|s| serde_json::to_value(s).unwrap_or_default()),
            "pods": agent.pods.list_known(),
            "certificates": agent.certs.all().iter().map(|c| &**c).collect::<Vec<_>>(),
            "certificate_requests": {
                "issued": agent.certs.issued.load(Ordering::Relaxed),
                "failed": agent.certs.failures.load(Ordering::Relaxed),
            },
            "hbone_pool": {
                "connections": agent.pool.connections(),
                "keys": agent.pool.bookkeeping().0,
                "dialing": agent.pool.bookkeeping().1,
            },
        })),
        (Admin, "/debug/connections") => json(&agent.recent.snapshot()),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response parts are valid")
}

fn json<T: serde::Serialize>(v: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(v)
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
