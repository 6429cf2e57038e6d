//! Network-namespace helpers.
//!
//! `setns(2)` changes the namespace of the calling *thread* only. Everything here that
//! switches namespace does it on a thread it owns (spawned for the purpose), never on the
//! caller's thread and never on a shared tokio worker, so no other code can observe a
//! thread in the wrong namespace.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

/// `SO_NETNS_COOKIE` (Linux 5.14+): the 64-bit cookie of a socket's network namespace, the
/// same value `bpf_get_netns_cookie()` returns in the kernel programs.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// An open handle on a network namespace (e.g. `/var/run/netns/<name>` or
/// `/proc/<pid>/ns/net`). Holding it keeps the namespace alive.
#[derive(Debug)]
pub struct Netns {
    file: File,
}

impl Netns {
    /// Opens the namespace at `path` and checks that it really is a network namespace.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", path.display())))?;
        // NS_GET_NSTYPE = _IO(0xb7, 0x3); refuses anything that is not a namespace file.
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        // SAFETY: ioctl on an fd we own; no pointer arguments.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a namespace file: {}",
                    path.display(),
                    io::Error::last_os_error()
                ),
            ));
        }
        if kind != libc::CLONE_NEWNET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a network namespace", path.display()),
            ));
        }
        Ok(Self { file })
    }

    /// The calling thread's current network namespace.
    pub fn current() -> io::Result<Self> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// Switches the calling thread into this namespace. Only for threads the caller owns
    /// and dedicates to this namespace; prefer [`Netns::run`].
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: setns on a valid namespace fd; affects only the calling thread.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its result.
    /// Sockets created by `f` stay bound to this namespace wherever they are used later.
    pub fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("netns".into())
                .spawn_scoped(s, || {
                    self.enter()?;
                    Ok(f())
                })?
                .join()
                .map_err(|_| io::Error::other("thread in netns panicked"))?
        })
    }

    /// The namespace's cookie (as the kernel programs see it).
    pub fn cookie(&self) -> io::Result<u64> {
        let sock =
            self.run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None))??;
        socket_netns_cookie(sock.as_fd())
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// The cookie of the network namespace a socket lives in.
pub fn socket_netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_netns_has_a_cookie() {
        let ns = Netns::current().unwrap();
        assert_ne!(ns.cookie().unwrap(), 0);
    }

    #[test]
    fn rejects_files_that_are_not_namespaces() {
        let err = Netns::open("/proc/self/status").unwrap_err();
        assert!(err.to_string().contains("not a namespace"), "{err}");
        let err = Netns::open("/nonexistent/netns").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn rejects_other_namespace_kinds() {
        let err = Netns::open("/proc/self/ns/uts").unwrap_err();
        assert!(err.to_string().contains("not a network namespace"), "{err}");
    }
}
