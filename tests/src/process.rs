//! Processes that run "inside" a pod or node: in its network namespace and its cgroup.
//!
//! The child moves itself between `fork` and `exec` (cgroup first, then `setns`), so it
//! never runs a single instruction of the workload elsewhere. It also asks to be killed if
//! the thread that started it dies, so a crashed test leaves no workload behind.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Starts `cmd` in the network namespace at `netns` and the cgroup directory `cgroup`.
pub fn spawn_in(netns: &Path, cgroup: &Path, cmd: &mut Command) -> io::Result<Child> {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
    let ns = File::open(netns)?;
    let ns_fd = ns.as_raw_fd();
    // SAFETY: the closure only makes async-signal-safe system calls (open, write, close,
    // setns, prctl) on memory prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    drop(ns);
    child
}

/// A process started in a pod; killed (by its PID) when dropped.
#[derive(Debug)]
pub struct PodProcess {
    /// The running process.
    pub child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<BufReader<ChildStdout>>,
}

impl PodProcess {
    /// Starts `program args..` in the pod, with piped stdin/stdout (stderr inherited).
    pub fn start(netns: &Path, cgroup: &Path, program: &Path, args: &[String]) -> io::Result<Self> {
        Self::start_with_stderr(netns, cgroup, program, args, Stdio::inherit())
    }

    /// [`start`](Self::start), with stderr going to `stderr` (a log file, say).
    pub fn start_with_stderr(
        netns: &Path,
        cgroup: &Path,
        program: &Path,
        args: &[String],
        stderr: Stdio,
    ) -> io::Result<Self> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = spawn_in(netns, cgroup, &mut cmd)?;
        Ok(Self {
            stdin: child.stdin.take(),
            stdout: child.stdout.take().map(BufReader::new),
            child,
        })
    }

    /// The process's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads one line of stdout (without the newline); `None` at EOF.
    pub fn read_line(&mut self) -> io::Result<Option<String>> {
        let mut l = String::new();
        let out = self
            .stdout
            .as_mut()
            .ok_or_else(|| io::Error::other("stdout already taken"))?;
        if out.read_line(&mut l)? == 0 {
            return Ok(None);
        }
        Ok(Some(l.trim_end().to_owned()))
    }

    /// Reads stdout lines until one equals `want`; errors at EOF.
    pub fn wait_for_line(&mut self, want: &str) -> io::Result<()> {
        loop {
            match self.read_line()? {
                Some(l) if l == want => return Ok(()),
                Some(_) => continue,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("exited before printing {want:?}"),
                    ));
                }
            }
        }
    }

    /// Writes `line` and a newline to stdin, and flushes it.
    pub fn write_line(&mut self, line: &str) -> io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("stdin closed"))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()
    }

    /// Waits for exit (bounded by `timeout`, then kills) and returns status and all stdout.
    pub fn finish(mut self, timeout: Duration) -> io::Result<(ExitStatus, Vec<String>)> {
        drop(self.stdin.take());
        let mut lines = Vec::new();
        let mut out = self.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut l = String::new();
            while out.read_line(&mut l).map(|n| n > 0).unwrap_or(false) {
                all.push(l.trim_end().to_owned());
                l.clear();
            }
            all
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("pid {} did not exit in {timeout:?}", self.pid()),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        lines.extend(reader.join().unwrap_or_default());
        Ok((status, lines))
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
