//! Inbound: the in-pod HBONE listener (15008, on the pod's IPs) and the plaintext listener
//! (15006) that the `sk_lookup` program steers other TCP connections to.
//!
//! Every inbound connection is admitted by [`admit`] (a pure function of the mesh state:
//! the workload is known, STRICT refuses plaintext, its policies allow the caller), then
//! delivered to the application from inside the pod's netns with the caller's IP as its
//! source (see [`crate::capture::podnet`]). Admitted connections are tracked: when policy
//! changes, the ones it now denies are closed.
//!
//! - HBONE: mutual TLS as the pod's identity; the client must chain to the mesh root and
//!   belong to the trust domain. The `:authority` must be one of this pod's IPs and not
//!   one of the agent's ports (else 400); a policy denial is 401; an unreachable
//!   application 503.
//! - Plaintext: refused (reset) in STRICT mode; in PERMISSIVE mode authorized by source IP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::connect::{ConnectRequest, Refusal, Tunnel};
use ambit_hbone::stream::H2Stream;
use ambit_identity::Identity;
use ambit_policy::{Connection, Decision};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::error::Error;
use super::relay::{End, Side, Socket, relay};
use super::{Failure, Inputs, reset};
use crate::capture::listeners::is_agent_port;
use crate::capture::pods::Pod;
use crate::state::{MeshState, MtlsMode, Service, Workload};
use crate::telemetry::connection::{ConnectionDesc, ConnectionResult};
use crate::telemetry::{Direction, ReasonLabels, SecurityPolicy, Started};

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An inbound connection as admission sees it.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// The caller: its pod IP, as the network (or `forwarded`) says.
    pub src: SocketAddr,
    /// What it asked for: this pod's IP and a port.
    pub dst: SocketAddr,
    /// The caller's identity, proven by mutual TLS; none for plaintext.
    pub identity: Option<Identity>,
    /// The peer metadata its CONNECT carried (`baggage`), unparsed: read only when the
    /// caller is not a workload the mesh state knows.
    pub baggage: Option<String>,
    /// The service host name the caller says it dialed (`forwarded: host=`).
    pub service_host: Option<String>,
    /// The caller's trace context (its CONNECT's `traceparent`), if valid.
    pub trace: Option<ambit_otel::SpanContext>,
}

/// An admitted connection: who it is for and who it is from.
#[derive(Debug)]
pub struct Admitted {
    /// The local workload.
    pub me: Arc<Workload>,
    /// The caller's workload, if its IP is one the mesh knows.
    pub src: Option<Arc<Workload>>,
}

/// The destination must be one of this pod's IPs and not one of the agent's ports.
pub fn check_destination(pod_ips: &[IpAddr], dst: SocketAddr) -> bool {
    pod_ips.contains(&dst.ip()) && !is_agent_port(dst.port())
}

/// The caller's address to deliver as: the HBONE peer's IP, or the `forwarded` one, of
/// the destination's family.
pub fn delivery_source(peer: SocketAddr, forwarded: Option<IpAddr>, dst: SocketAddr) -> SocketAddr {
    let ip = [Some(peer.ip()), forwarded]
        .into_iter()
        .flatten()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .unwrap_or(peer.ip());
    SocketAddr::new(ip, peer.port())
}

/// Decides whether `uid` accepts the connection under `state`.
pub fn admit(state: &MeshState, uid: &str, a: &Arrival) -> Result<Admitted, Error> {
    let me = state.workload(uid).ok_or(Error::UnknownWorkload)?;
    if a.identity.is_none() && me.mtls() == MtlsMode::Strict {
        return Err(Error::StrictMtls);
    }
    // A workload behind a waypoint takes traffic only from it: L7 policy cannot be
    // bypassed by dialing the pod's IP.
    if let Some(wp) = &me.waypoint() {
        let from_waypoint = a
            .identity
            .as_ref()
            .is_some_and(|id| state.is_from_waypoint(me, id));
        if !from_waypoint {
            return Err(Error::NotFromWaypoint {
                workload: me.display_name(),
                waypoint: format!("{}/{wp}", me.namespace()),
                caller: a
                    .identity
                    .as_ref()
                    .map_or_else(|| "plaintext".into(), ToString::to_string),
            });
        }
    }
    let decision = state.authorize(
        me,
        &Connection {
            src_identity: a.identity.as_ref(),
            src_ip: a.src.ip(),
            dst_port: a.dst.port(),
        },
    );
    if let Decision::Deny { reason } = decision {
        return Err(Error::PolicyDenied(reason.to_string()));
    }
    Ok(Admitted {
        me: me.clone(),
        src: state.workload_by_ip(a.src.ip()).cloned(),
    })
}

/// The service named `host` (`<name>.<namespace>.svc.cluster.local`) if `me` is one of
/// its endpoints.
fn claimed_service<'a>(
    state: &'a MeshState,
    host: &str,
    me: &Workload,
) -> Option<&'a Arc<Service>> {
    let (name, namespace) = host.strip_suffix(".svc.cluster.local")?.split_once('.')?;
    state
        .service(&format!("{namespace}/{name}"))
        .filter(|s| s.endpoints.contains(&me.uid))
}

/// Records an inbound failure for `pod`, naming what the state knows of both ends.
/// The span of an inbound connection: a child of the caller's (its CONNECT's
/// `traceparent`), named for the workload it is for.
fn inbound_span(
    t: &ambit_otel::Tracing,
    a: &Arrival,
    me: &Workload,
    src: Option<&Workload>,
) -> ambit_otel::Span {
    use ambit_otel::{KeyValue, SpanKind};
    let mut attributes = vec![
        KeyValue::new("ambit.destination.workload", me.display_name()),
        KeyValue::new("ambit.destination.principal", me.identity().to_string()),
        KeyValue::new("client.address", a.src.ip().to_string()),
        KeyValue::new("server.port", i64::from(a.dst.port())),
    ];
    if let Some(id) = &a.identity {
        attributes.push(KeyValue::new("ambit.source.principal", id.to_string()));
    }
    if let Some(w) = src {
        attributes.push(KeyValue::new("ambit.source.workload", w.display_name()));
    }
    t.start(
        format!("inbound {}", me.display_name()),
        SpanKind::Server,
        a.trace.as_ref(),
        vec![],
        attributes,
    )
}

fn record(inputs: &Inputs, pod: &Pod, a: &Arrival, e: &Error, started: Started) {
    let (me, src) = inputs.state.read(|s| {
        (
            s.workload(&pod.spec.uid).cloned(),
            s.workload_by_ip(a.src.ip()).cloned(),
        )
    });
    // A refused connection is traced too (when the caller's trace is sampled): its span
    // fails with the refusal's reason, so a denied request shows where it stopped.
    if let (Some(t), Some(me)) = (&inputs.tracing, &me) {
        let mut span = inbound_span(t, a, me, src.as_deref());
        span.set("ambit.refused", e.reason());
        span.error(e.to_string());
    }
    Failure {
        direction: Direction::Inbound,
        pod,
        src: a.src,
        dst: a.dst,
        src_workload: src.as_deref(),
        dst_workload: me.as_deref(),
        src_identity: a.identity.as_ref(),
        service: None,
        security: if a.identity.is_some() {
            SecurityPolicy::MutualTls
        } else {
            SecurityPolicy::None
        },
        started,
    }
    .record(&inputs.telemetry, e);
}

/// Serves one HBONE connection: mutual TLS as the pod's identity, then its CONNECTs.
pub async fn hbone_connection(
    inputs: Arc<Inputs>,
    pod: Arc<Pod>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let started = Started::now();
    let local = tcp.local_addr().unwrap_or(peer);
    let early = Arrival {
        src: peer,
        dst: local,
        identity: None,
        baggage: None,
        service_host: None,
        trace: None,
    };
    let fail = |e: Error| record(&inputs, &pod, &early, &e, started);
    // Only the identity is needed: one `Arc` clone per connection.
    let Some(identity) = inputs
        .state
        .read(|s| s.workload(&pod.spec.uid).map(|w| w.identity().clone()))
    else {
        return fail(Error::UnknownWorkload);
    };
    // A pod just captured may see its first caller before its first certificate.
    if inputs.certs.get(&identity).is_none() {
        inputs.certs.wait_for(&identity, HANDSHAKE_TIMEOUT).await;
    }
    let config = match inputs.tls.server(&identity) {
        Ok(c) => c,
        Err(e) => return fail(e.into()),
    };
    let _ = tcp.set_nodelay(true);
    let accept = ambit_hbone::tls_stream::accept(config, tcp);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return fail(Error::TlsHandshake { peer, source: e }),
        Err(_) => return fail(Error::TlsHandshakeTimeout(peer)),
    };
    let Some(client_id) = tls.peer_identity() else {
        return fail(Error::NoClientIdentity);
    };
    let handler = {
        let (inputs, pod) = (inputs.clone(), pod.clone());
        move |req: ConnectRequest| {
            let (inputs, pod, id) = (inputs.clone(), pod.clone(), client_id.clone());
            async move { open_tunnel(inputs, pod, peer, id, req).await }
        }
    };
    if let Err(e) = ambit_hbone::connect::serve(tls, handler).await {
        debug!(uid = %pod.spec.uid, %peer, "HBONE connection ended: {e}");
    }
}

/// Checks and admits one CONNECT, then reaches the application.
async fn open_tunnel(
    inputs: Arc<Inputs>,
    pod: Arc<Pod>,
    peer: SocketAddr,
    client_id: Identity,
    req: ConnectRequest,
) -> Result<Delivery, Refusal> {
    let started = Started::now();
    let dst = req.authority;
    // From this workload's own waypoint, `forwarded` names the original caller: deliver
    // as it, so the application still sees who called. From anyone else it is not
    // trusted over the connection's own source.
    let via_waypoint = inputs.state.read(|s| {
        s.workload(&pod.spec.uid)
            .is_some_and(|me| s.is_from_waypoint(me, &client_id))
    });
    let src = match req.forwarded_for {
        Some(ip) if via_waypoint && ip.is_ipv4() == dst.is_ipv4() => {
            SocketAddr::new(ip, peer.port())
        }
        _ => delivery_source(peer, req.forwarded_for, dst),
    };
    let arrival = Arrival {
        // Deliver as the caller: the HBONE connection's source is the calling pod's IP.
        src,
        dst,
        identity: Some(client_id),
        baggage: req.baggage,
        service_host: req.forwarded_host,
        trace: req
            .traceparent
            .as_deref()
            .and_then(ambit_otel::parse_traceparent),
    };
    if !check_destination(&pod.spec.ips, dst) {
        record(&inputs, &pod, &arrival, &Error::BadAuthority(dst), started);
        return Err(Refusal::BadRequest);
    }
    Delivery::start(inputs, pod, arrival, started)
        .await
        .map_err(|e| match e {
            Error::PolicyDenied(_) => Refusal::Denied,
            Error::RateLimited(_) => Refusal::RateLimited,
            _ => Refusal::Unreachable,
        })
}

/// Serves one plaintext connection the `sk_lookup` program steered to the pod.
pub async fn plaintext_connection(
    inputs: Arc<Inputs>,
    pod: Arc<Pod>,
    mut tcp: TcpStream,
    peer: SocketAddr,
) {
    let started = Started::now();
    // sk_lookup keeps the original destination as the accepted socket's local address.
    let Ok(dst) = tcp.local_addr() else { return };
    let arrival = Arrival {
        src: peer,
        dst,
        identity: None,
        baggage: None,
        service_host: None,
        trace: None,
    };
    if !check_destination(&pod.spec.ips, dst) {
        record(
            &inputs,
            &pod,
            &arrival,
            &Error::BadDestination(dst),
            started,
        );
        reset(&tcp);
        return;
    }
    match Delivery::start(inputs, pod, arrival, started).await {
        Ok(delivery) => {
            if delivery.run_with(&mut Socket::new(&mut tcp)).await {
                reset(&tcp);
            }
        }
        Err(_) => reset(&tcp),
    }
}

/// An admitted connection with the application on the line.
pub struct Delivery {
    inputs: Arc<Inputs>,
    pod: Arc<Pod>,
    arrival: Arrival,
    admitted: Admitted,
    app: TcpStream,
    started: Started,
}

impl Delivery {
    /// Admits the connection, then connects to the application as the caller. Every
    /// refusal is recorded here.
    async fn start(
        inputs: Arc<Inputs>,
        pod: Arc<Pod>,
        arrival: Arrival,
        started: Started,
    ) -> Result<Self, Error> {
        let fail = |e: Error| {
            if matches!(e, Error::StrictMtls) {
                info!(uid = %pod.spec.uid, src = %arrival.src, dst = %arrival.dst,
                    "plaintext connection refused: the workload is STRICT (mutual TLS only)");
            }
            record(&inputs, &pod, &arrival, &e, started);
            e
        };
        // Admission, and the connection rate limits that apply, from one read of the
        // state.
        let (admitted, limits) = inputs
            .state
            .read(|s| {
                let admitted = admit(s, &pod.spec.uid, &arrival)?;
                let limits = s.rate_limits(
                    &admitted.me,
                    &Connection {
                        src_identity: arrival.identity.as_ref(),
                        src_ip: arrival.src.ip(),
                        dst_port: arrival.dst.port(),
                    },
                );
                Ok((admitted, limits))
            })
            .map_err(fail)?;
        // Per caller: its identity, or its IP for plaintext.
        if !limits.is_empty() {
            let source = arrival
                .identity
                .as_ref()
                .map_or_else(|| arrival.src.ip().to_string(), ToString::to_string);
            for (policy, rate) in limits {
                if !inputs
                    .limiter
                    .admit(&policy, &admitted.me.uid, &source, rate)
                {
                    return Err(fail(Error::RateLimited(policy)));
                }
            }
        }
        let connect = inputs
            .sockets
            .connect_as(&pod, arrival.dst, Some(arrival.src.ip()));
        let app = match tokio::time::timeout(inputs.connect_timeout, connect).await {
            Ok(Ok(app)) => app,
            Ok(Err(source)) => {
                return Err(fail(Error::AppUnreachable {
                    addr: arrival.dst,
                    source,
                }));
            }
            Err(_) => return Err(fail(Error::AppTimeout(arrival.dst))),
        };
        Ok(Self {
            inputs,
            pod,
            arrival,
            admitted,
            app,
            started,
        })
    }

    /// Relays between the caller (`client`: the tunnel or the plaintext connection) and
    /// the application, tracked so a policy change can close it. True if it did not end
    /// cleanly (the application side has been reset; the caller resets its side).
    async fn run_with<C: Side>(mut self, client: &mut C) -> bool {
        let (inputs, pod, a) = (&self.inputs, &self.pod, &self.arrival);
        let desc = ConnectionDesc {
            direction: Direction::Inbound,
            src: a.src,
            dst: a.dst,
            src_workload: self.admitted.src.clone(),
            dst_workload: Some(self.admitted.me.clone()),
            src_identity: a.identity.clone(),
            // The service it came through, for telemetry: what the caller says it
            // dialed, if this workload is one of that service's endpoints.
            service: a.service_host.as_deref().and_then(|h| {
                inputs
                    .state
                    .read(|s| claimed_service(s, h, &self.admitted.me).cloned())
            }),
            security: if a.identity.is_some() {
                SecurityPolicy::MutualTls
            } else {
                SecurityPolicy::None
            },
            src_meta: match (&self.admitted.src, &a.baggage) {
                (None, Some(b)) => Some(Arc::new(ambit_hbone::baggage::PeerMetadata::parse(b))),
                _ => None,
            },
        };
        let span = inputs
            .tracing
            .as_ref()
            .map(|t| inbound_span(t, a, &self.admitted.me, self.admitted.src.as_deref()));
        let mut result =
            ConnectionResult::open(&inputs.telemetry, &pod.counters, desc, self.started);
        result.traced(span);
        let tracked = inputs.conns.track(
            self.admitted.me.uid.clone(),
            a.identity.clone(),
            a.src.ip(),
            a.dst.port(),
        );
        let (end, sent, received) =
            relay(client, &mut Socket::new(&mut self.app), Some(&tracked.kill)).await;
        drop(tracked);
        if matches!(end, End::Killed) {
            info!(uid = %pod.spec.uid, src = %a.src, dst = %a.dst, "closed a connection the new policy denies");
            inputs
                .telemetry
                .inbound_refused
                .get_or_create(&ReasonLabels {
                    workload: pod.spec.name.clone(),
                    workload_namespace: pod.spec.namespace.clone(),
                    reason: "closed_by_policy_change",
                })
                .inc();
        }
        let failed = !matches!(end, End::Done);
        if failed {
            reset(&self.app);
        }
        result.finish(sent, received, end.outcome());
        failed
    }
}

impl Tunnel for Delivery {
    async fn run(self, stream: H2Stream) {
        let mut stream = stream;
        self.run_with(&mut stream).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{allow_from, workload};

    fn mesh(mode: MtlsMode) -> MeshState {
        let mut m = MeshState::new("n1");
        let mut web = workload("web", "n1", "10.244.1.10", true);
        Arc::make_mut(&mut web.placement).mtls = mode;
        m.put_workload(web);
        m.put_workload(workload("frontend", "n2", "10.244.2.10", true));
        m.put_policy(
            "shop/frontend-only".into(),
            allow_from("shop", "frontend-only", "cluster.local/ns/shop/sa/frontend"),
        );
        m
    }

    fn arrival(identity: Option<&str>) -> Arrival {
        Arrival {
            src: "10.244.2.10:40000".parse().unwrap(),
            dst: "10.244.1.10:8080".parse().unwrap(),
            identity: identity.map(|s| Identity::new("cluster.local", "shop", s).unwrap()),
            baggage: None,
            service_host: None,
            trace: None,
        }
    }

    #[test]
    fn admission_follows_mode_and_policy() {
        let strict = mesh(MtlsMode::Strict);
        let ok = admit(&strict, "web", &arrival(Some("frontend"))).unwrap();
        assert_eq!(&*ok.me.uid, "web");
        assert_eq!(ok.src.as_deref().map(|w| &*w.uid), Some("frontend"));
        let e = admit(&strict, "web", &arrival(Some("batch"))).unwrap_err();
        assert_eq!(e.reason(), "policy_denied");
        let e = admit(&strict, "web", &arrival(None)).unwrap_err();
        assert_eq!(e.reason(), "strict_mtls");
        let e = admit(&strict, "gone", &arrival(Some("frontend"))).unwrap_err();
        assert_eq!(e.reason(), "unknown_workload");
        // PERMISSIVE takes plaintext to policy, which sees no principal: denied here.
        let permissive = mesh(MtlsMode::Permissive);
        let e = admit(&permissive, "web", &arrival(None)).unwrap_err();
        assert_eq!(e.reason(), "policy_denied");
    }

    #[test]
    fn destinations_must_be_the_pods_own_application_ports() {
        let ips: Vec<IpAddr> = vec!["10.244.1.10".parse().unwrap()];
        assert!(check_destination(&ips, "10.244.1.10:8080".parse().unwrap()));
        assert!(!check_destination(
            &ips,
            "10.244.1.11:8080".parse().unwrap()
        ));
        for port in [15001, 15006, 15008] {
            assert!(!check_destination(&ips, SocketAddr::new(ips[0], port)));
        }
    }

    #[test]
    fn delivery_uses_the_callers_address_of_the_destinations_family() {
        let dst6: SocketAddr = "[fd00::10]:80".parse().unwrap();
        let peer: SocketAddr = "10.244.2.10:40000".parse().unwrap();
        let fwd = Some("fd00::20".parse().unwrap());
        assert_eq!(
            delivery_source(peer, fwd, dst6),
            "[fd00::20]:40000".parse().unwrap()
        );
        let dst4: SocketAddr = "10.244.1.10:80".parse().unwrap();
        assert_eq!(delivery_source(peer, fwd, dst4), peer);
    }
}
