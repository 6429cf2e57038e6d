//! `ambit-cni` chained after the reference CNI plugins (Debian's
//! `containernetworking-plugins`: `bridge` + `host-local`), each run exactly as a
//! container runtime runs it (environment + config on stdin, result on stdout), against
//! real node agents and the control plane of the simulated cluster (run as root:
//! `cargo xtask test -- cni`).

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ambit_tests::cluster::metric_sum;
use ambit_tests::{Cluster, ClusterSpec, Pod, wait_until, workspace_bin};
use serde_json::{Value, json};

const CNI_BIN: &str = "/usr/lib/cni";

/// What a runtime gets back from one plugin call.
struct Outcome {
    ok: bool,
    stdout: Value,
    stderr: String,
}

/// Runs `plugin` in node `n`'s network namespace the way a runtime does.
fn cni_call(
    c: &Cluster,
    n: usize,
    plugin: &Path,
    command: &str,
    sandbox: &str,
    pod_args: &str,
    conf: &Value,
) -> Outcome {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &c.node(n).netns])
        .arg(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", sandbox)
        .env("CNI_NETNS", format!("/var/run/netns/{sandbox}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_BIN)
        .env("CNI_ARGS", pod_args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Outcome {
        ok: out.status.success(),
        stdout: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The node's primary network: a bridge with host-local addresses from the node's pod
/// range (10.244.1.100 onwards), which the other nodes already route to node 1.
fn bridge_conf(ipam_dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "ambit-test",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.244.1.0/24", "rangeStart": "10.244.1.100",
                          "rangeEnd": "10.244.1.120", "gateway": "10.244.1.1"}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": ipam_dir,
        }
    })
}

/// A sandbox's network as a runtime sets it up: `loopback` (the runtime's own call),
/// then the bridge; returns the bridge's result.
fn primary_add(c: &Cluster, sandbox: &str, ipam_dir: &Path) -> Value {
    let lo = json!({"cniVersion": "1.0.0", "name": "lo", "type": "loopback"});
    let up = cni_call(
        c,
        1,
        &Path::new(CNI_BIN).join("loopback"),
        "ADD",
        sandbox,
        "",
        &lo,
    );
    assert!(up.ok, "loopback ADD failed: {} {}", up.stdout, up.stderr);
    let net = cni_call(
        c,
        1,
        &Path::new(CNI_BIN).join("bridge"),
        "ADD",
        sandbox,
        "",
        &bridge_conf(ipam_dir),
    );
    assert!(net.ok, "bridge ADD failed: {} {}", net.stdout, net.stderr);
    net.stdout
}

/// Ambit's entry of the installed list, as a runtime hands it to the plugin: with the
/// list's name and version, and the previous plugin's result.
fn ambit_conf(list: &Value, prev: &Value) -> Value {
    let mut p = list["plugins"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(p["type"], "ambit-cni", "{list}");
    p["cniVersion"] = list["cniVersion"].clone();
    p["name"] = list["name"].clone();
    p["prevResult"] = prev.clone();
    p
}

fn plugin_types(list: &Path) -> Vec<String> {
    let v: Value = serde_json::from_slice(&std::fs::read(list).unwrap()).unwrap();
    v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_owned())
        .collect()
}

fn k8s_args(namespace: &str, name: &str, uid: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={uid}")
}

/// The pod the chain configured, as the harness drives processes in it.
fn sandbox_pod(c: &Cluster, netns: &str, name: &str, uid: &str, ip: Ipv4Addr) -> Pod {
    let cgroup = c.node(1).pod_cgroup.join(name);
    std::fs::create_dir_all(&cgroup).unwrap();
    Pod {
        node: 1,
        name: name.into(),
        uid: uid.into(),
        netns: netns.into(),
        ip4: ip,
        ip6: "fd00:10:244:1::ff".parse().unwrap(),
        cgroup,
    }
}

fn known_to_agent(c: &Cluster, uid: &str) -> Option<Value> {
    c.config_dump(1).ok()?["pods"]
        .as_array()?
        .iter()
        .find(|p| p["uid"] == uid)
        .cloned()
}

#[test]
fn cni_chain_enrolls_new_pods_fails_closed_without_the_agent_and_releases_on_del() {
    ambit_tests::require_root();
    assert!(
        Path::new(CNI_BIN).join("bridge").is_file(),
        "the reference CNI plugins are missing: `apt-get install containernetworking-plugins` (cargo xtask test does it)"
    );
    let c = Cluster::new(ClusterSpec {
        control_plane: true,
        ..Default::default()
    })
    .unwrap();
    let bridge = Path::new(CNI_BIN).join("bridge");
    let root = std::env::temp_dir().join(format!("{}-cni", c.prefix));
    let _cleanup = scopeguard(root.clone());
    let ipam = root.join("ipam");

    // The node's primary network configuration, then Ambit's installer, as the agent
    // DaemonSet's init container runs it.
    let (bin_dir, conf_dir) = (root.join("bin"), root.join("net.d"));
    std::fs::create_dir_all(&conf_dir).unwrap();
    let mut primary = bridge_conf(&ipam);
    primary.as_object_mut().unwrap().remove("cniVersion");
    primary.as_object_mut().unwrap().remove("name");
    let list_path = conf_dir.join("10-bridge.conflist");
    std::fs::write(
        &list_path,
        json!({"cniVersion": "1.0.0", "name": "ambit-test", "plugins": [primary]}).to_string(),
    )
    .unwrap();
    let setup = |cmd: &str| {
        let out = Command::new(workspace_bin("ambit-cni"))
            .arg(cmd)
            .arg("--bin-dir")
            .arg(&bin_dir)
            .arg("--conf-dir")
            .arg(&conf_dir)
            .arg("--enroll-socket")
            .arg(c.node(1).enroll_socket())
            .arg("--state-dir")
            .arg(&c.node(1).state_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ambit-cni {cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    setup("install");
    setup("install"); // idempotent
    assert_eq!(plugin_types(&list_path), ["bridge", "ambit-cni"]);
    let installed: Value = serde_json::from_slice(&std::fs::read(&list_path).unwrap()).unwrap();
    let ambit_cni = bin_dir.join("ambit-cni");
    // The installed plugin, called as a runtime calls the last plugin of the list.
    let ambit = |cmd: &str, sandbox: &str, args: &str, prev: &Value| {
        cni_call(
            &c,
            1,
            &ambit_cni,
            cmd,
            sandbox,
            args,
            &ambit_conf(&installed, prev),
        )
    };
    let uid = |n: &str| format!("{}-{n}", c.prefix);

    // The mesh: namespace `default` enrolled with the harness's pods and the sandboxes
    // the chain will create; the second pod of node 2 opted out (a client outside the mesh); `outside`
    // not enrolled.
    let outsider = &c.pod(2, 1).name;
    let mut mesh = c
        .mesh_yaml(true)
        .replace(
            &format!("labels: {{app: {outsider}}}"),
            &format!("labels: {{app: {outsider}, ambit.dev/dataplane: none}}"),
        )
        .replace("nodes:\n", "  - name: outside\nnodes:\n");
    // host-local hands out .100, .101 (cni-d, which the mesh file does not name), .102...
    for (name, ns, ip) in [
        ("cni-a", "default", 100),
        ("cni-b", "default", 102),
        ("cni-c", "outside", 103),
    ] {
        mesh.push_str(&format!(
            "  - {{uid: {}, name: {name}, namespace: {ns}, node: node-1, serviceAccount: {name}, ips: [10.244.1.{ip}]}}\n",
            uid(name),
        ));
    }
    for p in &c.node(2).pods {
        c.enroll(p).unwrap();
    }
    c.write_mesh(&mesh).unwrap();
    let cache = c
        .node(1)
        .state_dir
        .join(ambit_mesh::enroll::ENROLLED_NAMESPACES_FILE);
    wait_until(
        "node 1's agent reports the enrolled namespaces for the CNI plugin",
        Duration::from_secs(20),
        || std::fs::read_to_string(&cache).is_ok_and(|s| s == r#"["default"]"#),
    );

    // 1. A new pod of an enrolled namespace, through the whole chain.
    let a = c.add_empty_netns("cni-a").unwrap();
    let net = primary_add(&c, &a, &ipam);
    assert_eq!(net["ips"][0]["address"], "10.244.1.100/24", "{}", net);
    let args_a = k8s_args("default", "cni-a", &uid("cni-a"));
    let started = Instant::now();
    let add = ambit("ADD", &a, &args_a, &net);
    assert!(
        add.ok,
        "ambit-cni ADD failed: {} {}",
        add.stdout, add.stderr
    );
    // A chained plugin hands the runtime the result it was given.
    assert_eq!(add.stdout["ips"], net["ips"]);
    assert_eq!(add.stdout["cniVersion"], "1.0.0");
    wait_until("cni-a captured", Duration::from_secs(10), || {
        known_to_agent(&c, &uid("cni-a")).is_some_and(|p| p["captured"] == true)
    });
    eprintln!("cni: ADD → captured in {:?}", started.elapsed());
    // Retried ADD (the kubelet does that): still fine, still captured.
    let again = ambit("ADD", &a, &args_a, &net);
    assert!(again.ok, "{} {}", again.stdout, again.stderr);
    let check = ambit("CHECK", &a, &args_a, &net);
    assert!(check.ok, "CHECK: {} {}", check.stdout, check.stderr);

    // A pod the control plane has not described yet (a real API server learns of its
    // IP only after CNI ADD): captured by the ADD itself, because its namespace is
    // enrolled, so its first connect is already the mesh's.
    let d = c.add_empty_netns("cni-d").unwrap();
    let net_d = primary_add(&c, &d, &ipam);
    let args_d = k8s_args("default", "cni-d", &uid("cni-d"));
    let add_d = ambit("ADD", &d, &args_d, &net_d);
    assert!(add_d.ok, "{} {}", add_d.stdout, add_d.stderr);
    assert!(add_d.stderr.contains("captured: true"), "{}", add_d.stderr);
    assert_eq!(known_to_agent(&c, &uid("cni-d")).unwrap()["captured"], true);

    // Its traffic is the mesh's: a meshed client is tunnelled, an outsider refused (STRICT).
    let pod_a = sandbox_pod(
        &c,
        &a,
        "cni-a",
        &uid("cni-a"),
        "10.244.1.100".parse().unwrap(),
    );
    let _srv = c
        .start_server(&pod_a, &["10.244.1.100:8080".to_string()])
        .unwrap();
    let echo = |from: &Pod| {
        c.run_client(
            from,
            &[
                "--connect",
                "10.244.1.100:8080",
                "--bytes",
                "1000",
                "--timeout",
                "10",
            ]
            .map(String::from),
        )
        .unwrap()
    };
    wait_until(
        "cni-a has its certificate and serves mTLS",
        Duration::from_secs(20),
        || echo(c.pod(2, 0)).0,
    );
    let mtls = metric_sum(
        &c.metrics(1).unwrap(),
        "ambit_inbound_accepted_total",
        &[("reason", "mutual_tls")],
    );
    assert!(mtls >= 1.0, "node 1 accepted no tunnel for cni-a");
    let (ok, r) = echo(c.pod(2, 1));
    assert!(
        !ok,
        "a STRICT pod enrolled by CNI accepted plaintext: {r:?}"
    );

    // 2. The agent is down: an enrolled namespace's pod waits (code 11, "try again
    //    later"), another namespace's pod starts at once.
    c.stop_agent(1, libc::SIGTERM).unwrap();
    let b = c.add_empty_netns("cni-b").unwrap();
    let net_b = primary_add(&c, &b, &ipam);
    assert_eq!(net_b["ips"][0]["address"], "10.244.1.102/24");
    let args_b = k8s_args("default", "cni-b", &uid("cni-b"));
    let refused = ambit("ADD", &b, &args_b, &net_b);
    assert!(!refused.ok, "an enrolled pod started without its agent");
    assert_eq!(refused.stdout["code"], 11, "{}", refused.stdout);
    let cc = c.add_empty_netns("cni-c").unwrap();
    let net_c = primary_add(&c, &cc, &ipam);
    let t = Instant::now();
    let outside = ambit(
        "ADD",
        &cc,
        &k8s_args("outside", "cni-c", &uid("cni-c")),
        &net_c,
    );
    assert!(
        outside.ok,
        "a pod outside the mesh was delayed: {}",
        outside.stdout
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // The kubelet retries once the agent is back.
    c.start_agent(1).unwrap();
    let retried = ambit("ADD", &b, &args_b, &net_b);
    assert!(retried.ok, "{} {}", retried.stdout, retried.stderr);
    wait_until("cni-b captured", Duration::from_secs(10), || {
        known_to_agent(&c, &uid("cni-b")).is_some_and(|p| p["captured"] == true)
    });

    // 3. DEL releases, and a second DEL (or one for a pod never seen) succeeds.
    let del = ambit("DEL", &a, &args_a, &net);
    assert!(del.ok, "{} {}", del.stdout, del.stderr);
    assert!(known_to_agent(&c, &uid("cni-a")).is_none());
    let del = ambit("DEL", &a, &args_a, &net);
    assert!(del.ok, "{}", del.stdout);
    assert!(cni_call(&c, 1, &bridge, "DEL", &a, "", &bridge_conf(&ipam)).ok);

    // Uninstall takes Ambit out of the list and removes the binary.
    setup("uninstall");
    assert_eq!(plugin_types(&list_path), ["bridge"]);
    assert!(!ambit_cni.exists());

    // VERSION, as a runtime asks before anything else.
    let v = cni_call(
        &c,
        1,
        &workspace_bin("ambit-cni"),
        "VERSION",
        &a,
        "",
        &json!({"cniVersion": "1.0.0"}),
    );
    let versions = v.stdout["supportedVersions"].to_string();
    assert!(
        v.ok && versions.contains("0.4.0") && versions.contains("1.0.0"),
        "{}",
        v.stdout
    );
}

/// Removes the host-local data directory, also when the test fails.
fn scopeguard(dir: std::path::PathBuf) -> impl Drop {
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    Remove(dir)
}
