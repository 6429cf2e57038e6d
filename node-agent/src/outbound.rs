//! The in-pod outbound listener: accepts connections the kernel redirected, learns each
//! one's original destination from the `CONN_ORIG` map, dials it from inside the pod's
//! namespace (so the pod's IP stays the source) and copies bytes both ways.
//!
//! Half-close propagates (EOF on one side shuts down writing on the other); an error or
//! reset on either side resets both, so the application sees what a direct connection
//! would have shown it.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ambit_ebpf_common::{AF_INET, AF_INET6, ConnKey, INBOUND_HBONE_PORT, OrigDst};
use ambit_hbone::connect::HboneError;
use ambit_hbone::pool::{PoolKey, PooledStream};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::Agent;
use crate::flow::{AccessRecord, End, Started, relay};
use crate::metrics::{FailureLabels, Peer, TcpLabels};
use crate::pods::Pod;
use crate::store::{Mesh, Service, Workload};
/// How many recent connections `/debug/connections` remembers.
const RECENT: usize = 1024;

/// Accepts captured connections of one pod until the task is aborted.
pub async fn serve(agent: Arc<Agent>, pod: Arc<Pod>, listener: TcpListener) {
    crate::flow::accept_loop(agent, pod, listener, "outbound", proxy).await
}

async fn proxy(agent: Arc<Agent>, pod: Arc<Pod>, client: TcpStream, peer: SocketAddr) {
    let fail = |reason: &'static str| {
        agent
            .metrics
            .failures
            .get_or_create(&FailureLabels {
                workload: pod.labels.workload.clone(),
                workload_namespace: pod.labels.workload_namespace.clone(),
                reason,
            })
            .inc();
    };
    let key = ConnKey {
        netns_cookie: pod.netns_cookie,
        src_port: peer.port(),
        family: if peer.is_ipv4() { AF_INET } else { AF_INET6 },
        _pad: 0,
    };
    let Some(dst) = agent.datapath.take_orig_dst(&key).map(orig_to_addr) else {
        // Not redirected by our programs (e.g. an app dialing 15001 itself).
        fail("no_original_destination");
        reset(&client);
        return;
    };
    agent.recent.push(CapturedConnection::new(&pod, peer, dst));
    debug!(uid = %pod.spec.uid, %peer, %dst, "captured connection");
    let started = Started::now();
    let _ = client.set_nodelay(true);

    let mesh = agent.store.snapshot();
    // Without a workload record (no control plane) there is no identity: passthrough.
    let source = mesh.workloads.get(&pod.spec.uid);
    let plan = match plan(&agent, &mesh, source, dst) {
        Ok(p) => p,
        Err(reason) => {
            debug!(uid = %pod.spec.uid, %dst, reason, "no route");
            fail(reason);
            reset(&client);
            return;
        }
    };
    let mut last_failure = "connect_error";
    for (attempt, target) in plan.targets.iter().enumerate() {
        if attempt >= MAX_ATTEMPTS {
            break;
        }
        let opened = match (target.hbone, source) {
            (true, Some(src)) => open_hbone(&agent, &pod, src, target).await,
            _ => open_direct(&agent, &pod, target.addr).await,
        };
        match opened {
            Ok(upstream) => {
                let ctx = Ctx {
                    agent: &agent,
                    pod: &pod,
                    source,
                    target,
                    service: plan.service,
                    peer,
                    dst,
                    started,
                };
                let mut client = client;
                match upstream {
                    Upstream::Tcp(mut s) => {
                        if ctx.run(&mut client, &mut s).await {
                            reset(&s);
                        }
                    }
                    // Dropping a failed tunnel resets its stream.
                    Upstream::Hbone(mut s) => {
                        ctx.run(&mut client, &mut s).await;
                    }
                }
                return;
            }
            Err(reason) => {
                debug!(uid = %pod.spec.uid, to = %target.addr, hbone = target.hbone, reason, "upstream failed");
                if let Some(w) = target.workload {
                    agent.lb.failed(&w.uid);
                }
                last_failure = reason;
            }
        }
    }
    fail(last_failure);
    reset(&client);
}

/// At most this many endpoints are tried for one connection to a service.
const MAX_ATTEMPTS: usize = 2;

enum Upstream {
    Tcp(TcpStream),
    Hbone(PooledStream),
}

/// Where a captured connection may go, in order of preference.
struct Plan<'m> {
    targets: Vec<Target<'m>>,
    service: Option<&'m Service>,
}

struct Target<'m> {
    /// The destination workload, if it is known to the mesh.
    workload: Option<&'m Workload>,
    /// What the application asked for, with a service VIP resolved to an endpoint.
    addr: SocketAddr,
    /// Tunnel it (the destination is enrolled and the source has an identity).
    hbone: bool,
}

/// Resolves the original destination:
/// - a service VIP → its endpoints (round robin, recently failed ones last), each
///   tunnelled if enrolled and dialed directly if not;
/// - a workload's IP → HBONE if it is enrolled;
/// - anything else → passthrough.
fn plan<'m>(
    agent: &Agent,
    mesh: &'m Mesh,
    source: Option<&Workload>,
    dst: SocketAddr,
) -> Result<Plan<'m>, &'static str> {
    let meshed = source.is_some();
    if let Some(svc) = mesh.service_by_vip(dst.ip()) {
        let Some(&(_, target_port)) = svc.ports.iter().find(|(p, _)| *p == dst.port()) else {
            return Err("service_port_not_found");
        };
        let mut targets: Vec<Target<'m>> = svc
            .endpoints
            .iter()
            .filter_map(|uid| mesh.workloads.get(uid))
            .filter_map(|w| {
                let ip = w.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4())?;
                Some(Target {
                    workload: Some(w),
                    addr: SocketAddr::new(*ip, target_port),
                    hbone: meshed && w.enrolled,
                })
            })
            .collect();
        if targets.is_empty() {
            return Err("no_healthy_upstream");
        }
        agent.lb.order(&svc.hostname, &mut targets, |t| {
            t.workload.map_or("", |w| w.uid.as_str())
        });
        return Ok(Plan {
            targets,
            service: Some(svc),
        });
    }
    let workload = mesh.workload_by_ip(dst.ip());
    Ok(Plan {
        targets: vec![Target {
            workload,
            addr: dst,
            hbone: meshed && workload.is_some_and(|w| w.enrolled),
        }],
        service: None,
    })
}

async fn open_direct(agent: &Agent, pod: &Pod, addr: SocketAddr) -> Result<Upstream, &'static str> {
    let connect = agent.dialer.connect(&pod.netns, pod.netns_cookie, addr);
    match tokio::time::timeout(agent.config.connect_timeout, connect).await {
        Ok(Ok(s)) => Ok(Upstream::Tcp(s)),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err("refused"),
        Ok(Err(_)) => Err("connect_error"),
        Err(_) => Err("connect_timeout"),
    }
}

async fn open_hbone(
    agent: &Agent,
    pod: &Pod,
    source: &Workload,
    target: &Target<'_>,
) -> Result<Upstream, &'static str> {
    let dst = target.workload.expect("HBONE targets are workloads");
    let Some(src_ip) = pod
        .spec
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == target.addr.is_ipv4())
    else {
        return Err("no_source_ip_of_family");
    };
    // The pod's first connection may race its first certificate.
    if agent
        .certs
        .wait_for(&source.identity, agent.config.connect_timeout)
        .await
        .is_none()
    {
        return Err("no_certificate");
    }
    let key = PoolKey {
        src_identity: source.identity.clone(),
        src: *src_ip,
        dst_identity: dst.identity.clone(),
        dst: SocketAddr::new(target.addr.ip(), INBOUND_HBONE_PORT),
    };
    let tp = traceparent();
    let connect = agent.pool.connect(&key, target.addr, *src_ip, &tp);
    match tokio::time::timeout(agent.config.connect_timeout, connect).await {
        Ok(Ok(s)) => Ok(Upstream::Hbone(s)),
        Ok(Err(HboneError::Denied)) => Err("denied"),
        Ok(Err(HboneError::Unreachable)) => Err("upstream_unreachable"),
        Ok(Err(e)) => {
            debug!(to = %key.dst, "HBONE: {e}");
            Err("hbone_error")
        }
        Err(_) => Err("connect_timeout"),
    }
}

/// A random W3C `traceparent` (sampled flag off): a fresh trace for each connection.
fn traceparent() -> String {
    format!(
        "00-{:016x}{:016x}-{:016x}-00",
        fastrand::u64(..),
        fastrand::u64(..),
        fastrand::u64(1..)
    )
}

/// Everything about an established outbound connection that its metrics and log need.
struct Ctx<'a> {
    agent: &'a Agent,
    pod: &'a Pod,
    source: Option<&'a Workload>,
    target: &'a Target<'a>,
    service: Option<&'a Service>,
    peer: SocketAddr,
    dst: SocketAddr,
    started: Started,
}

impl Ctx<'_> {
    /// Relays until the connection ends; true if it ended in an error (the client has
    /// been reset then).
    async fn run<S>(self, client: &mut TcpStream, upstream: &mut S) -> bool
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let m = &self.agent.metrics;
        let labels = TcpLabels::new(
            "source",
            Peer {
                workload: self.source,
                principal: None,
            },
            Peer {
                workload: self.target.workload,
                principal: None,
            },
            self.service,
            self.target.hbone,
        );
        m.connections_opened.get_or_create(&self.pod.labels).inc();
        m.tcp_opened.get_or_create(&labels).inc();
        m.active_connections.inc();
        let (end, sent, received) = relay(&mut *client, upstream, None).await;
        m.active_connections.dec();
        m.connections_closed.get_or_create(&self.pod.labels).inc();
        m.tcp_closed.get_or_create(&labels).inc();
        m.sent_bytes.get_or_create(&self.pod.labels).inc_by(sent);
        m.received_bytes
            .get_or_create(&self.pod.labels)
            .inc_by(received);
        m.tcp_sent.get_or_create(&labels).inc_by(sent);
        m.tcp_received.get_or_create(&labels).inc_by(received);
        let (result, reason) = match &end {
            End::Done => ("ok", None),
            End::Error(e) => {
                debug!(uid = %self.pod.spec.uid, dst = %self.dst, "connection ended with an error: {e}");
                reset(client);
                ("error", Some(e.to_string()))
            }
            End::Killed => ("closed_by_policy", None),
        };
        self.agent.access_log.write(&AccessRecord {
            start: self.started.epoch_secs(),
            duration_ms: self.started.elapsed_ms(),
            direction: "outbound",
            src: self.peer_addr(),
            dst: self.dst,
            src_workload: self.source.map(|w| format!("{}/{}", w.namespace, w.name)),
            dst_workload: self
                .target
                .workload
                .map(|w| format!("{}/{}", w.namespace, w.name)),
            src_identity: self.source.map(|w| w.identity.as_str()),
            dst_identity: self.target.workload.map(|w| w.identity.as_str()),
            service: self.service.map(|s| s.hostname.as_str()),
            security: if self.target.hbone {
                "mutual_tls"
            } else {
                "none"
            },
            bytes_sent: sent,
            bytes_received: received,
            result,
            reason: reason.as_deref(),
        });
        matches!(end, End::Error(_))
    }

    /// The application's address as the network sees it: its pod IP (the in-pod
    /// connection to 15001 is over loopback).
    fn peer_addr(&self) -> SocketAddr {
        let ip = self
            .pod
            .spec
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == self.dst.is_ipv4())
            .copied()
            .unwrap_or(self.peer.ip());
        SocketAddr::new(ip, self.peer.port())
    }
}

/// Closes with RST rather than FIN, so the peer sees a failure, not a clean end.
pub fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

fn orig_to_addr(o: OrigDst) -> SocketAddr {
    let port = u16::from_be(o.port);
    let ip = if o.family == AF_INET6 {
        let mut b = [0u8; 16];
        for (i, w) in o.addr.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        IpAddr::V4(Ipv4Addr::from(o.addr[0].to_ne_bytes()))
    };
    SocketAddr::new(ip, port)
}

/// One captured connection, as `/debug/connections` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct CapturedConnection {
    pub uid: String,
    pub workload: String,
    pub namespace: String,
    /// The application's side of the redirected connection (loopback, ephemeral port).
    pub client: SocketAddr,
    /// Where the application asked to connect.
    pub original_destination: SocketAddr,
    /// Seconds since the Unix epoch.
    pub at: f64,
}

impl CapturedConnection {
    fn new(pod: &Pod, client: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            uid: pod.spec.uid.clone(),
            workload: pod.spec.name.clone(),
            namespace: pod.spec.namespace.clone(),
            client,
            original_destination: dst,
            at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        }
    }
}

/// The last [`RECENT`] captured connections.
#[derive(Debug, Default)]
pub struct RecentConnections(Mutex<VecDeque<CapturedConnection>>);

impl RecentConnections {
    fn push(&self, c: CapturedConnection) {
        let mut q = self.0.lock().unwrap();
        if q.len() == RECENT {
            q.pop_front();
        }
        q.push_back(c);
    }

    pub fn snapshot(&self) -> Vec<CapturedConnection> {
        self.0.lock().unwrap().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_destinations_decode_from_network_order() {
        let v4 = OrigDst {
            addr: [u32::from_ne_bytes([10, 244, 2, 3]), 0, 0, 0],
            port: 8080u16.to_be(),
            family: AF_INET,
        };
        assert_eq!(orig_to_addr(v4), "10.244.2.3:8080".parse().unwrap());
        let ip: Ipv6Addr = "fd00:10:244:2::3".parse().unwrap();
        let o = ip.octets();
        let words = [0, 1, 2, 3]
            .map(|i| u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]));
        let v6 = OrigDst {
            addr: words,
            port: 443u16.to_be(),
            family: AF_INET6,
        };
        assert_eq!(orig_to_addr(v6), "[fd00:10:244:2::3]:443".parse().unwrap());
    }
}
