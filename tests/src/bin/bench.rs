//! `cargo xtask bench`: Ambit's node agent against direct pod-to-pod traffic, side by side
//! in one simulated cluster, printed as a table. Reported, never asserted.
//!
//! Layout: node 1 holds a captured (enrolled) client pod and a direct (not enrolled)
//! client pod; node 2 holds the server pod. Every measurement alternates direct and
//! captured runs and reports the median of `ROUNDS`, so drift on this shared 2-core
//! machine hits both sides alike. Node 3 has a fresh agent for the memory figures.

use std::path::Path;
use std::time::Instant;

use ambit_tests::{Cluster, ClusterSpec, Pod, PodProcess, median, rss_kib, workspace_bin};
use anyhow::Context;
use serde_json::Value;

const ROUNDS: usize = 3;
const BARE_PODS: usize = 1_000;

fn main() -> anyhow::Result<()> {
    ambit_tests::require_root();
    eprintln!("bench: building a 3-node simulated cluster...");
    let c = Cluster::new(ClusterSpec {
        nodes: 3,
        pods_per_node: 2,
        ..Default::default()
    })?;
    let (captured, direct, server) = (c.pod(1, 0), c.pod(1, 1), c.pod(2, 0));
    let _srv = c.start_server(server, &[format!("{}:8080", server.ip4)])?;
    c.enroll(captured)?;
    let dst = format!("{}:8080", server.ip4);
    // A port nothing listens on: the agent's dial is refused at once, so measuring
    // connect() does not also measure upstream work.
    let closed = format!("{}:1", server.ip4);

    let mut rows: Vec<Row> = Vec::new();

    eprintln!("bench: bulk throughput...");
    let (d, cap) = side_by_side(
        &c,
        direct,
        captured,
        &["bulk", "--connect", &dst, "--seconds", "3"],
        "gbit_per_s",
    )?;
    rows.push(Row::new(
        "bulk throughput, 1 stream (Gbit/s)",
        d,
        cap,
        "captured >= 0.8x direct",
    ));

    eprintln!("bench: request/response latency...");
    let rr = ["rr", "--connect", &dst, "--count", "20000"];
    let (d50, c50) = side_by_side(&c, direct, captured, &rr, "p50_us")?;
    let (d99, c99) = side_by_side(&c, direct, captured, &rr, "p99_us")?;
    rows.push(Row::new("1-byte round trip p50 (us)", d50, c50, "added <= 15 us").with_delta());
    rows.push(Row::new("1-byte round trip p99 (us)", d99, c99, "").with_delta());

    eprintln!("bench: connections per second...");
    let (d, cap) = side_by_side(
        &c,
        direct,
        captured,
        &[
            "cps",
            "--connect",
            &dst,
            "--count",
            "20000",
            "--seconds",
            "3",
        ],
        "conns_per_s",
    )?;
    rows.push(Row::new(
        "connections/s (connect, first byte, close)",
        d,
        cap,
        "",
    ));

    eprintln!("bench: connect() hook cost...");
    let (base, hooked) = hook_cost(&c, captured, &closed)?;
    rows.push(
        Row::new(
            "connect() syscall p50 (us): no hook vs captured",
            base,
            hooked,
            "hook cost < 2 us",
        )
        .with_delta(),
    );

    eprintln!("bench: agent memory (fresh agent on node 3, then {BARE_PODS} enrolled pods)...");
    let agent = c.node(3).agent_pid().context("node 3 agent")?;
    let idle = rss_kib(agent)?;
    let pods = c.add_bare_pods(3, BARE_PODS)?;
    let t = Instant::now();
    let mut client = c.enroll_client(3)?;
    for p in &pods {
        client.add(p.spec())?;
    }
    let enroll_ms = t.elapsed().as_secs_f64() * 1e3 / BARE_PODS as f64;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let loaded = rss_kib(agent)?;

    println!(
        "\n## Ambit bench (simulated cluster, this machine: {} cores)\n",
        num_cpus()
    );
    println!("| measurement | direct | captured | captured/direct | goal |");
    println!("|---|---:|---:|---:|---|");
    for r in &rows {
        println!("{r}");
    }
    println!("\n| agent memory | value | goal |");
    println!("|---|---:|---|");
    println!(
        "| RSS idle, 0 pods | {:.1} MiB | < 20 MiB |",
        idle as f64 / 1024.0
    );
    println!(
        "| RSS with {BARE_PODS} enrolled pods | {:.1} MiB | |",
        loaded as f64 / 1024.0
    );
    println!(
        "| per enrolled pod | {:.1} KiB | |",
        (loaded - idle) as f64 / BARE_PODS as f64
    );
    println!("| enroll time per pod | {enroll_ms:.2} ms | |");
    Ok(())
}

struct Row {
    name: &'static str,
    direct: f64,
    captured: f64,
    goal: &'static str,
    delta: bool,
}

impl Row {
    fn new(name: &'static str, direct: f64, captured: f64, goal: &'static str) -> Self {
        Self {
            name,
            direct,
            captured,
            goal,
            delta: false,
        }
    }

    /// Also show the difference (for latencies).
    fn with_delta(self) -> Self {
        Self {
            delta: true,
            ..self
        }
    }
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ratio = self.captured / self.direct;
        let extra = if self.delta {
            format!(" (+{:.1})", self.captured - self.direct)
        } else {
            String::new()
        };
        write!(
            f,
            "| {} | {:.2} | {:.2}{extra} | {ratio:.2}x | {} |",
            self.name, self.direct, self.captured, self.goal
        )
    }
}

/// Runs pod-tool `args` alternately in the direct and the captured pod, `ROUNDS` times
/// each, and returns the median of `field` for each.
fn side_by_side(
    c: &Cluster,
    direct: &Pod,
    captured: &Pod,
    args: &[&str],
    field: &str,
) -> anyhow::Result<(f64, f64)> {
    let (mut d, mut cap) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        d.push(run_tool(c, direct, args, field)?);
        cap.push(run_tool(c, captured, args, field)?);
    }
    Ok((median(d), median(cap)))
}

fn run_tool(c: &Cluster, pod: &Pod, args: &[&str], field: &str) -> anyhow::Result<f64> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let p = c.spawn_in_pod(pod, &args)?;
    parse_field(p, field)
}

fn parse_field(p: PodProcess, field: &str) -> anyhow::Result<f64> {
    let (status, lines) = p.finish(std::time::Duration::from_secs(120))?;
    anyhow::ensure!(status.success(), "pod-tool failed: {lines:?}");
    let v: Value = serde_json::from_str(lines.last().context("no output")?)?;
    v[field]
        .as_f64()
        .with_context(|| format!("no {field} in {v}"))
}

/// connect() time in the captured pod (hooks run, redirect to the agent's listener) against
/// the same pod's namespace from a cgroup outside the pod subtree (no hook), connecting
/// straight to that same listener. Same handshake, same listener: the difference is what
/// the programs cost.
fn hook_cost(c: &Cluster, captured: &Pod, closed: &str) -> anyhow::Result<(f64, f64)> {
    let outside = c.cgroup_root.join("node1").join("bench");
    std::fs::create_dir_all(&outside)?;
    let tool = workspace_bin("ambit-pod-tool");
    let args = |to: &str| {
        ["connect-lat", "--connect", to, "--count", "5000"]
            .map(String::from)
            .to_vec()
    };
    let (mut base, mut hooked) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let p = PodProcess::start(
            &captured.netns_path(),
            Path::new(&outside),
            &tool,
            &args("127.0.0.1:15001"),
        )?;
        base.push(parse_field(p, "p50_us")?);
        hooked.push(parse_field(
            c.spawn_in_pod(captured, &args(closed))?,
            "p50_us",
        )?);
    }
    Ok((median(base), median(hooked)))
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
