//! The shrink guard: a model that would take away most of the mesh at once is not
//! believed at first sight.
//!
//! An agent releases every pod the control plane stops listing as enrolled, and a
//! STRICT pod that is released accepts plaintext again. So a source that publishes an
//! accidental "almost nothing" (a file caught half-written, a watch that came back
//! empty) opens the mesh. Sources avoid reading torn input in the first place; this is
//! the second line: a candidate model that loses more than half of the published
//! model's workloads or namespaces is *held* until it has stayed the source's answer for
//! a hold time, and published only then. Ordinary changes, however large in effect
//! (removing the enrollment label of every namespace, deleting policies), keep the
//! workloads and namespaces and go out at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::model::Model;

/// Publishes a source's models through the guard: the served model, and why a candidate
/// is held back, if one is.
pub struct Publisher {
    /// Names the source in log lines (`mesh file /etc/mesh.yaml`, `Kubernetes`).
    what: String,
    /// How long a shrinking model must stay the source's answer (zero: no hold).
    hold: Duration,
    /// A model held back, and since when.
    held: Option<(Arc<Model>, Instant)>,
    tx: watch::Sender<Arc<Model>>,
    held_tx: watch::Sender<Option<String>>,
}

impl Publisher {
    /// A publisher serving `first` at once; returns the receivers of the served model and
    /// of the hold reason.
    #[allow(clippy::type_complexity)]
    pub fn new(
        what: String,
        hold: Duration,
        first: Arc<Model>,
    ) -> (
        Self,
        watch::Receiver<Arc<Model>>,
        watch::Receiver<Option<String>>,
    ) {
        let (tx, models) = watch::channel(first);
        let (held_tx, held) = watch::channel(None);
        let p = Self {
            what,
            hold,
            held: None,
            tx,
            held_tx,
        };
        (p, models, held)
    }

    /// The source's new answer: served, or held if it removes most of the mesh. False
    /// once nobody listens any more.
    pub fn offer(&mut self, m: Arc<Model>) -> bool {
        let published = self.tx.borrow().clone();
        if *published == *m {
            self.release_hold();
            return true;
        }
        if !self.hold.is_zero()
            && let Some(reason) = shrink_reason(&published, &m)
        {
            warn!(
                source = %self.what,
                "holding a mesh change for {:?}, because {reason}; it is served if the source still says so then",
                self.hold
            );
            self.held = Some((m, Instant::now()));
            let _ = self.held_tx.send(Some(reason));
            return true;
        }
        self.publish(m)
    }

    /// Forgets a held model (the source's answer changed to something invalid).
    pub fn release_hold(&mut self) {
        self.held = None;
        let _ = self.held_tx.send(None);
    }

    /// When the held model, if any, is due: serve it then ([`Publisher::tick`]).
    pub fn held_until(&self) -> Option<Instant> {
        self.held.as_ref().map(|(_, since)| *since + self.hold)
    }

    /// Serves the held model if it has been the source's answer for the hold time. False
    /// once nobody listens any more.
    pub fn tick(&mut self) -> bool {
        if let Some((m, since)) = &self.held
            && since.elapsed() >= self.hold
        {
            warn!(source = %self.what, hold = ?self.hold, "serving the held mesh: the source has described it for the whole hold time");
            let m = m.clone();
            return self.publish(m);
        }
        true
    }

    fn publish(&mut self, m: Arc<Model>) -> bool {
        self.release_hold();
        info!(source = %self.what, workloads = m.workloads.len(), services = m.services.len(), "mesh updated");
        self.tx.send(m).is_ok()
    }
}

/// Why a candidate model is held, if it is.
pub fn shrink_reason(published: &Model, candidate: &Model) -> Option<String> {
    let lost = |old: usize, new: usize| old > 0 && new * 2 < old;
    let (ow, nw) = (published.workloads.len(), candidate.workloads.len());
    if lost(ow, nw) {
        return Some(format!(
            "it would remove {} of the mesh's {ow} workloads at once",
            ow - nw
        ));
    }
    let (on, nn) = (published.namespaces.len(), candidate.namespaces.len());
    if lost(on, nn) {
        return Some(format!(
            "it would remove {} of the mesh's {on} namespaces at once",
            on - nn
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        DATAPLANE_AMBIENT, DATAPLANE_LABEL, Labels, MeshSpec, NamespaceSpec, NodeSpec, WorkloadSpec,
    };

    fn mesh(namespaces: usize, workloads: usize, enrolled: bool) -> Model {
        let labels: Labels = if enrolled {
            [(DATAPLANE_LABEL.to_string(), DATAPLANE_AMBIENT.to_string())].into()
        } else {
            Labels::new()
        };
        Model::build(MeshSpec {
            trust_domain: "cluster.local".into(),
            namespaces: (0..namespaces)
                .map(|i| NamespaceSpec {
                    name: format!("ns{i}"),
                    labels: labels.clone(),
                })
                .collect(),
            nodes: vec![NodeSpec { name: "n".into() }],
            workloads: (0..workloads)
                .map(|i| WorkloadSpec {
                    name: format!("w{i}"),
                    namespace: "ns0".into(),
                    node: "n".into(),
                    ips: vec![format!("10.0.{}.{}", i / 250, i % 250 + 1).parse().unwrap()],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn losing_most_of_the_mesh_is_held_and_relabelling_is_not() {
        let full = mesh(4, 10, true);
        assert!(shrink_reason(&full, &Model::default()).is_some());
        let r = shrink_reason(&full, &mesh(4, 4, true)).unwrap();
        assert_eq!(r, "it would remove 6 of the mesh's 10 workloads at once");
        let r = shrink_reason(&full, &mesh(1, 10, true)).unwrap();
        assert_eq!(r, "it would remove 3 of the mesh's 4 namespaces at once");
        // Half is not "most"; growing and relabelling are ordinary.
        assert_eq!(shrink_reason(&full, &mesh(2, 5, true)), None);
        assert_eq!(shrink_reason(&full, &mesh(4, 10, false)), None);
        assert_eq!(shrink_reason(&Model::default(), &full), None);
        assert_eq!(shrink_reason(&Model::default(), &Model::default()), None);
    }
}
