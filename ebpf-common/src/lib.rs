//! Map keys and values shared by Ambit's kernel programs (`ambit-ebpf`) and user space
//! (the node agent).
//!
//! Every type is `#[repr(C)]` and has no padding the kernel could leave uninitialised.
//! Each field keeps the byte order the kernel hands it to the programs in, so the kernel
//! side never converts: addresses and destination ports are in **network byte order**
//! (`bpf_sock_addr`, `__sk_buff`), and [`ConnKey::src_port`] is in **host byte order**
//! (`bpf_sock_ops.local_port`). User space converts when it reads or writes a map (the
//! agent's `capture::datapath`). With the `user` feature the types implement
//! [`aya::Pod`].
#![no_std]

/// Port of the in-pod outbound capture listener (loopback of each enrolled pod's netns).
pub const OUTBOUND_PORT: u16 = 15001;
/// The agent's in-pod inbound plaintext listener (connections steered by `sk_lookup`).
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// The agent's in-pod HBONE (mutual TLS) listener, on the pod's IPs.
pub const INBOUND_HBONE_PORT: u16 = 15008;

/// `AF_INET`, as the kernel reports a socket's family.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as the kernel reports a socket's family.
pub const AF_INET6: u16 = 10;

/// Names of the maps, as user space looks them up and pins them.
pub mod maps {
    /// netns cookie → [`super::Enrolled`]: the pods whose connections are captured.
    pub const ENROLLED: &str = "ENROLLED";
    /// IPv4 CIDRs never captured (LPM trie of [`super::Ipv4Prefix`]).
    pub const EXCLUDE_V4: &str = "EXCLUDE_V4";
    /// IPv6 CIDRs never captured (LPM trie of [`super::Ipv6Prefix`]).
    pub const EXCLUDE_V6: &str = "EXCLUDE_V6";
    /// Destination ports (network order) never captured.
    pub const EXCLUDE_PORTS: &str = "EXCLUDE_PORTS";
    /// socket cookie → [`super::OrigDst`], from `connect()` until the SYN leaves.
    pub const SOCK_ORIG: &str = "SOCK_ORIG";
    /// [`super::ConnKey`] → [`super::OrigDst`]: what the agent reads after `accept()`.
    pub const CONN_ORIG: &str = "CONN_ORIG";
    /// [`super::CounterKey`] → [`super::Counters`], per CPU.
    pub const WORKLOAD_COUNTERS: &str = "WORKLOAD_COUNTERS";
    /// Pod IP ([`super::PodIp`]) → flags: the enrolled pods whose inbound is captured.
    pub const INBOUND_PODS: &str = "INBOUND_PODS";
    /// Pod IP → the agent's 15006 listener in that pod (a SOCKHASH).
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
}

/// Names of the programs in the object file.
pub mod programs {
    /// `cgroup/connect4`: redirects enrolled pods' IPv4 TCP connects to 15001.
    pub const CONNECT4: &str = "ambit_connect4";
    /// `cgroup/connect6`: the same for IPv6 (v4-mapped destinations are captured as IPv4).
    pub const CONNECT6: &str = "ambit_connect6";
    /// `sock_ops`: moves a captured connection's original destination to `CONN_ORIG`.
    pub const SOCK_OPS: &str = "ambit_sock_ops";
    /// `cgroup_skb/ingress`: counts what enrolled workloads receive.
    pub const SKB_INGRESS: &str = "ambit_skb_ingress";
    /// `cgroup_skb/egress`: counts what enrolled workloads send.
    pub const SKB_EGRESS: &str = "ambit_skb_egress";
    /// `sk_lookup` (per pod netns): steers inbound plaintext to the agent's 15006 listener.
    pub const SK_LOOKUP: &str = "ambit_sk_lookup";
}

/// Value of `ENROLLED`: what the kernel needs to know about an enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enrolled {
    /// The agent's id for the workload (labels metrics; never reused while enrolled).
    pub workload_id: u32,
    /// Reserved for per-workload capture flags; zero today.
    pub flags: u32,
}

/// An original destination: what the application asked `connect()` for.
///
/// IPv4 destinations use `addr[0]` and leave the rest zero; a v4-mapped IPv6 destination
/// is stored as IPv4, because that is what crosses the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Address words in network byte order.
    pub addr: [u32; 4],
    /// Port in network byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
}

/// Key of `CONN_ORIG`: identifies a captured connection as the agent sees it after
/// `accept()` on a pod's outbound listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Cookie of the pod's network namespace.
    pub netns_cookie: u64,
    /// The client's (application's) source port, in host byte order.
    pub src_port: u16,
    /// Family of the connection on the wire: [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Explicit padding; always zero.
    pub _pad: u32,
}

/// Traffic direction of a counter, as seen from the workload.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Packets the workload received.
    Ingress = 0,
    /// Packets the workload sent.
    Egress = 1,
}

/// Key of `WORKLOAD_COUNTERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CounterKey {
    /// Cookie of the workload's network namespace.
    pub netns_cookie: u64,
    /// A [`Direction`] as `u32`.
    pub direction: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}

/// Value of `WORKLOAD_COUNTERS` (one per CPU; user space sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes at the IP layer (the IP header and everything after it).
    pub bytes: u64,
    /// Number of packets.
    pub packets: u64,
}

/// A pod IP, key of `INBOUND_PODS` and `INBOUND_LISTENERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodIp {
    /// Address words in network byte order (IPv4 in `addr[0]`, the rest zero).
    pub addr: [u32; 4],
    /// [`AF_INET`] or [`AF_INET6`] as `u32`.
    pub family: u32,
}

/// Key of the IPv4 exclusion LPM trie (`aya::maps::lpm_trie::Key<Ipv4Prefix>` data).
pub type Ipv4Prefix = [u8; 4];
/// Key of the IPv6 exclusion LPM trie.
pub type Ipv6Prefix = [u8; 16];

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` data with explicit padding fields; any bit pattern is valid.
    unsafe impl aya::Pod for Enrolled {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CounterKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PodIp {}
}
