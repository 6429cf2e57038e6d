//! Ambit's node agent: captures enrolled pods' TCP connections with eBPF and proxies them.
//!
//! Components, each a module that depends only on the ones below it and never on this
//! file:
//! - [`config`]: every flag and environment variable, read once;
//! - [`state`]: the mesh as the control plane describes it (fed by xDS);
//! - [`identity`]: workload certificates (the CA client) and the TLS built from them;
//! - [`telemetry`]: metrics, Istio's TCP metrics and the access log;
//! - [`capture`]: the kernel programs, the enrolled pods and the enrollment API; it hands
//!   each captured pod's listeners to a [`capture::PodServer`];
//! - [`proxy`]: that server: outbound HBONE or passthrough, inbound mTLS and policy;
//! - [`admin`]: readiness, `/metrics` and the debug endpoints.
//!
//! [`run`] builds them, wires them together and, on SIGTERM, drains: it stops accepting,
//! lets open connections finish for up to the drain timeout, and exits leaving the
//! kernel programs attached, so every enrolled pod fails closed until the next agent
//! takes over. [`uninstall`] is the one way to remove the programs.
//!
//! Two runtimes: the data plane (multi-threaded) runs listeners and proxied connections;
//! a current-thread runtime on its own thread runs the admin, metrics, enrollment, xDS
//! and CA clients, so a burst of control work never stalls forwarding.

pub mod admin;
pub mod capture;
pub mod config;
pub mod identity;
pub mod proxy;
pub mod state;
pub mod telemetry;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::admin::AdminState;
use crate::capture::Capture;
use crate::capture::datapath::Datapath;
use crate::capture::pods::PodRegistry;
use crate::config::Config;
use crate::identity::tls::TlsConfigs;
use crate::proxy::{Inputs, Proxy};
use crate::state::Store;
use crate::telemetry::Telemetry;

/// Runs the agent until SIGTERM or SIGINT, then drains and exits, leaving capture in
/// place (see the crate docs).
pub fn run(config: Config) -> anyhow::Result<()> {
    // Before any thread starts: threads inherit the namespace of the thread creating them.
    if let Some(ns) = &config.host_cgroupns {
        capture::cgroups::enter_cgroupns(ns)?;
    }
    raise_fd_limit();
    // Worker 0 is this thread, driven by the `block_on`s below; the rest run on their own.
    let (data_plane, workers) = proxy::workers::Workers::start(config.worker_threads)
        .context("starting the data-plane workers")?;

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
    let cgroup_root = config.cgroup_root.clone().unwrap_or_else(cgroup2_mount);
    let pod_cgroup = capture::cgroups::prepare(
        config.pod_cgroup.as_deref(),
        config.own_cgroup.as_deref(),
        &cgroup_root,
    )?;
    let datapath = Arc::new(Datapath::load(
        &config.ebpf_object,
        &pod_cgroup,
        &config.bpffs_dir,
        &config.exclude_cidrs,
        &config.exclude_ports,
        config::kernel_log_level(&config.log),
    )?);
    let pods = Arc::new(PodRegistry::new(&config.state_dir));
    let xds = Arc::new(ambit_xds::client::XdsStatus::default());
    let store = Arc::new(Store::new(config.node_name.clone()));
    let certs: Arc<identity::Certificates> = Arc::default();
    let tls = Arc::new(TlsConfigs::new(certs.clone()));
    let telemetry = {
        let mut t =
            Telemetry::new(config.access_log == "stdout").context("starting the access log")?;
        t.register_collector(Box::new(capture::counters::PodCollector {
            datapath: datapath.clone(),
            pods: pods.clone(),
        }));
        t.register_collector(Box::new(telemetry::xds::XdsCollector(xds.clone())));
        Arc::new(t)
    };
    let sockets =
        Arc::new(proxy::dialer::NetnsDialer::start().context("starting the netns dialer")?);
    let pool = {
        let _rt = data_plane.enter();
        let pool = ambit_hbone::pool::Pool::new(
            proxy::hbone_dialer::HboneDialer {
                sockets: sockets.clone(),
                tls: tls.clone(),
                timeout: config.connect_timeout,
                dials: telemetry.hbone_dials.clone(),
            },
            ambit_hbone::pool::PoolConfig::default(),
        );
        pool.reap_periodically();
        pool
    };
    let recent = Arc::new(proxy::RecentConnections::default());
    let tracing = match &config.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let _rt = data_plane.enter();
            Some(
                ambit_otel::Tracing::otlp(&ambit_otel::Config {
                    endpoint: endpoint.clone(),
                    service: "ambit-agent".into(),
                    resource: vec![("k8s.node.name".into(), config.node_name.clone())],
                    sample_percent: config.trace_sampling,
                })
                .context("tracing")?,
            )
        }
    };
    let inputs = Arc::new(Inputs {
        connect_timeout: config.connect_timeout,
        state: store.clone(),
        certs: certs.clone(),
        tls,
        pool: pool.clone(),
        sockets,
        orig_dst: datapath.clone(),
        conns: Default::default(),
        lb: Default::default(),
        telemetry: telemetry.clone(),
        recent: recent.clone(),
        tracing,
        limiter: Default::default(),
    });
    let proxy = Arc::new(Proxy::new(inputs.clone(), workers.clone()));
    let capture = Arc::new(
        Capture::new(
            datapath.clone(),
            pods.clone(),
            proxy,
            store.clone(),
            xds.clone(),
            config.xds_address.is_some(),
            data_plane.handle().clone(),
        )
        .discovering_under(pod_cgroup.clone()),
    );
    capture
        .restore()
        .context("taking over previously enrolled pods")?;
    let admin = Arc::new(AdminState {
        node: config.node_name.clone(),
        xds_address: config.xds_address.clone(),
        ready: Default::default(),
        telemetry: telemetry.clone(),
        pods: pods.clone(),
        store: store.clone(),
        certs: certs.clone(),
        xds: xds.clone(),
        pool,
        recent,
    });

    let control = start_control(&config, &admin, &capture, &inputs, node_credential)?;
    admin.ready.store(true, Ordering::Release);
    info!(pods = pods.len(), "node agent ready");

    data_plane.block_on(shutdown_signal())?;
    // Fail closed: the programs stay attached and the pods' kernel entries stay, so a
    // captured connect finds no listener (refused) and steered plaintext is dropped
    // until the next agent takes over. Only `ambit-agent uninstall` removes capture.
    admin.ready.store(false, Ordering::Release);
    let _ = std::fs::remove_file(config.enroll_socket());
    pods.clear();
    let open = data_plane.block_on(drain(&telemetry, config.drain_timeout));
    info!(
        still_open = open,
        "shutting down; capture stays in place until the next agent takes over"
    );
    drop(control);
    drop(workers);
    data_plane.shutdown_background();
    Ok(())
}

/// Waits until no connection is being proxied, or `timeout`. Returns how many are
/// still open (they are cut when the process exits).
async fn drain(telemetry: &Telemetry, timeout: Duration) -> i64 {
    let deadline = Instant::now() + timeout;
    let active = || telemetry.active_connections.get();
    if active() > 0 {
        info!(open = active(), ?timeout, "draining open connections");
    }
    while active() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    active()
}

/// The admin, metrics, readiness and enrollment servers and the control-plane clients,
/// on their own thread and runtime. Binding happens before this returns, so a bind
/// error stops the agent at start.
fn start_control(
    config: &Config,
    admin: &Arc<AdminState>,
    capture: &Arc<Capture>,
    inputs: &Arc<Inputs>,
    node_credential: Option<String>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (metrics, ready, admin_l) = rt.block_on(async {
        let bind = |addr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))
        };
        anyhow::Ok((
            bind(config.metrics_addr).await?,
            bind(config.ready_addr).await?,
            bind(config.admin_addr).await?,
        ))
    })?;
    let enroll_path = config.enroll_socket();
    let enroll = {
        let _g = rt.enter();
        capture::enroll_server::bind(&enroll_path)
            .with_context(|| format!("binding {}", enroll_path.display()))?
    };
    let sds_path = config.sds_socket();
    let sds = {
        let _g = rt.enter();
        let _ = std::fs::remove_file(&sds_path);
        let l = tokio::net::UnixListener::bind(&sds_path)
            .with_context(|| format!("binding {}", sds_path.display()))?;
        // Anyone may connect: a caller is known by its process, not by the file's mode.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sds_path, std::fs::Permissions::from_mode(0o666))?;
        l
    };
    let control_plane = match &config.xds_address {
        Some(address) => {
            let _g = rt.enter();
            let root = match &config.xds_root_cert {
                Some(path) => Some(std::fs::read_to_string(path).with_context(|| {
                    format!("reading the mesh root certificate {}", path.display())
                })?),
                None => None,
            };
            Some({
                let cp = ambit_xds::channel::ControlPlane::new(address, None, root.as_deref())
                    .with_context(|| format!("the control plane address {address:?}"))?;
                // Read again for every call: a projected ServiceAccount token rotates.
                match &config.node_credential_file {
                    Some(path) => cp
                        .with_credential_file(path)
                        .with_context(|| format!("the node credential {}", path.display()))?,
                    None => cp,
                }
            })
        }
        None => None,
    };
    let logger = capture.datapath.take_logger();
    let (admin, capture, inputs) = (admin.clone(), capture.clone(), inputs.clone());
    let (node, ttl) = (config.node_name.clone(), config.cert_ttl);
    let state_dir = config.state_dir.clone();
    let has_credential = node_credential.is_some();
    Ok(std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            rt.block_on(async move {
                use admin::Endpoints;
                tokio::spawn(admin::serve(metrics, admin.clone(), Endpoints::Metrics));
                tokio::spawn(admin::serve(ready, admin.clone(), Endpoints::Ready));
                tokio::spawn(admin::serve(admin_l, admin.clone(), Endpoints::Admin));
                tokio::spawn(capture::enroll_server::serve(enroll, capture.clone()));
                let service = identity::sds::Sds {
                    state: inputs.state.clone(),
                    certs: inputs.certs.clone(),
                    pods: capture.pods.clone(),
                }
                .into_service();
                tokio::spawn(async move {
                    if let Err(e) = tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(sds))
                        .await
                    {
                        warn!("the SDS server stopped: {e}");
                    }
                });
                if let Some(logger) = logger {
                    tokio::spawn(forward_kernel_logs(logger));
                }
                let _xds = control_plane.map(|cp| {
                    if has_credential {
                        let client = identity::ca_client::CaClient {
                            control_plane: cp.clone(),
                            ttl,
                        };
                        tokio::spawn(identity::ca_client::run(
                            client,
                            inputs.state.clone(),
                            inputs.certs.clone(),
                        ));
                    }
                    start_xds(cp, node, &admin, &capture, &inputs, &state_dir)
                });
                std::future::pending::<()>().await
            })
        })?)
}

/// Subscribes to the control plane and, after every change, reconciles enrollment and
/// re-authorizes open inbound connections. Returns the client, which runs until dropped.
fn start_xds(
    control_plane: ambit_xds::channel::ControlPlane,
    node: String,
    admin: &AdminState,
    capture: &Arc<Capture>,
    inputs: &Arc<Inputs>,
    state_dir: &Path,
) -> ambit_xds::client::XdsClient {
    let config = ambit_xds::client::XdsClientConfig {
        control_plane,
        node_id: node,
        types: ambit_xds::type_url::NODE_AGENT.to_vec(),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(15),
    };
    let handler = state::xds::StoreHandler::new(inputs.state.clone());
    let client =
        ambit_xds::client::XdsClient::spawn_with_status(config, handler, admin.xds.clone());
    let mut changes = inputs.state.changes();
    let (capture, inputs) = (capture.clone(), inputs.clone());
    let state_dir = state_dir.to_owned();
    tokio::spawn(async move {
        let mut namespaces = None;
        while changes.changed().await.is_ok() {
            capture.reconcile_soon();
            // What the CNI plugin needs while this agent is down.
            let now = inputs.state.read(state::MeshState::enrolled_namespaces);
            if namespaces.as_ref() != Some(&now) {
                match ambit_mesh::enroll::write_enrolled_namespaces(&state_dir, &now) {
                    Ok(()) => namespaces = Some(now),
                    Err(e) => {
                        warn!("could not write the enrolled namespaces for the CNI plugin: {e}")
                    }
                }
            }
            // A policy change applies to open connections too.
            let closed = inputs.state.read(|s| inputs.conns.revalidate(s));
            if closed > 0 {
                info!(closed, "closing connections the new policy denies");
            }
        }
    });
    client
}

/// What [`uninstall`] did.
#[derive(Debug)]
pub struct Uninstalled {
    /// Links detached and map pins removed.
    pub datapath: capture::datapath::Uninstalled,
    /// The state file was removed.
    pub state_file: bool,
}

/// Removes Ambit from this node: detaches every program, removes the pins under
/// `bpffs_dir` and the state file under `state_dir`. Every pod is released at once
/// (connections go direct, STRICT pods accept plaintext), so it refuses while an agent
/// answers on `enroll_socket`.
pub fn uninstall(
    bpffs_dir: &Path,
    state_dir: &Path,
    enroll_socket: &Path,
) -> anyhow::Result<Uninstalled> {
    if std::os::unix::net::UnixStream::connect(enroll_socket).is_ok() {
        anyhow::bail!(
            "an agent is running (it answers on {}): stop it first; uninstalling under a \
             running agent would release every pod it captures",
            enroll_socket.display()
        );
    }
    let datapath = capture::datapath::uninstall(bpffs_dir)
        .with_context(|| format!("removing the programs pinned in {}", bpffs_dir.display()))?;
    let mut state_file = false;
    // The pod list, and the namespaces the CNI plugin would hold pods for.
    for name in [
        capture::pods::STATE_FILE,
        ambit_mesh::enroll::ENROLLED_NAMESPACES_FILE,
    ] {
        let path = state_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => state_file |= name == capture::pods::STATE_FILE,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(Uninstalled {
        datapath,
        state_file,
    })
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid
/// hosts.
fn cgroup2_mount() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        unified.to_owned()
    } else {
        PathBuf::from("/sys/fs/cgroup")
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
