//! Reading every frame that crosses a link, to prove what is (and is not) on the wire.
//!
//! An `AF_PACKET` socket bound to one interface inside a namespace sees the frames in both
//! directions, like tcpdump would, without depending on it being installed.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use ambit_mesh::netns::Netns;

/// Stop keeping frames beyond this many bytes (a bounded capture).
const MAX_BYTES: usize = 256 << 20;

/// A running capture; [`LinkCapture::stop`] returns the bytes of every frame seen.
pub struct LinkCapture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<Vec<u8>>>>,
}

impl LinkCapture {
    /// Starts capturing on `ifname` inside the namespace at `netns`. Frames are seen from
    /// the moment this returns.
    pub fn start(netns: &Path, ifname: &str) -> io::Result<Self> {
        let ns = Netns::open(netns)?;
        let ifname = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
        let fd = ns.run(move || open_packet_socket(&ifname))??;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Acquire) {
                // SAFETY: recv into a buffer we own, of its length.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 && all.len() < MAX_BYTES {
                    all.extend_from_slice(&buf[..n as usize]);
                }
            }
            // SAFETY: we own fd.
            unsafe { libc::close(fd) };
            Ok(all)
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and returns the captured frames, concatenated.
    pub fn stop(mut self) -> io::Result<Vec<u8>> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .expect("stopped once")
            .join()
            .map_err(|_| io::Error::other("capture thread panicked"))?
    }
}

impl Drop for LinkCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_packet_socket(ifname: &std::ffi::CStr) -> io::Result<i32> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket/setsockopt/bind calls with valid arguments; errors are checked.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let index = libc::if_nametoindex(ifname.as_ptr());
        if index == 0 {
            libc::close(fd);
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: Duration::from_millis(50).as_micros() as _,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        if libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        ) != 0
        {
            let e = io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(fd)
    }
}

/// Does `haystack` contain `needle`?
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
