//! Ambit's node agent: captures enrolled pods' TCP connections with eBPF and proxies them.
//!
//! Parts, one module each:
//! - [`config`]: every flag and environment variable, read once;
//! - [`datapath`]: the kernel programs and maps (load, attach, pin, detach);
//! - [`pods`], [`enrollment`], [`enroll_server`]: which pods are enrolled, and the local
//!   API that enrolls them;
//! - [`outbound`], [`dialer`]: the in-pod outbound listener and the proxying;
//! - [`rbac`]: L4 authorization (evaluated by the destination's agent);
//! - [`metrics`], [`admin`]: Prometheus metrics, readiness and debug endpoints.
//!
//! Two runtimes: the data plane (multi-threaded) runs listeners and proxied connections;
//! a current-thread runtime on its own thread runs the admin, metrics and enrollment
//! servers, so a burst of control work never stalls forwarding.

pub mod admin;
pub mod config;
pub mod datapath;
pub mod dialer;
pub mod enroll_server;
pub mod enrollment;
pub mod flow;
pub mod identity;
pub mod inbound;
pub mod lb;
pub mod metrics;
pub mod mtls;
pub mod outbound;
pub mod podnet;
pub mod pods;
pub mod rbac;
pub mod store;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::config::Config;
use crate::datapath::Datapath;
use crate::dialer::NetnsDialer;
use crate::metrics::Metrics;
use crate::outbound::RecentConnections;
use crate::pods::PodRegistry;

/// The agent's shared state.
#[derive(Debug)]
pub struct Agent {
    pub config: Config,
    pub datapath: Arc<Datapath>,
    pub pods: Arc<PodRegistry>,
    pub dialer: Arc<NetnsDialer>,
    pub metrics: Metrics,
    pub recent: RecentConnections,
    /// True once the programs are attached and enrolled pods are taken over.
    pub ready: AtomicBool,
    /// Workload certificates for local identities.
    pub certs: Arc<identity::Certificates>,
    /// TLS configurations built from `certs`.
    pub tls: Arc<mtls::TlsConfigs>,
    /// HBONE connections to other agents.
    pub pool: Arc<ambit_hbone::pool::Pool<mtls::HboneDialer>>,
    /// Authorized inbound connections (closed when policy changes to deny them).
    pub conns: flow::ConnTracker,
    pub access_log: flow::AccessLog,
    pub lb: lb::LoadBalancer,
    /// What the control plane says (empty without one).
    pub store: Arc<store::Store>,
    /// The xDS client's state (never connected without a control plane).
    pub xds: Arc<ambit_xds::client::XdsStatus>,
    /// Serialises enroll/release/restore/reconcile.
    enroll_lock: Mutex<()>,
    data_plane: tokio::runtime::Handle,
}

/// Runs the agent until SIGTERM or SIGINT, then detaches the programs and exits.
pub fn run(config: Config) -> anyhow::Result<()> {
    raise_fd_limit();
    let data_plane = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads.max(1))
        .thread_name("dataplane")
        .enable_all()
        .build()
        .context("starting the data-plane runtime")?;

    let node_credential = match &config.node_credential_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the node credential {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "creating the state directory {}",
            config.state_dir.display()
        )
    })?;
    let kernel_log_level = if config.log.contains("debug") || config.log.contains("trace") {
        4
    } else {
        3
    };
    let datapath = Arc::new(Datapath::load(
        &config.ebpf_object,
        &config.pod_cgroup,
        &config.bpffs_dir,
        &config.exclude_cidrs,
        &config.exclude_ports,
        kernel_log_level,
    )?);
    let pods = Arc::new(PodRegistry::new(&config.state_dir));
    let xds = Arc::new(ambit_xds::client::XdsStatus::default());
    let metrics = Metrics::new(datapath.clone(), pods.clone(), xds.clone());
    let certs: Arc<identity::Certificates> = Arc::default();
    let tls = Arc::new(mtls::TlsConfigs::new(certs.clone()));
    let dialer = Arc::new(NetnsDialer::start().context("starting the netns dialer")?);
    let pool = {
        let _rt = data_plane.enter();
        let pool = ambit_hbone::pool::Pool::new(
            mtls::HboneDialer {
                pods: pods.clone(),
                dialer: dialer.clone(),
                tls: tls.clone(),
                timeout: config.connect_timeout,
                dials: metrics.hbone_dials.clone(),
            },
            ambit_hbone::pool::PoolConfig::default(),
        );
        pool.reap_periodically();
        pool
    };
    let agent = Arc::new(Agent {
        metrics,
        store: Arc::default(),
        certs,
        tls,
        pool,
        conns: flow::ConnTracker::default(),
        access_log: flow::AccessLog::new(config.access_log == "stdout"),
        lb: lb::LoadBalancer::default(),
        xds,
        dialer,
        recent: RecentConnections::default(),
        ready: AtomicBool::new(false),
        enroll_lock: Mutex::new(()),
        data_plane: data_plane.handle().clone(),
        config,
        datapath,
        pods,
    });
    agent
        .restore()
        .context("taking over previously enrolled pods")?;

    let control = start_control_plane(agent.clone(), node_credential)?;
    agent.ready.store(true, Ordering::Release);
    info!(pods = agent.pods.len(), "node agent ready");

    data_plane.block_on(shutdown_signal())?;
    info!("shutting down");
    agent.ready.store(false, Ordering::Release);
    agent.pods.clear();
    let _ = std::fs::remove_file(agent.config.enroll_socket());
    agent
        .datapath
        .detach()
        .context("detaching the eBPF programs")?;
    drop(control);
    data_plane.shutdown_background();
    Ok(())
}

/// The admin, metrics, readiness and enrollment servers, on their own thread and runtime.
/// Binding happens before this returns, so a bind error stops the agent at start.
fn start_control_plane(
    agent: Arc<Agent>,
    node_credential: Option<String>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cfg = &agent.config;
    let (metrics, ready, admin) = rt.block_on(async {
        let bind = |addr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))
        };
        anyhow::Ok((
            bind(cfg.metrics_addr).await?,
            bind(cfg.ready_addr).await?,
            bind(cfg.admin_addr).await?,
        ))
    })?;
    let enroll_path = cfg.enroll_socket();
    let enroll = {
        let _g = rt.enter();
        enroll_server::bind(&enroll_path)
            .with_context(|| format!("binding {}", enroll_path.display()))?
    };
    let logger = agent.datapath.take_logger();
    Ok(std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            rt.block_on(async move {
                use admin::Endpoints;
                tokio::spawn(admin::serve(metrics, agent.clone(), Endpoints::Metrics));
                tokio::spawn(admin::serve(ready, agent.clone(), Endpoints::Ready));
                tokio::spawn(admin::serve(admin, agent.clone(), Endpoints::Admin));
                tokio::spawn(enroll_server::serve(enroll, agent.clone()));
                if let Some(logger) = logger {
                    tokio::spawn(forward_kernel_logs(logger));
                }
                let _xds = start_xds(&agent);
                if let (Some(address), Some(credential)) =
                    (agent.config.xds_address.clone(), node_credential)
                {
                    let config = identity::CaClientConfig {
                        address,
                        node: agent.config.node_name.clone(),
                        credential,
                        ttl: agent.config.cert_ttl,
                    };
                    tokio::spawn(identity::run(
                        config,
                        agent.store.clone(),
                        agent.certs.clone(),
                    ));
                }
                std::future::pending::<()>().await
            })
        })?)
}

/// Connects to the control plane (if configured) and reconciles enrollment with what it
/// says after every change. Returns the client, which runs until dropped.
fn start_xds(agent: &Arc<Agent>) -> Option<ambit_xds::client::XdsClient> {
    let address = agent.config.xds_address.clone()?;
    let config = ambit_xds::client::XdsClientConfig {
        address,
        node_id: agent.config.node_name.clone(),
        types: ambit_xds::type_url::NODE_AGENT.to_vec(),
        backoff_min: std::time::Duration::from_millis(100),
        backoff_max: std::time::Duration::from_secs(15),
    };
    let handler = store::StoreHandler {
        store: agent.store.clone(),
        node: agent.config.node_name.clone(),
    };
    let client =
        ambit_xds::client::XdsClient::spawn_with_status(config, handler, agent.xds.clone());
    let mut changes = agent.store.changes();
    let agent = agent.clone();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            agent.reconcile_soon();
            // A policy change applies to open connections too.
            let closed = agent.conns.revalidate(&agent.store.snapshot());
            if closed > 0 {
                info!(closed, "closing connections the new policy denies");
            }
        }
    });
    Some(client)
}

impl Agent {
    /// Is enrollment decided by a control plane?
    pub fn xds_driven(&self) -> bool {
        self.config.xds_address.is_some()
    }

    /// Has the control plane sent the workloads at least once?
    pub fn xds_synced(&self) -> bool {
        self.xds.synced(&[ambit_xds::type_url::WORKLOAD])
    }
}

/// Moves aya-log records from the kernel's ring buffer into our log.
async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open until it is dropped,
    // which only happens after AsyncFd deregisters it.
    let mut fd =
        match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
            Ok(fd) => fd,
            Err(e) => return warn!("kernel log reader: {e}"),
        };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Each enrolled pod holds a few descriptors (listeners, its netns) and each proxied
/// connection two: raise the soft limit to the hard one, as the default 1024 would cap a
/// node at a few hundred pods.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                warn!("could not raise the open-file limit from {}", lim.rlim_cur);
            }
        }
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
