//! `ambit-waypoint`: gets its certificate from the node agent (SDS) or, with its pod's
//! token, from the control plane's CA; its configuration from the control plane
//! (standard Envoy xDS, authenticated with that certificate); and serves HBONE on
//! `:15008`. See the library's documentation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ambit_waypoint::admin::{AdminState, Endpoints};
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
    /// The node agent's SDS socket, where this pod's certificate comes from (unless
    /// `--ca-credential-file` is given).
    #[arg(
        long,
        env = "AMBIT_SDS_SOCKET",
        default_value = "/var/run/ambit/sds.sock"
    )]
    sds_socket: PathBuf,
    /// Get the certificate from the control plane's CA instead of a node agent, with
    /// this pod-bound ServiceAccount token (audience `ambit-ca`; re-read for every
    /// request, so the kubelet's rotation is picked up). Needs `--xds-root-cert` and
    /// `--service-account`. How waypoints run on Kubernetes.
    #[arg(long, env = "AMBIT_CA_CREDENTIAL_FILE", requires_all = ["xds_root_cert", "service_account"])]
    ca_credential_file: Option<PathBuf>,
    /// The mesh root certificate (PEM) that the control plane's server certificate
    /// and the waypoint's own chain to (with `--ca-credential-file`).
    #[arg(long, env = "AMBIT_XDS_ROOT_CERT")]
    xds_root_cert: Option<PathBuf>,
    /// The pod's ServiceAccount (its identity is
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`).
    #[arg(long, env = "AMBIT_SERVICE_ACCOUNT")]
    service_account: Option<String>,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Where HBONE is accepted.
    #[arg(long, default_value = "[::]:15008")]
    listen: SocketAddr,
    /// Where `/metrics` (Istio's HTTP metrics) and `/healthz/ready` are served.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "[::]:15020")]
    metrics_addr: SocketAddr,
    /// Where `/healthz/ready` is served (200 once the waypoint has its certificate and a
    /// whole configuration and serves HBONE; 503 before).
    #[arg(long, env = "AMBIT_READY_ADDR", default_value = "[::]:15021")]
    ready_addr: SocketAddr,
    /// Where `/debug/config_dump`, `/metrics` and `/healthz/ready` are served (keep it on
    /// localhost).
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
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
    /// Export a span per request with OTLP over gRPC to this collector
    /// (`http://otel-collector:4317`); none: no spans.
    #[arg(long, env = "AMBIT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Percent of the traces the waypoint starts (requests without a sampled parent)
    /// that are recorded; a sampled parent's are always.
    #[arg(long, env = "AMBIT_TRACE_SAMPLING", default_value_t = 1.0)]
    trace_sampling: f64,
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
    ambit_hbone::tls::install_default();
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
    let node_id = ambit_xds::waypoint::node_id(&args.namespace, &args.name);
    let (handler, config) = ConfigHandler::new();
    let (certs_tx, certs) = watch::channel(None);
    let metrics = Arc::new(ambit_waypoint::telemetry::Metrics::default());
    let xds_status = Arc::new(ambit_xds::client::XdsStatus::default());
    // The admin, readiness and metrics endpoints answer from the start (not ready until
    // the waypoint serves), so a probe or a person sees what it waits for.
    let admin = Arc::new(AdminState {
        node: node_id.clone(),
        xds_address: args.xds_address.clone(),
        ready: AtomicBool::new(false),
        xds: xds_status.clone(),
        config: config.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
    });
    for (addr, endpoints) in [
        (args.admin_addr, Endpoints::Admin),
        (args.ready_addr, Endpoints::Ready),
        (args.metrics_addr, Endpoints::Metrics),
    ] {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tokio::spawn(ambit_waypoint::admin::serve(l, admin.clone(), endpoints));
    }

    let (material_tx, mut material) = watch::channel(None);
    match &args.ca_credential_file {
        Some(token) => {
            let root_path = args.xds_root_cert.as_ref().expect("required by clap");
            let roots_pem = std::fs::read_to_string(root_path)
                .with_context(|| format!("reading {}", root_path.display()))?;
            let sa = args.service_account.as_deref().expect("required by clap");
            let identity = ambit_identity::Identity::new(&args.trust_domain, &args.namespace, sa)
                .map_err(|e| anyhow::anyhow!("the waypoint's identity: {e}"))?;
            let control_plane =
                ambit_xds::channel::ControlPlane::new(&args.xds_address, None, Some(&roots_pem))?
                    .with_credential_file(token)
                    .with_context(|| format!("reading {}", token.display()))?;
            info!(%identity, ca = %args.xds_address, "waiting for a certificate from the control plane's CA");
            tokio::spawn(ambit_waypoint::ca::run(
                ambit_waypoint::ca::CaSource {
                    control_plane,
                    identity,
                    roots_pem,
                    ttl: Duration::ZERO,
                },
                material_tx,
            ));
        }
        None => {
            tokio::spawn(ambit_waypoint::sds::run(
                args.sds_socket.clone(),
                material_tx,
            ));
            info!(socket = %args.sds_socket.display(), "waiting for a certificate from the node agent");
        }
    }
    let first = material
        .wait_for(Option::is_some)
        .await
        .context("the SDS client stopped")?
        .clone()
        .expect("some");
    // The certificates the data path uses follow every renewal.
    certs_tx.send_replace(Some(first.certs.clone()));
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
    // Envoy's four types, the L4 policies that select the waypoint's pods and the
    // workloads it fronts.
    let types: Vec<&'static str> = ambit_xds::type_url::WAYPOINT
        .into_iter()
        .chain(ambit_xds::type_url::WAYPOINT_AMBIT)
        .collect();
    let xds = ambit_xds::client::XdsClient::spawn_with_status(
        ambit_xds::client::XdsClientConfig {
            control_plane,
            node_id: node_id.clone(),
            types: types.clone(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(15),
        },
        handler,
        xds_status,
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
    let tracing = match &args.otlp_endpoint {
        None => None,
        Some(endpoint) => Some(
            ambit_otel::Tracing::otlp(&ambit_otel::Config {
                endpoint: endpoint.clone(),
                service: "ambit-waypoint".into(),
                resource: vec![
                    ("k8s.namespace.name".into(), args.namespace.clone()),
                    ("gateway.name".into(), args.name.clone()),
                ],
                sample_percent: args.trace_sampling,
            })
            .context("tracing")?,
        ),
    };
    let inbound = Inbound {
        tracing: tracing.clone(),
        limiter: Default::default(),
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
    admin.ready.store(true, Ordering::Release);
    info!(node = %node_id, identity = %first.certs.identity, listen = %args.listen, "waypoint ready");
    // One line on stdout for whoever waits for readiness (logs go to stderr).
    println!("waypoint ready");
    tokio::select! {
        _ = inbound.serve(listener) => {}
        _ = shutdown() => {
            admin.ready.store(false, Ordering::Release);
            info!("stopping");
        }
    }
    if let Some(t) = tracing {
        t.shutdown().await;
    }
    Ok(())
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
