//! `cargo xtask bench k8s`: the control plane's Kubernetes source at scale, through the
//! API server stand-in: 10,000 pods and 1,000 services in 100 enrolled namespaces on 50
//! nodes, served to two real node agents in the simulated cluster. Reported, never
//! asserted.
//!
//! - created → held: the objects are created one by one (watch events), until both
//!   agents hold every workload and service;
//! - initial sync: a control-plane restart with all of it in the API, until it serves the
//!   whole mesh again (its `ambit_mesh_workloads`);
//! - one pod's labels changed → both agents ACKed the update (median of 7);
//! - the control plane's memory.

use std::time::{Duration, Instant};

use ambit_tests::cluster::metric_value;
use ambit_tests::{Cluster, ClusterSpec, MeshSource, median, rss_kib};
use ambit_xds::type_url::{SERVICE, WORKLOAD};
use anyhow::Context;
use serde_json::{Value, json};

const PODS: usize = 10_000;
const SERVICES: usize = 1_000;
const NAMESPACES: usize = 100;
const NODES: usize = 50;
const SINGLE_CHANGES: usize = 7;

fn pod(i: usize, version: usize) -> Value {
    let ns = format!("ns-{}", i % NAMESPACES);
    let node = format!("node-{}", i % NODES + 1);
    let ip = format!("10.200.{}.{}", i / 250, i % 250 + 1);
    let app = format!("app-{}", (i / NAMESPACES) % (SERVICES / NAMESPACES));
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": format!("pod-{i}"), "namespace": ns, "uid": format!("bench-uid-{i}"),
                        "labels": {"app": app, "version": format!("v{version}")}},
           "spec": {"nodeName": node, "serviceAccountName": app,
                    "containers": [{"name": "app", "image": "app",
                                    "ports": [{"name": "http", "containerPort": 8080}]}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn service(j: usize) -> Value {
    let ns = format!("ns-{}", j % NAMESPACES);
    let app = format!("app-{}", j / NAMESPACES);
    let vip = format!("10.97.{}.{}", j / 250, j % 250 + 1);
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": app, "namespace": ns},
           "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": {"app": app},
                    "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
}

fn main() -> anyhow::Result<()> {
    ambit_tests::require_root();
    let c = Cluster::new(ClusterSpec {
        nodes: 2,
        pods_per_node: 0,
        control_plane: true,
        source: MeshSource::Kubernetes,
        ..Default::default()
    })?;
    let api = c.api();
    let resources = |n: usize, t: &str| -> f64 {
        c.metrics(n)
            .ok()
            .and_then(|m| metric_value(&m, "ambit_xds_resources", &[("type_url", t)]))
            .unwrap_or(0.0)
    };
    let cp_metric = |name: &str| -> f64 {
        c.http_get(1, "172.18.0.254:15014", "/metrics")
            .ok()
            .and_then(|(_, body)| metric_value(&body, name, &[]))
            .unwrap_or(-1.0)
    };
    let cp_idle = rss_kib(c.control_plane_pid().context("control plane pid")?)?;
    let agents_have_all = || {
        (1..=2).all(|n| {
            resources(n, WORKLOAD) == PODS as f64 && resources(n, SERVICE) == SERVICES as f64
        })
    };

    eprintln!("bench-k8s: creating {PODS} pods and {SERVICES} services...");
    let t = Instant::now();
    for n in 3..=NODES {
        api.apply(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n}")}}),
        );
    }
    for k in 0..NAMESPACES {
        api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": format!("ns-{k}"), "labels": {"ambit.dev/dataplane": "ambient"}}}));
    }
    for j in 0..SERVICES {
        api.apply(service(j));
        // Its pods' ServiceAccount (pods of service j run as its app).
        api.apply(ambit_tests::cluster::service_account(
            &format!("ns-{}", j % NAMESPACES),
            &format!("app-{}", j / NAMESPACES),
        ));
    }
    for i in 0..PODS {
        api.apply(pod(i, 0));
    }
    let created = t.elapsed();
    while !agents_have_all() {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(180),
            "agents did not get the mesh in 180 s: they hold {:?} workloads and {:?} services; the control plane serves {} workloads\n{}",
            (1..=2).map(|n| resources(n, WORKLOAD)).collect::<Vec<_>>(),
            (1..=2).map(|n| resources(n, SERVICE)).collect::<Vec<_>>(),
            cp_metric("ambit_mesh_workloads"),
            c.control_plane_log()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let held = t.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let cp_loaded = rss_kib(c.control_plane_pid().context("control plane pid")?)?;

    eprintln!("bench-k8s: one pod changed, {SINGLE_CHANGES} times...");
    let mut single = Vec::new();
    for v in 1..=SINGLE_CHANGES {
        let took = c.time_until_acked(|| {
            api.apply(pod(v * 37, v));
            Ok(())
        })?;
        single.push(took.as_secs_f64() * 1e3);
    }
    let spread = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        format!("{lo:.0}–{hi:.0}")
    };

    eprintln!("bench-k8s: control-plane restart (initial sync)...");
    c.stop_control_plane(libc::SIGTERM)?;
    let t = Instant::now();
    c.start_control_plane()?;
    while cp_metric("ambit_mesh_workloads") != PODS as f64 {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(180),
            "the restarted control plane did not sync in 180 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let sync = t.elapsed();

    println!(
        "\n## Ambit Kubernetes-source bench ({PODS} pods, {SERVICES} services, {NAMESPACES} namespaces, {NODES} nodes, 2 agents; API stand-in)\n"
    );
    println!("| measurement | value |");
    println!("|---|---:|");
    println!(
        "| objects created one by one (watch events; creating took {:.0} ms) → both agents hold every workload and service | {:.0} ms |",
        created.as_secs_f64() * 1e3,
        held.as_secs_f64() * 1e3
    );
    println!(
        "| initial sync: control plane (re)started with all of it in the API → serving the whole mesh (LIST of every kind, model, TLS up) | {:.0} ms |",
        sync.as_secs_f64() * 1e3
    );
    println!(
        "| one pod's labels changed → both agents ACKed (median of {SINGLE_CHANGES}, range {}; goal < 20 ms) | {:.1} ms |",
        spread(&single),
        median(single.clone())
    );
    println!(
        "| control plane RSS, empty cluster → with the mesh and 2 streams | {:.1} → {:.1} MiB |",
        cp_idle as f64 / 1024.0,
        cp_loaded as f64 / 1024.0
    );
    Ok(())
}
