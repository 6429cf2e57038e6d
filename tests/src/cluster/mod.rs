//! Building, using and tearing down the simulated cluster (see the crate docs): the
//! types here, and by concern: [`topology`] (namespaces, links, routes, cgroups, and
//! their teardown), [`processes`] (the control plane, agents and pod processes) and
//! [`admin`] (agents' admin endpoints and Prometheus text).

mod admin;
mod processes;
mod topology;

pub use admin::{metric_sum, metric_value};
pub use processes::service_account;
pub use topology::cgroup2_mount;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

use ambit_mesh::enroll::PodSpec;

/// Names of everything this harness creates start with this.
const NAME_PREFIX: &str = "ambit-t";
/// First pod index on a node (pod IPs are 10.244.N.10, .11, ...).
const FIRST_POD: usize = 10;
static CLUSTERS: AtomicUsize = AtomicUsize::new(0);

/// The shape of a cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Number of nodes (1 to 200).
    pub nodes: usize,
    /// Pods on each node (at most 200).
    pub pods_per_node: usize,
    /// Start a node agent on every node.
    pub agents: bool,
    /// Extra flags for every agent (e.g. `--exclude-port=9000`).
    pub agent_args: Vec<String>,
    /// Run a control plane (in the bridge namespace, on [`CONTROL_PLANE_ADDR`]) and
    /// connect every agent to it. With the file source the mesh file starts as
    /// [`Cluster::mesh_yaml`]`(false)`; with the Kubernetes source the API server
    /// stand-in starts with [`Cluster::kube_objects`]`(false)`: every pod described,
    /// none enrolled.
    pub control_plane: bool,
    /// Where the control plane reads the mesh.
    pub source: MeshSource,
}

/// Where the simulated cluster's control plane reads the mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MeshSource {
    /// A mesh file ([`Cluster::write_mesh`]).
    #[default]
    File,
    /// The API server stand-in ([`Cluster::api`]), on [`API_SERVER_ADDR`].
    Kubernetes,
}

/// Where the simulated cluster's API server stand-in listens (on the bridge).
pub const API_SERVER_ADDR: &str = "172.18.0.254:6443";

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 2,
            agents: true,
            agent_args: Vec::new(),
            control_plane: false,
            source: MeshSource::File,
        }
    }
}

/// Where the simulated cluster's control plane serves xDS (on the bridge).
pub const CONTROL_PLANE_ADDR: &str = "172.18.0.254:15012";

/// A pod: a network namespace, two addresses and a cgroup.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Index of the pod's node (1-based).
    pub node: usize,
    /// The pod's name (`pod-N-M`), in namespace `default`.
    pub name: String,
    /// The pod's uid, unique to this run.
    pub uid: String,
    /// Name of the pod's network namespace (under `/var/run/netns`).
    pub netns: String,
    /// The pod's IPv4 address.
    pub ip4: Ipv4Addr,
    /// The pod's IPv6 address.
    pub ip6: Ipv6Addr,
    /// The pod's cgroup directory (bare pods share the node's pod cgroup).
    pub cgroup: PathBuf,
}

impl Pod {
    /// The pod as one `workloads:` entry of a mesh file (flow style, with its uid, node
    /// and both IPs), in `namespace`, with service account `sa` and `labels` (the inside
    /// of a flow mapping, e.g. `app: web, version: v1`).
    pub fn mesh_workload(&self, namespace: &str, sa: &str, labels: &str) -> String {
        format!(
            "  - {{uid: {}, name: {}, namespace: {namespace}, node: node-{}, serviceAccount: {sa}, ips: [{}, {}], labels: {{{labels}}}}}\n",
            self.uid, self.name, self.node, self.ip4, self.ip6
        )
    }

    /// Path of the pod's network namespace (`/var/run/netns/<netns>`).
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.netns)
    }

    /// What the enrollment API is told about this pod.
    pub fn spec(&self) -> PodSpec {
        PodSpec {
            uid: self.uid.clone(),
            namespace: "default".into(),
            name: self.name.clone(),
            netns: self.netns_path().display().to_string(),
            ips: vec![self.ip4.into(), self.ip6.into()],
        }
    }
}

/// A node: a network namespace on the bridge, its pods, and (maybe) an agent process.
#[derive(Debug)]
pub struct Node {
    /// The node's number (1-based; `N` in its addresses).
    pub index: usize,
    /// Name of the node's network namespace (under `/var/run/netns`).
    pub netns: String,
    /// The node's IPv4 address on the bridge.
    pub ip4: Ipv4Addr,
    /// The node's IPv6 address on the bridge.
    pub ip6: Ipv6Addr,
    /// The cgroup subtree holding the node's pods, where its agent attaches.
    pub pod_cgroup: PathBuf,
    /// The cgroup the node's agent runs in.
    pub agent_cgroup: PathBuf,
    /// Where the node's agent pins its maps and links (`--bpffs-dir`).
    pub bpffs_dir: PathBuf,
    /// The node's agent state directory (`--state-dir`): enrollment socket, log.
    pub state_dir: PathBuf,
    /// The pods the cluster created on this node.
    pub pods: Vec<Pod>,
    agent: Mutex<Option<Child>>,
}

impl Node {
    /// Path of the node's network namespace (`/var/run/netns/<netns>`).
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.netns)
    }

    /// The agent's enrollment API socket.
    pub fn enroll_socket(&self) -> PathBuf {
        self.state_dir.join("enroll.sock")
    }

    /// The agent's log file (its stdout and stderr).
    pub fn agent_log(&self) -> PathBuf {
        self.state_dir.join("agent.log")
    }

    /// PID of the running agent, if any.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.lock().unwrap().as_ref().map(Child::id)
    }
}

/// A running simulated cluster; dropping it removes everything it created.
#[derive(Debug)]
pub struct Cluster {
    /// The per-run name prefix (`ambit-t<pid>x<n>`) of everything the cluster creates.
    pub prefix: String,
    /// The cgroup-v2 subtree this cluster owns.
    pub cgroup_root: PathBuf,
    /// Name of the namespace holding the bridge (and the control plane).
    pub bridge_netns: String,
    /// The nodes; node `n` is `nodes[n - 1]`.
    pub nodes: Vec<Node>,
    agent_args: Vec<String>,
    control_plane: Mutex<Option<Child>>,
    /// The API server stand-in, with the Kubernetes source.
    api: Option<crate::kube_api::ApiServer>,
    /// Agents connect to the control plane.
    xds: bool,
    netns_created: Mutex<Vec<String>>,
    torn_down: std::sync::atomic::AtomicBool,
}

impl Cluster {
    /// Node `n` (1-based).
    pub fn node(&self, n: usize) -> &Node {
        &self.nodes[n - 1]
    }

    /// Pod `i` (0-based) of node `n` (1-based).
    pub fn pod(&self, n: usize, i: usize) -> &Pod {
        &self.nodes[n - 1].pods[i]
    }

    /// The API server stand-in (with [`MeshSource::Kubernetes`]).
    pub fn api(&self) -> &crate::kube_api::ApiServer {
        self.api
            .as_ref()
            .expect("a cluster with the Kubernetes source")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}
