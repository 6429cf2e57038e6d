//! `ambit-waypoint`: gets its certificate from the node agent (SDS), its configuration
//! from the control plane (standard Envoy xDS, authenticated with that certificate), and
//! serves HBONE on `:15008`. See the library's documentation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit_waypoint::config::xds::ConfigHandler;
use ambit_waypoint::inbound::Inbound;
use ambit_waypoint::upstream::Upstreams;
use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;
use tracing::info;

#[derive(Parser, Debug)]
#[command(version, about = "Ambit's waypoint: a per-service L7 proxy")]
struct Args {
    /// The control plane (`https://host:15012`).
    #[arg(long, env = "AMBIT_XDS_ADDRESS")]
    xds_address: String,
    /// The waypoint's namespace.
    #[arg(long, env = "AMBIT_WAYPOINT_NAMESPACE")]
    namespace: String,
    /// The waypoint's name (its Gateway's; its pods carry
    /// `gateway.networking.k8s.io/gateway-name: <name>`).
    #[arg(long, env = "AMBIT_WAYPOINT_NAME")]
    name: String,
    /// The node agent's SDS socket, where this pod's certificate comes from.
    #[arg(
        long,
        env = "AMBIT_SDS_SOCKET",
        default_value = "/var/run/ambit/sds.sock"
    )]
    sds_socket: PathBuf,
    /// Where HBONE is accepted.
    #[arg(long, default_value = "[::]:15008")]
    listen: SocketAddr,
    /// Where `/metrics` (Istio's HTTP metrics) and `/healthz/ready` are served.
    #[arg(long, default_value = "[::]:15020")]
    metrics_addr: SocketAddr,
    /// Log filter (tracing's `EnvFilter` syntax).
    #[arg(long, env = "AMBIT_LOG", default_value = "info")]
    log: String,
    /// For benchmarks and debugging only, never in a deployment: `ADDR=VIP:PORT` serves on
    /// ADDR, in plaintext, what a tunnel to the service VIP:PORT carries, without mutual
    /// TLS, caller identity or L4 policy (as a stock Envoy's plain HTTP listener). Repeatable.
    #[arg(long = "plaintext-listener", value_parser = parse_plaintext)]
    plaintext_listeners: Vec<(SocketAddr, SocketAddr)>,
    /// Log (the access log included) as JSON lines.
    #[arg(long, env = "AMBIT_LOG_JSON")]
    log_json: bool,
}

fn parse_plaintext(v: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (addr, authority) = v
        .split_once('=')
        .ok_or_else(|| format!("{v:?}: want ADDR=VIP:PORT"))?;
    let parse = |s: &str| {
        s.parse::<SocketAddr>()
            .map_err(|e| format!("{s:?} is not an address with a port: {e}"))
    };
    Ok((parse(addr)?, parse(authority)?))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|e| {
        eprintln!("bad --log filter {:?} ({e}); using info", args.log);
        tracing_subscriber::EnvFilter::new("info")
    });
    // Colours only for a person at a terminal, never into a log file or a collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if args.log_json {
        builder.json().init()
    } else {
        builder.init()
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (material_tx, mut material) = watch::channel(None);
    tokio::spawn(ambit_waypoint::sds::run(
        args.sds_socket.clone(),
        material_tx,
    ));
    info!(socket = %args.sds_socket.display(), "waiting for a certificate from the node agent");
    let first = material
        .wait_for(Option::is_some)
        .await
        .context("the SDS client stopped")?
        .clone()
        .expect("some");
    // The certificates the data path uses follow every renewal.
    let (certs_tx, certs) = watch::channel(Some(first.certs.clone()));
    {
        let mut material = material.clone();
        tokio::spawn(async move {
            while material.changed().await.is_ok() {
                let m = material.borrow_and_update().clone();
                certs_tx.send_replace(m.map(|m| m.certs));
            }
        });
    }
    // Every (re)connection presents the certificate current then: renewals included.
    let control_plane = ambit_waypoint::control_plane::channel(&args.xds_address, material.clone())
        .with_context(|| format!("the control plane address {:?}", args.xds_address))?;
    let (handler, config) = ConfigHandler::new();
    // Envoy's four types, the L4 policies that select the waypoint's pods and the
    // workloads it fronts.
    let types: Vec<&'static str> = ambit_xds::type_url::WAYPOINT
        .into_iter()
        .chain(ambit_xds::type_url::WAYPOINT_AMBIT)
        .collect();
    let node_id = ambit_xds::waypoint::node_id(&args.namespace, &args.name);
    let xds = ambit_xds::client::XdsClient::spawn(
        ambit_xds::client::XdsClientConfig {
            control_plane,
            node_id: node_id.clone(),
            types: types.clone(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(15),
        },
        handler,
    );
    // Ready only with a whole configuration: before it, every tunnel would get 400.
    let mut waited = Duration::ZERO;
    while !xds.status.synced(&types) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
        if waited.as_millis().is_multiple_of(5_000) {
            info!(address = %args.xds_address, "still waiting for the first configuration");
        }
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let metrics = std::sync::Arc::new(ambit_waypoint::telemetry::Metrics::default());
    let admin = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding {}", args.metrics_addr))?;
    tokio::spawn(serve_metrics(admin, metrics.clone()));
    let inbound = Inbound {
        config,
        upstreams: Upstreams::new(
            certs.clone(),
            Some(ambit_waypoint::telemetry::baggage(
                &args.namespace,
                &args.name,
            )),
        ),
        certs,
        metrics,
    };
    for (addr, authority) in &args.plaintext_listeners {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::warn!(%addr, %authority, "plaintext listener (benchmarks and debugging only): no mutual TLS, no caller identity, no L4 policy");
        tokio::spawn(inbound.clone().serve_plaintext(l, *authority));
    }
    info!(node = %node_id, identity = %first.certs.identity, listen = %args.listen, "waypoint ready");
    // One line on stdout for whoever waits for readiness (logs go to stderr).
    println!("waypoint ready");
    tokio::select! {
        _ = inbound.serve(listener) => {}
        _ = shutdown() => info!("stopping"),
    }
    Ok(())
}

/// `/metrics` and `/healthz/ready` (the waypoint is ready once this runs).
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<ambit_waypoint::telemetry::Metrics>,
) {
    loop {
        let (tcp, _) = ambit_waypoint::inbound::accept(&listener).await;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let (status, body) = match req.uri().path() {
                            "/metrics" => (200, metrics.encode()),
                            "/healthz/ready" => (200, "ready\n".to_owned()),
                            _ => (404, String::new()),
                        };
                        hyper::Response::builder()
                            .status(status)
                            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
