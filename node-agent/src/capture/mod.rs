//! Capture: which pods the agent captures, and the kernel side of capturing them.
//!
//! - [`datapath`]: the kernel programs and maps (load, attach, pin; uninstall);
//! - [`pods`]: the pods the enrollment API told us about, and the state file;
//! - [`listeners`], [`podnet`]: the agent's sockets and delivery setup inside a pod;
//! - [`enroll_server`]: the enrollment API (what a CNI plugin calls);
//! - [`counters`]: the kernel's per-workload counters and the pods' own, for `/metrics`.
//!
//! [`Capture`] enrolls and releases pods. It produces a pod's listeners and hands them
//! to a [`PodServer`] (the proxy), which it knows only through that trait: capture never
//! depends on the proxy.
//!
//! Order matters for correctness. On enroll the pod's listeners exist *before* its netns
//! cookie enters the kernel's `ENROLLED` map, so no connect is redirected to a port
//! nobody listens on. On release the cookie leaves the map first, then the listeners
//! close; connections already proxied run to their end.

pub mod cgroups;
pub mod counters;
pub mod datapath;
pub mod discover;
pub mod enroll_server;
pub mod listeners;
pub mod podnet;
pub mod pods;

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ambit_mesh::enroll::{EnrolledPod, PodSpec};
use ambit_mesh::netns::Netns;
use ambit_xds::client::XdsStatus;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use self::datapath::Datapath;
use self::listeners::PodListeners;
use self::pods::{Pod, PodRegistry};
use crate::state::Store;

/// Serves the listeners of a captured pod (the proxy implements it).
pub trait PodServer: Send + Sync + 'static {
    /// Starts serving `listeners` for `pod`; the returned tasks are aborted when the pod
    /// is released (closing the listeners; connections already accepted go on).
    fn serve(&self, pod: &Arc<Pod>, listeners: PodListeners) -> io::Result<Vec<JoinHandle<()>>>;
}

/// Where a captured connection was going, as the kernel recorded it.
pub trait OriginalDestinations: Send + Sync + 'static {
    /// Reads and forgets the original destination of the connection accepted from
    /// `peer` on the outbound listener of the pod whose netns has `netns_cookie`.
    fn take(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr>;
}

/// Why an enrollment request was refused. Nothing changed when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    /// The request is malformed.
    #[error("invalid pod: {0}")]
    Invalid(String),
    /// The uid is enrolled already.
    #[error("pod uid {0:?} is already enrolled")]
    Duplicate(String),
    /// The uid is not enrolled.
    #[error("pod uid {0:?} is not enrolled")]
    Unknown(String),
    /// The network namespace cannot be opened.
    #[error("network namespace {path:?}: {source}")]
    Netns {
        /// Its path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// Another pod has this network namespace.
    #[error("network namespace {path:?} is already enrolled as pod {uid:?}")]
    NetnsInUse {
        /// Its path.
        path: String,
        /// The other pod.
        uid: String,
    },
    /// A listener could not be opened in the pod.
    #[error("opening the agent's listeners in pod {uid:?}: {source}")]
    Listener {
        /// The pod.
        uid: String,
        /// Why.
        source: io::Error,
    },
    /// A kernel map refused the update.
    #[error("kernel map update failed: {0}")]
    Datapath(#[from] datapath::DatapathError),
}

/// Enrolls and releases pods: the enrollment API's backend, and the reconciler that
/// follows the control plane.
pub struct Capture {
    /// The kernel side.
    pub datapath: Arc<Datapath>,
    /// The pods.
    pub pods: Arc<PodRegistry>,
    server: Arc<dyn PodServer>,
    store: Arc<Store>,
    xds: Arc<XdsStatus>,
    /// A control plane decides which known pods are captured (else: all of them, at
    /// once, and outbound only).
    xds_driven: bool,
    /// Serialises enroll/release/restore/reconcile.
    lock: Mutex<()>,
    /// Where reconciles run (they enter namespaces, so on blocking threads).
    blocking: tokio::runtime::Handle,
    /// The pod cgroup, where pods no CNI call announced are looked for ([`discover`]).
    discover_under: Option<PathBuf>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("pods", &self.pods.len())
            .field("xds_driven", &self.xds_driven)
            .finish_non_exhaustive()
    }
}

impl Capture {
    /// Capture over `datapath`, serving pods with `server`.
    pub fn new(
        datapath: Arc<Datapath>,
        pods: Arc<PodRegistry>,
        server: Arc<dyn PodServer>,
        store: Arc<Store>,
        xds: Arc<XdsStatus>,
        xds_driven: bool,
        blocking: tokio::runtime::Handle,
    ) -> Self {
        Self {
            datapath,
            pods,
            server,
            store,
            xds,
            xds_driven,
            lock: Mutex::new(()),
            blocking,
            discover_under: None,
        }
    }

    /// Also finds running pods the enrollment API was not told about: those the control
    /// plane says are enrolled on this node, through their kubelet cgroup under
    /// `pod_cgroup` ([`discover`]).
    pub fn discovering_under(mut self, pod_cgroup: PathBuf) -> Self {
        self.discover_under = Some(pod_cgroup);
        self
    }

    fn serial(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The enrollment API's `add`: records the pod. Without a control plane its traffic
    /// is captured at once; with one, [`Capture::reconcile`] captures it when the
    /// control plane says it is enrolled.
    pub fn enroll(self: &Arc<Self>, spec: PodSpec) -> Result<EnrolledPod, EnrollmentError> {
        let _serial = self.serial();
        validate_request(&spec)?;
        if self.pods.is_known(&spec.uid) {
            return Err(EnrollmentError::Duplicate(spec.uid));
        }
        let described = if self.xds_driven {
            // Check the namespace now, so a bad request is refused rather than failing later.
            let netns_err = |source| EnrollmentError::Netns {
                path: spec.netns.clone(),
                source,
            };
            let netns_cookie = Netns::open(&spec.netns)
                .and_then(|n| n.cookie())
                .map_err(netns_err)?;
            if let Some(other) = self
                .pods
                .known()
                .into_iter()
                .find(|k| k.netns == spec.netns)
            {
                return Err(EnrollmentError::NetnsInUse {
                    path: spec.netns.clone(),
                    uid: other.uid,
                });
            }
            self.pods.add_known(spec.clone());
            // A pod of an enrolled namespace is captured now, before the kubelet starts
            // its containers, even if the control plane has not described it yet.
            let synced = self.xds.synced(&[ambit_xds::type_url::WORKLOAD]);
            if synced && self.store.captures(&spec.uid, &spec.namespace) {
                match self.open_pod(spec.clone(), None) {
                    Ok(pod) => pod.describe(),
                    Err(e) => {
                        self.pods.remove_known(&spec.uid);
                        return Err(e);
                    }
                }
            } else {
                self.reconcile_soon();
                EnrolledPod {
                    spec,
                    workload_id: 0,
                    netns_cookie,
                    captured: false,
                }
            }
        } else {
            let pod = self.open_pod(spec.clone(), None)?;
            self.pods.add_known(spec);
            pod.describe()
        };
        self.save_state();
        Ok(described)
    }

    /// The enrollment API's `remove`: forgets the pod and stops capturing it (its open
    /// connections finish).
    pub fn release(&self, uid: &str) -> Result<(), EnrollmentError> {
        let _serial = self.serial();
        self.pods
            .remove_known(uid)
            .ok_or_else(|| EnrollmentError::Unknown(uid.to_owned()))?;
        self.stop_capture(uid);
        self.save_state();
        Ok(())
    }

    /// With a control plane: captures every known pod it says is enrolled (or, not
    /// described yet, whose namespace is enrolled) and releases the others. Does nothing before the first xDS sync, so a restarted agent keeps
    /// capturing what it captured until the control plane has spoken.
    pub fn reconcile(self: &Arc<Self>) {
        if !self.xds_driven || !self.xds.synced(&[ambit_xds::type_url::WORKLOAD]) {
            return;
        }
        let _serial = self.serial();
        let mut changed = self.discover();
        for spec in self.pods.known() {
            let want = self.store.captures(&spec.uid, &spec.namespace);
            let have = self.pods.get(&spec.uid).is_some();
            if want && !have {
                let uid = spec.uid.clone();
                match self.open_pod(spec, None) {
                    Ok(_) => changed = true,
                    Err(e) => warn!(uid, "could not start capturing an enrolled pod: {e}"),
                }
            } else if !want && have {
                self.stop_capture(&spec.uid);
                changed = true;
            }
        }
        if changed {
            self.save_state();
        }
    }

    /// Adds to the known pods every enrolled workload of this node that runs but was not
    /// announced, found through its cgroup; true if it found any.
    fn discover(&self) -> bool {
        let Some(root) = &self.discover_under else {
            return false;
        };
        let missing: Vec<_> = self
            .store
            .read(|s| s.local_enrolled())
            .into_iter()
            .filter(|w| !self.pods.is_known(&w.uid))
            .collect();
        if missing.is_empty() {
            return false;
        }
        let cgroups = discover::pod_cgroups(root);
        let mut found = false;
        for w in missing {
            let Some(pid) = cgroups.get(&*w.uid).and_then(|dir| discover::any_pid(dir)) else {
                continue; // not started yet, or on its way: the CNI plugin will announce it
            };
            let netns = match discover::netns_path(pid, &discover::NETNS_DIRS) {
                Ok(p) => p,
                Err(e) => {
                    warn!(uid = %w.uid, pid, "found a running pod but not its network namespace: {e}");
                    continue;
                }
            };
            let spec = PodSpec {
                uid: w.uid.to_string(),
                namespace: w.namespace().to_owned(),
                name: w.name().to_string(),
                netns,
                ips: w.ips.iter().collect(),
            };
            if validate_request(&spec).is_err() {
                continue;
            }
            if let Some(other) = self
                .pods
                .known()
                .into_iter()
                .find(|k| k.netns == spec.netns)
            {
                warn!(uid = %w.uid, other = %other.uid, "found a running pod whose network namespace is another pod's; leaving it");
                continue;
            }
            info!(uid = %w.uid, pod = %w.display_name(), netns = %spec.netns, "found a running pod through its cgroup; enrolling it");
            self.pods.add_known(spec);
            found = true;
        }
        found
    }

    /// Runs [`Capture::reconcile`] on a blocking thread (it enters namespaces).
    pub fn reconcile_soon(self: &Arc<Self>) {
        let capture = self.clone();
        self.blocking.spawn_blocking(move || capture.reconcile());
    }

    fn stop_capture(&self, uid: &str) {
        if let Some(pod) = self.pods.get(uid) {
            self.datapath.unenroll(pod.netns_cookie);
            self.datapath
                .release_inbound(pod.netns_cookie, &pod.spec.ips);
            self.pods.remove(uid);
            info!(uid, "pod released: no longer captured");
        }
    }

    fn save_state(&self) {
        if let Err(e) = self.pods.save() {
            warn!(
                "could not save the state file (a restarted agent will not know this change): {e}"
            );
        }
    }

    /// Takes over the pods a previous agent knew and captured (from the state file), and
    /// clears kernel entries for pods that no longer exist.
    pub fn restore(self: &Arc<Self>) -> io::Result<()> {
        let _serial = self.serial();
        let saved = match self.pods.load_saved() {
            Ok(s) => s,
            Err(e) => {
                warn!("ignoring an unreadable state file: {e}");
                Default::default()
            }
        };
        self.pods.set_next_workload_id(saved.next_workload_id);
        let known = if saved.known.is_empty() {
            saved.pods.iter().map(|p| p.spec.clone()).collect()
        } else {
            saved.known
        };
        for spec in known {
            if Netns::open(&spec.netns).is_ok() {
                self.pods.add_known(spec);
            } else {
                info!(uid = %spec.uid, "forgetting a pod whose network namespace is gone");
            }
        }
        let mut kept = HashSet::new();
        for p in saved.pods {
            let uid = p.spec.uid.clone();
            if !self.pods.is_known(&uid) {
                continue;
            }
            match self.open_pod(p.spec, Some(p.workload_id)) {
                Ok(pod) => {
                    if pod.netns_cookie != p.netns_cookie {
                        info!(
                            uid,
                            "pod's network namespace was recreated; capturing the new one"
                        );
                    }
                    kept.insert(pod.netns_cookie);
                    info!(uid, "took over a captured pod");
                }
                Err(e) => warn!(uid, "dropping a previously captured pod: {e}"),
            }
        }
        for (cookie, _) in self.datapath.enrolled() {
            if !kept.contains(&cookie) {
                self.datapath.unenroll(cookie);
                info!(cookie, "removed a stale kernel enrollment");
            }
        }
        let kept_pods = self.pods.all();
        let cookies: Vec<u64> = kept_pods.iter().map(|p| p.netns_cookie).collect();
        let ips: Vec<_> = kept_pods.iter().flat_map(|p| p.spec.ips.clone()).collect();
        self.datapath.sweep_inbound(&cookies, &ips);
        self.pods.save()
    }

    /// Opens the pod's listeners, has them served, then captures it.
    fn open_pod(
        self: &Arc<Self>,
        spec: PodSpec,
        workload_id: Option<u32>,
    ) -> Result<Arc<Pod>, EnrollmentError> {
        let netns_err = |source| EnrollmentError::Netns {
            path: spec.netns.clone(),
            source,
        };
        let netns = Netns::open(&spec.netns).map_err(netns_err)?;
        let netns_cookie = netns.cookie().map_err(netns_err)?;
        if let Some(other) = self.pods.by_cookie(netns_cookie) {
            return Err(EnrollmentError::NetnsInUse {
                path: spec.netns.clone(),
                uid: other.spec.uid.clone(),
            });
        }
        let listener_err = |source| EnrollmentError::Listener {
            uid: spec.uid.clone(),
            source,
        };
        let mut listeners = PodListeners {
            outbound: netns
                .run(listeners::open_outbound)
                .and_then(|r| r)
                .map_err(listener_err)?,
            ..Default::default()
        };
        // Inbound capture needs identities, so only with a control plane.
        if self.xds_driven {
            let ips = spec.ips.clone();
            (listeners.hbone, listeners.plaintext) = netns
                .run(move || listeners::open_inbound(&ips))
                .and_then(|r| r)
                .map_err(listener_err)?;
        }
        // The listener tasks own the sockets these fds name; they live until aborted.
        let steer_to: Vec<_> = listeners
            .plaintext
            .iter()
            .map(|(ip, l)| (*ip, std::os::fd::AsRawFd::as_raw_fd(l)))
            .collect();
        let workload_id = workload_id.unwrap_or_else(|| self.pods.allocate_workload_id());
        let pod = Arc::new(Pod {
            spec,
            workload_id,
            netns_cookie,
            netns: Arc::new(netns),
            counters: Arc::default(),
            sockets: Default::default(),
        });
        let tasks =
            self.server
                .serve(&pod, listeners)
                .map_err(|source| EnrollmentError::Listener {
                    uid: pod.spec.uid.clone(),
                    source,
                })?;
        // Listeners first, then capture (see the module docs).
        let captured = self
            .datapath
            .enroll(netns_cookie, workload_id)
            .and_then(|()| {
                if steer_to.is_empty() {
                    Ok(())
                } else {
                    self.datapath.capture_inbound(
                        &*pod.netns,
                        netns_cookie,
                        &pod.spec.ips,
                        &steer_to,
                    )
                }
            });
        if let Err(e) = captured {
            self.datapath.unenroll(netns_cookie);
            self.datapath.release_inbound(netns_cookie, &pod.spec.ips);
            tasks.iter().for_each(|t| t.abort());
            return Err(e.into());
        }
        self.pods.insert(pod.clone(), tasks);
        Ok(pod)
    }
}

/// Checks an enrollment request the way `add` does, without touching anything (also the
/// enrollment API's fuzz entry point).
pub fn validate_request(spec: &PodSpec) -> Result<(), EnrollmentError> {
    for (field, value) in [
        ("uid", &spec.uid),
        ("namespace", &spec.namespace),
        ("name", &spec.name),
        ("netns", &spec.netns),
    ] {
        if value.trim().is_empty() {
            return Err(EnrollmentError::Invalid(format!("{field} is empty")));
        }
        if value.len() > 253 && field != "netns" {
            return Err(EnrollmentError::Invalid(format!(
                "{field} is longer than 253 bytes"
            )));
        }
    }
    if spec.ips.is_empty() {
        return Err(EnrollmentError::Invalid(
            "ips is empty: a pod needs at least one IP".into(),
        ));
    }
    if spec.ips.iter().filter(|ip| ip.is_ipv4()).count() > 1
        || spec.ips.iter().filter(|ip| ip.is_ipv6()).count() > 1
    {
        return Err(EnrollmentError::Invalid(
            "ips holds more than one address of a family".into(),
        ));
    }
    if let Some(ip) = spec
        .ips
        .iter()
        .find(|ip| ip.is_loopback() || ip.is_unspecified() || ip.is_multicast())
    {
        return Err(EnrollmentError::Invalid(format!("{ip} cannot be a pod IP")));
    }
    Ok(())
}
