//! Gateway API objects: `Gateway`s of Ambit's waypoint class (each is a waypoint) and
//! `HTTPRoute`s with Service parents (the GAMMA mesh profile), as the model's specs, and
//! the status Ambit writes back to them.
//!
//! Both are read as the API returns them (`DynamicObject`), and an HTTPRoute's spec is
//! read field for field into the mesh file's [`HttpRouteSpec`], which has Gateway API's
//! own shape: a field Ambit does not implement (an experimental filter, session
//! persistence, ...) is named in the route's status and the route is not applied, never
//! applied in part. An HTTPRoute whose parents are all Gateways belongs to some ingress
//! controller and is left alone; of a route with both, only its Service parents are
//! Ambit's.
//!
//! A waypoint's pods are its namespace's pods labelled
//! `gateway.networking.k8s.io/gateway-name: <name>` (as Istio's); the Service of the
//! Gateway's name in front of them (the waypoint template in `deploy/waypoint/` creates
//! both) gives the waypoint its virtual IPs and is not a service of the mesh itself.

use kube::api::{ApiResource, DynamicObject};
use serde_json::{Value, json};

use super::policy::Verdict;
use super::status::PolicyView;
use crate::model::http::HttpRouteSpec;

/// The `gatewayClassName` of Ambit's waypoints.
pub const WAYPOINT_CLASS: &str = "ambit-waypoint";
/// The `controllerName` of the GatewayClass [`WAYPOINT_CLASS`] (deploy/ creates it).
pub const GATEWAY_CONTROLLER: &str = "ambit.dev/waypoint-controller";
/// The `controllerName` Ambit writes in an HTTPRoute's `status.parents[]` for the
/// Service parents it serves.
pub const MESH_CONTROLLER: &str = "ambit.dev/mesh-controller";
/// The group of Gateway API's objects.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// A Gateway API `v1` type.
pub fn api_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: "v1".into(),
        api_version: format!("{GROUP}/v1"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// A Gateway, as the source keeps it.
#[derive(Clone, Debug, PartialEq)]
pub enum GatewayView {
    /// Of another class: some other controller's.
    Other,
    /// One of Ambit's waypoints.
    Waypoint(WaypointView),
}

/// A Gateway of the waypoint class.
#[derive(Clone, Debug, PartialEq)]
pub struct WaypointView {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Accepted, or refused (it is then no waypoint).
    pub verdict: Verdict,
    /// Its `metadata.generation`.
    pub generation: Option<i64>,
    /// Its `status` as stored (written again only when it should change).
    pub status: Value,
}

/// A Gateway's view: a waypoint if its class is [`WAYPOINT_CLASS`] and its listeners are
/// a waypoint's (Istio's form: `protocol: HBONE`, `port: 15008`).
pub fn gateway(o: &DynamicObject) -> GatewayView {
    let spec = o.data.get("spec").cloned().unwrap_or(Value::Null);
    if spec["gatewayClassName"].as_str() != Some(WAYPOINT_CLASS) {
        return GatewayView::Other;
    }
    let listeners = spec["listeners"].as_array().cloned().unwrap_or_default();
    let bad: Vec<String> = listeners
        .iter()
        .filter(|l| l["protocol"] != "HBONE" || l["port"] != 15008)
        .map(|l| {
            format!(
                "{} ({} {})",
                l["name"].as_str().unwrap_or("?"),
                l["protocol"].as_str().unwrap_or("?"),
                l["port"]
            )
        })
        .collect();
    let verdict = if listeners.is_empty() {
        Verdict::Refused(
            "UnsupportedValue",
            "a waypoint needs one listener: {name: mesh, port: 15008, protocol: HBONE}".into(),
        )
    } else if !bad.is_empty() {
        Verdict::Refused(
            "UnsupportedValue",
            format!(
                "listeners {}: a waypoint's listeners are HBONE on port 15008",
                bad.join(", ")
            ),
        )
    } else if spec
        .get("addresses")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        Verdict::Refused(
            "UnsupportedAddress",
            "spec.addresses: a waypoint's addresses are its Service's cluster IPs".into(),
        )
    } else {
        Verdict::Accepted
    };
    GatewayView::Waypoint(WaypointView {
        namespace: o.metadata.namespace.clone().unwrap_or_default(),
        name: o.metadata.name.clone().unwrap_or_default(),
        verdict,
        generation: o.metadata.generation,
        status: o.data.get("status").cloned().unwrap_or(Value::Null),
    })
}

/// An HTTPRoute with at least one Service parent, as the source keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteView {
    /// The spec as the model reads it (its Service parents only), and its verdict.
    pub policy: PolicyView<HttpRouteSpec>,
    /// Its Service `parentRefs` as written (each gets a `status.parents[]` entry).
    pub parents: Vec<Value>,
    /// `status.parents[]` as stored.
    pub status_parents: Vec<Value>,
}

/// Whether a `parentRef` names a Service.
fn is_service(p: &Value) -> bool {
    p["kind"] == "Service" && matches!(p["group"].as_str(), None | Some("") | Some("core"))
}

/// An HTTPRoute's view; `None` if none of its parents is a Service (not a mesh route).
pub fn route(o: &DynamicObject, old: Option<&RouteView>) -> Option<RouteView> {
    let mut spec = o.data.get("spec").cloned().unwrap_or(json!({}));
    let parents: Vec<Value> = spec["parentRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| is_service(p))
        .cloned()
        .collect();
    if parents.is_empty() {
        return None;
    }
    let status_parents = o
        .data
        .get("status")
        .and_then(|s| s.get("parents"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let policy = PolicyView::of(o, |namespace, name| {
        spec["parentRefs"] = Value::Array(parents.clone());
        if let Some(s) = spec.as_object_mut() {
            s.insert("name".into(), name.into());
            s.insert("namespace".into(), namespace.into());
        }
        match serde_json::from_value::<HttpRouteSpec>(spec) {
            Ok(s) => (Some(s), Verdict::Accepted),
            Err(e) => (
                None,
                Verdict::Refused("UnsupportedValue", format!("spec: {e}")),
            ),
        }
    })
    .keeping_last_valid_for("UnsupportedValue", old.map(|o| &o.policy));
    Some(RouteView {
        policy,
        parents,
        status_parents,
    })
}

/// A condition as Gateway API's status wants it (`lastTransitionTime` is required:
/// kept from `stored` while the status holds, else now).
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    stored: &[Value],
) -> Value {
    let status = if status { "True" } else { "False" };
    let since = stored
        .iter()
        .find(|c| c["type"] == type_ && c["status"] == status)
        .and_then(|c| c["lastTransitionTime"].as_str().map(str::to_owned))
        .unwrap_or_else(now);
    let mut c = json!({
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    });
    if let Some(g) = generation {
        c["observedGeneration"] = g.into();
    }
    c
}

fn now() -> String {
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .ok()
    .and_then(|v| v.as_str().map(str::to_owned))
    .unwrap_or_default()
}

/// Conditions compared without their times (a status written again only if this
/// changes).
pub fn without_times(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "lastTransitionTime")
                .map(|(k, v)| (k.clone(), without_times(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_times).collect()),
        other => other.clone(),
    }
}

impl RouteView {
    /// Its `status.parents`: other controllers' entries as they are, and one of
    /// Ambit's per Service parent, saying whether the route is applied (`problems`: why
    /// not) and whether its backends resolved.
    pub fn status_parents(&self, problems: &[String]) -> Vec<Value> {
        let p = &self.policy;
        let generation = p.generation;
        let (accepted, reason, message) = match (&p.verdict, problems.is_empty()) {
            (Verdict::Refused(r, m), _) => (false, *r, m.clone()),
            (_, false) => (false, "UnsupportedValue", problems.join("; ")),
            (Verdict::Partly(r, m), true) => (true, *r, m.clone()),
            (Verdict::Accepted, true) => (
                true,
                "Accepted",
                "applied by the service's waypoint".to_owned(),
            ),
        };
        let backend_problems: Vec<&String> = problems
            .iter()
            .filter(|m| m.contains("backendRefs"))
            .collect();
        let mut out: Vec<Value> = self
            .status_parents
            .iter()
            .filter(|e| e["controllerName"] != MESH_CONTROLLER)
            .cloned()
            .collect();
        for parent in &self.parents {
            let stored: Vec<Value> = self
                .status_parents
                .iter()
                .find(|e| e["controllerName"] == MESH_CONTROLLER && &e["parentRef"] == parent)
                .and_then(|e| e["conditions"].as_array().cloned())
                .unwrap_or_default();
            let resolved = if backend_problems.is_empty() {
                condition(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "every backend is a Service of the route's namespace",
                    generation,
                    &stored,
                )
            } else {
                condition(
                    "ResolvedRefs",
                    false,
                    "BackendNotFound",
                    &backend_problems
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join("; "),
                    generation,
                    &stored,
                )
            };
            out.push(json!({
                "parentRef": parent,
                "controllerName": MESH_CONTROLLER,
                "conditions": [
                    condition("Accepted", accepted, reason, &message, generation, &stored),
                    resolved,
                ],
            }));
        }
        out
    }
}

impl WaypointView {
    /// Its `status`: `Accepted`, `Programmed` (a pod of it is ready) and its addresses.
    pub fn status(&self, vips: &[std::net::IpAddr], ready_pods: usize) -> Value {
        let stored: Vec<Value> = self.status["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let g = self.generation;
        let accepted = match &self.verdict {
            Verdict::Refused(r, m) => condition("Accepted", false, r, m, g, &stored),
            _ => condition(
                "Accepted",
                true,
                "Accepted",
                "a waypoint of the mesh",
                g,
                &stored,
            ),
        };
        let programmed = match (&self.verdict, ready_pods) {
            (Verdict::Refused(..), _) => {
                condition("Programmed", false, "Invalid", "not accepted", g, &stored)
            }
            (_, 0) => condition(
                "Programmed",
                false,
                "Pending",
                &format!(
                    "no ready pod labelled {}={} in {}",
                    crate::model::GATEWAY_NAME_LABEL,
                    self.name,
                    self.namespace
                ),
                g,
                &stored,
            ),
            (_, n) => condition(
                "Programmed",
                true,
                "Programmed",
                &format!("{n} ready pod(s)"),
                g,
                &stored,
            ),
        };
        let addresses: Vec<Value> = vips
            .iter()
            .map(|ip| json!({"type": "IPAddress", "value": ip.to_string()}))
            .collect();
        json!({"conditions": [accepted, programmed], "addresses": addresses})
    }
}
