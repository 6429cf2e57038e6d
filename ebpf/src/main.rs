//! Ambit's kernel programs.
//!
//! - `cgroup/connect4`, `cgroup/connect6`: redirect TCP connects of enrolled pods to the
//!   node agent's in-pod outbound listener, remembering the original destination.
//! - `sock_ops`: once the client port is known, publish the original destination under
//!   the key the agent sees after `accept()`.
//! - `cgroup_skb` ingress/egress: per-workload byte and packet counters.
//! - `sk_lookup`, attached to each enrolled pod's netns: steers plaintext TCP arriving for
//!   the pod's IPs to the agent's in-pod 15006 listener.
//!
//! The programs only parse, look up and decide; every policy (who is enrolled, what is
//! excluded) arrives from user space as map entries. All map types live in
//! `ambit-ebpf-common`. Addresses and ports stay in network byte order throughout.
#![no_std]
#![no_main]

use ambit_ebpf_common::{
    AF_INET, AF_INET6, ConnKey, CounterKey, Counters, Direction, Enrolled, INBOUND_HBONE_PORT,
    INBOUND_PLAINTEXT_PORT, Ipv4Prefix, Ipv6Prefix, OUTBOUND_PORT, OrigDst, PodIp,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_skb, cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuHashMap, SockHash, lpm_trie::Key},
    programs::{SkBuffContext, SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// `BPF_F_NO_PREALLOC`: required for LPM tries.
const NO_PREALLOC: u32 = 1;

/// 127.0.0.1 as the kernel stores it (network order in memory).
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// The third word of a v4-mapped IPv6 address (`::ffff:a.b.c.d`).
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
/// The last word of `::1`.
const LOOPBACK_V6_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

#[map(name = "ENROLLED")]
static ENROLLED: HashMap<u64, Enrolled> = HashMap::pinned(16_384, 0);

#[map(name = "EXCLUDE_V4")]
static EXCLUDE_V4: LpmTrie<Ipv4Prefix, u8> = LpmTrie::pinned(1_024, NO_PREALLOC);

#[map(name = "EXCLUDE_V6")]
static EXCLUDE_V6: LpmTrie<Ipv6Prefix, u8> = LpmTrie::pinned(1_024, NO_PREALLOC);

#[map(name = "EXCLUDE_PORTS")]
static EXCLUDE_PORTS: HashMap<u16, u8> = HashMap::pinned(1_024, 0);

/// Socket cookie → original destination, between `connect()` and the SYN.
#[map(name = "SOCK_ORIG")]
static SOCK_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65_536, 0);

/// (netns cookie, client port, family) → original destination, read by the agent.
#[map(name = "CONN_ORIG")]
static CONN_ORIG: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(65_536, 0);

#[map(name = "WORKLOAD_COUNTERS")]
static WORKLOAD_COUNTERS: PerCpuHashMap<CounterKey, Counters> = PerCpuHashMap::pinned(32_768, 0);

/// The enrolled pods' IPs whose inbound plaintext is steered to the agent.
#[map(name = "INBOUND_PODS")]
static INBOUND_PODS: HashMap<PodIp, u32> = HashMap::pinned(16_384, 0);

/// Pod IP → the agent's plaintext listener inside that pod. An entry disappears when the
/// socket closes (an agent restarting); `INBOUND_PODS` then makes the lookup fail closed.
#[map(name = "INBOUND_LISTENERS")]
static INBOUND_LISTENERS: SockHash<PodIp> = SockHash::pinned(16_384, 0);

const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
/// The loopback device is ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn ambit_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) || !is_enrolled(&ctx) {
        return 1;
    }
    // SAFETY: the verifier guarantees `sa` points at the context for the program's life.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    if skip_v4(ip, port) {
        return 1;
    }
    remember(
        &ctx,
        &OrigDst {
            addr: [ip, 0, 0, 0],
            port,
            family: AF_INET,
        },
    );
    unsafe {
        (*sa).user_ip4 = LOOPBACK_V4;
        (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
    }
    debug!(
        &ctx,
        "captured connect4 to {:i}:{}",
        u32::from_be(ip),
        u16::from_be(port)
    );
    1
}

#[cgroup_sock_addr(connect6)]
pub fn ambit_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) || !is_enrolled(&ctx) {
        return 1;
    }
    // SAFETY: as in connect4; the context's words are read and written 4 bytes at a time.
    let (ip, port) = unsafe {
        let w = &(*sa).user_ip6;
        ([w[0], w[1], w[2], w[3]], (*sa).user_port as u16)
    };
    if ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD {
        // A dual-stack socket talking IPv4: capture it as IPv4, on the v4 listener.
        if skip_v4(ip[3], port) {
            return 1;
        }
        remember(
            &ctx,
            &OrigDst {
                addr: [ip[3], 0, 0, 0],
                port,
                family: AF_INET,
            },
        );
        unsafe {
            (*sa).user_ip6[3] = LOOPBACK_V4;
            (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
        }
        return 1;
    }
    if skip_v6(ip, port) {
        return 1;
    }
    remember(
        &ctx,
        &OrigDst {
            addr: ip,
            port,
            family: AF_INET6,
        },
    );
    unsafe {
        (*sa).user_ip6[0] = 0;
        (*sa).user_ip6[1] = 0;
        (*sa).user_ip6[2] = 0;
        (*sa).user_ip6[3] = LOOPBACK_V6_LAST;
        (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
    }
    debug!(&ctx, "captured connect6 to port {}", u16::from_be(port));
    1
}

/// Publishes the original destination under (netns cookie, client port, family) as soon
/// as the kernel has chosen the client port (`TCP_CONNECT_CB` runs before the SYN is sent,
/// so the entry exists before the agent can `accept()`).
#[sock_ops]
pub fn ambit_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    let ptr = ctx.as_ptr();
    // SAFETY: helpers allowed for sock_ops, called with the program's own context.
    let sock_cookie = unsafe { bpf_get_socket_cookie(ptr) };
    let Some(orig) = (unsafe { SOCK_ORIG.get(sock_cookie) }).copied() else {
        return 1;
    };
    let netns_cookie = unsafe { bpf_get_netns_cookie(ptr) };
    let family = if ctx.family() == u32::from(AF_INET6) {
        let r = ctx.remote_ip6();
        if r[0] == 0 && r[1] == 0 && r[2] == V4_MAPPED_WORD {
            AF_INET
        } else {
            AF_INET6
        }
    } else {
        AF_INET
    };
    let key = ConnKey {
        netns_cookie,
        src_port: ctx.local_port() as u16,
        family,
        _pad: 0,
    };
    // Overwrite: a reused client port means the old connection is gone.
    let _ = CONN_ORIG.insert(key, orig, 0);
    let _ = SOCK_ORIG.remove(sock_cookie);
    1
}

#[cgroup_skb(ingress)]
pub fn ambit_skb_ingress(ctx: SkBuffContext) -> i32 {
    count(&ctx, Direction::Ingress);
    1
}

#[cgroup_skb(egress)]
pub fn ambit_skb_egress(ctx: SkBuffContext) -> i32 {
    count(&ctx, Direction::Egress);
    1
}

#[inline(always)]
fn count(ctx: &SkBuffContext, direction: Direction) {
    // SAFETY: helper allowed for cgroup_skb, called with the program's own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if unsafe { ENROLLED.get(netns_cookie) }.is_none() {
        return;
    }
    let key = CounterKey {
        netns_cookie,
        direction: direction as u32,
        _pad: 0,
    };
    let len = u64::from(ctx.len());
    match WORKLOAD_COUNTERS.get_ptr_mut(key) {
        // Per-CPU values: this CPU is the only writer, plain adds are safe.
        Some(c) => unsafe {
            (*c).bytes += len;
            (*c).packets += 1;
        },
        None => {
            let _ = WORKLOAD_COUNTERS.insert(
                key,
                Counters {
                    bytes: len,
                    packets: 1,
                },
                BPF_NOEXIST.into(),
            );
        }
    }
}

/// Steers a new TCP connection to an enrolled pod's IP to the agent's 15006 listener in
/// that pod; the accepted socket keeps the original destination as its local address.
///
/// Not steered: anything arriving on loopback (the agent's own delivery to the app, and the
/// pod talking to itself), and the agent's ports. If the agent's listener is missing (it is
/// restarting), the SYN is dropped: the client retries, and plaintext never bypasses the
/// mesh.
#[sk_lookup]
pub fn ambit_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: the verifier guarantees `l` points at the context; fields are read whole.
    let (family, protocol, port, ifindex) = unsafe {
        (
            (*l).family,
            (*l).protocol,
            (*l).local_port,
            (*l).ingress_ifindex,
        )
    };
    if protocol != IPPROTO_TCP
        || ifindex == LOOPBACK_IFINDEX
        || port == u32::from(INBOUND_HBONE_PORT)
        || port == u32::from(INBOUND_PLAINTEXT_PORT)
        || port == u32::from(OUTBOUND_PORT)
    {
        return SK_PASS;
    }
    // Volatile reads: each context field must be loaded at its own constant offset (the
    // verifier refuses a load through a context pointer the compiler has offset).
    let key = if family == u32::from(AF_INET) {
        PodIp {
            addr: [
                unsafe { core::ptr::read_volatile(&(*l).local_ip4) },
                0,
                0,
                0,
            ],
            family,
        }
    } else if family == u32::from(AF_INET6) {
        let (a, b, c, d) = unsafe {
            (
                core::ptr::read_volatile(&(*l).local_ip6[0]),
                core::ptr::read_volatile(&(*l).local_ip6[1]),
                core::ptr::read_volatile(&(*l).local_ip6[2]),
                core::ptr::read_volatile(&(*l).local_ip6[3]),
            )
        };
        PodIp {
            addr: [a, b, c, d],
            family,
        }
    } else {
        return SK_PASS;
    };
    if unsafe { INBOUND_PODS.get(&key) }.is_none() {
        return SK_PASS;
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => SK_PASS,
        Err(_) => SK_DROP,
    }
}

#[inline(always)]
fn is_tcp(sa: *mut bpf_sock_addr) -> bool {
    // SAFETY: see the callers.
    unsafe { (*sa).type_ == SOCK_STREAM && (*sa).protocol == IPPROTO_TCP }
}

#[inline(always)]
fn is_enrolled(ctx: &SockAddrContext) -> bool {
    // SAFETY: helper allowed for cgroup_sock_addr, called with the program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    unsafe { ENROLLED.get(cookie) }.is_some()
}

/// Loopback, the unspecified address and excluded CIDRs or ports are never captured.
#[inline(always)]
fn skip_v4(ip: u32, port: u16) -> bool {
    let first = ip.to_ne_bytes()[0];
    if first == 127 || ip == 0 || unsafe { EXCLUDE_PORTS.get(port) }.is_some() {
        return true;
    }
    EXCLUDE_V4.get(Key::new(32, ip.to_ne_bytes())).is_some()
}

#[inline(always)]
fn skip_v6(ip: [u32; 4], port: u16) -> bool {
    let head_zero = ip[0] == 0 && ip[1] == 0 && ip[2] == 0;
    if (head_zero && (ip[3] == LOOPBACK_V6_LAST || ip[3] == 0))
        || unsafe { EXCLUDE_PORTS.get(port) }.is_some()
    {
        return true;
    }
    let mut bytes = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = ip[i].to_ne_bytes();
        bytes[i * 4] = w[0];
        bytes[i * 4 + 1] = w[1];
        bytes[i * 4 + 2] = w[2];
        bytes[i * 4 + 3] = w[3];
        i += 1;
    }
    EXCLUDE_V6.get(Key::new(128, bytes)).is_some()
}

/// Stores the original destination for this socket. The connect is redirected even if
/// this fails (it cannot for an LRU map in practice): the agent then finds no destination
/// and resets the connection, which is better than silently bypassing the mesh.
#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: &OrigDst) {
    // SAFETY: helper allowed for cgroup_sock_addr.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = SOCK_ORIG.insert(cookie, orig, 0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
