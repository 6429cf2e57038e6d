//! `cargo xtask bench`, control-plane part: a mesh of 10,000 workloads and 1,000
//! services served to two real node agents in the simulated cluster; plus, in process,
//! where the time of one change goes. Reported, never asserted.
//!
//! All workloads are enrolled, so every agent holds all of them (their worst case).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_control_plane::ads::AdsServer;
use ambit_control_plane::model::Model;
use ambit_control_plane::source::file::{Derived, Reparser, parse_spec};
use ambit_control_plane::translate::Snapshot;
use ambit_node_agent::state::Store;
use ambit_node_agent::state::xds::StoreHandler;
use ambit_tests::cluster::metric_value;
use ambit_tests::synthetic::SyntheticMesh;
use ambit_tests::{Cluster, ClusterSpec, median, rss_kib};
use ambit_xds::client::{XdsClient, XdsClientConfig};
use ambit_xds::type_url::{NODE_AGENT, SERVICE, WORKLOAD};
use anyhow::Context;

const WORKLOADS: usize = 10_000;
const SERVICES: usize = 1_000;
const NAMESPACES: usize = 100;
const NODES: usize = 50;
const SINGLE_CHANGES: usize = 15;

/// The big mesh; `variant` changes one workload's labels.
fn mesh(variant: usize) -> String {
    SyntheticMesh {
        workloads: WORKLOADS,
        services: SERVICES,
        namespaces: NAMESPACES,
        nodes: NODES,
        first_node: 1,
    }
    .yaml("", |i| (i == 0).then(|| format!("r{variant}")))
}

fn main() -> anyhow::Result<()> {
    ambit_tests::require_root();
    let mut rows: Vec<(String, String)> = Vec::new();

    eprintln!("bench-xds: in-process breakdown...");
    let yaml = mesh(0);
    let ms = |t: Instant| format!("{:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let spec_of =
        |yaml: &str| parse_spec(Path::new("bench.yaml"), yaml).map_err(|e| anyhow::anyhow!("{e}"));
    let t = Instant::now();
    let spec = spec_of(&yaml)?;
    rows.push((
        format!(
            "parse the 10k-workload YAML ({:.1} MB)",
            yaml.len() as f64 / 1e6
        ),
        ms(t),
    ));
    let path = Path::new("bench.yaml");
    let mut reparser = Reparser::new();
    let first = reparser
        .read(path, &yaml)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    reparser.commit(first);
    let changed = mesh(1);
    let t = Instant::now();
    reparser
        .read(path, &changed)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    rows.push((
        format!(
            "re-read it with one workload changed (incremental: {} of {WORKLOADS} workloads parsed)",
            reparser.items_parsed
        ),
        ms(t),
    ));
    let t = Instant::now();
    let _: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml)?;
    rows.push((
        "the same text into serde_yaml_ng's generic Value (the YAML parser alone)".into(),
        ms(t),
    ));
    let t = Instant::now();
    let model = Model::build(spec).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    rows.push(("validate and derive its model (a full build)".into(), ms(t)));
    let mut derived = Derived::load(path, &yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = Instant::now();
    derived
        .next(path, &changed)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(derived.counts() == (1, 1), "not derived in place");
    rows.push((
        "re-read and derive the model of the file with one workload changed".into(),
        ms(t),
    ));
    let t = Instant::now();
    let _snapshot = Snapshot::from_model(&model);
    rows.push((
        "translate the model into resources".into(),
        format!("{:.1} ms", t.elapsed().as_secs_f64() * 1e3),
    ));
    let push = tokio::runtime::Runtime::new()?.block_on(push_latency(derived))?;
    rows.push((format!("xDS push of one changed workload, translated → applied at the agent's store (median of {SINGLE_CHANGES})"), format!("{push:.2} ms")));

    eprintln!("bench-xds: 2 agents and the control plane in the simulated cluster...");
    let c = Cluster::new(ClusterSpec {
        nodes: 2,
        pods_per_node: 0,
        control_plane: true,
        ..Default::default()
    })?;
    let agents: Vec<u32> = c.nodes.iter().map(|n| n.agent_pid().unwrap()).collect();
    let cp = c.control_plane_pid().context("control plane pid")?;
    std::thread::sleep(Duration::from_millis(500));
    let agent_idle: Vec<u64> = agents
        .iter()
        .map(|&p| rss_kib(p))
        .collect::<Result<_, _>>()?;
    let cp_idle = rss_kib(cp)?;

    let resources = |n: usize, t: &str| -> f64 {
        c.metrics(n)
            .ok()
            .and_then(|m| metric_value(&m, "ambit_xds_resources", &[("type_url", t)]))
            .unwrap_or(0.0)
    };
    let t = Instant::now();
    c.write_mesh(&yaml)?;
    while !(1..=2).all(|n| {
        resources(n, WORKLOAD) == WORKLOADS as f64 && resources(n, SERVICE) == SERVICES as f64
    }) {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(120),
            "agents did not get the mesh in 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let full = t.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let agent_loaded: Vec<u64> = agents
        .iter()
        .map(|&p| rss_kib(p))
        .collect::<Result<_, _>>()?;
    let cp_loaded = rss_kib(cp)?;

    // How long one look at both agents' ACK counters takes: the resolution of the
    // change latency below.
    let mut polls = Vec::new();
    for _ in 0..SINGLE_CHANGES {
        let t = Instant::now();
        for n in 1..=2 {
            let m = c.metrics(n)?;
            anyhow::ensure!(metric_value(&m, "ambit_xds_acks_total", &[]).is_some());
        }
        polls.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut single = Vec::new();
    for v in 1..=SINGLE_CHANGES {
        let text = mesh(v);
        let took = c.time_until_acked(|| c.write_mesh(&text))?;
        single.push(took.as_secs_f64() * 1e3);
    }

    rows.push((
        format!("file change → both agents hold all {WORKLOADS} workloads and {SERVICES} services"),
        format!("{:.0} ms", full.as_secs_f64() * 1e3),
    ));
    rows.push((
        "one look at both agents' ACK counters (the resolution of the next row; median)".into(),
        format!("{:.1} ms", median(polls)),
    ));
    rows.push((
        format!("one workload changed in the file → both agents ACKed (median of {SINGLE_CHANGES}; the file is re-read whole and re-parsed incrementally)"),
        format!("{:.0} ms", median(single)),
    ));
    for (i, (idle, loaded)) in agent_idle.iter().zip(&agent_loaded).enumerate() {
        rows.push((
            format!(
                "agent {} memory per workload (RSS growth / {WORKLOADS}; services included)",
                i + 1
            ),
            format!(
                "{:.0} bytes ({:.1} → {:.1} MiB)",
                (loaded - idle) as f64 * 1024.0 / WORKLOADS as f64,
                *idle as f64 / 1024.0,
                *loaded as f64 / 1024.0
            ),
        ));
    }
    rows.push((
        "control plane RSS, idle → with the mesh and 2 streams".into(),
        format!(
            "{:.1} → {:.1} MiB",
            cp_idle as f64 / 1024.0,
            cp_loaded as f64 / 1024.0
        ),
    ));

    println!(
        "\n## Ambit control-plane bench ({WORKLOADS} workloads, {SERVICES} services, {NAMESPACES} namespaces, {NODES} nodes)\n"
    );
    println!("| measurement | value |");
    println!("|---|---:|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    Ok(())
}

/// Publishes a snapshot with one workload changed and times until an in-process agent
/// store applied it.
async fn push_latency(mut derived: Derived) -> anyhow::Result<f64> {
    let mut model = derived.model().clone();
    let mut snapshot = Arc::new(Snapshot::from_model(&model));
    let (tx, rx) = tokio::sync::watch::channel(snapshot.clone());
    let server = AdsServer::new(rx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server.into_service())
            .serve_with_incoming(ambit_control_plane::incoming(listener)),
    );
    let store = Arc::new(Store::new("node-1"));
    let config = XdsClientConfig {
        control_plane: ambit_xds::channel::ControlPlane::new(
            &format!("http://{addr}"),
            None,
            None,
        )?,
        node_id: "node-1".into(),
        types: NODE_AGENT.to_vec(),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_secs(1),
    };
    let client = XdsClient::spawn(config, StoreHandler::new(store.clone()));
    let t = Instant::now();
    while !client.status.synced(&NODE_AGENT) {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "in-process client did not sync"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut times = Vec::new();
    // (The derived model is of variant 1 already.)
    for v in 2..SINGLE_CHANGES + 2 {
        let next_model = derived
            .next(Path::new("b.yaml"), &mesh(v))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut changes = store.changes();
        changes.mark_unchanged();
        // As the control plane does it: translated reusing the last snapshot.
        let t = Instant::now();
        snapshot = Arc::new(Snapshot::from_model_reusing(
            &next_model,
            Some((&model, &snapshot)),
        ));
        model = next_model;
        tx.send(snapshot.clone())?;
        tokio::time::timeout(Duration::from_secs(10), changes.changed()).await??;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}
