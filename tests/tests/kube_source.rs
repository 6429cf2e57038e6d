//! The control plane's Kubernetes source against the API server stand-in
//! (`ambit_tests::kube_api`), with kube-rs's real client and watcher; `kubectl` checks
//! the stand-in. Every test name starts with `kube` (`cargo xtask test -- kube`).

use std::sync::Arc;
use std::time::Duration;

use ambit_control_plane::model::Model;
use ambit_control_plane::source::kubernetes::{KubeSource, Options};
use ambit_tests::kube_api::ApiServer;
use serde_json::{Value, json};
use tokio::sync::watch;

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"), "labels": labels},
           "spec": {"nodeName": node, "serviceAccountName": name,
                    "containers": [{"name": "app", "image": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn service(ns: &str, name: &str, vip: &str, selector: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
           "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": selector,
                    "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
}

const ENROLLED: &str = "ambit.dev/dataplane";

/// A stand-in on loopback with a small cluster: namespaces `shop` (enrolled) and `lab`,
/// nodes `node-1`/`node-2`, pods `shop/web-0`, `shop/web-1`, `lab/job-0`, service
/// `shop/web`.
fn cluster() -> ApiServer {
    let api = ApiServer::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    api.apply(namespace("shop", json!({ENROLLED: "ambient"})));
    api.apply(namespace("lab", json!({})));
    api.apply(node("node-1"));
    api.apply(node("node-2"));
    api.apply(pod(
        "shop",
        "web-0",
        "node-1",
        "10.244.1.10",
        json!({"app": "web"}),
    ));
    api.apply(pod(
        "shop",
        "web-1",
        "node-2",
        "10.244.2.10",
        json!({"app": "web"}),
    ));
    api.apply(pod("lab", "job-0", "node-1", "10.244.1.11", json!({})));
    api.apply(service("shop", "web", "10.96.0.10", json!({"app": "web"})));
    for (ns, sa) in [("shop", "web-0"), ("shop", "web-1"), ("lab", "job-0")] {
        api.apply(ambit_tests::cluster::service_account(ns, sa));
    }
    api
}

/// `file` with the ServiceAccounts of `m` (a mesh file names none), after checking they
/// are the ones `cluster()` created plus `more`.
fn with_accounts(mut file: Model, m: &Model, more: &[(&str, &str)]) -> Model {
    let want: std::collections::BTreeSet<_> =
        [("shop", "web-0"), ("shop", "web-1"), ("lab", "job-0")]
            .iter()
            .chain(more)
            .map(|(ns, n)| ambit_control_plane::model::NamespacedName {
                namespace: ns.to_string(),
                name: n.to_string(),
            })
            .collect();
    assert_eq!(m.service_accounts.as_ref(), Some(&want));
    file.service_accounts = m.service_accounts.clone();
    file
}

async fn source(api: &ApiServer, hold: Duration) -> KubeSource {
    let dir = std::env::temp_dir().join(format!(
        "ambit-kube-{}-{}",
        std::process::id(),
        api.addr().port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    api.write_kubeconfig(&path).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    // Read: the directory is not needed any more (and would pile up in /tmp).
    std::fs::remove_dir_all(&dir).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    ambit_hbone::tls::install_default();
    let client = kube::Client::try_from(config).unwrap();
    let options = Options {
        trust_domain: "cluster.local".into(),
        hold,
        root_namespace: "ambit-system".into(),
        istio_policies: true,
        gateway_api: true,
    };
    tokio::time::timeout(Duration::from_secs(20), KubeSource::start(client, options))
        .await
        .expect("the source syncs")
}

/// Waits until the served model satisfies `ok`; panics with the last model after 10 s.
async fn until(
    models: &mut watch::Receiver<Arc<Model>>,
    what: &str,
    ok: impl Fn(&Model) -> bool,
) -> Arc<Model> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = models.borrow_and_update().clone();
        if ok(&m) {
            return m;
        }
        if tokio::time::timeout_at(deadline, models.changed())
            .await
            .is_err()
        {
            panic!("timed out waiting for: {what}; the model is {m:#?}");
        }
    }
}

fn enrolled(m: &Model) -> Vec<&str> {
    m.workloads
        .values()
        .filter(|w| w.enrolled)
        .map(|w| w.name.as_str())
        .collect()
}

#[tokio::test]
async fn kube_source_serves_the_clusters_mesh_and_follows_its_changes() {
    let api = cluster();
    let mut s = source(&api, Duration::ZERO).await;
    let m = s.models.borrow_and_update().clone();
    assert_eq!(enrolled(&m), ["web-0", "web-1"]);
    assert_eq!(m.nodes.len(), 2);
    let w = &m.workloads["uid-shop-web-0"];
    assert_eq!(
        w.identity.to_string(),
        "spiffe://cluster.local/ns/shop/sa/web-0"
    );
    assert_eq!(w.node, "node-1");
    let svc = m.services.values().next().unwrap();
    assert_eq!(svc.hostname, "web.shop.svc.cluster.local");
    assert_eq!(svc.ports[0].target_port, 8080, "named targetPort resolved");
    assert_eq!(svc.endpoints.len(), 2);
    assert_eq!(*s.errors.borrow(), None);

    // Label a namespace (a MODIFIED event): its pods are enrolled.
    api.apply(namespace("lab", json!({ENROLLED: "ambient"})));
    until(&mut s.models, "lab enrolled", |m| {
        enrolled(m).contains(&"job-0")
    })
    .await;
    // A pod opts out.
    api.apply(pod(
        "shop",
        "web-1",
        "node-2",
        "10.244.2.10",
        json!({"app": "web", ENROLLED: "none"}),
    ));
    until(&mut s.models, "web-1 opted out", |m| {
        !enrolled(m).contains(&"web-1")
    })
    .await;
    // Unlabel: released.
    api.apply(namespace("shop", json!({})));
    until(&mut s.models, "shop released", |m| enrolled(m) == ["job-0"]).await;
    // A pod without an IP yet is not in the mesh; it joins when it gets one.
    let mut pending = pod("lab", "job-1", "node-2", "10.244.2.11", json!({}));
    pending["status"] = json!({"phase": "Pending"});
    api.apply(pending);
    api.apply(pod("lab", "job-2", "node-2", "10.244.2.12", json!({})));
    let m = until(&mut s.models, "job-2 in", |m| {
        m.workloads.contains_key("uid-lab-job-2")
    })
    .await;
    assert!(!m.workloads.contains_key("uid-lab-job-1"));
    api.apply(pod("lab", "job-1", "node-2", "10.244.2.11", json!({})));
    until(&mut s.models, "job-1 in", |m| {
        m.workloads.contains_key("uid-lab-job-1")
    })
    .await;
    // Host-network pods are never part of the mesh.
    let mut host = pod("lab", "agent", "node-1", "172.18.0.1", json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    api.apply(host);
    // A terminating pod stays in the mesh but is no endpoint; a deleted one is gone.
    let mut leaving = pod(
        "shop",
        "web-0",
        "node-1",
        "10.244.1.10",
        json!({"app": "web"}),
    );
    leaving["metadata"]["deletionTimestamp"] = json!("2026-12-02T10:00:00Z");
    api.apply(leaving);
    let m = until(&mut s.models, "web-0 terminating", |m| {
        m.services.values().next().unwrap().endpoints.len() == 1
    })
    .await;
    assert!(m.workloads.contains_key("uid-shop-web-0"));
    assert!(!m.workloads.values().any(|w| w.name == "agent"));
    api.delete("Pod", "shop", "web-0");
    until(&mut s.models, "web-0 gone", |m| {
        !m.workloads.contains_key("uid-shop-web-0")
    })
    .await;
}

#[tokio::test]
async fn kube_source_converges_after_410_gone_dropped_watches_and_a_restart() {
    let mut api = cluster();
    let mut s = source(&api, Duration::from_secs(1)).await;
    let before = s.models.borrow_and_update().clone();

    // Dropped watches: the watchers resume from their resourceVersion; nothing is lost.
    api.drop_watches();
    api.apply(namespace("lab", json!({ENROLLED: "ambient"})));
    until(&mut s.models, "lab enrolled after a dropped watch", |m| {
        enrolled(m).contains(&"job-0")
    })
    .await;

    // 410 Gone: the log forgets, the watches are cut, and what changed meanwhile (a pod
    // deleted, another added) is found by listing again.
    api.compact();
    api.drop_watches();
    api.delete("Pod", "lab", "job-0");
    api.apply(pod("lab", "job-9", "node-2", "10.244.2.19", json!({})));
    api.compact();
    let m = until(&mut s.models, "re-listed after 410", |m| {
        m.workloads.contains_key("uid-lab-job-9") && !m.workloads.contains_key("uid-lab-job-0")
    })
    .await;
    assert_eq!(m.workloads.len(), 3);
    assert!(
        api.expired_watches() > 0,
        "the watchers resumed through 410 Gone"
    );

    // An API server restart: connections drop, the server is gone for a while (the last
    // good model stays served), and comes back with changes made meanwhile.
    let served = s.models.borrow().clone();
    api.stop();
    api.apply(pod("lab", "job-8", "node-1", "10.244.1.18", json!({})));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        *s.models.borrow().clone(),
        *served,
        "kept while the API server was down"
    );
    api.resume().unwrap();
    until(&mut s.models, "job-8 after the restart", |m| {
        m.workloads.contains_key("uid-lab-job-8")
    })
    .await;
    assert!(before.workloads.len() < s.models.borrow().workloads.len());
}

#[tokio::test]
async fn kube_source_reports_rbac_errors_and_serves_nothing_before_every_kind_is_listed() {
    let api = cluster();
    api.forbid("pods", true);
    let dir = std::env::temp_dir().join(format!("ambit-kube-rbac-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    ambit_hbone::tls::install_default();
    let client = kube::Client::try_from(config).unwrap();
    let start = KubeSource::start(
        client,
        Options {
            trust_domain: "cluster.local".into(),
            hold: Duration::ZERO,
            root_namespace: "ambit-system".into(),
            istio_policies: true,
            gateway_api: true,
        },
    );
    tokio::pin!(start);
    // While pods cannot be listed, the source does not come up with a mesh without pods.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), &mut start)
            .await
            .is_err(),
        "served a view without pods"
    );
    api.forbid("pods", false);
    let s = tokio::time::timeout(Duration::from_secs(30), start)
        .await
        .expect("syncs once allowed");
    assert_eq!(enrolled(&s.models.borrow()), ["web-0", "web-1"]);

    // Permission lost later: reported clearly, and the last good view stays served.
    let mut errors = s.errors.clone();
    api.forbid("services", true);
    api.drop_watches();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(e) = errors.borrow_and_update().as_deref() {
                assert!(
                    e.contains("refuses to let the control plane list/watch services")
                        && e.contains("cannot watch resource \"services\""),
                    "{e}"
                );
                return;
            }
            errors.changed().await.unwrap();
        }
    })
    .await
    .expect("the RBAC error is reported");
    assert_eq!(s.models.borrow().services.len(), 1);
}

#[tokio::test]
async fn kube_source_holds_a_relist_that_loses_most_of_the_mesh_until_the_hold_passes() {
    let mut api = cluster();
    let mut s = source(&api, Duration::from_millis(1500)).await;
    // While the API server is away every pod goes (say, an accident with a script); the
    // source learns it from one re-list, as one change.
    api.stop();
    for (ns, name) in [("shop", "web-0"), ("shop", "web-1"), ("lab", "job-0")] {
        api.delete("Pod", ns, name);
    }
    api.resume().unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while s.held.borrow_and_update().is_none() {
            s.held.changed().await.unwrap();
        }
    })
    .await
    .expect("the shrink is held");
    assert_eq!(
        s.models.borrow().workloads.len(),
        3,
        "still served meanwhile"
    );
    until(&mut s.models, "served after the hold", |m| {
        m.workloads.is_empty()
    })
    .await;
}

#[test]
fn kube_api_stand_in_answers_kubectl_get_and_watch() {
    let api = cluster();
    let dir = std::env::temp_dir().join(format!("ambit-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    /// Removes kubectl's home (its cache) when the test ends, passed or not.
    struct Remove<'a>(&'a std::path::Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    let _remove = Remove(&dir);
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let kubectl = |args: &[&str]| {
        let out = std::process::Command::new("kubectl")
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", &dir)
            .args(args)
            .output()
            .expect("kubectl (the machine image ships 1.32)");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let out = kubectl(&["get", "namespaces"]);
    assert!(out.contains("shop") && out.contains("lab"), "{out}");
    let out = kubectl(&["get", "pods", "-n", "shop", "-o", "json"]);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 2, "{out}");
    let out = kubectl(&[
        "get",
        "pod",
        "web-0",
        "-n",
        "shop",
        "-o",
        "jsonpath={.status.podIP}",
    ]);
    assert_eq!(out, "10.244.1.10");
    let out = kubectl(&["get", "pods", "-A", "-o", "name"]);
    assert_eq!(out.lines().count(), 3, "{out}");

    // A watch sees a change made after it started.
    let child = std::process::Command::new("kubectl")
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", &dir)
        .args([
            "get",
            "namespaces",
            "--watch",
            "-o",
            "name",
            "--request-timeout=20s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    api.apply(namespace("new-one", json!({})));
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on the PID of a child we started and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("namespace/new-one"),
        "kubectl --watch printed: {text}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ambit(kind: &str, ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "ambit.dev/v1alpha1", "kind": kind,
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

fn istio(kind: &str, ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": kind,
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// The mesh file describing what `cluster()` plus `policies` describe.
const CLUSTER_AS_A_MESH_FILE: &str = r#"
trustDomain: cluster.local
namespaces:
  - {name: lab, labels: {ambit.dev/mtls: PERMISSIVE}}
  - {name: shop, labels: {ambit.dev/dataplane: ambient, ambit.dev/mtls: STRICT}}
nodes: [{name: node-1}, {name: node-2}]
workloads:
  - {uid: uid-lab-job-0, name: job-0, namespace: lab, node: node-1, serviceAccount: job-0, ips: [10.244.1.11]}
  - {uid: uid-shop-canary-0, name: canary-0, namespace: shop, node: node-1, serviceAccount: canary-0,
     ips: [10.244.1.12], labels: {app: canary, ambit.dev/mtls: PERMISSIVE}}
  - {uid: uid-shop-web-0, name: web-0, namespace: shop, node: node-1, serviceAccount: web-0, ips: [10.244.1.10], labels: {app: web}}
  - {uid: uid-shop-web-1, name: web-1, namespace: shop, node: node-2, serviceAccount: web-1, ips: [10.244.2.10], labels: {app: web}}
services:
  - {name: web, namespace: shop, vips: [10.96.0.10], ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: web}}
policies:
  - name: no-admin-port
    namespace: shop
    action: DENY
    rules: [{to: [{ports: [9090]}]}]
  - name: no-legacy
    namespace: shop
    action: DENY
    rules: [{from: [{namespaces: [legacy], notIpBlocks: [10.244.0.0/16]}]}]
  - name: only-with-a-jwt
    namespace: shop
    selector: {app: canary}
    action: ALLOW
    rules: []
  - name: web-from-frontend
    namespace: shop
    selector: {app: web}
    action: ALLOW
    rules:
      - from: [{principals: [cluster.local/ns/shop/sa/frontend, "*/sa/monitor"]}]
        to: [{ports: [8080], notPorts: [8081]}]
"#;

/// The `Accepted` condition an object's status holds about its current spec, as
/// (status, reason, message).
fn accepted(api: &ApiServer, kind: &str, ns: &str, name: &str) -> Option<(String, String, String)> {
    let o = api.get(kind, ns, name)?;
    let c = o["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    if c["observedGeneration"] != o["metadata"]["generation"] {
        return None; // about an older spec
    }
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
    Some((s("status"), s("reason"), s("message")))
}

async fn until_accepted(
    api: &ApiServer,
    kind: &str,
    ns: &str,
    name: &str,
    ok: impl Fn(&(String, String, String)) -> bool,
) -> (String, String, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = accepted(api, kind, ns, name);
        if let Some(c) = c.as_ref().filter(|c| ok(c)) {
            return c.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{kind} {ns}/{name}: its status is {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn kube_policies_give_the_model_the_mesh_file_gives_and_bad_ones_are_refused_in_status() {
    let api = cluster();
    api.apply(pod(
        "shop",
        "canary-0",
        "node-1",
        "10.244.1.12",
        json!({"app": "canary"}),
    ));
    // Ambit's objects and Istio's, side by side, as a migration would have them.
    api.apply(ambit(
        "AuthorizationPolicy",
        "shop",
        "web-from-frontend",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
               "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend", "*/sa/monitor"]}}],
                          "to": [{"operation": {"ports": ["8080"], "notPorts": ["8081"]}}]}]}),
    ));
    api.apply(istio(
        "AuthorizationPolicy",
        "shop",
        "no-legacy",
        json!({"action": "DENY",
               "rules": [{"from": [{"source": {"namespaces": ["legacy"], "notIpBlocks": ["10.244.0.0/16"]}}]}]}),
    ));
    // L7 fields, failing closed: a DENY rule denies on its L4 part alone; an ALLOW rule
    // that needs a request principal matches nothing.
    api.apply(ambit(
        "AuthorizationPolicy",
        "shop",
        "no-admin-port",
        json!({"action": "DENY",
               "rules": [{"to": [{"operation": {"ports": ["9090"], "paths": ["/admin*"]}}]}]}),
    ));
    api.apply(istio(
        "AuthorizationPolicy",
        "shop",
        "only-with-a-jwt",
        json!({"selector": {"matchLabels": {"app": "canary"}},
               "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}),
    ));
    // PeerAuthentication: mesh-wide (the root namespace), per namespace, per workload.
    api.apply(ambit(
        "PeerAuthentication",
        "ambit-system",
        "default",
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    ));
    api.apply(istio(
        "PeerAuthentication",
        "shop",
        "strict",
        json!({"mtls": {"mode": "STRICT"}}),
    ));
    api.apply(ambit(
        "PeerAuthentication",
        "shop",
        "canary",
        json!({"selector": {"matchLabels": {"app": "canary"}}, "mtls": {"mode": "PERMISSIVE"}}),
    ));
    // A waypoint's policy (applied by the waypoint); refused: an unsupported action,
    // invalid values.
    api.apply(ambit(
        "AuthorizationPolicy",
        "shop",
        "at-the-waypoint",
        json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
               "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    ));
    api.apply(ambit(
        "AuthorizationPolicy",
        "shop",
        "audit",
        json!({"action": "AUDIT", "rules": [{}]}),
    ));
    api.apply(ambit(
        "AuthorizationPolicy",
        "shop",
        "bad-port",
        json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
    ));
    api.apply(ambit(
        "AuthorizationPolicy",
        "shop",
        "bad-cidr",
        json!({"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}),
    ));

    api.apply(ambit_tests::cluster::service_account("shop", "canary-0"));
    let s = source(&api, Duration::ZERO).await;
    let m = s.models.borrow().clone();
    let file = with_accounts(
        ambit_control_plane::source::file::parse("mesh.yaml".as_ref(), CLUSTER_AS_A_MESH_FILE)
            .expect("the mesh file is valid"),
        &m,
        &[("shop", "canary-0")],
    );
    assert_eq!(m.policies, file.policies);
    assert_eq!(m.namespaces, file.namespaces);
    assert_eq!(m.workloads, file.workloads);
    assert_eq!(*m, file, "the same model, so the same xDS");

    // What became of each Ambit object is in its status; Istio's objects are not
    // written to (Istio's own control plane may own their status).
    for (name, status, reason, says) in [
        ("web-from-frontend", "True", "Accepted", ""),
        ("no-admin-port", "True", "L7NeedsWaypoint", "paths"),
        // Its target has no waypoint here: nothing would enforce it.
        (
            "at-the-waypoint",
            "False",
            "NoWaypoint",
            "shop/web has no waypoint",
        ),
        ("audit", "False", "UnsupportedAction", "AUDIT"),
        ("bad-port", "False", "Invalid", "\"http\""),
        ("bad-cidr", "False", "Invalid", "10.0.0.0/33"),
    ] {
        let (st, r, msg) =
            until_accepted(&api, "AuthorizationPolicy", "shop", name, |_| true).await;
        assert_eq!((st.as_str(), r.as_str()), (status, reason), "{name}: {msg}");
        assert!(msg.contains(says), "{name}: {msg:?} should say {says:?}");
    }
    let (st, ..) = until_accepted(&api, "PeerAuthentication", "shop", "canary", |_| true).await;
    assert_eq!(st, "True");
    assert!(
        api.get(
            "security.istio.io/v1/AuthorizationPolicy",
            "shop",
            "no-legacy"
        )
        .unwrap()
        .get("status")
        .is_none()
    );
    // Written once each, not again for unrelated changes (nor for their own echoes).
    let writes = api.status_writes();
    assert_eq!(
        writes, 8,
        "six AuthorizationPolicies and two PeerAuthentications"
    );
    api.apply(namespace("lab", json!({ENROLLED: "ambient"})));
    let mut models = s.models.clone();
    until(&mut models, "lab enrolled", |m| {
        enrolled(m).contains(&"job-0")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(api.status_writes(), writes);

    // Fixing an object: it is applied and its condition follows its new generation.
    api.apply(ambit(
        "AuthorizationPolicy",
        "shop",
        "bad-port",
        json!({"rules": [{"to": [{"operation": {"ports": ["8443"]}}]}]}),
    ));
    until_accepted(&api, "AuthorizationPolicy", "shop", "bad-port", |c| {
        c.0 == "True"
    })
    .await;
    let m = until(&mut models, "bad-port applied", |m| {
        m.policies.keys().any(|k| k.name == "bad-port")
    })
    .await;
    assert_eq!(m.policies.len(), 5);
    // Breaking a working object (a `spiffe://` principal, which Istio's fields never
    // carry): refused in status, and its last valid version stays applied, so a typo
    // neither opens nor closes anything.
    let before = m.clone();
    api.apply(ambit(
        "AuthorizationPolicy",
        "shop",
        "web-from-frontend",
        json!({"selector": {"matchLabels": {"app": "web"}},
               "rules": [{"from": [{"source": {"principals": ["spiffe://cluster.local/ns/shop/sa/frontend"]}}]}]}),
    ));
    let (_, reason, msg) = until_accepted(
        &api,
        "AuthorizationPolicy",
        "shop",
        "web-from-frontend",
        |c| c.0 == "False",
    )
    .await;
    assert_eq!(reason, "Invalid", "{msg}");
    assert!(msg.contains("generation 1 stays applied"), "{msg}");
    assert_eq!(*s.models.borrow(), before);
    // Deleting it withdraws it.
    api.delete("AuthorizationPolicy", "shop", "web-from-frontend");
    let m = until(&mut models, "web-from-frontend withdrawn", |m| {
        m.policies.len() == 4
    })
    .await;
    let mut expected = before.policies.clone();
    expected.retain(|k, _| k.name != "web-from-frontend");
    assert_eq!(m.policies, expected);
}

fn gateway_api(kind: &str, ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// The HTTPRoute `shop/web` as the API server returns it (its defaults filled in).
fn web_route(extra_rule_field: Option<(&str, Value)>) -> Value {
    let mut api_rule = json!({
        "matches": [{"path": {"type": "PathPrefix", "value": "/api"},
                     "headers": [{"type": "Exact", "name": "x-canary", "value": "1"}]}],
        "filters": [{"type": "RequestHeaderModifier",
                     "requestHeaderModifier": {"set": [{"name": "x-via", "value": "waypoint"}]}}],
        "backendRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80, "weight": 1}],
        "timeouts": {"request": "2s"}
    });
    if let Some((k, v)) = extra_rule_field {
        api_rule[k] = v;
    }
    gateway_api(
        "HTTPRoute",
        "shop",
        "web",
        json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": [
                api_rule,
                {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                 "backendRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80, "weight": 1}],
                 "retry": {"attempts": 2, "codes": [503]}}
            ]
        }),
    )
}

/// What `cluster()` plus the waypoint and the route `shop/web` describe.
const WAYPOINT_AS_A_MESH_FILE: &str = r#"
trustDomain: cluster.local
namespaces:
  - {name: lab}
  - {name: shop, labels: {ambit.dev/dataplane: ambient}}
nodes: [{name: node-1}, {name: node-2}]
waypoints: [{name: wp, namespace: shop, vips: [10.96.0.99]}]
workloads:
  - {uid: uid-lab-job-0, name: job-0, namespace: lab, node: node-1, serviceAccount: job-0, ips: [10.244.1.11]}
  - {uid: uid-shop-web-0, name: web-0, namespace: shop, node: node-1, serviceAccount: web-0, ips: [10.244.1.10], labels: {app: web}}
  - {uid: uid-shop-web-1, name: web-1, namespace: shop, node: node-2, serviceAccount: web-1, ips: [10.244.2.10], labels: {app: web}}
  - {uid: uid-shop-wp-0, name: wp-0, namespace: shop, node: node-2, serviceAccount: wp, ips: [10.244.2.20],
     labels: {gateway.networking.k8s.io/gateway-name: wp}}
services:
  - {name: web, namespace: shop, vips: [10.96.0.10], ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: web},
     labels: {ambit.dev/waypoint: wp}}
httpRoutes:
  - name: web
    namespace: shop
    parentRefs: [{group: "", kind: Service, name: web, port: 80}]
    rules:
      - matches: [{path: {type: PathPrefix, value: /api}, headers: [{type: Exact, name: x-canary, value: "1"}]}]
        filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-via, value: waypoint}]}}]
        backendRefs: [{group: "", kind: Service, name: web, port: 80, weight: 1}]
        timeouts: {request: 2s}
      - matches: [{path: {type: PathPrefix, value: /}}]
        backendRefs: [{group: "", kind: Service, name: web, port: 80, weight: 1}]
        retry: {attempts: 2, codes: [503]}
"#;

/// A condition as (status, reason, message).
type Condition = (String, String, String);
/// One `status.parents[]` entry: its controllerName and its Accepted and ResolvedRefs.
type ParentStatus = (String, [Condition; 2]);

/// `status.parents[]` of an HTTPRoute, conditions about its current generation only.
fn route_parents(api: &ApiServer, name: &str) -> Vec<ParentStatus> {
    let Some(o) = api.get("HTTPRoute", "shop", name) else {
        return vec![];
    };
    let generation = o["metadata"]["generation"].clone();
    o["status"]["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let cond = |t: &str| {
                let c = p["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == t)?;
                if c["observedGeneration"] != generation || c["lastTransitionTime"].is_null() {
                    return None;
                }
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
                Some((s("status"), s("reason"), s("message")))
            };
            Some((
                p["controllerName"].as_str()?.to_owned(),
                [
                    cond("Accepted").unwrap_or_default(),
                    cond("ResolvedRefs").unwrap_or_default(),
                ],
            ))
        })
        .collect()
}

async fn until_route(
    api: &ApiServer,
    name: &str,
    ok: impl Fn(&[ParentStatus]) -> bool,
) -> Vec<ParentStatus> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = route_parents(api, name);
        if ok(&p) {
            return p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "HTTPRoute shop/{name}: its status.parents are {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The waypoint `shop/wp` as deploy/waypoint/ makes it (a Gateway of class
/// ambit-waypoint, its pod, labelled with its name, and a Service of its name), and the
/// service `shop/web` through it.
fn with_waypoint(api: &ApiServer) {
    api.apply(gateway_api(
        "Gateway",
        "shop",
        "wp",
        json!({"gatewayClassName": "ambit-waypoint",
               "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE",
                              "allowedRoutes": {"namespaces": {"from": "Same"}}}]}),
    ));
    let mut wp = pod(
        "shop",
        "wp-0",
        "node-2",
        "10.244.2.20",
        json!({"gateway.networking.k8s.io/gateway-name": "wp"}),
    );
    wp["spec"]["serviceAccountName"] = json!("wp");
    api.apply(wp);
    api.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "wp", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.99", "clusterIPs": ["10.96.0.99"],
                 "selector": {"gateway.networking.k8s.io/gateway-name": "wp"},
                 "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008}]}}));
    let mut web = service("shop", "web", "10.96.0.10", json!({"app": "web"}));
    web["metadata"]["labels"] = json!({"ambit.dev/waypoint": "wp"});
    api.apply(web);
}

#[tokio::test]
async fn kube_gateways_and_http_routes_give_the_model_the_mesh_file_gives_with_status() {
    const MESH: &str = "ambit.dev/mesh-controller";
    let api = cluster();
    with_waypoint(&api);
    api.apply(web_route(None));
    // Not Ambit's: another class's Gateway, and an ingress route (Gateway parents only).
    api.apply(gateway_api(
        "Gateway",
        "shop",
        "ingress",
        json!({"gatewayClassName": "other", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}),
    ));
    api.apply(gateway_api(
        "HTTPRoute",
        "shop",
        "from-outside",
        json!({"parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "ingress"}],
               "rules": [{"backendRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80, "weight": 1}]}]}),
    ));
    // Refused: a waypoint Gateway with an HTTP listener; a field Ambit does not
    // implement; a backend that does not exist.
    api.apply(gateway_api(
        "Gateway",
        "shop",
        "not-a-waypoint",
        json!({"gatewayClassName": "ambit-waypoint",
               "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}),
    ));
    let mut sticky = web_route(Some((
        "sessionPersistence",
        json!({"sessionName": "s", "type": "Cookie"}),
    )));
    sticky["metadata"]["name"] = json!("sticky");
    api.apply(sticky);
    let mut lost = web_route(None);
    lost["metadata"]["name"] = json!("lost");
    lost["spec"]["rules"][1]["backendRefs"][0]["name"] = json!("nowhere");
    api.apply(lost);
    // Both kinds of parent: the ingress controller's status entry stays as it is.
    let mut both = web_route(None);
    both["metadata"]["name"] = json!("both");
    both["spec"]["parentRefs"] = json!([
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "ingress"},
        {"group": "", "kind": "Service", "name": "web", "port": 80}
    ]);
    both["spec"]["rules"] = json!([both["spec"]["rules"][1].clone()]);
    api.apply(both);
    let theirs = json!({"parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "ingress"},
                        "controllerName": "example.com/ingress",
                        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                                        "lastTransitionTime": "2026-12-01T00:00:00Z"}]});
    api.patch_status(
        "HTTPRoute",
        "shop",
        "both",
        json!({"status": {"parents": [theirs.clone()]}}),
    )
    .unwrap();

    api.apply(ambit_tests::cluster::service_account("shop", "wp"));
    let s = source(&api, Duration::ZERO).await;
    let m = s.models.borrow().clone();
    let mut file = with_accounts(
        ambit_control_plane::source::file::parse("mesh.yaml".as_ref(), WAYPOINT_AS_A_MESH_FILE)
            .expect("the mesh file is valid"),
        &m,
        &[("shop", "wp")],
    );
    // `both` is `web`'s second rule on the same parent: the file has no such route, so
    // compare the rest, then it alone.
    let mut routes = m.http_routes.clone();
    let both_route = routes
        .remove(&ambit_control_plane::model::NamespacedName {
            namespace: "shop".into(),
            name: "both".into(),
        })
        .expect("the Service half of `both` is applied");
    assert_eq!(
        both_route.parents,
        file.http_routes.values().next().unwrap().parents
    );
    assert_eq!(routes, file.http_routes, "the routes");
    assert_eq!(m.waypoints, file.waypoints, "the waypoints");
    file.http_routes = m.http_routes.clone();
    assert_eq!(*m, file, "the same model, so the same xDS");

    // Status: the waypoint Gateway is accepted, programmed (its pod runs) and has its
    // Service's address; the refused one says why; other classes are left alone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let wp_status = loop {
        let g = api.get("Gateway", "shop", "wp").unwrap();
        let conds = g["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let st = |t: &str| {
            conds
                .iter()
                .find(|c| c["type"] == t)
                .map(|c| c["status"].clone())
        };
        if st("Accepted") == Some(json!("True")) && st("Programmed") == Some(json!("True")) {
            break g["status"].clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{g}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        wp_status["addresses"],
        json!([{"type": "IPAddress", "value": "10.96.0.99"}])
    );
    let (st, reason, msg) =
        until_accepted(&api, "Gateway", "shop", "not-a-waypoint", |_| true).await;
    assert_eq!(
        (st.as_str(), reason.as_str()),
        ("False", "UnsupportedValue")
    );
    assert!(msg.contains("HBONE"), "{msg}");
    assert!(api.get("Gateway", "shop", "ingress").unwrap()["status"].is_null());
    assert!(api.get("HTTPRoute", "shop", "from-outside").unwrap()["status"].is_null());

    // Routes: one entry per Service parent, Ambit's controller name, what became of it.
    let p = until_route(&api, "web", |p| !p.is_empty()).await;
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, MESH);
    assert_eq!(
        (p[0].1[0].0.as_str(), p[0].1[1].0.as_str()),
        ("True", "True"),
        "{p:?}"
    );
    let p = until_route(&api, "sticky", |p| !p.is_empty()).await;
    assert_eq!(
        (p[0].1[0].0.as_str(), p[0].1[0].1.as_str()),
        ("False", "UnsupportedValue"),
        "{p:?}"
    );
    assert!(p[0].1[0].2.contains("sessionPersistence"), "{p:?}");
    let p = until_route(&api, "lost", |p| !p.is_empty()).await;
    assert_eq!(p[0].1[0].0, "False", "{p:?}");
    assert_eq!(
        (p[0].1[1].0.as_str(), p[0].1[1].1.as_str()),
        ("False", "BackendNotFound"),
        "{p:?}"
    );
    assert!(p[0].1[1].2.contains("shop/nowhere"), "{p:?}");
    let p = until_route(&api, "both", |p| p.len() == 2).await;
    assert!(p.iter().any(|(c, _)| c == "example.com/ingress"), "{p:?}");
    assert!(
        p.iter().any(|(c, a)| c == MESH && a[0].0 == "True"),
        "{p:?}"
    );
    let stored = api.get("HTTPRoute", "shop", "both").unwrap();
    assert!(
        stored["status"]["parents"]
            .as_array()
            .unwrap()
            .contains(&theirs),
        "the other controller's entry is kept as it was: {stored}"
    );

    // An invalid edit of a valid route keeps its last valid generation applied, and
    // says so; fixing it applies the fix.
    let mut models = s.models.clone();
    let writes = api.status_writes();
    api.apply(web_route(Some((
        "sessionPersistence",
        json!({"type": "Cookie"}),
    ))));
    let p = until_route(&api, "web", |p| {
        p.first().is_some_and(|x| x.1[0].0 == "False")
    })
    .await;
    assert!(p[0].1[0].2.contains("generation 1 stays applied"), "{p:?}");
    assert!(api.status_writes() > writes);
    assert_eq!(models.borrow_and_update().http_routes, m.http_routes);
    let mut fixed = web_route(None);
    fixed["spec"]["rules"][0]["timeouts"]["request"] = json!("3s");
    api.apply(fixed);
    until(&mut models, "the fixed route", |m| {
        m.http_routes
            .values()
            .any(|r| r.name == "web" && r.rules[0].request_timeout == Some(Duration::from_secs(3)))
    })
    .await;
    until_route(&api, "web", |p| {
        p.first().is_some_and(|x| x.1[0].0 == "True")
    })
    .await;

    // Deleting the Gateway ends the waypoint: its service's route no longer applies.
    api.delete("Gateway", "shop", "wp");
    until(&mut models, "no waypoint", |m| m.waypoints.is_empty()).await;
}

#[tokio::test]
async fn kube_services_without_a_selector_take_their_pods_from_endpoint_slices() {
    let api = cluster();
    // A Service without a selector, its endpoints managed by hand (or by a controller):
    // web-1 (a pod, ready) on port 9090, and an address outside the cluster.
    api.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "legacy", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}));
    let slice = |ready: bool| {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "legacy-abc", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "legacy"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 9090, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.244.2.10"], "conditions": {"ready": ready},
             "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1", "uid": "uid-shop-web-1"}},
            {"addresses": ["203.0.113.7"], "conditions": {"ready": true}}
        ]})
    };
    api.apply(slice(true));
    // The slice of a service with a selector changes nothing: the selector decides.
    api.apply(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-xyz", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 1234}],
        "endpoints": []}));
    let s = source(&api, Duration::ZERO).await;
    let mut models = s.models.clone();
    let key = |n: &str| ambit_control_plane::model::NamespacedName {
        namespace: "shop".into(),
        name: n.into(),
    };
    let m = until(&mut models, "legacy's endpoints", |m| {
        m.services
            .get(&key("legacy"))
            .is_some_and(|s| !s.endpoints.is_empty())
    })
    .await;
    let legacy = &m.services[&key("legacy")];
    assert_eq!(legacy.endpoints, ["uid-shop-web-1"]);
    assert_eq!(
        legacy.ports[0].target_port, 9090,
        "the slice's port, by name"
    );
    let web = &m.services[&key("web")];
    assert_eq!(web.endpoints.len(), 2, "web keeps its selector's pods");
    assert_eq!(web.ports[0].target_port, 8080);
    let errors = s.errors.borrow().clone().unwrap_or_default();
    assert!(
        errors.contains("203.0.113.7") && errors.contains("not pods"),
        "{errors}"
    );
    // The pod is not ready any more: no endpoint.
    api.apply(slice(false));
    until(&mut models, "legacy without endpoints", |m| {
        m.services
            .get(&key("legacy"))
            .is_some_and(|s| s.endpoints.is_empty())
    })
    .await;
}

/// A JWKS document with one P-256 key (the example's).
const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","alg":"ES256","use":"sig","kid":"example-1","x":"7hXI_gHhhIp2QovkwvPKngFACWq4OkAynkcHeIRV4us","y":"5wTVORmN3RoeRMl4jEz6YqK7XbsW2NGa-zuJRU2xsII"}]}"#;

/// What `with_waypoint()` plus the service `db` and the accepted objects of the test
/// below describe, as a mesh file.
fn waypoint_policies_as_a_mesh_file() -> String {
    let base = WAYPOINT_AS_A_MESH_FILE.split("httpRoutes:").next().unwrap();
    format!(
        r#"{base}  - {{name: db, namespace: shop, vips: [10.96.0.11], ports: [{{name: tcp, port: 5432}}], selector: {{app: db}}}}
policies:
  - name: conn-limit
    namespace: shop
    selector: {{app: web}}
    action: RATE_LIMIT
    connectionRateLimit: {{connections: 5, unit: Second, burst: 10}}
  - name: web-deny-admin
    namespace: shop
    targetRefs: [{{kind: Service, name: web}}]
    action: DENY
    rules:
      - from: [{{notPrincipals: [cluster.local/ns/shop/sa/ops]}}]
        to: [{{paths: [/admin, "/admin/*"]}}]
  - name: web-l7
    namespace: shop
    targetRefs: [{{kind: Service, name: web}}]
    action: ALLOW
    rules:
      - from: [{{requestPrincipals: ["https://idp.example.com/*"]}}]
        to: [{{methods: [GET], paths: ["/api/*"]}}]
        when: [{{key: "request.auth.claims[groups]", values: [shoppers]}}]
requestAuthentications:
  - name: istio-jwt
    namespace: shop
    targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}]
    jwtRules:
      - issuer: https://other.example.com
        jwksUri: http://web.shop.svc.cluster.local/jwks.json
        timeout: 2s
  - name: web-jwt
    namespace: shop
    targetRefs: [{{kind: Service, name: web}}]
    jwtRules:
      - issuer: https://idp.example.com
        audiences: [web]
        jwks: '{JWKS}'
        fromHeaders: [{{name: x-token, prefix: "Bearer "}}]
        outputClaimToHeaders: [{{header: x-user, claim: sub}}]
"#
    )
}

#[tokio::test]
async fn kube_waypoint_policies_and_request_authentications_give_the_model_the_mesh_file_gives_with_status()
 {
    let api = cluster();
    with_waypoint(&api);
    api.apply(service("shop", "db", "10.96.0.11", json!({"app": "db"})));
    let mut db = api.get("Service", "shop", "db").unwrap();
    db["spec"]["ports"] = json!([{"name": "tcp", "port": 5432, "targetPort": 5432}]);
    api.apply(db);
    // Accepted: L7 policies at the waypoint (Ambit's and Istio's), a connection rate
    // limit at L4, request authentications for the service and for the waypoint.
    api.apply(ambit(
        "AuthorizationPolicy",
        "shop",
        "web-l7",
        json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
               "rules": [{"from": [{"source": {"requestPrincipals": ["https://idp.example.com/*"]}}],
                          "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"]}}],
                          "when": [{"key": "request.auth.claims[groups]", "values": ["shoppers"]}]}]}),
    ));
    api.apply(istio(
        "AuthorizationPolicy",
        "shop",
        "web-deny-admin",
        json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}], "action": "DENY",
               "rules": [{"from": [{"source": {"notPrincipals": ["cluster.local/ns/shop/sa/ops"]}}],
                          "to": [{"operation": {"paths": ["/admin", "/admin/*"]}}]}]}),
    ));
    api.apply(ambit(
        "AuthorizationPolicy",
        "shop",
        "conn-limit",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "RATE_LIMIT",
               "connectionRateLimit": {"connections": 5, "unit": "Second", "burst": 10}}),
    ));
    api.apply(ambit(
        "RequestAuthentication",
        "shop",
        "web-jwt",
        json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
               "jwtRules": [{"issuer": "https://idp.example.com", "audiences": ["web"], "jwks": JWKS,
                             "fromHeaders": [{"name": "x-token", "prefix": "Bearer "}],
                             "outputClaimToHeaders": [{"header": "x-user", "claim": "sub"}]}]}),
    ));
    api.apply(istio(
        "RequestAuthentication",
        "shop",
        "istio-jwt",
        json!({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}],
               "jwtRules": [{"issuer": "https://other.example.com",
                             "jwksUri": "http://web.shop.svc.cluster.local/jwks.json", "timeout": "2s"}]}),
    ));
    // Refused when converted (no other object needed to tell) ...
    let refused = [
        (
            "AuthorizationPolicy",
            "bad-key",
            json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
                   "rules": [{"when": [{"key": "request.nope", "values": ["x"]}]}]}),
        ),
        (
            "AuthorizationPolicy",
            "bad-rate",
            json!({"action": "RATE_LIMIT", "connectionRateLimit": {"connections": 5, "unit": "Day"}}),
        ),
        (
            "AuthorizationPolicy",
            "rate-without-limit",
            json!({"action": "RATE_LIMIT"}),
        ),
        (
            "AuthorizationPolicy",
            "l7-rate-limit",
            json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}], "action": "RATE_LIMIT",
                   "connectionRateLimit": {"connections": 5, "unit": "Second"}}),
        ),
        (
            "RequestAuthentication",
            "by-selector",
            json!({"selector": {"matchLabels": {"app": "web"}},
                   "jwtRules": [{"issuer": "https://idp.example.com", "jwks": JWKS}]}),
        ),
        (
            "RequestAuthentication",
            "bad-keys",
            json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
                   "jwtRules": [{"issuer": "https://idp.example.com", "jwks": "{\"keys\": 1}"}]}),
        ),
        // ... and by the model's build: targets that are not there or have no waypoint,
        // keys at a service that does not exist.
        (
            "AuthorizationPolicy",
            "no-such-service",
            json!({"targetRefs": [{"kind": "Service", "group": "", "name": "nowhere"}],
                   "rules": [{}]}),
        ),
        (
            "AuthorizationPolicy",
            "db-l7",
            json!({"targetRefs": [{"kind": "Service", "group": "", "name": "db"}],
                   "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
        ),
        (
            "RequestAuthentication",
            "keys-nowhere",
            json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
                   "jwtRules": [{"issuer": "https://third.example.com",
                                 "jwksUri": "http://nowhere.shop.svc.cluster.local/keys"}]}),
        ),
    ];
    for (kind, name, spec) in &refused {
        api.apply(ambit(kind, "shop", name, spec.clone()));
    }

    api.apply(ambit_tests::cluster::service_account("shop", "wp"));
    let s = source(&api, Duration::ZERO).await;
    let m = s.models.borrow().clone();
    let file = with_accounts(
        ambit_control_plane::source::file::parse(
            "mesh.yaml".as_ref(),
            &waypoint_policies_as_a_mesh_file(),
        )
        .expect("the mesh file is valid"),
        &m,
        &[("shop", "wp")],
    );
    assert_eq!(m.policies, file.policies, "the L4 policies");
    assert_eq!(
        m.waypoint_policies, file.waypoint_policies,
        "the L7 policies"
    );
    assert_eq!(
        m.request_authentications, file.request_authentications,
        "the request authentications"
    );
    assert_eq!(*m, file, "the same model, so the same xDS");

    for (kind, name, status, reason, says) in [
        (
            "AuthorizationPolicy",
            "web-l7",
            "True",
            "AppliedByWaypoint",
            "waypoint",
        ),
        ("AuthorizationPolicy", "conn-limit", "True", "Accepted", ""),
        (
            "RequestAuthentication",
            "web-jwt",
            "True",
            "AppliedByWaypoint",
            "waypoint",
        ),
        (
            "AuthorizationPolicy",
            "bad-key",
            "False",
            "Invalid",
            "request.nope",
        ),
        (
            "AuthorizationPolicy",
            "bad-rate",
            "False",
            "Invalid",
            "\"Day\"",
        ),
        (
            "AuthorizationPolicy",
            "rate-without-limit",
            "False",
            "Invalid",
            "connectionRateLimit",
        ),
        (
            "AuthorizationPolicy",
            "l7-rate-limit",
            "False",
            "UnsupportedAction",
            "HTTPRoute",
        ),
        (
            "RequestAuthentication",
            "by-selector",
            "False",
            "TargetRefsRequired",
            "targetRefs",
        ),
        (
            "RequestAuthentication",
            "bad-keys",
            "False",
            "Invalid",
            "jwtRules[0].jwks",
        ),
        (
            "AuthorizationPolicy",
            "no-such-service",
            "False",
            "TargetNotFound",
            "shop/nowhere is not defined",
        ),
        (
            "AuthorizationPolicy",
            "db-l7",
            "False",
            "NoWaypoint",
            "no waypoint",
        ),
        (
            "RequestAuthentication",
            "keys-nowhere",
            "False",
            "Invalid",
            "jwtRules[0].jwksUri",
        ),
    ] {
        let (st, r, msg) = until_accepted(&api, kind, "shop", name, |_| true).await;
        assert_eq!((st.as_str(), r.as_str()), (status, reason), "{name}: {msg}");
        assert!(msg.contains(says), "{name}: {msg:?} should say {says:?}");
    }
    let writes = api.status_writes();
    assert_eq!(
        writes, 13,
        "each Ambit object once, and the waypoint's Gateway"
    );

    // Breaking a working L7 policy or request authentication keeps its last valid
    // version applied (dropping either would open what it closes).
    let mut models = s.models.clone();
    api.apply(ambit(
        "AuthorizationPolicy",
        "shop",
        "web-l7",
        json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
               "rules": [{"to": [{"operation": {"paths": ["/a/*/b"]}}]}]}),
    ));
    api.apply(ambit(
        "RequestAuthentication",
        "shop",
        "web-jwt",
        json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
               "jwtRules": [{"issuer": "https://idp.example.com"}]}),
    ));
    for (kind, name, says) in [
        ("AuthorizationPolicy", "web-l7", "rules[0].to[0]"),
        ("RequestAuthentication", "web-jwt", "needs jwks"),
    ] {
        let (_, reason, msg) = until_accepted(&api, kind, "shop", name, |c| c.0 == "False").await;
        assert_eq!(reason, "Invalid", "{msg}");
        assert!(msg.contains(says), "{name}: {msg}");
        assert!(msg.contains("generation 1 stays applied"), "{name}: {msg}");
    }
    assert_eq!(**models.borrow_and_update(), *m);

    // A target that comes into being applies the policy that waited for it; one that
    // goes withdraws it, and the status follows.
    let mut db = api.get("Service", "shop", "db").unwrap();
    db["metadata"]["labels"] = json!({"ambit.dev/waypoint": "wp"});
    api.apply(db);
    until(&mut models, "db-l7 applied", |m| {
        m.waypoint_policies.keys().any(|k| k.name == "db-l7")
    })
    .await;
    until_accepted(&api, "AuthorizationPolicy", "shop", "db-l7", |c| {
        c.1 == "AppliedByWaypoint"
    })
    .await;
    api.delete("Gateway", "shop", "wp");
    until(&mut models, "no waypoint", |m| {
        m.waypoints.is_empty()
            && m.waypoint_policies.is_empty()
            && m.request_authentications.is_empty()
    })
    .await;
    let (st, _, msg) = until_accepted(&api, "AuthorizationPolicy", "shop", "db-l7", |c| {
        c.0 == "False"
    })
    .await;
    assert!(msg.starts_with("not applied: targetRefs[0]"), "{st}: {msg}");
}
