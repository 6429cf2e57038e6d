//! Each new version of the file's model derived from the last one.
//!
//! Most edits of a big mesh file change workloads only: pods scheduled, moved,
//! relabelled, removed. A full [`Model::build`] re-derives every workload and service of
//! the mesh (most of a 10,000-workload file's time after parsing). [`Derived::next`]
//! reads the new text with its [`Reparser`], which hands on only what changed: when the
//! rest of the file means what it meant and only some workloads' items are new or gone,
//! it applies those with [`Model::apply_pod_changes`] — the path the Kubernetes source
//! takes, checked there against full builds — so a change costs what it touches, not
//! the mesh's size. Anything else, or a change that path refuses (one that would raise a
//! problem, two workloads of one key, a waypoint's pods, services with listed
//! endpoints), is built in full from the whole file in its order, so problems are
//! reported as a full build reports them. Either way the model is the one
//! `Model::build` gives, which the tests below check on random sequences of edits.
//!
//! The reparser and the model move together: a version is committed to the reparser
//! only once its model is taken, so a refused version leaves both at the last good one,
//! and the next is compared with that.

use std::collections::HashSet;
use std::path::Path;

use tracing::debug;

use super::{FileError, Reading, Reparser, Workloads, invalid};
use crate::model::incremental::{IpOwners, NeedsFullBuild};
use crate::model::{MeshSpec, Model, Problem, WorkloadSpec};

/// The file's current model, and what the next version is compared with.
pub struct Derived {
    /// Reads each version against the current one.
    reparser: Reparser,
    current: Current,
}

/// The current version, as far as deriving the next needs it.
#[derive(Debug)]
struct Current {
    /// The spec the model was built from, without its workloads.
    rest: MeshSpec,
    model: Model,
    owners: IpOwners,
    /// How many versions were derived in place, and how many built in full.
    counts: (u64, u64),
}

/// foldhash: a change hashes the keys of what it touches.
type Fast = foldhash::fast::RandomState;

impl Derived {
    /// The model of the file's first version, `text` (`path` names it in errors).
    pub fn load(path: &Path, text: &str) -> Result<Self, FileError> {
        let mut reparser = Reparser::new();
        let mut reading = reparser.read(path, text)?;
        let workloads = reparser.workloads(&mut reading);
        let rest = reading.rest.take().expect("a first reading is whole");
        let current = Current::build(rest, workloads).map_err(invalid(path))?;
        reparser.commit(reading);
        Ok(Self { reparser, current })
    }

    /// How many versions were derived in place, and how many built in full.
    pub fn counts(&self) -> (u64, u64) {
        self.current.counts
    }

    /// The current model.
    pub fn model(&self) -> &Model {
        &self.current.model
    }

    /// The model of `text`, the file's next version; it becomes the current one. On
    /// `Err` (the file is invalid) nothing changes.
    pub fn next(&mut self, path: &Path, text: &str) -> Result<Model, FileError> {
        let mut reading = self.reparser.read(path, text)?;
        let model = self
            .current
            .next(&self.reparser, &mut reading)
            .map_err(invalid(path))?;
        self.reparser.commit(reading);
        Ok(model)
    }
}

impl Current {
    /// Builds the spec `rest` with `workloads` in full.
    fn build(rest: MeshSpec, workloads: Vec<WorkloadSpec>) -> Result<Self, Vec<Problem>> {
        let model = Model::build(MeshSpec {
            workloads,
            ..rest.clone()
        })?;
        let owners = IpOwners::of(&model);
        Ok(Self {
            rest,
            model,
            owners,
            counts: (0, 1),
        })
    }

    /// The model of `reading`, which becomes the current one; on `Err` nothing changes.
    fn next(
        &mut self,
        reparser: &Reparser,
        reading: &mut Reading<'_>,
    ) -> Result<Model, Vec<Problem>> {
        let same_rest = reading.rest.as_ref().is_none_or(|r| *r == self.rest);
        if same_rest && let Workloads::Changes { gone, new, total } = &mut reading.workloads {
            match self.apply(gone, std::mem::take(new), *total) {
                Ok(model) => {
                    self.counts.0 += 1;
                    return Ok(model);
                }
                Err(why) => debug!(reason = why.0, "the file's change needs a full build"),
            }
        }
        let workloads = reparser.workloads(reading);
        let rest = reading.rest.take().unwrap_or_else(|| self.rest.clone());
        let counts = self.counts;
        *self = Self::build(rest, workloads)?;
        self.counts = (counts.0, counts.1 + 1);
        Ok(self.model.clone())
    }

    /// The model with the workloads of keys `gone` removed and `new` added or replacing
    /// theirs, in place; `Err` where only a full build can say what the file means.
    fn apply(
        &mut self,
        gone: &[String],
        new: Vec<WorkloadSpec>,
        total: usize,
    ) -> Result<Model, NeedsFullBuild> {
        if gone.is_empty() && new.is_empty() {
            // The rest means what it meant and no workload's text changed.
            return Ok(self.model.clone());
        }
        let keys: Vec<String> = new.iter().map(WorkloadSpec::key).collect();
        let new_keys: HashSet<&str, Fast> = keys.iter().map(String::as_str).collect();
        let gone_keys: HashSet<&str, Fast> = gone.iter().map(String::as_str).collect();
        let held = |k: &str| self.model.workloads.contains_key(k);
        if new_keys.len() != keys.len()
            || keys
                .iter()
                .any(|k| held(k) && !gone_keys.contains(k.as_str()))
        {
            return Err(NeedsFullBuild("two workloads of one key"));
        }
        if gone_keys.len() != gone.len() || !gone.iter().all(|k| held(k)) {
            // The reparser's last version is always this one's; never expected.
            return Err(NeedsFullBuild("the changes do not fit the current version"));
        }
        // An edited workload is replaced, not removed.
        let leaving: Vec<String> = gone
            .iter()
            .filter(|k| !new_keys.contains(k.as_str()))
            .cloned()
            .collect();
        // A model shares its entries with its clones; only the changes are copied. The
        // IP owners change in place: on a refusal they are derived again.
        let mut model = self.model.clone();
        let applied = model
            .apply_pod_changes(&mut self.owners, &leaving, new)
            .and_then(|()| match model.workloads.len() == total {
                true => Ok(()),
                // Never expected either: the file has other workloads than the model.
                false => Err(NeedsFullBuild("the changes do not add up to the file")),
            });
        match applied {
            Ok(()) => {
                self.model = model.clone();
                Ok(model)
            }
            Err(why) => {
                self.owners = IpOwners::of(&self.model);
                Err(why)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::source::file::parse_spec;

    const PATH: &str = "mesh.yaml";

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
        parse_spec(Path::new(PATH), &file(workloads)).unwrap_or_else(|e| panic!("{e}"))
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
        let mut derived = Derived::load(Path::new(PATH), &file(&lines)).unwrap();
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
            let got = derived.next(Path::new(PATH), &file(&next));
            match (&full, &got) {
                (Ok(f), Ok(g)) => {
                    assert_eq!(f, g, "step {step}");
                    assert_eq!(derived.model(), f, "step {step}");
                    lines = next;
                    valid += 1;
                }
                (Err(f), Err(FileError::Invalid { problems, .. })) => {
                    assert_eq!(f, problems, "step {step}");
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

    /// Found in review: versions whose workloads the item cache does not hold exactly
    /// (a flow list, an item count the splitter gets wrong) and texts it must not
    /// split (quoted scalars over lines, a NUL).
    #[test]
    fn versions_the_splitter_cannot_follow_get_the_full_builds_model() {
        let path = Path::new(PATH);
        let w =
            |name: &str, ip: &str| format!("{{name: {name}, namespace: a, node: n1, ips: [{ip}]}}");
        let head = "namespaces: [{name: a, labels: {ambit.dev/dataplane: ambient}}]\nnodes: [{name: n1}]\n";
        let sequences = [
            vec![
                format!("{head}workloads: [{}]\n", w("a", "10.0.0.1")),
                format!("{head}workloads:\n  - {}\n", w("b", "10.0.0.2")),
                format!("{head}workloads: [{}]\n", w("a", "10.0.0.1")),
                format!("{head}workloads: []\n"),
            ],
            vec![
                format!(
                    "{head}workloads:\n  - {{name: w1, namespace: a, node: n1, ips: [10.0.0.1], uid: \"u1\n  - x\"}}\n"
                ),
                format!("{head}workloads:\n  - {}\n", w("w2", "10.0.0.2")),
                format!(
                    "{head}workloads:\n  - {{name: w1, namespace: a, node: n1, ips: [10.0.0.1], uid: \"u1\n  - x\"}}\n"
                ),
                format!("{head}workloads: []\n"),
            ],
            vec![
                format!("{head}workloads:\n  - {}\n", w("c", "10.0.0.3")),
                format!(
                    "trustDomain: \"cluster.local\nworkloads:\n  - {}\nx: \"\n{head}",
                    w("d", "10.0.0.4")
                ),
            ],
            // A block list emptied in place: the skeleton reads the same.
            vec![
                format!("{head}workloads:\n  - {}\n", w("e", "10.0.0.5")),
                format!("{head}workloads: []\n"),
                format!("{head}workloads:\n  - {}\n", w("e", "10.0.0.5")),
            ],
            vec![
                "nodes:\n- name: n1\ntrustDomain: cluster.local".to_owned(),
                "nodes: []\ntrustDomain: cluster.local\0nodes 11\n- name: n1\n".to_owned(),
            ],
        ];
        let show = |r: Result<Model, FileError>| match r {
            Ok(m) => format!("{m:?}"),
            Err(e) => format!("error: {e}"),
        };
        for versions in sequences {
            let mut derived = Derived::load(path, &versions[0]).unwrap();
            for (i, v) in versions.iter().enumerate().skip(1) {
                let before = derived.model().clone();
                let full = show(crate::source::file::parse(path, v));
                let got = show(derived.next(path, v));
                assert_eq!(got, full, "version {i}: {v:?}");
                if full.starts_with("error") {
                    assert_eq!(derived.model(), &before, "a refused file changed it");
                }
            }
        }
    }

    #[test]
    fn a_change_beyond_workloads_is_built_in_full() {
        let w = |i: u8, app: &str| {
            format!(
                "  - {{name: w{i}, namespace: a, node: n1, ips: [10.244.1.{i}], labels: {{app: {app}}}}}\n"
            )
        };
        let mut derived =
            Derived::load(Path::new(PATH), &file(&[w(1, "web"), w(2, "db")])).unwrap();
        let text = file(&[w(1, "web"), w(2, "web")])
            .replace("selector: {app: web}, ports", "selector: {app: db}, ports");
        let next = parse_spec(Path::new(PATH), &text).unwrap();
        let got = derived.next(Path::new(PATH), &text).unwrap();
        assert_eq!(got, Model::build(next).unwrap());
        assert_eq!(derived.counts(), (0, 2));
        let web = &got.services[&crate::model::NamespacedName {
            namespace: "a".into(),
            name: "web".into(),
        }];
        assert!(web.endpoints.is_empty(), "{:?}", web.endpoints);
    }
}
