//! Policy objects as the source keeps them, the mTLS modes PeerAuthentications set, and
//! writing each Ambit policy object's `Accepted` condition back to its `status`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde_json::json;
use tracing::{debug, warn};

use super::gateway::{self, GatewayView};
use super::policy::{
    AuthorizationPolicy, PeerAuthentication, PeerAuthenticationSpec, PolicyStatus,
    RequestAuthentication, StatusCondition, Verdict, peer_authentication,
};
use super::{PolicyKind, View};
use crate::model::{Labels, selects};

/// A policy object, converted, with what became of it and its current status.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyView<T> {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// What the model gets of it (nothing if refused).
    pub converted: Option<T>,
    /// What became of it.
    pub verdict: Verdict,
    /// Its `metadata.generation`.
    pub generation: Option<i64>,
    /// The generation `converted` comes from: older than `generation` when the current
    /// spec is invalid and the last valid one stays applied.
    pub applied_generation: Option<i64>,
    /// Its `Accepted` condition as stored in the API.
    pub current: Option<StatusCondition>,
}

impl<T> PolicyView<T> {
    /// Converts `o` with `convert(namespace, name)`.
    pub fn of<K>(o: &K, convert: impl FnOnce(&str, &str) -> (Option<T>, Verdict)) -> Self
    where
        K: Resource + serde::Serialize,
    {
        let m = o.meta();
        let namespace = m.namespace.clone().unwrap_or_default();
        let name = m.name.clone().unwrap_or_default();
        let (converted, verdict) = convert(&namespace, &name);
        let applied_generation = converted.as_ref().and(m.generation);
        let current = serde_json::to_value(o)
            .ok()
            .and_then(|v| serde_json::from_value::<PolicyStatus>(v["status"].clone()).ok())
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Accepted"));
        Self {
            namespace,
            name,
            converted,
            verdict,
            generation: m.generation,
            applied_generation,
            current,
        }
    }

    /// An invalid edit of a valid object leaves its last valid version applied (as an
    /// admission webhook's rejection would have), so that a typo cannot silently widen
    /// or narrow who may connect; its status says so. An object that was never valid,
    /// or that now targets a waypoint or asks for an unsupported action, is not kept.
    pub fn keeping_last_valid(self, old: Option<&Self>) -> Self
    where
        T: Clone,
    {
        self.keeping_last_valid_for("Invalid", old)
    }

    /// [`keeping_last_valid`](Self::keeping_last_valid), for a refusal with `reason`.
    pub fn keeping_last_valid_for(mut self, reason: &str, old: Option<&Self>) -> Self
    where
        T: Clone,
    {
        if let (None, Verdict::Refused(r, msg), Some(old)) = (&self.converted, &self.verdict, old)
            && *r == reason
            && old.converted.is_some()
        {
            let kept = match old.applied_generation {
                Some(g) => format!("generation {g}"),
                None => "the last valid version".into(),
            };
            self.verdict = Verdict::Refused(
                r,
                format!("{msg}; {kept} stays applied until this is fixed"),
            );
            self.converted = old.converted.clone();
            self.applied_generation = old.applied_generation;
        }
        self
    }
}

/// A PeerAuthentication: the mode it sets (None: UNSET) on what it selects (None: its
/// namespace, or in the root namespace the mesh).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    /// `STRICT` or `PERMISSIVE`.
    pub mode: Option<&'static str>,
    /// Its workload selector.
    pub selector: Option<Labels>,
}

/// A PeerAuthentication spec as the source keeps it.
pub fn peer_view(spec: &PeerAuthenticationSpec) -> (Option<PeerView>, Verdict) {
    let (mode, verdict) = peer_authentication(spec);
    let selector = spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .filter(|l| !l.is_empty());
    (Some(PeerView { mode, selector }), verdict)
}

/// The `spec` of an Istio object.
pub fn istio_spec<T: serde::de::DeserializeOwned>(o: &DynamicObject) -> Result<T, Verdict> {
    serde_json::from_value(o.data.get("spec").cloned().unwrap_or(json!({})))
        .map_err(|e| Verdict::Refused("Invalid", format!("spec: {e}")))
}

/// The modes PeerAuthentications set, by level.
#[derive(Debug, Default)]
pub struct PeerModes<'a> {
    mesh: Option<&'static str>,
    namespaces: HashMap<&'a str, &'static str>,
    /// By namespace: (selector, mode), in name order (the first match wins).
    workloads: HashMap<&'a str, Vec<(&'a Labels, &'static str)>>,
}

impl PeerModes<'_> {
    /// A namespace's mode: its own PeerAuthentication's; else, if it has no
    /// `ambit.dev/mtls` label, the mesh's.
    pub fn for_namespace(&self, namespace: &str, labels: &Labels) -> Option<&'static str> {
        self.namespaces.get(namespace).copied().or_else(|| {
            (!labels.contains_key(crate::model::MTLS_LABEL))
                .then_some(self.mesh)
                .flatten()
        })
    }

    /// A workload's own mode (over its namespace's): the first selecting
    /// PeerAuthentication's.
    pub fn for_workload(&self, namespace: &str, labels: &Labels) -> Option<&'static str> {
        self.workloads
            .get(namespace)?
            .iter()
            .find(|(sel, _)| selects(sel, labels))
            .map(|(_, m)| *m)
    }
}

impl View {
    /// The modes of every PeerAuthentication (Ambit's and Istio's).
    pub(super) fn peer_modes(&self) -> PeerModes<'_> {
        let mut modes = PeerModes::default();
        let mut all: Vec<&PolicyView<PeerView>> = self
            .peer_authentications
            .live
            .values()
            .chain(self.istio_peer_authentications.live.values())
            .collect();
        all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for p in all {
            let Some(PeerView {
                mode: Some(mode),
                selector,
            }) = &p.converted
            else {
                continue;
            };
            match selector {
                Some(sel) => modes
                    .workloads
                    .entry(p.namespace.as_str())
                    .or_default()
                    .push((sel, mode)),
                None => {
                    if p.namespace == self.root_namespace {
                        modes.mesh.get_or_insert(mode);
                    }
                    modes.namespaces.entry(p.namespace.as_str()).or_insert(mode);
                }
            }
        }
        modes
    }
}

/// Writes Ambit policy objects' `Accepted` conditions, each only when it changes.
pub struct StatusWriter {
    client: Client,
    /// What was last written per object, so a write is not repeated while its echo (a
    /// MODIFIED event) is on its way.
    written: Arc<Mutex<Written>>,
    written_values: Arc<Mutex<WrittenValues>>,
}

/// (kind, namespace, name) → the condition last written.
type Written = HashMap<(&'static str, String, String), StatusCondition>;
/// (kind, namespace, name) → the status last written (Gateway API objects).
type WrittenValues = HashMap<(&'static str, String, String), serde_json::Value>;

impl StatusWriter {
    /// Writes through `client`.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            written: Arc::default(),
            written_values: Arc::default(),
        }
    }

    /// Brings every Ambit policy object's status in line with its verdict, and every
    /// waypoint Gateway's and mesh HTTPRoute's with what became of it.
    pub(super) fn write(&self, view: &mut View) {
        let problems = |kind, namespace: &str, name: &str| {
            view.policy_problems
                .get(&(kind, format!("{namespace}/{name}")))
                .map(Vec::as_slice)
                .unwrap_or_default()
        };
        for p in view.authorizations.live.values() {
            let verdict = with_model_problems(
                p,
                problems(PolicyKind::Authorization, &p.namespace, &p.name),
            );
            self.write_one::<AuthorizationPolicy, _>("AuthorizationPolicy", p, &verdict);
        }
        for p in view.peer_authentications.live.values() {
            self.write_one::<PeerAuthentication, _>("PeerAuthentication", p, &p.verdict);
        }
        for p in view.request_authentications.live.values() {
            let verdict = with_model_problems(
                p,
                problems(PolicyKind::RequestAuthentication, &p.namespace, &p.name),
            );
            self.write_one::<RequestAuthentication, _>("RequestAuthentication", p, &verdict);
        }
        let gateways = gateway::api_resource("Gateway", "gateways");
        for g in view.gateways.live.values() {
            let GatewayView::Waypoint(w) = g else {
                continue;
            };
            let key = format!("{}/{}", w.namespace, w.name);
            let (vips, ready) = view.waypoint_state.get(&key).cloned().unwrap_or_default();
            let want = w.status(&vips, ready);
            let stored = serde_json::json!({
                "conditions": w.status.get("conditions").cloned().unwrap_or(serde_json::json!([])),
                "addresses": w.status.get("addresses").cloned().unwrap_or(serde_json::json!([])),
            });
            self.write_value(&gateways, "Gateway", &w.namespace, &w.name, &stored, want);
        }
        let routes = gateway::api_resource("HTTPRoute", "httproutes");
        for r in view.routes.live.values().flatten() {
            let p = &r.policy;
            let key = format!("{}/{}", p.namespace, p.name);
            let problems = view.route_problems.get(&key).cloned().unwrap_or_default();
            let want = serde_json::json!({"parents": r.status_parents(&problems)});
            let stored = serde_json::json!({"parents": r.status_parents});
            self.write_value(&routes, "HTTPRoute", &p.namespace, &p.name, &stored, want);
        }
    }

    /// Merge-patches `want` into a Gateway API object's status, unless it says what
    /// `stored` (or the last write) says, times aside.
    fn write_value(
        &self,
        ar: &kube::api::ApiResource,
        kind: &'static str,
        namespace: &str,
        name: &str,
        stored: &serde_json::Value,
        want: serde_json::Value,
    ) {
        let plain = gateway::without_times(&want);
        if gateway::without_times(stored) == plain {
            return;
        }
        let key = (kind, namespace.to_owned(), name.to_owned());
        {
            let mut written = self
                .written_values
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if written.get(&key) == Some(&plain) {
                return;
            }
            written.insert(key, plain);
        }
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, ar);
        patch_status(api, kind, namespace, name, json!({ "status": want }));
    }

    fn write_one<K, T>(&self, kind: &'static str, p: &PolicyView<T>, verdict: &Verdict)
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + 'static,
    {
        let mut want = verdict.condition(p.generation);
        let same = |a: &StatusCondition, b: &StatusCondition| {
            (&a.status, &a.reason, &a.message, a.observed_generation)
                == (&b.status, &b.reason, &b.message, b.observed_generation)
        };
        if p.current.as_ref().is_some_and(|c| same(c, &want)) {
            return;
        }
        let key = (kind, p.namespace.clone(), p.name.clone());
        {
            let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
            if written.get(&key).is_some_and(|c| same(c, &want)) {
                return;
            }
            written.insert(key, want.clone());
        }
        want.last_transition_time = match &p.current {
            Some(c) if c.status == want.status => c.last_transition_time.clone(),
            _ => serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now()))
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned)),
        };
        let api: Api<K> = Api::namespaced(self.client.clone(), &p.namespace);
        let patch = json!({"status": {"conditions": [want]}});
        patch_status(api, kind, &p.namespace, &p.name, patch);
    }
}

/// What became of a converted object once the model was built from it: refused if the
/// build left it out (`problems`), with a reason for what is wrong (Gateway API's policy
/// reasons where they fit): `TargetNotFound`, `NoWaypoint` (nothing would enforce it),
/// else `Invalid`.
fn with_model_problems<T>(p: &PolicyView<T>, problems: &[String]) -> Verdict {
    if problems.is_empty() || p.converted.is_none() || matches!(p.verdict, Verdict::Refused(..)) {
        return p.verdict.clone();
    }
    let at_targets = problems.iter().all(|m| m.starts_with("targetRefs["));
    let reason = if !at_targets {
        "Invalid"
    } else if problems.iter().any(|m| m.contains("has no waypoint")) {
        "NoWaypoint"
    } else {
        "TargetNotFound"
    };
    Verdict::Refused(reason, format!("not applied: {}", problems.join("; ")))
}

/// Sends a merge patch of an object's status in the background (a failed write is
/// logged; the next build writes again).
fn patch_status<K>(
    api: Api<K>,
    kind: &'static str,
    namespace: &str,
    name: &str,
    patch: serde_json::Value,
) where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug + 'static,
{
    let (name, ns) = (name.to_owned(), namespace.to_owned());
    tokio::spawn(async move {
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => debug!(kind, namespace = %ns, name = %name, "status written"),
            Err(e) => {
                warn!(kind, namespace = %ns, name = %name, "could not write the status: {e}")
            }
        }
    });
}
