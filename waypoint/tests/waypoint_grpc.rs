//! gRPC through the waypoint, with tonic at both ends: unary and server streaming over
//! HTTP/2, trailers and `grpc-status` preserved, and a retry on UNAVAILABLE.

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("ambit.test");
}

const MESH: &str = r#"
namespaces: [{name: shop}]
nodes: [{name: node-1}]
waypoints: [{name: wp, namespace: shop}]
workloads:
  - {name: wp-0, namespace: shop, node: node-1, serviceAccount: wp, ips: [10.244.1.20],
     labels: {gateway.networking.k8s.io/gateway-name: wp}}
  - {name: echo-0, namespace: shop, node: node-1, ips: [10.244.1.40], labels: {app: echo}}
services:
  - {name: echo, namespace: shop, vips: [10.96.2.10], ports: [{name: grpc, port: 50051}],
     selector: {app: echo}, labels: {ambit.dev/waypoint: wp}}
httpRoutes:
  - name: echo
    namespace: shop
    parentRefs: [{kind: Service, name: echo}]
    rules:
      - backendRefs: [{name: echo, port: 50051}]
        retry: {attempts: 2, backoff: 1ms, retryOn: [unavailable]}
"#;

#[derive(Default)]
struct Echo {
    calls: AtomicU64,
}

#[tonic::async_trait]
impl pb::echo_server::Echo for Arc<Echo> {
    async fn unary(&self, req: Request<pb::Msg>) -> Result<Response<pb::Msg>, Status> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let text = req.into_inner().text;
        match text.as_str() {
            // Every odd call is UNAVAILABLE: the waypoint's retry must hide it.
            "flaky" if n % 2 == 1 => Err(Status::unavailable("try again")),
            "denied" => Err(Status::permission_denied("no")),
            _ => {
                let mut r = Response::new(pb::Msg {
                    text: format!("echo {text}"),
                });
                r.metadata_mut()
                    .insert("x-served-by", "echo-0".parse().unwrap());
                Ok(r)
            }
        }
    }

    type StreamStream = Pin<Box<dyn Stream<Item = Result<pb::Msg, Status>> + Send>>;

    async fn stream(&self, req: Request<pb::Msg>) -> Result<Response<Self::StreamStream>, Status> {
        let text = req.into_inner().text;
        let items: Vec<Result<pb::Msg, Status>> = (0..3)
            .map(|i| {
                Ok(pb::Msg {
                    text: format!("{text} {i}"),
                })
            })
            .chain([Err(Status::data_loss(
                "the end, with a status in the trailers",
            ))])
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

#[tokio::test]
async fn waypoint_carries_grpc_unary_streaming_trailers_and_retries_unavailable() {
    let echo = Arc::new(Echo::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::echo_server::EchoServer::new(echo.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let wp = TestWaypoint::start().await;
    wp.map("10.244.1.40:50051", addr);
    wp.apply(&model(MESH)).unwrap();

    // A tonic client whose every connection is an HBONE tunnel to the service VIP.
    let wp = Arc::new(wp);
    let w = wp.clone();
    let channel = tonic::transport::Endpoint::from_static("http://echo.shop.svc.cluster.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let w = w.clone();
            async move {
                w.tunnel("10.96.2.10:50051")
                    .await
                    .map(hyper_util::rt::TokioIo::new)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            }
        }))
        .await
        .unwrap();
    let mut client = pb::echo_client::EchoClient::new(channel);

    let r = client.unary(pb::Msg { text: "hi".into() }).await.unwrap();
    assert_eq!(r.metadata().get("x-served-by").unwrap(), "echo-0");
    assert_eq!(r.into_inner().text, "echo hi");

    // A non-retriable status comes back as the server sent it.
    let e = client
        .unary(pb::Msg {
            text: "denied".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (tonic::Code::PermissionDenied, "no")
    );

    // UNAVAILABLE on every other call, never seen by the client.
    let before = echo.calls.load(Ordering::SeqCst);
    for _ in 0..10 {
        let r = client
            .unary(pb::Msg {
                text: "flaky".into(),
            })
            .await;
        assert_eq!(r.unwrap().into_inner().text, "echo flaky");
    }
    let attempts = echo.calls.load(Ordering::SeqCst) - before;
    assert!(
        (15..=20).contains(&attempts),
        "{attempts} attempts for 10 calls"
    );

    // Server streaming, and the status in the trailers.
    let mut s = client
        .stream(pb::Msg { text: "n".into() })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let end = loop {
        match s.message().await {
            Ok(Some(m)) => got.push(m.text),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    assert_eq!(got, ["n 0", "n 1", "n 2"]);
    let end = end.expect("the trailers' status");
    assert_eq!(end.code(), tonic::Code::DataLoss);
    assert_eq!(end.message(), "the end, with a status in the trailers");

    // Istio's request metrics carry each call's gRPC status: from a trailers-only
    // answer (PERMISSION_DENIED) and from the trailers after a stream (DATA_LOSS).
    let count = |status: &str| {
        let m = wp.metrics.encode();
        m.lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("request_protocol=\"grpc\"")
                    && l.contains(&format!("grpc_response_status=\"{status}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while count("15") < 1.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(count("0"), 11.0, "{}", wp.metrics.encode());
    assert_eq!(count("7"), 1.0, "{}", wp.metrics.encode());
    assert_eq!(count("15"), 1.0, "{}", wp.metrics.encode());
}
