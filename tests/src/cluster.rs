//! Building, using and tearing down the simulated cluster (see the crate docs).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ambit_mesh::enroll::{EnrollClient, EnrolledPod, PodSpec};
use ambit_mesh::netns::Netns;
use anyhow::{Context, bail};

use crate::process::{PodProcess, spawn_in};
use crate::{require_root, workspace_bin};

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
    /// Run a control plane (in the bridge namespace, on [`CONTROL_PLANE_ADDR`]) with the
    /// file source, and connect every agent to it. The mesh file starts as
    /// [`Cluster::mesh_yaml`]`(false)`: every pod described, none enrolled.
    pub control_plane: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 2,
            agents: true,
            agent_args: Vec::new(),
            control_plane: false,
        }
    }
}

/// Where the simulated cluster's control plane serves xDS (on the bridge).
pub const CONTROL_PLANE_ADDR: &str = "172.18.0.254:15010";

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
    /// Agents connect to the control plane.
    xds: bool,
    netns_created: Mutex<Vec<String>>,
    torn_down: std::sync::atomic::AtomicBool,
}

impl Cluster {
    /// Builds the cluster and, if asked, starts an agent per node and waits until each is
    /// ready.
    pub fn new(spec: ClusterSpec) -> anyhow::Result<Self> {
        require_root();
        sweep_stale();
        assert!(spec.nodes >= 1 && spec.nodes <= 200 && spec.pods_per_node <= 200);
        let prefix = format!(
            "{NAME_PREFIX}{}x{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup_root = cgroup2_mount()?.join(&prefix);
        let mut c = Self {
            bridge_netns: format!("{prefix}-br"),
            cgroup_root,
            nodes: Vec::new(),
            agent_args: spec.agent_args.clone(),
            control_plane: Mutex::new(None),
            xds: false,
            netns_created: Mutex::new(Vec::new()),
            torn_down: Default::default(),
            prefix,
        };
        // From here on `c` owns what exists: an error drops it, which cleans up.
        std::fs::create_dir(&c.cgroup_root)
            .with_context(|| format!("creating {}", c.cgroup_root.display()))?;
        c.add_netns(&c.bridge_netns.clone())?;
        ip_batch(
            &c.bridge_netns,
            &[
                "link set lo up".into(),
                "link add br0 type bridge".into(),
                "link set br0 up".into(),
            ],
        )?;

        for n in 1..=spec.nodes {
            let netns = format!("{}-n{n}", c.prefix);
            let node_cg = c.cgroup_root.join(format!("node{n}"));
            let node = Node {
                index: n,
                ip4: Ipv4Addr::new(172, 18, 0, n as u8),
                ip6: format!("fd00:172:18::{n:x}").parse().unwrap(),
                pod_cgroup: node_cg.join("pods"),
                agent_cgroup: node_cg.join("agent"),
                bpffs_dir: PathBuf::from(format!("/sys/fs/bpf/{}-n{n}", c.prefix)),
                state_dir: PathBuf::from(format!("/tmp/{}-n{n}", c.prefix)),
                pods: Vec::new(),
                agent: Mutex::new(None),
                netns,
            };
            for dir in [&node_cg, &node.pod_cgroup, &node.agent_cgroup] {
                std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::create_dir_all(&node.state_dir)?;
            c.add_netns(&node.netns)?;
            set_sysctls(
                &node.netns,
                &[
                    ("net/ipv4/ip_forward", "1"),
                    ("net/ipv6/conf/all/forwarding", "1"),
                    ("net/ipv4/conf/all/rp_filter", "0"),
                    ("net/ipv4/conf/default/rp_filter", "0"),
                    ("net/ipv6/conf/all/accept_dad", "0"),
                    ("net/ipv6/conf/default/accept_dad", "0"),
                ],
            )?;
            let mut cmds = vec![
                "link set lo up".to_string(),
                format!(
                    "link add eth0 type veth peer name n{n} netns {}",
                    c.bridge_netns
                ),
                format!("addr add {}/24 dev eth0", node.ip4),
                format!("addr add {}/64 dev eth0 nodad", node.ip6),
                "link set eth0 up".into(),
            ];
            for k in (1..=spec.nodes).filter(|&k| k != n) {
                cmds.push(format!("route add 10.244.{k}.0/24 via 172.18.0.{k}"));
                cmds.push(format!(
                    "route add fd00:10:244:{k:x}::/64 via fd00:172:18::{k:x}"
                ));
            }
            ip_batch(&node.netns, &cmds)?;
            ip_batch(
                &c.bridge_netns,
                &[
                    format!("link set n{n} master br0"),
                    format!("link set n{n} up"),
                ],
            )?;
            c.nodes.push(node);

            for m in FIRST_POD..FIRST_POD + spec.pods_per_node {
                let pod = Pod {
                    node: n,
                    name: format!("pod-{n}-{m}"),
                    uid: format!("{}-uid-{n}-{m}", c.prefix),
                    netns: format!("{}-n{n}-p{m}", c.prefix),
                    ip4: Ipv4Addr::new(10, 244, n as u8, m as u8),
                    ip6: format!("fd00:10:244:{n:x}::{m:x}").parse().unwrap(),
                    cgroup: c.nodes[n - 1].pod_cgroup.join(format!("pod{m}")),
                };
                std::fs::create_dir(&pod.cgroup)
                    .with_context(|| format!("creating {}", pod.cgroup.display()))?;
                c.add_netns(&pod.netns)?;
                set_sysctls(
                    &pod.netns,
                    &[
                        ("net/ipv6/conf/all/accept_dad", "0"),
                        ("net/ipv6/conf/default/accept_dad", "0"),
                    ],
                )?;
                let node_ns = c.nodes[n - 1].netns.clone();
                ip_batch(
                    &pod.netns,
                    &[
                        "link set lo up".into(),
                        format!("link add eth0 type veth peer name p{m} netns {node_ns}"),
                        format!("addr add {}/32 dev eth0", pod.ip4),
                        format!("addr add {}/128 dev eth0 nodad", pod.ip6),
                        "link set eth0 up".into(),
                        "route add 169.254.1.1 dev eth0 scope link".into(),
                        "route add default via 169.254.1.1 dev eth0".into(),
                        "route add ::/0 via fe80::1 dev eth0".into(),
                    ],
                )?;
                ip_batch(
                    &node_ns,
                    &[
                        format!("link set p{m} up"),
                        format!("addr add 169.254.1.1/32 dev p{m}"),
                        format!("addr add fe80::1/64 dev p{m} nodad"),
                        format!("route add {}/32 dev p{m}", pod.ip4),
                        format!("route add {}/128 dev p{m}", pod.ip6),
                    ],
                )?;
                c.nodes[n - 1].pods.push(pod);
            }
        }
        if spec.control_plane {
            ip_batch(
                &c.bridge_netns,
                &["addr add 172.18.0.254/24 dev br0".into()],
            )?;
            std::fs::create_dir_all(c.cp_state_dir())?;
            std::fs::create_dir(c.cgroup_root.join("control-plane"))?;
            c.write_mesh(&c.mesh_yaml(false))?;
            c.start_control_plane()?;
            c.xds = true;
        }
        if spec.agents {
            for n in 1..=spec.nodes {
                c.start_agent(n)?;
            }
        }
        Ok(c)
    }

    fn cp_state_dir(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/{}-cp", self.prefix))
    }

    /// The control plane's CA directory (`root-cert.pem`, `root-key.pem`).
    pub fn ca_dir(&self) -> PathBuf {
        self.cp_state_dir().join("ca")
    }

    /// Where the control plane keeps node credentials (`<node>.token`).
    pub fn node_tokens_dir(&self) -> PathBuf {
        self.cp_state_dir().join("node-tokens")
    }

    /// The control plane's mesh file.
    pub fn mesh_file(&self) -> PathBuf {
        self.cp_state_dir().join("mesh.yaml")
    }

    /// The control plane's log so far (empty if there is none).
    pub fn control_plane_log(&self) -> String {
        std::fs::read_to_string(self.cp_state_dir().join("control-plane.log")).unwrap_or_default()
    }

    /// A mesh file describing this cluster: nodes `node-N`, every pod as a workload of
    /// namespace `default` (uid, name and IPs as the harness made them; its service
    /// account is its name, so each pod has an identity of its own), the namespace
    /// enrolled or not.
    pub fn mesh_yaml(&self, enrolled: bool) -> String {
        let mut y = String::from("namespaces:\n  - name: default\n");
        if enrolled {
            y.push_str("    labels: {ambit.dev/dataplane: ambient}\n");
        }
        y.push_str("nodes:\n");
        for n in &self.nodes {
            y.push_str(&format!("  - name: node-{}\n", n.index));
        }
        y.push_str("workloads:\n");
        for p in self.nodes.iter().flat_map(|n| &n.pods) {
            y.push_str(&format!(
                "  - {{uid: {}, name: {}, namespace: default, node: node-{}, serviceAccount: {}, ips: [{}, {}], labels: {{app: {}}}}}\n",
                p.uid, p.name, p.node, p.name, p.ip4, p.ip6, p.name
            ));
        }
        y
    }

    /// Replaces the mesh file atomically (as an editor or a ConfigMap update would).
    pub fn write_mesh(&self, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.mesh_file().with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.mesh_file())?;
        Ok(())
    }

    /// Starts the control plane in the bridge namespace and waits until it accepts.
    pub fn start_control_plane(&self) -> anyhow::Result<()> {
        let log_path = self.cp_state_dir().join("control-plane.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = Command::new(workspace_bin("ambit-control-plane"));
        cmd.arg("run")
            .arg("--mesh-file")
            .arg(self.mesh_file())
            .arg(format!("--xds-addr={CONTROL_PLANE_ADDR}"))
            .arg("--file-poll-ms=20")
            .arg("--shrink-hold-ms=1000")
            .arg("--ca-dir")
            .arg(self.ca_dir())
            .arg("--node-tokens-dir")
            .arg(self.node_tokens_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let netns = Path::new("/var/run/netns").join(&self.bridge_netns);
        let child = spawn_in(&netns, &self.cgroup_root.join("control-plane"), &mut cmd)
            .context("starting ambit-control-plane")?;
        *self.control_plane.lock().unwrap() = Some(child);
        let ns = Netns::open(&netns)?;
        let addr: SocketAddr = CONTROL_PLANE_ADDR.parse()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ns
                .run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)))?
                .is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self
                .control_plane
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "control plane exited ({status}):\n{}",
                    self.control_plane_log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "control plane not listening after 30 s:\n{}",
                    self.control_plane_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// PID of the running control plane, if any.
    pub fn control_plane_pid(&self) -> Option<u32> {
        self.control_plane.lock().unwrap().as_ref().map(Child::id)
    }

    /// Sends `signal` to the control plane and waits for it to exit.
    pub fn stop_control_plane(&self, signal: i32) -> anyhow::Result<()> {
        let mut child = self
            .control_plane
            .lock()
            .unwrap()
            .take()
            .context("no control plane running")?;
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait()?;
        Ok(())
    }

    /// Node `n`'s agent's `/debug/config_dump`.
    pub fn config_dump(&self, n: usize) -> anyhow::Result<serde_json::Value> {
        let (_, body) = self.http_get(n, "127.0.0.1:15000", "/debug/config_dump")?;
        Ok(serde_json::from_str(&body)?)
    }

    fn add_netns(&self, name: &str) -> anyhow::Result<()> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        self.netns_created.lock().unwrap().push(name.to_owned());
        Ok(())
    }

    /// Node `n` (1-based).
    pub fn node(&self, n: usize) -> &Node {
        &self.nodes[n - 1]
    }

    /// Pod `i` (0-based) of node `n` (1-based).
    pub fn pod(&self, n: usize, i: usize) -> &Pod {
        &self.nodes[n - 1].pods[i]
    }

    /// Adds `count` pods to node `n` that have only a network namespace with loopback up
    /// (no veth, no cgroup, made-up IPs in 10.245.0.0/16): enough to enroll them, e.g. to
    /// measure the agent's cost per enrolled pod.
    pub fn add_bare_pods(&self, n: usize, count: usize) -> anyhow::Result<Vec<Pod>> {
        let mut pods = Vec::with_capacity(count);
        for i in 0..count {
            let netns = format!("{}-n{n}-b{i}", self.prefix);
            self.add_netns(&netns)?;
            ip_batch(&netns, &["link set lo up".into()])?;
            pods.push(Pod {
                node: n,
                name: format!("bare-{n}-{i}"),
                uid: format!("{}-bare-{n}-{i}", self.prefix),
                netns,
                ip4: Ipv4Addr::new(10, 245, (i / 250) as u8, (i % 250 + 1) as u8),
                ip6: format!("fd00:10:245::{:x}", i + 1).parse().unwrap(),
                cgroup: self.node(n).pod_cgroup.clone(),
            });
        }
        Ok(pods)
    }

    /// Starts node `n`'s agent (in the node's netns and agent cgroup) and waits until
    /// `/healthz/ready` says ready.
    pub fn start_agent(&self, n: usize) -> anyhow::Result<()> {
        let node = self.node(n);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.agent_log())?;
        let mut cmd = Command::new(workspace_bin("ambit-agent"));
        cmd.arg("run")
            .arg("--pod-cgroup")
            .arg(&node.pod_cgroup)
            .arg("--bpffs-dir")
            .arg(&node.bpffs_dir)
            .arg("--state-dir")
            .arg(&node.state_dir)
            .args(&self.agent_args)
            .args(
                self.xds
                    .then(|| {
                        [
                            format!("--xds-address=http://{CONTROL_PLANE_ADDR}"),
                            format!("--node-name=node-{n}"),
                            format!(
                                "--node-credential-file={}",
                                self.node_tokens_dir()
                                    .join(format!("node-{n}.token"))
                                    .display()
                            ),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn_in(&node.netns_path(), &node.agent_cgroup, &mut cmd)
            .context("starting ambit-agent")?;
        *node.agent.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = self.http_get(n, "127.0.0.1:15021", "/healthz/ready") {
                return Ok(());
            }
            if let Some(status) = node
                .agent
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "agent on node {n} exited ({status}) before it was ready:\n{}",
                    self.agent_log_tail(n)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent on node {n} not ready after 30 s:\n{}",
                    self.agent_log_tail(n)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to node `n`'s agent (by PID) without waiting.
    pub fn signal_agent(&self, n: usize, signal: i32) -> anyhow::Result<()> {
        let guard = self.node(n).agent.lock().unwrap();
        let child = guard.as_ref().context("no agent running")?;
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
        Ok(())
    }

    /// Runs `ambit-agent uninstall` for node `n` (in its netns); returns its output.
    pub fn uninstall_agent(&self, n: usize) -> anyhow::Result<std::process::Output> {
        let node = self.node(n);
        Ok(Command::new(workspace_bin("ambit-agent"))
            .arg("uninstall")
            .arg("--bpffs-dir")
            .arg(&node.bpffs_dir)
            .arg("--state-dir")
            .arg(&node.state_dir)
            .output()?)
    }

    /// Sends `signal` to node `n`'s agent (by PID) and waits for it to exit.
    pub fn stop_agent(&self, n: usize, signal: i32) -> anyhow::Result<std::process::ExitStatus> {
        let mut guard = self.node(n).agent.lock().unwrap();
        let mut child = guard.take().context("no agent running")?;
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                child.wait()?;
                bail!("agent on node {n} ignored signal {signal} for 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last 40 lines of node `n`'s agent log.
    pub fn agent_log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.node(n).agent_log()).unwrap_or_default();
        let lines: Vec<_> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A client of node `n`'s enrollment API.
    pub fn enroll_client(&self, n: usize) -> anyhow::Result<EnrollClient> {
        Ok(EnrollClient::connect(self.node(n).enroll_socket())?)
    }

    /// Enrolls `pod` with its node's agent.
    pub fn enroll(&self, pod: &Pod) -> anyhow::Result<EnrolledPod> {
        Ok(self.enroll_client(pod.node)?.add(pod.spec())?)
    }

    /// Removes `pod` (by uid) from its node's agent.
    pub fn release(&self, pod: &Pod) -> anyhow::Result<()> {
        Ok(self.enroll_client(pod.node)?.remove(&pod.uid)?)
    }

    /// Starts `ambit-pod-tool args..` inside `pod`.
    pub fn spawn_in_pod(&self, pod: &Pod, args: &[String]) -> anyhow::Result<PodProcess> {
        Ok(PodProcess::start(
            &pod.netns_path(),
            &pod.cgroup,
            &workspace_bin("ambit-pod-tool"),
            args,
        )?)
    }

    /// Starts an echo/sink server in `pod` on the given listen specs and waits until it
    /// listens.
    pub fn start_server(&self, pod: &Pod, listen: &[String]) -> anyhow::Result<PodProcess> {
        let mut args = vec!["serve".to_string()];
        for l in listen {
            args.push("--listen".into());
            args.push(l.clone());
        }
        let mut p = self.spawn_in_pod(pod, &args)?;
        p.wait_for_line("listening")
            .context("server did not start")?;
        Ok(p)
    }

    /// Runs `ambit-pod-tool client args..` in `pod` to completion and returns whether it
    /// succeeded and its per-connection reports.
    pub fn run_client(
        &self,
        pod: &Pod,
        args: &[String],
    ) -> anyhow::Result<(bool, Vec<serde_json::Value>)> {
        let mut all = vec!["client".to_string()];
        all.extend_from_slice(args);
        let p = self.spawn_in_pod(pod, &all)?;
        let (status, lines) = p.finish(Duration::from_secs(120))?;
        let reports = lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        Ok((status.success(), reports))
    }

    /// A plain HTTP/1.0 GET from inside node `n`'s namespace: (status, body).
    pub fn http_get(&self, n: usize, addr: &str, path: &str) -> io::Result<(u16, String)> {
        let addr: SocketAddr = addr.parse().map_err(io::Error::other)?;
        let ns = Netns::open(self.node(n).netns_path())?;
        let stream = ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))??;
        let mut stream = stream;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut resp = String::new();
        stream.read_to_string(&mut resp)?;
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP status"))?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// Node `n`'s `/metrics` text.
    pub fn metrics(&self, n: usize) -> anyhow::Result<String> {
        let (status, body) = self.http_get(n, "127.0.0.1:15020", "/metrics")?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(body)
    }

    /// Node `n`'s recent captured connections (`/debug/connections`).
    pub fn captured(&self, n: usize) -> anyhow::Result<Vec<serde_json::Value>> {
        let (_, body) = self.http_get(n, "127.0.0.1:15000", "/debug/connections")?;
        Ok(serde_json::from_str(&body)?)
    }
}

/// The value of a metric line `name{labels..}` whose labels contain all of `want`.
/// The sum of every series of `name` whose labels include `want` (0 if none).
pub fn metric_sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The value of the first series of `name` whose labels include `want`.
pub fn metric_value(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, labels) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            return None;
        }
        want.iter()
            .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.parse().ok())?
    })
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl Cluster {
    /// Removes everything the cluster created. Idempotent; safe to call from another
    /// thread (e.g. a signal handler thread) while the cluster is in use.
    pub fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(mut child) = self.control_plane.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::env::var_os("AMBIT_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(self.cp_state_dir());
        }
        for node in &self.nodes {
            if let Some(mut child) = node.agent.lock().unwrap().take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            // Removing the pins detaches programs a killed agent left attached.
            let _ = std::fs::remove_dir_all(&node.bpffs_dir);
            if std::env::var_os("AMBIT_KEEP_LOGS").is_none() {
                let _ = std::fs::remove_dir_all(&node.state_dir);
            }
        }
        for ns in std::mem::take(&mut *self.netns_created.lock().unwrap())
            .iter()
            .rev()
        {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        remove_cgroup_tree(&self.cgroup_root);
    }
}

/// Removes a cgroup directory tree, deepest first. Processes still inside are ours (only
/// this harness puts processes there): `cgroup.kill` ends them first.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for attempt in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) if attempt == 0 => {
                let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Removes what earlier runs left behind when their process died (their PID is gone).
fn sweep_stale() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let dead = |name: &str| -> bool {
            let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
                return false;
            };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            !pid.is_empty() && !Path::new("/proc").join(&pid).exists()
        };
        if let Ok(entries) = std::fs::read_dir("/var/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if dead(&name) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
            }
        }
        for dir in ["/sys/fs/bpf", "/tmp"] {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if dead(&e.file_name().to_string_lossy()) {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        if let Ok(root) = cgroup2_mount()
            && let Ok(entries) = std::fs::read_dir(&root)
        {
            for e in entries.flatten() {
                if dead(&e.file_name().to_string_lossy()) {
                    remove_cgroup_tree(&e.path());
                }
            }
        }
    });
}

/// Where the cgroup-v2 hierarchy is mounted (`/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 filesystem is mounted")
}

/// Runs `ip -n <netns> -batch -` with one command per line.
fn ip_batch(netns: &str, cmds: &[String]) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip (iproute2)")?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cmds.join("\n").as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -n {netns} -batch failed: {}\ncommands:\n{}",
            String::from_utf8_lossy(&out.stderr),
            cmds.join("\n")
        );
    }
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Writes `/proc/sys/<key>` values inside a namespace (net sysctls are per namespace, and
/// resolved by the namespace of the thread that opens them).
fn set_sysctls(netns: &str, kv: &[(&str, &str)]) -> anyhow::Result<()> {
    let ns = Netns::open(Path::new("/var/run/netns").join(netns))?;
    ns.run(|| {
        for (k, v) in kv {
            std::fs::write(Path::new("/proc/sys").join(k), v)
                .with_context(|| format!("sysctl {k}={v} in {netns}"))?;
        }
        anyhow::Ok(())
    })?
}
