//! `ambit-cni`: run by the container runtime, never by hand (see the crate docs).

use std::path::PathBuf;

use ambit_cni::{Agent, Config, PodRef, enrolled_namespaces, install, pod_ips};
use ambit_mesh::enroll::{EnrollClient, EnrollError};
use rscni_plugin::cni::{Cni, Plugin};
use rscni_plugin::error::Error;
use rscni_plugin::types::{Args, CNIResult};

struct AmbitCni;

fn pod(args: &Args) -> Result<PodRef, Error> {
    let container = args.container_id().map(|c| &**c).unwrap_or_default();
    PodRef::from_cni_args(args.args(), container)
}

fn connect(config: &Config) -> Result<EnrollClient, EnrollError> {
    EnrollClient::connect(&config.enroll_socket)
}

/// The agent, or why it is not answering.
fn as_agent(c: &mut Result<EnrollClient, EnrollError>) -> Result<&mut dyn Agent, EnrollError> {
    c.as_mut()
        .map(|c| c as &mut dyn Agent)
        .map_err(|e| EnrollError::Io(std::io::Error::other(e.to_string())))
}

impl Cni for AmbitCni {
    fn add(&self, args: Args) -> Result<CNIResult, Error> {
        let config = Config::from_net_conf(args.config())?;
        let pod = pod(&args)?;
        let netns: PathBuf = args
            .netns()
            .cloned()
            .ok_or_else(|| Error::InvalidNetNS("CNI_NETNS is not set".into()))?;
        let prev = args.config().prev_result.clone();
        let ips = pod_ips(prev.as_ref())?;
        let enrolled = enrolled_namespaces(&config.state_dir)?;
        let mut client = connect(&config);
        match ambit_cni::add(as_agent(&mut client), &enrolled, &pod, &netns, ips)? {
            Some(p) => eprintln!(
                "ambit-cni: {}/{} ({}) enrolled, captured: {}",
                pod.namespace, pod.name, pod.uid, p.captured
            ),
            None => eprintln!(
                "ambit-cni: {}/{} not enrolled: its namespace is not in the mesh",
                pod.namespace, pod.name
            ),
        }
        // A chained plugin passes the result it was given.
        Ok(prev.unwrap_or_default())
    }

    fn del(&self, args: Args) -> Result<(), Error> {
        let config = Config::from_net_conf(args.config())?;
        // A DEL without the kubelet's arguments cannot name an enrolled pod.
        let Ok(pod) = pod(&args) else {
            return Ok(());
        };
        let mut client = connect(&config);
        ambit_cni::del(as_agent(&mut client), &pod)
    }

    fn check(&self, args: Args) -> Result<(), Error> {
        let config = Config::from_net_conf(args.config())?;
        let pod = pod(&args)?;
        let enrolled = enrolled_namespaces(&config.state_dir)?;
        let mut client = connect(&config);
        ambit_cni::check(as_agent(&mut client), &enrolled, &pod)
    }

    fn status(&self, _args: Args) -> Result<(), Error> {
        // A chained plugin: the node's network is the primary plugin's to report.
        Ok(())
    }

    fn gc(&self, _args: Args) -> Result<(), Error> {
        // No state of its own; the agent forgets pods whose netns is gone.
        Ok(())
    }
}

/// Installing the plugin on a node (runtimes call the binary with `CNI_COMMAND` set
/// instead).
#[derive(clap::Parser)]
#[command(name = "ambit-cni", about = "Ambit's CNI plugin, and its installer")]
enum Setup {
    /// Copy this binary into the CNI binary directory and append Ambit to the node's
    /// primary network configuration (idempotent).
    Install {
        #[command(flatten)]
        dirs: Dirs,
        /// Keep running and put the entry back whenever the primary CNI rewrites its file.
        #[arg(long)]
        watch: bool,
        /// How often `--watch` looks, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Take Ambit out of every network configuration and remove the binary.
    Uninstall {
        #[command(flatten)]
        dirs: Dirs,
    },
}

#[derive(clap::Args)]
struct Dirs {
    /// The CNI binary directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The node agent's enrollment socket, for the plugin's entry.
    #[arg(long, default_value = ambit_cni::DEFAULT_ENROLL_SOCKET)]
    enroll_socket: PathBuf,
    /// The node agent's state directory, for the plugin's entry.
    #[arg(long, default_value = ambit_cni::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

impl Dirs {
    fn install(self) -> install::Install {
        install::Install {
            bin_dir: self.bin_dir,
            conf_dir: self.conf_dir,
            enroll_socket: self.enroll_socket,
            state_dir: self.state_dir,
        }
    }
}

fn setup(cmd: Setup) -> std::io::Result<()> {
    match cmd {
        Setup::Install {
            dirs,
            watch,
            interval_ms,
        } => {
            let i = dirs.install();
            let bin = install::copy_binary(&std::env::current_exe()?, &i.bin_dir)?;
            eprintln!("ambit-cni: installed {}", bin.display());
            let mut last = None;
            loop {
                let outcome = install::ensure(&i)?;
                if last.as_ref() != Some(&outcome) {
                    eprintln!("ambit-cni: {outcome:?}");
                }
                last = Some(outcome);
                if !watch {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(interval_ms));
            }
        }
        Setup::Uninstall { dirs } => {
            for path in install::uninstall(&dirs.install())? {
                eprintln!("ambit-cni: removed from {}", path.display());
            }
            Ok(())
        }
    }
}

fn main() {
    if std::env::var_os("CNI_COMMAND").is_none() && std::env::args().len() > 1 {
        let cmd = <Setup as clap::Parser>::parse();
        if let Err(e) = setup(cmd) {
            eprintln!("ambit-cni: {e}");
            std::process::exit(1);
        }
        return;
    }
    let plugin = Plugin::default().msg("ambit-cni: enrolls pods with the Ambit node agent");
    if plugin.run(&AmbitCni).is_err() {
        std::process::exit(1);
    }
}
