//! End-to-end tests of the control plane driving node agents over xDS, in the simulated
//! cluster (run as root: `cargo xtask test`).

use std::time::Duration;

use ambit_tests::{Cluster, ClusterSpec, MeshSource, Pod, wait_until};
use serde_json::Value;

fn cluster() -> Cluster {
    Cluster::new(ClusterSpec {
        control_plane: true,
        ..Default::default()
    })
    .unwrap()
}

fn all_pods(c: &Cluster) -> Vec<&Pod> {
    c.nodes.iter().flat_map(|n| &n.pods).collect()
}

/// uid → captured, as node `n`'s agent reports its known pods.
fn captured(c: &Cluster, n: usize) -> Vec<(String, bool)> {
    c.enroll_client(n)
        .unwrap()
        .list()
        .unwrap()
        .into_iter()
        .map(|p| (p.spec.uid, p.captured))
        .collect()
}

fn all_captured(c: &Cluster, want: bool) -> bool {
    c.nodes
        .iter()
        .all(|n| captured(c, n.index).iter().all(|(_, cap)| *cap == want))
}

/// Echo through the pod, returns whether the agent proxied it.
fn goes_through_agent(c: &Cluster, from: &Pod, to: &Pod) -> bool {
    let args = ["--connect", &format!("{}:8080", to.ip4), "--bytes", "10000"].map(String::from);
    let (ok, r) = c.run_client(from, &args).unwrap();
    assert!(ok, "{r:?}");
    // Whole addresses, not ports: the agent's socket may get the client's ephemeral port.
    let addr = |k: &str| {
        let a: std::net::SocketAddr = r[0][k].as_str().unwrap().parse().unwrap();
        (a.ip().to_canonical(), a.port())
    };
    addr("local") != addr("server_peer")
}

fn store_workloads(c: &Cluster, n: usize) -> Vec<String> {
    let dump = c.config_dump(n).unwrap();
    dump["mesh"]["workloads"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn namespace_label_enrolls_and_releases_pods_on_both_nodes() {
    let c = cluster();
    let _srv = c
        .start_server(c.pod(2, 0), &[format!("{}:8080", c.pod(2, 0).ip4)])
        .unwrap();
    for p in all_pods(&c) {
        c.enroll(p).unwrap(); // the CNI's part: the agent now knows the pod's netns
    }
    wait_until("agents synced", Duration::from_secs(10), || {
        c.nodes
            .iter()
            .all(|n| c.config_dump(n.index).unwrap()["xds"]["connected"] == true)
    });
    assert!(
        all_captured(&c, false),
        "captured before the control plane said so"
    );
    assert!(!goes_through_agent(&c, c.pod(1, 0), c.pod(2, 0)));

    c.write_mesh(&c.mesh_yaml(true)).unwrap();
    let took = wait_until(
        "pods enrolled on both nodes",
        Duration::from_secs(10),
        || all_captured(&c, true),
    );
    eprintln!(
        "namespace labelled: all pods enrolled on both nodes after {:.1} ms",
        took.as_secs_f64() * 1e3
    );
    assert!(goes_through_agent(&c, c.pod(1, 0), c.pod(2, 0)));

    c.write_mesh(&c.mesh_yaml(false)).unwrap();
    let took = wait_until(
        "pods released on both nodes",
        Duration::from_secs(10),
        || all_captured(&c, false),
    );
    eprintln!(
        "label removed: all pods released on both nodes after {:.1} ms",
        took.as_secs_f64() * 1e3
    );
    assert!(!goes_through_agent(&c, c.pod(1, 0), c.pod(2, 0)));
}

#[test]
fn an_invalid_edit_keeps_the_last_good_model_and_a_fix_applies() {
    let c = cluster();
    for p in all_pods(&c) {
        c.enroll(p).unwrap();
    }
    c.write_mesh(&c.mesh_yaml(true)).unwrap();
    wait_until("enrolled", Duration::from_secs(10), || {
        all_captured(&c, true)
    });

    // Unlabel the namespace but also break the file: nothing of it may apply.
    let broken = c.mesh_yaml(false).replace("node: node-2", "node: node-9");
    c.write_mesh(&broken).unwrap();
    wait_until("the error is reported", Duration::from_secs(10), || {
        c.control_plane_log().contains("node-9")
    });
    let log = c.control_plane_log();
    let line = log.lines().find(|l| l.contains("node-9")).unwrap();
    assert!(
        line.contains("mesh.yaml") && line.contains("is not defined under nodes"),
        "{line}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        all_captured(&c, true),
        "a rejected file changed what agents do"
    );

    c.write_mesh(&c.mesh_yaml(false)).unwrap();
    wait_until("the fix applies", Duration::from_secs(10), || {
        all_captured(&c, false)
    });
}

#[test]
fn agents_keep_serving_without_the_control_plane_and_converge_when_it_returns() {
    let c = cluster();
    let (client, server) = (c.pod(1, 0), c.pod(2, 0));
    let _srv = c
        .start_server(server, &[format!("{}:8080", server.ip4)])
        .unwrap();
    for p in all_pods(&c) {
        c.enroll(p).unwrap();
    }
    c.write_mesh(&c.mesh_yaml(true)).unwrap();
    wait_until("enrolled", Duration::from_secs(10), || {
        all_captured(&c, true)
    });
    // Serving without the control plane needs the certificates it issued first: one per
    // pod (each has its own service account).
    wait_until("certificates issued", Duration::from_secs(10), || {
        c.nodes
            .iter()
            .all(|n| certificates(&c, n.index).len() == n.pods.len())
    });

    c.stop_control_plane(libc::SIGKILL).unwrap();
    wait_until("agents notice", Duration::from_secs(10), || {
        c.nodes
            .iter()
            .all(|n| c.config_dump(n.index).unwrap()["xds"]["connected"] == false)
    });
    assert!(
        goes_through_agent(&c, client, server),
        "capture stopped with the control plane gone"
    );
    assert_eq!(
        store_workloads(&c, 1).len(),
        4,
        "the agent dropped its state"
    );

    // Change the mesh while it is down: remove a workload of node 2.
    let gone = c.pod(2, 1);
    let without: String = c
        .mesh_yaml(true)
        .lines()
        .filter(|l| !l.contains(&gone.uid))
        .map(|l| format!("{l}\n"))
        .collect();
    c.write_mesh(&without).unwrap();
    c.start_control_plane().unwrap();
    let took = wait_until(
        "agents reconnect and converge",
        Duration::from_secs(30),
        || {
            c.nodes.iter().all(|n| {
                let d = c.config_dump(n.index).unwrap();
                d["xds"]["connected"] == true && !store_workloads(&c, n.index).contains(&gone.uid)
            })
        },
    );
    eprintln!(
        "control plane restarted: agents converged after {:.0} ms",
        took.as_secs_f64() * 1e3
    );
    let d: Value = c.config_dump(1).unwrap();
    assert!(d["xds"]["connects"].as_u64().unwrap() >= 2, "{d}");
    // The mesh no longer describes the pod, but it still runs in an enrolled namespace:
    // it stays captured (fail closed, as a pod the control plane has not described yet),
    // until the enrollment API releases it (the CNI plugin's DEL) or its namespace is
    // opted out.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        captured(&c, 2)
            .iter()
            .any(|(uid, cap)| *uid == gone.uid && *cap),
        "a pod of an enrolled namespace was released because the mesh stopped naming it"
    );
    c.write_mesh(&without.replace("labels: {ambit.dev/dataplane: ambient}", "labels: {}"))
        .unwrap();
    wait_until(
        "opted-out namespace released",
        Duration::from_secs(10),
        || {
            captured(&c, 2)
                .iter()
                .any(|(uid, cap)| *uid == gone.uid && !cap)
        },
    );
    assert!(
        !goes_through_agent(&c, client, server),
        "the namespace is opted out but its pods are still captured"
    );
}

#[test]
fn delta_removal_reaches_every_agents_store() {
    let c = cluster();
    // Every node knows every workload (enrolled or not).
    wait_until("synced", Duration::from_secs(10), || {
        store_workloads(&c, 1).len() == 4 && store_workloads(&c, 2).len() == 4
    });
    let gone = c.pod(1, 1);
    let without: String = c
        .mesh_yaml(false)
        .lines()
        .filter(|l| !l.contains(&gone.uid))
        .map(|l| format!("{l}\n"))
        .collect();
    c.write_mesh(&without).unwrap();
    wait_until(
        "removed from both nodes' stores",
        Duration::from_secs(10),
        || (1..=2).all(|n| !store_workloads(&c, n).contains(&gone.uid)),
    );
    assert_eq!(store_workloads(&c, 2).len(), 3);
    let dump = c.config_dump(1).unwrap();
    assert_eq!(dump["xds"]["nacks"], 0, "{dump}");
}

/// (identity, serial, not_after) of node `n`'s certificates.
fn certificates(c: &Cluster, n: usize) -> Vec<(String, String, u64)> {
    let d = c.config_dump(n).unwrap();
    d["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["identity"].as_str().unwrap().to_owned(),
                c["serial"].as_str().unwrap().to_owned(),
                c["not_after"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn agents_get_certificates_for_their_own_identities_and_renew_before_expiry() {
    let c = Cluster::new(ClusterSpec {
        control_plane: true,
        agent_args: vec!["--cert-ttl=4s".into()],
        ..Default::default()
    })
    .unwrap();
    for p in all_pods(&c) {
        c.enroll(p).unwrap();
    }
    c.write_mesh(&c.mesh_yaml(true)).unwrap();
    let id = |p: &Pod| format!("spiffe://cluster.local/ns/default/sa/{}", p.name);
    let mine: Vec<String> = c.node(1).pods.iter().map(id).collect();
    wait_until(
        "node 1 has certificates for its identities",
        Duration::from_secs(10),
        || {
            certificates(&c, 1)
                .iter()
                .map(|(i, ..)| i.clone())
                .collect::<Vec<_>>()
                == mine
        },
    );
    // Node-scoped: node 2's identities are node 2's business.
    let theirs: Vec<String> = c.node(2).pods.iter().map(id).collect();
    wait_until("node 2 has its own", Duration::from_secs(10), || {
        certificates(&c, 2)
            .iter()
            .map(|(i, ..)| i.clone())
            .collect::<Vec<_>>()
            == theirs
    });

    let (ident, serial, not_after) = certificates(&c, 1)[0].clone();
    let renewed = wait_until("renewal", Duration::from_secs(10), || {
        certificates(&c, 1)
            .iter()
            .any(|(i, s, _)| *i == ident && *s != serial)
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        now < not_after,
        "renewed only after the old certificate expired ({now} >= {not_after})"
    );
    eprintln!(
        "4 s certificate renewed {:.1} s after it was first seen",
        renewed.as_secs_f64()
    );
    assert_eq!(c.config_dump(1).unwrap()["xds"]["nacks"], 0);
}

#[test]
fn kube_namespace_label_enrolls_running_pods_on_every_node_and_a_pod_can_opt_out() {
    let c = Cluster::new(ClusterSpec {
        control_plane: true,
        source: MeshSource::Kubernetes,
        ..Default::default()
    })
    .unwrap();
    let (client, server) = (c.pod(1, 0), c.pod(2, 0));
    let _srv = c
        .start_server(server, &[format!("{}:8080", server.ip4)])
        .unwrap();
    for p in all_pods(&c) {
        c.enroll(p).unwrap(); // the CNI's part: the agent now knows the pod's netns
    }
    wait_until("agents synced", Duration::from_secs(10), || {
        c.nodes
            .iter()
            .all(|n| store_workloads(&c, n.index).len() == 4)
    });
    assert!(all_captured(&c, false), "captured before the label");

    // `kubectl label namespace default ambit.dev/dataplane=ambient`: a MODIFIED event.
    c.api().apply(c.kube_namespace(true));
    let took = wait_until(
        "pods enrolled on both nodes",
        Duration::from_secs(10),
        || all_captured(&c, true),
    );
    eprintln!(
        "kube: namespace labelled: all pods enrolled on both nodes after {:.1} ms",
        took.as_secs_f64() * 1e3
    );
    assert!(goes_through_agent(&c, client, server));
    // Across nodes, so through HBONE: both agents hold certificates, issued on the
    // strength of their pod-bound ServiceAccount tokens (TokenReview).
    for n in &c.nodes {
        let dump = c.config_dump(n.index).unwrap();
        assert!(
            !dump["certificates"].as_array().unwrap().is_empty(),
            "node {}: {dump}",
            n.index
        );
    }
    assert!(c.api().token_reviews() > 0);

    // The server pod opts out (`ambit.dev/dataplane=none` on the pod).
    let mut pod = c
        .kube_objects(true)
        .into_iter()
        .find(|o| o["metadata"]["uid"] == server.uid.as_str())
        .unwrap();
    pod["metadata"]["labels"]["ambit.dev/dataplane"] = "none".into();
    c.api().apply(pod);
    wait_until(
        "the opted-out pod is released",
        Duration::from_secs(10),
        || {
            captured(&c, 2)
                .iter()
                .any(|(uid, cap)| *uid == server.uid && !cap)
        },
    );
    assert!(captured(&c, 1).iter().all(|(_, cap)| *cap));

    c.api().apply(c.kube_namespace(false));
    let took = wait_until(
        "pods released on both nodes",
        Duration::from_secs(10),
        || all_captured(&c, false),
    );
    eprintln!(
        "kube: label removed: all pods released on both nodes after {:.1} ms",
        took.as_secs_f64() * 1e3
    );
    assert!(!goes_through_agent(&c, client, server));
    assert_eq!(c.config_dump(1).unwrap()["xds"]["nacks"], 0);
}

#[test]
fn kube_pods_running_before_the_agent_started_are_found_through_their_cgroups() {
    let c = Cluster::new(ClusterSpec {
        control_plane: true,
        source: MeshSource::Kubernetes,
        agents: false,
        ..Default::default()
    })
    .unwrap();
    c.api().apply(c.kube_namespace(true));
    // Both pods run before there is an agent (Ambit installed on a busy cluster); no CNI
    // call ever announces them.
    let (client, server) = (c.pod(1, 0), c.pod(2, 0));
    let _srv = c
        .start_server(server, &[format!("{}:8080", server.ip4)])
        .unwrap();
    let _other = c
        .start_server(client, &[format!("{}:8081", client.ip4)])
        .unwrap();
    for n in 1..=2 {
        c.start_agent(n).unwrap();
    }
    let took = wait_until(
        "the running pods are captured",
        Duration::from_secs(10),
        || {
            [(1, client), (2, server)]
                .iter()
                .all(|(n, p)| captured(&c, *n).contains(&(p.uid.clone(), true)))
        },
    );
    eprintln!(
        "kube: running pods found and captured {:.0} ms after the agents were ready",
        took.as_secs_f64() * 1e3
    );
    // The pods without a process (nothing to find a namespace through) are not.
    assert!(
        !captured(&c, 1)
            .iter()
            .any(|(uid, _)| *uid == c.pod(1, 1).uid)
    );
    assert!(goes_through_agent(&c, client, server));
}
