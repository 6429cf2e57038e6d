//! The authorized inbound connections that are open now, so that a policy change can
//! close the ones it denies (Istio closes them too).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ambit_identity::Identity;
use tokio::sync::Notify;

use crate::state::{MeshState, Uid};

/// An authorized inbound connection, as policy sees it.
#[derive(Debug)]
struct Tracked {
    dst_uid: Uid,
    src_identity: Option<Identity>,
    src_ip: IpAddr,
    dst_port: u16,
    kill: Arc<Notify>,
}

/// Shards of the tracker: consecutive connections land in different ones, so workers
/// opening and closing connections at once rarely wait for each other's lock.
const SHARDS: usize = 16;

type Shard = Mutex<HashMap<u64, Tracked>>;

/// The inbound connections open now.
#[derive(Debug, Default)]
pub struct ConnTracker {
    next: AtomicU64,
    shards: [Shard; SHARDS],
}

/// Removes its connection from the tracker when dropped.
#[derive(Debug)]
pub struct TrackGuard<'a> {
    tracker: &'a ConnTracker,
    id: u64,
    /// Fired when policy now denies the connection.
    pub kill: Arc<Notify>,
}

impl Drop for TrackGuard<'_> {
    fn drop(&mut self) {
        self.tracker.shard(self.id).remove(&self.id);
    }
}

impl ConnTracker {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Tracked>> {
        self.shards[(id % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Tracks a connection to workload `dst_uid` until the guard is dropped.
    pub fn track(
        &self,
        dst_uid: Uid,
        src_identity: Option<Identity>,
        src_ip: IpAddr,
        dst_port: u16,
    ) -> TrackGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let kill = Arc::new(Notify::new());
        self.shard(id).insert(
            id,
            Tracked {
                dst_uid,
                src_identity,
                src_ip,
                dst_port,
                kill: kill.clone(),
            },
        );
        TrackGuard {
            tracker: self,
            id,
            kill,
        }
    }

    /// How many are open.
    pub fn len(&self) -> usize {
        (0..SHARDS as u64).map(|i| self.shard(i).len()).sum()
    }

    /// True if none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Authorizes every open connection again under `mesh`, closing those it denies (and
    /// those whose workload is gone). Returns how many were closed.
    pub fn revalidate(&self, mesh: &MeshState) -> usize {
        let mut closed = 0;
        for shard in 0..SHARDS as u64 {
            for t in self.shard(shard).values() {
                let allowed = mesh.workload(&t.dst_uid).is_some_and(|dst| {
                    let conn = ambit_policy::Connection {
                        src_identity: t.src_identity.as_ref(),
                        src_ip: t.src_ip,
                        dst_port: t.dst_port,
                    };
                    mesh.authorize(dst, &conn).allowed()
                });
                if !allowed {
                    // A stored permit: the relay sees it even if it is not waiting now.
                    t.kill.notify_one();
                    closed += 1;
                }
            }
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::allow_from;
    use crate::state::{Canonical, Ips, MtlsMode, Placement, Profile, Workload};

    fn web() -> Workload {
        Workload {
            uid: Uid::with_name("shop/web-0", "web-0").unwrap(),
            placement: Arc::new(Placement {
                node: "n1".into(),
                waypoint: None,
                enrolled: true,
                native_tunnel: false,
                mtls: MtlsMode::Strict,
            }),
            profile: Arc::new(Profile {
                identity: Arc::new(Identity::new("cluster.local", "shop", "web").unwrap()),
                canonical: Canonical::derive("web-0", &Default::default()),
            }),
            ips: Ips::new(["10.244.2.10".parse().unwrap()]).unwrap(),
            labels: None,
            version: 0,
        }
    }

    #[tokio::test]
    async fn a_policy_change_closes_exactly_the_connections_it_denies() {
        let mut mesh = MeshState::new("n1");
        mesh.put_workload(web());
        let t = ConnTracker::default();
        let frontend = Identity::new("cluster.local", "shop", "frontend").unwrap();
        let legacy = Identity::new("cluster.local", "legacy", "batch").unwrap();
        let ok = t.track(
            "shop/web-0".into(),
            Some(frontend),
            "10.0.0.1".parse().unwrap(),
            80,
        );
        let bad = t.track(
            "shop/web-0".into(),
            Some(legacy),
            "10.0.0.2".parse().unwrap(),
            80,
        );
        let plain = t.track("shop/web-0".into(), None, "10.0.0.3".parse().unwrap(), 80);
        assert_eq!(t.revalidate(&mesh), 0, "no policy: everything stays");
        mesh.put_policy(
            "shop/only-shop".into(),
            allow_from("shop", "only-shop", "cluster.local/ns/shop/*"),
        );
        assert_eq!(
            t.revalidate(&mesh),
            2,
            "legacy and plaintext are denied now"
        );
        // The denied ones were told (a stored permit), the allowed one was not.
        tokio::time::timeout(std::time::Duration::from_secs(1), bad.kill.notified())
            .await
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), plain.kill.notified())
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), ok.kill.notified())
                .await
                .is_err()
        );
        drop((bad, plain));
        assert_eq!(t.len(), 1);
        // The workload gone: its connections go too.
        mesh.remove_workload("shop/web-0");
        assert_eq!(t.revalidate(&mesh), 1);
        drop(ok);
        assert!(t.is_empty());
    }

    /// Connections opened and closed on several threads while policy changes: every
    /// connection open across a revalidation that denies it is told, and the tracker
    /// ends empty (no shard loses or keeps an entry).
    #[tokio::test]
    async fn concurrent_tracking_across_shards_and_revalidation() {
        let mut mesh = MeshState::new("n1");
        mesh.put_workload(web());
        mesh.put_policy(
            "shop/only-shop".into(),
            allow_from("shop", "only-shop", "cluster.local/ns/shop/*"),
        );
        let t = Arc::new(ConnTracker::default());
        let legacy = Identity::new("cluster.local", "legacy", "batch").unwrap();
        // Long-lived denied connections, one per shard and more.
        let held: Vec<_> = (0..3 * SHARDS)
            .map(|i| {
                t.track(
                    "shop/web-0".into(),
                    Some(legacy.clone()),
                    format!("10.0.1.{i}").parse().unwrap(),
                    80,
                )
            })
            .collect();
        let churn: Vec<_> = (0..4)
            .map(|n| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000u32 {
                        let g = t.track(
                            "shop/web-0".into(),
                            None,
                            format!("10.1.{n}.{}", i % 250).parse().unwrap(),
                            80,
                        );
                        drop(g);
                    }
                })
            })
            .collect();
        let mut closed = 0;
        for _ in 0..50 {
            closed = closed.max(t.revalidate(&mesh));
        }
        churn.into_iter().for_each(|h| h.join().unwrap());
        assert!(closed >= held.len(), "{closed}");
        for g in &held {
            tokio::time::timeout(std::time::Duration::from_secs(1), g.kill.notified())
                .await
                .expect("every denied connection was told");
        }
        assert_eq!(t.len(), held.len());
        drop(held);
        assert!(t.is_empty());
    }
}
