//! `cargo xtask bench waypoint`: the L7 proxy against a stock Envoy 1.40, side by side in
//! one simulated cluster with a control plane, both configured by it with the same
//! RouteConfiguration/Cluster/ClusterLoadAssignment. Reported, never asserted.
//!
//! Layout (2 nodes, namespace `bench` enrolled; waypoint `wp` with two pods on node 1):
//! - `ambit-waypoint` (1 worker thread) in pod-1-2, its certificate from node 1's agent
//!   (SDS), with a plain HTTP listener for service `web-plain` on :8080;
//! - Envoy 1.40 (`--concurrency 1`) in pod-1-3 from `examples/envoy-waypoint.yaml`: the
//!   same SDS socket and control plane, a plain HTTP listener on :8080 with the same RDS;
//! - the load generator (wrk for HTTP/1.1, h2load for HTTP/2) in pod-1-0 and the backend
//!   (`ambit-pod-tool http-serve`) in pod-2-0, both opted out of the mesh, so direct,
//!   Envoy and Ambit are plain HTTP in front of the same backend.
//!
//! Then the full mesh path: pod-1-1 (in the mesh) to service `web` (waypoint `wp`, backend
//! pod-2-1) — client agent, HBONE, waypoint, HBONE, destination agent — against the
//! L4-only path to `web-l4` (backend pod-2-2, no waypoint): agents and HBONE only.
//!
//! Then policy: the same plain listeners with an L7 AuthorizationPolicy of 20 rules and a
//! RequestAuthentication (ES256, inline keys) on `web-plain`, every request carrying a
//! valid token — in ambit-waypoint through its plaintext listener, in Envoy as the control
//! plane's own Listener for the service (its JWT and RBAC filters) moved to :8081 of
//! Envoy's pod (a binary bootstrap merged with the example's).
//!
//! Each measurement alternates its contenders and reports the median of `ROUNDS`, with the
//! spread (min–max) of the rounds.
//!
//! `AMBIT_BENCH_PROFILE=h1|h2` profiles instead: ambit-waypoint alone under the HTTP/1.1
//! or HTTP/2 load for `PROFILE_SECONDS`, with `perf record -F 499 --call-graph dwarf` (Debian
//! `linux-perf`); the report's top lines are printed and `perf.data` is kept in
//! `target/bench-waypoint-<h1|h2>.perf.data`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ambit_tests::cluster::CONTROL_PLANE_ADDR;
use ambit_tests::process::spawn_in;
use ambit_tests::{
    Cluster, ClusterSpec, Pod, PodProcess, cpu_seconds, median, peak_rss_kib, rss_kib,
};
use anyhow::{Context, bail};

const ROUNDS: usize = 5;
const SECONDS: u32 = 3;
/// How long a profile's load runs.
const PROFILE_SECONDS: u32 = 15;
const PLAIN_HOST: &str = "web-plain.bench.svc.cluster.local";
const MESH_HOST: &str = "web.bench.svc.cluster.local";
const ENVOY_EXAMPLE: &str = include_str!("../../../examples/envoy-waypoint.yaml");

fn mesh(c: &Cluster, with_envoy: bool) -> String {
    let w = |p: &Pod, sa: &str, labels: &str| p.mesh_workload("bench", sa, labels);
    let mut y = String::from(
        "namespaces:\n  - name: bench\n    labels: {ambit.dev/dataplane: ambient}\nnodes: [{name: node-1}, {name: node-2}]\nwaypoints: [{name: wp, namespace: bench}]\nworkloads:\n",
    );
    y += &w(c.pod(1, 0), "load", "app: load, ambit.dev/dataplane: none");
    y += &w(c.pod(1, 1), "client", "app: client");
    let wp = "gateway.networking.k8s.io/gateway-name: wp";
    y += &w(c.pod(1, 2), "wp", wp);
    if with_envoy {
        y += &w(c.pod(1, 3), "wp", wp);
    }
    y += &w(
        c.pod(2, 0),
        "web",
        "app: web-plain, ambit.dev/dataplane: none",
    );
    y += &w(c.pod(2, 1), "web", "app: web");
    y += &w(c.pod(2, 2), "web", "app: web-l4");
    y += r#"services:
  - {name: web-plain, namespace: bench, vips: [10.96.0.10], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: web-plain}, labels: {ambit.dev/waypoint: wp}}
  - {name: web, namespace: bench, vips: [10.96.0.11], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: web}, labels: {ambit.dev/waypoint: wp}}
  - {name: web-l4, namespace: bench, vips: [10.96.0.12], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: web-l4}}
"#;
    y
}

/// The issuer of the bench's tokens.
const ISSUER: &str = "https://idp.bench.example";

/// An L7 policy of 20 rules for `web-plain` and the RequestAuthentication whose tokens
/// they match: 2 DENY rules nobody matches, 17 ALLOW rules the bench's requests miss
/// (other paths, methods, headers, principals), and last the one that admits them (a
/// request principal of the issuer, a claim and a method) — so every rule is evaluated.
fn policy_yaml(jwks: &str) -> String {
    let mut allow = String::new();
    for i in 0..16 {
        allow += &format!(
            "      - from: [{{requestPrincipals: [\"{ISSUER}/team-{i}\"]}}]\n        to: [{{paths: [\"/team-{i}/*\"], methods: [GET, POST]}}]\n"
        );
    }
    allow += "      - to: [{methods: [DELETE], paths: [/admin]}]\n";
    allow += &format!(
        "      - from: [{{requestPrincipals: [\"{ISSUER}/*\"]}}]\n        to: [{{methods: [GET, HEAD]}}]\n        when: [{{key: \"request.auth.claims[scope]\", values: [read, write]}}]\n"
    );
    format!(
        r#"requestAuthentications:
  - name: bench-jwt
    namespace: bench
    targetRefs: [{{kind: Service, name: web-plain}}]
    jwtRules:
      - issuer: {ISSUER}
        audiences: [web]
        jwks: '{jwks}'
policies:
  - name: bench-deny
    namespace: bench
    targetRefs: [{{kind: Service, name: web-plain}}]
    action: DENY
    rules:
      - to: [{{paths: ["/internal/*"]}}]
      - when: [{{key: "request.headers[x-blocked]", values: ["*"]}}]
  - name: bench-allow
    namespace: bench
    targetRefs: [{{kind: Service, name: web-plain}}]
    action: ALLOW
    rules:
{allow}"#
    )
}

/// An ES256 key: its JWKS and a token of it for the bench's requests (valid for an hour).
fn bench_token() -> anyhow::Result<(String, String)> {
    use base64::Engine;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|e| anyhow::anyhow!("a P-256 key: {e}"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|e| anyhow::anyhow!("a P-256 key: {e}"))?;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let point = pair.public_key().as_ref();
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256",
        "kid": "bench-1", "x": b64(&point[1..33]), "y": b64(&point[33..65])}]})
    .to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("bench-1".into());
    let token = jsonwebtoken::encode(
        &header,
        &serde_json::json!({"iss": ISSUER, "sub": "load", "aud": "web", "scope": "read",
            "iat": now, "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()),
    )?;
    Ok((jwks, token))
}

fn main() -> anyhow::Result<()> {
    ambit_tests::require_root();
    eprintln!("bench-waypoint: building a 2-node cluster with a control plane...");
    let c = Cluster::new(ClusterSpec {
        control_plane: true,
        pods_per_node: 4,
        agent_args: vec!["--access-log=off".into()],
        ..Default::default()
    })?;
    for p in c.nodes.iter().flat_map(|n| &n.pods) {
        c.enroll(p)?;
    }
    c.write_mesh(&mesh(&c, true))?;
    let (load, client) = (c.pod(1, 0), c.pod(1, 1));
    let (wp_pod, envoy_pod) = (c.pod(1, 2), c.pod(1, 3));
    let mut backends = Vec::new();
    for i in 0..3 {
        let pod = c.pod(2, i);
        let mut p = c.spawn_in_pod(
            pod,
            &[
                "http-serve".into(),
                format!("--listen={}:8080", pod.ip4),
                format!("--name=web-{i}"),
            ],
        )?;
        p.wait_for_line("listening")?;
        backends.push(p);
    }
    ambit_tests::wait_until("the meshed pods captured", Duration::from_secs(30), || {
        [(1, 1), (2, 1), (2, 2)].iter().all(|&(n, i)| {
            c.enroll_client(n)
                .and_then(|mut e| Ok(e.list()?))
                .is_ok_and(|l| {
                    l.iter()
                        .any(|p| p.spec.uid == c.pod(n, i).uid && p.captured)
                })
        })
    });

    let waypoint = c.start_waypoint_with(
        wp_pod,
        "bench",
        "wp",
        &[
            "--plaintext-listener=0.0.0.0:8080=10.96.0.10:80".into(),
            "--log=warn".into(),
        ],
    )?;
    if let Ok(which) = std::env::var("AMBIT_BENCH_PROFILE") {
        let via_ambit = format!("{}:8080", wp_pod.ip4);
        eprintln!(
            "bench-waypoint: idle RSS {:.1} MiB",
            rss_kib(waypoint.pid())? as f64 / 1024.0
        );
        wait_for_200(&c, load, &via_ambit, PLAIN_HOST)?;
        return profile(&which, load, &via_ambit, waypoint.pid());
    }
    let envoy = start_envoy(&c, envoy_pod)?;
    let direct = format!("{}:8080", c.pod(2, 0).ip4);
    let via_envoy = format!("{}:8080", envoy_pod.ip4);
    let via_ambit = format!("{}:8080", wp_pod.ip4);
    wait_for_200(&c, load, &direct, PLAIN_HOST)?;
    wait_for_200(&c, load, &via_ambit, PLAIN_HOST)?;
    if let Err(e) = wait_for_200(&c, load, &via_envoy, PLAIN_HOST) {
        let log =
            std::fs::read_to_string(c.node(1).state_dir.join("envoy.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        bail!(
            "Envoy does not serve: {e}\nits log, last lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let pids = [envoy.pid, waypoint.pid()];
    let idle_rss = [rss_kib(pids[0])?, rss_kib(pids[1])?];
    let targets = [direct.as_str(), via_envoy.as_str(), via_ambit.as_str()];

    eprintln!("bench-waypoint: HTTP/1.1, 50 connections...");
    let h1 = rounds(&targets, &pids, |to| wrk(load, to, PLAIN_HOST, 50))?;
    eprintln!("bench-waypoint: HTTP/2, 10 connections x 10 streams...");
    let h2 = rounds(&targets, &pids, |to| h2load(load, to, PLAIN_HOST))?;
    eprintln!("bench-waypoint: latency at 1 connection...");
    let one = rounds(&targets, &pids, |to| wrk(load, to, PLAIN_HOST, 1))?;
    let peak_rss = [peak_rss_kib(pids[0])?, peak_rss_kib(pids[1])?];
    let rejected = envoy_rejected(&c, envoy_pod)?;
    drop(envoy);

    // Policy: 20 rules and JWT on every request.
    eprintln!("bench-waypoint: an authorization policy of 20 rules and JWT on every request...");
    let (jwks, token) = bench_token()?;
    let with_policy = format!("{}{}", mesh(&c, true), policy_yaml(&jwks));
    c.write_mesh(&with_policy)?;
    let bearer = format!("Authorization: Bearer {token}");
    // In force in ambit-waypoint: no token, 403; the token, 200.
    wait_for_status(&c, load, &via_ambit, PLAIN_HOST, &[], 403)?;
    wait_for_status(&c, load, &via_ambit, PLAIN_HOST, &[&bearer], 200)?;
    let model = ambit_control_plane::source::file::parse(Path::new("mesh.yaml"), &with_policy)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let envoy = start_envoy_with(&c, envoy_pod, Some(policy_listener(&model, 8081)?))?;
    let via_envoy_policy = format!("{}:8081", envoy_pod.ip4);
    wait_for_status(&c, load, &via_envoy_policy, PLAIN_HOST, &[], 403)?;
    wait_for_status(&c, load, &via_envoy_policy, PLAIN_HOST, &[&bearer], 200)?;
    let policy_pids = [envoy.pid, waypoint.pid()];
    let policy_targets = [
        direct.as_str(),
        via_envoy_policy.as_str(),
        via_ambit.as_str(),
    ];
    let pol = rounds(&policy_targets, &policy_pids, |to| {
        wrk_with(load, to, PLAIN_HOST, 50, SECONDS, &[&bearer])
    })?;
    let policy_rejected = envoy_rejected(&c, envoy_pod)?;
    drop(envoy);
    c.write_mesh(&mesh(&c, true))?;

    // The mesh path: without Envoy's pod, so the agents pick ambit-waypoint's.
    eprintln!("bench-waypoint: the full mesh path...");
    c.write_mesh(&mesh(&c, false))?;
    ambit_tests::wait_until(
        "node 1's agent forgot Envoy's pod",
        Duration::from_secs(15),
        || {
            c.config_dump(1).is_ok_and(|d| {
                d["mesh"]["workloads"]
                    .as_object()
                    .is_some_and(|w| !w.keys().any(|k| k.ends_with(&envoy_pod.name)))
            })
        },
    );
    let agents = [
        c.node(1).agent_pid().context("agent 1")?,
        c.node(2).agent_pid().context("agent 2")?,
    ];
    let mesh_pids = [agents[0], agents[1], waypoint.pid()];
    let l4 = format!("{}:8080", c.pod(2, 2).ip4);
    let l7 = "10.96.0.11:80".to_string();
    wait_for_200(&c, client, &l7, MESH_HOST)?;
    wait_for_200(&c, client, &l4, MESH_HOST)?;
    let mesh_targets = [l4.as_str(), l7.as_str()];
    let mesh50 = rounds(&mesh_targets, &mesh_pids, |to| {
        wrk(client, to, MESH_HOST, 50)
    })?;
    let mesh1 = rounds(&mesh_targets, &mesh_pids, |to| {
        wrk(client, to, MESH_HOST, 1)
    })?;
    drop(waypoint);
    drop(backends);

    println!(
        "\n## Ambit waypoint bench (simulated cluster, this machine: {} cores; medians of {ROUNDS} alternating rounds of {SECONDS} s, [min–max])\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "L7 proxy alone: plain HTTP from a load generator pod to a backend pod on the other node,"
    );
    println!(
        "through nothing (direct), Envoy 1.40 (`--concurrency 1`) or ambit-waypoint (1 worker),"
    );
    println!("both configured by the control plane with the same RDS/CDS/EDS.\n");
    println!("| measurement | direct | Envoy | Ambit | Ambit/Envoy | goal |");
    println!("|---|---:|---:|---:|---:|---|");
    let cell = |v: &[f64], f: &dyn Fn(f64) -> String| {
        format!(
            "{} [{}–{}]",
            f(median(v.to_vec())),
            f(v.iter().copied().fold(f64::INFINITY, f64::min)),
            f(v.iter().copied().fold(f64::NEG_INFINITY, f64::max))
        )
    };
    let n0 = |x: f64| format!("{x:.0}");
    let n2 = |x: f64| format!("{x:.2}");
    let ratio = |a: f64, b: f64| format!("{:.2}x", a / b);
    for (name, r) in [
        ("HTTP/1.1, 50 connections: requests/s", &h1),
        ("HTTP/2, 10 connections x 10 streams: requests/s", &h2),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} | |",
            cell(&r[0].rps, &n0),
            cell(&r[1].rps, &n0),
            cell(&r[2].rps, &n0),
            ratio(median(r[2].rps.clone()), median(r[1].rps.clone()))
        );
        println!(
            "| {}: proxy CPU ms per 1,000 requests | | {} | {} | {} | <= 0.5x |",
            name.split(':').next().unwrap_or(name),
            cell(&r[1].cpu_ms_per_k, &n2),
            cell(&r[2].cpu_ms_per_k, &n2),
            ratio(
                median(r[2].cpu_ms_per_k.clone()),
                median(r[1].cpu_ms_per_k.clone())
            )
        );
    }
    let added = |r: &Ways, i: usize| median(r[i].p50_us.clone()) - median(r[0].p50_us.clone());
    println!(
        "| 1 connection: p50 (us) | {} | {} | {} | | |",
        cell(&one[0].p50_us, &n0),
        cell(&one[1].p50_us, &n0),
        cell(&one[2].p50_us, &n0)
    );
    println!(
        "| 1 connection: p50 added to direct (us) | | {:.0} | {:.0} | {} | <= 0.5x |",
        added(&one, 1),
        added(&one, 2),
        ratio(added(&one, 2), added(&one, 1))
    );
    println!(
        "| 1 connection: p99 (us) | {} | {} | {} | | |",
        cell(&one[0].p99_us, &n0),
        cell(&one[1].p99_us, &n0),
        cell(&one[2].p99_us, &n0)
    );
    println!(
        "| RSS idle (MiB) | | {:.1} | {:.1} | {} | Ambit <= 18 MiB |",
        idle_rss[0] as f64 / 1024.0,
        idle_rss[1] as f64 / 1024.0,
        ratio(idle_rss[1] as f64, idle_rss[0] as f64)
    );
    println!(
        "| RSS peak under load (MiB) | | {:.1} | {:.1} | {} | Ambit <= 18 MiB |",
        peak_rss[0] as f64 / 1024.0,
        peak_rss[1] as f64 / 1024.0,
        ratio(peak_rss[1] as f64, peak_rss[0] as f64)
    );
    println!(
        "\nEnvoy's xDS updates rejected (`update_rejected` in its stats): {rejected} (0: it ACKed everything)."
    );
    println!(
        "\nWith policy: an AuthorizationPolicy of 20 rules (2 DENY, 18 ALLOW, the admitting one last) and a\nRequestAuthentication (ES256) on the service, a valid token on every request (HTTP/1.1, 50 connections;\nEnvoy runs the control plane's own listener for the service, its JWT and RBAC filters included):\n"
    );
    println!("| measurement | direct | Envoy | Ambit | Ambit/Envoy | goal |");
    println!("|---|---:|---:|---:|---:|---|");
    println!(
        "| requests/s | {} | {} | {} | {} | |",
        cell(&pol[0].rps, &n0),
        cell(&pol[1].rps, &n0),
        cell(&pol[2].rps, &n0),
        ratio(median(pol[2].rps.clone()), median(pol[1].rps.clone()))
    );
    println!(
        "| proxy CPU ms per 1,000 requests | | {} | {} | {} | <= 0.5x |",
        cell(&pol[1].cpu_ms_per_k, &n2),
        cell(&pol[2].cpu_ms_per_k, &n2),
        ratio(
            median(pol[2].cpu_ms_per_k.clone()),
            median(pol[1].cpu_ms_per_k.clone())
        )
    );
    println!(
        "| proxy CPU ms per 1,000 requests, added by the policy | | {:.2} | {:.2} | {} | |",
        median(pol[1].cpu_ms_per_k.clone()) - median(h1[1].cpu_ms_per_k.clone()),
        median(pol[2].cpu_ms_per_k.clone()) - median(h1[2].cpu_ms_per_k.clone()),
        ratio(
            median(pol[2].cpu_ms_per_k.clone()) - median(h1[2].cpu_ms_per_k.clone()),
            median(pol[1].cpu_ms_per_k.clone()) - median(h1[1].cpu_ms_per_k.clone())
        )
    );
    println!("\nEnvoy's updates rejected with the policy: {policy_rejected}.");
    println!(
        "\nThe full mesh path (HTTP/1.1 from a meshed pod; CPU of both agents, plus the waypoint on L7):\n"
    );
    println!(
        "| measurement | L4 only (agents, HBONE) | L7 (agents, waypoint, HBONE twice) | L7/L4 |"
    );
    println!("|---|---:|---:|---:|");
    // One row per figure: L4 and L7 with their spread, and L7/L4 of the medians.
    let mesh_row = |name: &str, a: &[f64], b: &[f64], f: &dyn Fn(f64) -> String| {
        println!(
            "| {name} | {} | {} | {} |",
            cell(a, f),
            cell(b, f),
            ratio(median(b.to_vec()), median(a.to_vec()))
        );
    };
    mesh_row(
        "50 connections: requests/s",
        &mesh50[0].rps,
        &mesh50[1].rps,
        &n0,
    );
    mesh_row(
        "50 connections: CPU ms per 1,000 requests",
        &mesh50[0].cpu_ms_per_k,
        &mesh50[1].cpu_ms_per_k,
        &n2,
    );
    mesh_row(
        "1 connection: p50 (us)",
        &mesh1[0].p50_us,
        &mesh1[1].p50_us,
        &n0,
    );
    mesh_row(
        "1 connection: p99 (us)",
        &mesh1[0].p99_us,
        &mesh1[1].p99_us,
        &n0,
    );
    Ok(())
}

/// One load run's figures.
#[derive(Debug, Default)]
struct Load {
    requests: f64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Every round of one contender.
#[derive(Debug, Default, Clone)]
struct Series {
    rps: Vec<f64>,
    cpu_ms_per_k: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
}

type Ways = Vec<Series>;

/// `ROUNDS` rounds, each running `run` against every target in turn. The CPU of
/// `pids` is counted for every target but the first when there are three (direct has no
/// proxy); with two targets, for both.
fn rounds(
    targets: &[&str],
    pids: &[u32],
    mut run: impl FnMut(&str) -> anyhow::Result<Load>,
) -> anyhow::Result<Ways> {
    let mut out = vec![Series::default(); targets.len()];
    for _ in 0..ROUNDS {
        for (i, to) in targets.iter().enumerate() {
            // Direct, Envoy, Ambit: each proxy's own CPU. Mesh paths: all of `pids`.
            let counted: Vec<u32> = match (targets.len(), i) {
                (3, 0) => vec![],
                (3, i) => vec![pids[i - 1]],
                _ => pids.to_vec(),
            };
            let cpu0 = cpu_seconds(&counted)?;
            let l = run(to)?;
            let cpu = cpu_seconds(&counted)? - cpu0;
            let s = &mut out[i];
            s.rps.push(l.rps);
            s.cpu_ms_per_k.push(cpu * 1e3 / (l.requests / 1e3));
            s.p50_us.push(l.p50_us);
            s.p99_us.push(l.p99_us);
        }
    }
    Ok(out)
}

/// Runs `cmd` in `pod` to completion (bounded) and returns its stdout.
fn run_in(pod: &Pod, cmd: &mut Command) -> anyhow::Result<String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawn_in(&pod.netns_path(), &pod.cgroup, cmd)?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(u64::from(PROFILE_SECONDS) + 30)) {
        Ok(out) => out?,
        Err(_) => {
            // SAFETY: kill(2) on the PID of the child we started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            bail!("{cmd:?} did not finish");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Profiles `pid` (ambit-waypoint) under the `which` load (`h1`: wrk with 50
/// connections, `h2`: h2load 10x10) from `load` to `to`.
fn profile(which: &str, load: &Pod, to: &str, pid: u32) -> anyhow::Result<()> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../target/bench-waypoint-{which}.perf.data"));
    let mut perf = Command::new("perf")
        .args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-o"])
        .arg(&data)
        .args(["-p", &pid.to_string(), "--", "sleep"])
        .arg((PROFILE_SECONDS + 1).to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("perf (apt-get install linux-perf)")?;
    std::thread::sleep(Duration::from_millis(500));
    let cpu0 = cpu_seconds(&[pid])?;
    let l = match which {
        "h1" => wrk_for(load, to, PLAIN_HOST, 50, PROFILE_SECONDS)?,
        "h2" => h2load_for(load, to, PLAIN_HOST, PROFILE_SECONDS)?,
        other => bail!("AMBIT_BENCH_PROFILE={other:?}: h1 or h2"),
    };
    let cpu = cpu_seconds(&[pid])? - cpu0;
    perf.wait()?;
    println!(
        "{which}: {:.0} requests/s, {:.2} ms CPU per 1,000 requests, RSS {:.1} MiB (peak {:.1}); profile in {}",
        l.rps,
        cpu * 1e3 / (l.requests / 1e3),
        rss_kib(pid)? as f64 / 1024.0,
        peak_rss_kib(pid)? as f64 / 1024.0,
        data.display()
    );
    let report = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "dso,symbol",
            "-i",
        ])
        .arg(&data)
        .output()?;
    for line in String::from_utf8_lossy(&report.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .take(60)
    {
        println!("{line}");
    }
    Ok(())
}

/// wrk (HTTP/1.1 keep-alive, one thread) from `pod` to `to` for `SECONDS`.
fn wrk(pod: &Pod, to: &str, host: &str, conns: u32) -> anyhow::Result<Load> {
    wrk_for(pod, to, host, conns, SECONDS)
}

/// wrk for `seconds`.
fn wrk_for(pod: &Pod, to: &str, host: &str, conns: u32, seconds: u32) -> anyhow::Result<Load> {
    wrk_with(pod, to, host, conns, seconds, &[])
}

/// wrk for `seconds`, with more request headers.
fn wrk_with(
    pod: &Pod,
    to: &str,
    host: &str,
    conns: u32,
    seconds: u32,
    headers: &[&str],
) -> anyhow::Result<Load> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "--latency", "--timeout", "5s"])
        .arg(format!("-c{conns}"))
        .arg(format!("-d{seconds}s"))
        .args(["-H", &format!("Host: {host}")]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = run_in(pod, cmd.arg(format!("http://{to}/")))?;
    if let Some(l) = out
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        bail!("wrk to {to}: {l}\n{out}");
    }
    let field = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_owned()))
            .with_context(|| format!("no {prefix:?} in wrk's output:\n{out}"))
    };
    let requests: f64 = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no request count in wrk's output:\n{out}"))?;
    Ok(Load {
        requests,
        rps: field("Requests/sec:")?.parse()?,
        p50_us: micros(&field("50%")?)?,
        p99_us: micros(&field("99%")?)?,
    })
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.00s`.
fn micros(v: &str) -> anyhow::Result<f64> {
    let v = v.trim();
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        bail!("unknown duration {v:?}")
    };
    Ok(num.parse::<f64>()? * scale)
}

/// h2load (HTTP/2 with prior knowledge, 10 connections x 10 concurrent streams).
fn h2load(pod: &Pod, to: &str, host: &str) -> anyhow::Result<Load> {
    h2load_for(pod, to, host, SECONDS)
}

/// h2load for `seconds`.
fn h2load_for(pod: &Pod, to: &str, host: &str, seconds: u32) -> anyhow::Result<Load> {
    let out = run_in(
        pod,
        Command::new("h2load")
            .args(["-c10", "-m10", "-t1", "--warm-up-time=1"])
            .arg(format!("-D{seconds}"))
            .args(["-H", &format!(":authority: {host}")])
            .arg(format!("http://{to}/")),
    )?;
    let line = |prefix: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .map(str::to_owned)
            .with_context(|| format!("no {prefix:?} in h2load's output:\n{out}"))
    };
    // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, ..."
    let reqs = line("requests:")?;
    let num = |key: &str| -> anyhow::Result<f64> {
        reqs.split(',')
            .find(|p| p.trim().ends_with(key))
            .and_then(|p| p.split_whitespace().rev().nth(1)?.parse().ok())
            .with_context(|| format!("no {key:?} in {reqs:?}"))
    };
    let (done, ok) = (num("done")?, num("succeeded")?);
    if ok < done || done == 0.0 {
        bail!("h2load to {to}: {reqs}\n{out}");
    }
    // "finished in 3.00s, 12345.67 req/s, 1.2MB/s"
    let rps = line("finished in")?
        .split(',')
        .nth(1)
        .and_then(|p| p.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no req/s in h2load's output:\n{out}"))?;
    Ok(Load {
        requests: ok,
        rps,
        p50_us: 0.0,
        p99_us: 0.0,
    })
}

/// Waits (at most 30 s) until a GET from `pod` to `to` answers 200.
fn wait_for_200(c: &Cluster, pod: &Pod, to: &str, host: &str) -> anyhow::Result<()> {
    wait_for_status(c, pod, to, host, &[], 200)
}

/// Waits (at most 30 s) until a GET from `pod` to `to` with `headers` answers `want`.
fn wait_for_status(
    c: &Cluster,
    pod: &Pod,
    to: &str,
    host: &str,
    headers: &[&str],
    want: u16,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut args = vec![
        "http-get".to_string(),
        format!("--connect={to}"),
        format!("--host={host}"),
    ];
    args.extend(headers.iter().map(|h| format!("--header={h}")));
    loop {
        let p = c.spawn_in_pod(pod, &args)?;
        let (_, lines) = p.finish(Duration::from_secs(15))?;
        if lines
            .iter()
            .any(|l| l.contains(&format!("\"status\":{want}")))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{to} does not answer {want}: {lines:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The control plane's own Listener for `web-plain` in `model` (its JWT and RBAC
/// filters), listening in plaintext on `0.0.0.0:port`, as a binary bootstrap fragment.
fn policy_listener(
    model: &ambit_control_plane::model::Model,
    port: u16,
) -> anyhow::Result<Vec<u8>> {
    use envoy_types::pb::envoy::config::bootstrap::v3 as bootstrap;
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::config::listener::v3 as listener;
    use prost::Message;
    let wp = model.waypoints.values().next().context("a waypoint")?;
    let resources = ambit_control_plane::translate::waypoint::resources(model, wp);
    let name = format!("{PLAIN_HOST}:80");
    let r = resources[ambit_xds::type_url::LISTENER]
        .get(&name)
        .with_context(|| format!("no listener {name}"))?;
    let mut l = listener::Listener::decode(r.resource.value.as_slice())?;
    l.name = "web-policy".into();
    l.address = Some(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: "0.0.0.0".into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port.into())),
            ..Default::default()
        })),
    });
    l.additional_addresses.clear();
    l.bind_to_port = None;
    let b = bootstrap::Bootstrap {
        static_resources: Some(bootstrap::bootstrap::StaticResources {
            listeners: vec![l],
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(b.encode_to_vec())
}

/// Envoy in its pod, killed by its PID when dropped.
struct Envoy {
    pid: u32,
    _process: PodProcess,
}

/// Envoy 1.40 in `pod` from the README's example bootstrap, pointed at this cluster: its
/// certificate from node 1's agent over SDS, its configuration from the control plane.
fn start_envoy(c: &Cluster, pod: &Pod) -> anyhow::Result<Envoy> {
    start_envoy_with(c, pod, None)
}

/// [`start_envoy`], with more listeners (a binary bootstrap the example is merged into).
fn start_envoy_with(c: &Cluster, pod: &Pod, extra: Option<Vec<u8>>) -> anyhow::Result<Envoy> {
    let sds = c.node(pod.node).state_dir.join("sds.sock");
    let (cp_ip, cp_port) = CONTROL_PLANE_ADDR
        .rsplit_once(':')
        .context("control plane address")?;
    let bootstrap = ENVOY_EXAMPLE
        .replace("{id: shop/wp, cluster: wp}", "{id: bench/wp, cluster: wp}")
        .replace(
            "{address: 172.18.0.254, port_value: 15012}",
            &format!("{{address: {cp_ip}, port_value: {cp_port}}}"),
        )
        .replace("/var/run/ambit/sds.sock", &sds.display().to_string())
        .replace(
            "\"web.shop.svc.cluster.local:80\"",
            &format!("\"{PLAIN_HOST}:80\""),
        );
    anyhow::ensure!(
        bootstrap.contains("bench/wp") && bootstrap.contains(PLAIN_HOST),
        "examples/envoy-waypoint.yaml changed shape; update the bench's substitutions"
    );
    let config = c.node(pod.node).state_dir.join("envoy-waypoint.yaml");
    std::fs::write(&config, &bootstrap)?;
    let log = std::fs::File::create(c.node(pod.node).state_dir.join("envoy.log"))?;
    let source: Vec<String> = match extra {
        None => vec!["-c".into(), config.display().to_string()],
        Some(pb) => {
            let file = c.node(pod.node).state_dir.join("envoy-policy.pb");
            std::fs::write(&file, pb)?;
            vec![
                "-c".into(),
                file.display().to_string(),
                "--config-yaml".into(),
                bootstrap,
            ]
        }
    };
    let p = PodProcess::start_with_stderr(
        &pod.netns_path(),
        &pod.cgroup,
        &ambit_tests::envoy_binary()?,
        &[
            source,
            vec![
                "--concurrency".into(),
                "1".into(),
                "--log-level".into(),
                "warn".into(),
                "--disable-hot-restart".into(),
            ],
        ]
        .concat(),
        log.into(),
    )?;
    Ok(Envoy {
        pid: p.pid(),
        _process: p,
    })
}

/// Envoy's `update_rejected` statistics, summed (from its admin port, inside its pod).
fn envoy_rejected(c: &Cluster, pod: &Pod) -> anyhow::Result<u64> {
    let p = c.spawn_in_pod(
        pod,
        &[
            "http-get".into(),
            "--connect=127.0.0.1:15000".into(),
            "--host=localhost".into(),
            "--path=/stats?filter=update_rejected".into(),
            "--keep=1000000".into(),
        ],
    )?;
    let (_, lines) = p.finish(Duration::from_secs(10))?;
    let r: serde_json::Value = serde_json::from_str(lines.first().map_or("{}", |l| l))?;
    let body = r["body"].as_str().context("Envoy's admin did not answer")?;
    Ok(body
        .lines()
        .filter_map(|l| l.rsplit(": ").next()?.trim().parse::<u64>().ok())
        .sum())
}
