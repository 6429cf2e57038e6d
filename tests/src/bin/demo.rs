//! `cargo xtask demo`: a 2-node simulated cluster configured by Ambit's control plane
//! from `examples/mesh.yaml` (file source). Agents learn from it which pods are enrolled
//! and get their workloads' certificates from its CA. Pods send traffic across nodes,
//! pod to pod and through a service VIP, inside mutual TLS (HBONE) where both ends are in
//! the mesh; the demo shows a plaintext caller refused (STRICT), a policy edit denying a
//! caller, then the L7 half: a waypoint routing the `reviews` service (a 90/10 canary over
//! 200 requests, a header-matched route, retries hiding a flaky pod, a route timeout,
//! Istio's request metrics and its access log); then Istio's TCP metrics, access-log
//! lines, what was captured, each workload's counters and the certificates, then a
//! namespace being released by editing the file, and removes everything (also on Ctrl-C).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_mesh::enroll::PodSpec;
use ambit_tests::cluster::{metric_sum, metric_value};
use ambit_tests::{Cluster, ClusterSpec, Pod};

const MESH: &str = include_str!("../../../examples/mesh.yaml");

/// A workload of the example file, and the simulated pod that plays it.
struct Cast<'a> {
    pod: &'a Pod,
    uid: String,
    namespace: String,
    name: String,
}

fn main() -> anyhow::Result<()> {
    ambit_tests::require_root();
    println!("Ambit demo: a 2-node cluster in network namespaces, a node agent per node, and the");
    println!(
        "control plane serving examples/mesh.yaml over xDS (and its CA issuing certificates)..."
    );
    let cluster = Arc::new(Cluster::new(ClusterSpec {
        control_plane: true,
        pods_per_node: 4,
        ..Default::default()
    })?);
    cleanup_on_signal(cluster.clone());
    let c = &*cluster;
    c.write_mesh(MESH)?;

    // The CNI's part: tell each node's agent about its pods (uid, names, netns, IPs). The
    // control plane decides which of them are enrolled.
    let cast = cast(c)?;
    for w in &cast {
        let spec = PodSpec {
            uid: w.uid.clone(),
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            netns: w.pod.netns_path().display().to_string(),
            ips: vec![w.pod.ip4.into(), w.pod.ip6.into()],
        };
        c.enroll_client(w.pod.node)?.add(spec)?;
    }
    let by_name = |n: &str| {
        cast.iter()
            .find(|w| w.name == n)
            .expect("in examples/mesh.yaml")
    };
    let (frontend, batch, web0, web1) = (
        by_name("frontend-0"),
        by_name("batch-0"),
        by_name("web-0"),
        by_name("web-1"),
    );
    wait(
        "agents enrolled what the mesh says",
        Duration::from_secs(15),
        || captured(c, frontend) && captured(c, web0) && certs(c, 1) > 0 && certs(c, 2) > 0,
    )?;

    println!();
    for node in &c.nodes {
        let dump = c.config_dump(node.index)?;
        println!(
            "node-{}  {}  agent pid {}  xDS: {}, {} workloads known",
            node.index,
            node.ip4,
            node.agent_pid().unwrap_or(0),
            if dump["xds"]["connected"] == true {
                "connected"
            } else {
                "NOT connected"
            },
            dump["mesh"]["workloads"].as_object().map_or(0, |m| m.len()),
        );
        for w in cast.iter().filter(|w| w.pod.node == node.index) {
            let state = if captured(c, w) {
                "enrolled (captured)"
            } else {
                "not enrolled"
            };
            println!(
                "  {:<18} {:<13} {}",
                format!("{}/{}", w.namespace, w.name),
                w.pod.ip4,
                state
            );
        }
    }

    let _srv_web = c.start_server(
        web0.pod,
        &[
            format!("{}:8080", web0.pod.ip4),
            format!("[{}]:8080", web0.pod.ip6),
        ],
    )?;
    let _srv_batch = c.start_server(batch.pod, &[format!("{}:9090", batch.pod.ip4)])?;
    let _srv_web1 = c.start_server(web1.pod, &[format!("{}:8080", web1.pod.ip4)])?;
    println!("\nTraffic (each connection echoes 1 MB and checks every byte):");
    println!(
        "  {:<18} {:<28} {:<8} HOW IT ARRIVED (as the server saw it)",
        "FROM", "TO", "RESULT"
    );
    for (from, to) in [
        (frontend, format!("{}:8080", web0.pod.ip4)),
        (frontend, format!("[{}]:8080", web0.pod.ip6)),
        (frontend, "10.96.0.10:80".to_string()),
        (frontend, "10.96.0.10:80".to_string()),
        (batch, format!("{}:8080", web0.pod.ip4)),
        (web0, format!("{}:9090", batch.pod.ip4)),
        (web1, format!("{}:9090", batch.pod.ip4)),
    ] {
        traffic(c, from, &to)?;
    }
    println!("  (frontend → web: mutual TLS between the agents, HBONE; the VIP alternates between");
    println!("   web-0, tunnelled, and web-1, which opted out and is dialed directly. batch-0 is");
    println!("   outside the mesh: web-0 is STRICT, so its plaintext is refused.)");

    println!("\nEditing the mesh file: a DENY policy for frontend's identity on web...");
    let deny = "  - name: deny-frontend\n    namespace: shop\n    selector: {app: web}\n    action: DENY\n    rules:\n      - from:\n          - principals: [cluster.local/ns/shop/sa/frontend]\n";
    c.write_mesh(&format!("{MESH}{deny}"))?;
    wait("policy applied", Duration::from_secs(15), || {
        c.config_dump(2)
            .map(|d| d["mesh"]["authorizations"]["shop/deny-frontend"].is_object())
            .unwrap_or(false)
    })?;
    traffic(c, frontend, &format!("{}:8080", web0.pod.ip4))?;
    c.write_mesh(MESH)?;

    let l7_processes = l7(c, &by_name)?;

    println!(
        "\nIstio's standard TCP metrics (GET /metrics on node-2's agent, reporter=destination):"
    );
    println!(
        "  {:<49} {:<13} {:<11} {:>6} {:>10}",
        "SOURCE PRINCIPAL", "DESTINATION", "SECURITY", "CONNS", "BYTES IN"
    );
    for line in c.metrics(2)?.lines() {
        if !line.starts_with("istio_tcp_connections_opened_total{")
            || !line.contains("reporter=\"destination\"")
        {
            continue;
        }
        let label = |k: &str| label_of(line, k);
        let labels: Vec<(&str, String)> = [
            "source_principal",
            "destination_workload",
            "connection_security_policy",
        ]
        .iter()
        .map(|k| (*k, label(k)))
        .collect();
        let want: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let bytes =
            metric_value(&c.metrics(2)?, "istio_tcp_received_bytes_total", &want).unwrap_or(0.0);
        println!(
            "  {:<49} {:<13} {:<11} {:>6} {:>10}",
            labels[0].1,
            labels[1].1,
            labels[2].1,
            line.rsplit(' ').next().unwrap_or("?"),
            bytes
        );
    }
    let m2 = c.metrics(2)?;
    println!(
        "  refused inbound on node-2: STRICT (plaintext) {}, by policy {}",
        metric_value(
            &m2,
            "ambit_inbound_refused_total",
            &[("reason", "strict_mtls")]
        )
        .unwrap_or(0.0),
        metric_value(
            &m2,
            "ambit_inbound_refused_total",
            &[("reason", "policy_denied")]
        )
        .unwrap_or(0.0)
    );

    println!(
        "\nnode-2's access log (one JSON line per connection, on the agent's stdout), last 3:"
    );
    let log = std::fs::read_to_string(c.node(2).agent_log()).unwrap_or_default();
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with('{')).collect();
    for l in lines.iter().skip(lines.len().saturating_sub(3)) {
        println!("  {l}");
    }

    for node in &c.nodes {
        println!(
            "\nWhat node-{}'s agent captured (GET /debug/connections on its admin port):",
            node.index
        );
        println!(
            "  {:<12} {:<24} ORIGINAL DESTINATION",
            "WORKLOAD", "APP SOCKET (REDIRECTED)"
        );
        for e in c.captured(node.index)? {
            println!(
                "  {:<12} {:<24} {}",
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
        "  {:<6} {:<12} {:>14} {:>14} {:>10} {:>10} {:>12}",
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
        for w in cast
            .iter()
            .filter(|w| w.pod.node == node.index && captured(c, w))
        {
            let v = |name: &str, dir: Option<&str>| {
                let mut want = vec![("workload", w.name.as_str())];
                if let Some(dir) = dir {
                    want.push(("direction", dir));
                }
                metric_value(&m, name, &want).unwrap_or(0.0) as u64
            };
            println!(
                "  {:<6} {:<12} {:>14} {:>14} {:>10} {:>10} {:>12}",
                format!("node-{}", node.index),
                w.name,
                v("ambit_workload_bytes_total", Some("egress")),
                v("ambit_workload_bytes_total", Some("ingress")),
                v("ambit_workload_packets_total", Some("egress")),
                v("ambit_workload_packets_total", Some("ingress")),
                v("ambit_outbound_connections_opened_total", None),
            );
        }
    }

    println!(
        "\nWorkload certificates (from the control plane's CA; each node holds only its own identities):"
    );
    for node in &c.nodes {
        for cert in c.config_dump(node.index)?["certificates"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let left = cert["not_after"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(now());
            println!(
                "  node-{}  {:<44} serial {:.12}…  expires in {:.1} h",
                node.index,
                cert["identity"].as_str().unwrap_or("?"),
                cert["serial"].as_str().unwrap_or("?"),
                left as f64 / 3600.0
            );
        }
    }

    println!("\nEditing the mesh file: namespace `shop` loses its ambit.dev/dataplane label...");
    let t = Instant::now();
    c.write_mesh(&MESH.replace("ambit.dev/dataplane: ambient", "team: shop"))?;
    wait("shop released", Duration::from_secs(15), || {
        !captured(c, frontend) && !captured(c, web0)
    })?;
    println!(
        "  frontend-0 and web-0 released on both nodes {:.0} ms after the edit, with no restart.",
        t.elapsed().as_secs_f64() * 1e3
    );
    traffic(c, frontend, &format!("{}:8080", web0.pod.ip4))?;

    drop(l7_processes);
    println!("\nCleaning up (namespaces, cgroups, pinned programs, processes)...");
    cluster.teardown();
    println!("Done.");
    Ok(())
}

const REVIEWS: &str = "10.96.0.20:80";

/// The L7 half: reviews' pods serve HTTP (reviews-v1-1 flaky), the waypoint starts in its
/// pod, and frontend-0's requests to the reviews VIP cross it: the 90/10 canary, a
/// header-matched route, retries hiding the flaky pod, a route timeout, and the Istio
/// request metrics and access log the waypoint keeps. Returns the processes it started
/// (stopped, by their PIDs, when dropped).
fn l7<'a>(
    c: &'a Cluster,
    by_name: &dyn Fn(&str) -> &'a Cast<'a>,
) -> anyhow::Result<Vec<ambit_tests::PodProcess>> {
    let frontend = by_name("frontend-0");
    let mut backends = Vec::new();
    for (pod, version, flaky) in [
        ("reviews-v1-0", "v1", false),
        ("reviews-v1-1", "v1", true),
        ("reviews-v2-0", "v2", false),
    ] {
        let w = by_name(pod);
        let mut args = vec![
            "http-serve".to_string(),
            format!("--listen={}:8080", w.pod.ip4),
            format!("--name={version}"),
        ];
        if flaky {
            args.push("--fail-every=2".into());
        }
        let mut p = c.spawn_in_pod(w.pod, &args)?;
        p.wait_for_line("listening")?;
        backends.push(p);
    }
    let wp = by_name("shop-waypoint-0");
    wait("reviews' pods enrolled", Duration::from_secs(15), || {
        ["reviews-v1-0", "reviews-v1-1", "reviews-v2-0"]
            .iter()
            .all(|n| captured(c, by_name(n)))
    })?;
    let waypoint = c.start_waypoint(wp.pod, "shop", "shop-waypoint")?;
    println!(
        "\nL7: shop-waypoint-0 (pod on node-1, pid {}) got its certificate from node-1's agent",
        waypoint.pid()
    );
    println!(
        "(SDS) and its routes from the control plane (Envoy xDS). frontend-0's requests to reviews"
    );
    println!(
        "({REVIEWS}) go to it over HBONE; it routes each one and tunnels it on to a reviews pod:"
    );

    let r = http(c, frontend, "/", &[], 200)?;
    let v2 = r.iter().filter(|x| x["backend"] == "v2").count();
    let ok = r.iter().filter(|x| x["status"] == 200).count();
    println!(
        "  canary (weights 90/10), 200 requests: v1 answered {}, v2 {v2}; {ok} of 200 were 200 OK",
        r.len() - v2
    );
    let m = waypoint_metrics(c, wp)?;
    let sum = |name: &str, labels: &[(&str, &str)]| metric_sum(&m, name, labels);
    println!(
        "  reviews-v1-1 answers every other request 503: the waypoint retried {} of them on another",
        sum("ambit_waypoint_upstream_retries_total", &[])
    );
    println!(
        "    pod ({} upstream 503s in ambit_waypoint_upstream_requests_total); no client saw one",
        sum(
            "ambit_waypoint_upstream_requests_total",
            &[("response_code", "503")]
        )
    );
    let r = http(c, frontend, "/", &["x-user: tester"], 10)?;
    println!(
        "  header x-user: tester, 10 requests: v2 answered {}; the app saw the caller as {:?}",
        r.iter().filter(|x| x["backend"] == "v2").count(),
        r.first().and_then(|x| x["body"].as_str()).unwrap_or("?")
    );
    let r = http(c, frontend, "/delay/2000", &[], 1)?;
    println!(
        "  /delay/2000 (a 2 s answer; route timeout 300 ms): {} after {:.0} ms",
        r.first().map_or(0, |x| x["status"].as_u64().unwrap_or(0)),
        r.first().and_then(|x| x["ms"].as_f64()).unwrap_or(0.0)
    );

    let r = http(c, frontend, "/chaos", &[], 100)?;
    let aborted = r.iter().filter(|x| x["status"] == 503).count();
    println!(
        "  /chaos (a fault: 50 ms delay on all, abort 503 on 30 %), 100 requests: {aborted} aborted (FI), {} served",
        r.len() - aborted
    );
    // 20 clients at once, each a 500 ms request to reviews-v2 (/slow), whose
    // DestinationRule allows 5 requests at once.
    let started = std::time::Instant::now();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            c.spawn_in_pod(
                frontend.pod,
                &[
                    "http-get".into(),
                    format!("--connect={REVIEWS}"),
                    "--host=reviews.shop.svc.cluster.local".into(),
                    "--path=/slow".into(),
                ],
            )
        })
        .collect::<Result<_, _>>()?;
    let mut codes = Vec::new();
    for p in clients {
        let (_, lines) = p.finish(Duration::from_secs(30))?;
        codes.extend(
            lines
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .map(|x| x["status"].as_u64().unwrap_or(0)),
        );
    }
    println!(
        "  circuit breaker (reviews-v2: http2MaxRequests 5), 20 slow requests at once: {} served, {} answered 503 at once (UO), in {:.0} ms",
        codes.iter().filter(|c| **c == 200).count(),
        codes.iter().filter(|c| **c == 503).count(),
        started.elapsed().as_secs_f64() * 1e3
    );

    // Security and traffic policy at the waypoint.
    let r = http(c, frontend, "/admin", &[], 1)?;
    let first = |r: &[serde_json::Value]| {
        r.first().map_or((0, String::new()), |x| {
            (
                x["status"].as_u64().unwrap_or(0),
                x["body"].as_str().unwrap_or_default().to_owned(),
            )
        })
    };
    let (code, body) = first(&r);
    println!(
        "  /admin (AuthorizationPolicy reviews-admin: DENY unless the ops identity): {code} {body:?}"
    );
    let r = http(
        c,
        frontend,
        "/",
        &["authorization: Bearer forged.token.value"],
        1,
    )?;
    let (code, body) = first(&r);
    println!("  a forged JWT (RequestAuthentication reviews-jwt): {code} {body:?}");
    let r = http(c, frontend, "/api/items", &[], 60)?;
    let limited = r.iter().filter(|x| x["status"] == 429).count();
    let served = r.iter().filter(|x| x["status"] == 200).count();
    println!(
        "  /api (rateLimit: 20 a second per caller), 60 requests back to back: {limited} answered 429 (RL), {served} served, {} answered by the flaky v1 pod's 503 (no retry on this route)",
        r.len() - limited - served
    );

    println!("\nIstio's request metrics (GET :15020/metrics on the waypoint, reporter=waypoint):");
    println!(
        "  {:<12} {:<32} {:<14} {:<8} {:>5} {:>6} {:>6} {:>10}",
        "SOURCE",
        "DESTINATION SERVICE",
        "DESTINATION",
        "VERSION",
        "CODE",
        "FLAGS",
        "COUNT",
        "RESP BYTES"
    );
    let m = waypoint_metrics(c, wp)?;
    for line in m.lines().filter(|l| l.starts_with("istio_requests_total{")) {
        let label = |k: &str| label_of(line, k);
        // The response sizes of the same series.
        let series = &line["istio_requests_total".len()..line.rfind(' ').unwrap_or(line.len())];
        let bytes = m
            .lines()
            .find(|l| l.starts_with("istio_response_bytes_sum") && l.contains(series))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("?");
        println!(
            "  {:<12} {:<32} {:<14} {:<8} {:>5} {:>6} {:>6} {:>10}",
            label("source_workload"),
            label("destination_service"),
            label("destination_workload"),
            label("destination_version"),
            label("response_code"),
            label("response_flags"),
            line.rsplit(' ').next().unwrap_or("?"),
            bytes
        );
    }
    println!("\nThe waypoint's access log (stderr), last 3 requests:");
    let log = std::fs::read_to_string(c.waypoint_log(wp.pod)).unwrap_or_default();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(" access:")).collect();
    for l in lines.iter().skip(lines.len().saturating_sub(3)) {
        println!("  {}", l.trim());
    }
    backends.push(waypoint);
    Ok(backends)
}

/// `count` HTTP/1.1 requests on one connection from `from` to reviews.
fn http(
    c: &Cluster,
    from: &Cast,
    path: &str,
    headers: &[&str],
    count: usize,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut args = vec![
        "http-get".to_string(),
        format!("--connect={REVIEWS}"),
        "--host=reviews.shop.svc.cluster.local".into(),
        format!("--path={path}"),
        format!("--count={count}"),
    ];
    for h in headers {
        args.push(format!("--header={h}"));
    }
    let (_, lines) = c
        .spawn_in_pod(from.pod, &args)?
        .finish(Duration::from_secs(60))?;
    Ok(lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// The waypoint's `/metrics`, fetched inside its pod.
fn waypoint_metrics(c: &Cluster, wp: &Cast) -> anyhow::Result<String> {
    c.http_get_in(wp.pod, "127.0.0.1:15020", "/metrics")
}

/// Maps the example file's workloads onto the simulated pods by IPv4 address.
fn cast(c: &Cluster) -> anyhow::Result<Vec<Cast<'_>>> {
    #[derive(serde::Deserialize)]
    struct File {
        workloads: Vec<W>,
    }
    #[derive(serde::Deserialize)]
    struct W {
        name: String,
        namespace: String,
        ips: Vec<std::net::IpAddr>,
    }
    let file: File = serde_yaml_ng::from_str(MESH)?;
    let mut out = Vec::new();
    for w in file.workloads {
        let pod = c
            .nodes
            .iter()
            .flat_map(|n| &n.pods)
            .find(|p| w.ips.contains(&p.ip4.into()))
            .ok_or_else(|| {
                anyhow::anyhow!("no simulated pod has the IPs of {}/{}", w.namespace, w.name)
            })?;
        out.push(Cast {
            pod,
            uid: format!("{}/{}", w.namespace, w.name),
            namespace: w.namespace,
            name: w.name,
        });
    }
    Ok(out)
}

/// The value of label `key` on a Prometheus text line (`?` if it has none).
fn label_of(line: &str, key: &str) -> String {
    line.split(&format!("{key}=\""))
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("?")
        .to_owned()
}

fn captured(c: &Cluster, w: &Cast) -> bool {
    c.enroll_client(w.pod.node)
        .and_then(|mut cl| Ok(cl.list()?))
        .map(|pods| pods.iter().any(|p| p.spec.uid == w.uid && p.captured))
        .unwrap_or(false)
}

fn certs(c: &Cluster, n: usize) -> usize {
    c.config_dump(n)
        .ok()
        .and_then(|d| d["certificates"].as_array().map(Vec::len))
        .unwrap_or(0)
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !f() {
        anyhow::ensure!(start.elapsed() < timeout, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn traffic(c: &Cluster, from: &Cast, to: &str) -> anyhow::Result<()> {
    let args = ["--connect", to, "--bytes", "1000000"].map(String::from);
    let (ok, reports) = c.run_client(from.pod, &args)?;
    let r = reports.first().cloned().unwrap_or_default();
    let local = r["local"].as_str().unwrap_or("");
    let peer = r["server_peer"].as_str().unwrap_or("?");
    // The agent's socket may get the app's ephemeral port: compare whole addresses.
    let canonical = |a: &str| {
        a.parse::<std::net::SocketAddr>()
            .map(|a| (a.ip().to_canonical(), a.port()))
            .ok()
    };
    let how = if !ok {
        format!("FAILED: {}", r["error"])
    } else if canonical(local) != canonical(peer) {
        format!("from {peer} via the agent (captured; the app's socket was {local})")
    } else {
        format!("from {peer} directly (not captured)")
    };
    let from = format!("{}/{}", from.namespace, from.name);
    println!(
        "  {:<18} {:<28} {:<8} {}",
        from,
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
