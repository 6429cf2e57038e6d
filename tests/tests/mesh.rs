//! End-to-end tests of the secure L4 data path in the simulated cluster: HBONE tunnels
//! between node agents, inbound capture (STRICT / PERMISSIVE), L4 authorization and the
//! telemetry (run as root: `cargo xtask test`).

use std::time::Duration;

use ambit_tests::cluster::metric_sum;
use ambit_tests::sniff::{LinkCapture, contains};
use ambit_tests::{Cluster, ClusterSpec, Pod, wait_until};
use serde_json::Value;

/// A service in front of pod-2-0 and pod-2-1, port 80 → 8080.
const SERVICE: &str = "services:
  - name: web
    namespace: default
    vips: [10.96.0.10]
    ports: [{port: 80, targetPort: 8080}]
    selector: {tier: web}
";
const VIP: &str = "10.96.0.10:80";

/// A 2-node cluster with a control plane; every pod is enrolled (namespace label),
/// `extra` (services, policies) is appended to the mesh file, pods on node 2 carry
/// `tier: web`. Returns once every pod is captured and has its certificate.
fn mesh(extra: &str) -> Cluster {
    mesh_with(&[], &[], extra)
}

/// Like [`mesh`], with more flags for the agents, and with `opt_out` (pod names) labelled
/// out of the mesh.
fn mesh_with(agent_args: &[&str], opt_out: &[&str], extra: &str) -> Cluster {
    let mut args: Vec<String> = agent_args.iter().map(|s| s.to_string()).collect();
    args.extend(
        std::env::var("AMBIT_TEST_AGENT_LOG")
            .map(|l| format!("--log={l}"))
            .ok(),
    );
    let c = Cluster::new(ClusterSpec {
        control_plane: true,
        agent_args: args,
        ..Default::default()
    })
    .unwrap();
    for p in c.nodes.iter().flat_map(|n| &n.pods) {
        c.enroll(p).unwrap();
    }
    c.write_mesh(&mesh_yaml(&c, opt_out, extra)).unwrap();
    wait_until(
        "pods captured with certificates",
        Duration::from_secs(20),
        || {
            c.nodes.iter().all(|n| {
                let dump = c.config_dump(n.index).unwrap();
                let pods = dump["pods"].as_array().unwrap();
                let want = pods
                    .iter()
                    .filter(|p| !opt_out.contains(&p["name"].as_str().unwrap()))
                    .count();
                let captured = pods.iter().filter(|p| p["captured"] == true).count();
                captured == want && dump["certificates"].as_array().unwrap().len() >= want
            })
        },
    );
    c
}

fn mesh_yaml(c: &Cluster, opt_out: &[&str], extra: &str) -> String {
    let mut y = c
        .mesh_yaml(true)
        .replace("labels: {app: pod-2-", "labels: {tier: web, app: pod-2-");
    for name in opt_out {
        y = y.replace(
            &format!("labels: {{app: {name}}}"),
            &format!("labels: {{app: {name}, ambit.dev/dataplane: none}}"),
        );
    }
    y + extra
}

fn serve_8080(c: &Cluster, pod: &Pod) -> ambit_tests::PodProcess {
    c.start_server(pod, &[format!("{}:8080", pod.ip4)]).unwrap()
}

/// Runs the echo client in `from` against `to`; returns its per-connection reports.
fn echo(c: &Cluster, from: &Pod, to: &str, conns: usize, bytes: u64) -> (bool, Vec<Value>) {
    c.run_client(
        from,
        &[
            "--connect".into(),
            to.into(),
            "--conns".into(),
            conns.to_string(),
            "--bytes".into(),
            bytes.to_string(),
            "--timeout".into(),
            "20".into(),
        ],
    )
    .unwrap()
}

fn peer_ip(report: &Value) -> String {
    let peer = report["server_peer"].as_str().unwrap();
    peer.rsplit_once(':').unwrap().0.to_owned()
}

fn metric(c: &Cluster, n: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&c.metrics(n).unwrap(), name, labels)
}

#[test]
fn cross_node_traffic_is_tunnelled_and_the_app_sees_the_callers_ip() {
    let c = mesh(SERVICE);
    let (from, to) = (c.pod(1, 0), c.pod(2, 0));
    let _srv = serve_8080(&c, to);
    let _srv2 = serve_8080(&c, c.pod(2, 1));

    let cap = LinkCapture::start(&c.node(1).netns_path(), "eth0").unwrap();
    let (ok, r) = echo(&c, from, &format!("{}:8080", to.ip4), 4, 100_000);
    assert!(ok, "{r:#?}\n{}", c.agent_log_tail(1));
    let (ok_vip, r_vip) = echo(&c, from, VIP, 8, 100_000);
    assert!(ok_vip, "{r_vip:#?}\n{}", c.agent_log_tail(1));
    let wire = cap.stop().unwrap();

    // The application saw the calling pod's own IP as the source.
    for rep in r.iter().chain(&r_vip) {
        assert_eq!(peer_ip(rep), from.ip4.to_string(), "{rep}");
    }
    // Round robin across both endpoints behind the VIP.
    let servers: std::collections::BTreeSet<_> = r_vip
        .iter()
        .map(|rep| rep["server_local"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(servers.len(), 2, "{servers:?}");

    // No plaintext crossed the node link: not the server's hello line, not the echoed
    // pattern. (A long enough run of the pattern would be unmistakable.)
    assert!(
        wire.len() > 800_000,
        "the capture saw only {} bytes",
        wire.len()
    );
    assert!(!contains(&wire, b"peer="), "plaintext hello on the wire");
    let pattern: Vec<u8> = (0..64u64).map(|o| ((o + 7) % 251) as u8).collect();
    assert!(!contains(&wire, &pattern), "plaintext payload on the wire");

    // Both reporters counted the connections as mutual TLS, with Istio's labels.
    let src = [
        ("reporter", "source"),
        ("connection_security_policy", "mutual_tls"),
        ("source_workload", from.name.as_str()),
        ("destination_workload", to.name.as_str()),
    ];
    assert!(metric(&c, 1, "istio_tcp_connections_opened_total", &src) >= 4.0);
    let principal = format!("spiffe://cluster.local/ns/default/sa/{}", from.name);
    let dst = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", principal.as_str()),
        ("source_workload", from.name.as_str()),
        ("destination_workload", to.name.as_str()),
    ];
    assert!(metric(&c, 2, "istio_tcp_connections_closed_total", &dst) >= 4.0);
    assert!(metric(&c, 2, "istio_tcp_received_bytes_total", &dst) >= 400_000.0);
    let svc = [
        ("reporter", "source"),
        ("destination_service", "web.default.svc.cluster.local"),
    ];
    assert_eq!(
        metric(&c, 1, "istio_tcp_connections_opened_total", &svc),
        8.0
    );

    // The same capture does see plaintext once the namespace leaves the mesh, so the
    // checks above could have failed.
    c.write_mesh(&c.mesh_yaml(false)).unwrap();
    wait_until("pods released", Duration::from_secs(10), || {
        c.nodes.iter().all(|n| {
            c.config_dump(n.index).unwrap()["pods"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["captured"] == false)
        })
    });
    let cap = LinkCapture::start(&c.node(1).netns_path(), "eth0").unwrap();
    let (ok, r) = echo(&c, from, &format!("{}:8080", to.ip4), 1, 100_000);
    assert!(ok, "{r:#?}");
    let wire = cap.stop().unwrap();
    assert!(contains(&wire, b"peer=") && contains(&wire, &pattern));
}

#[test]
fn same_node_traffic_is_tunnelled_with_identity_and_policy() {
    let c = mesh("");
    let (from, to) = (c.pod(1, 0), c.pod(1, 1));
    let _srv = serve_8080(&c, to);
    let (ok, r) = echo(&c, from, &format!("{}:8080", to.ip4), 3, 10_000);
    assert!(ok, "{r:#?}");
    assert!(r.iter().all(|rep| peer_ip(rep) == from.ip4.to_string()));
    let principal = format!("spiffe://cluster.local/ns/default/sa/{}", from.name);
    let dst = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", principal.as_str()),
        ("destination_workload", to.name.as_str()),
    ];
    assert_eq!(
        metric(&c, 1, "istio_tcp_connections_opened_total", &dst),
        3.0
    );
}

// ---- identities ----

use ambit_tests::pki;

use ambit_tests::probes::{hbone_probe, in_netns};

/// A fake HBONE server in a namespace: presents the given certificate, requires clients
/// of the mesh, counts completed handshakes, answers every CONNECT with 503.
struct FakeServer {
    handshakes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeServer {
    fn start(
        netns: std::path::PathBuf,
        addr: std::net::SocketAddr,
        cert: (Vec<String>, String),
        mesh_root_pem: String,
    ) -> Self {
        use ambit_hbone::connect::{Pipe, Refusal};
        use ambit_hbone::tls::{MeshRoots, WorkloadKey};
        let handshakes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let count = handshakes.clone();
        let thread = std::thread::spawn(move || {
            ambit_mesh::netns::Netns::open(&netns)
                .unwrap()
                .enter()
                .unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind(addr).await.unwrap();
                ready_tx.send(()).unwrap();
                let config = ambit_hbone::tls::server_config(
                    &WorkloadKey::from_pem(&cert.0, &cert.1).unwrap(),
                    &MeshRoots::from_pem(&mesh_root_pem).unwrap(),
                    "cluster.local",
                )
                .unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let serve = async {
                    loop {
                        let Ok((tcp, _)) = l.accept().await else {
                            return;
                        };
                        let (acceptor, count) = (acceptor.clone(), count.clone());
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let _ = ambit_hbone::connect::serve(tls, |_| async {
                                Err::<Pipe<tokio::net::TcpStream>, _>(Refusal::Unreachable)
                            })
                            .await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
        });
        ready_rx.recv().unwrap();
        Self {
            handshakes,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.thread.take().map(|t| t.join());
    }
}

#[test]
fn a_foreign_root_or_the_wrong_identity_is_refused_as_client_and_as_server() {
    // "ghost": an enrolled workload whose IP is node 2's own address, where this test runs
    // fake HBONE servers (no agent serves there).
    let ghost = "  - {uid: ghost, name: ghost, namespace: default, node: node-2, serviceAccount: ghost, ips: [172.18.0.2]}\n";
    let c = mesh("");
    c.write_mesh(
        &mesh_yaml(&c, &[], "")
            .replace("services:", "")
            .replace("workloads:\n", &format!("workloads:\n{ghost}")),
    )
    .unwrap();
    wait_until("ghost known", Duration::from_secs(10), || {
        c.config_dump(1).unwrap()["mesh"]["workloads"]["ghost"].is_object()
    });
    let mesh_ca = pki::mesh_root(&c.ca_dir());
    let impostor = pki::impostor_root();
    let (from, to) = (c.pod(1, 0), c.pod(2, 0));
    let _srv = serve_8080(&c, to);
    let id = |name: &str| format!("spiffe://cluster.local/ns/default/sa/{name}");
    let hbone = std::net::SocketAddr::new(to.ip4.into(), 15008);
    let app = std::net::SocketAddr::new(to.ip4.into(), 8080);

    // As a server, the agent accepts a client of the mesh root...
    hbone_probe(
        &c,
        1,
        hbone,
        pki::leaf(&mesh_ca, &id(&from.name)),
        &id(&to.name),
        app,
    )
    .expect("a mesh client is accepted");
    // The agent does not know the caller's IP (a node's): its metrics name it as its
    // baggage does, and its namespace as its certificate does.
    let opened = metric(
        &c,
        2,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_workload", "ratings-v1"),
            ("source_canonical_service", "ratings"),
            ("source_canonical_revision", "v1"),
            ("source_app", "ratings"),
            ("source_cluster", "east"),
            ("source_workload_namespace", "default"),
            ("destination_workload", &to.name),
        ],
    );
    assert_eq!(opened, 1.0, "{}", c.metrics(2).unwrap_or_default());
    // ...and refuses the same identity from another root.
    let err = hbone_probe(
        &c,
        1,
        hbone,
        pki::leaf(&impostor, &id(&from.name)),
        &id(&to.name),
        app,
    )
    .unwrap_err();
    eprintln!("foreign-root client: {err}");
    // A client expecting another identity refuses the agent's (valid) certificate.
    let err = hbone_probe(
        &c,
        1,
        hbone,
        pki::leaf(&mesh_ca, &id(&from.name)),
        &id("someone-else"),
        app,
    )
    .unwrap_err();
    assert!(err.contains("TLS") || err.contains("h2"), "{err}");

    // As a client, the agent refuses a server with the wrong identity or root.
    let ghost_hbone: std::net::SocketAddr = "172.18.0.2:15008".parse().unwrap();
    let node2 = c.node(2).netns_path();
    let dial = || echo(&c, from, "172.18.0.2:8080", 1, 10).0;
    for (what, cert) in [
        (
            "a mesh certificate of another identity",
            pki::leaf(&mesh_ca, &id("not-ghost")),
        ),
        (
            "the right identity from another root",
            pki::leaf(&impostor, &id("ghost")),
        ),
    ] {
        let fake = FakeServer::start(node2.clone(), ghost_hbone, cert, mesh_ca.pem.clone());
        assert!(!dial(), "the agent tunnelled to a server presenting {what}");
        assert_eq!(fake.handshakes(), 0, "{what}: handshake completed");
    }
    // The same fake server with the right identity completes the handshake (and answers
    // 503), so the refusals above were the identity checks.
    let fake = FakeServer::start(
        node2,
        ghost_hbone,
        pki::leaf(&mesh_ca, &id("ghost")),
        mesh_ca.pem.clone(),
    );
    assert!(!dial());
    assert_eq!(fake.handshakes(), 1);
    let failures = |reason| {
        metric(
            &c,
            1,
            "ambit_outbound_failures_total",
            &[("reason", reason)],
        )
    };
    // Each failure names its cause: the wrong identity, and a chain to another root.
    assert_eq!(failures("peer_identity_mismatch"), 1.0);
    assert_eq!(failures("tls_handshake"), 1.0);
    assert_eq!(failures("hbone_error"), 0.0);
    assert_eq!(failures("upstream_unreachable"), 1.0);
}

#[test]
fn strict_refuses_plaintext_and_permissive_accepts_it_under_ip_policy() {
    // pod-1-11 is outside the mesh: its connections stay plaintext.
    let outsider = "pod-1-11";
    let c = mesh_with(&[], &[outsider], "");
    let (plain, meshed, to) = (c.pod(1, 1), c.pod(1, 0), c.pod(2, 0));
    assert_eq!(plain.name, outsider);
    let _srv = serve_8080(&c, to);
    let target = format!("{}:8080", to.ip4);

    // STRICT (the default): plaintext is refused, mTLS from the mesh works.
    let (ok, r) = echo(&c, plain, &target, 1, 100);
    assert!(!ok, "STRICT accepted plaintext: {r:#?}");
    assert!(echo(&c, meshed, &target, 1, 100).0);
    let refused = |reason| metric(&c, 2, "ambit_inbound_refused_total", &[("reason", reason)]);
    assert_eq!(refused("strict_mtls"), 1.0);

    // PERMISSIVE (namespace label): plaintext is accepted, delivered with the caller's IP,
    // and counted as plaintext.
    let permissive = |extra: &str| {
        mesh_yaml(&c, &[outsider], extra).replace(
            "labels: {ambit.dev/dataplane: ambient}",
            "labels: {ambit.dev/dataplane: ambient, ambit.dev/mtls: PERMISSIVE}",
        )
    };
    c.write_mesh(&permissive("")).unwrap();
    wait_until("PERMISSIVE applied", Duration::from_secs(10), || {
        c.config_dump(2).unwrap()["mesh"]["workloads"][&to.uid]["mtls"] == "Permissive"
    });
    let (ok, r) = echo(&c, plain, &target, 2, 10_000);
    assert!(ok, "{r:#?}");
    assert!(r.iter().all(|rep| peer_ip(rep) == plain.ip4.to_string()));
    let none = [
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
        ("source_workload", outsider),
    ];
    wait_until(
        "plaintext connections counted",
        Duration::from_secs(5),
        || metric(&c, 2, "istio_tcp_connections_closed_total", &none) == 2.0,
    );

    // Policy applies to plaintext by source IP: deny the outsider's address.
    let deny = format!(
        "policies:\n  - name: no-outsider\n    namespace: default\n    action: DENY\n    rules:\n      - from: [{{ipBlocks: [{}/32]}}]\n",
        plain.ip4
    );
    c.write_mesh(&permissive(&deny)).unwrap();
    wait_until("policy applied", Duration::from_secs(10), || {
        c.config_dump(2).unwrap()["mesh"]["authorizations"]["default/no-outsider"].is_object()
    });
    assert!(!echo(&c, plain, &target, 1, 100).0);
    assert_eq!(refused("policy_denied"), 1.0);
    assert!(
        echo(&c, meshed, &target, 1, 100).0,
        "the DENY matched a mesh caller"
    );
}

/// One row of the policy table: the policies (YAML), then who may reach pod-2-10 on which
/// port.
struct Row {
    name: &'static str,
    policies: String,
    /// (from pod-1-10, from pod-1-11) on 8080, then on 8081.
    expect: [(bool, bool); 2],
}

#[test]
fn policies_match_principals_namespaces_cidrs_ports_and_negations() {
    let c = mesh("");
    let (a, b, to) = (c.pod(1, 0), c.pod(1, 1), c.pod(2, 0));
    let _srv = c
        .start_server(to, &[format!("{}:8080-8081", to.ip4)])
        .unwrap();
    let principal = |p: &Pod| format!("cluster.local/ns/default/sa/{}", p.name);
    let policy = |action: &str, rule: &str| {
        format!(
            "  - {{name: p{}, namespace: default, action: {action}, rules: [{rule}]}}\n",
            fastid()
        )
    };
    let rows = vec![
        Row {
            name: "no policy allows",
            policies: String::new(),
            expect: [(true, true), (true, true)],
        },
        Row {
            name: "ALLOW one principal",
            policies: policy(
                "ALLOW",
                &format!("{{from: [{{principals: [{}]}}]}}", principal(a)),
            ),
            expect: [(true, false), (true, false)],
        },
        Row {
            name: "ALLOW a prefix wildcard",
            policies: policy(
                "ALLOW",
                "{from: [{principals: [\"cluster.local/ns/default/*\"]}]}",
            ),
            expect: [(true, true), (true, true)],
        },
        Row {
            name: "ALLOW a suffix wildcard",
            policies: policy(
                "ALLOW",
                &format!("{{from: [{{principals: [\"*/sa/{}\"]}}]}}", b.name),
            ),
            expect: [(false, true), (false, true)],
        },
        Row {
            name: "ALLOW notPrincipals",
            policies: policy(
                "ALLOW",
                &format!("{{from: [{{notPrincipals: [{}]}}]}}", principal(a)),
            ),
            expect: [(false, true), (false, true)],
        },
        Row {
            name: "DENY a namespace",
            policies: policy("DENY", "{from: [{namespaces: [default]}]}"),
            expect: [(false, false), (false, false)],
        },
        Row {
            name: "ALLOW notNamespaces",
            policies: policy("ALLOW", "{from: [{notNamespaces: [default]}]}"),
            expect: [(false, false), (false, false)],
        },
        Row {
            name: "ALLOW a CIDR minus one address",
            policies: policy(
                "ALLOW",
                &format!(
                    "{{from: [{{ipBlocks: [10.244.1.0/24], notIpBlocks: [{}/32]}}]}}",
                    a.ip4
                ),
            ),
            expect: [(false, true), (false, true)],
        },
        Row {
            name: "DENY a port",
            policies: policy("DENY", "{to: [{ports: [8081]}]}"),
            expect: [(true, true), (false, false)],
        },
        Row {
            name: "DENY notPorts",
            policies: policy("DENY", "{to: [{notPorts: [8081]}]}"),
            expect: [(false, false), (true, true)],
        },
        Row {
            name: "DENY beats ALLOW",
            policies: policy("ALLOW", "{from: [{namespaces: [default]}]}")
                + &policy(
                    "DENY",
                    &format!(
                        "{{from: [{{principals: [{}]}}], to: [{{ports: [8080]}}]}}",
                        principal(b)
                    ),
                ),
            expect: [(true, false), (true, true)],
        },
    ];
    for row in rows {
        let extra = if row.policies.is_empty() {
            String::new()
        } else {
            format!("policies:\n{}", row.policies)
        };
        let want = row.policies.matches("name: p").count();
        c.write_mesh(&mesh_yaml(&c, &[], &extra)).unwrap();
        wait_until(row.name, Duration::from_secs(10), || {
            let dump = c.config_dump(2).unwrap();
            let have = dump["mesh"]["authorizations"].as_object().unwrap();
            have.len() == want
                && row.policies.split("name: ").skip(1).all(|p| {
                    have.contains_key(&format!("default/{}", p.split(',').next().unwrap()))
                })
        });
        for (i, port) in [8080, 8081].into_iter().enumerate() {
            let target = format!("{}:{port}", to.ip4);
            let got = (echo(&c, a, &target, 1, 10).0, echo(&c, b, &target, 1, 10).0);
            assert_eq!(
                got, row.expect[i],
                "{}: port {port} (pod-1-10, pod-1-11)",
                row.name
            );
        }
    }
}

#[test]
fn a_connection_rate_limit_admits_each_callers_burst_and_refuses_the_rest() {
    let c = mesh("");
    let (a, b, to) = (c.pod(1, 0), c.pod(1, 1), c.pod(2, 0));
    let _srv = serve_8080(&c, to);
    // 3 connections at once per caller, then one a minute (Ambit's RATE_LIMIT action).
    let extra = format!(
        "policies:\n  - name: conn-rate\n    namespace: default\n    selector: {{app: {}}}\n    action: RATE_LIMIT\n    connectionRateLimit: {{connections: 1, unit: Minute, burst: 3}}\n    rules: [{{to: [{{ports: [8080]}}]}}]\n",
        to.name
    );
    c.write_mesh(&mesh_yaml(&c, &[], &extra)).unwrap();
    wait_until("the rate limit applied", Duration::from_secs(10), || {
        c.config_dump(2).unwrap()["mesh"]["authorizations"]["default/conn-rate"].is_object()
    });
    let target = format!("{}:8080", to.ip4);
    for caller in [a, b] {
        let admitted: Vec<bool> = (0..5).map(|_| echo(&c, caller, &target, 1, 10).0).collect();
        assert_eq!(
            admitted,
            [true, true, true, false, false],
            "{}: each caller its own bucket of 3",
            caller.name
        );
    }
    let refused = metric(
        &c,
        2,
        "ambit_inbound_refused_total",
        &[("reason", "rate_limited")],
    );
    assert_eq!(refused, 4.0);
    // Other ports are not limited.
    let _srv2 = c.start_server(to, &[format!("{}:8081", to.ip4)]).unwrap();
    let other = format!("{}:8081", to.ip4);
    assert!((0..4).all(|_| echo(&c, a, &other, 1, 10).0));
}

/// A fresh number for policy names, so each table row's policies are new resources.
fn fastid() -> usize {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn a_policy_change_closes_connections_it_now_denies() {
    let c = mesh("");
    let (a, b, to) = (c.pod(1, 0), c.pod(1, 1), c.pod(2, 0));
    let _srv = serve_8080(&c, to);
    let target = format!("{}:8080", to.ip4);
    let hold = |from: &Pod| {
        let mut p = c
            .spawn_in_pod(
                from,
                &[
                    "client",
                    "--connect",
                    &target,
                    "--bytes",
                    "100000",
                    "--hold",
                    "--timeout",
                    "20",
                ]
                .map(String::from),
            )
            .unwrap();
        p.wait_for_line("connected").unwrap();
        p
    };
    let (held_a, held_b) = (hold(a), hold(b));
    wait_until("both tracked", Duration::from_secs(5), || {
        metric(
            &c,
            2,
            "ambit_inbound_accepted_total",
            &[("reason", "mutual_tls")],
        ) == 2.0
    });
    let deny = format!(
        "policies:\n  - {{name: no-b, namespace: default, action: DENY, rules: [{{from: [{{principals: [cluster.local/ns/default/sa/{}]}}]}}]}}\n",
        b.name
    );
    c.write_mesh(&mesh_yaml(&c, &[], &deny)).unwrap();
    wait_until(
        "the denied connection closed",
        Duration::from_secs(10),
        || {
            metric(
                &c,
                2,
                "ambit_inbound_refused_total",
                &[("reason", "closed_by_policy_change")],
            ) == 1.0
        },
    );
    let finish = |mut p: ambit_tests::PodProcess| {
        p.write_line("go").unwrap();
        let (status, _) = p.finish(Duration::from_secs(30)).unwrap();
        status.success()
    };
    assert!(finish(held_a), "the still-allowed connection broke");
    assert!(!finish(held_b), "the now-denied connection survived");
}

#[test]
fn a_thousand_concurrent_connections_share_a_few_hbone_connections() {
    let c = mesh("");
    let (from, to) = (c.pod(1, 0), c.pod(2, 0));
    let _srv = serve_8080(&c, to);
    let (ok, r) = echo(&c, from, &format!("{}:8080", to.ip4), 1000, 20_000);
    let failed: Vec<_> = r.iter().filter(|rep| rep["ok"] != true).take(3).collect();
    assert!(ok && r.len() == 1000, "{failed:#?}");
    let dials = metric(&c, 1, "ambit_hbone_dials_total", &[]);
    eprintln!(
        "1000 concurrent tunnels (20 kB echoed each, byte-exact) used {dials} HBONE connections"
    );
    // 100 streams per connection: 10 at least; a few more if streams finish unevenly.
    assert!((10.0..=20.0).contains(&dials), "{dials} HBONE connections");
}

#[test]
fn a_certificate_rotation_during_a_long_transfer_does_not_break_it() {
    let c = mesh_with(&["--cert-ttl=2s"], &[], "");
    let (from, to) = (c.pod(1, 0), c.pod(2, 0));
    let _srv = serve_8080(&c, to);
    let serials = |n: usize| -> Vec<String> {
        c.config_dump(n).unwrap()["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|cert| cert["serial"].as_str().unwrap().to_owned())
            .collect()
    };
    let before = (serials(1), serials(2));
    // Several seconds of 1-byte round trips on one tunnel, each echoed byte checked.
    let p = c
        .spawn_in_pod(
            from,
            &[
                "rr",
                "--connect",
                &format!("{}:8080", to.ip4),
                "--count",
                "10000",
            ]
            .map(String::from),
        )
        .unwrap();
    let (status, lines) = p.finish(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{lines:?}\n{}", c.agent_log_tail(1));
    let after = (serials(1), serials(2));
    for (b, a) in [(&before.0, &after.0), (&before.1, &after.1)] {
        assert!(
            b.iter().all(|s| !a.contains(s)),
            "no rotation: {b:?} → {a:?}"
        );
    }
    eprintln!("11000 round trips across certificate rotations: {lines:?}");
}

#[test]
fn malformed_hbone_input_is_refused_without_harming_other_tunnels() {
    use std::io::{Read, Write};
    let c = mesh("");
    let (from, to, other) = (c.pod(1, 0), c.pod(2, 0), c.pod(2, 1));
    let _srv = serve_8080(&c, to);
    let target = format!("{}:8080", to.ip4);
    let mut held = c
        .spawn_in_pod(
            from,
            &[
                "client",
                "--connect",
                &target,
                "--conns",
                "4",
                "--bytes",
                "1000000",
                "--hold",
                "--timeout",
                "30",
            ]
            .map(String::from),
        )
        .unwrap();
    held.wait_for_line("connected").unwrap();

    let hbone = std::net::SocketAddr::new(to.ip4.into(), 15008);
    // Garbage instead of a TLS handshake: the connection is closed.
    let closed = in_netns(c.node(1).netns_path(), move || {
        let mut s = std::net::TcpStream::connect(hbone).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
        let _ = s.write_all(&junk);
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue, // a TLS alert, then the close
            }
        }
    });
    assert!(closed);
    // A valid client asking for another pod, or for the agent's own port: 400.
    let mesh_ca = pki::mesh_root(&c.ca_dir());
    let id = |name: &str| format!("spiffe://cluster.local/ns/default/sa/{name}");
    for authority in [
        std::net::SocketAddr::new(other.ip4.into(), 8080),
        std::net::SocketAddr::new(to.ip4.into(), 15008),
    ] {
        let err = hbone_probe(
            &c,
            1,
            hbone,
            pki::leaf(&mesh_ca, &id(&from.name)),
            &id(&to.name),
            authority,
        )
        .unwrap_err();
        assert!(err.contains("400"), "{authority}: {err}");
    }
    // A half-open TCP connection that never speaks.
    let idle = in_netns(c.node(1).netns_path(), move || {
        std::net::TcpStream::connect(hbone).unwrap()
    });

    // The tunnels that were open all along still carry their bytes, exactly.
    held.write_line("go").unwrap();
    let (status, lines) = held.finish(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{lines:?}");
    drop(idle);
    assert_eq!(
        metric(
            &c,
            2,
            "ambit_inbound_refused_total",
            &[("reason", "bad_authority")]
        ),
        2.0
    );
}

/// How many of node `n`'s known pods are captured now.
fn captured_pods(c: &Cluster, n: usize) -> usize {
    c.enroll_client(n)
        .unwrap()
        .list()
        .unwrap()
        .iter()
        .filter(|p| p.captured)
        .count()
}

#[test]
fn a_stopped_agent_keeps_strict_pods_closed_until_the_next_one_takes_over() {
    let outsider = "pod-1-11";
    let c = mesh_with(&[], &[outsider], "");
    let (plain, meshed, to) = (c.pod(1, 1), c.pod(1, 0), c.pod(2, 0));
    let _srv = serve_8080(&c, to);
    let target = format!("{}:8080", to.ip4);
    assert!(echo(&c, meshed, &target, 1, 100).0);

    let status = c.stop_agent(2, libc::SIGTERM).unwrap();
    assert!(status.success(), "{status}\n{}", c.agent_log_tail(2));
    // Nothing reaches the STRICT pod while its agent is down: not plaintext from
    // outside the mesh, not (undecryptable) tunnels from the mesh; nothing in clear
    // crosses its node's link.
    let cap = LinkCapture::start(&c.node(2).netns_path(), "eth0").unwrap();
    for _ in 0..3 {
        let (ok, r) = echo(&c, plain, &target, 1, 100);
        assert!(
            !ok,
            "a STRICT pod accepted plaintext with its agent stopped: {r:#?}"
        );
        // Steered to a listener that is gone: the kernel resets the SYN at once.
        assert_eq!(r[0]["error_kind"], "ConnectionRefused", "{r:#?}");
        assert!(!echo(&c, meshed, &target, 1, 100).0);
    }
    let wire = cap.stop().unwrap();
    assert!(
        !contains(&wire, b"peer="),
        "the application answered in clear"
    );

    c.start_agent(2).unwrap();
    wait_until(
        "the restarted agent serves",
        Duration::from_secs(20),
        || echo(&c, meshed, &target, 1, 100).0,
    );
    assert!(
        !echo(&c, plain, &target, 1, 100).0,
        "STRICT lost after restart"
    );
}

#[test]
fn half_written_empty_or_gutted_mesh_files_never_open_strict_pods() {
    let outsider = "pod-1-11";
    let c = mesh_with(&[], &[outsider], "");
    let (plain, to) = (c.pod(1, 1), c.pod(2, 0));
    let _srv = serve_8080(&c, to);
    let target = format!("{}:8080", to.ip4);
    let yaml = mesh_yaml(&c, &[outsider], "");
    let file = c.mesh_file();
    let all = c.node(2).pods.len();
    let strict_holds = |when: &str| {
        assert_eq!(captured_pods(&c, 2), all, "{when}: node 2 released pods");
        let (ok, r) = echo(&c, plain, &target, 1, 100);
        assert!(!ok, "{when}: a STRICT pod accepted plaintext: {r:#?}");
    };

    // A writer that pauses between truncating and writing: the control plane sees an
    // empty file for 150 ms each time.
    for i in 0..20 {
        std::fs::File::create(&file).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        if i % 5 == 0 {
            strict_holds("truncated");
        }
        std::fs::write(&file, &yaml).unwrap();
    }
    // `cp` over the file, again and again: every read may catch it half-written.
    let src = file.with_extension("src");
    std::fs::write(&src, &yaml).unwrap();
    for i in 0..300 {
        std::fs::copy(&src, &file).unwrap();
        if i % 60 == 0 {
            strict_holds("copying");
        }
    }
    // An empty file, left there beyond the shrink hold: an error, not an empty mesh.
    std::fs::write(&file, "").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    strict_holds("empty file");
    // A file that drops every workload is held, then taken as meant.
    std::fs::write(&file, &yaml).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let gutted = yaml[..yaml.find("workloads:").unwrap()].to_owned() + "workloads: []\n";
    c.write_mesh(&gutted).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        captured_pods(&c, 2),
        all,
        "a gutted mesh was served at once"
    );
    wait_until(
        "the gutted mesh served after the hold",
        Duration::from_secs(10),
        || captured_pods(&c, 2) == 0,
    );
    assert!(
        c.control_plane_log().contains("serving the held mesh"),
        "the hold was not reported:\n{}",
        c.control_plane_log()
    );
    // A deliberate opt-out of the namespace releases at once.
    c.write_mesh(&yaml).unwrap();
    wait_until("recaptured", Duration::from_secs(20), || {
        captured_pods(&c, 2) == all
    });
    c.write_mesh(&c.mesh_yaml(false)).unwrap();
    wait_until("released by the opt-out", Duration::from_secs(10), || {
        captured_pods(&c, 2) == 0
    });
}
