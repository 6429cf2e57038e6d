//! `ambit-control-plane`: serves the mesh to node agents (xDS) and checks mesh files.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ambit-control-plane", version, about = "Ambit control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the mesh described by a YAML file (re-read when it changes) over xDS.
    Run(RunArgs),
    /// Check a mesh file and print what it describes; exit 1 with every problem if invalid.
    Validate {
        /// The mesh YAML file.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The mesh YAML file (see examples/mesh.yaml).
    #[arg(long, env = "AMBIT_MESH_FILE")]
    mesh_file: PathBuf,
    /// Plaintext xDS (ADS) listener.
    #[arg(long, env = "AMBIT_XDS_ADDR", default_value = "0.0.0.0:15010")]
    xds_addr: std::net::SocketAddr,
    /// How often the mesh file is checked for changes, in milliseconds.
    #[arg(long, env = "AMBIT_FILE_POLL_MS", default_value_t = 100)]
    file_poll_ms: u64,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "AMBIT_LOG", default_value = "info")]
    log: String,
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    use ambit_control_plane::{ads::AdsServer, snapshots, source::file::FileSource};
    let source = FileSource::start(
        args.mesh_file.clone(),
        std::time::Duration::from_millis(args.file_poll_ms),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ads = AdsServer::new(snapshots(source.models.clone()));
    let listener = tokio::net::TcpListener::bind(args.xds_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving xDS");
    tonic::transport::Server::builder()
        .add_service(ads.into_service())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown(),
        )
        .await?;
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
    tracing::info!("shutting down");
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => {
            let filter =
                tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "info".into());
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .init();
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(run(args)) {
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
                    "{}: ok: {} namespaces, {} nodes, {} workloads ({enrolled} enrolled), {} services, {} policies",
                    file.display(),
                    m.namespaces.len(),
                    m.nodes.len(),
                    m.workloads.len(),
                    m.services.len(),
                    m.policies.len()
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
