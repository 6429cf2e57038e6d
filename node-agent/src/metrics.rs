//! Prometheus metrics: the agent's own connection counters and, read from the kernel at
//! scrape time, every enrolled workload's byte and packet counters.

use std::sync::Arc;

use ambit_ebpf_common::Direction;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::datapath::Datapath;
use crate::pods::PodRegistry;
use crate::store::{Service, Workload};

/// Identifies a workload in metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabels {
    pub workload: String,
    pub workload_namespace: String,
}

/// Why a captured connection could not be proxied.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub workload: String,
    pub workload_namespace: String,
    pub reason: &'static str,
}

/// Istio's standard TCP metric labels, so existing dashboards work unchanged.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: &'static str,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: &'static str,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// One side of a connection, as far as the agent knows it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peer<'a> {
    pub workload: Option<&'a Workload>,
    /// Its SPIFFE ID, if it proved one (mTLS) or is known from xDS.
    pub principal: Option<&'a str>,
}

const UNKNOWN: &str = "unknown";
/// Istio's default cluster name.
const CLUSTER: &str = "Kubernetes";

struct PeerLabels {
    workload: String,
    canonical_service: String,
    canonical_revision: String,
    namespace: String,
    principal: String,
    app: String,
    version: String,
}

impl Peer<'_> {
    fn labels(&self) -> PeerLabels {
        let label = |keys: &[&str]| {
            self.workload
                .and_then(|w| keys.iter().find_map(|k| w.labels.get(*k)))
                .cloned()
        };
        let name = self.workload.map(|w| w.name.clone());
        PeerLabels {
            canonical_service: label(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .or_else(|| name.clone())
            .unwrap_or_else(|| UNKNOWN.into()),
            canonical_revision: label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".into()),
            app: label(&["app", "app.kubernetes.io/name"]).unwrap_or_else(|| UNKNOWN.into()),
            version: label(&["version", "app.kubernetes.io/version"])
                .unwrap_or_else(|| UNKNOWN.into()),
            workload: name.unwrap_or_else(|| UNKNOWN.into()),
            namespace: self
                .workload
                .map(|w| w.namespace.clone())
                .unwrap_or_else(|| UNKNOWN.into()),
            principal: self
                .principal
                .or(self.workload.map(|w| w.identity.as_str()))
                .unwrap_or(UNKNOWN)
                .to_owned(),
        }
    }
}

impl TcpLabels {
    /// `reporter`: "source" (the client's agent) or "destination" (the server's).
    /// `mtls`: whether the connection crossed the network inside HBONE.
    pub fn new(
        reporter: &'static str,
        src: Peer<'_>,
        dst: Peer<'_>,
        service: Option<&Service>,
        mtls: bool,
    ) -> Self {
        let (s, d) = (src.labels(), dst.labels());
        Self {
            reporter,
            source_workload: s.workload,
            source_canonical_service: s.canonical_service,
            source_canonical_revision: s.canonical_revision,
            source_workload_namespace: s.namespace,
            source_principal: s.principal,
            source_app: s.app,
            source_version: s.version,
            source_cluster: CLUSTER,
            destination_service: service
                .map(|s| s.hostname.clone())
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_service_namespace: service
                .map(|s| s.namespace.clone())
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_service_name: service
                .map(|s| s.name.clone())
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_workload: d.workload,
            destination_canonical_service: d.canonical_service,
            destination_canonical_revision: d.canonical_revision,
            destination_workload_namespace: d.namespace,
            destination_principal: d.principal,
            destination_app: d.app,
            destination_version: d.version,
            destination_cluster: CLUSTER,
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: if mtls { "mutual_tls" } else { "none" },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KernelLabels {
    workload: String,
    workload_namespace: String,
    direction: &'static str,
}

/// The agent's metrics and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub connections_opened: Family<WorkloadLabels, Counter>,
    pub connections_closed: Family<WorkloadLabels, Counter>,
    pub sent_bytes: Family<WorkloadLabels, Counter>,
    pub received_bytes: Family<WorkloadLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub active_connections: Gauge,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent: Family<TcpLabels, Counter>,
    pub tcp_received: Family<TcpLabels, Counter>,
    /// Inbound connections refused, by destination workload and reason.
    pub inbound_refused: Family<FailureLabels, Counter>,
    /// Inbound connections established, by destination workload and security
    /// (`mutual_tls` / `none`).
    pub inbound_accepted: Family<FailureLabels, Counter>,
    /// HBONE connections (TLS handshakes) the pool opened.
    pub hbone_dials: Counter,
}

impl Metrics {
    pub fn new(
        datapath: Arc<Datapath>,
        pods: Arc<PodRegistry>,
        xds: Arc<ambit_xds::client::XdsStatus>,
    ) -> Self {
        let mut registry = Registry::default();
        let m = Self {
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            failures: Family::default(),
            active_connections: Gauge::default(),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            inbound_refused: Family::default(),
            inbound_accepted: Family::default(),
            hbone_dials: Counter::default(),
            registry: Registry::default(),
        };
        for (name, help, family) in [
            (
                "istio_tcp_connections_opened",
                "TCP connections opened (Istio standard metric)",
                &m.tcp_opened,
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections closed (Istio standard metric)",
                &m.tcp_closed,
            ),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent from the source to the destination (Istio standard metric)",
                &m.tcp_sent,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes sent from the destination back to the source (Istio standard metric)",
                &m.tcp_received,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "ambit_inbound_refused",
            "Inbound connections refused, by reason (policy_denied, strict_mtls, ...)",
            m.inbound_refused.clone(),
        );
        registry.register(
            "ambit_inbound_accepted",
            "Inbound connections delivered to a workload, by security (reason label)",
            m.inbound_accepted.clone(),
        );
        registry.register(
            "ambit_hbone_dials",
            "HBONE connections (mutual TLS handshakes) opened by the pool",
            m.hbone_dials.clone(),
        );
        registry.register(
            "ambit_outbound_connections_opened",
            "Captured outbound connections the agent accepted",
            m.connections_opened.clone(),
        );
        registry.register(
            "ambit_outbound_connections_closed",
            "Captured outbound connections that ended (cleanly or not)",
            m.connections_closed.clone(),
        );
        registry.register(
            "ambit_outbound_sent_bytes",
            "Bytes the agent forwarded from a workload to its destinations",
            m.sent_bytes.clone(),
        );
        registry.register(
            "ambit_outbound_received_bytes",
            "Bytes the agent forwarded from destinations back to a workload",
            m.received_bytes.clone(),
        );
        registry.register(
            "ambit_outbound_failures",
            "Captured connections the agent could not proxy, by reason",
            m.failures.clone(),
        );
        registry.register(
            "ambit_outbound_active_connections",
            "Captured connections being proxied now",
            m.active_connections.clone(),
        );
        registry.register_collector(Box::new(KernelCounters { datapath, pods }));
        registry.register_collector(Box::new(XdsCollector(xds)));
        Self { registry, ..m }
    }

    /// The registry in Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    type_url: String,
}

/// The xDS client's state.
#[derive(Debug)]
struct XdsCollector(Arc<ambit_xds::client::XdsStatus>);

impl Collector for XdsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.0;
        let g = encoder.encode_descriptor(
            "ambit_xds_connected",
            "1 while connected to the control plane",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(s.connected.load(Relaxed))).encode(g)?;
        let c = encoder.encode_descriptor(
            "ambit_xds_connects",
            "Connections made to the control plane",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(s.connects.load(Relaxed)).encode(c)?;
        let c = encoder.encode_descriptor(
            "ambit_xds_acks",
            "xDS responses applied",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(s.acks.load(Relaxed)).encode(c)?;
        let c = encoder.encode_descriptor(
            "ambit_xds_nacks",
            "xDS responses rejected",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(s.nacks.load(Relaxed)).encode(c)?;
        let types = s.types();
        let mut g = encoder.encode_descriptor(
            "ambit_xds_resources",
            "Resources held, by type",
            None,
            MetricType::Gauge,
        )?;
        for (t, st) in &types {
            ConstGauge::new(st.resources as i64).encode(g.encode_family(&TypeLabels {
                type_url: t.clone(),
            })?)?;
        }
        Ok(())
    }
}

/// Reads the kernel's per-workload counters on each scrape.
#[derive(Debug)]
struct KernelCounters {
    datapath: Arc<Datapath>,
    pods: Arc<PodRegistry>,
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let names = self.pods.labels_by_cookie();
        let counters = self.datapath.counters();
        let rows: Vec<_> = counters
            .iter()
            .filter_map(|(k, c)| {
                let labels = names.get(&k.netns_cookie)?;
                let direction = if k.direction == Direction::Ingress as u32 {
                    "ingress"
                } else {
                    "egress"
                };
                Some((
                    KernelLabels {
                        workload: labels.workload.clone(),
                        workload_namespace: labels.workload_namespace.clone(),
                        direction,
                    },
                    *c,
                ))
            })
            .collect();

        let mut bytes = encoder.encode_descriptor(
            "ambit_workload_bytes",
            "Bytes at the IP layer sent (egress) and received (ingress) by each enrolled workload, counted in the kernel",
            None,
            MetricType::Counter,
        )?;
        for (labels, c) in &rows {
            ConstCounter::new(c.bytes).encode(bytes.encode_family(labels)?)?;
        }
        let mut packets = encoder.encode_descriptor(
            "ambit_workload_packets",
            "Packets sent (egress) and received (ingress) by each enrolled workload, counted in the kernel",
            None,
            MetricType::Counter,
        )?;
        for (labels, c) in &rows {
            ConstCounter::new(c.packets).encode(packets.encode_family(labels)?)?;
        }
        let enrolled = encoder.encode_descriptor(
            "ambit_enrolled_workloads",
            "Workloads whose traffic this agent captures",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(names.len() as i64).encode(enrolled)?;
        Ok(())
    }
}
