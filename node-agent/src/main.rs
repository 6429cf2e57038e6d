//! `ambit-agent`: the node agent (`run`) and a client of its enrollment API (`enroll`).

use std::net::IpAddr;
use std::path::PathBuf;

use ambit_mesh::enroll::{EnrollClient, PodSpec};
use ambit_node_agent::config::Config;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ambit-agent", version, about = "Ambit node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Run(Box<Config>),
    /// Remove Ambit from this node: detach every program, remove the pins and the state
    /// file. Refuses while an agent is running. Every pod is released at once.
    Uninstall {
        /// The pin directory (as `run --bpffs-dir`).
        #[arg(long, env = "AMBIT_BPFFS_DIR", default_value = "/sys/fs/bpf/ambit")]
        bpffs_dir: PathBuf,
        /// The state directory (as `run --state-dir`).
        #[arg(long, env = "AMBIT_STATE_DIR", default_value = "/var/run/ambit")]
        state_dir: PathBuf,
        /// The enrollment socket (default: <state-dir>/enroll.sock).
        #[arg(long, env = "AMBIT_ENROLL_SOCKET")]
        enroll_socket: Option<PathBuf>,
    },
    /// Talk to a running agent's enrollment API.
    Enroll {
        /// The agent's enrollment socket.
        #[arg(
            long,
            env = "AMBIT_ENROLL_SOCKET",
            default_value = "/var/run/ambit/enroll.sock"
        )]
        socket: PathBuf,
        #[command(subcommand)]
        op: EnrollOp,
    },
}

#[derive(Subcommand)]
enum EnrollOp {
    /// Enroll a pod.
    Add {
        #[arg(long)]
        uid: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        name: String,
        /// Path of the pod's network namespace.
        #[arg(long)]
        netns: String,
        /// The pod's IPs (repeat for dual stack).
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
    },
    /// Release a pod.
    Remove {
        #[arg(long)]
        uid: String,
    },
    /// List enrolled pods (JSON).
    List,
}

/// Blocks of this size or more get their own mapping from glibc, returned whole when
/// freed. (The data path never allocates this much at once.)
const MMAP_THRESHOLD: libc::c_int = 1 << 20;

/// Fixes glibc's mmap threshold. Left alone, glibc raises it to the largest block freed
/// so far (up to 32 MiB), after which large short-lived blocks — an xDS response being
/// decoded, a table being rebuilt — come from the heap, and the long-lived allocations
/// made meanwhile pin its pages: at 10,000 workloads an agent's RSS after the first sync
/// varied by 3.8 MB from run to run with where they fell (the live heap did not), and
/// `malloc_trim` could not give it back. With the threshold fixed it varies by 0.8 MB.
fn fix_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes a tunable of the allocator; called before any thread
    // is started.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

fn main() -> anyhow::Result<()> {
    ambit_hbone::tls::install_default();
    match Cli::parse().command {
        Command::Run(config) => {
            fix_mmap_threshold();
            init_tracing(&config);
            ambit_node_agent::run(*config)
        }
        Command::Uninstall {
            bpffs_dir,
            state_dir,
            enroll_socket,
        } => {
            let socket = enroll_socket.unwrap_or_else(|| state_dir.join("enroll.sock"));
            let done = ambit_node_agent::uninstall(&bpffs_dir, &state_dir, &socket)?;
            println!(
                "detached {} links, removed {} map pins{}",
                done.datapath.links,
                done.datapath.maps,
                if done.state_file {
                    " and the state file"
                } else {
                    ""
                }
            );
            Ok(())
        }
        Command::Enroll { socket, op } => {
            let mut client = EnrollClient::connect(&socket)?;
            match op {
                EnrollOp::Add {
                    uid,
                    namespace,
                    name,
                    netns,
                    ips,
                } => {
                    let pod = client.add(PodSpec {
                        uid,
                        namespace,
                        name,
                        netns,
                        ips,
                    })?;
                    println!("{}", serde_json::to_string_pretty(&pod)?);
                }
                EnrollOp::Remove { uid } => client.remove(&uid)?,
                EnrollOp::List => println!("{}", serde_json::to_string_pretty(&client.list()?)?),
            }
            Ok(())
        }
    }
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log).unwrap_or_else(|e| {
        eprintln!("bad --log filter {:?} ({e}); using info", config.log);
        tracing_subscriber::EnvFilter::new("info")
    });
    // Colours only for a person at a terminal, never into a log file or a collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if config.log_json {
        builder.json().init()
    } else {
        builder.init()
    }
}
