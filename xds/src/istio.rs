//! Istio's telemetry conventions that cross process boundaries: how a workload's
//! canonical service and revision are derived from its labels, and the endpoint metadata
//! (`filter_metadata["istio"]["workload"]`) through which a proxy learns who the upstream
//! it picked is, so that its `destination_*` labels name it.

/// The endpoint filter-metadata namespace Istio uses.
pub const METADATA: &str = "istio";
/// In [`METADATA`]: `<workload>;<namespace>;<canonical service>;<canonical revision>;<cluster>`.
pub const WORKLOAD: &str = "workload";
/// Istio's default cluster name.
pub const CLUSTER: &str = "Kubernetes";

/// Labels naming the canonical service, in the order Istio tries them.
pub const CANONICAL_SERVICE_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
/// Labels naming the canonical revision, in the order Istio tries them.
pub const CANONICAL_REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];
/// Labels naming `app`, in order.
pub const APP_LABELS: [&str; 2] = ["app", "app.kubernetes.io/name"];
/// Labels naming `version`, in order.
pub const VERSION_LABELS: [&str; 2] = ["version", "app.kubernetes.io/version"];

/// The first of `keys` that `label` knows.
pub fn first<'a>(keys: &[&str], label: impl Fn(&str) -> Option<&'a str>) -> Option<&'a str> {
    keys.iter().find_map(|k| label(k))
}

/// A workload as endpoint metadata names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadMetadata {
    /// The workload's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its canonical service.
    pub canonical_service: String,
    /// Its canonical revision.
    pub canonical_revision: String,
    /// Its cluster.
    pub cluster: String,
}

impl WorkloadMetadata {
    /// `name` of `namespace` with `labels` (looked up by key), in the default cluster.
    pub fn derive<'a>(
        name: &str,
        namespace: &str,
        label: impl Fn(&str) -> Option<&'a str> + Copy,
    ) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            canonical_service: first(&CANONICAL_SERVICE_LABELS, label)
                .unwrap_or(name)
                .to_owned(),
            canonical_revision: first(&CANONICAL_REVISION_LABELS, label)
                .unwrap_or("latest")
                .to_owned(),
            cluster: CLUSTER.to_owned(),
        }
    }

    /// The metadata value: the five fields joined by `;`.
    pub fn encode(&self) -> String {
        format!(
            "{};{};{};{};{}",
            self.name,
            self.namespace,
            self.canonical_service,
            self.canonical_revision,
            self.cluster
        )
    }

    /// Parses a metadata value; `None` unless it has exactly five fields, the first two
    /// non-empty (Kubernetes names never contain `;`).
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split(';');
        let mut next = || it.next().map(str::to_owned);
        let m = Self {
            name: next()?,
            namespace: next()?,
            canonical_service: next()?,
            canonical_revision: next()?,
            cluster: next()?,
        };
        (next().is_none() && !m.name.is_empty() && !m.namespace.is_empty()).then_some(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_metadata_round_trips_and_rejects_other_shapes() {
        let labels = [("app", "reviews"), ("version", "v2")];
        let get = |k: &str| labels.iter().find(|(l, _)| *l == k).map(|(_, v)| *v);
        let m = WorkloadMetadata::derive("reviews-v2-0", "shop", get);
        assert_eq!(m.encode(), "reviews-v2-0;shop;reviews;v2;Kubernetes");
        assert_eq!(WorkloadMetadata::parse(&m.encode()), Some(m));
        // Istio's own form parses the same way.
        let istio = WorkloadMetadata::parse("details-v1;default;details;v1;Kubernetes").unwrap();
        assert_eq!(istio.canonical_service, "details");
        for bad in ["", "a;b;c;d", "a;b;c;d;e;f", ";ns;s;r;c", "n;;s;r;c"] {
            assert_eq!(WorkloadMetadata::parse(bad), None, "{bad:?}");
        }
        // Without labels: the name and `latest`, as Istio.
        let bare = WorkloadMetadata::derive("web-0", "shop", |_| None);
        assert_eq!(bare.encode(), "web-0;shop;web-0;latest;Kubernetes");
    }
}
