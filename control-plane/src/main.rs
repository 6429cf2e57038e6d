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
    /// Check a mesh file and print what it describes; exit 1 with every problem if invalid.
    Validate {
        /// The mesh YAML file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
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
