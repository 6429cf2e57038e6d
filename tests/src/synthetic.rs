//! Large synthetic meshes (YAML for the file source), for the control-plane benchmark and
//! the memory-under-churn test. Workloads live on made-up nodes unless told otherwise, so
//! a real agent holds them as remote workloads (no certificates to fetch for them).

/// The shape of a synthetic mesh.
#[derive(Clone, Copy, Debug)]
pub struct SyntheticMesh {
    /// Workloads, spread over namespaces, nodes and service accounts.
    pub workloads: usize,
    /// Services, each selecting the workloads of one `app` label.
    pub services: usize,
    /// Namespaces `ns-0`..., all enrolled.
    pub namespaces: usize,
    /// Nodes `node-<first_node>`...
    pub nodes: usize,
    /// The number of the first node.
    pub first_node: usize,
}

impl SyntheticMesh {
    /// The mesh as YAML, after `base` (a mesh file whose sections are in the order
    /// namespaces, nodes, workloads, as `Cluster::mesh_yaml` writes them; or empty).
    /// `revision(i)` is an extra label value of workload `i`: changing it changes that
    /// workload and nothing else.
    pub fn yaml(&self, base: &str, revision: impl Fn(usize) -> Option<String>) -> String {
        let section = |name: &str| -> &str {
            let Some(start) = base.find(&format!("{name}:\n")) else {
                return "";
            };
            let body = &base[start + name.len() + 2..];
            // A section ends where the next top-level key starts.
            let end = body
                .match_indices('\n')
                .map(|(i, _)| i + 1)
                .find(|&i| {
                    body[i..]
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic())
                })
                .unwrap_or(body.len());
            &body[..end]
        };
        let mut y = String::with_capacity(self.workloads * 160 + base.len());
        y.push_str("namespaces:\n");
        y.push_str(section("namespaces"));
        for n in 0..self.namespaces {
            y.push_str(&format!(
                "  - {{name: ns-{n}, labels: {{ambit.dev/dataplane: ambient}}}}\n"
            ));
        }
        y.push_str("nodes:\n");
        y.push_str(section("nodes"));
        for n in self.first_node..self.first_node + self.nodes {
            y.push_str(&format!("  - name: node-{n}\n"));
        }
        let per_ns = (self.services / self.namespaces).max(1);
        y.push_str("workloads:\n");
        y.push_str(section("workloads"));
        for i in 0..self.workloads {
            let (ns, node, svc) = (
                i % self.namespaces,
                self.first_node + i % self.nodes,
                (i / self.namespaces) % per_ns,
            );
            let extra = revision(i).map_or_else(String::new, |r| format!(", version: {r}"));
            y.push_str(&format!(
                "  - {{name: w-{i}, namespace: ns-{ns}, node: node-{node}, serviceAccount: sa-{svc}, ips: [10.{}.{}.{}], labels: {{app: svc-{svc}{extra}}}}}\n",
                200 + i / 62_500,
                (i / 250) % 250,
                i % 250 + 1
            ));
        }
        y.push_str("services:\n");
        for j in 0..self.services {
            let (ns, svc) = (j % self.namespaces, j / self.namespaces);
            y.push_str(&format!(
                "  - {{name: svc-{svc}, namespace: ns-{ns}, vips: [10.96.{}.{}], ports: [{{port: 80, targetPort: 8080}}], selector: {{app: svc-{svc}}}}}\n",
                j / 250,
                j % 250 + 1
            ));
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_meshs_entries_come_first_in_each_section() {
        let base = "namespaces:\n  - name: default\n    labels: {a: b}\nnodes:\n  - name: node-1\nworkloads:\n  - {uid: u}\n";
        let m = SyntheticMesh {
            workloads: 2,
            services: 1,
            namespaces: 1,
            nodes: 1,
            first_node: 3,
        };
        let y = m.yaml(base, |i| (i == 1).then(|| "r1".into()));
        assert!(
            y.starts_with("namespaces:\n  - name: default\n    labels: {a: b}\n  - {name: ns-0")
        );
        assert!(y.contains("nodes:\n  - name: node-1\n  - name: node-3\n"));
        assert!(y.contains("workloads:\n  - {uid: u}\n  - {name: w-0,"));
        assert!(y.contains("labels: {app: svc-0, version: r1}"));
        assert_eq!(y.matches("namespaces:").count(), 1);
    }
}
