//! Memory under xDS churn (run as root: `cargo xtask test`): with a long-lived tunnel
//! held open across both agents, 200 updates of a 10,000-workload mesh, together
//! replacing every workload once, leave each agent's RSS within a small bound of its
//! value after the first sync. Before the state was made of shared pieces, every update
//! deep-copied the whole mesh and each version a live connection had started under stayed
//! in memory.

use std::time::{Duration, Instant};

use ambit_tests::cluster::metric_value;
use ambit_tests::synthetic::SyntheticMesh;
use ambit_tests::{Cluster, ClusterSpec, rss_kib, wait_until};
use ambit_xds::type_url::WORKLOAD;

const WORKLOADS: usize = 10_000;
const UPDATES: usize = 200;
/// Workloads changed by each update: together the updates replace every workload once.
const PER_UPDATE: usize = WORKLOADS / UPDATES;

fn metric(c: &Cluster, n: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
    c.metrics(n)
        .ok()
        .and_then(|m| metric_value(&m, name, labels))
        .unwrap_or(0.0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[test]
fn two_hundred_updates_of_a_10k_workload_mesh_keep_agent_memory_flat_under_a_held_tunnel() {
    ambit_tests::require_root();
    let c = Cluster::new(ClusterSpec {
        control_plane: true,
        ..Default::default()
    })
    .unwrap();
    for p in c.nodes.iter().flat_map(|n| &n.pods) {
        c.enroll(p).unwrap();
    }
    let pods = c.nodes.iter().map(|n| n.pods.len()).sum::<usize>();
    let agents: Vec<u32> = c.nodes.iter().map(|n| n.agent_pid().unwrap()).collect();
    let rss = || -> Vec<u64> { agents.iter().map(|&p| rss_kib(p).unwrap()).collect() };
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss();

    // The cluster's own pods (enrolled) plus 10k remote workloads on made-up nodes.
    let shape = SyntheticMesh {
        workloads: WORKLOADS,
        services: 1_000,
        namespaces: 100,
        nodes: 48,
        first_node: 3,
    };
    let base = c.mesh_yaml(true);
    let version = |v: Option<usize>| {
        shape.yaml(&base, |i| {
            let slice = i / PER_UPDATE;
            v.filter(|&v| slice <= v).map(|_| format!("r{slice}"))
        })
    };
    c.write_mesh(&version(None)).unwrap();
    let all = (WORKLOADS + pods) as f64;
    wait_until(
        "both agents hold the whole mesh and their pods' certificates",
        Duration::from_secs(120),
        || {
            (1..=2).all(|n| {
                metric(&c, n, "ambit_xds_resources", &[("type_url", WORKLOAD)]) == all
                    && c.config_dump(n).unwrap()["certificates"]
                        .as_array()
                        .is_some_and(|a| a.len() >= 2)
            })
        },
    );

    // A tunnel held open from node 1 to node 2 for the whole run.
    let (from, to) = (c.pod(1, 0), c.pod(2, 0));
    let _srv = c.start_server(to, &[format!("{}:8080", to.ip4)]).unwrap();
    let mut held = c
        .spawn_in_pod(
            from,
            &[
                "client",
                "--connect",
                &format!("{}:8080", to.ip4),
                "--bytes",
                "100000",
                "--hold",
                "--timeout",
                "600",
            ]
            .map(String::from),
        )
        .unwrap();
    held.wait_for_line("connected").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let first = rss();

    let started = Instant::now();
    for v in 0..UPDATES {
        let acks: Vec<f64> = (1..=2)
            .map(|n| metric(&c, n, "ambit_xds_acks_total", &[]))
            .collect();
        c.write_mesh(&version(Some(v))).unwrap();
        wait_until(
            &format!("update {v} ACKed by both agents"),
            Duration::from_secs(30),
            || (1..=2).all(|n| metric(&c, n, "ambit_xds_acks_total", &[]) > acks[n - 1]),
        );
    }
    let churn = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let after = rss();

    // Every workload was replaced, none lost, and the tunnel survived all of it.
    for n in 1..=2 {
        assert_eq!(
            metric(&c, n, "ambit_xds_resources", &[("type_url", WORKLOAD)]),
            all
        );
        let dump = c.config_dump(n).unwrap();
        // w-9999 is in ns-99; remote workloads keep only their derived canonical names.
        let w = dump["mesh"]["workloads"]["ns-99/w-9999"]["canonical"]["revision"].clone();
        assert_eq!(w, format!("r{}", UPDATES - 1), "node {n}: {w}");
    }
    held.write_line("go").unwrap();
    let (status, _) = held.finish(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "the held tunnel broke during the churn");

    for (i, ((idle, first), after)) in idle.iter().zip(&first).zip(&after).enumerate() {
        let mesh = first.saturating_sub(*idle);
        let growth = after.saturating_sub(*first);
        eprintln!(
            "agent {}: RSS idle {:.1} MiB, after the first sync {:.1} MiB (mesh {:.1} MiB), after {UPDATES} updates in {:.1} s {:.1} MiB (+{:.1} MiB)",
            i + 1,
            mib(*idle),
            mib(*first),
            mib(mesh),
            churn.as_secs_f64(),
            mib(*after),
            mib(growth)
        );
        // A retained copy of the mesh would be +100%; allocator slack stays far below.
        assert!(
            growth <= (mesh / 4).max(4 * 1024),
            "agent {}: RSS grew {:.1} MiB over {UPDATES} updates (the mesh is {:.1} MiB)",
            i + 1,
            mib(growth),
            mib(mesh)
        );
    }
}
