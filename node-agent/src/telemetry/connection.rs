//! [`ConnectionResult`]: what one proxied connection reports, built once when it is
//! established and finished once when it ends, for both directions of the proxy.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_identity::Identity;
use tracing::debug;

use super::access_log::AccessRecord;
use super::tcp::{TcpKey, TcpSeries};
use super::{Direction, PodCounters, Reporter, SecurityPolicy, Started, Telemetry, add};
use crate::state::{Service, Workload};

/// A connection's description: who, to whom, how.
#[derive(Clone, Debug)]
pub struct ConnectionDesc {
    /// Outbound (source reporter) or inbound (destination reporter).
    pub direction: Direction,
    /// The caller's address as the network sees it.
    pub src: SocketAddr,
    /// What the caller asked for.
    pub dst: SocketAddr,
    /// The source workload, if known.
    pub src_workload: Option<Arc<Workload>>,
    /// The destination workload, if known.
    pub dst_workload: Option<Arc<Workload>>,
    /// The caller's identity as proven by mutual TLS (inbound).
    pub src_identity: Option<Identity>,
    /// The service it went through.
    pub service: Option<Arc<Service>>,
    /// How it crossed the network.
    pub security: SecurityPolicy,
    /// What the caller's `baggage` says it is, when the mesh state does not know it (a
    /// peer of another mesh or cluster): telemetry only, never policy.
    pub src_meta: Option<Arc<ambit_hbone::baggage::PeerMetadata>>,
}

/// How a proxied connection ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both sides finished.
    Done,
    /// A side failed or reset; the text says how.
    Error(String),
    /// Closed on purpose: a policy change denies it now.
    ClosedByPolicy,
}

/// One connection's metrics and access-log line. Opening counts it; [`finish`]
/// counts its end and bytes and writes its line. Dropped unfinished, it finishes as an
/// error, so no connection goes uncounted.
///
/// [`finish`]: ConnectionResult::finish
#[derive(Debug)]
pub struct ConnectionResult {
    telemetry: Arc<Telemetry>,
    desc: ConnectionDesc,
    series: Arc<TcpSeries>,
    pod: Arc<PodCounters>,
    started: Started,
    finished: bool,
    /// Its span, ended when it finishes.
    span: Option<ambit_otel::Span>,
}

impl ConnectionResult {
    /// Counts the connection as opened (Istio's series and, outbound, the pod's own).
    pub fn open(
        telemetry: &Arc<Telemetry>,
        pod: &Arc<PodCounters>,
        desc: ConnectionDesc,
        started: Started,
    ) -> Self {
        let key = TcpKey {
            reporter: match desc.direction {
                Direction::Outbound => Reporter::Source,
                Direction::Inbound => Reporter::Destination,
            },
            source: desc.src_workload.clone(),
            source_meta: desc.src_meta.clone(),
            source_principal: desc.src_identity.clone(),
            destination: desc.dst_workload.clone(),
            service: desc.service.clone(),
            security: desc.security,
        };
        let series = telemetry.tcp.series(key);
        add(&series.opened, 1);
        match desc.direction {
            Direction::Outbound => add(&pod.outbound_opened, 1),
            Direction::Inbound => match desc.security {
                SecurityPolicy::MutualTls => add(&pod.inbound_mtls, 1),
                SecurityPolicy::None => add(&pod.inbound_plaintext, 1),
            },
        }
        telemetry.active_connections.inc();
        Self {
            telemetry: telemetry.clone(),
            desc,
            series,
            pod: pod.clone(),
            started,
            finished: false,
            span: None,
        }
    }

    /// Ends `span` with the connection, its bytes and outcome set on it.
    pub fn traced(&mut self, span: Option<ambit_otel::Span>) {
        self.span = span;
    }

    /// The connection's description.
    pub fn desc(&self) -> &ConnectionDesc {
        &self.desc
    }

    /// Counts the end: bytes client → server (`sent`) and back (`received`), and the
    /// access-log line.
    pub fn finish(mut self, sent: u64, received: u64, outcome: Outcome) {
        self.record(sent, received, &outcome);
    }

    fn record(&mut self, sent: u64, received: u64, outcome: &Outcome) {
        self.finished = true;
        let t = &self.telemetry;
        t.active_connections.dec();
        add(&self.series.closed, 1);
        add(&self.series.sent, sent);
        add(&self.series.received, received);
        if self.desc.direction == Direction::Outbound {
            add(&self.pod.outbound_closed, 1);
            add(&self.pod.outbound_sent, sent);
            add(&self.pod.outbound_received, received);
        }
        let (result, reason, detail) = match outcome {
            Outcome::Done => ("ok", None, None),
            Outcome::Error(e) => {
                debug!(src = %self.desc.src, dst = %self.desc.dst, "connection ended with an error: {e}");
                ("error", Some("connection_error"), Some(e.as_str()))
            }
            Outcome::ClosedByPolicy => (
                "closed_by_policy",
                Some("closed_by_policy_change"),
                Some("denied by a policy change"),
            ),
        };
        if let Some(mut span) = self.span.take() {
            span.set("ambit.bytes_sent", sent as i64);
            span.set("ambit.bytes_received", received as i64);
            span.set("ambit.result", result);
            if let Some(d) = detail {
                span.error(d.to_owned());
            }
        }
        let d = &self.desc;
        // Outbound, the source is this node's workload; inbound, only mutual TLS proves
        // who the caller is.
        let src_identity = d.src_identity.as_ref().or(match d.direction {
            Direction::Outbound => d.src_workload.as_deref().map(|w| &**w.identity()),
            Direction::Inbound => None,
        });
        t.write_access_log(&AccessRecord {
            start: self.started.epoch_secs(),
            duration_ms: self.started.elapsed_ms(),
            direction: d.direction.as_str(),
            src: d.src,
            dst: d.dst,
            src_workload: d
                .src_workload
                .as_deref()
                .map(Workload::display_name)
                .or_else(|| {
                    let m = d.src_meta.as_deref()?;
                    Some(format!(
                        "{}/{}",
                        m.namespace.as_deref()?,
                        m.workload.as_deref()?
                    ))
                }),
            dst_workload: d.dst_workload.as_deref().map(Workload::display_name),
            src_identity,
            dst_identity: d.dst_workload.as_deref().map(|w| &**w.identity()),
            service: d.service.as_deref().map(|s| &*s.hostname),
            security: d.security.as_str(),
            bytes_sent: sent,
            bytes_received: received,
            result,
            reason,
            detail,
        });
    }
}

impl Drop for ConnectionResult {
    fn drop(&mut self) {
        if !self.finished {
            self.record(0, 0, &Outcome::Error("abandoned before it finished".into()));
        }
    }
}
