//! Which cgroup the capture programs attach to, and keeping the agent out of it.
//!
//! The programs capture every TCP connect made from a cgroup under the pod cgroup in an
//! enrolled netns, so the agent's own sockets (which it creates inside pods' network
//! namespaces) must come from a cgroup outside it, or the agent would capture itself.
//! On a kubelet node the pod cgroup is `kubepods.slice` (systemd cgroup driver) or
//! `kubepods` (cgroupfs driver), and the agent's own DaemonSet pod is under it: the agent
//! moves itself out first with `--own-cgroup`.

use std::io;
use std::path::{Path, PathBuf};

/// Where the kubelet keeps pods, by cgroup driver, relative to the cgroup-v2 mount.
pub const KUBELET_POD_CGROUPS: [&str; 2] = ["kubepods.slice", "kubepods"];

/// Why the agent will not attach.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No `--pod-cgroup` and no kubelet pod cgroup.
    #[error(
        "no --pod-cgroup given, and no kubelet pod cgroup under {root} (looked for {KUBELET_POD_CGROUPS:?}): pass --pod-cgroup"
    )]
    NoPodCgroup {
        /// The cgroup-v2 mount.
        root: PathBuf,
    },
    /// The agent runs inside the pod cgroup.
    #[error(
        "the agent runs in {own}, inside the pod cgroup {pods}: it would capture its own connections. Run it in a cgroup of its own (--own-cgroup moves it)"
    )]
    Inside {
        /// The agent's cgroup.
        own: PathBuf,
        /// The pod cgroup.
        pods: PathBuf,
    },
    /// Reading or moving cgroups failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
}

/// The pod cgroup: `given`, else the kubelet's under `root` (the cgroup-v2 mount).
pub fn pod_cgroup(given: Option<&Path>, root: &Path) -> Result<PathBuf, CgroupError> {
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    KUBELET_POD_CGROUPS
        .iter()
        .map(|c| root.join(c))
        .find(|p| p.is_dir())
        .ok_or_else(|| CgroupError::NoPodCgroup {
            root: root.to_owned(),
        })
}

/// The cgroup-v2 path in `/proc/<pid>/cgroup` (`0::/a/b`), under `root`.
pub fn own_cgroup(proc_cgroup: &str, root: &Path) -> Option<PathBuf> {
    let path = proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim();
    Some(root.join(path.trim_start_matches('/')))
}

/// Fails if `own` is `pods` or below it.
pub fn check_outside(own: &Path, pods: &Path) -> Result<(), CgroupError> {
    if own.starts_with(pods) {
        return Err(CgroupError::Inside {
            own: own.to_owned(),
            pods: pods.to_owned(),
        });
    }
    Ok(())
}

/// Enters the cgroup namespace at `path` (this thread, and the threads it creates from
/// now on).
pub fn enter_cgroupns(path: &Path) -> Result<(), CgroupError> {
    let err = |source| CgroupError::Io {
        what: format!("entering the cgroup namespace {}", path.display()),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    // SAFETY: setns on an open namespace fd; it changes only this thread's namespace.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWCGROUP) } != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// Moves this process (all its threads) into `dir`, creating it.
pub fn move_self(dir: &Path) -> Result<(), CgroupError> {
    let io = |what: &str| {
        let what = format!("{what} {}", dir.display());
        move |source| CgroupError::Io { what, source }
    };
    std::fs::create_dir_all(dir).map_err(io("creating"))?;
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .map_err(io("moving the agent into"))
}

/// Decides the pod cgroup and makes sure the agent is outside it (moving it to `own` first
/// if given). `root` is the cgroup-v2 mount.
pub fn prepare(
    given: Option<&Path>,
    own: Option<&Path>,
    root: &Path,
) -> Result<PathBuf, CgroupError> {
    let pods = pod_cgroup(given, root)?;
    if let Some(dir) = own {
        move_self(dir)?;
    }
    let text = std::fs::read_to_string("/proc/self/cgroup").map_err(|source| CgroupError::Io {
        what: "reading /proc/self/cgroup".into(),
        source,
    })?;
    if let Some(me) = own_cgroup(&text, root) {
        check_outside(&me, &pods)?;
    }
    Ok(pods)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubelets_pod_cgroup_is_found_for_either_driver() {
        let root = std::env::temp_dir().join(format!("ambit-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        assert!(matches!(
            pod_cgroup(None, &root),
            Err(CgroupError::NoPodCgroup { .. })
        ));
        std::fs::create_dir_all(root.join("kubepods")).unwrap();
        assert_eq!(pod_cgroup(None, &root).unwrap(), root.join("kubepods"));
        std::fs::create_dir_all(root.join("kubepods.slice")).unwrap();
        assert_eq!(
            pod_cgroup(None, &root).unwrap(),
            root.join("kubepods.slice")
        );
        assert_eq!(
            pod_cgroup(Some(Path::new("/x")), &root).unwrap(),
            PathBuf::from("/x")
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_agent_inside_the_pod_cgroup_is_refused() {
        let root = Path::new("/sys/fs/cgroup");
        let own = own_cgroup(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-ab.scope\n",
            root,
        )
        .unwrap();
        let pods = root.join("kubepods.slice");
        let e = check_outside(&own, &pods).unwrap_err();
        assert!(e.to_string().contains("--own-cgroup"), "{e}");
        let out = own_cgroup("0::/system.slice/ambit-agent.scope", root).unwrap();
        check_outside(&out, &pods).unwrap();
        // A sibling whose name merely starts the same is outside.
        check_outside(&root.join("kubepods.slice-other"), &pods).unwrap();
        assert_eq!(own_cgroup("1:name=systemd:/x\n", root), None);
    }
}
