//! `ambit-cni`: run by the container runtime, never by hand (see the crate docs).

use std::path::PathBuf;

use ambit_cni::{Agent, Config, PodRef, enrolled_namespaces, pod_ips};
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

fn as_agent(c: &mut Result<EnrollClient, EnrollError>) -> Result<&mut dyn Agent, EnrollError> {
    match c {
        Ok(c) => Ok(c),
        Err(e) => Err(EnrollError::Io(std::io::Error::other(e.to_string()))),
    }
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

fn main() {
    let plugin = Plugin::default().msg("ambit-cni: enrolls pods with the Ambit node agent");
    if plugin.run(&AmbitCni).is_err() {
        std::process::exit(1);
    }
}
