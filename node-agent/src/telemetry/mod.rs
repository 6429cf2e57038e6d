//! Telemetry: the agent's metrics, Istio's TCP metrics, the access log, and the one
//! record per connection that feeds them ([`connection::ConnectionResult`]).
//!
//! Every proxied connection is described once, with typed labels ([`Reporter`],
//! [`SecurityPolicy`], [`Direction`]); that description counts it when it opens and,
//! when it ends, counts its bytes and writes its access-log line. Every refused or
//! failed connection goes through [`Telemetry::refused`]: a metric with its reason, a
//! log line and an access-log line.

pub mod access_log;
pub mod connection;
pub mod tcp;
pub mod xds;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ambit_identity::Identity;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::info;

use self::access_log::{AccessLog, AccessRecord};
use self::tcp::{TcpCollector, TcpMetrics};
use crate::state::{Service, Workload};

/// Which agent reports a connection: the source's or the destination's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The client's agent.
    Source,
    /// The server's agent.
    Destination,
}

impl Reporter {
    /// As Istio's `reporter` label writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// Whether a connection crossed the network inside mutual TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    /// Inside HBONE.
    MutualTls,
    /// In plaintext.
    None,
}

impl SecurityPolicy {
    /// As Istio's `connection_security_policy` label writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MutualTls => "mutual_tls",
            Self::None => "none",
        }
    }
}

/// Which way a connection goes, from this agent's workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Captured from a local workload.
    Outbound,
    /// Arriving for a local workload.
    Inbound,
}

impl Direction {
    /// As the access log writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// A pod's own counters, held by the pod while it is captured (no lookup per
/// connection; they leave `/metrics` with the pod).
#[derive(Debug, Default)]
pub struct PodCounters {
    /// Captured outbound connections accepted.
    pub outbound_opened: AtomicU64,
    /// Captured outbound connections that ended.
    pub outbound_closed: AtomicU64,
    /// Bytes forwarded from the pod.
    pub outbound_sent: AtomicU64,
    /// Bytes forwarded back to the pod.
    pub outbound_received: AtomicU64,
    /// Inbound connections delivered over mutual TLS.
    pub inbound_mtls: AtomicU64,
    /// Inbound plaintext connections delivered (PERMISSIVE).
    pub inbound_plaintext: AtomicU64,
}

/// A workload and a reason, for failure counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The local workload's name.
    pub workload: String,
    /// Its namespace.
    pub workload_namespace: String,
    /// Why.
    pub reason: &'static str,
}

/// The agent's metrics and access log.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    /// Istio's TCP metrics.
    pub tcp: Arc<TcpMetrics>,
    /// Captured connections that could not be proxied, by reason.
    pub outbound_failures: Family<ReasonLabels, Counter>,
    /// Inbound connections refused, by reason.
    pub inbound_refused: Family<ReasonLabels, Counter>,
    /// Connections being proxied now.
    pub active_connections: Gauge,
    /// HBONE connections (mutual-TLS handshakes) the pool opened.
    pub hbone_dials: Counter,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    access_log: AccessLog,
}

impl Telemetry {
    /// Metrics, and the access log on standard output if `access_log`.
    pub fn new(access_log: bool) -> std::io::Result<Self> {
        let mut registry = Registry::default();
        let tcp = Arc::new(TcpMetrics::default());
        registry.register_collector(Box::new(TcpCollector(tcp.clone())));
        let outbound_failures = Family::<ReasonLabels, Counter>::default();
        let inbound_refused = Family::<ReasonLabels, Counter>::default();
        let active_connections = Gauge::default();
        let hbone_dials = Counter::default();
        let access_log_dropped = Counter::default();
        registry.register(
            "ambit_outbound_failures",
            "Captured connections the agent could not proxy, by reason",
            outbound_failures.clone(),
        );
        registry.register(
            "ambit_inbound_refused",
            "Inbound connections refused, by reason (policy_denied, strict_mtls, ...)",
            inbound_refused.clone(),
        );
        registry.register(
            "ambit_outbound_active_connections",
            "Connections being proxied now",
            active_connections.clone(),
        );
        registry.register(
            "ambit_hbone_dials",
            "HBONE connections (mutual TLS handshakes) opened by the pool",
            hbone_dials.clone(),
        );
        registry.register(
            "ambit_access_log_dropped",
            "Access-log lines dropped because standard output fell behind",
            access_log_dropped.clone(),
        );
        let access_log = if access_log {
            AccessLog::stdout(access_log_dropped.clone())?
        } else {
            AccessLog::off()
        };
        Ok(Self {
            registry,
            tcp,
            outbound_failures,
            inbound_refused,
            active_connections,
            hbone_dials,
            access_log_dropped,
            access_log,
        })
    }

    /// Adds a collector (at startup, before the telemetry is shared).
    pub fn register_collector(&mut self, c: Box<dyn prometheus_client::collector::Collector>) {
        self.registry.register_collector(c);
    }

    /// The registry in Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Records a connection that was refused or failed before it was proxied: the
    /// reason's counter, a log line and an access-log line.
    pub fn refused(&self, r: &Refused<'_>) {
        let labels = ReasonLabels {
            workload: r.local.0.to_owned(),
            workload_namespace: r.local.1.to_owned(),
            reason: r.reason,
        };
        match r.direction {
            Direction::Outbound => self.outbound_failures.get_or_create(&labels).inc(),
            Direction::Inbound => self.inbound_refused.get_or_create(&labels).inc(),
        };
        info!(
            direction = r.direction.as_str(),
            workload = %format_args!("{}/{}", r.local.1, r.local.0),
            src = %r.src,
            dst = %r.dst,
            identity = r.src_identity.map_or("-", Identity::as_str),
            reason = r.reason,
            "connection {}: {}",
            r.result,
            r.detail
        );
        self.access_log.write(&AccessRecord {
            start: r.started.epoch_secs(),
            duration_ms: r.started.elapsed_ms(),
            direction: r.direction.as_str(),
            src: r.src,
            dst: r.dst,
            src_workload: r.src_workload.map(|w| w.display_name()),
            dst_workload: r.dst_workload.map(|w| w.display_name()),
            src_identity: r.src_identity,
            dst_identity: r.dst_workload.map(|w| &**w.identity()),
            service: r.service.map(|s| &*s.hostname),
            security: r.security.as_str(),
            bytes_sent: 0,
            bytes_received: 0,
            result: r.result,
            reason: Some(r.reason),
            detail: Some(r.detail),
        });
    }

    pub(crate) fn write_access_log(&self, r: &AccessRecord<'_>) {
        self.access_log.write(r);
    }
}

/// A connection that did not get to be proxied.
#[derive(Debug)]
pub struct Refused<'a> {
    /// Which way it went.
    pub direction: Direction,
    /// The local workload (name, namespace).
    pub local: (&'a str, &'a str),
    /// The caller.
    pub src: SocketAddr,
    /// What it asked for.
    pub dst: SocketAddr,
    /// The source workload, if known.
    pub src_workload: Option<&'a Workload>,
    /// The destination workload, if known.
    pub dst_workload: Option<&'a Workload>,
    /// The caller's proven identity.
    pub src_identity: Option<&'a Identity>,
    /// The service in between, if any.
    pub service: Option<&'a Service>,
    /// How it would have travelled.
    pub security: SecurityPolicy,
    /// `refused`, `denied`, `failed`.
    pub result: &'static str,
    /// The metric reason.
    pub reason: &'static str,
    /// Details for people.
    pub detail: &'a str,
    /// When it started.
    pub started: Started,
}

/// When a connection started, on the wall clock and the monotonic one.
#[derive(Clone, Copy, Debug)]
pub struct Started {
    wall: SystemTime,
    mono: Instant,
}

impl Started {
    /// Now.
    pub fn now() -> Self {
        Self {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }

    /// Seconds since the Unix epoch, with milliseconds.
    pub fn epoch_secs(&self) -> f64 {
        self.wall
            .duration_since(UNIX_EPOCH)
            .map(|d| (d.as_millis() as f64) / 1000.0)
            .unwrap_or(0.0)
    }

    /// Milliseconds since, with microseconds.
    pub fn elapsed_ms(&self) -> f64 {
        let d: Duration = self.mono.elapsed();
        (d.as_micros() as f64) / 1000.0
    }
}

/// Adds to a counter of a [`PodCounters`] or [`tcp::TcpSeries`].
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
