//! `cargo xtask bench hbone`: the mutual-TLS data path against plain traffic, side by side
//! in one simulated cluster with a control plane. Reported, never asserted.
//!
//! Layout (2 nodes, namespace enrolled, 2 pods opted out):
//! - direct: pod-1-11 → pod-2-11, both outside the mesh (plain TCP);
//! - passthrough: pod-1-10 (in the mesh) → pod-2-11 (outside): captured, dialed directly;
//! - HBONE: pod-1-10 → pod-2-10 (both in the mesh): captured, tunnelled in mutual TLS;
//! - Envoy: pod-1-11 → pod-2-11 through a pair of Envoy 1.40 ([`EnvoyPair`]), the same
//!   HBONE on the wire (HTTP/2 CONNECT in TLS 1.3, mesh certificates): the peer every
//!   HBONE figure is a ratio to.
//!
//! Each measurement alternates the four and reports the median of `ROUNDS`, with the
//! range. `AMBIT_BENCH_ONLY=round-trips,bulk` runs only those workloads (of `bulk`,
//! `round-trips`, `streams`, `new-tunnels`, `idle`), for iterating on one of them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_tests::{
    Cluster, ClusterSpec, Pod, bench_rounds as rounds, context_switches, cpu_seconds, median, pki,
    rss_kib,
};
use anyhow::Context;
use serde_json::Value;

/// direct, passthrough, HBONE (Ambit), Envoy's HBONE.
const WAYS: usize = 4;
/// The index of Ambit's HBONE way.
const AMBIT: usize = 2;
const IDLE_TUNNELS: usize = 1_000;
/// New tunnels the client keeps in flight when measuring a server's handshake capacity.
const PARALLEL_HANDSHAKES: usize = 8;

fn main() -> anyhow::Result<()> {
    ambit_tests::require_root();
    eprintln!("bench-hbone: building a 2-node cluster with a control plane...");
    let c = Cluster::new(ClusterSpec {
        control_plane: true,
        agent_args: vec![
            "--access-log=off".into(),
            format!("--worker-threads={}", workers()),
        ],
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
    let envoy = EnvoyPair::start(&c, plain, srv_plain, 8080)?;
    let to_envoy = format!("127.0.0.1:{ENVOY_PORT}");
    wait_for_envoy(&c, plain, &to_envoy)?;
    let paths: [(&Pod, &str); WAYS] = [
        (plain, &to_plain),
        (meshed, &to_plain),
        (meshed, &to_mesh),
        (plain, &to_envoy),
    ];
    let agents = [
        c.node(1).agent_pid().context("agent 1")?,
        c.node(2).agent_pid().context("agent 2")?,
    ];
    // Whose CPU each way's runs are charged: the agents', or the Envoys'.
    let charged: [&[u32]; WAYS] = [&agents, &agents, &agents, &envoy.pids];

    eprintln!("bench-hbone: bulk throughput...");
    let runs = all_ways(
        &c,
        "bulk",
        &paths,
        |to| vec!["bulk", "--connect", to, "--seconds", "3"],
        &charged,
    )?;
    let bulk = medians(&runs, |r| r.field("gbit_per_s"));
    let cpu_per_gb = medians(&runs, |r| r.cpu / (r.field("bytes") / 1e9));
    let switches_per_mb = medians(&runs, |r| r.switches / (r.field("bytes") / 1e6));
    let mut spreads = vec![
        ("bulk Gbit/s", ranges(&runs, |r| r.field("gbit_per_s"))),
        (
            "CPU s per GB",
            ranges(&runs, |r| r.cpu / (r.field("bytes") / 1e9)),
        ),
    ];
    eprintln!("bench-hbone: request/response latency...");
    let rr_count = 20_000.0;
    let runs = all_ways(
        &c,
        "round-trips",
        &paths,
        |to| vec!["rr", "--connect", to, "--count", "20000"],
        &charged,
    )?;
    let rr50 = medians(&runs, |r| r.field("p50_us"));
    let rr99 = medians(&runs, |r| r.field("p99_us"));
    // The tool makes a tenth more round trips to warm up.
    let cpu_per_k = medians(&runs, |r| r.cpu / (rr_count * 1.1 / 1000.0));
    // Sleeps and wake-ups per round trip, both ends together: the hops a design adds.
    let switches_per_rt = medians(&runs, |r| r.switches / (rr_count * 1.1));
    spreads.push(("round trip p50 us", ranges(&runs, |r| r.field("p50_us"))));
    spreads.push((
        "CPU ms per 1,000 round trips",
        ranges(&runs, |r| r.cpu / (rr_count * 1.1 / 1000.0) * 1e3),
    ));
    eprintln!("bench-hbone: streams per second on a pooled connection...");
    let runs = all_ways(
        &c,
        "streams",
        &paths,
        |to| vec!["cps", "--connect", to, "--count", "20000", "--seconds", "3"],
        &charged,
    )?;
    let cps = medians(&runs, |r| r.field("conns_per_s"));
    spreads.push(("connections/s", ranges(&runs, |r| r.field("conns_per_s"))));

    eprintln!("bench-hbone: new mutual-TLS connections per second...");
    // Alternating: the agent's HBONE server, Envoy's.
    let (mut ambit_hs, mut envoy_hs, mut plain_hs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ambit_par, mut envoy_par) = (Vec::new(), Vec::new());
    for round in 0..rounds() * usize::from(wanted("new-tunnels")) {
        let (a, p) = handshake_rate(
            &c,
            meshed,
            srv_mesh,
            Some(srv_plain),
            Duration::from_secs(2),
            1,
        )?;
        let (e, _) = handshake_rate(&c, plain, srv_plain, None, Duration::from_secs(2), 1)?;
        ambit_hs.push(a);
        envoy_hs.push(e);
        plain_hs.extend(p);
        // The server's capacity: the client keeps several handshakes in flight. The
        // first round's is profiled (the server's agent, and this process: the client)
        // and not counted.
        let profile = (round == 0)
            .then(|| Profile::start("new-tunnels", &[agents[1], std::process::id()]))
            .transpose()?
            .flatten();
        let (a, _) = handshake_rate(
            &c,
            meshed,
            srv_mesh,
            None,
            Duration::from_secs(2),
            PARALLEL_HANDSHAKES,
        )?;
        let profiled = profile.is_some();
        if let Some(p) = profile {
            p.finish()?;
        }
        let (e, _) = handshake_rate(
            &c,
            plain,
            srv_plain,
            None,
            Duration::from_secs(2),
            PARALLEL_HANDSHAKES,
        )?;
        if !profiled {
            ambit_par.push(a);
        }
        envoy_par.push(e);
    }
    let handshakes = [
        median_or_nan(ambit_hs.clone()),
        median_or_nan(envoy_hs.clone()),
        median_or_nan(plain_hs),
        median_or_nan(ambit_par.clone()),
        median_or_nan(envoy_par.clone()),
    ];
    drop(envoy);

    let idle = if wanted("idle") {
        Some(idle_tunnels(&c, meshed, &to_mesh, agents)?)
    } else {
        None
    };

    println!(
        "\n## Ambit HBONE bench (simulated cluster, 2 nodes, this machine: {} cores; agents {} workers, Envoy --concurrency {}; medians of {} alternating rounds [min–max])\n",
        cores(),
        workers(),
        workers(),
        rounds()
    );
    println!(
        "| measurement | direct | passthrough | HBONE (Ambit) | HBONE (Envoy) | Ambit/Envoy | Ambit/direct | goal |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    let row = |name: &str, v: [f64; WAYS], goal: &str, added: bool| {
        let show = |x: f64| {
            if x.is_nan() {
                "failed or not run (see the spread)".to_owned()
            } else if added {
                format!("{x:.1} (+{:.1})", x - v[0])
            } else {
                format!("{x:.2}")
            }
        };
        let ratio = if added {
            (v[2] - v[0]) / (v[3] - v[0])
        } else {
            v[2] / v[3]
        };
        println!(
            "| {name} | {:.2} | {} | {} | {} | {ratio:.2}x | {:.2}x | {goal} |",
            v[0],
            show(v[1]),
            show(v[2]),
            show(v[3]),
            v[2] / v[0]
        );
    };
    row(
        "bulk throughput, 1 stream (Gbit/s)",
        bulk,
        ">= 1.5x Envoy, >= 0.5x direct",
        false,
    );
    row(
        "1-byte round trip p50 (us; Ambit/Envoy of the added)",
        rr50,
        "added <= 0.5x Envoy's, <= 60 us",
        true,
    );
    row("1-byte round trip p99 (us)", rr99, "", true);
    row(
        "connections/s (HBONE: new streams on a pooled connection)",
        cps,
        "",
        false,
    );
    println!("\n| HBONE | Ambit | Envoy | Ambit/Envoy | goal |");
    println!("|---|---:|---:|---:|---|");
    println!(
        "| agent CPU (both ends) per GB of bulk (s) | {:.2} | {:.2} | {:.2}x | <= 0.5x, <= 1.2 s |",
        cpu_per_gb[2],
        cpu_per_gb[3],
        cpu_per_gb[2] / cpu_per_gb[3]
    );
    println!(
        "| agent CPU (both ends) per 1,000 round trips (ms) | {:.1} | {:.1} | {:.2}x | <= 0.5x |",
        cpu_per_k[2] * 1e3,
        cpu_per_k[3] * 1e3,
        cpu_per_k[2] / cpu_per_k[3]
    );
    println!(
        "| context switches (both ends) per round trip | {:.2} | {:.2} | {:.2}x | |",
        switches_per_rt[2],
        switches_per_rt[3],
        switches_per_rt[2] / switches_per_rt[3]
    );
    println!(
        "| context switches (both ends) per MB of bulk | {:.2} | {:.2} | {:.2}x | |",
        switches_per_mb[2],
        switches_per_mb[3],
        switches_per_mb[2] / switches_per_mb[3]
    );
    // `[min–max]` of a workload's rounds, or why there is none.
    let span = |v: &[f64]| {
        if v.is_empty() {
            "not run".to_owned()
        } else {
            ambit_tests::spread(v)
        }
    };
    println!(
        "| new mutual-TLS connections/s (TLS 1.3 + HTTP/2 + CONNECT, one client, one at a time) | {:.0} {} | {:.0} {} | {:.2}x | three round trips each: see README |",
        handshakes[0],
        span(&ambit_hs),
        handshakes[1],
        span(&envoy_hs),
        handshakes[0] / handshakes[1]
    );
    println!(
        "| the same, {PARALLEL_HANDSHAKES} in flight from the one client (the server's capacity) | {:.0} {} | {:.0} {} | {:.2}x | >= 3,000 |",
        handshakes[3],
        span(&ambit_par),
        handshakes[4],
        span(&envoy_par),
        handshakes[3] / handshakes[4]
    );
    println!(
        "| (plain TCP connect + hello, one at a time, for scale) | {:.0} | | | |",
        handshakes[2]
    );
    let per_tunnel = |during: u64, before: u64| {
        format!(
            "{:.1} KiB",
            (during as f64 - before as f64) / IDLE_TUNNELS as f64
        )
    };
    let (client_side, server_side, dials) = match &idle {
        Some(i) => (
            per_tunnel(i.during.0, i.before.0),
            per_tunnel(i.during.1, i.before.1),
            i.dials.to_string(),
        ),
        None => ("not run".into(), "not run".into(), "not run".into()),
    };
    println!("| agent RSS per idle tunnel, client side | {client_side} | | | < 30 KiB |");
    println!("| agent RSS per idle tunnel, server side | {server_side} | | | < 30 KiB |");
    println!("| HBONE connections the pool opened in all | {dials} | | | |");
    println!(
        "\n| spread of the rounds [min–max] | direct | passthrough | HBONE (Ambit) | HBONE (Envoy) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (name, v) in spreads {
        println!("| {name} | {} | {} | {} | {} |", v[0], v[1], v[2], v[3]);
    }
    Ok(())
}

/// What holding [`IDLE_TUNNELS`] tunnels did to the agents.
struct Idle {
    /// Each agent's RSS (KiB) before the tunnels, and while they were held.
    before: (u64, u64),
    during: (u64, u64),
    /// The HBONE connections node 1's pool opened in all.
    dials: f64,
}

/// [`IDLE_TUNNELS`] tunnels held open at once from `meshed` to `to_mesh`, then all
/// closed at once (where a bench once hung: each tunnel has its own time limit, so one
/// that stalls is reported instead).
fn idle_tunnels(
    c: &Cluster,
    meshed: &Pod,
    to_mesh: &str,
    agents: [u32; 2],
) -> anyhow::Result<Idle> {
    eprintln!("bench-hbone: agent memory with {IDLE_TUNNELS} idle tunnels...");
    let before = (rss_kib(agents[0])?, rss_kib(agents[1])?);
    let mut held = c.spawn_in_pod(
        meshed,
        &[
            "client",
            "--connect",
            to_mesh,
            "--conns",
            &IDLE_TUNNELS.to_string(),
            "--hold",
            // Each connection's own limit, well inside the wait below: a tunnel that
            // stalls is reported (which one, and how) instead of hanging the bench.
            "--timeout",
            "30",
        ]
        .map(String::from),
    )?;
    held.wait_for_line("connected")?;
    std::thread::sleep(Duration::from_millis(500));
    let during = (rss_kib(agents[0])?, rss_kib(agents[1])?);
    held.write_line("go")?;
    let (status, lines) = held.finish(Duration::from_secs(90))?;
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
    Ok(Idle {
        before,
        during,
        dials,
    })
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

/// One run of the pod tool: its JSON result, and the CPU seconds and context switches
/// of the processes it is charged to meanwhile.
struct Run {
    out: Value,
    cpu: f64,
    switches: f64,
}

/// Whether `workload` runs: all do, unless `AMBIT_BENCH_ONLY` lists some.
fn wanted(workload: &str) -> bool {
    match std::env::var("AMBIT_BENCH_ONLY") {
        Ok(only) => only.split(',').any(|w| w.trim() == workload),
        Err(_) => true,
    }
}

impl Run {
    fn field(&self, name: &str) -> f64 {
        self.out[name].as_f64().unwrap_or(f64::NAN)
    }
}

/// Runs the tool for each way, `ROUNDS` times alternating, charging each run the CPU of
/// `charged[way]`'s processes.
fn all_ways<'a>(
    c: &Cluster,
    workload: &str,
    paths: &[(&Pod, &'a str); WAYS],
    args: impl Fn(&'a str) -> Vec<&'a str>,
    charged: &[&[u32]; WAYS],
) -> anyhow::Result<[Vec<Run>; WAYS]> {
    let mut runs: [Vec<Run>; WAYS] = Default::default();
    if !wanted(workload) {
        return Ok(runs);
    }
    for round in 0..rounds() {
        for (i, (pod, to)) in paths.iter().enumerate() {
            // The agents' HBONE way, profiled once (costs it that round's figures).
            let profile = (round == 0 && i == AMBIT)
                .then(|| Profile::start(workload, charged[i]))
                .transpose()?
                .flatten();
            let cpu0 = cpu_seconds(charged[i])?;
            let switches0 = context_switches(charged[i])?;
            let p = c.spawn_in_pod(
                pod,
                &args(to).iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )?;
            let (status, lines) = p.finish(Duration::from_secs(120))?;
            if !status.success() {
                let stats: Vec<String> = c
                    .nodes
                    .iter()
                    .flat_map(|n| &n.pods)
                    .map(|p| format!("{}: {}", p.name, envoy_stats(p)))
                    .collect();
                let what =
                    format!("pod-tool failed on way {i}: {lines:?}; Envoy's counters: {stats:?}");
                // The peer failing is reported with the figures, not fatal (see
                // README: Envoy closes CONNECT tunnels under the connections/s load).
                anyhow::ensure!(i == WAYS - 1, "{what}");
                eprintln!("bench-hbone: Envoy's round failed: {what}");
                runs[i].push(Run {
                    out: Value::Null,
                    cpu: f64::NAN,
                    switches: f64::NAN,
                });
                continue;
            }
            let cpu = cpu_seconds(charged[i])? - cpu0;
            let switches = (context_switches(charged[i])? - switches0) as f64;
            let out: Value = serde_json::from_str(lines.last().context("no output")?)?;
            match profile {
                // perf's own sampling cost would count against the agents.
                Some(p) => p.finish()?,
                None => runs[i].push(Run { out, cpu, switches }),
            }
        }
    }
    Ok(runs)
}

/// The median of `f` over each way's runs.
fn medians(runs: &[Vec<Run>; WAYS], f: impl Fn(&Run) -> f64) -> [f64; WAYS] {
    std::array::from_fn(|i| {
        median_or_nan(runs[i].iter().map(&f).filter(|x| x.is_finite()).collect())
    })
}

/// The median, or NaN for no values (a workload not run, or every round failed).
fn median_or_nan(v: Vec<f64>) -> f64 {
    if v.is_empty() { f64::NAN } else { median(v) }
}

/// `[min–max]` of `f` over each way's runs.
fn ranges(runs: &[Vec<Run>; WAYS], f: impl Fn(&Run) -> f64) -> [String; WAYS] {
    std::array::from_fn(|i| {
        let v: Vec<f64> = runs[i].iter().map(&f).filter(|x| x.is_finite()).collect();
        let failed = runs[i].len() - v.len();
        if runs[i].is_empty() {
            "no round (not run, or the one run was profiled)".to_owned()
        } else if v.is_empty() {
            format!("all {failed} rounds failed")
        } else if failed > 0 {
            format!(
                "{}, {failed} of {} rounds failed",
                ambit_tests::spread(&v),
                runs[i].len()
            )
        } else {
            ambit_tests::spread(&v)
        }
    })
}

/// The non-zero failure counters of an Envoy in `pod` (its admin port), if one runs there.
fn envoy_stats(pod: &Pod) -> String {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.netns,
            "curl",
            "-s",
            "127.0.0.1:15000/stats",
        ])
        .output();
    let Ok(out) = out else { return String::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            (l.contains("overflow")
                || l.contains("fail")
                || l.contains("reset")
                || l.contains("timeout")
                || l.contains("destroy_with")
                || l.contains("cx_total")
                || l.contains("rq_total"))
                && !l.ends_with(": 0")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Waits until a connection through Envoy's pair gets the application's hello.
fn wait_for_envoy(c: &Cluster, client: &Pod, to: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let p = c.spawn_in_pod(
            client,
            &["rr", "--connect", to, "--count", "10"].map(String::from),
        )?;
        let (status, lines) = p.finish(Duration::from_secs(20))?;
        if status.success() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "Envoy's HBONE pair does not carry a connection: {lines:?} (logs in {})",
            c.node(client.node).state_dir.join("envoy-hbone").display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// New HBONE connections per second against the server agent (TCP, TLS 1.3 handshake as a
/// mesh identity, HTTP/2, one CONNECT answered by the app's hello, close), from node 1's
/// namespace; and, for scale, plain TCP connects to `plain_server`'s app with its hello
/// (if given).
fn handshake_rate(
    c: &Cluster,
    client: &Pod,
    server: &Pod,
    plain_server: Option<&Pod>,
    dur: Duration,
    concurrency: usize,
) -> anyhow::Result<(f64, Option<f64>)> {
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
    let plain_app = plain_server.map(|p| SocketAddr::new(p.ip4.into(), 8080));
    let netns = c.node(1).netns_path();
    std::thread::spawn(move || -> anyhow::Result<(f64, Option<f64>)> {
        ambit_mesh::netns::Netns::open(&netns)?.enter()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&config));
            let name = rustls::pki_types::ServerName::IpAddress(hbone.ip().into());
            let start = Instant::now();
            // `concurrency` clients, each opening tunnels one after another.
            let one = || {
                let (connector, name) = (connector.clone(), name.clone());
                async move {
                    let mut n = 0u64;
                    // Where a tunnel's time goes: TCP connect, TLS handshake (as the
                    // client sees it), HTTP/2 handshake, CONNECT answered (the server
                    // dials the app), the app's first bytes through the tunnel.
                    let mut phases = [Duration::ZERO; 5];
                    while start.elapsed() < dur {
                        let t0 = Instant::now();
                        let tcp = tokio::net::TcpStream::connect(hbone).await?;
                        tcp.set_nodelay(true)?;
                        let t1 = Instant::now();
                        let tls = connector.connect(name.clone(), tcp).await?;
                        let t2 = Instant::now();
                        let h2 = ambit_hbone::connect::HboneClient::handshake(tls).await?;
                        let t2b = Instant::now();
                        let mut s = h2.connect(app, "172.18.0.1".parse()?, "00-0-0-00").await?;
                        let t3 = Instant::now();
                        let mut hello = [0u8; 5];
                        tokio::io::AsyncReadExt::read_exact(&mut s, &mut hello).await?;
                        let t4 = Instant::now();
                        let phase = [t1 - t0, t2 - t1, t2b - t2, t3 - t2b, t4 - t3];
                        for (p, d) in phases.iter_mut().zip(phase) {
                            *p += d;
                        }
                        n += 1;
                    }
                    anyhow::Ok((n, phases))
                }
            };
            let clients = futures::future::try_join_all((0..concurrency).map(|_| one())).await?;
            let tls_rate =
                clients.iter().map(|c| c.0).sum::<u64>() as f64 / start.elapsed().as_secs_f64();
            let n: u64 = clients.iter().map(|c| c.0).sum();
            let mut phases = [Duration::ZERO; 5];
            for (_, p) in &clients {
                for (sum, d) in phases.iter_mut().zip(p) {
                    *sum += *d;
                }
            }
            let us = |d: Duration| d.as_secs_f64() * 1e6 / n.max(1) as f64;
            eprintln!(
                "bench-hbone: a new tunnel to {hbone}, {concurrency} at a time: TCP {:.0} µs, TLS {:.0} µs, HTTP/2 handshake {:.0} µs, CONNECT answered {:.0} µs, first bytes {:.0} µs (means of {n})",
                us(phases[0]),
                us(phases[1]),
                us(phases[2]),
                us(phases[3]),
                us(phases[4])
            );
            let Some(plain_app) = plain_app else {
                return Ok((tls_rate, None));
            };
            let start = Instant::now();
            let mut m = 0u64;
            while start.elapsed() < dur {
                let mut tcp = tokio::net::TcpStream::connect(plain_app).await?;
                let mut hello = [0u8; 5];
                tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut hello).await?;
                m += 1;
            }
            Ok((tls_rate, Some(m as f64 / start.elapsed().as_secs_f64())))
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("handshake thread panicked"))?
}

/// `AMBIT_BENCH_PROFILE=<dir>`: a workload's first Ambit HBONE round runs under
/// `perf record` (CPU-clock sampling of the agents; this machine class has no hardware
/// counters) and leaves `<dir>/<workload>.txt`, the flat profile by library and
/// symbol, and `<dir>/<workload>.data` for `perf report -i`; with
/// `AMBIT_BENCH_PROFILE_STACKS` set, call stacks too. The profiled round is not counted
/// in the figures.
struct Profile {
    perf: std::process::Child,
    data: PathBuf,
    report: PathBuf,
}

impl Profile {
    fn start(workload: &str, pids: &[u32]) -> anyhow::Result<Option<Profile>> {
        let Some(dir) = std::env::var_os("AMBIT_BENCH_PROFILE") else {
            return Ok(None);
        };
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir)?;
        let data = dir.join(format!("{workload}.data"));
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let mut perf = std::process::Command::new("perf");
        perf.args(["record", "-q", "-F", "1999", "-p", &pids.join(",")]);
        if std::env::var_os("AMBIT_BENCH_PROFILE_STACKS").is_some() {
            // Who calls what (DWARF unwinding: release builds keep no frame pointers).
            perf.args(["--call-graph", "dwarf,16384"]);
        }
        let perf = perf
            .arg("-o")
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting perf (Debian linux-perf)")?;
        // perf attaches to every thread before sampling starts.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Some(Profile {
            perf,
            data,
            report: dir.join(format!("{workload}.txt")),
        }))
    }

    fn finish(mut self) -> anyhow::Result<()> {
        // SAFETY: signals the perf process this bench started, by its PID.
        unsafe { libc::kill(self.perf.id() as i32, libc::SIGINT) };
        self.perf.wait()?;
        let out = std::process::Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "comm,dso,symbol",
            ])
            .args(["--percent-limit", "0.5", "-i"])
            .arg(&self.data)
            .output()?;
        std::fs::write(&self.report, &out.stdout)?;
        eprintln!("bench-hbone: profile in {}", self.report.display());
        Ok(())
    }
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
/// Envoy 1.40 as both ends of an HBONE tunnel, the peer every HBONE figure is a ratio
/// to: in `client`'s namespace a `tcp_proxy` listener on 127.0.0.1:[`ENVOY_PORT`] that
/// tunnels each connection as an HTTP/2 CONNECT over TLS 1.3 (`tunneling_config`, ALPN
/// h2, the client's mesh certificate, the server's SPIFFE identity checked); in
/// `server`'s namespace an HTTP connection manager on its pod IP, port 15008, that
/// terminates CONNECT (mutual TLS, the mesh root) and dials the application. Both run
/// `--concurrency` [`workers`], the agents' worker threads; their circuit breakers are
/// unlimited, as Istio writes them. Killed when dropped.
struct EnvoyPair {
    pids: [u32; 2],
    _processes: [ambit_tests::process::PodProcess; 2],
}

/// The client Envoy's plain listener, in the client pod.
const ENVOY_PORT: u16 = 15001;
/// The agents' data-plane worker threads, and Envoy's `--concurrency`: 2 (the agents'
/// default), or `AMBIT_BENCH_WORKERS`.
fn workers() -> usize {
    ambit_tests::env_count("AMBIT_BENCH_WORKERS", 2)
}

impl EnvoyPair {
    fn start(c: &Cluster, client: &Pod, server: &Pod, app_port: u16) -> anyhow::Result<Self> {
        let bin = ambit_tests::envoy_binary()?;
        let dir = c.node(client.node).state_dir.join("envoy-hbone");
        std::fs::create_dir_all(&dir)?;
        let ca = pki::mesh_root(&c.ca_dir());
        let root = dir.join("root.pem");
        std::fs::write(&root, &ca.pem)?;
        let id = |p: &Pod| format!("spiffe://cluster.local/ns/default/sa/{}", p.name);
        let (cc, ck) = {
            let (chain, key) = pki::leaf(&ca, &id(client));
            ambit_tests::envoy::tls_files(&dir, "client", &chain, &key)?
        };
        let (sc, sk) = {
            let (chain, key) = pki::leaf(&ca, &id(server));
            ambit_tests::envoy::tls_files(&dir, "server", &chain, &key)?
        };
        let hbone = SocketAddr::new(server.ip4.into(), 15008);
        let server_id = id(server);
        let client_yaml = format!(
            "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}}}\nstatic_resources:\n{}",
            ambit_tests::envoy::hbone_client(
                SocketAddr::from(([127, 0, 0, 1], ENVOY_PORT)),
                &format!("{}:{app_port}", server.ip4),
                hbone,
                &ambit_tests::envoy::HboneTls {
                    chain: &cc,
                    key: &ck,
                    root: &root,
                    peer: Some(&server_id),
                    only_curve: None,
                },
            )
        );
        let server_yaml = format!(
            r#"
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}}}
# Envoy's rapid-reset guard closes an HTTP/2 connection once half of its last 500 streams
# were reset young: the connections/s tool closes each connection with RST, so the guard
# would close tunnels in flight (and did: "bad hello"). Ambit has no such guard; off here.
layered_runtime:
  layers:
    - name: static
      static_layer: {{overload.premature_reset_total_stream_count: 4294967295}}
static_resources:
{}"#,
            ambit_tests::envoy::hbone_server(
                hbone,
                &ambit_tests::envoy::HboneTls {
                    chain: &sc,
                    key: &sk,
                    root: &root,
                    peer: None,
                    only_curve: None,
                },
                SocketAddr::new(server.ip4.into(), app_port),
            )
        );
        // The server Envoy dials the application for every stream and closes first, so
        // its side keeps the TIME_WAIT sockets: thousands per connections/s round would
        // run out of ephemeral ports towards the one application address (the agent
        // dials it as the caller's IP instead). Let new connections reuse them.
        let sysctl = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &server.netns,
                "sysctl",
                "-qw",
                "net.ipv4.tcp_tw_reuse=1",
            ])
            .status()?;
        anyhow::ensure!(sysctl.success(), "sysctl tcp_tw_reuse in {}", server.netns);
        let mut processes = Vec::new();
        for (pod, name, yaml) in [
            (client, "client", client_yaml),
            (server, "server", server_yaml),
        ] {
            let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
            processes.push(ambit_tests::process::PodProcess::start_with_stderr(
                &pod.netns_path(),
                &pod.cgroup,
                &bin,
                &[
                    "--config-yaml".into(),
                    yaml,
                    "--concurrency".into(),
                    workers().to_string(),
                    "--log-level".into(),
                    "warn".into(),
                    "--disable-hot-restart".into(),
                    "--base-id".into(),
                    (if name == "client" { "11" } else { "12" }).into(),
                ],
                log.into(),
            )?);
        }
        let [a, b]: [ambit_tests::process::PodProcess; 2] = processes
            .try_into()
            .map_err(|_| anyhow::anyhow!("two processes"))?;
        Ok(Self {
            pids: [a.pid(), b.pid()],
            _processes: [a, b],
        })
    }
}
