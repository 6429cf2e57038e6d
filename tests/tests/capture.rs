//! End-to-end tests of L4 capture in the simulated cluster (run as root: `cargo xtask test`).
//!
//! Each test builds its own cluster (unique names; addresses only exist inside its own
//! namespaces), so tests run in parallel.

use std::time::{Duration, Instant};

use ambit_tests::cluster::metric_value;
use ambit_tests::{Cluster, ClusterSpec, Pod};
use serde_json::Value;

const MB: u64 = 1_000_000;

fn s(v: impl ToString) -> String {
    v.to_string()
}

fn addr(v: &Value, key: &str) -> std::net::SocketAddr {
    v[key].as_str().unwrap_or_else(|| panic!("{key} missing in {v}")).parse().unwrap()
}

/// True if the server saw a different client port than the client used: the connection
/// went through the agent (which dials its own connection from the pod's netns).
fn proxied(report: &Value) -> bool {
    addr(report, "local").port() != addr(report, "server_peer").port()
}

fn client_args(targets: &[String], conns: usize, bytes: u64) -> Vec<String> {
    let mut a = Vec::new();
    for t in targets {
        a.push(s("--connect"));
        a.push(t.clone());
    }
    a.extend([s("--conns"), s(conns), s("--bytes"), s(bytes)]);
    a
}

/// Was a connection from `pod` to `dst` recorded by `pod`'s agent with this client port?
fn agent_saw(c: &Cluster, pod: &Pod, client_port: u16, dst: std::net::SocketAddr) -> bool {
    c.captured(pod.node).unwrap().iter().any(|e| {
        e["uid"] == pod.uid.as_str()
            && addr(e, "client").port() == client_port
            && addr(e, "original_destination") == dst
    })
}

#[test]
fn enrolled_pod_is_captured_across_nodes_byte_exact() {
    let c = Cluster::new(ClusterSpec::default()).unwrap();
    let (client, server) = (c.pod(1, 0), c.pod(2, 0));
    let _srv = c.start_server(server, &[format!("{}:8080", server.ip4)]).unwrap();
    c.enroll(client).unwrap();

    let dst = format!("{}:8080", server.ip4);
    let (ok, reports) = c.run_client(client, &client_args(&[dst.clone()], 1, 10 * MB)).unwrap();
    assert!(ok, "transfer failed: {reports:?}\n{}", c.agent_log_tail(1));
    let r = &reports[0];
    assert!(proxied(r), "connection was not captured: {r}");
    assert_eq!(addr(r, "server_local"), dst.parse().unwrap(), "landed at the wrong destination");
    assert_eq!(addr(r, "server_peer").ip(), client.ip4, "source must stay the pod's IP");
    assert!(agent_saw(&c, client, addr(r, "local").port(), dst.parse().unwrap()), "agent did not record the original destination");
}
