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

use crate::telemetry::PodCounters;

/// A captured pod, shared by the tasks that serve it.
#[derive(Debug)]
pub struct Pod {
    /// What the enrollment API was told.
    pub spec: PodSpec,
    /// The agent's id for it (labels kernel counters).
    pub workload_id: u32,
    /// Its network namespace's cookie (as the kernel programs see it).
    pub netns_cookie: u64,
    /// Its network namespace, held open.
    pub netns: Arc<Netns>,
    /// Its own connection counters (exposed while it is captured).
    pub counters: Arc<PodCounters>,
    /// Sockets made ahead in its namespace, for dials from it.
    pub sockets: crate::proxy::dialer::SocketStock,
}

impl Pod {
    /// Its IP of the same family as `like`.
    pub fn ip_like(&self, like: std::net::IpAddr) -> Option<std::net::IpAddr> {
        self.spec
            .ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == like.is_ipv4())
    }

    /// As the enrollment API reports it.
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

/// The state file's name, in the state directory.
pub const STATE_FILE: &str = "pods.json";

/// What the state file holds.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// The next workload id to hand out.
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
    /// A registry whose state file is `<state_dir>/`[`STATE_FILE`].
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_path: state_dir.join(STATE_FILE),
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

    /// Never hand out ids below `id` (a previous agent used them).
    pub fn set_next_workload_id(&self, id: u32) {
        let mut inner = self.inner.lock().unwrap();
        inner.next_workload_id = inner.next_workload_id.max(id);
    }

    /// A fresh workload id.
    pub fn allocate_workload_id(&self) -> u32 {
        let mut inner = self.inner.lock().unwrap();
        let id = inner.next_workload_id;
        inner.next_workload_id = inner.next_workload_id.wrapping_add(1).max(1);
        id
    }

    /// The captured pod with this uid.
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

    /// Records a captured pod and the tasks serving its listeners.
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

    /// How many pods are captured.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().pods.len()
    }

    /// True if no pod is captured.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every captured pod by netns cookie (for the kernel counters).
    pub fn by_cookie_map(&self) -> HashMap<u64, Arc<Pod>> {
        self.inner
            .lock()
            .unwrap()
            .pods
            .values()
            .map(|e| (e.pod.netns_cookie, e.pod.clone()))
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

    /// Forgets a known pod.
    pub fn remove_known(&self, uid: &str) -> Option<PodSpec> {
        self.inner.lock().unwrap().known.remove(uid)
    }

    /// Does the enrollment API know this uid?
    pub fn is_known(&self, uid: &str) -> bool {
        self.inner.lock().unwrap().known.contains_key(uid)
    }

    /// Every known pod's spec.
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

    /// Closes every listener (at shutdown): the kernel keeps redirecting the pods'
    /// connections to them, so they fail closed until the next agent takes over.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_round_trips_and_a_bad_one_is_an_error() {
        let dir = std::env::temp_dir().join(format!("ambit-pods-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let reg = PodRegistry::new(&dir);
        assert_eq!(
            reg.load_saved().unwrap(),
            SavedState::default(),
            "no file: empty"
        );
        let spec = PodSpec {
            uid: "u1".into(),
            namespace: "shop".into(),
            name: "web-0".into(),
            netns: "/var/run/netns/x".into(),
            ips: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
        };
        assert!(reg.add_known(spec.clone()));
        assert!(!reg.add_known(spec.clone()), "a uid is known once");
        reg.set_next_workload_id(7);
        assert_eq!(reg.allocate_workload_id(), 7);
        reg.save().unwrap();
        let again = PodRegistry::new(&dir).load_saved().unwrap();
        assert_eq!(again.next_workload_id, 8);
        assert_eq!(again.known, vec![spec]);
        assert!(again.pods.is_empty());
        // Written atomically: no temporary file is left behind.
        assert!(!dir.join("pods.json.tmp").exists());
        std::fs::write(dir.join("pods.json"), "{not json").unwrap();
        let e = reg.load_saved().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("pods.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
