//! `ambit-control-plane`: serves the mesh to node agents (xDS) and checks mesh files.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ambit-control-plane", version, about = "Ambit control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the mesh (from a YAML file or the cluster) over xDS, with the CA.
    Run(Box<RunArgs>),
    /// Check a mesh file and print what it describes; exit 1 with every problem if invalid.
    Validate {
        /// The mesh YAML file.
        file: PathBuf,
    },
}

/// Where the mesh comes from.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SourceKind {
    /// A YAML mesh file (`--mesh-file`), re-read when it changes.
    File,
    /// The cluster's API server (in-cluster config, or `--kubeconfig`).
    Kubernetes,
}

/// How callers of xDS and the CA prove which node they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AuthKind {
    /// Per-node bootstrap tokens in `--node-tokens-dir` (the simulated cluster).
    NodeTokens,
    /// Pod-bound ServiceAccount tokens (audience `ambit-ca`) of `--agent-service-account`,
    /// checked with TokenReview; the node is the bound pod's.
    Kubernetes,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Where the mesh comes from.
    #[arg(long, env = "AMBIT_SOURCE", value_enum, default_value = "file")]
    source: SourceKind,
    /// The mesh YAML file (see examples/mesh.yaml), for `--source file`.
    #[arg(long, env = "AMBIT_MESH_FILE", required_if_eq("source", "file"))]
    mesh_file: Option<PathBuf>,
    /// A kubeconfig for `--source kubernetes` (default: `KUBECONFIG`, `~/.kube/config`, or
    /// the pod's in-cluster service account).
    #[arg(long, env = "AMBIT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The SPIFFE trust domain of the cluster's identities, for `--source kubernetes` (a
    /// mesh file names its own).
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The control plane's namespace, for `--source kubernetes`: a PeerAuthentication there
    /// without a selector is the mesh-wide default.
    #[arg(long, env = "POD_NAMESPACE", default_value = "ambit-system")]
    root_namespace: String,
    /// Also read Istio's `security.istio.io/v1` AuthorizationPolicy, PeerAuthentication
    /// and RequestAuthentication objects (migrating from Istio ambient), for
    /// `--source kubernetes`.
    #[arg(long, env = "AMBIT_WATCH_ISTIO_POLICIES")]
    watch_istio_policies: bool,
    /// xDS (ADS) and the CA, over TLS with a server certificate from the mesh root.
    #[arg(long, env = "AMBIT_XDS_ADDR", default_value = "0.0.0.0:15012")]
    xds_addr: std::net::SocketAddr,
    /// Names (DNS names or IPs) the TLS server's certificate is valid for: what agents
    /// dial.
    #[arg(
        long = "server-name",
        env = "AMBIT_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "ambit-control-plane.ambit-system.svc,ambit-control-plane.ambit-system.svc.cluster.local"
    )]
    server_names: Vec<String>,
    /// For debugging only: also serve xDS and the CA in plaintext here (callers are still
    /// authenticated, but anyone on the path reads the mesh). No default or manifest uses it.
    #[arg(long, env = "AMBIT_INSECURE_PLAINTEXT_ADDR")]
    insecure_plaintext_addr: Option<std::net::SocketAddr>,
    /// Prometheus `/metrics` and `/healthz/ready`.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15014")]
    metrics_addr: std::net::SocketAddr,
    /// Directory of the root CA (`root-cert.pem`, `root-key.pem`); created with a new root
    /// on first start. Not used with `--ca-secret`.
    #[arg(long, env = "AMBIT_CA_DIR", default_value = "/var/lib/ambit/ca")]
    ca_dir: PathBuf,
    /// For `--source kubernetes`: keep the root CA in this Secret of the control plane's
    /// namespace (created with a new root by the first replica), instead of `--ca-dir`.
    #[arg(long, env = "AMBIT_CA_SECRET")]
    ca_secret: Option<String>,
    /// For `--source kubernetes`: publish the root certificate in this ConfigMap of the
    /// control plane's namespace (key `root-cert.pem`), for agents' `--xds-root-cert`,
    /// and of every namespace with a waypoint, for its pods.
    #[arg(long, env = "AMBIT_ROOT_CERT_CONFIGMAP")]
    root_cert_configmap: Option<String>,
    /// How callers authenticate (default: `kubernetes` with `--source kubernetes`,
    /// `node-tokens` with `--source file`).
    #[arg(long, env = "AMBIT_AUTHENTICATE", value_enum)]
    authenticate: Option<AuthKind>,
    /// The node agents' ServiceAccount (`namespace/name`), for `--authenticate kubernetes`.
    #[arg(
        long,
        env = "AMBIT_AGENT_SERVICE_ACCOUNT",
        default_value = "ambit-system/ambit-agent"
    )]
    agent_service_account: String,
    /// Directory of per-node bootstrap credentials (`<node>.token`, created for new nodes).
    #[arg(
        long,
        env = "AMBIT_NODE_TOKENS_DIR",
        default_value = "/var/lib/ambit/node-tokens"
    )]
    node_tokens_dir: PathBuf,
    /// Lifetime of workload certificates when the agent asks for none, in seconds.
    #[arg(long, env = "AMBIT_CERT_TTL_S", default_value_t = 86_400)]
    cert_ttl_s: u64,
    /// Longest lifetime granted, in seconds.
    #[arg(long, env = "AMBIT_MAX_CERT_TTL_S", default_value_t = 172_800)]
    max_cert_ttl_s: u64,
    /// How often the mesh file is checked for changes, in milliseconds. A change inotify
    /// reports as finished is read at once; any other once the file has not changed for
    /// this long.
    #[arg(long, env = "AMBIT_FILE_POLL_MS", default_value_t = 100)]
    file_poll_ms: u64,
    /// How long a change that removes more than half of the mesh's workloads or namespaces
    /// must stay the source's answer before it is served, in milliseconds (0: at once).
    #[arg(long, env = "AMBIT_SHRINK_HOLD_MS", default_value_t = 5_000)]
    shrink_hold_ms: u64,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "AMBIT_LOG", default_value = "info")]
    log: String,
}

/// What every source gives the server: the model, its problems, and why a change is held;
/// and, for the Kubernetes source, its API client.
struct Source {
    models: tokio::sync::watch::Receiver<std::sync::Arc<ambit_control_plane::model::Model>>,
    errors: tokio::sync::watch::Receiver<Option<String>>,
    held: tokio::sync::watch::Receiver<Option<String>>,
    client: Option<kube::Client>,
}

async fn start_source(args: &RunArgs) -> anyhow::Result<Source> {
    use ambit_control_plane::source::{file, kubernetes};
    let hold = std::time::Duration::from_millis(args.shrink_hold_ms);
    Ok(match args.source {
        SourceKind::File => {
            let path = args.mesh_file.clone().expect("required by clap");
            let watch = file::Watch {
                poll: std::time::Duration::from_millis(args.file_poll_ms),
                hold,
            };
            let s = file::FileSource::start(path, watch).map_err(|e| anyhow::anyhow!("{e}"))?;
            Source {
                models: s.models,
                errors: s.errors,
                held: s.held,
                client: None,
            }
        }
        SourceKind::Kubernetes => {
            let config = match &args.kubeconfig {
                Some(path) => {
                    let kc = kube::config::Kubeconfig::read_from(path)
                        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                    kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
                }
                None => kube::Config::infer().await?,
            };
            tracing::info!(api_server = %config.cluster_url, "watching the cluster");
            let client = kube::Client::try_from(config)?;
            // Gateway API's CRDs are not part of Kubernetes: read Gateways and HTTPRoutes
            // only where they are installed (asked until the API server answers).
            let gateway_api = loop {
                match kubernetes::gateway_api_installed(&client).await {
                    Ok(installed) => break installed,
                    Err(e) => {
                        tracing::warn!(
                            "cannot tell whether the Gateway API is installed (asking again in 2 s): {e}"
                        );
                        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    }
                }
            };
            if !gateway_api {
                tracing::warn!(
                    "the cluster has no Gateway API v1 CRDs (gateway.networking.k8s.io): waypoints (Gateways of class ambit-waypoint) and HTTPRoutes are not read; install them and restart the control plane"
                );
            }
            let options = kubernetes::Options {
                trust_domain: args.trust_domain.clone(),
                hold,
                root_namespace: args.root_namespace.clone(),
                istio_policies: args.watch_istio_policies,
                gateway_api,
            };
            let s = kubernetes::KubeSource::start(client.clone(), options).await;
            Source {
                models: s.models,
                errors: s.errors,
                held: s.held,
                client: Some(client),
            }
        }
    })
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    use ambit_control_plane::{ads::AdsServer, snapshots};
    let source = start_source(&args).await?;
    use ambit_control_plane::auth::NodeTokens;
    use ambit_control_plane::ca::{CaService, CertificateAuthority};
    use std::time::Duration;
    let ads = AdsServer::new(snapshots(source.models.clone()));
    let metrics = std::sync::Arc::new(ambit_control_plane::metrics::ControlPlaneMetrics::new(
        ads.stats(),
        source.models.clone(),
        source.errors.clone(),
        source.held.clone(),
    ));
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_addr).await?;
    tokio::spawn(ambit_control_plane::metrics::serve(
        metrics_listener,
        metrics,
    ));
    let (ttl, max_ttl) = (
        Duration::from_secs(args.cert_ttl_s),
        Duration::from_secs(args.max_cert_ttl_s),
    );
    let needs_client = |flag: &str| {
        source.client.clone().ok_or_else(|| {
            anyhow::anyhow!("{flag} needs --source kubernetes (it uses the cluster's API)")
        })
    };
    let ca = match &args.ca_secret {
        Some(name) => {
            let client = needs_client("--ca-secret")?;
            let (cert, key) = ambit_control_plane::ca::secret::load_or_create(
                &client,
                &args.root_namespace,
                name,
            )
            .await?;
            CertificateAuthority::from_pem(&cert, &key, ttl, max_ttl)?
        }
        None => CertificateAuthority::load_or_create(&args.ca_dir, ttl, max_ttl)?,
    };
    if let Some(name) = &args.root_cert_configmap {
        let client = needs_client("--root-cert-configmap")?;
        ambit_control_plane::ca::secret::publish_root(
            &client,
            &args.root_namespace,
            name,
            ca.root_pem(),
        )
        .await?;
        // And in every namespace with a waypoint, for its pods.
        tokio::spawn(ambit_control_plane::ca::secret::publish_root_to_waypoints(
            client,
            name.clone(),
            ca.root_pem().to_owned(),
            source.models.clone(),
        ));
    }
    let auth_kind = args.authenticate.unwrap_or(match args.source {
        SourceKind::File => AuthKind::NodeTokens,
        SourceKind::Kubernetes => AuthKind::Kubernetes,
    });
    let auth: std::sync::Arc<dyn ambit_control_plane::auth::Authenticator> = match auth_kind {
        AuthKind::Kubernetes => {
            let client = needs_client("--authenticate kubernetes")?;
            tracing::info!(agents = %args.agent_service_account, "callers authenticate with pod-bound ServiceAccount tokens (TokenReview)");
            std::sync::Arc::new(
                ambit_control_plane::auth::kubernetes::TokenReviews::new(
                    client,
                    &args.agent_service_account,
                )
                .map_err(|e| anyhow::anyhow!("--agent-service-account: {e}"))?,
            )
        }
        AuthKind::NodeTokens => {
            let tokens = std::sync::Arc::new(NodeTokens::new(args.node_tokens_dir.clone())?);
            tokens.ensure(&source.models.borrow())?;
            // New nodes in the mesh get a credential too.
            let (t, mut models) = (tokens.clone(), source.models.clone());
            tokio::spawn(async move {
                while models.changed().await.is_ok() {
                    let model = models.borrow_and_update().clone();
                    if let Err(e) = t.ensure(&model) {
                        tracing::warn!("creating node credentials: {e}");
                    }
                }
            });
            tokens
        }
    };
    let (cert, key) =
        ca.server_certificate(&args.server_names, Duration::from_secs(365 * 86_400))?;
    let root = ca.root_pem().to_owned();
    let ca = CaService::new(std::sync::Arc::new(ca), auth.clone(), source.models.clone());
    let ads = ads.authenticated_by(auth);
    // Node agents authenticate with a bearer credential; waypoints may instead present
    // their mesh certificate (verified here against the mesh root).
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key))
        .client_ca_root(tonic::transport::Certificate::from_pem(root))
        .client_auth_optional(true);
    let listener = tokio::net::TcpListener::bind(args.xds_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, names = ?args.server_names, "serving xDS and the CA over TLS");
    // SIGTERM: stop accepting and let calls finish, but agents' ADS streams never end
    // by themselves, so after GRACE close them (agents reconnect to another replica).
    const GRACE: Duration = Duration::from_secs(2);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown().await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let secure = tonic::transport::Server::builder()
        .tls_config(tls)?
        .add_service(ads.clone().into_service())
        .add_service(ca.clone().into_service())
        .serve_with_incoming_shutdown(ambit_control_plane::incoming(listener), stopped());
    let plain = match args.insecure_plaintext_addr {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::warn!(addr = %listener.local_addr()?, "also serving xDS and the CA in PLAINTEXT (--insecure-plaintext-addr): for debugging only");
            Some(
                tonic::transport::Server::builder()
                    .add_service(ads.into_service())
                    .add_service(ca.into_service())
                    .serve_with_incoming_shutdown(
                        ambit_control_plane::incoming(listener),
                        stopped(),
                    ),
            )
        }
    };
    let serve = async move {
        match plain {
            None => secure.await,
            Some(plain) => tokio::try_join!(secure, plain).map(drop),
        }
    };
    let grace = async {
        stopped().await;
        tokio::time::sleep(GRACE).await;
    };
    tokio::select! {
        r = serve => r?,
        _ = grace => tracing::info!("open streams closed after {GRACE:?}"),
    }
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
    tracing::info!("shutting down");
}

fn main() -> ExitCode {
    ambit_hbone::tls::install_default();
    match Cli::parse().command {
        Command::Run(args) => {
            let filter =
                tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "info".into());
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .init();
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ambit-control-plane: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Validate { file } => match ambit_control_plane::source::file::load(&file) {
            Ok(m) => {
                let enrolled = m.workloads.values().filter(|w| w.enrolled).count();
                println!(
                    "{}: ok: {} namespaces, {} nodes, {} workloads ({enrolled} enrolled), {} services, {} waypoints, {} HTTP routes, {} policies (L4), {} waypoint policies, {} request authentications",
                    file.display(),
                    m.namespaces.len(),
                    m.nodes.len(),
                    m.workloads.len(),
                    m.services.len(),
                    m.waypoints.len(),
                    m.http_routes.len(),
                    m.policies.len(),
                    m.waypoint_policies.len(),
                    m.request_authentications.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}
