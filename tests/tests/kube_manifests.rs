//! The Kubernetes manifests (`deploy/`): they render with `kubectl kustomize`, every
//! flag they pass exists in the binary it is passed to, the names that tie the parts
//! together agree (service and server name, ServiceAccounts, Secret and ConfigMap, token
//! audience), and the examples are valid, accepted policies.
//!
//! No API server runs here, so nothing is applied; `kube_source` and `kube_security`
//! test the behaviour against the stand-in.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use ambit_control_plane::auth::kubernetes::AUDIENCE;
use ambit_control_plane::source::kubernetes::policy::{
    AuthorizationPolicy, PeerAuthentication, RequestAuthentication, Verdict, authorization,
    peer_authentication, request_authentication,
};
use ambit_tests::workspace_bin;
use serde::Deserialize;
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `kubectl kustomize deploy/`, as YAML.
fn kustomize() -> String {
    kustomize_dir(&deploy())
}

/// `kubectl kustomize <dir>`, as YAML.
fn kustomize_dir(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl (the machine image ships it)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn rendered() -> Vec<Value> {
    docs(&kustomize())
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The long flags `<bin> <subcommand> --help` lists (`sub` empty: a binary without
/// subcommands).
fn flags_of(bin: &str, sub: &str) -> BTreeSet<String> {
    let out = Command::new(workspace_bin(bin))
        .args([sub, "--help"].into_iter().filter(|a| !a.is_empty()))
        .output()
        .unwrap_or_else(|e| panic!("{bin}: {e}"));
    assert!(out.status.success(), "{bin} {sub} --help");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|f| {
            f.trim_end_matches([',', '>'])
                .split(['=', ' '])
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// Every container of our images in `objects`, as (binary, arguments).
fn ambit_containers(objects: &[Value]) -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    for o in objects {
        let spec = &o["spec"]["template"]["spec"];
        let all = [&spec["initContainers"], &spec["containers"]];
        for c in all.into_iter().filter_map(Value::as_array).flatten() {
            let image = c["image"].as_str().unwrap_or_default();
            let strings = |v: &Value| -> Vec<String> {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| s.as_str().unwrap().to_owned())
                    .collect()
            };
            let (command, args) = (strings(&c["command"]), strings(&c["args"]));
            let mut argv: Vec<String> = command.into_iter().chain(args).collect();
            let bin = if image.starts_with("ambit/control-plane") {
                "ambit-control-plane".to_owned()
            } else if image.starts_with("ambit/waypoint") {
                // No subcommands: an empty one stands for it.
                argv.insert(0, String::new());
                "ambit-waypoint".to_owned()
            } else if image.starts_with("ambit/agent") {
                match argv.first() {
                    Some(c) if c.starts_with('/') => Path::new(&argv.remove(0))
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                    _ => "ambit-agent".to_owned(),
                }
            } else {
                continue;
            };
            found.push((bin, argv));
        }
    }
    found
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("--{name}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix))
}

#[test]
fn kube_manifests_render_and_pass_only_flags_the_binaries_have() {
    let objects = rendered();
    let kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    for k in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
        "DaemonSet",
    ] {
        assert!(kinds.contains(k), "no {k} in {kinds:?}");
    }
    let cleanup = docs(&std::fs::read_to_string(deploy().join("uninstall/cleanup.yaml")).unwrap());
    let containers: Vec<_> = ambit_containers(&objects)
        .into_iter()
        .chain(ambit_containers(&cleanup))
        .collect();
    assert_eq!(
        containers.len(),
        5,
        "control plane, agent, install-cni, 2 cleanup"
    );
    for (bin, args) in &containers {
        let sub = args.first().expect("a subcommand");
        let known = flags_of(bin, sub);
        for a in &args[1..] {
            let name = a
                .strip_prefix("--")
                .unwrap_or_else(|| panic!("{bin} {sub}: {a:?} is not a flag"))
                .split('=')
                .next()
                .unwrap();
            assert!(
                known.contains(name),
                "{bin} {sub} has no --{name} (it has {known:?})"
            );
        }
        assert!(
            !args.iter().any(|a| a.contains("insecure-plaintext")),
            "no manifest serves plaintext"
        );
    }

    // The names that tie the parts together.
    let (_, cp) = containers
        .iter()
        .find(|(b, _)| b == "ambit-control-plane")
        .unwrap();
    let (_, agent) = containers
        .iter()
        .find(|(b, a)| b == "ambit-agent" && a[0] == "run")
        .unwrap();
    let service = find(&objects, "Service", "ambit-control-plane");
    let ns = service["metadata"]["namespace"].as_str().unwrap();
    let xds = flag(agent, "xds-address").unwrap();
    assert_eq!(
        xds,
        format!("https://ambit-control-plane.{ns}.svc:15012"),
        "the agents dial the Service over TLS"
    );
    let server_names = flags_of("ambit-control-plane", "run");
    assert!(server_names.contains("server-name"));
    assert!(
        !cp.iter().any(|a| a.starts_with("--server-name")),
        "the default server names are the Service's"
    );
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == 15012)
    );
    let ds = find(&objects, "DaemonSet", "ambit-agent");
    let pod = &ds["spec"]["template"]["spec"];
    let agent_sa = format!("{ns}/{}", pod["serviceAccountName"].as_str().unwrap());
    assert_eq!(flag(cp, "agent-service-account"), Some(agent_sa.as_str()));
    let volumes = pod["volumes"].as_array().unwrap();
    let volume = |name: &str| volumes.iter().find(|v| v["name"] == name).unwrap();
    let token = &volume("token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], AUDIENCE);
    assert_eq!(
        flag(agent, "node-credential-file"),
        Some(format!("/var/run/secrets/ambit/{}", token["path"].as_str().unwrap()).as_str())
    );
    let root_cm = flag(cp, "root-cert-configmap").unwrap();
    assert_eq!(volume("root-cert")["configMap"]["name"], root_cm);
    assert_eq!(
        flag(agent, "xds-root-cert"),
        Some(
            format!(
                "/etc/ambit/root/{}",
                ambit_control_plane::ca::secret::ROOT_CERT_KEY
            )
            .as_str()
        )
    );
    // The control plane may touch exactly its Secret and ConfigMap by name.
    let role = find(&objects, "Role", "ambit-control-plane");
    let named: BTreeSet<&str> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["resourceNames"].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let secret = flag(cp, "ca-secret").unwrap();
    assert_eq!(named, BTreeSet::from([secret, root_cm]));
    assert_eq!(flag(cp, "authenticate"), Some("kubernetes"));
}

/// `kubernetes-validate --strict` (Kubernetes' own OpenAPI schemas, unknown fields
/// refused) on `file`.
fn validate(file: &Path) {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.32.0"])
        .arg(file)
        .output()
        .expect("kubernetes-validate: `cargo xtask test` installs it (pip install kubernetes-validate==1.37.*)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{}: {text}", file.display());
    assert!(!text.contains("ERROR"), "{}: {text}", file.display());
}

#[test]
fn kube_manifests_are_valid_against_the_kubernetes_1_32_schemas() {
    let dir = std::env::temp_dir().join(format!("ambit-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = kustomize();
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, &yaml).unwrap();
    validate(&file);
    validate(&deploy().join("uninstall/cleanup.yaml"));
    validate(&deploy().join("examples/shop.yaml"));
    // The waypoint template's Kubernetes objects (its Gateway API ones have no schema
    // here: `kube_waypoint_template_…` checks them with the control plane's own reader).
    let waypoint = dir.join("waypoint.yaml");
    std::fs::write(&waypoint, kustomize_dir(&deploy().join("waypoint"))).unwrap();
    validate(&waypoint);
    // The check is real: a misspelt field fails it.
    let broken = yaml.replacen("serviceAccountName:", "serviceAcountName:", 1);
    std::fs::write(&file, broken).unwrap();
    let status = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.32.0"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!status.status.success(), "a misspelt field passed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kube_example_policies_are_valid_and_accepted() {
    let yaml = std::fs::read_to_string(deploy().join("examples/policies.yaml")).unwrap();
    let mut seen = 0;
    for doc in docs(&yaml) {
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        let verdict = match doc["kind"].as_str().unwrap() {
            "AuthorizationPolicy" => {
                let ap: AuthorizationPolicy = serde_json::from_value(doc).expect(&name);
                let ns = ap.metadata.namespace.clone().unwrap();
                authorization(&ns, &name, &ap.spec).1
            }
            "PeerAuthentication" => {
                let pa: PeerAuthentication = serde_json::from_value(doc).expect(&name);
                peer_authentication(&pa.spec).1
            }
            "RequestAuthentication" => {
                let ra: RequestAuthentication = serde_json::from_value(doc).expect(&name);
                let ns = ra.metadata.namespace.clone().unwrap();
                request_authentication(&ns, &name, &ra.spec).1
            }
            k => panic!("unexpected {k}"),
        };
        // A waypoint's objects are checked against their targets when the model is
        // built (in the cluster: reviews and its waypoint).
        if !matches!(&verdict, Verdict::Partly("AppliedByWaypoint", _)) {
            assert_eq!(verdict, Verdict::Accepted, "{name}");
        }
        seen += 1;
    }
    assert_eq!(seen, 7);
}

#[test]
fn kube_waypoint_template_is_a_waypoint_the_control_plane_accepts_and_its_parts_agree() {
    use ambit_control_plane::source::kubernetes::gateway::{self, GatewayView};
    let objects = docs(&kustomize_dir(&deploy().join("waypoint")));
    let class = find(&objects, "GatewayClass", gateway::WAYPOINT_CLASS);
    assert_eq!(class["spec"]["controllerName"], gateway::GATEWAY_CONTROLLER);
    let gw = find(&objects, "Gateway", "waypoint");
    let dynamic: kube::api::DynamicObject = serde_json::from_value(gw.clone()).unwrap();
    let GatewayView::Waypoint(view) = gateway::gateway(&dynamic) else {
        panic!("not of the waypoint class: {gw}")
    };
    assert_eq!(view.verdict, Verdict::Accepted, "{gw}");
    // The Service and the pods carry the Gateway's name; the container says it too.
    let label = ambit_control_plane::model::GATEWAY_NAME_LABEL;
    let svc = find(&objects, "Service", "waypoint");
    assert_eq!(svc["spec"]["selector"][label], "waypoint");
    let deployment = find(&objects, "Deployment", "waypoint");
    let pod = &deployment["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"][label], "waypoint");
    let containers = ambit_containers(&objects);
    assert_eq!(containers.len(), 1);
    let (bin, args) = &containers[0];
    let known = flags_of(bin, "");
    for a in &args[1..] {
        let name = a.trim_start_matches("--").split('=').next().unwrap();
        assert!(
            known.contains(name),
            "{bin} has no --{name} (it has {known:?})"
        );
    }
    assert_eq!(flag(args, "name"), Some("waypoint"));
    // Its certificate by its own token, verified against the root its namespace gets
    // from the control plane; the same control plane the agents dial.
    let spec = &pod["spec"];
    let volumes = spec["volumes"].as_array().unwrap();
    let volume = |name: &str| volumes.iter().find(|v| v["name"] == name).unwrap();
    let token = &volume("token")["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(token["audience"], AUDIENCE);
    assert_eq!(
        flag(args, "ca-credential-file"),
        Some(format!("/var/run/secrets/ambit/{}", token["path"].as_str().unwrap()).as_str())
    );
    let base = rendered();
    let base_containers = ambit_containers(&base);
    let (_, cp) = base_containers
        .iter()
        .find(|(b, _)| b == "ambit-control-plane")
        .unwrap();
    let (_, agent) = base_containers
        .iter()
        .find(|(b, a)| b == "ambit-agent" && a[0] == "run")
        .unwrap();
    assert_eq!(
        volume("root-cert")["configMap"]["name"],
        flag(cp, "root-cert-configmap").unwrap()
    );
    assert_eq!(flag(args, "xds-address"), flag(agent, "xds-address"));
    // Nothing from the host: the pod passes the `restricted` Pod Security Standard.
    assert!(volumes.iter().all(|v| v.get("hostPath").is_none()));
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(spec["serviceAccountName"], "waypoint");
}

#[test]
fn kube_example_routes_are_mesh_routes_the_control_plane_reads_whole() {
    use ambit_control_plane::source::kubernetes::gateway;
    let yaml = std::fs::read_to_string(deploy().join("examples/routes.yaml")).unwrap();
    let mut seen = 0;
    for doc in docs(&yaml) {
        let o: kube::api::DynamicObject = serde_json::from_value(doc).unwrap();
        let name = o.metadata.name.clone().unwrap();
        let view = gateway::route(&o, None).unwrap_or_else(|| panic!("{name}: no Service parent"));
        assert_eq!(view.policy.verdict, Verdict::Accepted, "{name}");
        assert!(view.policy.converted.is_some(), "{name}");
        seen += 1;
    }
    assert_eq!(seen, 2);
}

/// The control plane's ClusterRole grants what its Kubernetes source needs: `list` and
/// `watch` on every kind it can watch, `patch` on the status of the kinds it writes.
#[test]
fn kube_control_plane_rbac_grants_every_kind_the_source_watches() {
    use ambit_control_plane::source::kubernetes::Kind;
    let objects = rendered();
    let role = find(&objects, "ClusterRole", "ambit-control-plane");
    let grants = |group: &str, resource: &str, verb: &str| {
        role["rules"].as_array().unwrap().iter().any(|r| {
            let has = |k: &str, v: &str| {
                r[k].as_array()
                    .is_some_and(|a| a.iter().any(|x| x == v || x == "*"))
            };
            has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
        })
    };
    for kind in Kind::ALL {
        let (resource, group) = kind.plural().split_once('.').unwrap_or((kind.plural(), ""));
        for verb in ["list", "watch"] {
            assert!(
                grants(group, resource, verb),
                "the ClusterRole does not grant {verb} on {}",
                kind.plural()
            );
        }
        if kind.writes_status() {
            assert!(
                grants(group, &format!("{resource}/status"), "patch"),
                "the ClusterRole does not grant patch on {}/status",
                kind.plural()
            );
        }
    }
    // The check is real: a resource it does not list fails it.
    assert!(!grants("ambit.dev", "widgets", "list"));
}
