//! Dials connections from inside pods' network namespaces.
//!
//! A socket belongs to the namespace it was created in, wherever it is used afterwards.
//! One dedicated thread (never a tokio worker) switches into a pod's namespace, creates
//! the socket and hands it back; connecting then happens asynchronously on the data plane.
//! The thread stays in the last namespace it entered, so a run of dials for one pod costs
//! no `setns` at all.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::mpsc;

use ambit_mesh::netns::Netns;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;

struct Job {
    netns: Arc<Netns>,
    netns_cookie: u64,
    domain: Domain,
    /// Deliver as this address (`IP_TRANSPARENT`, marked with
    /// [`crate::capture::podnet::DELIVERY_MARK`]).
    source: Option<IpAddr>,
    reply: oneshot::Sender<io::Result<Socket>>,
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
                for job in rx {
                    let result = (|| {
                        if current != Some(job.netns_cookie) {
                            current = None;
                            job.netns.enter()?;
                            current = Some(job.netns_cookie);
                        }
                        let s = Socket::new(
                            job.domain,
                            Type::STREAM.nonblocking().cloexec(),
                            Some(Protocol::TCP),
                        )?;
                        s.set_tcp_nodelay(true)?;
                        if let Some(ip) = job.source {
                            transparent(&s, ip)?;
                        }
                        Ok(s)
                    })();
                    let _ = job.reply.send(result);
                }
            })?;
        Ok(Self { jobs })
    }

    /// Connects to `dst` from inside `netns` (whose cookie is `netns_cookie`), so the
    /// connection's source is the pod's own address.
    pub async fn connect(
        &self,
        netns: &Arc<Netns>,
        netns_cookie: u64,
        dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        self.connect_as(netns, netns_cookie, dst, None).await
    }

    /// Like [`NetnsDialer::connect`], but with `source` (if set) as the connection's source
    /// address: how the agent delivers an inbound connection to the application with the
    /// caller's IP. The pod needs [`crate::capture::podnet::prepare_delivery`] for the replies.
    pub async fn connect_as(
        &self,
        netns: &Arc<Netns>,
        netns_cookie: u64,
        dst: SocketAddr,
        source: Option<IpAddr>,
    ) -> io::Result<TcpStream> {
        let (reply, rx) = oneshot::channel();
        let domain = if dst.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        self.jobs
            .send(Job {
                netns: netns.clone(),
                netns_cookie,
                domain,
                source,
                reply,
            })
            .map_err(|_| io::Error::other("netns dialer thread is gone"))?;
        let socket = rx
            .await
            .map_err(|_| io::Error::other("netns dialer thread is gone"))??;
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
        socket.connect(dst).await
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
