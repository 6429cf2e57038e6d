//! The agent's sockets inside a pod's network namespace: what capture hands the proxy.
//!
//! | port | bound to | what arrives |
//! |---|---|---|
//! | 15001 | `127.0.0.1`, `[::1]` | outbound connects rewritten by `cgroup/connect4/6` |
//! | 15008 | each pod IP | HBONE (mutual TLS) from other agents |
//! | 15006 | `127.0.0.1`, `[::1]` | plaintext steered by `sk_lookup` |
//!
//! Everything here runs on a thread that has entered the pod's netns (see
//! `ambit_mesh::netns`), never on a tokio worker.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ambit_ebpf_common::{INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use socket2::{Domain, Socket, Type};

/// A pod's listeners, opened inside its netns.
#[derive(Debug, Default)]
pub struct PodListeners {
    /// 15001 on loopback (IPv4, and IPv6 if the pod has it).
    pub outbound: Vec<std::net::TcpListener>,
    /// 15008 on each pod IP.
    pub hbone: Vec<std::net::TcpListener>,
    /// 15006 on loopback, with the pod IP of the same family it serves.
    pub plaintext: Vec<(IpAddr, std::net::TcpListener)>,
}

/// Ports that are the agent's own: never delivered to.
pub fn is_agent_port(port: u16) -> bool {
    matches!(
        port,
        OUTBOUND_PORT | INBOUND_PLAINTEXT_PORT | INBOUND_HBONE_PORT
    )
}

/// Runs inside the pod's netns: the outbound listeners on 127.0.0.1:15001 and, if the
/// pod has IPv6 loopback, [::1]:15001.
pub fn open_outbound() -> io::Result<Vec<std::net::TcpListener>> {
    let v4 = listen(
        SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)),
        false,
    )
    .map_err(|e| {
        if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            io::Error::new(
                e.kind(),
                "127.0.0.1 is not available: is the pod's loopback interface up?",
            )
        } else {
            e
        }
    })?;
    let mut out = vec![v4];
    match listen(
        SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT)),
        false,
    ) {
        Ok(v6) => out.push(v6),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
            ) => {}
        Err(e) => return Err(e),
    }
    Ok(out)
}

/// A pod's inbound listeners: HBONE (one per pod IP), and plaintext with the pod IP of
/// the family each serves.
pub type InboundListeners = (
    Vec<std::net::TcpListener>,
    Vec<(IpAddr, std::net::TcpListener)>,
);

/// Runs inside the pod's netns: prepares delivery with the caller's address
/// ([`super::podnet`]) and opens the inbound listeners (HBONE on each pod IP, plaintext
/// on loopback).
pub fn open_inbound(pod_ips: &[IpAddr]) -> io::Result<InboundListeners> {
    super::podnet::prepare_delivery()?;
    let mut hbone = Vec::new();
    let mut plaintext = Vec::new();
    for ip in pod_ips {
        // Freebind: an IPv6 address may still be tentative (duplicate address detection).
        hbone.push(listen(SocketAddr::new(*ip, INBOUND_HBONE_PORT), true)?);
        let lo = if ip.is_ipv4() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        };
        plaintext.push((
            *ip,
            listen(SocketAddr::new(lo, INBOUND_PLAINTEXT_PORT), false)?,
        ));
    }
    Ok((hbone, plaintext))
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
