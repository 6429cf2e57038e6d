//! Inbound: the in-pod HBONE listener (15008, on the pod's IPs) and the plaintext listener
//! (15006) that the `sk_lookup` program steers other TCP connections to.
//!
//! Every inbound connection is authorized by the destination's policies, then delivered
//! to the application from inside the pod's netns with the caller's IP as its source
//! (see [`crate::podnet`]). Authorized connections are tracked: when policy changes, the
//! ones it now denies are closed.
//!
//! - HBONE: mutual TLS as the pod's identity (a certificate that the client must find to
//!   be one the destination may have); the client must chain to the mesh root and belong
//!   to the trust domain. The `:authority` must be one of this pod's IPs and not one of
//!   the agent's ports (else 400); a policy denial is 401; an unreachable application 503.
//! - Plaintext: refused (reset) in STRICT mode; in PERMISSIVE mode authorized by source IP.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ambit_ebpf_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use ambit_hbone::connect::{ConnectRequest, Refusal, Tunnel};
use ambit_hbone::stream::H2Stream;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::Agent;
use crate::flow::{AccessRecord, End, Started, relay};
use crate::metrics::{FailureLabels, Peer, TcpLabels};
use crate::outbound::reset;
use crate::pods::Pod;
use crate::rbac;
use crate::store::{Mesh, MtlsMode, Workload};

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A pod's inbound listeners, opened inside its netns.
#[derive(Debug)]
pub struct InboundListeners {
    /// 15008 on each pod IP.
    pub hbone: Vec<std::net::TcpListener>,
    /// 15006 on loopback, with the pod IP of the same family it serves.
    pub plaintext: Vec<(IpAddr, std::net::TcpListener)>,
}

/// Runs inside the pod's netns: opens the inbound listeners and prepares the pod for
/// delivery with the caller's address.
pub fn open_listeners(pod_ips: &[IpAddr]) -> io::Result<InboundListeners> {
    crate::podnet::prepare_delivery()?;
    let mut out = InboundListeners {
        hbone: Vec::new(),
        plaintext: Vec::new(),
    };
    for ip in pod_ips {
        // Freebind: an IPv6 address may still be tentative (duplicate address detection).
        out.hbone
            .push(listen(SocketAddr::new(*ip, INBOUND_HBONE_PORT), true)?);
        let lo = if ip.is_ipv4() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        };
        out.plaintext.push((
            *ip,
            listen(SocketAddr::new(lo, INBOUND_PLAINTEXT_PORT), false)?,
        ));
    }
    Ok(out)
}

/// A non-blocking listener on `addr` (IPv6: v6-only), reusable across agent restarts;
/// `freebind` allows an address that is not (yet) usable.
pub fn listen(addr: SocketAddr, freebind: bool) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        if freebind {
            s.set_freebind_v6(true)?;
        }
    } else if freebind {
        s.set_freebind_v4(true)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Ports that are the agent's own: never delivered to.
fn is_agent_port(port: u16) -> bool {
    matches!(
        port,
        OUTBOUND_PORT | INBOUND_PLAINTEXT_PORT | INBOUND_HBONE_PORT
    )
}

fn refused(agent: &Agent, pod: &Pod, reason: &'static str) {
    agent
        .metrics
        .inbound_refused
        .get_or_create(&FailureLabels {
            workload: pod.labels.workload.clone(),
            workload_namespace: pod.labels.workload_namespace.clone(),
            reason,
        })
        .inc();
}

/// Accepts HBONE connections for one pod until the task is aborted.
pub async fn serve_hbone(agent: Arc<Agent>, pod: Arc<Pod>, listener: TcpListener) {
    crate::flow::accept_loop(agent, pod, listener, "hbone", hbone_connection).await
}

async fn hbone_connection(agent: Arc<Agent>, pod: Arc<Pod>, tcp: TcpStream, peer: SocketAddr) {
    // Only the identity is needed: no copy of the whole workload per connection.
    let Some(identity) = agent
        .store
        .snapshot()
        .workloads
        .get(&pod.spec.uid)
        .map(|w| w.identity.clone())
    else {
        refused(&agent, &pod, "unknown_workload");
        return;
    };
    // A pod just captured may see its first caller before its first certificate.
    if agent.certs.get(&identity).is_none() {
        agent.certs.wait_for(&identity, HANDSHAKE_TIMEOUT).await;
    }
    let config = match agent.tls.server(&identity) {
        Ok(c) => c,
        Err(e) => {
            debug!(uid = %pod.spec.uid, %peer, "refusing HBONE: {e}");
            refused(&agent, &pod, "no_certificate");
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            info!(uid = %pod.spec.uid, %peer, "HBONE handshake refused: {e}");
            refused(&agent, &pod, "tls_handshake");
            return;
        }
        Err(_) => {
            refused(&agent, &pod, "tls_handshake_timeout");
            return;
        }
    };
    let Some(client_id) = ambit_hbone::tls::peer_identity(tls.get_ref().1) else {
        refused(&agent, &pod, "no_client_identity");
        return;
    };
    let client_id: Arc<str> = client_id.into();
    let handler = {
        let (agent, pod) = (agent.clone(), pod.clone());
        move |req: ConnectRequest| {
            let (agent, pod, client_id) = (agent.clone(), pod.clone(), client_id.clone());
            async move { open_tunnel(agent, pod, peer, client_id, req).await }
        }
    };
    if let Err(e) = ambit_hbone::connect::serve(tls, handler).await {
        debug!(uid = %pod.spec.uid, %peer, "HBONE connection ended: {e}");
    }
}

/// Checks and authorizes one CONNECT, then reaches the application.
async fn open_tunnel(
    agent: Arc<Agent>,
    pod: Arc<Pod>,
    peer: SocketAddr,
    client_id: Arc<str>,
    req: ConnectRequest,
) -> Result<Delivery, Refusal> {
    let dst = req.authority;
    if !pod.spec.ips.contains(&dst.ip()) || is_agent_port(dst.port()) {
        info!(uid = %pod.spec.uid, authority = %dst, "HBONE CONNECT for another destination refused");
        refused(&agent, &pod, "bad_authority");
        return Err(Refusal::BadRequest);
    }
    // Deliver as the caller: the HBONE connection's source is the calling pod's IP.
    let src_ip = [Some(peer.ip()), req.forwarded_for]
        .into_iter()
        .flatten()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4());
    let src = SocketAddr::new(src_ip.unwrap_or(peer.ip()), peer.port());
    let conn = Inbound {
        src,
        dst,
        identity: Some(client_id),
        started: Started::now(),
    };
    conn.admit(&agent, &pod).await.map_err(|r| match r {
        Rejection::Denied => Refusal::Denied,
        Rejection::Unreachable => Refusal::Unreachable,
    })
}

/// Accepts plaintext connections steered to one pod until the task is aborted.
pub async fn serve_plaintext(agent: Arc<Agent>, pod: Arc<Pod>, listener: TcpListener) {
    crate::flow::accept_loop(agent, pod, listener, "plaintext", plaintext_connection).await
}

async fn plaintext_connection(
    agent: Arc<Agent>,
    pod: Arc<Pod>,
    mut tcp: TcpStream,
    peer: SocketAddr,
) {
    // sk_lookup keeps the original destination as the accepted socket's local address.
    let Ok(dst) = tcp.local_addr() else { return };
    let conn = Inbound {
        src: peer,
        dst,
        identity: None,
        started: Started::now(),
    };
    if !pod.spec.ips.contains(&dst.ip()) || is_agent_port(dst.port()) {
        refused(&agent, &pod, "bad_destination");
        reset(&tcp);
        return;
    }
    let mode = agent
        .store
        .snapshot()
        .workloads
        .get(&pod.spec.uid)
        .map_or(MtlsMode::Strict, |w| w.mtls);
    if mode == MtlsMode::Strict {
        info!(uid = %pod.spec.uid, %peer, %dst, "plaintext connection refused: the workload is STRICT (mutual TLS only)");
        refused(&agent, &pod, "strict_mtls");
        conn.log(
            &agent,
            &pod,
            &agent.store.snapshot(),
            "refused",
            Some("STRICT: plaintext is not accepted"),
            0,
            0,
        );
        reset(&tcp);
        return;
    }
    match conn.admit(&agent, &pod).await {
        Ok(delivery) => {
            if delivery.run_with(&mut tcp).await {
                reset(&tcp);
            }
        }
        Err(_) => reset(&tcp),
    }
}

/// An inbound connection being admitted.
struct Inbound {
    /// The caller (its pod IP), and what it asked for (this pod's IP and a port).
    src: SocketAddr,
    dst: SocketAddr,
    /// The caller's SPIFFE ID, proven by mutual TLS; none for plaintext.
    identity: Option<Arc<str>>,
    started: Started,
}

enum Rejection {
    Denied,
    Unreachable,
}

impl Inbound {
    /// Authorizes the connection, then connects to the application as the caller.
    async fn admit(self, agent: &Arc<Agent>, pod: &Arc<Pod>) -> Result<Delivery, Rejection> {
        let mesh = agent.store.snapshot();
        let Some(me) = mesh.workloads.get(&pod.spec.uid) else {
            refused(agent, pod, "unknown_workload");
            return Err(Rejection::Unreachable);
        };
        let decision = rbac::authorize(
            mesh.authorizations.values(),
            me,
            &rbac::Connection {
                src_identity: self.identity.as_deref(),
                src_ip: self.src.ip(),
                dst_port: self.dst.port(),
            },
        );
        if let rbac::Decision::Deny { reason } = &decision {
            info!(
                uid = %pod.spec.uid,
                src = %self.src,
                dst = %self.dst,
                identity = self.identity.as_deref().unwrap_or("-"),
                "connection denied: {reason}"
            );
            refused(agent, pod, "policy_denied");
            self.log(agent, pod, &mesh, "denied", Some(reason), 0, 0);
            return Err(Rejection::Denied);
        }
        let connect =
            agent
                .dialer
                .connect_as(&pod.netns, pod.netns_cookie, self.dst, Some(self.src.ip()));
        let app = match tokio::time::timeout(agent.config.connect_timeout, connect).await {
            Ok(Ok(app)) => app,
            Ok(Err(e)) => {
                debug!(uid = %pod.spec.uid, dst = %self.dst, "application unreachable: {e}");
                refused(agent, pod, "app_unreachable");
                self.log(agent, pod, &mesh, "unreachable", Some(&e.to_string()), 0, 0);
                return Err(Rejection::Unreachable);
            }
            Err(_) => {
                refused(agent, pod, "app_timeout");
                return Err(Rejection::Unreachable);
            }
        };
        Ok(Delivery {
            agent: agent.clone(),
            pod: pod.clone(),
            conn: self,
            app,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn log(
        &self,
        agent: &Agent,
        pod: &Pod,
        mesh: &Mesh,
        result: &'static str,
        reason: Option<&str>,
        sent: u64,
        received: u64,
    ) {
        let src = mesh.workload_by_ip(self.src.ip());
        let me = mesh.workloads.get(&pod.spec.uid);
        agent.access_log.write(&AccessRecord {
            start: self.started.epoch_secs(),
            duration_ms: self.started.elapsed_ms(),
            direction: "inbound",
            src: self.src,
            dst: self.dst,
            src_workload: src.map(|w| format!("{}/{}", w.namespace, w.name)),
            dst_workload: Some(format!("{}/{}", pod.spec.namespace, pod.spec.name)),
            src_identity: self.identity.as_deref(),
            dst_identity: me.map(|w| w.identity.as_str()),
            service: None,
            security: if self.identity.is_some() {
                "mutual_tls"
            } else {
                "none"
            },
            bytes_sent: sent,
            bytes_received: received,
            result,
            reason,
        });
    }
}

/// An admitted connection with the application on the line.
pub struct Delivery {
    agent: Arc<Agent>,
    pod: Arc<Pod>,
    conn: Inbound,
    app: TcpStream,
}

impl Tunnel for Delivery {
    async fn run(self, stream: H2Stream) {
        let mut stream = stream;
        self.run_with(&mut stream).await;
    }
}

impl Delivery {
    /// Relays between the caller (`client`: the tunnel or the plaintext connection) and
    /// the application, tracked so a policy change can close it. True if it did not end
    /// cleanly (the application side has been reset; the caller resets its side).
    async fn run_with<C>(mut self, client: &mut C) -> bool
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (agent, pod, conn) = (&self.agent, &self.pod, &self.conn);
        let mesh = agent.store.snapshot();
        let me: Option<&Workload> = mesh.workloads.get(&pod.spec.uid);
        let src = mesh.workload_by_ip(conn.src.ip());
        let mtls = conn.identity.is_some();
        let labels = TcpLabels::new(
            "destination",
            Peer {
                workload: src,
                principal: conn.identity.as_deref(),
            },
            Peer {
                workload: me,
                principal: None,
            },
            None,
            mtls,
        );
        let m = &agent.metrics;
        m.inbound_accepted
            .get_or_create(&FailureLabels {
                workload: pod.labels.workload.clone(),
                workload_namespace: pod.labels.workload_namespace.clone(),
                reason: if mtls { "mutual_tls" } else { "none" },
            })
            .inc();
        m.tcp_opened.get_or_create(&labels).inc();
        let tracked = agent.conns.track(
            &pod.spec.uid,
            conn.identity.as_deref(),
            conn.src.ip(),
            conn.dst.port(),
        );
        let (end, sent, received) = relay(client, &mut self.app, Some(&tracked.kill)).await;
        drop(tracked);
        m.tcp_closed.get_or_create(&labels).inc();
        m.tcp_sent.get_or_create(&labels).inc_by(sent);
        m.tcp_received.get_or_create(&labels).inc_by(received);
        let (result, reason) = match &end {
            End::Done => ("ok", None),
            End::Error(e) => ("error", Some(e.to_string())),
            End::Killed => {
                info!(uid = %pod.spec.uid, src = %conn.src, dst = %conn.dst, "closed a connection the new policy denies");
                refused(agent, pod, "closed_by_policy_change");
                (
                    "closed_by_policy",
                    Some("denied by a policy change".to_owned()),
                )
            }
        };
        let failed = !matches!(end, End::Done);
        if failed {
            reset(&self.app);
        }
        conn.log(agent, pod, &mesh, result, reason.as_deref(), sent, received);
        failed
    }
}
