//! Outbound: a captured connection is planned ([`plan`], a pure function of the mesh
//! state), then tunnelled over HBONE to an enrolled destination or passed through to
//! anything else, from inside the pod's namespace so the pod's IP stays the source.
//!
//! Half-close propagates (EOF on one side shuts down writing on the other); an error or
//! reset on either side resets both, so the application sees what a direct connection
//! would have shown it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ambit_ebpf_common::INBOUND_HBONE_PORT;
use ambit_hbone::connect::{ConnectHeaders, HboneError};
use ambit_hbone::pool::{PoolError, PoolKey, PooledStream};
use tokio::net::TcpStream;
use tracing::debug;

use super::error::Error;
use super::relay::{End, Side, Socket, relay};
use super::{CapturedConnection, Failure, Inputs, reset};
use crate::capture::pods::Pod;
use crate::state::{MeshState, Service, Workload};
use crate::telemetry::connection::{ConnectionDesc, ConnectionResult, Outcome};
use crate::telemetry::{Direction, SecurityPolicy, Started};

/// At most this many endpoints are tried for one connection to a service.
pub const MAX_ATTEMPTS: usize = 2;

/// Where a captured connection may go, in order of preference.
#[derive(Debug)]
pub struct Plan {
    /// Candidates, best first.
    pub targets: Vec<Target>,
    /// The service whose VIP was dialed, if any.
    pub service: Option<Arc<Service>>,
    /// What the targets are balanced as (round robin per key): the service, or the
    /// waypoint a workload-addressed connection goes through; `None`: one target.
    pub balance: Option<String>,
}

/// One place a connection may go.
#[derive(Debug)]
pub struct Target {
    /// The destination workload, if it is known to the mesh.
    pub workload: Option<Arc<Workload>>,
    /// What the application asked for, with a service VIP resolved to an endpoint.
    pub addr: SocketAddr,
    /// Tunnel it (the destination is enrolled and the source has an identity).
    pub hbone: bool,
    /// Tunnel to this waypoint pod (whose `workload` this is), not to `addr`'s owner:
    /// `addr` is then the service VIP and port, the CONNECT authority the waypoint routes.
    pub waypoint: Option<IpAddr>,
}

/// Resolves an original destination against the mesh; `meshed` says whether the source
/// has an identity (is a workload the control plane knows):
/// - a service VIP of a service with a waypoint → that waypoint's pods (tunnelled,
///   the VIP and port as the authority); none ready is an error, never a way around it
///   (fail closed);
/// - a service VIP → its endpoints of the destination's family (in the service's
///   order; the caller applies load balancing), each tunnelled if enrolled;
/// - a workload's IP, if it has a waypoint → that waypoint's pods (the IP and port as
///   the authority), like a VIP;
/// - a workload's IP → HBONE if it is enrolled;
/// - anything else → passthrough.
pub fn plan(state: &MeshState, meshed: bool, dst: SocketAddr) -> Result<Plan, Error> {
    if let Some(svc) = state.service_by_vip(dst.ip()) {
        if let Some(wp) = svc.waypoint.as_deref().filter(|_| meshed) {
            if svc.target_port(dst.port()).is_none() {
                return Err(Error::ServicePortNotFound {
                    service: svc.hostname.to_string(),
                    port: dst.port(),
                });
            }
            let targets: Vec<Target> = state
                .waypoint_pods(&svc.namespace, wp)
                .into_iter()
                .filter_map(|w| {
                    let ip = w.ip_like(dst.ip())?;
                    Some(Target {
                        workload: Some(w),
                        addr: dst,
                        hbone: true,
                        waypoint: Some(ip),
                    })
                })
                .collect();
            if targets.is_empty() {
                return Err(Error::NoWaypoint {
                    service: svc.hostname.to_string(),
                    waypoint: format!("{}/{wp}", svc.namespace),
                });
            }
            return Ok(Plan {
                targets,
                balance: Some(svc.hostname.to_string()),
                service: Some(svc.clone()),
            });
        }
        let target_port =
            svc.target_port(dst.port())
                .ok_or_else(|| Error::ServicePortNotFound {
                    service: svc.hostname.to_string(),
                    port: dst.port(),
                })?;
        let targets: Vec<Target> = svc
            .endpoints
            .iter()
            .filter_map(|uid| state.workload(uid))
            .filter_map(|w| {
                let ip = w.ip_like(dst.ip())?;
                Some(Target {
                    workload: Some(w.clone()),
                    addr: SocketAddr::new(ip, target_port),
                    hbone: meshed && w.enrolled(),
                    waypoint: None,
                })
            })
            .collect();
        if targets.is_empty() {
            return Err(Error::NoHealthyUpstream(svc.hostname.to_string()));
        }
        return Ok(Plan {
            targets,
            balance: Some(svc.hostname.to_string()),
            service: Some(svc.clone()),
        });
    }
    let workload = state.workload_by_ip(dst.ip()).cloned();
    // A workload behind a waypoint takes traffic only from it: workload-addressed
    // connections go to the waypoint too (the authority is the pod's IP and port), as
    // ztunnel sends them; none ready fails closed.
    if let Some((w, wp)) = workload
        .as_ref()
        .and_then(|w| Some((w, w.waypoint()?)))
        .filter(|_| meshed)
    {
        let targets: Vec<Target> = state
            .waypoint_pods(w.namespace(), wp)
            .into_iter()
            .filter_map(|p| {
                let ip = p.ip_like(dst.ip())?;
                Some(Target {
                    workload: Some(p),
                    addr: dst,
                    hbone: true,
                    waypoint: Some(ip),
                })
            })
            .collect();
        if targets.is_empty() {
            return Err(Error::NoWaypoint {
                service: w.display_name(),
                waypoint: format!("{}/{wp}", w.namespace()),
            });
        }
        // Spread over the waypoint's replicas like its services' traffic, not all onto
        // the first.
        return Ok(Plan {
            targets,
            service: None,
            balance: Some(format!("waypoint {}/{wp}", w.namespace())),
        });
    }
    let hbone = meshed && workload.as_ref().is_some_and(|w| w.enrolled());
    Ok(Plan {
        targets: vec![Target {
            workload,
            addr: dst,
            hbone,
            waypoint: None,
        }],
        service: None,
        balance: None,
    })
}

enum Upstream {
    Tcp(TcpStream),
    /// A tunnel, and its span.
    Hbone(PooledStream, Box<Option<ambit_otel::Span>>),
}

/// Proxies one connection accepted on a pod's outbound listener.
pub async fn connection(inputs: Arc<Inputs>, pod: Arc<Pod>, client: TcpStream, peer: SocketAddr) {
    let started = Started::now();
    // The application's address as the network sees it: its pod IP (the in-pod
    // connection to 15001 is over loopback).
    let src_of =
        |dst: SocketAddr| SocketAddr::new(pod.ip_like(dst.ip()).unwrap_or(peer.ip()), peer.port());
    let Some(dst) = inputs.orig_dst.take(pod.netns_cookie, peer) else {
        Failure {
            direction: Direction::Outbound,
            pod: &pod,
            src: peer,
            dst: peer,
            src_workload: None,
            dst_workload: None,
            src_identity: None,
            service: None,
            security: SecurityPolicy::None,
            started,
        }
        .record(&inputs.telemetry, &Error::NoOriginalDestination);
        reset(&client);
        return;
    };
    inputs.recent.push(CapturedConnection::new(&pod, peer, dst));
    debug!(uid = %pod.spec.uid, %peer, %dst, "captured connection");
    let _ = client.set_nodelay(true);

    // Without a workload record (no control plane) there is no identity: passthrough.
    let (source, planned) = inputs.state.read(|s| {
        let source = s.workload(&pod.spec.uid).cloned();
        let p = plan(s, source.is_some(), dst);
        (source, p)
    });
    let fail = |e: &Error, target: Option<&Target>, service: Option<&Service>| {
        Failure {
            direction: Direction::Outbound,
            pod: &pod,
            src: src_of(dst),
            dst,
            src_workload: source.as_deref(),
            dst_workload: target.and_then(|t| t.workload.as_deref()),
            src_identity: source.as_deref().map(|w| &**w.identity()),
            service,
            security: match target {
                Some(t) if t.hbone => SecurityPolicy::MutualTls,
                _ => SecurityPolicy::None,
            },
            started,
        }
        .record(&inputs.telemetry, e);
    };
    let mut plan = match planned {
        Ok(p) => p,
        Err(e) => {
            fail(&e, None, None);
            reset(&client);
            return;
        }
    };
    if let Some(key) = &plan.balance {
        inputs.lb.order(key, &mut plan.targets, |t: &Target| {
            t.workload.as_deref().map_or("", |w| &*w.uid)
        });
    }
    let mut last: Option<(Error, usize)> = None;
    for (i, target) in plan.targets.iter().enumerate().take(MAX_ATTEMPTS) {
        let opened = match (&source, target.hbone) {
            (Some(src), true) => open_hbone(&inputs, &pod, src, target, plan.service.as_deref())
                .await
                .map(|(s, span)| Upstream::Hbone(s, Box::new(span))),
            _ => open_direct(&inputs, &pod, target.addr)
                .await
                .map(Upstream::Tcp),
        };
        let upstream = match opened {
            Ok(u) => u,
            Err(e) => {
                debug!(uid = %pod.spec.uid, to = %target.addr, hbone = target.hbone, "upstream failed: {e}");
                if let Some(w) = &target.workload {
                    inputs.lb.failed(&w.uid);
                }
                last = Some((e, i));
                continue;
            }
        };
        let desc = ConnectionDesc {
            direction: Direction::Outbound,
            src: src_of(dst),
            dst,
            src_workload: source.clone(),
            dst_workload: target.workload.clone(),
            src_identity: None,
            service: plan.service.clone(),
            security: if target.hbone {
                SecurityPolicy::MutualTls
            } else {
                SecurityPolicy::None
            },
            src_meta: None,
        };
        let mut result = ConnectionResult::open(&inputs.telemetry, &pod.counters, desc, started);
        match upstream {
            Upstream::Tcp(s) => copy(client, Socket::new(s), result, |s| reset(s.get_ref())).await,
            Upstream::Hbone(s, span) => {
                result.traced(*span);
                let Some(runner) = s.runner() else {
                    // Dropping a failed tunnel resets its stream.
                    return copy(client, s, result, |_| {}).await;
                };
                // In the tunnel's connection task (perhaps another worker's): no hop
                // between tasks per write. The application's socket moves along, so its
                // events wake that worker. A connection that has just closed hands the
                // copy back, to run here.
                let client = match client.into_std() {
                    Ok(c) => c,
                    Err(e) => {
                        return result.finish(0, 0, Outcome::Error(e.to_string()));
                    }
                };
                let copy: ambit_hbone::stream::Job = Box::pin(async move {
                    match TcpStream::from_std(client) {
                        Ok(client) => copy(client, s, result, |_| {}).await,
                        Err(e) => result.finish(0, 0, Outcome::Error(e.to_string())),
                    }
                });
                if let Err(copy) = runner.run(copy) {
                    copy.await
                }
            }
        }
        return;
    }
    if let Some((e, i)) = last {
        fail(&e, plan.targets.get(i), plan.service.as_deref());
    }
    reset(&client);
}

async fn open_direct(
    inputs: &Inputs,
    pod: &Arc<Pod>,
    addr: SocketAddr,
) -> Result<TcpStream, Error> {
    let connect = inputs.sockets.connect(pod, addr);
    match tokio::time::timeout(inputs.connect_timeout, connect).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(Error::connect(addr, e)),
        Err(_) => Err(Error::ConnectTimeout {
            addr,
            after: inputs.connect_timeout,
        }),
    }
}

async fn open_hbone(
    inputs: &Inputs,
    pod: &Arc<Pod>,
    source: &Workload,
    target: &Target,
    service: Option<&Service>,
) -> Result<(PooledStream, Option<ambit_otel::Span>), Error> {
    let dst = target
        .workload
        .as_deref()
        .expect("plan() tunnels only to known workloads");
    let src_ip = pod.ip_like(target.addr.ip()).ok_or(Error::NoSourceIp)?;
    // The pod's first connection may race its first certificate.
    if inputs
        .certs
        .wait_for(source.identity(), inputs.connect_timeout)
        .await
        .is_none()
    {
        return Err(Error::NoCertificate((**source.identity()).clone()));
    }
    let key = PoolKey {
        src_identity: (**source.identity()).clone(),
        src: src_ip,
        dst_identity: (**dst.identity()).clone(),
        dst: SocketAddr::new(
            target.waypoint.unwrap_or(target.addr.ip()),
            INBOUND_HBONE_PORT,
        ),
    };
    // The tunnel's span (a new trace: the application's own context is in bytes the
    // agent does not read); the far side's is its child.
    let span = inputs.tracing.as_ref().map(|t| {
        use ambit_otel::{KeyValue, SpanKind};
        let mut attributes = vec![
            KeyValue::new("ambit.source.workload", source.display_name()),
            KeyValue::new("ambit.source.principal", source.identity().to_string()),
            KeyValue::new("ambit.destination.workload", dst.display_name()),
            KeyValue::new("ambit.destination.principal", dst.identity().to_string()),
            KeyValue::new("server.address", target.addr.ip().to_string()),
            KeyValue::new("server.port", i64::from(target.addr.port())),
        ];
        if let Some(s) = service {
            attributes.push(KeyValue::new("ambit.service", s.hostname.to_string()));
        }
        t.start(
            format!(
                "outbound {}",
                service.map_or_else(|| target.addr.to_string(), |s| s.hostname.to_string())
            ),
            SpanKind::Client,
            None,
            vec![],
            attributes,
        )
    });
    let tp = span
        .as_ref()
        .map_or_else(traceparent, ambit_otel::Span::traceparent);
    let baggage = crate::telemetry::tcp::baggage(source);
    let headers = ConnectHeaders {
        source: src_ip,
        traceparent: &tp,
        baggage: Some(&baggage),
        // The service dialed, for the far side's telemetry (as ztunnel sends it).
        host: service.map(|s| &*s.hostname),
    };
    let connect = inputs.pool.connect_with(&key, pod, target.addr, &headers);
    let opened = match tokio::time::timeout(inputs.connect_timeout, connect).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(PoolError::Dial(e))) => Err(e),
        Ok(Err(PoolError::Tunnel(HboneError::Denied))) => Err(Error::TunnelDenied),
        Ok(Err(PoolError::Tunnel(HboneError::Unreachable))) => Err(Error::TunnelUnreachable),
        Ok(Err(PoolError::Tunnel(e))) => Err(Error::Hbone(e)),
        Err(_) => Err(Error::ConnectTimeout {
            addr: key.dst,
            after: inputs.connect_timeout,
        }),
    };
    match opened {
        Ok(s) => Ok((s, span)),
        Err(e) => {
            if let Some(mut span) = span {
                span.error(e.to_string());
            }
            Err(e)
        }
    }
}

/// Copies between the application and its upstream until both have ended (an error
/// resets the application's side, and `reset_upstream` the other), then reports it.
async fn copy<S: Side>(
    client: TcpStream,
    mut upstream: S,
    result: ConnectionResult,
    reset_upstream: impl FnOnce(&S),
) {
    let mut client = Socket::new(client);
    let (end, sent, received) = relay(&mut client, &mut upstream, None).await;
    if matches!(end, End::Error(_)) {
        reset_upstream(&upstream);
        reset(client.get_ref());
    }
    result.finish(sent, received, end.outcome());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{service, workload};

    fn mesh() -> MeshState {
        let mut m = MeshState::new("n1");
        m.put_workload(workload("a", "n1", "10.244.1.10", true));
        m.put_workload(workload("b", "n2", "10.244.2.10", true));
        m.put_workload(workload("c", "n2", "10.244.2.11", false));
        m.put_service(
            "shop/svc".into(),
            service("svc", "10.96.0.10", &[(80, 8080)], &["b", "c", "gone"]),
        );
        m
    }

    #[test]
    fn a_vip_resolves_to_its_endpoints_and_only_enrolled_ones_are_tunnelled() {
        let m = mesh();
        let p = plan(&m, true, "10.96.0.10:80".parse().unwrap()).unwrap();
        assert_eq!(&*p.service.as_ref().unwrap().name, "svc");
        let t: Vec<_> = p
            .targets
            .iter()
            .map(|t| (t.addr.to_string(), t.hbone))
            .collect();
        // The endpoint uid that names no workload is left out.
        assert_eq!(
            t,
            [
                ("10.244.2.10:8080".to_owned(), true),
                ("10.244.2.11:8080".to_owned(), false)
            ]
        );
        // A source without identity never tunnels.
        let p = plan(&m, false, "10.96.0.10:80".parse().unwrap()).unwrap();
        assert!(p.targets.iter().all(|t| !t.hbone));
    }

    #[test]
    fn workload_ips_tunnel_and_everything_else_passes_through() {
        let m = mesh();
        let p = plan(&m, true, "10.244.2.10:9000".parse().unwrap()).unwrap();
        assert!(p.service.is_none());
        assert!(p.targets[0].hbone);
        assert_eq!(&*p.targets[0].workload.as_ref().unwrap().uid, "b");
        let p = plan(&m, true, "10.244.2.11:9000".parse().unwrap()).unwrap();
        assert!(!p.targets[0].hbone, "not enrolled: plaintext");
        let p = plan(&m, true, "192.0.2.1:443".parse().unwrap()).unwrap();
        assert!(p.targets[0].workload.is_none() && !p.targets[0].hbone);
    }

    #[test]
    fn connections_through_a_waypoint_are_spread_over_its_replicas() {
        let mut m = mesh();
        for (uid, ip) in [("wp-0", "10.244.1.20"), ("wp-1", "10.244.2.20")] {
            let mut w = workload(uid, "n1", ip, false);
            Arc::make_mut(&mut w.placement).native_tunnel = true;
            m.put_workload(w);
        }
        m.put_service(
            "shop/wp".into(),
            service("wp", "10.96.0.99", &[(15008, 15008)], &["wp-0", "wp-1"]),
        );
        let mut svc = service("svc", "10.96.0.10", &[(80, 8080)], &["b"]);
        svc.waypoint = Some("wp".into());
        m.put_service("shop/svc".into(), svc);
        let mut b = workload("b", "n2", "10.244.2.10", true);
        Arc::make_mut(&mut b.placement).waypoint = Some("wp".into());
        m.put_workload(b);
        let lb = crate::proxy::lb::LoadBalancer::default();
        // Both the service's VIP and the pod's own IP go to the waypoint, alternately to
        // each replica.
        for dst in ["10.96.0.10:80", "10.244.2.10:8080"] {
            let firsts: Vec<String> = (0..4)
                .map(|_| {
                    let mut p = plan(&m, true, dst.parse().unwrap()).unwrap();
                    assert_eq!(p.targets.len(), 2, "{dst}");
                    assert!(p.targets.iter().all(|t| t.waypoint.is_some() && t.hbone));
                    let key = p.balance.clone().expect("balanced");
                    lb.order(&key, &mut p.targets, |t| {
                        t.workload.as_deref().map_or("", |w| &*w.uid)
                    });
                    p.targets[0].workload.as_ref().unwrap().uid.to_string()
                })
                .collect();
            assert_eq!(firsts, ["wp-0", "wp-1", "wp-0", "wp-1"], "{dst}");
        }
    }

    #[test]
    fn unknown_service_ports_and_empty_services_are_named_errors() {
        let mut m = mesh();
        let e = plan(&m, true, "10.96.0.10:81".parse().unwrap()).unwrap_err();
        assert_eq!(e.reason(), "service_port_not_found");
        // Endpoints only of the other family: none to send an IPv6 connection to.
        m.put_service(
            "shop/v6".into(),
            service("v6", "fd00::10", &[(80, 8080)], &["b"]),
        );
        let e = plan(&m, true, "[fd00::10]:80".parse().unwrap()).unwrap_err();
        assert_eq!(e.reason(), "no_healthy_upstream");
    }
}
