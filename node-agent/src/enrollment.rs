//! Enrolling and releasing pods, and taking over the pods a previous agent enrolled.
//!
//! Order matters for correctness. On enroll the pod's outbound listeners exist *before*
//! its netns cookie enters the kernel's `ENROLLED` map, so no connect is redirected to a
//! port nobody listens on. On release the cookie leaves the map first, then the listeners
//! close; connections already proxied run to their end.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ambit_ebpf_common::OUTBOUND_PORT;
use ambit_mesh::enroll::{EnrolledPod, PodSpec};
use ambit_mesh::netns::Netns;
use tracing::{info, warn};

use crate::Agent;
use crate::inbound::listen;
use crate::metrics::WorkloadLabels;
use crate::pods::Pod;

/// Why an enrollment request was refused. Nothing changed when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    #[error("invalid pod: {0}")]
    Invalid(String),
    #[error("pod uid {0:?} is already enrolled")]
    Duplicate(String),
    #[error("pod uid {0:?} is not enrolled")]
    Unknown(String),
    #[error("network namespace {path:?}: {source}")]
    Netns { path: String, source: io::Error },
    #[error("network namespace {path:?} is already enrolled as pod {uid:?}")]
    NetnsInUse { path: String, uid: String },
    #[error("opening the outbound listener in pod {uid:?}: {source}")]
    Listener { uid: String, source: io::Error },
    #[error("kernel map update failed: {0}")]
    Datapath(#[from] crate::datapath::DatapathError),
}

impl Agent {
    /// The enrollment API's `add`: records the pod. Without a control plane its traffic
    /// is captured at once; with one, [`Agent::reconcile`] captures it when the control
    /// plane says it is enrolled.
    pub fn enroll(self: &Arc<Self>, spec: PodSpec) -> Result<EnrolledPod, EnrollmentError> {
        let _serial = self.enroll_lock.lock().unwrap();
        validate(&spec)?;
        if self.pods.is_known(&spec.uid) {
            return Err(EnrollmentError::Duplicate(spec.uid));
        }
        let described = if self.xds_driven() {
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
            self.reconcile_soon();
            EnrolledPod {
                spec,
                workload_id: 0,
                netns_cookie,
                captured: false,
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
        let _serial = self.enroll_lock.lock().unwrap();
        self.pods
            .remove_known(uid)
            .ok_or_else(|| EnrollmentError::Unknown(uid.to_owned()))?;
        self.stop_capture(uid);
        self.save_state();
        Ok(())
    }

    /// With a control plane: captures every known pod it says is enrolled and releases
    /// the others. Does nothing before the first xDS sync, so a restarted agent keeps
    /// capturing what it captured until the control plane has spoken.
    pub fn reconcile(self: &Arc<Self>) {
        if !self.xds_driven() || !self.xds_synced() {
            return;
        }
        let _serial = self.enroll_lock.lock().unwrap();
        let mut changed = false;
        for spec in self.pods.known() {
            let want = self.store.enrolled(&spec.uid);
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

    /// Runs [`Agent::reconcile`] on a blocking thread (it enters namespaces).
    pub fn reconcile_soon(self: &Arc<Self>) {
        let agent = self.clone();
        self.data_plane.spawn_blocking(move || agent.reconcile());
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
        let _serial = self.enroll_lock.lock().unwrap();
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
        let listeners = netns
            .run(open_listeners)
            .and_then(|r| r)
            .map_err(|source| EnrollmentError::Listener {
                uid: spec.uid.clone(),
                source,
            })?;
        // Inbound capture needs identities, so only with a control plane.
        let inbound = if self.xds_driven() {
            let ips = spec.ips.clone();
            Some(
                netns
                    .run(move || crate::inbound::open_listeners(&ips))
                    .and_then(|r| r)
                    .map_err(|source| EnrollmentError::Listener {
                        uid: spec.uid.clone(),
                        source,
                    })?,
            )
        } else {
            None
        };
        let workload_id = workload_id.unwrap_or_else(|| self.pods.allocate_workload_id());
        let pod = Arc::new(Pod {
            labels: WorkloadLabels {
                workload: spec.name.clone(),
                workload_namespace: spec.namespace.clone(),
            },
            spec,
            workload_id,
            netns_cookie,
            netns: Arc::new(netns),
        });
        let listener_err = |source| EnrollmentError::Listener {
            uid: pod.spec.uid.clone(),
            source,
        };
        let mut tasks = Vec::new();
        let mut steer_to = Vec::new();
        {
            let _rt = self.data_plane.enter();
            let abort = |tasks: &Vec<tokio::task::JoinHandle<()>>| {
                tasks.iter().for_each(|t| t.abort());
            };
            let spawn_all = || -> Result<(), EnrollmentError> {
                for l in listeners {
                    let l = tokio::net::TcpListener::from_std(l).map_err(listener_err)?;
                    tasks.push(self.data_plane.spawn(crate::outbound::serve(
                        self.clone(),
                        pod.clone(),
                        l,
                    )));
                }
                if let Some(inbound) = inbound {
                    for l in inbound.hbone {
                        let l = tokio::net::TcpListener::from_std(l).map_err(listener_err)?;
                        tasks.push(self.data_plane.spawn(crate::inbound::serve_hbone(
                            self.clone(),
                            pod.clone(),
                            l,
                        )));
                    }
                    for (ip, l) in inbound.plaintext {
                        use std::os::fd::AsRawFd;
                        steer_to.push((ip, l.as_raw_fd()));
                        let l = tokio::net::TcpListener::from_std(l).map_err(listener_err)?;
                        tasks.push(self.data_plane.spawn(crate::inbound::serve_plaintext(
                            self.clone(),
                            pod.clone(),
                            l,
                        )));
                    }
                }
                Ok(())
            };
            if let Err(e) = spawn_all() {
                abort(&tasks);
                return Err(e);
            }
        }
        // Listeners first, then capture (see the module docs). The listener tasks own the
        // sockets whose fds `steer_to` names; they are alive until aborted.
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

fn validate(spec: &PodSpec) -> Result<(), EnrollmentError> {
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

/// Runs inside the pod's namespace: the outbound listeners on 127.0.0.1:15001 and, if the
/// pod has IPv6 loopback, [::1]:15001.
fn open_listeners() -> io::Result<Vec<std::net::TcpListener>> {
    let v4 = listen(
        SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)),
        false,
    )
    .map_err(|e| {
        if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            io::Error::new(
                e.kind(),
                "127.0.0.1 is not available: is the pod's loopback interface up?",
            )
        } else {
            e
        }
    })?;
    let mut out = vec![v4];
    match listen(
        SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT)),
        false,
    ) {
        Ok(v6) => out.push(v6),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
            ) => {}
        Err(e) => return Err(e),
    }
    Ok(out)
}
