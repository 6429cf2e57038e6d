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

use crate::model::Model;

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
