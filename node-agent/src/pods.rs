//! The enrolled pods: what the agent knows about each, and the state file that lets a
//! restarted agent take them over again.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ambit_mesh::enroll::{EnrolledPod, PodSpec};
use ambit_mesh::netns::Netns;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::metrics::WorkloadLabels;

/// An enrolled pod, shared by the tasks that serve it.
#[derive(Debug)]
pub struct Pod {
    pub spec: PodSpec,
    pub workload_id: u32,
    pub netns_cookie: u64,
    pub netns: Arc<Netns>,
    pub labels: WorkloadLabels,
}

impl Pod {
    pub fn describe(&self) -> EnrolledPod {
        EnrolledPod {
            spec: self.spec.clone(),
            workload_id: self.workload_id,
            netns_cookie: self.netns_cookie,
            captured: true,
        }
    }
}

struct Entry {
    pod: Arc<Pod>,
    /// The pod's outbound listener tasks; aborting them closes the listeners, while
    /// connections already accepted run on in their own tasks.
    listeners: Vec<JoinHandle<()>>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        for l in &self.listeners {
            l.abort();
        }
    }
}

/// What the state file holds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SavedState {
    pub next_workload_id: u32,
    /// Captured pods.
    pub pods: Vec<EnrolledPod>,
    /// Every pod the enrollment API told us about (a superset of `pods`). Absent in
    /// files written before xDS: then it is `pods`.
    #[serde(default)]
    pub known: Vec<PodSpec>,
}

/// The pods the enrollment API told us about (known), and those whose traffic is
/// captured (listeners open, netns cookie in `ENROLLED`), by uid.
pub struct PodRegistry {
    state_path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    pods: BTreeMap<String, Entry>,
    known: BTreeMap<String, PodSpec>,
    next_workload_id: u32,
}

impl std::fmt::Debug for PodRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodRegistry")
            .field("state_path", &self.state_path)
            .finish_non_exhaustive()
    }
}

impl PodRegistry {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_path: state_dir.join("pods.json"),
            inner: Mutex::new(Inner {
                pods: BTreeMap::new(),
                known: BTreeMap::new(),
                next_workload_id: 1,
            }),
        }
    }

    /// Reads the state a previous agent left. A missing file is an empty state.
    pub fn load_saved(&self) -> io::Result<SavedState> {
        match std::fs::read(&self.state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.state_path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(SavedState::default()),
            Err(e) => Err(e),
        }
    }

    pub fn set_next_workload_id(&self, id: u32) {
        let mut inner = self.inner.lock().unwrap();
        inner.next_workload_id = inner.next_workload_id.max(id);
    }

    pub fn allocate_workload_id(&self) -> u32 {
        let mut inner = self.inner.lock().unwrap();
        let id = inner.next_workload_id;
        inner.next_workload_id = inner.next_workload_id.wrapping_add(1).max(1);
        id
    }

    pub fn get(&self, uid: &str) -> Option<Arc<Pod>> {
        self.inner
            .lock()
            .unwrap()
            .pods
            .get(uid)
            .map(|e| e.pod.clone())
    }

    /// The pod enrolled with this netns cookie, if any.
    pub fn by_cookie(&self, cookie: u64) -> Option<Arc<Pod>> {
        self.inner
            .lock()
            .unwrap()
            .pods
            .values()
            .find(|e| e.pod.netns_cookie == cookie)
            .map(|e| e.pod.clone())
    }

    /// The captured pod with this IP, if any.
    pub fn by_ip(&self, ip: std::net::IpAddr) -> Option<Arc<Pod>> {
        self.inner
            .lock()
            .unwrap()
            .pods
            .values()
            .find(|e| e.pod.spec.ips.contains(&ip))
            .map(|e| e.pod.clone())
    }

    /// Every captured pod.
    pub fn all(&self) -> Vec<Arc<Pod>> {
        self.inner
            .lock()
            .unwrap()
            .pods
            .values()
            .map(|e| e.pod.clone())
            .collect()
    }

    pub fn insert(&self, pod: Arc<Pod>, listeners: Vec<JoinHandle<()>>) {
        let uid = pod.spec.uid.clone();
        self.inner
            .lock()
            .unwrap()
            .pods
            .insert(uid, Entry { pod, listeners });
    }

    /// Removes the pod; its listeners close, its open connections continue.
    pub fn remove(&self, uid: &str) -> Option<Arc<Pod>> {
        self.inner
            .lock()
            .unwrap()
            .pods
            .remove(uid)
            .map(|e| e.pod.clone())
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn labels_by_cookie(&self) -> HashMap<u64, WorkloadLabels> {
        self.inner
            .lock()
            .unwrap()
            .pods
            .values()
            .map(|e| (e.pod.netns_cookie, e.pod.labels.clone()))
            .collect()
    }

    /// Records a pod the enrollment API told us about; false if its uid is known already.
    pub fn add_known(&self, spec: PodSpec) -> bool {
        let mut inner = self.inner.lock().unwrap();
        if inner.known.contains_key(&spec.uid) {
            return false;
        }
        inner.known.insert(spec.uid.clone(), spec);
        true
    }

    pub fn remove_known(&self, uid: &str) -> Option<PodSpec> {
        self.inner.lock().unwrap().known.remove(uid)
    }

    pub fn is_known(&self, uid: &str) -> bool {
        self.inner.lock().unwrap().known.contains_key(uid)
    }

    pub fn known(&self) -> Vec<PodSpec> {
        self.inner.lock().unwrap().known.values().cloned().collect()
    }

    /// Every known pod, captured or not.
    pub fn list_known(&self) -> Vec<EnrolledPod> {
        let inner = self.inner.lock().unwrap();
        inner
            .known
            .values()
            .map(|spec| match inner.pods.get(&spec.uid) {
                Some(e) => e.pod.describe(),
                None => EnrolledPod {
                    spec: spec.clone(),
                    workload_id: 0,
                    netns_cookie: 0,
                    captured: false,
                },
            })
            .collect()
    }

    /// Closes every listener (at shutdown).
    pub fn clear(&self) {
        self.inner.lock().unwrap().pods.clear();
    }

    /// Writes the state file atomically (temporary file, then rename).
    pub fn save(&self) -> io::Result<()> {
        let state = {
            let inner = self.inner.lock().unwrap();
            SavedState {
                next_workload_id: inner.next_workload_id,
                pods: inner.pods.values().map(|e| e.pod.describe()).collect(),
                known: inner.known.values().cloned().collect(),
            }
        };
        let tmp = self.state_path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&state).map_err(io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &self.state_path)
    }
}
