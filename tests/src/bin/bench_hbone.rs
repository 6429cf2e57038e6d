//! `cargo xtask bench hbone`: the mutual-TLS data path against plain traffic, side by side
//! in one simulated cluster with a control plane. Reported, never asserted.
//!
//! Layout (2 nodes, namespace enrolled, 2 pods opted out):
//! - direct: pod-1-11 → pod-2-11, both outside the mesh (plain TCP);
//! - passthrough: pod-1-10 (in the mesh) → pod-2-11 (outside): captured, dialed directly;
//! - HBONE: pod-1-10 → pod-2-10 (both in the mesh): captured, tunnelled in mutual TLS.
//!
//! Each measurement alternates the three and reports the median of `ROUNDS`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_tests::{Cluster, ClusterSpec, Pod, cpu_seconds, median, pki, rss_kib};
use anyhow::Context;
use serde_json::Value;

const ROUNDS: usize = 3;
const IDLE_TUNNELS: usize = 1_000;

fn main() -> anyhow::Result<()> {
    ambit_tests::require_root();
    eprintln!("bench-hbone: building a 2-node cluster with a control plane...");
    let c = Cluster::new(ClusterSpec {
        control_plane: true,
        agent_args: vec!["--access-log=off".into()],
        ..Default::default()
    })?;
    let (meshed, plain, srv_mesh, srv_plain) = (c.pod(1, 0), c.pod(1, 1), c.pod(2, 0), c.pod(2, 1));
    for p in c.nodes.iter().flat_map(|n| &n.pods) {
        c.enroll(p)?;
    }
    let mut yaml = c.mesh_yaml(true);
    for p in [plain, srv_plain] {
        yaml = yaml.replace(
            &format!("labels: {{app: {}}}", p.name),
            &format!("labels: {{app: {}, ambit.dev/dataplane: none}}", p.name),
        );
    }
    c.write_mesh(&yaml)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready(&c)? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "pods not captured with certificates"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _s1 = c.start_server(srv_mesh, &[format!("{}:8080", srv_mesh.ip4)])?;
    let _s2 = c.start_server(srv_plain, &[format!("{}:8080", srv_plain.ip4)])?;
    let to_mesh = format!("{}:8080", srv_mesh.ip4);
    let to_plain = format!("{}:8080", srv_plain.ip4);
    let paths: [(&Pod, &str); 3] = [(plain, &to_plain), (meshed, &to_plain), (meshed, &to_mesh)];
    let agents = [
        c.node(1).agent_pid().context("agent 1")?,
        c.node(2).agent_pid().context("agent 2")?,
    ];

    eprintln!("bench-hbone: bulk throughput...");
    let runs = three_ways(
        &c,
        &paths,
        |to| vec!["bulk", "--connect", to, "--seconds", "3"],
        &agents,
    )?;
    let bulk = medians(&runs, |r| r.field("gbit_per_s"));
    let cpu_per_gb = medians(&runs, |r| r.cpu / (r.field("bytes") / 1e9))[2];
    eprintln!("bench-hbone: request/response latency...");
    let rr_count = 20_000.0;
    let runs = three_ways(
        &c,
        &paths,
        |to| vec!["rr", "--connect", to, "--count", "20000"],
        &agents,
    )?;
    let rr50 = medians(&runs, |r| r.field("p50_us"));
    let rr99 = medians(&runs, |r| r.field("p99_us"));
    // The tool makes a tenth more round trips to warm up.
    let cpu_per_k = medians(&runs, |r| r.cpu / (rr_count * 1.1 / 1000.0))[2];
    eprintln!("bench-hbone: streams per second on a pooled connection...");
    let runs = three_ways(
        &c,
        &paths,
        |to| vec!["cps", "--connect", to, "--count", "20000", "--seconds", "3"],
        &agents,
    )?;
    let cps = medians(&runs, |r| r.field("conns_per_s"));

    eprintln!("bench-hbone: new mutual-TLS connections per second...");
    let handshakes = handshake_rate(&c, meshed, srv_mesh, srv_plain, Duration::from_secs(3))?;

    eprintln!("bench-hbone: agent memory with {IDLE_TUNNELS} idle tunnels...");
    let before = (rss_kib(agents[0])?, rss_kib(agents[1])?);
    let mut held = c.spawn_in_pod(
        meshed,
        &[
            "client",
            "--connect",
            &to_mesh,
            "--conns",
            &IDLE_TUNNELS.to_string(),
            "--hold",
            "--timeout",
            "60",
        ]
        .map(String::from),
    )?;
    held.wait_for_line("connected")?;
    std::thread::sleep(Duration::from_millis(500));
    let during = (rss_kib(agents[0])?, rss_kib(agents[1])?);
    held.write_line("go")?;
    let (status, lines) = held.finish(Duration::from_secs(60))?;
    let failed: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("\"ok\":false"))
        .collect();
    anyhow::ensure!(
        status.success(),
        "{} of the idle tunnels failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    let dials = ambit_tests::cluster::metric_sum(&c.metrics(1)?, "ambit_hbone_dials_total", &[]);

    println!(
        "\n## Ambit HBONE bench (simulated cluster, 2 nodes, this machine: {} cores)\n",
        cores()
    );
    println!("| measurement | direct | passthrough | HBONE | HBONE/direct | goal |");
    println!("|---|---:|---:|---:|---:|---|");
    let row = |name: &str, v: [f64; 3], goal: &str, delta: bool| {
        let extra = |x: f64| {
            if delta {
                format!(" (+{:.1})", x - v[0])
            } else {
                String::new()
            }
        };
        println!(
            "| {name} | {:.2} | {:.2}{} | {:.2}{} | {:.2}x | {goal} |",
            v[0],
            v[1],
            extra(v[1]),
            v[2],
            extra(v[2]),
            v[2] / v[0]
        );
    };
    row(
        "bulk throughput, 1 stream (Gbit/s)",
        bulk,
        "HBONE >= 0.5x direct",
        false,
    );
    row(
        "1-byte round trip p50 (us)",
        rr50,
        "HBONE adds < 40 us",
        true,
    );
    row("1-byte round trip p99 (us)", rr99, "", true);
    row(
        "connections/s (HBONE: new streams on a pooled connection)",
        cps,
        "",
        false,
    );
    println!("\n| HBONE | value | goal |");
    println!("|---|---:|---|");
    println!(
        "| new mutual-TLS connections/s (TLS 1.3 handshake + HTTP/2 + CONNECT, one client) | {:.0} (plain TCP connect + hello: {:.0}) | |",
        handshakes.0, handshakes.1
    );
    println!("| agent CPU (both agents) per GB of bulk | {cpu_per_gb:.2} s | |");
    println!(
        "| agent CPU (both agents) per 1,000 round trips | {:.1} ms | |",
        cpu_per_k * 1e3
    );
    println!(
        "| agent RSS per idle tunnel, client side | {:.1} KiB | < 30 KiB |",
        (during.0 as f64 - before.0 as f64) / IDLE_TUNNELS as f64
    );
    println!(
        "| agent RSS per idle tunnel, server side | {:.1} KiB | < 30 KiB |",
        (during.1 as f64 - before.1 as f64) / IDLE_TUNNELS as f64
    );
    println!("| HBONE connections the pool opened in all | {dials} | |");
    Ok(())
}

fn ready(c: &Cluster) -> anyhow::Result<bool> {
    for n in &c.nodes {
        let dump = c.config_dump(n.index)?;
        let captured = dump["pods"]
            .as_array()
            .context("pods")?
            .iter()
            .filter(|p| p["captured"] == true)
            .count();
        if captured != 1 || dump["certificates"].as_array().context("certs")?.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// One run of the pod tool: its JSON result and the agents' CPU seconds meanwhile.
struct Run {
    out: Value,
    cpu: f64,
}

impl Run {
    fn field(&self, name: &str) -> f64 {
        self.out[name].as_f64().unwrap_or(f64::NAN)
    }
}

/// Runs the tool for each path (direct, passthrough, HBONE), `ROUNDS` times alternating.
fn three_ways<'a>(
    c: &Cluster,
    paths: &[(&Pod, &'a str); 3],
    args: impl Fn(&'a str) -> Vec<&'a str>,
    agents: &[u32; 2],
) -> anyhow::Result<[Vec<Run>; 3]> {
    let mut runs: [Vec<Run>; 3] = Default::default();
    for _ in 0..ROUNDS {
        for (i, (pod, to)) in paths.iter().enumerate() {
            let cpu0 = cpu_seconds(agents)?;
            let p = c.spawn_in_pod(
                pod,
                &args(to).iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )?;
            let (status, lines) = p.finish(Duration::from_secs(120))?;
            anyhow::ensure!(status.success(), "pod-tool failed: {lines:?}");
            let cpu = cpu_seconds(agents)? - cpu0;
            let out: Value = serde_json::from_str(lines.last().context("no output")?)?;
            runs[i].push(Run { out, cpu });
        }
    }
    Ok(runs)
}

/// The median of `f` over each path's runs.
fn medians(runs: &[Vec<Run>; 3], f: impl Fn(&Run) -> f64) -> [f64; 3] {
    [0, 1, 2].map(|i| median(runs[i].iter().map(&f).collect()))
}

/// New HBONE connections per second against the server agent (TCP, TLS 1.3 handshake as a
/// mesh identity, HTTP/2, one CONNECT answered by the app's hello, close), from node 1's
/// namespace; and, for scale, plain TCP connects to the same app with its hello.
fn handshake_rate(
    c: &Cluster,
    client: &Pod,
    server: &Pod,
    plain_server: &Pod,
    dur: Duration,
) -> anyhow::Result<(f64, f64)> {
    use ambit_hbone::tls::{MeshRoots, WorkloadKey};
    let ca = pki::mesh_root(&c.ca_dir());
    let (chain, key) = pki::leaf(
        &ca,
        &format!("spiffe://cluster.local/ns/default/sa/{}", client.name),
    );
    let config = ambit_hbone::tls::client_config(
        &WorkloadKey::from_pem(&chain, &key)?,
        &MeshRoots::from_pem(&ca.pem)?,
        [ambit_identity::Identity::new(
            "cluster.local",
            "default",
            &server.name,
        )?],
    )?;
    let hbone = SocketAddr::new(server.ip4.into(), 15008);
    let app = SocketAddr::new(server.ip4.into(), 8080);
    let plain_app = SocketAddr::new(plain_server.ip4.into(), 8080);
    let netns = c.node(1).netns_path();
    std::thread::spawn(move || -> anyhow::Result<(f64, f64)> {
        ambit_mesh::netns::Netns::open(&netns)?.enter()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&config));
            let name = rustls::pki_types::ServerName::IpAddress(hbone.ip().into());
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < dur {
                let tcp = tokio::net::TcpStream::connect(hbone).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name.clone(), tcp).await?;
                let h2 = ambit_hbone::connect::HboneClient::handshake(tls).await?;
                let mut s = h2.connect(app, "172.18.0.1".parse()?, "00-0-0-00").await?;
                let mut hello = [0u8; 5];
                tokio::io::AsyncReadExt::read_exact(&mut s, &mut hello).await?;
                n += 1;
            }
            let tls_rate = n as f64 / start.elapsed().as_secs_f64();
            let start = Instant::now();
            let mut m = 0u64;
            while start.elapsed() < dur {
                let mut tcp = tokio::net::TcpStream::connect(plain_app).await?;
                let mut hello = [0u8; 5];
                tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut hello).await?;
                m += 1;
            }
            Ok((tls_rate, m as f64 / start.elapsed().as_secs_f64()))
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("handshake thread panicked"))?
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
