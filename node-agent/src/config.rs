//! The agent's configuration: every flag and environment variable is read here, once,
//! into [`Config`]; nothing else in the agent reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where `cargo xtask build-ebpf` leaves the kernel object (relative to the workspace).
pub const DEFAULT_EBPF_OBJECT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/bpfel-unknown-none/release/ambit-ebpf"
);

/// `ambit-agent run` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// cgroup-v2 directory holding the pods of this node; the capture and accounting
    /// programs attach here (never to the root cgroup). Default: the kubelet's
    /// (`kubepods.slice` or `kubepods` under the cgroup-v2 mount). The agent refuses to
    /// run inside it.
    #[arg(long, env = "AMBIT_POD_CGROUP")]
    pub pod_cgroup: Option<PathBuf>,

    /// The cgroup-v2 hierarchy as the agent sees it (default: `/sys/fs/cgroup`, or
    /// `/sys/fs/cgroup/unified` on hybrid hosts). In a container, the host's, mounted
    /// from the host (e.g. `/host/sys/fs/cgroup`).
    #[arg(long, env = "AMBIT_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// Enter this cgroup namespace first (e.g. `/proc/1/ns/cgroup` with the host's PID
    /// namespace): a container's private cgroup namespace hides where the agent is in the
    /// host's hierarchy and forbids moving it out of the pod cgroup.
    #[arg(long, env = "AMBIT_HOST_CGROUPNS")]
    pub host_cgroupns: Option<PathBuf>,

    /// Move the agent into this cgroup before anything else (created if missing): how a
    /// DaemonSet's agent, whose own pod is under the pod cgroup, gets out of it.
    #[arg(long, env = "AMBIT_OWN_CGROUP")]
    pub own_cgroup: Option<PathBuf>,

    /// Directory on a bpf filesystem where programs' links and maps are pinned, so capture
    /// fails closed while the agent is down. Mounted at /sys/fs/bpf if needed.
    #[arg(long, env = "AMBIT_BPFFS_DIR", default_value = "/sys/fs/bpf/ambit")]
    pub bpffs_dir: PathBuf,

    /// Directory for the agent's state (enrolled pods), read back on restart.
    #[arg(long, env = "AMBIT_STATE_DIR", default_value = "/var/run/ambit")]
    pub state_dir: PathBuf,

    /// Unix socket of the enrollment API (default: <state-dir>/enroll.sock).
    #[arg(long, env = "AMBIT_ENROLL_SOCKET")]
    pub enroll_socket: Option<PathBuf>,

    /// The kernel object built by `cargo xtask build-ebpf`.
    #[arg(long, env = "AMBIT_EBPF_OBJECT", default_value = DEFAULT_EBPF_OBJECT)]
    pub ebpf_object: PathBuf,

    /// Prometheus `/metrics` listener.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// `/healthz/ready` listener.
    #[arg(long, env = "AMBIT_READY_ADDR", default_value = "0.0.0.0:15021")]
    pub ready_addr: SocketAddr,

    /// Admin listener (`/debug/...`); keep it on localhost.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Destination CIDRs never captured (repeatable), e.g. 169.254.0.0/16.
    #[arg(
        long = "exclude-cidr",
        env = "AMBIT_EXCLUDE_CIDRS",
        value_delimiter = ','
    )]
    pub exclude_cidrs: Vec<Cidr>,

    /// Destination ports never captured (repeatable).
    #[arg(
        long = "exclude-port",
        env = "AMBIT_EXCLUDE_PORTS",
        value_delimiter = ','
    )]
    pub exclude_ports: Vec<u16>,

    /// Export a span per tunnelled connection with OTLP over gRPC to this collector
    /// (`http://otel-collector:4317`); none: no spans.
    #[arg(long, env = "AMBIT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Percent of the traces the agent starts (outbound connections) that are recorded;
    /// an inbound tunnel follows its caller's decision.
    #[arg(long, env = "AMBIT_TRACE_SAMPLING", default_value_t = 1.0)]
    pub trace_sampling: f64,

    /// How long dialing an original destination may take.
    #[arg(long, env = "AMBIT_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// At SIGTERM, how long open connections may go on before the agent exits (it stops
    /// accepting at once; capture stays in place either way).
    #[arg(long, env = "AMBIT_DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// The control plane's xDS address (e.g.
    /// `https://ambit-control-plane.ambit-system.svc:15012`). Without it the agent runs
    /// standalone: the enrollment API's `add` captures a pod at once. `http://` (the
    /// control plane's `--insecure-plaintext-addr`) is for debugging only.
    #[arg(long, env = "AMBIT_XDS_ADDRESS")]
    pub xds_address: Option<String>,

    /// The mesh's root certificate (PEM), which the control plane's TLS certificate must
    /// chain to; required with an `https://` xDS address.
    #[arg(long, env = "AMBIT_XDS_ROOT_CERT")]
    pub xds_root_cert: Option<PathBuf>,

    /// This node's name, as the control plane knows it (sent as the xDS node id).
    #[arg(long, env = "NODE_NAME", default_value = "node")]
    pub node_name: String,

    /// This node's bootstrap credential for the control plane's CA (file mode: the
    /// control plane's `<node-tokens-dir>/<node>.token`). Without it no certificates are
    /// requested.
    #[arg(long, env = "AMBIT_NODE_CREDENTIAL_FILE")]
    pub node_credential_file: Option<PathBuf>,

    /// Lifetime to ask for workload certificates (0: the CA's default, 24 h).
    #[arg(long, env = "AMBIT_CERT_TTL", default_value = "0s", value_parser = parse_duration)]
    pub cert_ttl: Duration,

    /// Access log: one JSON line per closed connection on standard output (`stdout`), or
    /// none (`off`).
    #[arg(long, env = "AMBIT_ACCESS_LOG", default_value = "stdout", value_parser = ["stdout", "off"])]
    pub access_log: String,
    /// Data-plane worker threads.
    #[arg(long, env = "AMBIT_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,

    /// Log filter (tracing EnvFilter syntax), e.g. `info,ambit_node_agent=debug`.
    #[arg(long, env = "AMBIT_LOG", default_value = "info")]
    pub log: String,

    /// Log as JSON lines.
    #[arg(long, env = "AMBIT_LOG_JSON")]
    pub log_json: bool,
}

impl Config {
    /// Where waypoints on this node get their certificate (Envoy SDS).
    pub fn sds_socket(&self) -> PathBuf {
        self.state_dir.join("sds.sock")
    }

    /// The enrollment socket path, defaulted from the state directory.
    pub fn enroll_socket(&self) -> PathBuf {
        self.enroll_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("enroll.sock"))
    }
}

pub use ambit_mesh::cidr::Cidr;

/// The kernel programs' log level for a `--log` filter: debug (4) only if a directive
/// turns on debug or trace for every target or for the programs' target
/// (`ambit_ebpf`); else info (3). A directive naming another target
/// (`ambit_node_agent=debug`) does not flood the kernel ring buffer.
pub fn kernel_log_level(filter: &str) -> u8 {
    const KERNEL_TARGET: &str = "ambit_ebpf";
    let verbose = |level: &str| {
        let l = level.trim().to_ascii_lowercase();
        l == "debug" || l == "trace" || l == "4" || l == "5"
    };
    let is_level = |s: &str| {
        matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "off"
                | "error"
                | "warn"
                | "info"
                | "debug"
                | "trace"
                | "0"
                | "1"
                | "2"
                | "3"
                | "4"
                | "5"
        )
    };
    let debug = filter.split(',').map(str::trim).any(|d| {
        if d.is_empty() {
            return false;
        }
        match d.rsplit_once('=') {
            Some((target, level)) => {
                // `target[span{field}]=level`: only the target part names a module.
                let target = target.split('[').next().unwrap_or("").trim();
                let ours = target.is_empty()
                    || target == KERNEL_TARGET
                    || target.starts_with("ambit_ebpf::");
                ours && verbose(level)
            }
            // A bare level applies to every target; a bare target means all its levels.
            None if is_level(d) => verbose(d),
            None => {
                let target = d.split('[').next().unwrap_or("").trim();
                target == KERNEL_TARGET || target.starts_with("ambit_ebpf::")
            }
        }
    });
    if debug { 4 } else { 3 }
}

/// Parses `500ms`, `10s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?} (use ms, s or m)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().len, 8);
        assert_eq!("fd00::1".parse::<Cidr>().unwrap().len, 128);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn kernel_debug_logs_need_a_directive_that_reaches_the_kernel_target() {
        for (filter, level) in [
            ("info", 3),
            ("debug", 4),
            ("TRACE", 4),
            ("info,ambit_node_agent=debug", 3),
            ("info,hyper=trace,h2=debug", 3),
            ("warn,ambit_ebpf=debug", 4),
            ("ambit_ebpf", 4),
            ("ambit_ebpf=info", 3),
            ("ambit_node_agent[conn{debug=1}]=info", 3),
            ("info,debugger=info", 3),
            ("", 3),
        ] {
            assert_eq!(kernel_log_level(filter), level, "{filter:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3h").is_err());
    }
}
