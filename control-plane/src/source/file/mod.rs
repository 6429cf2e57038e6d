//! The file source: the mesh described in one YAML file (see `examples/mesh.yaml` and
//! the README), re-read when it changes.
//!
//! A file that does not parse or does not validate is rejected with an error naming the
//! file, the place (line and column for syntax and type errors, a path such as
//! `workloads[2] (shop/web-0).ips[1]` for the rest) and the problem; whoever serves the
//! model keeps serving the last good one.
//!
//! - this module: the format, read into a [`MeshSpec`] and built into a [`Model`];
//! - [`watch`]: following the file, never reading it half-written;
//! - [`derive`]: each new version's model derived from the last one when only
//!   workloads changed (the common case), instead of built again.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod derive;
mod reparse;
mod watch;

use crate::model::authz::{
    ConditionSpec, L7Action, L7RuleSpec, OperationSpec, SourceSpec, TargetRefSpec,
    WaypointPolicySpec,
};
use crate::model::{
    Action, Cidr, Destination, HttpRouteSpec, Labels, MeshSpec, Model, NamespaceSpec, NodeSpec,
    PolicySpec, PrincipalPattern, Problem, Rule, ServicePort, ServiceSpec, Source, WaypointSpec,
    WorkloadSpec,
};
pub use derive::Derived;
pub use reparse::{Reading, Reparser, Workloads};
pub use watch::{FileSource, Watch};

/// Why a mesh file was rejected.
#[derive(Debug)]
pub enum FileError {
    /// It could not be read.
    Read {
        /// The mesh file.
        file: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// YAML syntax or a field of the wrong type, unknown or missing.
    Parse {
        /// The mesh file.
        file: PathBuf,
        /// Line of the error (1-based), if known.
        line: Option<usize>,
        /// Column of the error (1-based), if known.
        column: Option<usize>,
        /// The parser's message, without its location.
        error: String,
    },
    /// It parsed, but does not describe a valid mesh.
    Invalid {
        /// The mesh file.
        file: PathBuf,
        /// Every problem found, each with its place.
        problems: Vec<Problem>,
    },
    /// It is empty (or only whitespace): most likely caught between truncation and
    /// write, and never taken to mean "nothing".
    Empty {
        /// The mesh file.
        file: PathBuf,
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
            FileError::Empty { file } => write!(
                f,
                "{}: the file is empty; refusing it (a mesh with nothing in it says so, e.g. `namespaces: []`)",
                file.display()
            ),
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
    parse(path, &read(path)?)
}

/// The text of a mesh file.
fn read(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|error| FileError::Read {
        file: path.to_owned(),
        error,
    })
}

/// Parses and validates mesh YAML (`path` only names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<Model, FileError> {
    Model::build(parse_spec(path, text)?).map_err(invalid(path))
}

/// `path` refused for these problems.
fn invalid(path: &Path) -> impl FnOnce(Vec<Problem>) -> FileError + '_ {
    move |problems| FileError::Invalid {
        file: path.to_owned(),
        problems,
    }
}

/// Parses mesh YAML into the mesh it declares, checked field by field but not yet as a
/// whole (that is [`Model::build`]).
pub fn parse_spec(path: &Path, text: &str) -> Result<MeshSpec, FileError> {
    parse_file(path, text)?.into_spec().map_err(invalid(path))
}

/// `text` read into the file format (not yet checked as a mesh).
fn parse_file(path: &Path, text: &str) -> Result<MeshFile, FileError> {
    if text.trim().is_empty() {
        return Err(FileError::Empty {
            file: path.to_owned(),
        });
    }
    serde_yaml_ng::from_str(text).map_err(|e| {
        let loc = e.location();
        FileError::Parse {
            file: path.to_owned(),
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
            // The location is already in front; serde_yaml_ng repeats it at the end.
            error: strip_location(&e.to_string()),
        }
    })
}

fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

// ---- The file format. Field names are the YAML's (camelCase); unknown fields are errors.

#[derive(Clone, Deserialize)]
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
    #[serde(default)]
    waypoints: Vec<WaypointFile>,
    #[serde(default)]
    http_routes: Vec<HttpRouteSpec>,
    #[serde(default)]
    destination_rules: Vec<crate::model::traffic::DestinationRuleSpec>,
    #[serde(default)]
    request_authentications: Vec<crate::model::authn::RequestAuthenticationSpec>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaypointFile {
    name: String,
    namespace: String,
    #[serde(default)]
    vips: Vec<IpAddr>,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceFile {
    name: String,
    #[serde(default)]
    labels: Labels,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    name: String,
}

#[derive(Clone, Deserialize)]
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

#[derive(Clone, Deserialize)]
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

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortFile {
    #[serde(default)]
    name: Option<String>,
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
    #[serde(default)]
    app_protocol: Option<String>,
}

/// An authorization policy: enforced by node agents (L4) when it has a `selector` or
/// nothing, by waypoints (L7) when it has `targetRefs`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PolicyFile {
    name: String,
    namespace: String,
    #[serde(default)]
    selector: Option<Labels>,
    #[serde(default)]
    target_refs: Vec<TargetRefFile>,
    action: ActionFile,
    #[serde(default)]
    rules: Vec<RuleFile>,
    /// With `action: RATE_LIMIT`.
    #[serde(default)]
    connection_rate_limit: Option<ConnectionRateFile>,
}

/// `connectionRateLimit`: new connections per source identity.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConnectionRateFile {
    connections: u32,
    unit: String,
    #[serde(default)]
    burst: Option<u32>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetRefFile {
    #[serde(default)]
    group: String,
    kind: String,
    name: String,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum ActionFile {
    Allow,
    Deny,
    Audit,
    #[serde(rename = "RATE_LIMIT")]
    RateLimit,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    from: Vec<SourceFile>,
    #[serde(default)]
    to: Vec<DestinationFile>,
    #[serde(default)]
    when: Vec<ConditionFile>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConditionFile {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SourceFile {
    #[serde(default)]
    principals: Vec<PrincipalFile>,
    #[serde(default)]
    not_principals: Vec<PrincipalFile>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<CidrFile>,
    #[serde(default)]
    not_ip_blocks: Vec<CidrFile>,
    #[serde(default)]
    request_principals: Vec<String>,
    #[serde(default)]
    not_request_principals: Vec<String>,
    #[serde(default)]
    remote_ip_blocks: Vec<CidrFile>,
    #[serde(default)]
    not_remote_ip_blocks: Vec<CidrFile>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DestinationFile {
    #[serde(default)]
    ports: Vec<u16>,
    #[serde(default)]
    not_ports: Vec<u16>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    not_hosts: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    not_paths: Vec<String>,
}

impl RuleFile {
    /// The L7 attributes it uses (which only a waypoint can see).
    fn l7_fields(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut note = |used: bool, name: &'static str| {
            if used && !out.contains(&name) {
                out.push(name);
            }
        };
        for s in &self.from {
            note(!s.request_principals.is_empty(), "requestPrincipals");
            note(!s.not_request_principals.is_empty(), "notRequestPrincipals");
            note(!s.remote_ip_blocks.is_empty(), "remoteIpBlocks");
            note(!s.not_remote_ip_blocks.is_empty(), "notRemoteIpBlocks");
        }
        for d in &self.to {
            note(!d.hosts.is_empty(), "hosts");
            note(!d.not_hosts.is_empty(), "notHosts");
            note(!d.methods.is_empty(), "methods");
            note(!d.not_methods.is_empty(), "notMethods");
            note(!d.paths.is_empty(), "paths");
            note(!d.not_paths.is_empty(), "notPaths");
        }
        note(!self.when.is_empty(), "when");
        out
    }
}

/// A principal pattern, checked while parsing so a bad one gets a line and column.
#[derive(Clone)]
struct PrincipalFile(PrincipalPattern);

impl<'de> Deserialize<'de> for PrincipalFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PrincipalPattern::parse(&s)
            .map(PrincipalFile)
            .map_err(serde::de::Error::custom)
    }
}

/// A CIDR, checked while parsing so a bad one gets a line and column.
#[derive(Clone)]
struct CidrFile(Cidr);

impl<'de> Deserialize<'de> for CidrFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(CidrFile).map_err(serde::de::Error::custom)
    }
}

impl From<WorkloadFile> for WorkloadSpec {
    fn from(w: WorkloadFile) -> Self {
        WorkloadSpec {
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            node: w.node,
            service_account: w.service_account,
            ips: w.ips,
            labels: w.labels,
            terminating: false,
        }
    }
}

impl MeshFile {
    fn into_spec(self) -> Result<MeshSpec, Vec<Problem>> {
        let (policies, waypoint_policies) = split_policies(self.policies)?;
        Ok(MeshSpec {
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
            workloads: self.workloads.into_iter().map(WorkloadSpec::from).collect(),
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
                            app_protocol: p.app_protocol,
                        })
                        .collect(),
                    selector: s.selector,
                    endpoints: None,
                    labels: s.labels,
                })
                .collect(),
            policies,
            waypoint_policies,
            waypoints: self
                .waypoints
                .into_iter()
                .map(|w| WaypointSpec {
                    name: w.name,
                    namespace: w.namespace,
                    vips: w.vips,
                })
                .collect(),
            http_routes: self.http_routes,
            destination_rules: self.destination_rules,
            request_authentications: self.request_authentications,
            service_accounts: None,
        })
    }
}

/// The node agents' policies and the waypoints' (those with `targetRefs`). A policy
/// without `targetRefs` that uses L7 attributes or AUDIT is refused: no node agent can
/// enforce it, and half-enforcing it would surprise.
fn split_policies(
    files: Vec<PolicyFile>,
) -> Result<(Vec<PolicySpec>, Vec<WaypointPolicySpec>), Vec<Problem>> {
    let cidrs = |v: Vec<CidrFile>| v.into_iter().map(|c| c.0).collect();
    let principals = |v: Vec<PrincipalFile>| v.into_iter().map(|p| p.0).collect();
    let strings = |v: Vec<CidrFile>| v.into_iter().map(|c| c.0.to_string()).collect();
    let mut problems = Vec::new();
    let (mut l4, mut l7) = (Vec::new(), Vec::new());
    for (i, p) in files.into_iter().enumerate() {
        let place = format!("policies[{i}] ({}/{})", p.namespace, p.name);
        if p.connection_rate_limit.is_some() != matches!(p.action, ActionFile::RateLimit) {
            problems.push(Problem {
                place: place.clone(),
                problem: "connectionRateLimit goes with action: RATE_LIMIT, and only there".into(),
            });
            continue;
        }
        if !p.target_refs.is_empty() {
            if matches!(p.action, ActionFile::RateLimit) {
                problems.push(Problem {
                    place: place.clone(),
                    problem: "RATE_LIMIT is enforced by node agents, by selector: for requests, give an HTTPRoute rule a rateLimit".into(),
                });
                continue;
            }
            if p.selector.is_some() {
                problems.push(Problem {
                    place: place.clone(),
                    problem: "selector and targetRefs exclude each other".into(),
                });
                continue;
            }
            l7.push(WaypointPolicySpec {
                name: p.name,
                namespace: p.namespace,
                target_refs: p
                    .target_refs
                    .into_iter()
                    .map(|t| TargetRefSpec {
                        group: t.group,
                        kind: t.kind,
                        name: t.name,
                    })
                    .collect(),
                action: Some(match p.action {
                    ActionFile::Allow => L7Action::Allow,
                    ActionFile::Deny => L7Action::Deny,
                    ActionFile::Audit => L7Action::Audit,
                    ActionFile::RateLimit => unreachable!("refused above"),
                }),
                rules: p
                    .rules
                    .into_iter()
                    .map(|r| L7RuleSpec {
                        from: r
                            .from
                            .into_iter()
                            .map(|s| SourceSpec {
                                principals: s.principals.iter().map(|p| p.0.to_string()).collect(),
                                not_principals: s
                                    .not_principals
                                    .iter()
                                    .map(|p| p.0.to_string())
                                    .collect(),
                                request_principals: s.request_principals,
                                not_request_principals: s.not_request_principals,
                                namespaces: s.namespaces,
                                not_namespaces: s.not_namespaces,
                                ip_blocks: strings(s.ip_blocks),
                                not_ip_blocks: strings(s.not_ip_blocks),
                                remote_ip_blocks: strings(s.remote_ip_blocks),
                                not_remote_ip_blocks: strings(s.not_remote_ip_blocks),
                            })
                            .collect(),
                        to: r
                            .to
                            .into_iter()
                            .map(|d| OperationSpec {
                                hosts: d.hosts,
                                not_hosts: d.not_hosts,
                                ports: d.ports.iter().map(u16::to_string).collect(),
                                not_ports: d.not_ports.iter().map(u16::to_string).collect(),
                                methods: d.methods,
                                not_methods: d.not_methods,
                                paths: d.paths,
                                not_paths: d.not_paths,
                            })
                            .collect(),
                        when: r
                            .when
                            .into_iter()
                            .map(|c| ConditionSpec {
                                key: c.key,
                                values: c.values,
                                not_values: c.not_values,
                            })
                            .collect(),
                    })
                    .collect(),
            });
            continue;
        }
        let action = match p.action {
            ActionFile::Allow => Action::Allow,
            ActionFile::Deny => Action::Deny,
            ActionFile::RateLimit => {
                let r = p.connection_rate_limit.as_ref().expect("checked above");
                match ambit_policy::ConnectionRate::new(r.connections, &r.unit, r.burst) {
                    Ok(rate) => Action::RateLimit(rate),
                    Err(e) => {
                        let at = match e {
                            ambit_policy::RateError::Unit(_) => ".unit",
                            ambit_policy::RateError::Zero => "",
                        };
                        problems.push(Problem {
                            place: format!("{place}.connectionRateLimit{at}"),
                            problem: e.to_string(),
                        });
                        continue;
                    }
                }
            }
            ActionFile::Audit => {
                problems.push(Problem {
                    place,
                    problem: "AUDIT needs targetRefs: waypoints audit requests, node agents do not"
                        .into(),
                });
                continue;
            }
        };
        let mut rules = Vec::new();
        for (r, rule) in p.rules.into_iter().enumerate() {
            let l7 = rule.l7_fields();
            if !l7.is_empty() {
                problems.push(Problem {
                    place: format!("{place}.rules[{r}]"),
                    problem: format!(
                        "uses L7 attributes ({}), which node agents cannot see: set targetRefs to the service (kind: Service) or its waypoint (kind: Gateway, group: gateway.networking.k8s.io) so that its waypoint enforces it",
                        l7.join(", ")
                    ),
                });
                continue;
            }
            rules.push(Rule {
                from: rule
                    .from
                    .into_iter()
                    .map(|s| Source {
                        principals: principals(s.principals),
                        not_principals: principals(s.not_principals),
                        namespaces: s.namespaces,
                        not_namespaces: s.not_namespaces,
                        ip_blocks: cidrs(s.ip_blocks),
                        not_ip_blocks: cidrs(s.not_ip_blocks),
                    })
                    .collect(),
                to: rule
                    .to
                    .into_iter()
                    .map(|d| Destination {
                        ports: d.ports,
                        not_ports: d.not_ports,
                    })
                    .collect(),
            });
        }
        l4.push(PolicySpec {
            name: p.name,
            namespace: p.namespace,
            selector: p.selector,
            action,
            rules,
        });
    }
    if problems.is_empty() {
        Ok((l4, l7))
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../../examples/mesh.yaml");

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
    fn connection_rate_limits_are_checked() {
        let base = "namespaces: [{name: shop}]\nnodes: [{name: n}]\nworkloads: [{name: db, namespace: shop, node: n, ips: [10.244.0.5], labels: {app: db}}]\npolicies:\n  - {name: r, namespace: shop, selector: {app: db}, ";
        let ok = parse(
            Path::new("mesh.yaml"),
            &format!("{base}action: RATE_LIMIT, connectionRateLimit: {{connections: 5, unit: Second, burst: 10}}}}\n"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            ok.policies.values().next().unwrap().action,
            Action::RateLimit(ambit_policy::ConnectionRate {
                connections: 5,
                per_seconds: 1,
                burst: 10
            })
        );
        for (tail, want) in [
            (
                "action: RATE_LIMIT}",
                "connectionRateLimit goes with action: RATE_LIMIT",
            ),
            (
                "action: ALLOW, connectionRateLimit: {connections: 5, unit: Second}}",
                "connectionRateLimit goes with action: RATE_LIMIT",
            ),
            (
                "action: RATE_LIMIT, connectionRateLimit: {connections: 5, unit: Day}}",
                "connectionRateLimit.unit: \"Day\" is not Second, Minute or Hour",
            ),
            (
                "action: RATE_LIMIT, connectionRateLimit: {connections: 0, unit: Second}}",
                "connections and burst must be at least 1",
            ),
        ] {
            let e = err(&format!("{base}{tail}\n"));
            assert!(e.contains(want), "{tail}: {e}");
        }
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

    #[test]
    fn semantic_errors_name_the_place() {
        let e = err(
            "nodes: [{name: n1}]\nworkloads:\n  - {name: w, namespace: ghost, node: n1, ips: [10.0.0.1]}\n",
        );
        assert!(e.contains("mesh.yaml: 1 problem(s):\n  workloads[0] (ghost/w): namespace \"ghost\" is not defined under namespaces"), "{e}");
    }
}
