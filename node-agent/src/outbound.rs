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

use ambit_ebpf_common::{AF_INET, AF_INET6, ConnKey, OrigDst};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::Agent;
use crate::metrics::FailureLabels;
use crate::pods::Pod;

/// Copy buffer per direction. 64 KiB moves bulk data in few syscalls.
const COPY_BUF: usize = 64 * 1024;
/// How many recent connections `/debug/connections` remembers.
const RECENT: usize = 1024;

/// Accepts captured connections of one pod until the task is aborted.
pub async fn serve(agent: Arc<Agent>, pod: Arc<Pod>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(proxy(agent.clone(), pod.clone(), client, peer));
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                warn!(uid = %pod.spec.uid, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn proxy(agent: Arc<Agent>, pod: Arc<Pod>, mut client: TcpStream, peer: SocketAddr) {
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

    let connect = agent.dialer.connect(&pod.netns, pod.netns_cookie, dst);
    let mut upstream = match tokio::time::timeout(agent.config.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(uid = %pod.spec.uid, %dst, "dial failed: {e}");
            fail(if e.kind() == io::ErrorKind::ConnectionRefused {
                "refused"
            } else {
                "connect_error"
            });
            reset(&client);
            return;
        }
        Err(_) => {
            fail("connect_timeout");
            reset(&client);
            return;
        }
    };
    let _ = client.set_nodelay(true);

    let m = &agent.metrics;
    m.connections_opened.get_or_create(&pod.labels).inc();
    m.active_connections.inc();
    let result =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUF, COPY_BUF)
            .await;
    m.active_connections.dec();
    m.connections_closed.get_or_create(&pod.labels).inc();
    match result {
        Ok((sent, received)) => {
            m.sent_bytes.get_or_create(&pod.labels).inc_by(sent);
            m.received_bytes.get_or_create(&pod.labels).inc_by(received);
        }
        Err(e) => {
            debug!(uid = %pod.spec.uid, %dst, "connection ended with an error: {e}");
            reset(&client);
            reset(&upstream);
        }
    }
}

/// Closes with RST rather than FIN, so the peer sees a failure, not a clean end.
fn reset(s: &TcpStream) {
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
