//! `cargo xtask demo`: a 2-node simulated cluster with an agent per node. Enrolled and
//! non-enrolled pods send traffic across nodes; the demo prints what each agent captured
//! and every workload's kernel counters, then removes everything (also on Ctrl-C).

use std::sync::Arc;

use ambit_tests::cluster::metric_value;
use ambit_tests::{Cluster, ClusterSpec, Pod};

fn main() -> anyhow::Result<()> {
    ambit_tests::require_root();
    println!(
        "Ambit demo: building a 2-node cluster in network namespaces (2 pods per node, an agent per node)..."
    );
    let cluster = Arc::new(Cluster::new(ClusterSpec::default())?);
    cleanup_on_signal(cluster.clone());
    let c = &*cluster;

    let (a, b) = (c.pod(1, 0), c.pod(1, 1)); // node 1: a enrolled, b not
    let (s, d) = (c.pod(2, 0), c.pod(2, 1)); // node 2: s a server, d enrolled
    let _srv_s = c.start_server(s, &[format!("{}:8080", s.ip4), format!("[{}]:8080", s.ip6)])?;
    let _srv_b = c.start_server(b, &[format!("{}:9090", b.ip4)])?;
    c.enroll(a)?;
    c.enroll(d)?;

    println!();
    for node in &c.nodes {
        println!(
            "node-{}  {} / {}  agent pid {}",
            node.index,
            node.ip4,
            node.ip6,
            node.agent_pid().unwrap_or(0)
        );
        for p in &node.pods {
            let enrolled = [a, d].iter().any(|e| e.uid == p.uid);
            println!(
                "  {:<10} {:<13} {:<22} {}",
                p.name,
                p.ip4,
                p.ip6,
                if enrolled { "enrolled" } else { "not enrolled" }
            );
        }
    }

    println!("\nTraffic (each connection echoes 1 MB and checks every byte):");
    println!(
        "  {:<10} {:<28} {:<10} HOW IT ARRIVED (as the server saw it)",
        "FROM", "TO", "RESULT"
    );
    for (from, to) in [
        (a, format!("{}:8080", s.ip4)),
        (a, format!("[{}]:8080", s.ip6)),
        (b, format!("{}:8080", s.ip4)),
        (d, format!("{}:9090", b.ip4)),
    ] {
        traffic(c, from, &to)?;
    }

    for node in &c.nodes {
        println!(
            "\nWhat node-{}'s agent captured (GET /debug/connections on its admin port):",
            node.index
        );
        println!(
            "  {:<10} {:<24} ORIGINAL DESTINATION",
            "WORKLOAD", "APP SOCKET (REDIRECTED)"
        );
        for e in c.captured(node.index)? {
            println!(
                "  {:<10} {:<24} {}",
                e["workload"].as_str().unwrap_or("?"),
                e["client"].as_str().unwrap_or("?"),
                e["original_destination"].as_str().unwrap_or("?")
            );
        }
    }

    println!(
        "\nPer-workload counters (GET /metrics; bytes at the IP layer, counted by cgroup_skb in the kernel):"
    );
    println!(
        "  {:<6} {:<10} {:>14} {:>14} {:>10} {:>10} {:>12}",
        "NODE",
        "WORKLOAD",
        "EGRESS BYTES",
        "INGRESS BYTES",
        "EGRESS PK",
        "INGRESS PK",
        "PROXIED CONNS"
    );
    for node in &c.nodes {
        let m = c.metrics(node.index)?;
        for p in [a, d].into_iter().filter(|p| p.node == node.index) {
            let v = |name: &str, dir: Option<&str>| {
                let mut want = vec![("workload", p.name.as_str())];
                if let Some(dir) = dir {
                    want.push(("direction", dir));
                }
                metric_value(&m, name, &want).unwrap_or(0.0) as u64
            };
            println!(
                "  {:<6} {:<10} {:>14} {:>14} {:>10} {:>10} {:>12}",
                format!("node-{}", node.index),
                p.name,
                v("ambit_workload_bytes_total", Some("egress")),
                v("ambit_workload_bytes_total", Some("ingress")),
                v("ambit_workload_packets_total", Some("egress")),
                v("ambit_workload_packets_total", Some("ingress")),
                v("ambit_outbound_connections_opened_total", None),
            );
        }
    }
    println!("\nCleaning up (namespaces, cgroups, pinned programs, processes)...");
    cluster.teardown();
    println!("Done.");
    Ok(())
}

fn traffic(c: &Cluster, from: &Pod, to: &str) -> anyhow::Result<()> {
    let args = ["--connect", to, "--bytes", "1000000"].map(String::from);
    let (ok, reports) = c.run_client(from, &args)?;
    let r = reports.first().cloned().unwrap_or_default();
    let local = r["local"].as_str().unwrap_or("");
    let peer = r["server_peer"].as_str().unwrap_or("?");
    let port = |a: &str| a.rsplit(':').next().unwrap_or("").to_owned();
    let how = if !ok {
        format!("FAILED: {}", r["error"])
    } else if port(local) != port(peer) {
        format!("from {peer} via the agent (captured; the app's socket was {local})")
    } else {
        format!("from {peer} directly (not captured)")
    };
    println!(
        "  {:<10} {:<28} {:<10} {}",
        from.name,
        to,
        if ok { "ok" } else { "FAILED" },
        how
    );
    Ok(())
}

/// Ctrl-C or SIGTERM: remove the cluster, then exit.
fn cleanup_on_signal(cluster: Arc<Cluster>) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        });
        eprintln!("\ninterrupted: cleaning up...");
        cluster.teardown();
        std::process::exit(130);
    });
}
