//! The cluster's namespaces, links, routes and cgroups: building them, and removing them
//! (also what a killed earlier run left behind).

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ambit_mesh::netns::Netns;
use anyhow::{Context, bail};

use super::{
    API_SERVER_ADDR, CLUSTERS, Cluster, ClusterSpec, FIRST_POD, MeshSource, NAME_PREFIX, Node, Pod,
};
use crate::require_root;

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
            api: None,
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
                let uid = format!("{}-uid-{n}-{m}", c.prefix);
                // Named as the kubelet's systemd cgroup driver names a pod's cgroup, so
                // the agent can find a running pod by its uid.
                let cgroup = c.nodes[n - 1]
                    .pod_cgroup
                    .join("kubepods-besteffort.slice")
                    .join(format!(
                        "kubepods-besteffort-pod{}.slice",
                        uid.replace('-', "_")
                    ));
                let pod = Pod {
                    node: n,
                    name: format!("pod-{n}-{m}"),
                    uid,
                    netns: format!("{}-n{n}-p{m}", c.prefix),
                    ip4: Ipv4Addr::new(10, 244, n as u8, m as u8),
                    ip6: format!("fd00:10:244:{n:x}::{m:x}").parse().unwrap(),
                    cgroup,
                };
                std::fs::create_dir_all(&pod.cgroup)
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
            // Pods reach the control plane too (a waypoint is a pod), as pods reach the
            // control plane's Service on a real cluster.
            let mut cmds = vec!["addr add 172.18.0.254/24 dev br0".to_string()];
            for k in 1..=spec.nodes {
                cmds.push(format!("route add 10.244.{k}.0/24 via 172.18.0.{k}"));
            }
            ip_batch(&c.bridge_netns, &cmds)?;
            std::fs::create_dir_all(c.cp_state_dir())?;
            std::fs::create_dir(c.cgroup_root.join("control-plane"))?;
            match spec.source {
                MeshSource::File => c.write_mesh(&c.mesh_yaml(false))?,
                MeshSource::Kubernetes => {
                    let netns = Netns::open(Path::new("/var/run/netns").join(&c.bridge_netns))?;
                    let listener = netns.run(|| std::net::TcpListener::bind(API_SERVER_ADDR))??;
                    let api = crate::kube_api::ApiServer::start(listener)?;
                    for o in c.kube_objects(false) {
                        api.apply(o);
                    }
                    // Each node's agent authenticates as a DaemonSet's would: a token of
                    // the agents' ServiceAccount, bound to its pod on that node, where
                    // the agent reads its credential.
                    std::fs::create_dir_all(c.node_tokens_dir())?;
                    for n in 1..=spec.nodes {
                        let token = format!("agent-token-node-{n}-{}", std::process::id());
                        api.issue_token(
                            &token,
                            crate::kube_api::Token {
                                service_account: ("ambit-system".into(), "ambit-agent".into()),
                                pod: Some(format!("ambit-agent-node-{n}")),
                                node_in_extra: true,
                                audiences: vec!["ambit-ca".into()],
                                expired: false,
                            },
                        );
                        std::fs::write(c.node_tokens_dir().join(format!("node-{n}.token")), token)?;
                    }
                    api.write_kubeconfig(&c.kubeconfig())?;
                    c.api = Some(api);
                }
            }
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

    /// Creates an empty network namespace named `<prefix>-<name>` (removed with the
    /// cluster), as a container runtime creates a pod sandbox's before it runs CNI.
    pub fn add_empty_netns(&self, name: &str) -> anyhow::Result<String> {
        let netns = format!("{}-{name}", self.prefix);
        self.add_netns(&netns)?;
        Ok(netns)
    }

    fn add_netns(&self, name: &str) -> anyhow::Result<()> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        self.netns_created.lock().unwrap().push(name.to_owned());
        Ok(())
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
