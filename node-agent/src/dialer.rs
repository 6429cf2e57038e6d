//! Dials connections from inside pods' network namespaces.
//!
//! A socket belongs to the namespace it was created in, wherever it is used afterwards.
//! One dedicated thread (never a tokio worker) switches into a pod's namespace, creates
//! the socket and hands it back; connecting then happens asynchronously on the data plane.
//! The thread stays in the last namespace it entered, so a run of dials for one pod costs
//! no `setns` at all.

use std::io;
use std::net::SocketAddr;
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
