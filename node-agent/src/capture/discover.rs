//! Finding pods that run already: a pod the control plane says is enrolled on this node,
//! but which no CNI call announced (it started before Ambit was installed, or while the
//! plugin was not in the chain), is found through its cgroup.
//!
//! The kubelet names each pod's cgroup after the pod's UID: `pod<uid>` with the cgroupfs
//! driver (`kubepods/besteffort/pod<uid>`), `kubepods-<qos>-pod<uid>.slice` with the
//! systemd driver, which writes the UID's `-` as `_`. Any process in the pod's subtree
//! (the sandbox's pause process, a container's) is in the pod's network namespace; the
//! namespace is then named by a stable path when the runtime bind-mounted one under
//! `/var/run/netns` (containerd, CRI-O), else by the process's `/proc/<pid>/ns/net`.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How deep under the pod cgroup a pod's cgroup can be (`kubepods.slice/`
/// `kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`).
const MAX_DEPTH: usize = 3;

/// The pod UID a kubelet cgroup directory name carries, if it is a pod's.
pub fn pod_uid(dir_name: &str) -> Option<String> {
    if let Some(rest) = dir_name.strip_suffix(".slice") {
        // systemd: kubepods-pod<uid>.slice, kubepods-besteffort-pod<uid>.slice.
        let uid = &rest[rest.rfind("-pod")? + 4..];
        return (!uid.is_empty()).then(|| uid.replace('_', "-"));
    }
    let uid = dir_name.strip_prefix("pod")?;
    (!uid.is_empty()).then(|| uid.to_owned())
}

/// Every pod cgroup under `root`, by pod UID.
pub fn pod_cgroups(root: &Path) -> HashMap<String, PathBuf> {
    let mut found = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(uid) = pod_uid(name) {
                found.insert(uid, e.path());
            } else if depth + 1 < MAX_DEPTH {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    found
}

/// A process in the cgroup subtree at `dir`, if there is one.
pub fn any_pid(dir: &Path) -> Option<u32> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs"))
            && let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok())
        {
            return Some(pid);
        }
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    None
}

/// Directories where container runtimes bind-mount pods' network namespaces.
pub const NETNS_DIRS: [&str; 2] = ["/var/run/netns", "/run/netns"];

/// A path naming the network namespace of `pid`: its bind mount in one of `netns_dirs`
/// if there is one (it outlives the process), else `/proc/<pid>/ns/net`.
pub fn netns_path(pid: u32, netns_dirs: &[&str]) -> std::io::Result<String> {
    let proc_path = format!("/proc/{pid}/ns/net");
    let target = std::fs::metadata(&proc_path)?;
    for dir in netns_dirs {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Ok(m) = std::fs::metadata(e.path())
                && m.dev() == target.dev()
                && m.ino() == target.ino()
            {
                return Ok(e.path().display().to_string());
            }
        }
    }
    Ok(proc_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uids_come_from_both_kubelet_cgroup_drivers_names() {
        let uid = "0f7c4b2e-1d2a-4c59-9a1e-3b2d7c8e9f10";
        let systemd = format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"));
        assert_eq!(pod_uid(&systemd).as_deref(), Some(uid));
        let guaranteed = format!("kubepods-pod{}.slice", uid.replace('-', "_"));
        assert_eq!(pod_uid(&guaranteed).as_deref(), Some(uid));
        assert_eq!(pod_uid(&format!("pod{uid}")).as_deref(), Some(uid));
        for not_a_pod in [
            "kubepods-besteffort.slice",
            "kubepods.slice",
            "besteffort",
            "pod",
            "cri-containerd-abc.scope",
            "kubepods-pod.slice",
        ] {
            assert_eq!(pod_uid(not_a_pod), None, "{not_a_pod}");
        }
    }

    #[test]
    fn pod_cgroups_are_found_under_qos_levels_and_processes_in_containers() {
        let root = std::env::temp_dir().join(format!("ambit-discover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let pod = root.join("kubepods-besteffort.slice/kubepods-besteffort-poda_b.slice");
        let container = pod.join("cri-containerd-1.scope");
        std::fs::create_dir_all(&container).unwrap();
        std::fs::create_dir_all(root.join("kubepods-podc.slice")).unwrap();
        std::fs::create_dir_all(root.join("burstable/podd")).unwrap();
        std::fs::write(container.join("cgroup.procs"), "4242\n").unwrap();
        let found = pod_cgroups(&root);
        let mut uids: Vec<&str> = found.keys().map(String::as_str).collect();
        uids.sort();
        assert_eq!(uids, ["a-b", "c", "d"]);
        assert_eq!(any_pid(&found["a-b"]), Some(4242));
        assert_eq!(any_pid(&found["c"]), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_processs_netns_is_named_by_its_bind_mount_if_it_has_one() {
        let me = std::process::id();
        // No bind mount of our namespace in an empty directory: the /proc path.
        let empty = std::env::temp_dir().join(format!("ambit-netns-{me}"));
        std::fs::create_dir_all(&empty).unwrap();
        let p = netns_path(me, &[empty.to_str().unwrap()]).unwrap();
        assert_eq!(p, format!("/proc/{me}/ns/net"));
        // A directory holding (a path to) the same namespace: found by device and inode.
        let p = netns_path(me, &["/proc/self/ns"]).unwrap();
        assert!(p.starts_with("/proc/self/ns/"), "{p}");
        std::fs::remove_dir_all(&empty).unwrap();
    }
}
