//! The file source: the mesh described in one YAML file (see `examples/mesh.yaml` and
//! the README), re-read when it changes.
//!
//! A file that does not parse or does not validate is rejected with an error naming the
//! file, the place (line and column for syntax and type errors, a path such as
//! `workloads[2] (shop/web-0).ips[1]` for the rest) and the problem; whoever serves the
//! model keeps serving the last good one.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::model::{
    Action, Cidr, DestinationMatch, Labels, MeshSpec, Model, NamespaceSpec, NodeSpec, PolicySpec,
    Problem, Rule, ServicePort, ServiceSpec, SourceMatch, WorkloadSpec,
};

/// Why a mesh file was rejected.
#[derive(Debug)]
pub enum FileError {
    Read {
        file: PathBuf,
        error: std::io::Error,
    },
    /// YAML syntax or a field of the wrong type, unknown or missing.
    Parse {
        file: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        error: String,
    },
    /// It parsed, but does not describe a valid mesh.
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileError::Read { file, error } => {
                write!(f, "{}: cannot read: {error}", file.display())
            }
            FileError::Parse {
                file,
                line,
                column,
                error,
            } => match (line, column) {
                (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {error}", file.display()),
                _ => write!(f, "{}: {error}", file.display()),
            },
            FileError::Invalid { file, problems } => {
                write!(f, "{}: {} problem(s):", file.display(), problems.len())?;
                for p in problems {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for FileError {}

/// Reads and validates a mesh file.
pub fn load(path: &Path) -> Result<Model, FileError> {
    let text = std::fs::read_to_string(path).map_err(|error| FileError::Read {
        file: path.to_owned(),
        error,
    })?;
    parse(path, &text)
}

/// Parses and validates mesh YAML (`path` only names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<Model, FileError> {
    let file: MeshFile = serde_yaml_ng::from_str(text).map_err(|e| {
        let loc = e.location();
        FileError::Parse {
            file: path.to_owned(),
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
            // The location is already in front; serde_yaml_ng repeats it at the end.
            error: strip_location(&e.to_string()),
        }
    })?;
    Model::build(file.into_spec()).map_err(|problems| FileError::Invalid {
        file: path.to_owned(),
        problems,
    })
}

fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// Serves the model of `path`: the current one now, each new valid version when the file
/// changes. Invalid versions are logged (and counted in `rejected`) and skipped.
pub struct FileSource {
    pub models: watch::Receiver<std::sync::Arc<Model>>,
    pub errors: watch::Receiver<Option<String>>,
}

impl FileSource {
    /// Loads `path` (which must be valid at start) and watches it: the file is re-read
    /// when its modification time, size or inode changes, checked every `poll`. Polling
    /// also sees atomic renames and Kubernetes ConfigMap symlink swaps.
    pub fn start(path: PathBuf, poll: Duration) -> Result<Self, FileError> {
        // Stamp before loading: a change that lands in between is then seen and re-read,
        // never missed.
        let mut last = stamp(&path);
        let model = std::sync::Arc::new(load(&path)?);
        info!(file = %path.display(), workloads = model.workloads.len(), services = model.services.len(), "mesh loaded");
        let (tx, models) = watch::channel(model);
        let (err_tx, errors) = watch::channel(None);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = stamp(&path);
                if now == last {
                    continue;
                }
                last = now;
                match load(&path) {
                    Ok(m) => {
                        let _ = err_tx.send(None);
                        if **tx.borrow() != m {
                            info!(file = %path.display(), workloads = m.workloads.len(), "mesh reloaded");
                            if tx.send(std::sync::Arc::new(m)).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        // One self-contained log line per problem, each naming the file.
                        match &e {
                            FileError::Invalid { file, problems } => {
                                for p in problems {
                                    warn!(
                                        "rejected mesh file change, keeping the last good model: {}: {p}",
                                        file.display()
                                    );
                                }
                            }
                            other => warn!(
                                "rejected mesh file change, keeping the last good model: {other}"
                            ),
                        }
                        let _ = err_tx.send(Some(e.to_string()));
                    }
                }
            }
        });
        Ok(Self { models, errors })
    }
}

/// What tells us the file changed.
fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

// ---- The file format. Field names are the YAML's (camelCase); unknown fields are errors.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MeshFile {
    #[serde(default = "default_trust_domain")]
    trust_domain: String,
    #[serde(default)]
    namespaces: Vec<NamespaceFile>,
    #[serde(default)]
    nodes: Vec<NodeFile>,
    #[serde(default)]
    workloads: Vec<WorkloadFile>,
    #[serde(default)]
    services: Vec<ServiceFile>,
    #[serde(default)]
    policies: Vec<PolicyFile>,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceFile {
    name: String,
    #[serde(default)]
    labels: Labels,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WorkloadFile {
    #[serde(default)]
    uid: Option<String>,
    name: String,
    namespace: String,
    node: String,
    #[serde(default)]
    service_account: Option<String>,
    ips: Vec<IpAddr>,
    #[serde(default)]
    labels: Labels,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceFile {
    name: String,
    namespace: String,
    vips: Vec<IpAddr>,
    ports: Vec<PortFile>,
    #[serde(default)]
    selector: Labels,
    #[serde(default)]
    labels: Labels,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortFile {
    #[serde(default)]
    name: Option<String>,
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    name: String,
    namespace: String,
    #[serde(default)]
    selector: Option<Labels>,
    action: ActionFile,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum ActionFile {
    Allow,
    Deny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    from: Vec<SourceFile>,
    #[serde(default)]
    to: Vec<DestinationFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SourceFile {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<CidrFile>,
    #[serde(default)]
    not_ip_blocks: Vec<CidrFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DestinationFile {
    #[serde(default)]
    ports: Vec<u16>,
    #[serde(default)]
    not_ports: Vec<u16>,
}

/// A CIDR, checked while parsing so a bad one gets a line and column.
struct CidrFile(Cidr);

impl<'de> Deserialize<'de> for CidrFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(CidrFile).map_err(serde::de::Error::custom)
    }
}

impl MeshFile {
    fn into_spec(self) -> MeshSpec {
        let cidrs = |v: Vec<CidrFile>| v.into_iter().map(|c| c.0).collect();
        MeshSpec {
            trust_domain: self.trust_domain,
            namespaces: self
                .namespaces
                .into_iter()
                .map(|n| NamespaceSpec {
                    name: n.name,
                    labels: n.labels,
                })
                .collect(),
            nodes: self
                .nodes
                .into_iter()
                .map(|n| NodeSpec { name: n.name })
                .collect(),
            workloads: self
                .workloads
                .into_iter()
                .map(|w| WorkloadSpec {
                    uid: w.uid,
                    name: w.name,
                    namespace: w.namespace,
                    node: w.node,
                    service_account: w.service_account,
                    ips: w.ips,
                    labels: w.labels,
                })
                .collect(),
            services: self
                .services
                .into_iter()
                .map(|s| ServiceSpec {
                    name: s.name,
                    namespace: s.namespace,
                    vips: s.vips,
                    ports: s
                        .ports
                        .into_iter()
                        .map(|p| ServicePort {
                            name: p.name,
                            port: p.port,
                            target_port: p.target_port.unwrap_or(p.port),
                        })
                        .collect(),
                    selector: s.selector,
                    labels: s.labels,
                })
                .collect(),
            policies: self
                .policies
                .into_iter()
                .map(|p| PolicySpec {
                    name: p.name,
                    namespace: p.namespace,
                    selector: p.selector,
                    action: match p.action {
                        ActionFile::Allow => Action::Allow,
                        ActionFile::Deny => Action::Deny,
                    },
                    rules: p
                        .rules
                        .into_iter()
                        .map(|r| Rule {
                            from: r
                                .from
                                .into_iter()
                                .map(|s| SourceMatch {
                                    principals: s.principals,
                                    not_principals: s.not_principals,
                                    namespaces: s.namespaces,
                                    not_namespaces: s.not_namespaces,
                                    ip_blocks: cidrs(s.ip_blocks),
                                    not_ip_blocks: cidrs(s.not_ip_blocks),
                                })
                                .collect(),
                            to: r
                                .to
                                .into_iter()
                                .map(|d| DestinationMatch {
                                    ports: d.ports,
                                    not_ports: d.not_ports,
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../examples/mesh.yaml");

    #[test]
    fn the_example_is_valid() {
        let m = parse(Path::new("examples/mesh.yaml"), EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
        assert!(m.workloads.values().any(|w| w.enrolled));
        assert!(m.workloads.values().any(|w| !w.enrolled));
        assert!(!m.policies.is_empty());
    }

    fn err(yaml: &str) -> String {
        parse(Path::new("mesh.yaml"), yaml).unwrap_err().to_string()
    }

    #[test]
    fn syntax_errors_name_file_line_and_column() {
        let e = err("namespaces:\n  - name: shop\n   labels: {]\n");
        assert!(e.starts_with("mesh.yaml:3:"), "{e}");
    }

    #[test]
    fn unknown_fields_are_errors_with_a_position() {
        let e = err("namespaces:\n  - name: shop\n    lables: {}\n");
        assert!(
            e.starts_with("mesh.yaml:3:5: namespaces[0]: unknown field `lables`"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_errors_with_a_position() {
        let e = err("policies:\n  - name: p\n    namespace: a\n    action: MAYBE\n");
        assert!(e.contains("mesh.yaml:4:") && e.contains("MAYBE"), "{e}");
        let e = err(
            "policies:\n  - name: p\n    namespace: a\n    action: ALLOW\n    rules:\n      - from:\n          - ipBlocks: [10.0.0.0/99]\n",
        );
        assert!(
            e.contains("mesh.yaml:7:") && e.contains("bad prefix length"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn reloads_valid_changes_and_keeps_the_last_good_model_on_bad_ones() {
        let dir = std::env::temp_dir().join(format!("ambit-cp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mesh.yaml");
        let v1 = "namespaces: [{name: a}]\nnodes: [{name: n1}]\n";
        std::fs::write(&path, v1).unwrap();
        let mut src = FileSource::start(path.clone(), Duration::from_millis(10)).unwrap();
        assert!(src.models.borrow().workloads.is_empty());

        // Write through a rename, as editors and ConfigMap updates do.
        let write = |text: &str| {
            let tmp = dir.join("mesh.yaml.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        write(
            "namespaces: [{name: a}]\nnodes: [{name: n1}]\nworkloads: [{name: w, namespace: a, node: n9, ips: [10.0.0.1]}]\n",
        );
        tokio::time::timeout(Duration::from_secs(5), src.errors.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap();
        let e = src.errors.borrow().clone().unwrap();
        assert!(
            e.contains("mesh.yaml") && e.contains("workloads[0] (a/w): node \"n9\" is not defined"),
            "{e}"
        );
        assert!(
            src.models.borrow().workloads.is_empty(),
            "a bad file replaced the model"
        );

        write(
            "namespaces: [{name: a}]\nnodes: [{name: n1}]\nworkloads: [{name: w, namespace: a, node: n1, ips: [10.0.0.1]}]\n",
        );
        tokio::time::timeout(Duration::from_secs(5), src.models.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(src.models.borrow().workloads.len(), 1);
        assert!(src.errors.borrow().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn semantic_errors_name_the_place() {
        let e = err(
            "nodes: [{name: n1}]\nworkloads:\n  - {name: w, namespace: ghost, node: n1, ips: [10.0.0.1]}\n",
        );
        assert!(e.contains("mesh.yaml: 1 problem(s):\n  workloads[0] (ghost/w): namespace \"ghost\" is not defined under namespaces"), "{e}");
    }
}
