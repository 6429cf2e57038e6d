//! Istio's standard TCP metrics (`istio_tcp_connections_opened_total`, `..._closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`) with Istio's label
//! set, so existing dashboards work unchanged.
//!
//! A connection finds its series once, when it opens: one hash of its label *values*
//! (read in place from the `Arc`s of its workloads and service, never copied), then it
//! keeps the series' counters for the rest of its life.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ambit_identity::Identity;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

use ambit_hbone::baggage::PeerMetadata;

use super::{Reporter, SecurityPolicy};
use crate::state::{Service, Workload};

const UNKNOWN: &str = "unknown";
/// Istio's default cluster name.
const CLUSTER: &str = ambit_xds::istio::CLUSTER;

/// The peer metadata a tunnel from `w` carries (`baggage`, as Istio's ztunnel sends it):
/// the far side's telemetry can then name the source even if it does not know it.
pub fn baggage(w: &Workload) -> String {
    ambit_hbone::baggage::PeerMetadata {
        cluster: Some(CLUSTER.to_owned()),
        namespace: Some(w.namespace().to_owned()),
        workload_kind: Some("pod".to_owned()),
        workload: Some(w.name().to_string()),
        service: Some(w.canonical().service.to_string()),
        revision: Some(w.canonical().revision.to_string()),
    }
    .to_header()
}

/// What names a connection's series.
#[derive(Clone, Debug)]
pub struct TcpKey {
    /// Which agent reports it.
    pub reporter: Reporter,
    /// The source workload, if known.
    pub source: Option<Arc<Workload>>,
    /// Without it, what the source's `baggage` said about it.
    pub source_meta: Option<Arc<ambit_hbone::baggage::PeerMetadata>>,
    /// The source's proven identity (inbound mTLS); else the source workload's.
    pub source_principal: Option<Identity>,
    /// The destination workload, if known.
    pub destination: Option<Arc<Workload>>,
    /// The service the destination was reached through.
    pub service: Option<Arc<Service>>,
    /// Whether it crossed the network inside mutual TLS.
    pub security: SecurityPolicy,
}

/// The number of labels Istio's TCP metrics carry.
const LABELS: usize = 23;

impl TcpKey {
    /// The label set, borrowed from the workloads and the service.
    fn labels(&self) -> [(&'static str, &str); LABELS] {
        let (s, d) = (self.source.as_deref(), self.destination.as_deref());
        fn name(w: Option<&Workload>) -> &str {
            w.map_or(UNKNOWN, |w| w.name())
        }
        fn ns(w: Option<&Workload>) -> &str {
            w.map_or(UNKNOWN, |w| w.namespace())
        }
        fn canon(w: Option<&Workload>, f: fn(&crate::state::Canonical) -> &str) -> &str {
            w.map_or(UNKNOWN, |w| f(w.canonical()))
        }
        fn revision(w: Option<&Workload>) -> &str {
            w.map_or("latest", |w| &w.canonical().revision)
        }
        fn principal<'a>(id: Option<&'a Identity>, w: Option<&'a Workload>) -> &'a str {
            id.or(w.map(|w| &**w.identity()))
                .map_or(UNKNOWN, Identity::as_str)
        }
        // The source's agent knows its own workload's identity; the destination's agent
        // knows only what mutual TLS proved.
        let source_workload_identity = match self.reporter {
            Reporter::Source => s,
            Reporter::Destination => None,
        };
        let svc = self.service.as_deref();
        // A source the mesh state does not know may have said who it is (`baggage`):
        // named as ztunnel names such peers (app and version are its canonical ones).
        let meta = s.is_none().then_some(self.source_meta.as_deref()).flatten();
        let said = |f: fn(&PeerMetadata) -> &Option<String>, or: &'static str| -> &str {
            meta.and_then(|m| f(m).as_deref()).unwrap_or(or)
        };
        let src_service = || said(|m| &m.service, UNKNOWN);
        let src_revision = || said(|m| &m.revision, "latest");
        [
            ("reporter", self.reporter.as_str()),
            (
                "source_workload",
                s.map_or_else(|| said(|m| &m.workload, UNKNOWN), |w| w.name()),
            ),
            (
                "source_canonical_service",
                s.map_or_else(src_service, |w| &w.canonical().service),
            ),
            (
                "source_canonical_revision",
                s.map_or_else(src_revision, |w| &w.canonical().revision),
            ),
            (
                "source_workload_namespace",
                s.map_or_else(
                    || match &self.source_principal {
                        Some(id) => id.namespace(),
                        None => said(|m| &m.namespace, UNKNOWN),
                    },
                    |w| w.namespace(),
                ),
            ),
            (
                "source_principal",
                principal(self.source_principal.as_ref(), source_workload_identity),
            ),
            (
                "source_app",
                s.map_or_else(src_service, |w| &w.canonical().app),
            ),
            (
                "source_version",
                s.map_or_else(src_revision, |w| &w.canonical().version),
            ),
            (
                "source_cluster",
                s.map_or_else(|| said(|m| &m.cluster, CLUSTER), |_| CLUSTER),
            ),
            ("destination_service", svc.map_or(UNKNOWN, |s| &s.hostname)),
            (
                "destination_service_namespace",
                svc.map_or(UNKNOWN, |s| &s.namespace),
            ),
            ("destination_service_name", svc.map_or(UNKNOWN, |s| &s.name)),
            ("destination_workload", name(d)),
            ("destination_canonical_service", canon(d, |c| &c.service)),
            ("destination_canonical_revision", revision(d)),
            ("destination_workload_namespace", ns(d)),
            ("destination_principal", principal(None, d)),
            ("destination_app", canon(d, |c| &c.app)),
            ("destination_version", canon(d, |c| &c.version)),
            ("destination_cluster", CLUSTER),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", self.security.as_str()),
        ]
    }
}

impl PartialEq for TcpKey {
    fn eq(&self, other: &Self) -> bool {
        self.labels() == other.labels()
    }
}

impl Eq for TcpKey {}

impl Hash for TcpKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.labels().hash(state)
    }
}

/// The counters of one series.
#[derive(Debug, Default)]
pub struct TcpSeries {
    /// Connections opened.
    pub opened: AtomicU64,
    /// Connections closed.
    pub closed: AtomicU64,
    /// Source → destination bytes.
    pub sent: AtomicU64,
    /// Destination → source bytes.
    pub received: AtomicU64,
}

/// Every series, and the collector that exposes them.
#[derive(Debug, Default)]
pub struct TcpMetrics {
    series: RwLock<HashMap<TcpKey, Arc<TcpSeries>>>,
}

impl TcpMetrics {
    /// The series of `key`, created on first use.
    pub fn series(&self, key: TcpKey) -> Arc<TcpSeries> {
        if let Some(s) = self
            .series
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return s.clone();
        }
        self.series
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }

    /// How many series exist.
    pub fn len(&self) -> usize {
        self.series.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True if no connection was counted yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A metric family: name, help, and which counter of a series it reads.
type Family = (&'static str, &'static str, fn(&TcpSeries) -> &AtomicU64);

/// Exposes the series of a shared [`TcpMetrics`].
#[derive(Debug)]
pub struct TcpCollector(pub Arc<TcpMetrics>);

impl Collector for TcpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let series = self.0.series.read().unwrap_or_else(|e| e.into_inner());
        let families: [Family; 4] = [
            (
                "istio_tcp_connections_opened",
                "TCP connections opened (Istio standard metric)",
                |s| &s.opened,
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections closed (Istio standard metric)",
                |s| &s.closed,
            ),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent from the source to the destination (Istio standard metric)",
                |s| &s.sent,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes sent from the destination back to the source (Istio standard metric)",
                |s| &s.received,
            ),
        ];
        for (name, help, field) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (key, s) in series.iter() {
                let labels = key.labels();
                ConstCounter::new(field(s).load(Ordering::Relaxed))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
