//! Pod network setup for inbound delivery with the caller's address.
//!
//! The agent hands an inbound connection to the application from a socket inside the pod's
//! netns, bound (`IP_TRANSPARENT`) to the *caller's* IP, so the application sees who
//! called it. The application's replies are addressed to that IP, which is not local: the
//! pod's routes would send them out of its interface to the real caller, and the handshake
//! would never complete. So, in every captured pod:
//!
//! - the agent marks its delivery sockets with [`DELIVERY_MARK`];
//! - `net.ipv4.tcp_fwmark_accept = 1` makes the application's accepted socket (and the
//!   SYN-ACK before it) inherit the mark of the SYN (it applies to IPv6 too);
//! - a policy rule sends packets with the mark to [`REPLY_TABLE`], whose one route is
//!   `local default dev lo`: the replies are delivered locally, to the agent's socket.
//!
//! Nothing else in the pod is affected: only connections the agent opened carry the mark.
//! (An application that sets `SO_MARK` on its own listener overrides the inherited mark and
//! would not get its replies back; none of the common servers do.)
//!
//! Everything here is idempotent, so a restarted agent runs it again harmlessly.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use rtnetlink::packet_route::route::{RouteMessage, RouteScope, RouteType};
use rtnetlink::packet_route::rule::RuleAction;
use rtnetlink::{Handle, RouteMessageBuilder, RuleAddRequest};

/// `SO_MARK` of the agent's delivery sockets (and so of the application's replies).
pub const DELIVERY_MARK: u32 = 0x0a3b_0000;
/// The routing table that delivers marked replies locally.
pub const REPLY_TABLE: u32 = 15_008;
/// Priority of the policy rule (before `main`, 32766).
const RULE_PRIORITY: u32 = 15_008;
const LOOPBACK_IFINDEX: u32 = 1;

/// Run inside the pod's netns, on a thread with no tokio runtime.
pub fn prepare_delivery() -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")
        .map_err(|e| io::Error::new(e.kind(), format!("setting tcp_fwmark_accept: {e}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async {
        // The netlink socket is created here, so it belongs to the pod's netns.
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let conn = tokio::spawn(conn);
        let result = add_rules(&handle).await;
        conn.abort();
        result
    })
}

async fn add_rules(handle: &Handle) -> io::Result<()> {
    let ok_if_exists = |r: Result<(), rtnetlink::Error>, what: &str| match r {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(io::Error::other(format!("{what}: {e}"))),
    };
    let v4 = reply_rule(handle.rule().add().v4()).execute().await;
    ok_if_exists(v4, "adding the IPv4 reply rule")?;
    let route = reply_route(
        RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(Ipv4Addr::UNSPECIFIED, 0),
    );
    ok_if_exists(
        handle.route().add(route).replace().execute().await,
        "adding the IPv4 reply route",
    )?;
    // IPv6 may be disabled in the pod: then there is nothing to deliver over it.
    let v6 = reply_rule(handle.rule().add().v6()).execute().await;
    if v6.as_ref().err().and_then(errno) == Some(libc::EAFNOSUPPORT) {
        return Ok(());
    }
    ok_if_exists(v6, "adding the IPv6 reply rule")?;
    let route = reply_route(
        RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(Ipv6Addr::UNSPECIFIED, 0),
    );
    ok_if_exists(
        handle.route().add(route).replace().execute().await,
        "adding the IPv6 reply route",
    )
}

/// `fwmark DELIVERY_MARK lookup REPLY_TABLE`, for either family.
fn reply_rule<T>(r: RuleAddRequest<T>) -> RuleAddRequest<T> {
    r.fw_mark(DELIVERY_MARK)
        .table_id(REPLY_TABLE)
        .priority(RULE_PRIORITY)
        .action(RuleAction::ToTable)
}

/// `local <default> dev lo table REPLY_TABLE`, for either family.
fn reply_route<T>(b: RouteMessageBuilder<T>) -> RouteMessage {
    b.kind(RouteType::Local)
        .scope(RouteScope::Host)
        .output_interface(LOOPBACK_IFINDEX)
        .table_id(REPLY_TABLE)
        .build()
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}
