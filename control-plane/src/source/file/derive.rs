//! Each new version of the file's model derived from the last one.
//!
//! Most edits of a big mesh file change workloads only: pods scheduled, moved,
//! relabelled, removed. A full [`Model::build`] re-derives every workload and service of
//! the mesh (most of a 10,000-workload file's time after parsing). [`Derived::next`]
//! compares the new spec with the last one: when nothing but workloads differ, it
//! applies the differences with [`Model::apply_pod_changes`] — the path the Kubernetes
//! source takes, checked there against full builds — and anything else, or a change that
//! path refuses (one that would raise a problem, a waypoint's pods, services with listed
//! endpoints), is built in full. Either way the model is the one `Model::build` gives,
//! which the tests below check on random sequences of edits.

use std::collections::{HashMap, HashSet};

use tracing::debug;

use crate::model::incremental::IpOwners;
use crate::model::{MeshSpec, Model, Problem, WorkloadSpec};

/// The file's current model, and what the next version is compared with.
#[derive(Debug)]
pub struct Derived {
    /// The spec the model was built from, without its workloads.
    rest: MeshSpec,
    /// Its workloads by uid (the model's key for them).
    workloads: Keyed,
    model: Model,
    owners: IpOwners,
    /// How many versions were derived in place, and how many built in full.
    counts: (u64, u64),
    /// The last version's workloads, replaced but not yet dropped ([`drop_retired`]).
    ///
    /// [`drop_retired`]: Derived::drop_retired
    retired: Option<Keyed>,
}

impl Derived {
    /// Builds `spec` in full.
    pub fn build(spec: MeshSpec) -> Result<Self, Vec<Problem>> {
        let model = Model::build(spec.clone())?;
        let owners = IpOwners::of(&model);
        let (rest, workloads) = split(spec);
        Ok(Self {
            rest,
            // Unique, or the build would have refused the file.
            workloads: keyed(workloads),
            model,
            owners,
            counts: (0, 1),
            retired: None,
        })
    }

    /// How many versions were derived in place, and how many built in full.
    pub fn counts(&self) -> (u64, u64) {
        self.counts
    }

    /// Drops the last version's workloads. Dropping 10,000 specs was a sixth of a
    /// change's time in the control plane: a caller that publishes the model first and
    /// then calls this keeps it out of the time the change takes to reach the agents.
    /// (Left alone, they go at the next change.)
    pub fn drop_retired(&mut self) {
        self.retired = None;
    }

    /// The current model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model of `spec`, the file's next version; it becomes the current one. On
    /// `Err` (the file is invalid) nothing changes.
    pub fn next(&mut self, spec: MeshSpec) -> Result<Model, Vec<Problem>> {
        let (rest, workloads) = split(spec);
        // Each workload's key, computed once.
        let keys: Vec<String> = workloads.iter().map(WorkloadSpec::key).collect();
        if rest == self.rest
            && let Some(index) = unique(&keys)
        {
            let gone: Vec<String> = self
                .workloads
                .keys()
                .filter(|uid| !index.contains(uid.as_str()))
                .cloned()
                .collect();
            let changed: Vec<WorkloadSpec> = keys
                .iter()
                .zip(&workloads)
                .filter(|(uid, w)| self.workloads.get(uid.as_str()) != Some(w))
                .map(|(_, w)| w.clone())
                .collect();
            // A model shares its entries with its clones; only the changes are copied.
            // The IP owners change in place: on a refusal they are derived again.
            let mut model = self.model.clone();
            match model.apply_pod_changes(&mut self.owners, &gone, changed) {
                Ok(()) => {
                    self.model = model.clone();
                    let last = std::mem::replace(
                        &mut self.workloads,
                        keys.into_iter().zip(workloads).collect(),
                    );
                    self.retired = Some(last);
                    self.counts.0 += 1;
                    return Ok(model);
                }
                Err(why) => {
                    debug!(reason = why.0, "the file's change needs a full build");
                    self.owners = IpOwners::of(&self.model);
                }
            }
        }
        let counts = self.counts;
        *self = Self::build(MeshSpec { workloads, ..rest })?;
        self.counts = (counts.0, counts.1 + 1);
        Ok(self.model.clone())
    }
}

/// The spec without its workloads, and the workloads.
fn split(mut spec: MeshSpec) -> (MeshSpec, Vec<WorkloadSpec>) {
    let workloads = std::mem::take(&mut spec.workloads);
    (spec, workloads)
}

/// Workloads by uid. (foldhash: each version hashes every uid a few times.)
type Keyed = HashMap<String, WorkloadSpec, foldhash::fast::RandomState>;

/// The keys' set; `None` if two are equal (the full build says which).
fn unique(keys: &[String]) -> Option<HashSet<&str, foldhash::fast::RandomState>> {
    let set: HashSet<&str, _> = keys.iter().map(String::as_str).collect();
    (set.len() == keys.len()).then_some(set)
}

/// Workloads by uid (unique ones: the file was valid).
fn keyed(workloads: Vec<WorkloadSpec>) -> Keyed {
    workloads.into_iter().map(|w| (w.key(), w)).collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::source::file::parse_spec;

    /// A mesh file: two namespaces, services selecting by label (one through a
    /// waypoint), a policy, the waypoint's pod and `workloads`.
    fn file(workloads: &[String]) -> String {
        let mut y = String::from(concat!(
            "namespaces:\n",
            "  - {name: a, labels: {ambit.dev/dataplane: ambient}}\n",
            "  - {name: b, labels: {ambit.dev/dataplane: ambient}}\n",
            "nodes: [{name: n1}, {name: n2}]\n",
            "waypoints: [{name: wp, namespace: b}]\n",
            "services:\n",
            "  - {name: web, namespace: a, vips: [10.96.0.1], selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n",
            "  - {name: db, namespace: b, vips: [10.96.0.2], selector: {app: db}, ports: [{name: pg, port: 5432}], labels: {ambit.dev/waypoint: wp}}\n",
            "  - {name: all-b, namespace: b, vips: [10.96.0.3], selector: {tier: x}, ports: [{name: x, port: 9}]}\n",
            "policies:\n",
            "  - {name: p, namespace: a, selector: {app: web}, action: ALLOW, rules: [{from: [{namespaces: [b]}]}]}\n",
            "workloads:\n",
        ));
        y.push_str("  - {name: wp-0, namespace: b, node: n1, ips: [10.244.9.1], labels: {gateway.networking.k8s.io/gateway-name: wp}}\n");
        for w in workloads {
            y.push_str(w);
        }
        y
    }

    /// A random workload line, sometimes invalid (an undefined node, a taken IP, a bad
    /// label), sometimes a name another line has.
    fn workload(rng: &mut fastrand::Rng) -> String {
        let ns = if rng.bool() { "a" } else { "b" };
        let node = ["n1", "n2", "n1", "n2", "n3"][rng.usize(..5)];
        let apps = if rng.u8(..20) == 0 { 4 } else { 3 };
        let app = ["web", "db", "other", "Bad Label!"][rng.usize(..apps)];
        let tier = if rng.bool() { ", tier: x" } else { "" };
        let ip = if rng.u8(..30) == 0 {
            "10.96.0.1".to_owned()
        } else {
            format!("10.244.{}.{}", rng.u8(1..3), rng.u8(1..250))
        };
        format!(
            "  - {{name: w{}, namespace: {ns}, node: {node}, ips: [{ip}], labels: {{app: {app}{tier}}}}}\n",
            rng.u8(..40)
        )
    }

    fn spec(workloads: &[String]) -> MeshSpec {
        parse_spec(Path::new("mesh.yaml"), &file(workloads)).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn each_version_gets_the_model_a_full_build_gives() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut lines: Vec<String> = Vec::new();
        // Start from a valid file.
        while lines.len() < 20 {
            let w = workload(&mut rng);
            lines.push(w);
            if Model::build(spec(&lines)).is_err() {
                lines.pop();
            }
        }
        let mut derived = Derived::build(spec(&lines)).unwrap();
        let (mut valid, mut invalid) = (0, 0);
        for step in 0..400 {
            let mut next = lines.clone();
            for _ in 0..rng.usize(1..4) {
                match rng.u8(..4) {
                    0 if !next.is_empty() => {
                        next.remove(rng.usize(..next.len()));
                    }
                    1 => next.push(workload(&mut rng)),
                    _ if !next.is_empty() => {
                        let i = rng.usize(..next.len());
                        next[i] = workload(&mut rng);
                    }
                    _ => next.push(workload(&mut rng)),
                }
            }
            let before = derived.model().clone();
            let full = Model::build(spec(&next));
            let got = derived.next(spec(&next));
            match (&full, &got) {
                (Ok(f), Ok(g)) => {
                    assert_eq!(f, g, "step {step}");
                    assert_eq!(derived.model(), f, "step {step}");
                    lines = next;
                    valid += 1;
                }
                (Err(f), Err(g)) => {
                    assert_eq!(f, g, "step {step}");
                    assert_eq!(
                        derived.model(),
                        &before,
                        "step {step}: a refused file changed it"
                    );
                    invalid += 1;
                }
                _ => panic!("step {step}: full build {full:?}, derived {got:?}"),
            }
        }
        // Both kinds of version were tried, and most valid ones derived in place.
        assert!(
            valid > 50 && invalid > 50,
            "{valid} valid, {invalid} invalid"
        );
        let (in_place, full) = derived.counts();
        assert!(
            in_place > valid as u64 / 2,
            "{in_place} in place, {full} full, of {valid}"
        );
    }

    #[test]
    fn a_change_beyond_workloads_is_built_in_full() {
        let w = |i: u8, app: &str| {
            format!(
                "  - {{name: w{i}, namespace: a, node: n1, ips: [10.244.1.{i}], labels: {{app: {app}}}}}\n"
            )
        };
        let mut derived = Derived::build(spec(&[w(1, "web"), w(2, "db")])).unwrap();
        let text = file(&[w(1, "web"), w(2, "web")])
            .replace("selector: {app: web}, ports", "selector: {app: db}, ports");
        let next = parse_spec(Path::new("mesh.yaml"), &text).unwrap();
        let got = derived.next(next.clone()).unwrap();
        assert_eq!(got, Model::build(next).unwrap());
        assert_eq!(derived.counts(), (0, 2));
        let web = &got.services[&crate::model::NamespacedName {
            namespace: "a".into(),
            name: "web".into(),
        }];
        assert!(web.endpoints.is_empty(), "{:?}", web.endpoints);
    }
}
