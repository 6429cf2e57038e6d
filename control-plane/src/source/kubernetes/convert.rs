//! Kubernetes objects as the model's specs: what of a Namespace, Node, Pod or Service
//! the mesh uses, and which objects it leaves out and why.
//!
//! Conversion is per object and happens when its event arrives, so a rebuild never
//! re-reads the API objects. A Service's named `targetPort` is the one thing that needs
//! other objects (the selected pods' container ports), and a Service without a selector
//! takes its endpoints from its EndpointSlices: both are resolved when the mesh is
//! assembled ([`resolve_service`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{Labels, NamespaceSpec, NodeSpec, ServicePort, ServiceSpec, WorkloadSpec};

/// A pod as the mesh sees it, or why the mesh leaves it out.
#[derive(Clone, Debug, PartialEq)]
pub enum PodView {
    /// A workload of the mesh, and its named container ports (for services' named
    /// `targetPort`s).
    Workload {
        /// The workload.
        spec: WorkloadSpec,
        /// Container port name → number (TCP ports only).
        named_ports: BTreeMap<String, u16>,
    },
    /// Not part of the mesh, for this reason.
    Skipped(&'static str),
}

/// A namespace's name and labels.
pub fn namespace(ns: &Namespace) -> Option<NamespaceSpec> {
    Some(NamespaceSpec {
        name: ns.metadata.name.clone()?,
        labels: ns.metadata.labels.clone().unwrap_or_default(),
    })
}

/// A node's name.
pub fn node(n: &Node) -> Option<NodeSpec> {
    Some(NodeSpec {
        name: n.metadata.name.clone()?,
    })
}

/// A pod as a workload: scheduled, with an IP, running or about to, on the pod network.
pub fn pod(p: &Pod) -> PodView {
    let m = &p.metadata;
    let (Some(name), Some(namespace)) = (m.name.clone(), m.namespace.clone()) else {
        return PodView::Skipped("no name or namespace");
    };
    let Some(spec) = &p.spec else {
        return PodView::Skipped("no spec");
    };
    if spec.host_network == Some(true) {
        // It shares the node's network namespace: capturing it would capture the node.
        return PodView::Skipped("host network");
    }
    let Some(node) = spec.node_name.clone().filter(|n| !n.is_empty()) else {
        return PodView::Skipped("not scheduled yet");
    };
    let status = p.status.as_ref();
    if let Some("Succeeded" | "Failed") = status.and_then(|s| s.phase.as_deref()) {
        // Its containers are gone and its IP may already belong to a new pod.
        return PodView::Skipped("finished");
    }
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    if ips.is_empty() {
        return PodView::Skipped("no IP yet");
    }
    let named_ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
        .collect();
    PodView::Workload {
        spec: WorkloadSpec {
            uid: m.uid.clone(),
            name,
            namespace,
            node,
            service_account: spec.service_account_name.clone().filter(|s| !s.is_empty()),
            ips,
            labels: m.labels.clone().unwrap_or_default(),
            terminating: m.deletion_timestamp.is_some(),
        },
        named_ports,
    }
}

/// A service's port before its `targetPort` is resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortView {
    /// The port's name.
    pub name: Option<String>,
    /// The port clients dial.
    pub port: u16,
    /// The endpoints' port: a number, or a container port name.
    pub target: Target,
    /// Its `appProtocol`.
    pub app_protocol: Option<String>,
}

/// A `targetPort`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A port number.
    Number(u16),
    /// A container port name, resolved against the selected pods.
    Named(String),
}

/// A service as the mesh sees it, before named target ports are resolved, or why the
/// mesh leaves it out.
#[derive(Clone, Debug, PartialEq)]
pub enum ServiceView {
    /// A service with virtual IPs.
    Service {
        /// Its name.
        name: String,
        /// Its namespace.
        namespace: String,
        /// Its cluster IPs.
        vips: Vec<IpAddr>,
        /// Its TCP ports.
        ports: Vec<PortView>,
        /// Its selector (empty: none).
        selector: Labels,
        /// Its labels.
        labels: Labels,
    },
    /// Not part of the mesh, for this reason.
    Skipped(&'static str),
}

/// A service with cluster IPs and TCP ports.
pub fn service(s: &Service) -> ServiceView {
    let m = &s.metadata;
    let (Some(name), Some(namespace)) = (m.name.clone(), m.namespace.clone()) else {
        return ServiceView::Skipped("no name or namespace");
    };
    let Some(spec) = &s.spec else {
        return ServiceView::Skipped("no spec");
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return ServiceView::Skipped("ExternalName (a DNS alias, no virtual IP)");
    }
    let ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    if ips.contains(&"None") {
        return ServiceView::Skipped("headless (no virtual IP)");
    }
    let vips: Vec<IpAddr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
    if vips.is_empty() {
        return ServiceView::Skipped("no cluster IP yet");
    }
    let ports: Vec<PortView> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let target = match &p.target_port {
                None => Target::Number(port),
                Some(IntOrString::Int(n)) => Target::Number(u16::try_from(*n).ok()?),
                Some(IntOrString::String(s)) => match s.parse::<u16>() {
                    Ok(n) => Target::Number(n),
                    Err(_) => Target::Named(s.clone()),
                },
            };
            Some(PortView {
                name: p.name.clone(),
                port,
                target,
                app_protocol: p.app_protocol.clone(),
            })
        })
        .collect();
    if ports.is_empty() {
        return ServiceView::Skipped("no TCP ports");
    }
    ServiceView::Service {
        name,
        namespace,
        vips,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
        labels: m.labels.clone().unwrap_or_default(),
    }
}

/// An EndpointSlice as the mesh uses it, or why it does not.
#[derive(Clone, Debug, PartialEq)]
pub enum SliceView {
    /// Endpoints of a service.
    Slice {
        /// The service's namespace.
        namespace: String,
        /// The service (label `kubernetes.io/service-name`).
        service: String,
        /// Port name (`""` when unnamed) → the endpoints' port (TCP only).
        ports: BTreeMap<String, u16>,
        /// The uids of its endpoints that are pods (ready or serving, not terminating).
        pods: Vec<String>,
        /// Addresses of its endpoints that are not pods.
        others: Vec<IpAddr>,
    },
    /// Not used by the mesh, for this reason.
    Skipped(&'static str),
}

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An EndpointSlice's service, ports and endpoints.
pub fn endpoint_slice(s: &EndpointSlice) -> SliceView {
    let m = &s.metadata;
    let (Some(namespace), Some(service)) = (
        m.namespace.clone(),
        m.labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned(),
    ) else {
        return SliceView::Skipped("no namespace or no kubernetes.io/service-name label");
    };
    if !matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
        return SliceView::Skipped("FQDN endpoints");
    }
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    let (mut pods, mut others) = (Vec::new(), Vec::new());
    for e in &s.endpoints {
        let c = e.conditions.as_ref();
        // Kubernetes: a nil `ready` means ready; terminating endpoints take no new
        // connections.
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        if !ready || terminating {
            continue;
        }
        match e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.uid.clone())
        {
            Some(uid) => pods.push(uid),
            None => others.extend(e.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok())),
        }
    }
    SliceView::Slice {
        namespace,
        service,
        ports,
        pods,
        others,
    }
}

/// The service's spec, its named target ports resolved against the container ports of
/// `pods` (the workloads of its namespace with their named ports). A name no selected
/// pod defines leaves that port out (Kubernetes gives it no endpoints either); a service
/// left without ports is left out, with the reason.
///
/// A service without a selector takes its endpoints from `slices` (its EndpointSlices):
/// their pods, on the port of each service port's name (as kube-proxy matches them).
/// Endpoints that are not pods are not supported yet: they are left out and named in
/// `warnings`.
pub fn resolve_service<'a>(
    view: &ServiceView,
    pods: impl Iterator<Item = (&'a WorkloadSpec, &'a BTreeMap<String, u16>)> + Clone,
    slices: &[&SliceView],
    warnings: &mut Vec<String>,
) -> Result<ServiceSpec, String> {
    let ServiceView::Service {
        name,
        namespace,
        vips,
        ports,
        selector,
        labels,
    } = view
    else {
        return Err("not a service".into());
    };
    let listed = selector.is_empty() && !slices.is_empty();
    let slice_port = |name: &str| {
        slices.iter().find_map(|s| match s {
            SliceView::Slice { ports, .. } => ports.get(name).copied(),
            SliceView::Skipped(_) => None,
        })
    };
    let mut out = Vec::new();
    let mut unresolved = Vec::new();
    for p in ports {
        let target = match &p.target {
            _ if listed => slice_port(p.name.as_deref().unwrap_or("")).or(match &p.target {
                Target::Number(n) => Some(*n),
                Target::Named(_) => None,
            }),
            Target::Number(n) => Some(*n),
            Target::Named(port_name) => pods
                .clone()
                .filter(|(w, _)| crate::model::selects(selector, &w.labels))
                .find_map(|(_, named)| named.get(port_name).copied()),
        };
        match target {
            Some(target_port) => out.push(ServicePort {
                name: p.name.clone(),
                port: p.port,
                target_port,
                app_protocol: p.app_protocol.clone(),
            }),
            None => unresolved.push(p.port),
        }
    }
    if out.is_empty() {
        return Err(format!(
            "no selected pod has a container port named by targetPort of port(s) {unresolved:?}"
        ));
    }
    let endpoints = listed.then(|| {
        let mut uids = Vec::new();
        let mut others = Vec::new();
        for s in slices {
            if let SliceView::Slice {
                pods, others: o, ..
            } = s
            {
                uids.extend(pods.iter().cloned());
                others.extend(o.iter().copied());
            }
        }
        // Slices come in no particular order: sorted, the model is the same each build.
        uids.sort();
        uids.dedup();
        others.sort();
        if !others.is_empty() {
            warnings.push(format!(
                "service {namespace}/{name}: endpoints {others:?} are not pods; endpoints outside the cluster's pods are not supported yet and are left out"
            ));
        }
        uids
    });
    Ok(ServiceSpec {
        name: name.clone(),
        namespace: namespace.clone(),
        vips: vips.clone(),
        ports: out,
        selector: selector.clone(),
        endpoints,
        labels: labels.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod_json(extra: serde_json::Value) -> Pod {
        let mut base = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "shop", "uid": "u-1",
                         "labels": {"app": "web"}},
            "spec": {"nodeName": "node-1", "serviceAccountName": "web",
                     "containers": [{"name": "c", "ports": [
                         {"name": "http", "containerPort": 8080},
                         {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
            "status": {"phase": "Running", "podIP": "10.244.1.10",
                       "podIPs": [{"ip": "10.244.1.10"}, {"ip": "fd00::10"}]}
        });
        merge(&mut base, extra);
        serde_json::from_value(base).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn a_running_pod_is_a_workload_with_its_ips_account_and_named_tcp_ports() {
        let PodView::Workload { spec, named_ports } = pod(&pod_json(json!({}))) else {
            panic!("skipped")
        };
        assert_eq!(spec.uid.as_deref(), Some("u-1"));
        assert_eq!(spec.node, "node-1");
        assert_eq!(spec.service_account.as_deref(), Some("web"));
        assert_eq!(spec.ips.len(), 2);
        assert!(!spec.terminating);
        assert_eq!(named_ports, [("http".to_string(), 8080)].into());
    }

    #[test]
    fn pods_the_mesh_cannot_or_must_not_capture_are_left_out_with_a_reason() {
        let cases = [
            (json!({"spec": {"hostNetwork": true}}), "host network"),
            (json!({"spec": {"nodeName": ""}}), "not scheduled yet"),
            (
                json!({"status": {"podIP": null, "podIPs": null}}),
                "no IP yet",
            ),
            (json!({"status": {"phase": "Succeeded"}}), "finished"),
            (json!({"status": {"phase": "Failed"}}), "finished"),
        ];
        for (patch, why) in cases {
            assert_eq!(
                pod(&pod_json(patch.clone())),
                PodView::Skipped(why),
                "{patch}"
            );
        }
        let PodView::Workload { spec, .. } = pod(&pod_json(
            json!({"metadata": {"deletionTimestamp": "2026-12-02T10:00:00Z"}}),
        )) else {
            panic!("a terminating pod still runs")
        };
        assert!(spec.terminating);
    }

    fn service_json(extra: serde_json::Value) -> Service {
        let mut base = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                     "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"},
                               {"port": 9090, "targetPort": 9091},
                               {"port": 53, "protocol": "UDP"}]}
        });
        merge(&mut base, extra);
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn a_services_named_target_port_is_resolved_against_its_selected_pods() {
        let view = service(&service_json(json!({})));
        let PodView::Workload { spec, named_ports } = pod(&pod_json(json!({}))) else {
            panic!()
        };
        let s =
            resolve_service(&view, [(&spec, &named_ports)].into_iter(), &[], &mut vec![]).unwrap();
        assert_eq!(s.vips.len(), 2);
        let ports: Vec<(u16, u16)> = s.ports.iter().map(|p| (p.port, p.target_port)).collect();
        assert_eq!(ports, [(80, 8080), (9090, 9091)], "UDP left out");
        // Without a pod that names the port, that port has no target.
        let s = resolve_service(&view, std::iter::empty(), &[], &mut vec![]).unwrap();
        assert_eq!(s.ports.len(), 1);
    }

    #[test]
    fn services_without_a_virtual_ip_are_left_out() {
        for (patch, why) in [
            (
                json!({"spec": {"clusterIP": "None", "clusterIPs": ["None"]}}),
                "headless (no virtual IP)",
            ),
            (
                json!({"spec": {"type": "ExternalName", "externalName": "example.com"}}),
                "ExternalName (a DNS alias, no virtual IP)",
            ),
            (
                json!({"spec": {"clusterIP": null, "clusterIPs": null}}),
                "no cluster IP yet",
            ),
            (
                json!({"spec": {"ports": [{"port": 53, "protocol": "UDP"}]}}),
                "no TCP ports",
            ),
        ] {
            assert_eq!(service(&service_json(patch)), ServiceView::Skipped(why));
        }
    }
}
