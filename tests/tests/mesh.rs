//! End-to-end tests of the secure L4 data path in the simulated cluster: HBONE tunnels
//! between node agents, inbound capture (STRICT / PERMISSIVE), L4 authorization and the
//! telemetry (run as root: `cargo xtask test`).

use std::time::{Duration, Instant};

use ambit_tests::cluster::metric_sum;
use ambit_tests::sniff::{LinkCapture, contains};
use ambit_tests::{Cluster, ClusterSpec, Pod};
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
    let c = Cluster::new(ClusterSpec {
        control_plane: true,
        agent_args: std::env::var("AMBIT_TEST_AGENT_LOG")
            .map(|l| vec![format!("--log={l}")])
            .unwrap_or_default(),
        ..Default::default()
    })
    .unwrap();
    for p in c.nodes.iter().flat_map(|n| &n.pods) {
        c.enroll(p).unwrap();
    }
    c.write_mesh(&mesh_yaml(&c, extra)).unwrap();
    wait_until(
        "pods captured with certificates",
        Duration::from_secs(20),
        || {
            c.nodes.iter().all(|n| {
                let dump = c.config_dump(n.index).unwrap();
                let pods = dump["pods"].as_array().unwrap();
                pods.iter().all(|p| p["captured"] == true)
                    && dump["certificates"].as_array().unwrap().len() == pods.len()
            })
        },
    );
    c
}

fn mesh_yaml(c: &Cluster, extra: &str) -> String {
    c.mesh_yaml(true)
        .replace("labels: {app: pod-2-", "labels: {tier: web, app: pod-2-")
        + extra
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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
