//! The xDS client's state on `/metrics`: connected, connects, ACKs, NACKs, resources
//! held by type.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    type_url: String,
}

/// The xDS client's state.
#[derive(Debug)]
pub struct XdsCollector(pub Arc<ambit_xds::client::XdsStatus>);

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
