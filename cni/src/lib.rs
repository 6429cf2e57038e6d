//! `ambit-cni`: a chained CNI plugin (CNI 0.3.0 to 1.1.0) that hands each new pod to
//! the node agent's enrollment API, and fails closed for enrolled namespaces.
//!
//! It runs after the plugin that gives the pod its network (the node's primary CNI) and
//! passes that plugin's result through unchanged:
//!
//! - **ADD** reads the pod's namespace, name and uid from `CNI_ARGS` (`K8S_POD_*`, as the
//!   kubelet's runtimes set them), its netns from `CNI_NETNS` and its IPs from
//!   `prevResult`, and enrolls it. The agent decides from the control plane whether the
//!   pod is captured. If the agent does not answer, a pod of a namespace the agent last
//!   reported as enrolled ([`ambit_mesh::enroll::ENROLLED_NAMESPACES_FILE`]) fails with
//!   code 11 ("try again later"), so the kubelet retries and the pod never starts
//!   uncaptured; any other pod starts at once.
//! - **DEL** releases the pod. It succeeds when the agent is gone or never knew the pod:
//!   a DEL must not keep a deleted pod around.
//! - **CHECK** fails if the pod's namespace is enrolled and the agent does not know it.
//! - **VERSION**, **STATUS** and **GC** as the specification says; this plugin keeps no
//!   state of its own to collect.
//!
//! The plugin configuration may set `enrollSocket` (default
//! `/var/run/ambit/enroll.sock`) and `stateDir` (default `/var/run/ambit`).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ambit_mesh::enroll::{EnrollClient, EnrollError, EnrolledPod, PodSpec};
use rscni_plugin::error::Error;
use rscni_plugin::types::{CNIResult, NetConf};

/// Where the node agent listens unless the configuration says otherwise.
pub const DEFAULT_ENROLL_SOCKET: &str = "/var/run/ambit/enroll.sock";
/// The agent's state directory unless the configuration says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/run/ambit";

/// This plugin's part of the network configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The agent's enrollment socket.
    pub enroll_socket: PathBuf,
    /// The agent's state directory (for the enrolled namespaces it last reported).
    pub state_dir: PathBuf,
}

impl Config {
    /// Reads `enrollSocket` and `stateDir` from the plugin's configuration.
    pub fn from_net_conf(conf: &NetConf) -> Result<Self, Error> {
        let path = |key: &str, default: &str| -> Result<PathBuf, Error> {
            match conf.custom.get(key) {
                None => Ok(default.into()),
                Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.into()),
                Some(other) => Err(Error::InvalidNetworkConfig(format!(
                    "{key} must be a non-empty path, not {other}"
                ))),
            }
        };
        Ok(Self {
            enroll_socket: path("enrollSocket", DEFAULT_ENROLL_SOCKET)?,
            state_dir: path("stateDir", DEFAULT_STATE_DIR)?,
        })
    }
}

/// The pod a CNI call is about, from `CNI_ARGS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID`; runtimes that do not send it get the container id instead.
    pub uid: String,
}

impl PodRef {
    /// Parses `CNI_ARGS` (`K=V;K=V`, as the specification defines it).
    pub fn from_cni_args(args: Option<&str>, container_id: &str) -> Result<Self, Error> {
        let mut namespace = None;
        let mut name = None;
        let mut uid = None;
        for pair in args
            .unwrap_or_default()
            .split(';')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                Error::InvalidEnvValue(format!("CNI_ARGS: {pair:?} is not KEY=VALUE"))
            })?;
            match k {
                "K8S_POD_NAMESPACE" => namespace = Some(v.to_owned()),
                "K8S_POD_NAME" => name = Some(v.to_owned()),
                "K8S_POD_UID" => uid = Some(v.to_owned()),
                _ => {}
            }
        }
        let missing = |k: &str| {
            Error::InvalidEnvValue(format!(
                "CNI_ARGS has no {k}: ambit-cni enrolls Kubernetes pods and needs the kubelet's K8S_POD_* arguments"
            ))
        };
        Ok(Self {
            namespace: namespace
                .filter(|s| !s.is_empty())
                .ok_or_else(|| missing("K8S_POD_NAMESPACE"))?,
            name: name
                .filter(|s| !s.is_empty())
                .ok_or_else(|| missing("K8S_POD_NAME"))?,
            uid: uid
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("cni-{container_id}")),
        })
    }
}

/// The pod's IPs from the previous plugin's result (one per family, as Kubernetes
/// assigns them).
pub fn pod_ips(prev: Option<&CNIResult>) -> Result<Vec<IpAddr>, Error> {
    let prev = prev.ok_or_else(|| {
        Error::InvalidNetworkConfig(
            "no prevResult: ambit-cni must be chained after the plugin that gives the pod its IPs"
                .into(),
        )
    })?;
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in prev.ips.iter().map(|c| c.address.addr()) {
        if !ips.iter().any(|have| have.is_ipv4() == ip.is_ipv4()) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return Err(Error::InvalidNetworkConfig(
            "prevResult has no IPs: nothing to enroll".into(),
        ));
    }
    Ok(ips)
}

/// What the plugin needs from the node agent.
pub trait Agent {
    /// Every pod the agent knows; `Err` when the agent does not answer.
    fn list(&mut self) -> Result<Vec<EnrolledPod>, EnrollError>;
    /// Enrolls a pod.
    fn add(&mut self, pod: PodSpec) -> Result<EnrolledPod, EnrollError>;
    /// Releases a pod.
    fn remove(&mut self, uid: &str) -> Result<(), EnrollError>;
}

impl Agent for EnrollClient {
    fn list(&mut self) -> Result<Vec<EnrolledPod>, EnrollError> {
        EnrollClient::list(self)
    }
    fn add(&mut self, pod: PodSpec) -> Result<EnrolledPod, EnrollError> {
        EnrollClient::add(self, pod)
    }
    fn remove(&mut self, uid: &str) -> Result<(), EnrollError> {
        EnrollClient::remove(self, uid)
    }
}

/// The namespaces the agent last reported as enrolled; empty when it never has (no agent
/// has synced with a control plane on this node, so none can be enrolled yet).
pub fn enrolled_namespaces(state_dir: &Path) -> Result<BTreeSet<String>, Error> {
    ambit_mesh::enroll::read_enrolled_namespaces(state_dir)
        .map(Option::unwrap_or_default)
        .map_err(|e| {
            Error::IOFailure(format!(
                "reading {}: {e}",
                state_dir
                    .join(ambit_mesh::enroll::ENROLLED_NAMESPACES_FILE)
                    .display()
            ))
        })
}

/// ADD: enrolls the pod and returns what the agent made of it (`None`: the agent did not
/// answer and the pod's namespace is not enrolled, so the pod starts uncaptured).
pub fn add(
    agent: Result<&mut dyn Agent, EnrollError>,
    enrolled: &BTreeSet<String>,
    pod: &PodRef,
    netns: &Path,
    ips: Vec<IpAddr>,
) -> Result<Option<EnrolledPod>, Error> {
    let must_wait = enrolled.contains(&pod.namespace);
    let unavailable = |e: EnrollError| {
        if must_wait {
            Err(Error::TryAgainLater(format!(
                "namespace {} is enrolled in the mesh and the Ambit node agent is not answering ({e}); the pod waits for it",
                pod.namespace
            )))
        } else {
            Ok(None)
        }
    };
    let agent = match agent {
        Ok(a) => a,
        Err(e) => return unavailable(e),
    };
    let spec = PodSpec {
        uid: pod.uid.clone(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        netns: netns.display().to_string(),
        ips,
    };
    // ADD must be idempotent: a retried ADD for the same sandbox is already done, and a
    // new sandbox of the same pod replaces the old one.
    let known = match agent.list() {
        Ok(k) => k,
        Err(e) => return unavailable(e),
    };
    if let Some(old) = known.into_iter().find(|p| p.spec.uid == spec.uid) {
        if old.spec == spec {
            return Ok(Some(old));
        }
        if let Err(e) = agent.remove(&spec.uid) {
            return unavailable(e);
        }
    }
    match agent.add(spec) {
        Ok(p) => Ok(Some(p)),
        // The agent answered and said no (a bad request): that is not worth a retry.
        Err(EnrollError::Refused(msg)) if must_wait => Err(Error::Custom(
            100,
            "the Ambit node agent refused the pod".into(),
            msg,
        )),
        Err(EnrollError::Refused(_)) => Ok(None),
        Err(e) => unavailable(e),
    }
}

/// DEL: releases the pod if the agent knows it. Never fails for a pod that is gone.
pub fn del(agent: Result<&mut dyn Agent, EnrollError>, pod: &PodRef) -> Result<(), Error> {
    if let Ok(agent) = agent
        && let Ok(known) = agent.list()
        && known.iter().any(|p| p.spec.uid == pod.uid)
    {
        // The agent also forgets pods whose netns is gone when it restarts.
        let _ = agent.remove(&pod.uid);
    }
    Ok(())
}

/// CHECK: a pod of an enrolled namespace must be known to the agent.
pub fn check(
    agent: Result<&mut dyn Agent, EnrollError>,
    enrolled: &BTreeSet<String>,
    pod: &PodRef,
) -> Result<(), Error> {
    if !enrolled.contains(&pod.namespace) {
        return Ok(());
    }
    let known = agent
        .and_then(|a| a.list())
        .map_err(|e| Error::TryAgainLater(format!("the Ambit node agent is not answering: {e}")))?;
    if known.iter().any(|p| p.spec.uid == pod.uid) {
        Ok(())
    } else {
        Err(Error::Custom(
            101,
            "pod not enrolled".into(),
            format!(
                "{}/{} is in an enrolled namespace but the node agent does not know it",
                pod.namespace, pod.name
            ),
        ))
    }
}

pub mod install;

#[cfg(test)]
mod tests;
