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
            registry: Registry::default(),
        };
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
