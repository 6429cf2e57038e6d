//! The pods' counters on `/metrics`: the kernel's per-workload bytes and packets (read
//! from the map at scrape time) and each captured pod's own connection counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ambit_ebpf_common::Direction;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::datapath::Datapath;
use super::pods::{Pod, PodRegistry};
use crate::telemetry::PodCounters;

/// A pod counter family: name, help, and which counter of a pod it reads.
type OwnFamily = (&'static str, &'static str, fn(&PodCounters) -> &AtomicU64);

/// Exposes the kernel's and the pods' counters.
#[derive(Debug)]
pub struct PodCollector {
    /// Where the kernel counters are.
    pub datapath: Arc<Datapath>,
    /// The captured pods.
    pub pods: Arc<PodRegistry>,
}

fn names(p: &Pod) -> [(&'static str, &str); 2] {
    [
        ("workload", p.spec.name.as_str()),
        ("workload_namespace", p.spec.namespace.as_str()),
    ]
}

impl Collector for PodCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pods = self.pods.by_cookie_map();
        let counters = self.datapath.counters();
        let kernel = [
            (
                "ambit_workload_bytes",
                "Bytes at the IP layer sent (egress) and received (ingress) by each enrolled workload, counted in the kernel",
                true,
            ),
            (
                "ambit_workload_packets",
                "Packets sent (egress) and received (ingress) by each enrolled workload, counted in the kernel",
                false,
            ),
        ];
        for (name, help, bytes) in kernel {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (k, c) in &counters {
                let Some(pod) = pods.get(&k.netns_cookie) else {
                    continue;
                };
                let direction = if k.direction == Direction::Ingress as u32 {
                    "ingress"
                } else {
                    "egress"
                };
                let [w, ns] = names(pod);
                let labels = [w, ns, ("direction", direction)];
                ConstCounter::new(if bytes { c.bytes } else { c.packets })
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        let own: [OwnFamily; 4] = [
            (
                "ambit_outbound_connections_opened",
                "Captured outbound connections the agent accepted",
                |c| &c.outbound_opened,
            ),
            (
                "ambit_outbound_connections_closed",
                "Captured outbound connections that ended (cleanly or not)",
                |c| &c.outbound_closed,
            ),
            (
                "ambit_outbound_sent_bytes",
                "Bytes the agent forwarded from a workload to its destinations",
                |c| &c.outbound_sent,
            ),
            (
                "ambit_outbound_received_bytes",
                "Bytes the agent forwarded from destinations back to a workload",
                |c| &c.outbound_received,
            ),
        ];
        for (name, help, field) in own {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for pod in pods.values() {
                ConstCounter::new(field(&pod.counters).load(Ordering::Relaxed))
                    .encode(family.encode_family(&names(pod))?)?;
            }
        }
        let mut accepted = encoder.encode_descriptor(
            "ambit_inbound_accepted",
            "Inbound connections delivered to a workload, by security (reason label)",
            None,
            MetricType::Counter,
        )?;
        for pod in pods.values() {
            for (reason, c) in [
                ("mutual_tls", &pod.counters.inbound_mtls),
                ("none", &pod.counters.inbound_plaintext),
            ] {
                let [w, ns] = names(pod);
                let labels = [w, ns, ("reason", reason)];
                ConstCounter::new(c.load(Ordering::Relaxed))
                    .encode(accepted.encode_family(&labels)?)?;
            }
        }
        let enrolled = encoder.encode_descriptor(
            "ambit_enrolled_workloads",
            "Workloads whose traffic this agent captures",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(pods.len() as i64).encode(enrolled)?;
        Ok(())
    }
}
