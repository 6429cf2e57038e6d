//! The processes of the cluster: the control plane and its mesh file, the node agents
//! and their enrollment API, and programs run inside pods.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambit_mesh::enroll::{EnrollClient, EnrolledPod};
use ambit_mesh::netns::Netns;
use anyhow::{Context, bail};

use super::{CONTROL_PLANE_ADDR, Cluster, Pod};
use crate::process::{PodProcess, spawn_in};
use crate::workspace_bin;

impl Cluster {
    pub(super) fn cp_state_dir(&self) -> PathBuf {
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
            y.push_str(&p.mesh_workload("default", &p.name, &format!("app: {}", p.name)));
        }
        y
    }

    /// The Kubernetes objects describing this cluster, as [`Cluster::mesh_yaml`] does:
    /// namespace `default` (enrolled or not), nodes `node-N`, every pod running on its
    /// node with its uid, IPs, service account (its name) and label `app: <name>`.
    pub fn kube_objects(&self, enrolled: bool) -> Vec<serde_json::Value> {
        use serde_json::json;
        let mut objects = vec![self.kube_namespace(enrolled)];
        for n in &self.nodes {
            objects.push(json!({"apiVersion": "v1", "kind": "Node",
                                "metadata": {"name": format!("node-{}", n.index)}}));
        }
        // The agents' DaemonSet pods (host network: never part of the mesh).
        objects.push(json!({"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": "ambit-system"}}));
        for n in &self.nodes {
            let name = format!("ambit-agent-node-{}", n.index);
            objects.push(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "ambit-system",
                             "uid": format!("uid-{name}")},
                "spec": {"nodeName": format!("node-{}", n.index), "hostNetwork": true,
                         "serviceAccountName": "ambit-agent",
                         "containers": [{"name": "agent", "image": "ambit/agent"}]},
                "status": {"phase": "Running", "podIP": format!("172.18.0.{}", n.index)}
            }));
        }
        // ServiceAccounts, as Kubernetes keeps them: a pod runs only as one that exists.
        objects.push(service_account("ambit-system", "ambit-agent"));
        for p in self.nodes.iter().flat_map(|n| &n.pods) {
            objects.push(service_account("default", &p.name));
        }
        for p in self.nodes.iter().flat_map(|n| &n.pods) {
            objects.push(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p.name, "namespace": "default", "uid": p.uid,
                             "labels": {"app": p.name}},
                "spec": {"nodeName": format!("node-{}", p.node), "serviceAccountName": p.name,
                         "containers": [{"name": "app", "image": "ambit-pod-tool"}]},
                "status": {"phase": "Running", "podIP": p.ip4.to_string(),
                           "podIPs": [{"ip": p.ip4.to_string()}, {"ip": p.ip6.to_string()}]}
            }));
        }
        objects
    }

    /// Namespace `default`, labelled `ambit.dev/dataplane: ambient` or not.
    pub fn kube_namespace(&self, enrolled: bool) -> serde_json::Value {
        let labels = if enrolled {
            serde_json::json!({"ambit.dev/dataplane": "ambient"})
        } else {
            serde_json::json!({})
        };
        serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": "default", "labels": labels}})
    }

    /// The kubeconfig the control plane uses to reach the API server stand-in.
    pub fn kubeconfig(&self) -> PathBuf {
        self.cp_state_dir().join("kubeconfig")
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
        cmd.arg("run");
        if self.api.is_some() {
            // As deploy/ runs it: the root in a Secret, published in a ConfigMap, callers
            // authenticated with TokenReview (the default with this source).
            cmd.arg("--source=kubernetes")
                .arg("--kubeconfig")
                .arg(self.kubeconfig())
                .arg("--ca-secret=ambit-ca")
                .arg("--root-cert-configmap=ambit-root-cert");
        } else {
            cmd.arg("--mesh-file").arg(self.mesh_file());
        }
        cmd.arg(format!("--xds-addr={CONTROL_PLANE_ADDR}"))
            .arg(format!(
                "--server-name={}",
                CONTROL_PLANE_ADDR.split(':').next().unwrap_or_default()
            ))
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
                if let Some(api) = &self.api {
                    // What the kubelet would mount for the agents: the published root.
                    let cm = api
                        .get("ConfigMap", "ambit-system", "ambit-root-cert")
                        .context("the control plane published no root ConfigMap")?;
                    let pem = cm["data"]["root-cert.pem"]
                        .as_str()
                        .context("no root-cert.pem in the ConfigMap")?;
                    std::fs::create_dir_all(self.ca_dir())?;
                    std::fs::write(self.ca_dir().join("root-cert.pem"), pem)?;
                }
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

    /// `ambit-agent run` with node `n`'s directories, the cluster's agent flags and, with
    /// a control plane, its address and the node's credential.
    pub fn agent_command(&self, n: usize) -> Command {
        let node = self.node(n);
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
                            format!("--xds-address=https://{CONTROL_PLANE_ADDR}"),
                            format!(
                                "--xds-root-cert={}",
                                self.ca_dir().join("root-cert.pem").display()
                            ),
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
            );
        cmd
    }

    /// Starts node `n`'s agent (in the node's netns and agent cgroup) and waits until
    /// `/healthz/ready` says ready.
    pub fn start_agent(&self, n: usize) -> anyhow::Result<()> {
        let node = self.node(n);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.agent_log())?;
        let mut cmd = self.agent_command(n);
        cmd.stdin(Stdio::null())
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

    /// Enrolls `pod` with its node's agent, as the CNI plugin's ADD does: when the agent
    /// found the pod itself first (its namespace enrolled and a process in its cgroup, see
    /// `capture::discover`), the add is refused as a duplicate and the pod it knows is
    /// the answer.
    pub fn enroll(&self, pod: &Pod) -> anyhow::Result<EnrolledPod> {
        let mut client = self.enroll_client(pod.node)?;
        match client.add(pod.spec()) {
            Ok(p) => Ok(p),
            Err(e) if e.to_string().contains("is already enrolled") => client
                .list()?
                .into_iter()
                .find(|p| p.spec.uid == pod.uid)
                .with_context(|| format!("{e}, yet not listed")),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes `pod` (by uid) from its node's agent.
    pub fn release(&self, pod: &Pod) -> anyhow::Result<()> {
        Ok(self.enroll_client(pod.node)?.remove(&pod.uid)?)
    }

    /// Starts `ambit-waypoint` for waypoint `namespace/name` in `pod` (its certificate from
    /// the pod's node agent over SDS, its configuration from the control plane), logging
    /// to [`waypoint_log`](Self::waypoint_log), and waits (at most 30 s) until it says it is
    /// ready: certificate and every xDS type received.
    pub fn start_waypoint(
        &self,
        pod: &Pod,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<PodProcess> {
        self.start_waypoint_with(pod, namespace, name, &[])
    }

    /// [`start_waypoint`](Self::start_waypoint) with extra flags.
    pub fn start_waypoint_with(
        &self,
        pod: &Pod,
        namespace: &str,
        name: &str,
        extra: &[String],
    ) -> anyhow::Result<PodProcess> {
        let mut args = vec![
            format!("--xds-address=https://{CONTROL_PLANE_ADDR}"),
            format!("--namespace={namespace}"),
            format!("--name={name}"),
            format!(
                "--sds-socket={}",
                self.node(pod.node).state_dir.join("sds.sock").display()
            ),
            "--listen=[::]:15008".into(),
        ];
        args.extend_from_slice(extra);
        let log = std::fs::File::create(self.waypoint_log(pod))?;
        let mut p = PodProcess::start_with_stderr(
            &pod.netns_path(),
            &pod.cgroup,
            &workspace_bin("ambit-waypoint"),
            &args,
            log.into(),
        )?;
        // Bounded: a waypoint that never gets its certificate or configuration is an error,
        // not a hang.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = p.wait_for_line("waypoint ready");
            let _ = tx.send((r, p));
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok((Ok(()), p)) => Ok(p),
            Ok((Err(e), _)) => bail!(
                "the waypoint exited before it was ready: {e}\n{}",
                std::fs::read_to_string(self.waypoint_log(pod)).unwrap_or_default()
            ),
            Err(_) => bail!(
                "the waypoint was not ready after 30 s:\n{}\ncontrol plane:\n{}",
                std::fs::read_to_string(self.waypoint_log(pod)).unwrap_or_default(),
                self.control_plane_log()
            ),
        }
    }

    /// The body of `GET http://<addr><path>` made from inside `pod` (e.g. a waypoint's
    /// `/metrics` on its loopback), at most 10 MB.
    pub fn http_get_in(&self, pod: &Pod, addr: &str, path: &str) -> anyhow::Result<String> {
        let args = [
            "http-get".to_string(),
            format!("--connect={addr}"),
            "--host=localhost".into(),
            format!("--path={path}"),
            "--keep=10000000".into(),
        ];
        let (_, lines) = self
            .spawn_in_pod(pod, &args)?
            .finish(Duration::from_secs(10))?;
        let r: serde_json::Value = serde_json::from_str(lines.first().map_or("{}", |l| l))?;
        r["body"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("GET {addr}{path} in {}: {lines:?}", pod.name))
    }

    /// Where the waypoint in `pod` logs (its access log included).
    pub fn waypoint_log(&self, pod: &Pod) -> PathBuf {
        self.node(pod.node)
            .state_dir
            .join(format!("waypoint-{}.log", pod.name))
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
}

/// A ServiceAccount object.
pub fn service_account(namespace: &str, name: &str) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
                       "metadata": {"name": name, "namespace": namespace}})
}
