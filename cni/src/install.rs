//! Installing the plugin on a node: what the agent DaemonSet's init container (and,
//! with `--watch`, a long-running container beside the agent) does with this same
//! binary.
//!
//! - The binary is copied into the CNI binary directory (atomically: a temporary file,
//!   then a rename, so a runtime never executes half a file).
//! - Ambit's entry is appended to the node's primary network configuration: the file a
//!   runtime picks, the lexically first `*.conflist`, `*.conf` or `*.json` in the
//!   configuration directory. A single-plugin `.conf` becomes a `.conflist` of the same
//!   name, holding that plugin and then ours. Installing again changes nothing.
//! - The primary CNI may rewrite its file (many do on restart): [`ensure`] puts the entry
//!   back and `--watch` runs it every poll.
//! - [`uninstall`] takes the entry out again and removes the binary.

use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

/// The plugin type runtimes look up in the binary directory.
pub const PLUGIN_TYPE: &str = "ambit-cni";

/// Where and what to install.
#[derive(Clone, Debug)]
pub struct Install {
    /// The CNI binary directory (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The CNI configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// Ambit's entry's `enrollSocket` and `stateDir`.
    pub enroll_socket: PathBuf,
    /// See above.
    pub state_dir: PathBuf,
}

/// What [`ensure`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The entry was added to (or updated in) this file.
    Added(PathBuf),
    /// The file already held the entry as it should be.
    Unchanged(PathBuf),
    /// There is no primary configuration yet (the primary CNI has not written it).
    NoPrimary,
}

/// Copies `binary` into the binary directory as [`PLUGIN_TYPE`].
pub fn copy_binary(binary: &Path, bin_dir: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(bin_dir)?;
    let dst = bin_dir.join(PLUGIN_TYPE);
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    std::fs::copy(binary, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &dst)?;
    Ok(dst)
}

/// The configuration file a runtime would use: the lexically first with a CNI
/// extension.
pub fn primary(conf_dir: &Path) -> io::Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(conf_dir) {
        Ok(d) => d
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("conflist" | "conf" | "json")
                    )
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    files.sort();
    Ok(files.into_iter().next())
}

fn invalid(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {why}", path.display()),
    )
}

fn entry(install: &Install) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "enrollSocket": install.enroll_socket,
        "stateDir": install.state_dir,
    })
}

/// Reads a configuration file as a plugin list (a `.conf` is one plugin).
fn read_list(path: &Path) -> io::Result<Map<String, Value>> {
    let text = std::fs::read(path)?;
    let mut conf: Map<String, Value> =
        serde_json::from_slice(&text).map_err(|e| invalid(path, e))?;
    if !conf.contains_key("plugins") {
        // A single plugin: the list keeps its name and version.
        let mut list = Map::new();
        for key in ["cniVersion", "name"] {
            if let Some(v) = conf.get(key) {
                list.insert(key.into(), v.clone());
            }
        }
        conf.remove("name");
        list.insert("plugins".into(), Value::Array(vec![Value::Object(conf)]));
        conf = list;
    }
    if !conf["plugins"].is_array() {
        return Err(invalid(path, "\"plugins\" is not a list"));
    }
    Ok(conf)
}

fn write_atomically(path: &Path, value: &Value) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // Not a CNI extension, so no runtime reads it half-written.
    let tmp = dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    let mut text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    text.push(b'\n');
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Makes the primary configuration end with Ambit's entry (idempotent).
pub fn ensure(install: &Install) -> io::Result<Outcome> {
    let Some(path) = primary(&install.conf_dir)? else {
        return Ok(Outcome::NoPrimary);
    };
    let mut conf = read_list(&path)?;
    let plugins = conf["plugins"]
        .as_array_mut()
        .expect("checked by read_list");
    let want = entry(install);
    let ours = |p: &Value| p["type"] == PLUGIN_TYPE;
    if plugins.last() == Some(&want) && plugins.iter().filter(|p| ours(p)).count() == 1 {
        return Ok(Outcome::Unchanged(path));
    }
    plugins.retain(|p| !ours(p));
    plugins.push(want);
    let target = if path.extension().is_some_and(|e| e == "conflist") {
        path.clone()
    } else {
        path.with_extension("conflist")
    };
    write_atomically(&target, &Value::Object(conf))?;
    if target != path {
        std::fs::remove_file(&path)?;
    }
    Ok(Outcome::Added(target))
}

/// Takes Ambit's entry out of every configuration file and removes the binary.
pub fn uninstall(install: &Install) -> io::Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    if let Ok(dir) = std::fs::read_dir(&install.conf_dir) {
        for path in dir.filter_map(|e| e.ok().map(|e| e.path())) {
            if path.extension().is_none_or(|e| e != "conflist") {
                continue;
            }
            let Ok(mut conf) = read_list(&path) else {
                continue; // not ours to judge
            };
            let plugins = conf["plugins"]
                .as_array_mut()
                .expect("checked by read_list");
            let before = plugins.len();
            plugins.retain(|p| p["type"] != PLUGIN_TYPE);
            if plugins.len() != before {
                write_atomically(&path, &Value::Object(conf))?;
                changed.push(path);
            }
        }
    }
    match std::fs::remove_file(install.bin_dir.join(PLUGIN_TYPE)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use rscni_plugin::types::NetConfList;

    use super::*;

    struct Dirs(PathBuf);
    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn setup(name: &str) -> (Dirs, Install) {
        let root = std::env::temp_dir().join(format!("ambit-cni-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("net.d")).unwrap();
        let install = Install {
            bin_dir: root.join("bin"),
            conf_dir: root.join("net.d"),
            enroll_socket: "/var/run/ambit/enroll.sock".into(),
            state_dir: "/var/run/ambit".into(),
        };
        (Dirs(root), install)
    }

    const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[
        {"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.244.1.0/24"}},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    fn types(path: &Path) -> Vec<String> {
        // Read back as a runtime's library would.
        let list: NetConfList = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        list.plugins.iter().map(|p| p.r#type.clone()).collect()
    }

    #[test]
    fn the_entry_goes_last_into_the_first_conflist_once() {
        let (_d, i) = setup("conflist");
        std::fs::write(i.conf_dir.join("10-bridge.conflist"), BRIDGE).unwrap();
        std::fs::write(i.conf_dir.join("99-other.conflist"), BRIDGE).unwrap();
        let p = i.conf_dir.join("10-bridge.conflist");
        assert_eq!(ensure(&i).unwrap(), Outcome::Added(p.clone()));
        assert_eq!(types(&p), ["bridge", "portmap", "ambit-cni"]);
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(ensure(&i).unwrap(), Outcome::Unchanged(p.clone()));
        assert_eq!(
            std::fs::read(&p).unwrap(),
            bytes,
            "a second install rewrote the file"
        );
        assert_eq!(
            types(&i.conf_dir.join("99-other.conflist")),
            ["bridge", "portmap"]
        );
    }

    #[test]
    fn a_rewrite_by_the_primary_cni_is_undone_and_uninstall_restores_it() {
        let (_d, i) = setup("rewrite");
        let p = i.conf_dir.join("10-bridge.conflist");
        std::fs::write(&p, BRIDGE).unwrap();
        ensure(&i).unwrap();
        std::fs::write(&p, BRIDGE).unwrap(); // the primary CNI restarts
        assert_eq!(ensure(&i).unwrap(), Outcome::Added(p.clone()));
        assert_eq!(types(&p), ["bridge", "portmap", "ambit-cni"]);
        assert_eq!(uninstall(&i).unwrap(), std::slice::from_ref(&p));
        assert_eq!(types(&p), ["bridge", "portmap"]);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist_of_the_same_name() {
        let (_d, i) = setup("conf");
        std::fs::write(
            i.conf_dir.join("10-flannel.conf"),
            r#"{"cniVersion":"0.4.0","name":"cbr0","type":"flannel","delegate":{"isDefaultGateway":true}}"#,
        )
        .unwrap();
        let list = i.conf_dir.join("10-flannel.conflist");
        assert_eq!(ensure(&i).unwrap(), Outcome::Added(list.clone()));
        assert!(!i.conf_dir.join("10-flannel.conf").exists());
        assert_eq!(types(&list), ["flannel", "ambit-cni"]);
        let conf: Value = serde_json::from_slice(&std::fs::read(&list).unwrap()).unwrap();
        assert_eq!(
            (conf["name"].as_str(), conf["cniVersion"].as_str()),
            (Some("cbr0"), Some("0.4.0"))
        );
        assert_eq!(conf["plugins"][0]["delegate"]["isDefaultGateway"], true);
    }

    #[test]
    fn no_primary_yet_and_bad_files_are_reported_not_clobbered() {
        let (_d, i) = setup("none");
        assert_eq!(ensure(&i).unwrap(), Outcome::NoPrimary);
        std::fs::write(i.conf_dir.join("10-x.conflist"), "{not json").unwrap();
        let e = ensure(&i).unwrap_err();
        assert!(e.to_string().contains("10-x.conflist"), "{e}");
        assert_eq!(
            std::fs::read_to_string(i.conf_dir.join("10-x.conflist")).unwrap(),
            "{not json"
        );
    }

    #[test]
    fn the_binary_is_copied_executable_and_removed_on_uninstall() {
        use std::os::unix::fs::PermissionsExt;
        let (_d, i) = setup("bin");
        let me = std::env::current_exe().unwrap();
        let dst = copy_binary(&me, &i.bin_dir).unwrap();
        assert_eq!(
            std::fs::metadata(&dst).unwrap().permissions().mode() & 0o777,
            0o755
        );
        uninstall(&i).unwrap();
        assert!(!dst.exists());
    }
}
