//! Dials connections from inside pods' network namespaces.
//!
//! A socket belongs to the namespace it was created in, wherever it is used afterwards.
//! One dedicated thread (never a tokio worker) switches into a pod's namespace and
//! creates sockets; connecting then happens asynchronously on the data plane. The
//! thread stays in the last namespace it entered, so a run of dials for one pod costs
//! no `setns` at all.
//!
//! Each pod keeps a small [`SocketStock`] of sockets made ahead, so a dial takes one at
//! once instead of waiting for the thread (a hop that woke another thread per new
//! connection); the thread refills it in the background. Everything else about a
//! socket (its source address for a delivery, its mark) is set on the data plane, as
//! it does not depend on the calling thread's namespace.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;

use crate::capture::pods::Pod;

/// Sockets a pod's stock holds per address family, once it has dialed.
pub const STOCK: usize = 8;

/// Sockets made ahead in one pod's namespace (see the module's doc). Empty until the pod
/// first dials: pods that never dial hold none. Dropped with the pod, which closes them
/// (and so releases their hold on its namespace).
#[derive(Debug, Default)]
pub struct SocketStock {
    /// IPv4, IPv6.
    sockets: [Mutex<Vec<Socket>>; 2],
    /// A refill is queued for the family.
    refilling: [AtomicBool; 2],
}

impl SocketStock {
    /// How many sockets it holds now, IPv4 and IPv6.
    #[cfg(test)]
    fn len(&self) -> [usize; 2] {
        [0, 1].map(|i| self.sockets[i].lock().unwrap().len())
    }

    /// Whether it holds none.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == [0, 0]
    }
}

fn family(domain: Domain) -> usize {
    usize::from(domain == Domain::IPV6)
}

enum Job {
    /// One socket, now.
    Make {
        pod: Arc<Pod>,
        domain: Domain,
        reply: oneshot::Sender<io::Result<Socket>>,
    },
    /// Top the pod's stock up to [`STOCK`] (skipped if the pod is gone by then).
    Refill { pod: Weak<Pod>, domain: Domain },
}

/// Creates TCP sockets in pods' namespaces and connects them.
#[derive(Debug)]
pub struct NetnsDialer {
    jobs: mpsc::Sender<Job>,
}

impl NetnsDialer {
    /// Starts the socket-creating thread.
    pub fn start() -> io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("netns-dialer".into())
            .spawn(move || {
                let mut current: Option<u64> = None;
                let mut make = |pod: &Pod, domain| -> io::Result<Socket> {
                    if current != Some(pod.netns_cookie) {
                        current = None;
                        pod.netns.enter()?;
                        current = Some(pod.netns_cookie);
                    }
                    let s = Socket::new(
                        domain,
                        Type::STREAM.nonblocking().cloexec(),
                        Some(Protocol::TCP),
                    )?;
                    s.set_tcp_nodelay(true)?;
                    Ok(s)
                };
                for job in rx {
                    match job {
                        Job::Make { pod, domain, reply } => {
                            let _ = reply.send(make(&pod, domain));
                        }
                        Job::Refill { pod, domain } => {
                            let Some(pod) = pod.upgrade() else { continue };
                            let f = family(domain);
                            let have = pod.sockets.sockets[f].lock().unwrap().len();
                            let made: Vec<Socket> = (have..STOCK)
                                .map_while(|_| make(&pod, domain).ok())
                                .collect();
                            pod.sockets.sockets[f].lock().unwrap().extend(made);
                            pod.sockets.refilling[f].store(false, Ordering::Release);
                        }
                    }
                }
            })?;
        Ok(Self { jobs })
    }

    /// Connects to `dst` from inside `pod`'s namespace, so the connection's source is
    /// the pod's own address.
    pub async fn connect(&self, pod: &Arc<Pod>, dst: SocketAddr) -> io::Result<TcpStream> {
        self.connect_as(pod, dst, None).await
    }

    /// Like [`NetnsDialer::connect`], but with `source` (if set) as the connection's source
    /// address: how the agent delivers an inbound connection to the application with the
    /// caller's IP. The pod needs [`crate::capture::podnet::prepare_delivery`] for the replies.
    pub async fn connect_as(
        &self,
        pod: &Arc<Pod>,
        dst: SocketAddr,
        source: Option<IpAddr>,
    ) -> io::Result<TcpStream> {
        let domain = if dst.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let (stocked, left) = {
            let mut stock = pod.sockets.sockets[family(domain)].lock().unwrap();
            (stock.pop(), stock.len())
        };
        let socket = match stocked {
            Some(s) => {
                // One refill per half a stock: the thread wakes rarely.
                if left <= STOCK / 2 {
                    self.refill(pod, domain);
                }
                s
            }
            None => {
                let s = self.make(pod, domain).await?;
                self.refill(pod, domain);
                s
            }
        };
        if let Some(ip) = source {
            transparent(&socket, ip)?;
        }
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
        socket.connect(dst).await
    }

    /// A socket made by the thread, waited for.
    async fn make(&self, pod: &Arc<Pod>, domain: Domain) -> io::Result<Socket> {
        let gone = || io::Error::other("netns dialer thread is gone");
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Make {
                pod: pod.clone(),
                domain,
                reply,
            })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Queues a refill of `pod`'s stock, unless one is queued already.
    fn refill(&self, pod: &Arc<Pod>, domain: Domain) {
        let f = family(domain);
        if !pod.sockets.refilling[f].swap(true, Ordering::AcqRel) {
            let job = Job::Refill {
                pod: Arc::downgrade(pod),
                domain,
            };
            if self.jobs.send(job).is_err() {
                pod.sockets.refilling[f].store(false, Ordering::Release);
            }
        }
    }
}

/// Binds `s` to `ip` (any port), which need not be local, and marks it so that the
/// application's replies come back to it (see [`crate::podnet`]).
fn transparent(s: &Socket, ip: IpAddr) -> io::Result<()> {
    match ip {
        IpAddr::V4(_) => s.set_ip_transparent_v4(true)?,
        IpAddr::V6(_) => set_int(s, libc::SOL_IPV6, libc::IPV6_TRANSPARENT)?,
    }
    // Choose the port at connect(), for the whole 4-tuple: binding port 0 would take a
    // port per caller IP for good, and a busy caller would run out of them.
    set_int(s, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT)?;
    s.set_mark(crate::capture::podnet::DELIVERY_MARK)?;
    // Through loopback: the kernel then reports loopback as the arriving interface, which
    // is how the sk_lookup program tells this delivery from traffic to steer.
    s.bind_device(Some(b"lo"))?;
    s.bind(&SocketAddr::new(ip, 0).into())
}

/// Sets an integer socket option to 1.
fn set_int(s: &Socket, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a valid pointer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_mesh::enroll::PodSpec;
    use ambit_mesh::netns::Netns;

    /// A dial takes a socket from the pod's stock, which the thread keeps topped up;
    /// nothing but the pod holds the stock (a queued refill holds a weak reference), so
    /// its sockets close when the pod goes. (Needs root: the thread `setns`es,
    /// here into this test's own namespace.)
    #[tokio::test]
    async fn dials_come_from_a_stock_that_refills_and_is_released_with_its_pod() {
        assert!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() } == 0,
            "this test enters network namespaces and must run as root: `sudo -E cargo xtask test`"
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..3 * STOCK {
                held.push(listener.accept().await.unwrap().0);
            }
            (listener, held)
        });
        let dialer = NetnsDialer::start().unwrap();
        let pod = Arc::new(Pod {
            spec: PodSpec {
                uid: "u1".into(),
                namespace: "default".into(),
                name: "p".into(),
                netns: "/proc/self/ns/net".into(),
                ips: vec!["127.0.0.1".parse().unwrap()],
            },
            workload_id: 1,
            netns_cookie: 1,
            netns: Arc::new(Netns::current().unwrap()),
            counters: Arc::default(),
            sockets: SocketStock::default(),
        });
        assert!(pod.sockets.is_empty(), "a pod that never dialed holds none");
        let mut conns = Vec::new();
        for _ in 0..3 * STOCK {
            let c = dialer.connect(&pod, addr).await.unwrap();
            assert_eq!(c.peer_addr().unwrap(), addr);
            assert!(c.nodelay().unwrap());
            conns.push(c);
            // Let the thread refill before the next dial.
            for _ in 0..200 {
                if !pod.sockets.refilling[0].load(Ordering::Acquire) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        assert!(pod.sockets.len()[0] > STOCK / 2, "{:?}", pod.sockets.len());
        assert_eq!(pod.sockets.len()[1], 0, "no IPv6 dial, no IPv6 stock");
        drop(conns);
        let (_listener, held) = accepted.await.unwrap();
        drop(held);
        // No refill in flight (the loop above waited): the thread holds nothing.
        assert!(!pod.sockets.refilling[0].load(Ordering::Acquire));
        let weak = Arc::downgrade(&pod);
        drop(pod);
        assert!(
            weak.upgrade().is_none(),
            "nothing else holds the pod or its stock"
        );
    }
}
