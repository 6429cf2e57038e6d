//! Keeping a built model current as pods come, go and change, without building it again.
//!
//! Pods are what changes most in a cluster (rollouts, scaling, readiness), and a full
//! build re-derives every workload and service of the mesh. [`Model::apply_pod_changes`]
//! re-derives only the changed pods, the endpoints of the services of their namespaces
//! and the changed pods' waypoint, with the same functions the full build uses, so the
//! result is the model a full build would give. Where it could differ — a change that
//! would raise a problem (an IP taken, a bad label), a waypoint's own pods, services
//! whose endpoints are listed rather than selected — it refuses ([`NeedsFullBuild`]) and
//! the caller builds in full. `tests` check the equivalence on random sequences of
//! changes.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use super::{
    Context, GATEWAY_NAME_LABEL, Model, NamespacedName, Problems, WorkloadSpec, derive_workload,
    endpoints_of, waypoint_of,
};

/// Why a change must go through a full build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeedsFullBuild(pub &'static str);

/// Who holds each IP of a model: workloads by uid, services and waypoints by name. A
/// changed pod's new IPs are checked against it, as the full build checks them.
#[derive(Clone, Debug, Default)]
pub struct IpOwners(HashMap<IpAddr, String>);

impl IpOwners {
    /// The owners of `m`'s IPs.
    pub fn of(m: &Model) -> Self {
        let mut owners = HashMap::new();
        for w in m.workloads.values() {
            for ip in &w.ips {
                owners.insert(*ip, format!("workload {}/{}", w.namespace, w.name));
            }
        }
        for s in m.services.values() {
            let what = if s.is_waypoint { "waypoint" } else { "service" };
            for ip in &s.vips {
                owners.insert(*ip, format!("{what} {}/{}", s.namespace, s.name));
            }
        }
        Self(owners)
    }
}

impl Model {
    /// Applies pod changes: the workloads with uids `gone` leave, the `changed` specs
    /// come or replace the workload of their uid. On `Err` the model is unchanged in
    /// meaning but may be partly updated: build in full from the source instead.
    pub fn apply_pod_changes(
        &mut self,
        owners: &mut IpOwners,
        gone: &[String],
        changed: Vec<WorkloadSpec>,
    ) -> Result<(), NeedsFullBuild> {
        let mut touched: BTreeSet<String> = BTreeSet::new();
        let leaving: Vec<String> = gone
            .iter()
            .cloned()
            .chain(changed.iter().map(WorkloadSpec::key))
            .collect();
        for uid in &leaving {
            let Some(old) = self.workloads.remove(uid) else {
                continue;
            };
            if old.native_tunnel || old.labels.contains_key(GATEWAY_NAME_LABEL) {
                return Err(NeedsFullBuild("a waypoint's pod changed"));
            }
            for ip in &old.ips {
                owners.0.remove(ip);
            }
            touched.insert(old.namespace.clone());
        }
        let waypoints: BTreeSet<NamespacedName> = self.waypoints.keys().cloned().collect();
        let is_waypoint = |k: &NamespacedName| waypoints.contains(k);
        let mut added = Vec::new();
        for spec in changed {
            if spec.labels.contains_key(GATEWAY_NAME_LABEL) {
                return Err(NeedsFullBuild("a waypoint's pod changed"));
            }
            let mut p = Problems::default();
            let cx = Context {
                trust_domain: &self.trust_domain,
                trust_domain_ok: true,
                namespaces: &self.namespaces,
                nodes: &self.nodes,
                is_waypoint: &is_waypoint,
            };
            let known = |uid: &str| self.workloads.contains_key(uid);
            let place = format!("workloads ({}/{})", spec.namespace, spec.name);
            let w = derive_workload(&mut p, &place, spec, &cx, &mut owners.0, &known)
                .ok_or(NeedsFullBuild("a changed pod has a problem"))?;
            touched.insert(w.namespace.clone());
            added.push(w.uid.clone());
            self.workloads.insert(w.uid.clone(), Arc::new(w));
        }

        // The endpoints of the services of the namespaces touched, as the full build
        // derives them (the namespace's workloads in uid order).
        for ns in &touched {
            let here: Vec<&super::Workload> = self
                .workloads
                .values()
                .filter(|w| &w.namespace == ns)
                .map(|w| &**w)
                .collect();
            let mut updates = Vec::new();
            for (key, svc) in self.services.range(namespace_range(ns)) {
                if svc.is_waypoint {
                    continue;
                }
                if svc.selector.is_empty() && !svc.endpoints.is_empty() {
                    return Err(NeedsFullBuild(
                        "a service whose endpoints are listed, not selected",
                    ));
                }
                let endpoints = endpoints_of(&svc.selector, None, &here);
                if endpoints != svc.endpoints {
                    updates.push((key.clone(), endpoints));
                }
            }
            for (key, endpoints) in updates {
                if let Some(svc) = self.services.get_mut(&key) {
                    Arc::make_mut(svc).endpoints = endpoints;
                }
            }
        }

        // The waypoint of each new workload: its namespace's, or that of the first
        // service (in name order) with a waypoint that selects it (only services of its
        // own namespace select it).
        let mut waypoint_updates = Vec::new();
        for uid in &added {
            let w = &self.workloads[uid];
            if w.native_tunnel {
                continue;
            }
            let via = self
                .services
                .range(namespace_range(&w.namespace))
                .find_map(|(_, svc)| {
                    svc.waypoint
                        .as_ref()
                        .filter(|_| svc.endpoints.iter().any(|e| e == uid))
                });
            let wp = waypoint_of(w, &self.namespaces, &self.waypoints, |_| via);
            if wp != w.waypoint {
                waypoint_updates.push((uid.clone(), wp));
            }
        }
        for (uid, wp) in waypoint_updates {
            if let Some(w) = self.workloads.get_mut(&uid) {
                Arc::make_mut(w).waypoint = wp;
            }
        }
        Ok(())
    }
}

/// The keys of one namespace's entries in a map by [`NamespacedName`].
fn namespace_range(ns: &str) -> std::ops::RangeInclusive<NamespacedName> {
    NamespacedName {
        namespace: ns.to_owned(),
        name: String::new(),
    }..=NamespacedName {
        namespace: ns.to_owned(),
        name: char::MAX.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{
        DATAPLANE_AMBIENT, DATAPLANE_LABEL, Labels, MeshSpec, NamespaceSpec, NodeSpec, ServicePort,
        ServiceSpec, WAYPOINT_LABEL, WaypointSpec,
    };

    const NAMESPACES: [&str; 3] = ["shop", "lab", "ops"];
    const APPS: [&str; 4] = ["web", "db", "cache", "api"];

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Namespaces (one with a waypoint for all, one enrolled), two nodes, services per
    /// app and a waypoint with one pod in `ops`.
    fn base() -> MeshSpec {
        let mut spec = MeshSpec {
            trust_domain: "cluster.local".into(),
            namespaces: vec![
                NamespaceSpec {
                    name: "shop".into(),
                    labels: labels(&[(DATAPLANE_LABEL, DATAPLANE_AMBIENT)]),
                },
                NamespaceSpec {
                    name: "lab".into(),
                    labels: Labels::new(),
                },
                NamespaceSpec {
                    name: "ops".into(),
                    labels: labels(&[(DATAPLANE_LABEL, DATAPLANE_AMBIENT)]),
                },
            ],
            nodes: vec![
                NodeSpec {
                    name: "node-1".into(),
                },
                NodeSpec {
                    name: "node-2".into(),
                },
            ],
            waypoints: vec![WaypointSpec {
                name: "wp".into(),
                namespace: "ops".into(),
                vips: vec![],
            }],
            ..Default::default()
        };
        spec.workloads.push(WorkloadSpec {
            uid: Some("wp-0".into()),
            name: "wp-0".into(),
            namespace: "ops".into(),
            node: "node-1".into(),
            service_account: Some("wp".into()),
            ips: vec!["10.244.9.1".parse().unwrap()],
            labels: labels(&[(GATEWAY_NAME_LABEL, "wp")]),
            terminating: false,
        });
        let mut vip = 1;
        for ns in NAMESPACES {
            for app in APPS {
                let mut l = Labels::new();
                // In ops, the api service goes through the waypoint.
                if ns == "ops" && app == "api" {
                    l.insert(WAYPOINT_LABEL.into(), "wp".into());
                }
                spec.services.push(ServiceSpec {
                    name: app.into(),
                    namespace: ns.into(),
                    vips: vec![format!("10.96.0.{vip}").parse().unwrap()],
                    ports: vec![ServicePort {
                        name: Some("http".into()),
                        port: 80,
                        target_port: 8080,
                        app_protocol: None,
                    }],
                    selector: labels(&[("app", app)]),
                    endpoints: None,
                    labels: l,
                });
                vip += 1;
            }
        }
        spec
    }

    fn random_pod(uid: usize, rng: &mut fastrand::Rng) -> WorkloadSpec {
        let ns = NAMESPACES[rng.usize(..NAMESPACES.len())];
        let mut l = labels(&[("app", APPS[rng.usize(..APPS.len())])]);
        if rng.u8(..10) == 0 {
            l.insert(DATAPLANE_LABEL.into(), "none".into());
        }
        if rng.u8(..10) == 0 {
            l.insert("ambit.dev/mtls".into(), "PERMISSIVE".into());
        }
        WorkloadSpec {
            uid: Some(format!("pod-{uid}")),
            name: format!("pod-{uid}"),
            namespace: ns.into(),
            node: format!("node-{}", rng.u8(1..=2)),
            service_account: Some(APPS[rng.usize(..APPS.len())].into()),
            ips: vec![
                format!("10.244.{}.{}", uid / 200, uid % 200 + 1)
                    .parse()
                    .unwrap(),
            ],
            labels: l,
            terminating: rng.u8(..8) == 0,
        }
    }

    /// Random pod changes applied one at a time give, every time, the model a full
    /// build of the same pods gives.
    #[test]
    fn pod_changes_give_the_model_a_full_build_gives() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut pods: BTreeMap<String, WorkloadSpec> = BTreeMap::new();
        for i in 0..40 {
            let p = random_pod(i, &mut rng);
            pods.insert(p.uid.clone().unwrap(), p);
        }
        let spec_with = |pods: &BTreeMap<String, WorkloadSpec>| {
            let mut s = base();
            s.workloads.extend(pods.values().cloned());
            s
        };
        let (mut model, problems) = Model::build_lenient(spec_with(&pods));
        assert!(problems.is_empty(), "{problems:?}");
        let mut owners = IpOwners::of(&model);
        let (mut applied, mut refused) = (0, 0);
        let mut next_uid = 40;
        for step in 0..400 {
            let (gone, changed): (Vec<String>, Vec<WorkloadSpec>) = match rng.u8(..5) {
                // A new pod.
                0 => {
                    let p = random_pod(next_uid, &mut rng);
                    next_uid += 1;
                    (vec![], vec![p])
                }
                // A pod leaves.
                1 if !pods.is_empty() => {
                    let uid = pods.keys().nth(rng.usize(..pods.len())).unwrap().clone();
                    (vec![uid], vec![])
                }
                // A pod's labels, readiness or IP change (sometimes to one taken).
                _ if !pods.is_empty() => {
                    let uid = pods.keys().nth(rng.usize(..pods.len())).unwrap().clone();
                    let mut p = pods[&uid].clone();
                    match rng.u8(..4) {
                        0 => {
                            p.labels
                                .insert("app".into(), APPS[rng.usize(..APPS.len())].into());
                        }
                        1 => p.terminating = !p.terminating,
                        2 => {
                            let other = pods.values().nth(rng.usize(..pods.len())).unwrap();
                            p.ips = other.ips.clone();
                        }
                        _ => {
                            p.labels.insert(WAYPOINT_LABEL.into(), "x".into());
                        }
                    }
                    (vec![], vec![p])
                }
                _ => continue,
            };
            for uid in &gone {
                pods.remove(uid);
            }
            for p in &changed {
                pods.insert(p.uid.clone().unwrap(), p.clone());
            }
            let (full, problems) = Model::build_lenient(spec_with(&pods));
            let mut next = model.clone();
            let mut next_owners = owners.clone();
            match next.apply_pod_changes(&mut next_owners, &gone, changed) {
                Ok(()) => {
                    applied += 1;
                    assert!(
                        problems.is_empty(),
                        "step {step}: applied a change a full build has problems with: {problems:?}"
                    );
                    assert_eq!(next, full, "step {step}");
                    (model, owners) = (next, next_owners);
                }
                Err(_) => {
                    refused += 1;
                    // As the source does: a full build, with the offending pods left out.
                    // Undo the pods a full build refused, so the walk goes on valid.
                    if !problems.is_empty() {
                        let bad: Vec<String> = pods
                            .keys()
                            .filter(|uid| !full.workloads.contains_key(*uid))
                            .cloned()
                            .collect();
                        for uid in bad {
                            pods.remove(&uid);
                        }
                    }
                    let (m, problems) = Model::build_lenient(spec_with(&pods));
                    assert!(problems.is_empty(), "{problems:?}");
                    owners = IpOwners::of(&m);
                    model = m;
                }
            }
        }
        // Most changes take the short way; the rest (taken IPs, ...) were refused.
        assert!(applied > 250, "{applied} applied, {refused} refused");
        assert!(refused > 10, "{applied} applied, {refused} refused");
    }

    #[test]
    fn a_waypoints_pods_and_listed_endpoints_need_a_full_build() {
        let (model, _) = Model::build_lenient(base());
        let mut owners = IpOwners::of(&model);
        let mut m = model.clone();
        assert_eq!(
            m.apply_pod_changes(&mut owners, &["wp-0".into()], vec![]),
            Err(NeedsFullBuild("a waypoint's pod changed"))
        );
        let mut spec = base();
        spec.services[0].selector = Labels::new();
        spec.services[0].endpoints = Some(vec!["pod-1".into()]);
        spec.workloads.push(WorkloadSpec {
            uid: Some("pod-1".into()),
            name: "pod-1".into(),
            namespace: spec.services[0].namespace.clone(),
            node: "node-1".into(),
            ips: vec!["10.244.1.1".parse().unwrap()],
            ..Default::default()
        });
        let (model, problems) = Model::build_lenient(spec);
        assert!(problems.is_empty(), "{problems:?}");
        let mut owners = IpOwners::of(&model);
        let mut m = model.clone();
        assert!(
            m.apply_pod_changes(&mut owners, &["pod-1".into()], vec![])
                .is_err()
        );
    }
}
