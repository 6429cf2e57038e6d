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
    /// Run the benchmarks in the simulated cluster and print tables; needs root.
    Bench {
        /// Only the capture data path (`datapath`), the mutual-TLS data path (`hbone`) or
        /// the control plane (`xds`).
        only: Option<String>,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::BuildEbpf => build_ebpf().map(drop),
        Cmd::Test { args } => test(&args),
        Cmd::Demo => run_harness_bin("ambit-demo"),
        Cmd::Bench { only } => match only.as_deref() {
            None => run_harness_bin("ambit-bench")
                .and_then(|()| run_harness_bin("ambit-bench-hbone"))
                .and_then(|()| run_harness_bin("ambit-bench-xds")),
            Some("datapath") => run_harness_bin("ambit-bench"),
            Some("hbone") => run_harness_bin("ambit-bench-hbone"),
            Some("xds") => run_harness_bin("ambit-bench-xds"),
            Some(other) => Err(anyhow::anyhow!(
                "unknown benchmark {other:?}: use datapath, hbone or xds"
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
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
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
    println!("summary: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!(
            "the test suite failed ({status}); rerun by hand with `cargo test --workspace` as root"
        );
    }
    Ok(())
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
