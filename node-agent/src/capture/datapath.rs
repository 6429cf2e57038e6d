//! The kernel side of the agent: loads Ambit's eBPF object, attaches its programs to the
//! pods' cgroup, and owns the maps user space reads and writes.
//!
//! Links and maps are pinned under `<bpffs-dir>/links` and `<bpffs-dir>/maps`, so they
//! outlive the agent: while it is down, enrolled pods' connects are still redirected to
//! the (now absent) in-pod listener and fail fast, instead of silently bypassing the mesh.
//! A restarted agent reuses the pinned maps and swaps in freshly loaded programs without a
//! gap: it attaches the new link first (bpf_link cgroup attachments are multi-attach),
//! then replaces the old link's pin. For that instant both programs run; the second sees
//! an already-redirected (loopback) destination and leaves it alone, while the accounting
//! programs count those few packets twice.
//!
//! Stopping the agent leaves all of it in place (fail closed); only [`uninstall`]
//! detaches. This is the only file that knows the maps' byte layouts.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use std::net::IpAddr;
use std::os::fd::AsRawFd;

use ambit_ebpf_common::{
    AF_INET, AF_INET6, ConnKey, CounterKey, Counters, Enrolled, Ipv4Prefix, Ipv6Prefix, OrigDst,
    PodIp, maps, programs,
};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, PerCpuHashMap, SockHash};
use aya::programs::cgroup_skb::CgroupSkbAttachType;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSockAddr, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use tracing::{info, warn};

use ambit_mesh::cidr::Cidr;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Why the datapath could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The eBPF object file does not exist.
    #[error(
        "eBPF object not found at {0}: build it with `cargo xtask build-ebpf` \
         (or point --ebpf-object / AMBIT_EBPF_OBJECT at it)"
    )]
    MissingObject(PathBuf),
    /// An operation failed; `what` says which.
    #[error("{what}: {source}")]
    Io {
        /// What was being done (e.g. opening the pod cgroup).
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// aya could not load the object.
    #[error("loading the eBPF object {path}: {source}")]
    Load {
        /// The object file.
        path: PathBuf,
        /// Why loading failed.
        source: Box<aya::EbpfError>,
    },
    /// A program could not be loaded or attached.
    #[error("program {program}: {source}")]
    Program {
        /// The program's name in the object.
        program: &'static str,
        /// Why it failed.
        source: Box<aya::programs::ProgramError>,
    },
    /// A link could not be pinned, or a previous agent's pin could not be opened.
    #[error("pinning {path}: {reason}")]
    Pin {
        /// The pin (the program's name when its link is not an fd link).
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },
    /// A map has an unexpected type, or updating it failed.
    #[error("map {map}: {source}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// Why it failed.
        source: Box<aya::maps::MapError>,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Io { what, source }
}

/// The loaded and attached kernel programs and the maps the agent uses.
pub struct Datapath {
    pin_dir: PathBuf,
    enrolled: Mutex<HashMap<MapData, u64, Enrolled>>,
    /// Read and deleted with raw `bpf(2)` calls ([`take_elem`]): no lock on the accept path.
    conn_orig: HashMap<MapData, ConnKey, OrigDst>,
    /// Whether this kernel reads and deletes in one call ([`lookup_and_delete_works`]).
    lookup_and_delete: bool,
    counters: Mutex<PerCpuHashMap<MapData, CounterKey, Counters>>,
    inbound_pods: Mutex<HashMap<MapData, PodIp, u32>>,
    inbound_listeners: Mutex<SockHash<MapData, PodIp>>,
    /// Holds the loaded `sk_lookup` program, attached to each captured pod's netns.
    ebpf: Mutex<Ebpf>,
    /// Kept so aya-log records keep flowing (read by [`Datapath::take_logger`]).
    logger: Mutex<Option<aya_log::EbpfLogger<&'static dyn log::Log>>>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the object at `object`, reusing maps pinned in `pin_dir`, attaches every
    /// program to `cgroup` (replacing links a previous agent pinned) and applies the
    /// capture exclusions.
    pub fn load(
        object: &Path,
        cgroup: &Path,
        pin_dir: &Path,
        exclude_cidrs: &[Cidr],
        exclude_ports: &[u16],
        kernel_log_level: u8,
    ) -> Result<Self, DatapathError> {
        if !object.is_file() {
            return Err(DatapathError::MissingObject(object.to_owned()));
        }
        let cgroup_file = File::open(cgroup)
            .map_err(io_err(format!("opening pod cgroup {}", cgroup.display())))?;
        ensure_bpffs(pin_dir)?;
        let (map_dir, link_dir) = (pin_dir.join("maps"), pin_dir.join("links"));
        for dir in [&map_dir, &link_dir] {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }

        let mut ebpf = EbpfLoader::new()
            // The programs use no CO-RE relocations; skipping the kernel's BTF saves memory.
            .btf(None)
            .default_map_pin_directory(&map_dir)
            .override_global("AYA_LOG_LEVEL", &kernel_log_level, false)
            .load_file(object)
            .map_err(|source| DatapathError::Load {
                path: object.to_owned(),
                source: Box::new(source),
            })?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("kernel-side logging unavailable: {e}");
                None
            }
        };

        attach_all(&mut ebpf, &cgroup_file, &link_dir)?;
        std::fs::create_dir_all(link_dir.join(SK_LOOKUP_LINKS))
            .map_err(io_err("creating the sk_lookup link directory"))?;
        {
            let name = programs::SK_LOOKUP;
            let p: &mut SkLookup =
                program(&mut ebpf, name)?
                    .try_into()
                    .map_err(|source| DatapathError::Program {
                        program: name,
                        source: Box::new(source),
                    })?;
            p.load().map_err(|source| DatapathError::Program {
                program: name,
                source: Box::new(source),
            })?;
        }

        apply_exclusions(&mut ebpf, exclude_cidrs, exclude_ports)?;
        let conn_orig = take_map(&mut ebpf, maps::CONN_ORIG)?;
        let lookup_and_delete = lookup_and_delete_works(&conn_orig);
        if !lookup_and_delete {
            info!("this kernel reads and deletes BPF hash entries in two calls (before 5.14)");
        }
        let dp = Self {
            pin_dir: pin_dir.to_owned(),
            enrolled: Mutex::new(take_map(&mut ebpf, maps::ENROLLED)?),
            conn_orig,
            lookup_and_delete,
            counters: Mutex::new(take_per_cpu(&mut ebpf, maps::WORKLOAD_COUNTERS)?),
            inbound_pods: Mutex::new(take_map(&mut ebpf, maps::INBOUND_PODS)?),
            inbound_listeners: Mutex::new(take_typed(&mut ebpf, maps::INBOUND_LISTENERS)?),
            logger: Mutex::new(logger),
            ebpf: Mutex::new(ebpf),
        };
        info!(cgroup = %cgroup.display(), pins = %pin_dir.display(), "eBPF programs attached");
        Ok(dp)
    }

    /// Hands the kernel log reader to a task that polls it (see `lib.rs`).
    pub fn take_logger(&self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.lock().unwrap().take()
    }
}

fn apply_exclusions(ebpf: &mut Ebpf, cidrs: &[Cidr], ports: &[u16]) -> Result<(), DatapathError> {
    {
        let mut v4: LpmTrie<MapData, Ipv4Prefix, u8> = take_typed(ebpf, maps::EXCLUDE_V4)?;
        let mut v6: LpmTrie<MapData, Ipv6Prefix, u8> = take_typed(ebpf, maps::EXCLUDE_V6)?;
        let mut p: HashMap<MapData, u16, u8> = take_typed(ebpf, maps::EXCLUDE_PORTS)?;
        // The maps may be pinned from an earlier run with other flags: make them exact.
        for k in v4.keys().filter_map(Result::ok).collect::<Vec<_>>() {
            let _ = v4.remove(&k);
        }
        for k in v6.keys().filter_map(Result::ok).collect::<Vec<_>>() {
            let _ = v6.remove(&k);
        }
        for k in p.keys().filter_map(Result::ok).collect::<Vec<_>>() {
            let _ = p.remove(&k);
        }
        let map_err = |map| {
            move |source| DatapathError::Map {
                map,
                source: Box::new(source),
            }
        };
        for c in cidrs {
            match c.addr {
                std::net::IpAddr::V4(a) => v4
                    .insert(&Key::new(u32::from(c.len), a.octets()), 1, 0)
                    .map_err(map_err(maps::EXCLUDE_V4))?,
                std::net::IpAddr::V6(a) => v6
                    .insert(&Key::new(u32::from(c.len), a.octets()), 1, 0)
                    .map_err(map_err(maps::EXCLUDE_V6))?,
            }
        }
        for port in ports {
            p.insert(port.to_be(), 1, 0)
                .map_err(map_err(maps::EXCLUDE_PORTS))?;
        }
        Ok(())
    }
}

impl Datapath {
    /// Starts capturing the pod whose network namespace has `netns_cookie`.
    pub fn enroll(&self, netns_cookie: u64, workload_id: u32) -> Result<(), DatapathError> {
        self.enrolled
            .lock()
            .unwrap()
            .insert(
                netns_cookie,
                Enrolled {
                    workload_id,
                    flags: 0,
                },
                0,
            )
            .map_err(|source| DatapathError::Map {
                map: maps::ENROLLED,
                source: Box::new(source),
            })
    }

    /// Stops capturing the pod and forgets its kernel counters.
    pub fn unenroll(&self, netns_cookie: u64) {
        let _ = self.enrolled.lock().unwrap().remove(&netns_cookie);
        let mut counters = self.counters.lock().unwrap();
        for direction in [0, 1] {
            let _ = counters.remove(&CounterKey {
                netns_cookie,
                direction,
                _pad: 0,
            });
        }
    }

    /// The netns cookies currently in `ENROLLED`, with their workload ids.
    pub fn enrolled(&self) -> Vec<(u64, Enrolled)> {
        self.enrolled
            .lock()
            .unwrap()
            .iter()
            .filter_map(Result::ok)
            .collect()
    }

    /// Reads and forgets the original destination of a captured connection. Every worker
    /// accepting at once calls this, so it takes no lock: the kernel's map is safe for
    /// concurrent use, and aya's `remove` would want `&mut` (a mutex around two syscalls
    /// per connection, shared by all workers, is what this replaced).
    fn take_orig_dst(&self, key: &ConnKey) -> Option<OrigDst> {
        match take_elem(&self.conn_orig, key, self.lookup_and_delete) {
            Ok(orig) => orig,
            Err(e) => {
                // Once loudly; a persistent error would otherwise log per connection.
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(
                    || warn!(error = %e, "reading a captured connection's original destination"),
                );
                tracing::debug!(error = %e, "reading a captured connection's original destination");
                None
            }
        }
    }

    /// Kernel counters summed over CPUs, per (netns cookie, direction).
    pub fn counters(&self) -> Vec<(CounterKey, Counters)> {
        let map = self.counters.lock().unwrap();
        map.iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| {
                let sum = per_cpu.iter().fold(Counters::default(), |acc, c| Counters {
                    bytes: acc.bytes + c.bytes,
                    packets: acc.packets + c.packets,
                });
                (k, sum)
            })
            .collect()
    }
}

impl super::OriginalDestinations for Datapath {
    fn take(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = ConnKey {
            netns_cookie,
            src_port: peer.port(),
            family: if peer.is_ipv4() { AF_INET } else { AF_INET6 },
            _pad: 0,
        };
        self.take_orig_dst(&key).map(orig_to_addr)
    }
}

/// `bpf(2)` commands on map elements (`include/uapi/linux/bpf.h`).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
/// The kernel's own `ENOTSUPP` (not a libc errno), what `bpf(2)` answers for a command a
/// map type lacks.
const KERNEL_ENOTSUPP: i32 = 524;

/// The map element `bpf_attr` of `BPF_MAP_*_ELEM`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// One `bpf(2)` element command on `map`: `Ok(false)` if the key is not there. The map's
/// key and value sizes are `K`'s and `V`'s (aya checked them when it took the map), so
/// the kernel reads one `K` and writes at most one `V`.
fn elem_cmd<K: aya::Pod, V: aya::Pod>(
    cmd: libc::c_long,
    map: &HashMap<MapData, K, V>,
    key: &K,
    value: Option<&mut std::mem::MaybeUninit<V>>,
) -> io::Result<bool> {
    use aya::maps::IterableMap;
    let attr = ElemAttr {
        map_fd: map.map().fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.map_or(0, |v| v.as_mut_ptr() as u64),
        flags: 0,
    };
    // SAFETY: `attr` is a valid element attribute for the command's length; `key` and
    // `value` point at a `K` and a `V`, the map's sizes, and live through the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Whether the kernel does `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on this hash map (Linux 5.14
/// and later): asked once, with a key that is not there.
fn lookup_and_delete_works<K: aya::Pod + Default, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
) -> bool {
    let mut value = std::mem::MaybeUninit::uninit();
    match elem_cmd(
        BPF_MAP_LOOKUP_AND_DELETE_ELEM,
        map,
        &K::default(),
        Some(&mut value),
    ) {
        Ok(_) => true,
        Err(e) => !matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::EOPNOTSUPP | KERNEL_ENOTSUPP)
        ),
    }
}

/// Reads and deletes `key`'s value: one atomic `BPF_MAP_LOOKUP_AND_DELETE_ELEM` if
/// `atomic` (see [`lookup_and_delete_works`]), else a lookup then a delete.
fn take_elem<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
    atomic: bool,
) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::uninit();
    if atomic {
        return Ok(
            if elem_cmd(BPF_MAP_LOOKUP_AND_DELETE_ELEM, map, key, Some(&mut value))? {
                // SAFETY: the kernel wrote the whole value; `V` is plain old data.
                Some(unsafe { value.assume_init() })
            } else {
                None
            },
        );
    }
    if !elem_cmd(BPF_MAP_LOOKUP_ELEM, map, key, Some(&mut value))? {
        return Ok(None);
    }
    let _ = elem_cmd(BPF_MAP_DELETE_ELEM, map, key, None);
    // SAFETY: as above.
    Ok(Some(unsafe { value.assume_init() }))
}

/// An [`OrigDst`] (network byte order) as a socket address.
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

/// What [`uninstall`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Uninstalled {
    /// Links detached (cgroup programs and per-pod `sk_lookup`).
    pub links: usize,
    /// Map pins removed.
    pub maps: usize,
}

/// Removes Ambit from a node: detaches every program the agents of `pin_dir` attached
/// (the cgroup programs and every pod's `sk_lookup`) and removes every pin, so the maps
/// are freed. Capture stops for all pods at once: their connections go direct again
/// and STRICT pods accept plaintext. Run it only with no agent running.
pub fn uninstall(pin_dir: &Path) -> Result<Uninstalled, DatapathError> {
    let mut done = Uninstalled::default();
    if !pin_dir.exists() {
        return Ok(done);
    }
    let links = pin_dir.join("links");
    let mut pins: Vec<PathBuf> = ALL_PROGRAMS.iter().map(|n| links.join(n)).collect();
    if let Ok(entries) = std::fs::read_dir(links.join(SK_LOOKUP_LINKS)) {
        pins.extend(entries.flatten().map(|e| e.path()));
    }
    for path in pins.iter().filter(|p| p.exists()) {
        let link = PinnedLink::from_pin(path).map_err(|e| DatapathError::Pin {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        // Dropping the unpinned link (the last reference) detaches it.
        drop(
            link.unpin()
                .map_err(io_err(format!("unpinning {}", path.display())))?,
        );
        done.links += 1;
    }
    if let Ok(entries) = std::fs::read_dir(pin_dir.join("maps")) {
        for e in entries.flatten() {
            std::fs::remove_file(e.path())
                .map_err(io_err(format!("removing {}", e.path().display())))?;
            done.maps += 1;
        }
    }
    std::fs::remove_dir_all(pin_dir).map_err(io_err(format!("removing {}", pin_dir.display())))?;
    info!(pins = %pin_dir.display(), links = done.links, maps = done.maps, "eBPF programs detached and pins removed");
    Ok(done)
}

/// Under `<bpffs>/links`: one pinned `sk_lookup` link per captured pod, named by its
/// netns cookie.
const SK_LOOKUP_LINKS: &str = "sk_lookup";

/// The `INBOUND_*` key of a pod IP.
pub fn pod_ip_key(ip: IpAddr) -> PodIp {
    match ip {
        IpAddr::V4(a) => PodIp {
            addr: [u32::from_ne_bytes(a.octets()), 0, 0, 0],
            family: u32::from(AF_INET),
        },
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            PodIp {
                addr: [w(0), w(4), w(8), w(12)],
                family: u32::from(AF_INET6),
            }
        }
    }
}

impl Datapath {
    /// Steers plaintext TCP to `ips` (the pod's) inside `netns` to the pod's plaintext
    /// listeners (`listeners`: one per family, bound inside the pod). The listeners go into
    /// the map first, then the IPs, then the program is attached (its link pinned, replacing
    /// a previous agent's), so nothing is ever steered to a socket that is not there.
    pub fn capture_inbound(
        &self,
        netns: &impl AsFd,
        netns_cookie: u64,
        ips: &[IpAddr],
        listeners: &[(IpAddr, std::os::fd::RawFd)],
    ) -> Result<(), DatapathError> {
        let map_err = |map| {
            move |source| DatapathError::Map {
                map,
                source: Box::new(source),
            }
        };
        {
            let mut socks = self.inbound_listeners.lock().unwrap();
            for (ip, fd) in listeners {
                socks
                    .insert(pod_ip_key(*ip), RawFdRef(*fd), 0)
                    .map_err(map_err(maps::INBOUND_LISTENERS))?;
            }
            let mut pods = self.inbound_pods.lock().unwrap();
            for ip in ips {
                pods.insert(pod_ip_key(*ip), 0, 0)
                    .map_err(map_err(maps::INBOUND_PODS))?;
            }
        }
        let name = programs::SK_LOOKUP;
        let prog_err = |source| DatapathError::Program {
            program: name,
            source: Box::new(source),
        };
        let link: FdLink = {
            let mut ebpf = self.ebpf.lock().unwrap();
            let p: &mut SkLookup = program(&mut ebpf, name)?.try_into().map_err(prog_err)?;
            let id = p.attach(netns).map_err(prog_err)?;
            p.take_link(id).map_err(prog_err)?.into()
        };
        pin_replacing(link, &self.sk_lookup_pin(netns_cookie))
    }

    /// Stops steering the pod's inbound plaintext: detaches its program and forgets its
    /// IPs. Its listeners leave the map when they close.
    pub fn release_inbound(&self, netns_cookie: u64, ips: &[IpAddr]) {
        unpin_link(&self.sk_lookup_pin(netns_cookie));
        let mut pods = self.inbound_pods.lock().unwrap();
        for ip in ips {
            let _ = pods.remove(&pod_ip_key(*ip));
        }
    }

    /// Removes pinned inbound links and IPs of pods not in `keep` (netns cookies, IPs):
    /// what a previous agent captured for pods that are gone.
    pub fn sweep_inbound(&self, keep_cookies: &[u64], keep_ips: &[IpAddr]) {
        let dir = self.pin_dir.join("links").join(SK_LOOKUP_LINKS);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let cookie = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok());
                if cookie.is_none_or(|c| !keep_cookies.contains(&c)) {
                    unpin_link(&e.path());
                    info!(link = %e.path().display(), "removed a stale inbound capture");
                }
            }
        }
        let keep: Vec<PodIp> = keep_ips.iter().map(|ip| pod_ip_key(*ip)).collect();
        let mut pods = self.inbound_pods.lock().unwrap();
        for k in pods.keys().filter_map(Result::ok).collect::<Vec<_>>() {
            if !keep.contains(&k) {
                let _ = pods.remove(&k);
            }
        }
    }

    fn sk_lookup_pin(&self, netns_cookie: u64) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(SK_LOOKUP_LINKS)
            .join(netns_cookie.to_string())
    }
}

/// Detaches the link pinned at `path` (if any) by removing its last reference.
fn unpin_link(path: &Path) {
    if let Ok(link) = PinnedLink::from_pin(path) {
        match link.unpin() {
            Ok(fd) => drop(fd),
            Err(e) => warn!(link = %path.display(), "could not unpin: {e}"),
        }
    }
}

/// A borrowed raw fd, for aya's `SockHash::insert` (which only reads it).
struct RawFdRef(std::os::fd::RawFd);

impl AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

const ALL_PROGRAMS: [&str; 5] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SOCK_OPS,
    programs::SKB_INGRESS,
    programs::SKB_EGRESS,
];

fn attach_all(ebpf: &mut Ebpf, cgroup: &File, link_dir: &Path) -> Result<(), DatapathError> {
    // With bpf_link (kernel >= 5.7, which aya uses), cgroup attachments are always
    // multi-attach and the kernel rejects any flag: `Single` is how aya passes none.
    // Other programs on the same cgroup (another agent, Cilium, ...) keep running.
    let mode = CgroupAttachMode::Single;
    let prog_err = |program| {
        move |source| DatapathError::Program {
            program,
            source: Box::new(source),
        }
    };
    // Load, attach, take the link out of aya's keeping and pin it.
    macro_rules! attach_pinned {
        ($ty:ty, $name:expr, |$p:ident| $attach:expr) => {{
            let name = $name;
            let $p: &mut $ty = program(ebpf, name)?.try_into().map_err(prog_err(name))?;
            $p.load().map_err(prog_err(name))?;
            let id = $attach.map_err(prog_err(name))?;
            let link = $p.take_link(id).map_err(prog_err(name))?;
            let link = link.try_into().map_err(|e| link_err(name, e))?;
            pin_replacing(link, &link_dir.join(name))?;
        }};
    }
    for name in [programs::CONNECT4, programs::CONNECT6] {
        attach_pinned!(CgroupSockAddr, name, |p| p.attach(cgroup.as_fd(), mode));
    }
    attach_pinned!(SockOps, programs::SOCK_OPS, |p| p
        .attach(cgroup.as_fd(), mode));
    for (name, kind) in [
        (programs::SKB_INGRESS, CgroupSkbAttachType::Ingress),
        (programs::SKB_EGRESS, CgroupSkbAttachType::Egress),
    ] {
        attach_pinned!(CgroupSkb, name, |p| p.attach(cgroup.as_fd(), kind, mode));
    }
    Ok(())
}

fn link_err(program: &'static str, e: aya::programs::links::LinkError) -> DatapathError {
    DatapathError::Pin {
        path: PathBuf::from(program),
        reason: format!("link is not an fd link: {e}"),
    }
}

/// Pins `new` at `path`. If a previous agent pinned a link there, that link stays attached
/// until the new one is pinned, then is detached: no moment without capture.
fn pin_replacing(new: FdLink, path: &Path) -> Result<(), DatapathError> {
    let old = if path.exists() {
        let old = PinnedLink::from_pin(path).map_err(|e| DatapathError::Pin {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        // Keep the fd: the old program stays attached while we hold it.
        Some(
            old.unpin()
                .map_err(io_err(format!("unpinning {}", path.display())))?,
        )
    } else {
        None
    };
    new.pin(path).map_err(|e| DatapathError::Pin {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if old.is_some() {
        info!(link = %path.display(), "replaced the previous agent's link");
    }
    drop(old);
    Ok(())
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, DatapathError> {
    ebpf.program_mut(name).ok_or_else(|| DatapathError::Io {
        what: format!(
            "program {name} is missing from the eBPF object (rebuild with `cargo xtask build-ebpf`)"
        ),
        source: io::Error::from(io::ErrorKind::NotFound),
    })
}

fn take_typed<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| DatapathError::Io {
        what: format!("map {name} is missing from the eBPF object"),
        source: io::Error::from(io::ErrorKind::NotFound),
    })?;
    T::try_from(map).map_err(|source| DatapathError::Map {
        map: name,
        source: Box::new(source),
    })
}

fn take_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    take_typed(ebpf, name)
}

fn take_per_cpu<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<PerCpuHashMap<MapData, K, V>, DatapathError> {
    take_typed(ebpf, name)
}

/// Makes sure `dir` is on a bpf filesystem, mounting one on /sys/fs/bpf if nothing is.
fn ensure_bpffs(dir: &Path) -> Result<(), DatapathError> {
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) {
        return check_bpffs(dir.parent().unwrap_or(dir));
    }
    if !is_bpffs(root) {
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: plain mount(2) with static C strings and no data.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(DatapathError::Io {
                what: "mounting a bpf filesystem on /sys/fs/bpf (run as root)".into(),
                source: io::Error::last_os_error(),
            });
        }
        info!("mounted bpffs on /sys/fs/bpf");
    }
    Ok(())
}

fn check_bpffs(dir: &Path) -> Result<(), DatapathError> {
    if is_bpffs(dir) {
        Ok(())
    } else {
        Err(DatapathError::Io {
            what: format!("{} is not on a bpf filesystem", dir.display()),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })
    }
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `statfs` is plain old data; all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes into `st`.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
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
        // What pod_ip_key writes is what orig_to_addr reads.
        let k = pod_ip_key(IpAddr::V6(ip));
        assert_eq!(k.addr, words);
    }

    /// A captured connection's original destination is read and deleted at once: the
    /// second take finds nothing, and so does a take racing it. Both ways (one atomic
    /// command where the kernel has it, lookup then delete) run on a real map.
    #[test]
    fn original_destinations_are_taken_once() {
        assert!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() } == 0,
            "creating a BPF map needs root: run `sudo -E cargo test -p ambit-node-agent`"
        );
        use std::os::fd::{FromRawFd, OwnedFd};
        // BPF_MAP_CREATE (0) of a hash map (1), room for every key below.
        let mut attr = [0u32; 32];
        attr[..4].copy_from_slice(&[
            1,
            std::mem::size_of::<ConnKey>() as u32,
            std::mem::size_of::<OrigDst>() as u32,
            4096,
        ]);
        // SAFETY: a zero-padded map creation attribute.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                0,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        assert!(fd >= 0, "BPF_MAP_CREATE: {}", io::Error::last_os_error());
        // SAFETY: the kernel just gave us this descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // Typed as the agent's map is: aya checks the key and value sizes.
        let data = MapData::from_fd(fd).unwrap();
        let mut map: HashMap<MapData, ConnKey, OrigDst> =
            HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
        let atomic = lookup_and_delete_works(&map);
        eprintln!("BPF_MAP_LOOKUP_AND_DELETE_ELEM on hash maps: {atomic}");
        let key = |port: u16| ConnKey {
            netns_cookie: 7,
            src_port: port,
            family: AF_INET,
            _pad: 0,
        };
        let orig = OrigDst {
            addr: [u32::from_ne_bytes([10, 0, 0, 9]), 0, 0, 0],
            port: 80u16.to_be(),
            family: AF_INET,
        };
        // The atomic way only where the kernel has it; the two-call way everywhere.
        let ways: &[bool] = if atomic { &[true, false] } else { &[false] };
        for &way in ways {
            map.insert(key(1000), orig, 0).unwrap();
            let got = take_elem(&map, &key(1000), way).unwrap();
            assert_eq!(got.map(orig_to_addr), Some("10.0.0.9:80".parse().unwrap()));
            assert!(
                take_elem(&map, &key(1000), way).unwrap().is_none(),
                "taken twice (atomic: {way})"
            );
            // Many keys, taken from several threads at once.
            (0..200).for_each(|p| map.insert(key(2000 + p), orig, 0).unwrap());
            let taken = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for p in 0..200 {
                            if take_elem(&map, &key(2000 + p), way).unwrap().is_some() {
                                taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            let n = taken.load(std::sync::atomic::Ordering::Relaxed);
            if way {
                assert_eq!(n, 200, "the atomic command hands each key out once");
            } else {
                // Lookup then delete can hand one key to two racing takers; the agent
                // never races on a key (one accepted connection per client port).
                assert!(n >= 200, "{n}");
            }
            assert!(
                map.keys().next().is_none(),
                "every key taken (atomic: {way})"
            );
        }
    }

    #[test]
    fn a_missing_object_names_the_build_command() {
        let err = Datapath::load(
            Path::new("/nonexistent/ambit-ebpf"),
            Path::new("/"),
            Path::new("/sys/fs/bpf/x"),
            &[],
            &[],
            3,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("cargo xtask build-ebpf") && msg.contains("/nonexistent/ambit-ebpf"),
            "{msg}"
        );
    }
}
