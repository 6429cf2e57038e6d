//! The waypoint end to end in the simulated cluster (run as root: `cargo xtask test`):
//! a client pod's connection to a service with a waypoint is tunnelled by its agent to
//! the waypoint pod, routed at L7 (header match, weighted canary), and tunnelled on to
//! the chosen backend's agent, which sees the waypoint's identity and delivers as the
//! original client. Dialing a backend pod's IP from a meshed client also goes through
//! the waypoint (workload-addressed, at L4); any other caller of the pod's HBONE port is
//! refused; with the waypoint gone, the service and its pods fail closed.

use std::time::Duration;

use ambit_tests::cluster::metric_sum;
use ambit_tests::{Cluster, ClusterSpec, Pod, PodProcess, wait_until};
use serde_json::Value;

const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/default/sa/wp";

/// Node 1: the client (pod 0), the waypoint (pod 1) and a pod outside the mesh (pod 2);
/// node 2: web v1 (pod 0) and v2 (pod 1).
fn mesh(c: &Cluster) -> String {
    let w = |p: &Pod, sa: &str, labels: &str| p.mesh_workload("default", sa, labels);
    let mut y = String::from(
        "namespaces:\n  - name: default\n    labels: {ambit.dev/dataplane: ambient}\nnodes: [{name: node-1}, {name: node-2}]\nwaypoints: [{name: wp, namespace: default}]\nworkloads:\n",
    );
    y += &w(c.pod(1, 0), "client", "app: client");
    y += &w(
        c.pod(1, 1),
        "wp",
        "gateway.networking.k8s.io/gateway-name: wp",
    );
    y += &w(c.pod(2, 0), "web", "app: web, version: v1");
    y += &w(c.pod(2, 1), "web", "app: web, version: v2");
    // Outside the mesh: opted out, so neither captured nor given an identity.
    y += &w(c.pod(1, 2), "outsider", "ambit.dev/dataplane: none");
    y += r#"services:
  - {name: web, namespace: default, vips: [10.96.0.10], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: web}, labels: {ambit.dev/waypoint: wp}}
  - {name: web-v1, namespace: default, vips: [10.96.0.11], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: web, version: v1}}
  - {name: web-v2, namespace: default, vips: [10.96.0.12], ports: [{name: http, port: 80, targetPort: 8080}],
     selector: {app: web, version: v2}}
httpRoutes:
  - name: web
    namespace: default
    parentRefs: [{kind: Service, name: web, port: 80}]
    rules:
      - matches: [{headers: [{name: x-canary, value: "1"}]}]
        backendRefs: [{name: web-v2, port: 80}]
      - backendRefs: [{name: web-v1, port: 80, weight: 80}, {name: web-v2, port: 80, weight: 20}]
"#;
    y
}

/// Starts web v1 and v2 on node 2, enrolls every pod, writes [`mesh`] and waits until
/// the backends and the client are captured; the servers run while they are kept.
fn backends_enrolled(c: &Cluster) -> Vec<PodProcess> {
    let mut servers = Vec::new();
    for (i, name) in [(0, "v1"), (1, "v2")] {
        let pod = c.pod(2, i);
        let mut p = c
            .spawn_in_pod(
                pod,
                &[
                    "http-serve".into(),
                    format!("--listen={}:8080", pod.ip4),
                    format!("--name={name}"),
                ],
            )
            .unwrap();
        p.wait_for_line("listening").unwrap();
        servers.push(p);
    }
    for n in &c.nodes {
        for p in &n.pods {
            c.enroll(p).unwrap();
        }
    }
    c.write_mesh(&mesh(c)).unwrap();
    wait_until(
        "backends and client captured",
        Duration::from_secs(15),
        || {
            [(1, 0), (2, 0), (2, 1)].iter().all(|&(n, i)| {
                c.enroll_client(n)
                    .unwrap()
                    .list()
                    .unwrap()
                    .iter()
                    .any(|p| p.spec.uid == c.pod(n, i).uid && p.captured)
            })
        },
    );
    servers
}

fn start_waypoint(c: &Cluster) -> PodProcess {
    c.start_waypoint(c.pod(1, 1), "default", "wp")
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// `count` GETs from the client pod to `target`; one report per request.
fn get(c: &Cluster, target: &str, headers: &[&str], count: usize) -> (bool, Vec<Value>) {
    get_from(c, c.pod(1, 0), target, headers, count)
}

/// `count` GETs from `from` to `target`.
fn get_from(
    c: &Cluster,
    from: &Pod,
    target: &str,
    headers: &[&str],
    count: usize,
) -> (bool, Vec<Value>) {
    let mut args = vec![
        "http-get".to_string(),
        format!("--connect={target}"),
        "--host=web.default.svc.cluster.local".into(),
        format!("--count={count}"),
    ];
    for h in headers {
        args.push(format!("--header={h}"));
    }
    let p = c.spawn_in_pod(from, &args).unwrap();
    let (status, lines) = p.finish(Duration::from_secs(60)).unwrap();
    let reports = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (status.success(), reports)
}

/// The waypoint in `pod`'s config dump (from its localhost admin port).
fn config_dump(c: &Cluster, pod: &Pod) -> Value {
    serde_json::from_str(
        &c.http_get_in(pod, "127.0.0.1:15000", "/debug/config_dump")
            .unwrap(),
    )
    .unwrap()
}

/// One request from the client pod to the service with extra `http-get` flags.
fn run(c: &Cluster, extra: &[String]) -> Value {
    let mut args = vec![
        "http-get".to_string(),
        "--connect=10.96.0.10:80".into(),
        "--host=web.default.svc.cluster.local".into(),
    ];
    args.extend_from_slice(extra);
    let p = c.spawn_in_pod(c.pod(1, 0), &args).unwrap();
    let (status, lines) = p.finish(Duration::from_secs(300)).unwrap();
    let r: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(status.success(), "{r:?}");
    r.into_iter().next().unwrap()
}

#[test]
fn waypoint_routes_service_traffic_at_l7_and_cannot_be_bypassed() {
    let c = Cluster::new(ClusterSpec {
        control_plane: true,
        pods_per_node: 3,
        ..Default::default()
    })
    .unwrap();
    let servers = backends_enrolled(&c);
    let waypoint = start_waypoint(&c);
    // Ready on 15021, and what it runs on its localhost admin port, as the agents.
    let wp_pod = c.pod(1, 1);
    assert_eq!(
        c.http_get_in(wp_pod, "127.0.0.1:15021", "/healthz/ready")
            .unwrap(),
        "ready\n"
    );
    let dump = config_dump(&c, wp_pod);
    assert_eq!(dump["identity"], WAYPOINT_ID, "{dump}");
    assert_eq!(dump["xds"]["connected"], true, "{dump}");
    assert!(
        dump["config"]["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == "web.default.svc.cluster.local:80"),
        "{dump}"
    );

    // Header match: every request with x-canary goes to v2.
    let (ok, r) = get(&c, "10.96.0.10:80", &["x-canary: 1"], 10);
    assert!(ok, "{r:?}\n{}", c.agent_log_tail(1));
    assert!(
        r.iter().all(|x| x["status"] == 200 && x["backend"] == "v2"),
        "{r:?}"
    );
    // The application sees the original client's IP, not the waypoint's.
    let client_ip = c.pod(1, 0).ip4.to_string();
    assert_eq!(
        r[0]["body"].as_str().unwrap(),
        format!("v2 {client_ip}"),
        "{r:?}"
    );

    // The 80/20 canary over 200 requests.
    let (ok, r) = get(&c, "10.96.0.10:80", &[], 200);
    assert!(ok, "{r:?}");
    let v2 = r.iter().filter(|x| x["backend"] == "v2").count();
    eprintln!("canary: v2 answered {v2} of 200 (weight 20%)");
    assert!(r.iter().all(|x| x["status"] == 200), "{r:?}");
    assert!((15..=70).contains(&v2), "v2 answered {v2} of 200");

    // The waypoint counted them with Istio's labels, the caller named by the `baggage`
    // its agent sent (workload and canonical service), its principal by its certificate.
    let m = c
        .http_get_in(c.pod(1, 1), "127.0.0.1:15020", "/metrics")
        .unwrap();
    let line = m
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
        .unwrap_or_else(|| panic!("no request series:\n{m}"));
    for label in [
        format!("source_workload=\"{}\"", c.pod(1, 0).name),
        "source_canonical_service=\"client\"".to_string(),
        "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"".to_string(),
        "destination_service=\"web.default.svc.cluster.local\"".to_string(),
    ] {
        assert!(line.contains(&label), "{label} missing: {line}");
    }
    // ...and the backend that answered, from its endpoint's metadata, its principal as
    // its HBONE tunnel proved it.
    let v2 = c.pod(2, 1);
    let line = m
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(&format!("destination_workload=\"{}\"", v2.name))
        })
        .unwrap_or_else(|| panic!("no series for {}:\n{m}", v2.name));
    for label in [
        "destination_workload_namespace=\"default\"".to_string(),
        "destination_principal=\"spiffe://cluster.local/ns/default/sa/web\"".to_string(),
        "destination_canonical_service=\"web\"".to_string(),
        "destination_canonical_revision=\"v2\"".to_string(),
        "request_protocol=\"http\"".to_string(),
    ] {
        assert!(line.contains(&label), "{label} missing: {line}");
    }

    // The backends' agent saw the waypoint as the peer.
    let m = c.metrics(2).unwrap();
    let via = metric_sum(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", WAYPOINT_ID),
        ],
    );
    assert!(via >= 1.0, "no inbound connection from the waypoint:\n{m}");
    // ...and, from the waypoint's `forwarded: host=`, the service it came through (the
    // header route's backend, web-v2, whose endpoint this pod is).
    let via_v2 = metric_sum(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", WAYPOINT_ID),
            ("destination_service", "web-v2.default.svc.cluster.local"),
            ("destination_service_name", "web-v2"),
            ("destination_workload", &c.pod(2, 1).name),
        ],
    );
    assert!(
        via_v2 >= 1.0,
        "no destination_service from forwarded host:\n{m}"
    );

    // Memory stays bounded under large bodies: a 1 GiB upload and a 1 GiB download
    // stream through the waypoint (never held), its peak RSS under 64 MiB.
    const GIB: u64 = 1 << 30;
    let t = std::time::Instant::now();
    let up = run(
        &c,
        &["--header=x-canary: 1".into(), format!("--upload={GIB}")],
    );
    assert_eq!(up["uploaded"], GIB, "{up:?}");
    let took_up = t.elapsed();
    let t = std::time::Instant::now();
    let down = run(
        &c,
        &[
            "--header=x-canary: 1".into(),
            format!("--path=/bytes/{GIB}"),
        ],
    );
    assert_eq!(down["downloaded"], GIB, "{down:?}");
    let took_down = t.elapsed();
    let peak_kib = ambit_tests::peak_rss_kib(waypoint.pid()).unwrap();
    eprintln!(
        "1 GiB through the waypoint: up {took_up:.1?}, down {took_down:.1?}; waypoint peak RSS {} MiB",
        peak_kib / 1024
    );
    assert!(peak_kib < 64 * 1024, "waypoint peak RSS {peak_kib} KiB");

    // Dialing a backend pod's IP does not go around the waypoint: the client's agent
    // sends the connection to it (workload-addressed, the pod's IP:port as authority),
    // and it carries it at L4 to the pod, which sees the client's IP.
    let (v1, direct) = (c.pod(2, 0), format!("{}:8080", c.pod(2, 0).ip4));
    let (ok, r) = get(&c, &direct, &[], 1);
    assert!(ok, "{r:?}\n{}", c.agent_log_tail(1));
    assert_eq!(
        r[0]["body"].as_str().unwrap(),
        format!("v1 {client_ip}"),
        "{r:?}"
    );
    let m = c
        .http_get_in(c.pod(1, 1), "127.0.0.1:15020", "/metrics")
        .unwrap();
    let carried = metric_sum(
        &m,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "waypoint"),
            ("destination_workload", &v1.name),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/client",
            ),
        ],
    );
    assert_eq!(
        carried, 1.0,
        "the waypoint did not carry the direct dial:\n{m}"
    );
    // Any other mesh identity dialing the pod's HBONE port itself is refused by its agent.
    let mesh_ca = ambit_tests::pki::mesh_root(&c.ca_dir());
    let err = ambit_tests::probes::hbone_probe(
        &c,
        1,
        std::net::SocketAddr::new(v1.ip4.into(), 15008),
        ambit_tests::pki::leaf(&mesh_ca, "spiffe://cluster.local/ns/default/sa/client"),
        "spiffe://cluster.local/ns/default/sa/web",
        std::net::SocketAddr::new(v1.ip4.into(), 8080),
    )
    .unwrap_err();
    eprintln!("a direct HBONE dial to a waypointed pod: {err}");
    let m = c.metrics(2).unwrap();
    assert!(
        metric_sum(
            &m,
            "ambit_inbound_refused_total",
            &[("reason", "not_from_waypoint")]
        ) >= 1.0,
        "{m}"
    );

    // Nor can a client outside the mesh go around it: its plaintext to the pod is
    // refused (STRICT).
    let (ok, r) = get_from(&c, c.pod(1, 2), &direct, &[], 1);
    assert!(
        !ok,
        "an outsider reached a waypointed pod in plaintext: {r:?}"
    );
    let m = c.metrics(2).unwrap();
    assert!(
        metric_sum(
            &m,
            "ambit_inbound_refused_total",
            &[("reason", "strict_mtls")]
        ) >= 1.0,
        "{m}"
    );

    // With the waypoint gone the service fails closed.
    drop(waypoint);
    let (ok, r) = get(&c, "10.96.0.10:80", &[], 1);
    assert!(!ok, "served without its waypoint: {r:?}");
    let (ok, r) = get(&c, &direct, &[], 1);
    assert!(!ok, "a pod served without its waypoint: {r:?}");
    drop(servers);
}

/// The same on the Kubernetes source, deployed as `deploy/waypoint/` deploys it: a
/// Gateway of class `ambit-waypoint`, its pod (labelled with its name, service account
/// `wp`) and a Service of its name; an HTTPRoute on the service. The waypoint gets its
/// certificate from the CA with its own pod-bound token — no node agent socket, no
/// secret — and verifies the control plane with the root published in its namespace.
#[test]
fn kube_waypoint_from_a_gateway_routes_an_httproute_with_a_certificate_from_its_token() {
    use serde_json::json;
    let c = Cluster::new(ClusterSpec {
        control_plane: true,
        source: ambit_tests::cluster::MeshSource::Kubernetes,
        ..Default::default()
    })
    .unwrap();
    let (client, wp_pod, backend) = (c.pod(1, 0), c.pod(1, 1), c.pod(2, 0));
    let api = c.api();
    let mut server = c
        .spawn_in_pod(
            backend,
            &[
                "http-serve".into(),
                format!("--listen={}:8080", backend.ip4),
                "--name=web".into(),
            ],
        )
        .unwrap();
    server.wait_for_line("listening").unwrap();
    // The waypoint's pod, Gateway and Service; the application's Service and route.
    let mut wp = c
        .kube_objects(true)
        .into_iter()
        .find(|o| o["metadata"]["uid"] == wp_pod.uid.as_str())
        .unwrap();
    wp["metadata"]["labels"] = json!({"gateway.networking.k8s.io/gateway-name": "wp"});
    wp["spec"]["serviceAccountName"] = json!("wp");
    api.apply(wp);
    api.apply(ambit_tests::cluster::service_account("default", "wp"));
    api.apply(
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": "default"},
        "spec": {"gatewayClassName": "ambit-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
    );
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "wp", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.99", "clusterIPs": ["10.96.0.99"],
                 "selector": {"gateway.networking.k8s.io/gateway-name": "wp"},
                 "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008}]}}));
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", "labels": {"ambit.dev/waypoint": "wp"}},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "selector": {"app": backend.name},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}));
    api.apply(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                 "rules": [
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
                     "filters": [{"type": "RequestRedirect",
                                  "requestRedirect": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"},
                                                      "statusCode": 301}}]},
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                     "backendRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80, "weight": 1}]}]}}));
    // The CNI's part first: the agents know every pod's netns before the namespace is
    // labelled. (Labelled first, an agent may find the backend through its cgroup — its
    // server runs — and enroll it itself, and this explicit add would be a duplicate.)
    for n in &c.nodes {
        for p in &n.pods {
            c.enroll(p).unwrap();
        }
    }
    api.apply(c.kube_namespace(true));
    wait_until(
        "client and backend captured",
        Duration::from_secs(15),
        || {
            [(1, 0), (2, 0)].iter().all(|&(n, i)| {
                c.enroll_client(n)
                    .unwrap()
                    .list()
                    .unwrap()
                    .iter()
                    .any(|p| p.spec.uid == c.pod(n, i).uid && p.captured)
            })
        },
    );
    // What the kubelet would mount: the pod's projected token (audience ambit-ca), and
    // the root the control plane published in the waypoint's namespace (written in the
    // background once the model has the waypoint: waited for, as the kubelet waits for
    // a ConfigMap volume).
    wait_until(
        "the root published in the waypoint's namespace",
        Duration::from_secs(15),
        || api.get("ConfigMap", "default", "ambit-root-cert").is_some(),
    );
    let cm = api
        .get("ConfigMap", "default", "ambit-root-cert")
        .expect("the root published in the waypoint's namespace");
    let dir = c.ca_dir().join("waypoint-wp");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("root-cert.pem"),
        cm["data"]["root-cert.pem"].as_str().unwrap(),
    )
    .unwrap();
    let token = format!("wp-token-{}", std::process::id());
    api.issue_token(
        &token,
        ambit_tests::kube_api::Token {
            service_account: ("default".into(), "wp".into()),
            pod: Some(wp_pod.name.clone()),
            node_in_extra: true,
            audiences: vec!["ambit-ca".into()],
            expired: false,
        },
    );
    std::fs::write(dir.join("token"), &token).unwrap();
    let _waypoint = c
        .start_waypoint_with(
            wp_pod,
            "default",
            "wp",
            &[
                format!("--ca-credential-file={}", dir.join("token").display()),
                format!("--xds-root-cert={}", dir.join("root-cert.pem").display()),
                "--service-account=wp".into(),
            ],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));

    // Through the waypoint: the route's redirect, and the backend behind the rest.
    let (ok, r) = get_from(&c, client, "10.96.0.10:80", &[], 3);
    assert!(ok, "{r:?}\n{}", c.agent_log_tail(1));
    assert!(r.iter().all(|x| x["status"] == 200), "{r:?}");
    assert_eq!(
        r[0]["body"].as_str().unwrap(),
        format!("web {}", client.ip4),
        "{r:?}"
    );
    let p = c
        .spawn_in_pod(
            client,
            &[
                "http-get".into(),
                "--connect=10.96.0.10:80".into(),
                "--host=web.default.svc.cluster.local".into(),
                "--path=/old/page".into(),
            ],
        )
        .unwrap();
    let (_, lines) = p.finish(Duration::from_secs(30)).unwrap();
    let answer: Value = serde_json::from_str(lines.first().map_or("{}", |l| l)).unwrap();
    assert_eq!(answer["status"], 301, "{lines:?}");
    // The waypoint counted them under the identity the CA gave it.
    let m = c
        .http_get_in(wp_pod, "127.0.0.1:15020", "/metrics")
        .unwrap();
    assert!(
        metric_sum(&m, "istio_requests_total", &[("response_code", "301")]) >= 1.0,
        "{m}"
    );
    let dump = config_dump(&c, wp_pod);
    assert_eq!(dump["identity"], WAYPOINT_ID, "{dump}");
    // And the objects say so: the Gateway is programmed, the route accepted.
    wait_until("Gateway programmed", Duration::from_secs(10), || {
        api.get("Gateway", "default", "wp").is_some_and(|g| {
            g["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Programmed" && c["status"] == "True")
            })
        })
    });
    let route = api.get("HTTPRoute", "default", "web").unwrap();
    assert_eq!(
        route["status"]["parents"][0]["conditions"][0]["status"], "True",
        "{route}"
    );
    drop(server);
}

#[test]
fn one_request_through_the_waypoint_is_one_trace_from_the_client_agent_to_the_destination_agent() {
    use ambit_tests::otlp::{CLIENT, OtlpReceiver, ReceivedSpan, SERVER};
    const COLLECTOR: &str = "172.18.0.254:4317";
    let c = Cluster::new(ClusterSpec {
        control_plane: true,
        pods_per_node: 3,
        agent_args: vec![
            format!("--otlp-endpoint=http://{COLLECTOR}"),
            "--trace-sampling=100".into(),
        ],
        ..Default::default()
    })
    .unwrap();
    // The collector on the bridge, where agents and the waypoint pod reach it.
    let netns = ambit_mesh::netns::Netns::open(
        std::path::Path::new("/var/run/netns").join(&c.bridge_netns),
    )
    .unwrap();
    let listener = netns
        .run(|| std::net::TcpListener::bind(COLLECTOR))
        .unwrap()
        .unwrap();
    let otlp = OtlpReceiver::start(listener).unwrap();
    let _servers = backends_enrolled(&c);
    let waypoint = c
        .start_waypoint_with(
            c.pod(1, 1),
            "default",
            "wp",
            &[
                format!("--otlp-endpoint=http://{COLLECTOR}"),
                "--trace-sampling=100".into(),
            ],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    let find = |spans: &[ReceivedSpan], service: &str, kind: i32| -> Vec<ReceivedSpan> {
        spans
            .iter()
            .filter(|s| s.service == service && s.kind == kind)
            .cloned()
            .collect()
    };

    // A request without a trace context of its own: the client agent's tunnel span
    // starts the trace, the waypoint's request span is its child.
    let (ok, r) = get(&c, "10.96.0.10:80", &["x-canary: 1"], 1);
    assert!(ok && r[0]["status"] == 200, "{r:?}");
    let spans = otlp.wait_for(Duration::from_secs(20), |s| {
        !find(s, "ambit-agent", CLIENT).is_empty() && !find(s, "ambit-waypoint", SERVER).is_empty()
    });
    let all = format!("{spans:#?}");
    let client = find(&spans, "ambit-agent", CLIENT);
    let waypoint_spans = find(&spans, "ambit-waypoint", SERVER);
    assert_eq!((client.len(), waypoint_spans.len()), (1, 1), "{all}");
    let (a, w) = (client[0].clone(), waypoint_spans[0].clone());
    assert!(
        a.parent_span_id.is_empty(),
        "the client agent's span is a root: {all}"
    );
    assert_eq!(
        a.attributes["ambit.source.principal"],
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert_eq!(
        a.attributes["ambit.service"],
        "web.default.svc.cluster.local"
    );
    assert_eq!(a.attributes["ambit.result"], "ok", "{all}");
    assert_eq!(
        (&w.trace_id, &w.parent_span_id),
        (&a.trace_id, &a.span_id),
        "{all}"
    );
    assert_eq!(w.name, "GET web.default.svc.cluster.local:80");
    assert_eq!(w.attributes["http.response.status_code"], "200");
    assert_eq!(
        w.attributes["ambit.source.principal"],
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert_eq!(
        w.attributes["ambit.upstream.principal"],
        "spiffe://cluster.local/ns/default/sa/web"
    );

    // With the application's own trace context: the waypoint's span joins the
    // application's trace (its child), linked to the client agent's tunnel span.
    let app_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let app_span = "00f067aa0ba902b7";
    let (ok, r) = get(
        &c,
        "10.96.0.10:80",
        &[
            "x-canary: 1",
            &format!("traceparent: 00-{app_trace}-{app_span}-01"),
        ],
        1,
    );
    assert!(ok && r[0]["status"] == 200, "{r:?}");
    let spans = otlp.wait_for(Duration::from_secs(20), |s| {
        find(s, "ambit-agent", CLIENT).len() >= 2
            && s.iter()
                .any(|x| x.service == "ambit-waypoint" && x.trace_id == app_trace)
    });
    let all = format!("{spans:#?}");
    let w2 = spans
        .iter()
        .find(|x| x.service == "ambit-waypoint" && x.trace_id == app_trace)
        .unwrap_or_else(|| panic!("no waypoint span in the application's trace: {all}"));
    assert_eq!(w2.parent_span_id, app_span, "{all}");
    let a2 = find(&spans, "ambit-agent", CLIENT)
        .into_iter()
        .find(|x| x.span_id != a.span_id)
        .unwrap();
    assert_eq!(w2.links, vec![a2.span_id.clone()], "{all}");

    // The destination agent's span covers the waypoint's upstream tunnel, which the
    // first request opened (and the second reused): it ends when the tunnel does, here
    // with the waypoint; it is the first request's span's child.
    drop(waypoint);
    let spans = otlp.wait_for(Duration::from_secs(20), |s| {
        !find(s, "ambit-agent", SERVER).is_empty()
    });
    let all = format!("{spans:#?}");
    let dest = find(&spans, "ambit-agent", SERVER);
    assert_eq!(dest.len(), 1, "{all}");
    let d = &dest[0];
    assert_eq!(
        (&d.trace_id, &d.parent_span_id),
        (&a.trace_id, &w.span_id),
        "{all}"
    );
    assert_eq!(d.attributes["ambit.source.principal"], WAYPOINT_ID);
    assert_eq!(
        d.attributes["ambit.destination.workload"],
        format!("default/{}", c.pod(2, 1).name)
    );

    // A refused connection is traced too: plaintext from outside the mesh to a STRICT
    // workload ends in a failed span saying why (a root: plaintext carries no context).
    let target = format!("{}:8080", c.pod(2, 0).ip4);
    let (_, r) = get_from(&c, c.pod(1, 2), &target, &[], 1);
    assert!(r.iter().all(|x| x["status"] != 200), "{r:?}");
    let refused = |s: &[ReceivedSpan]| -> Vec<ReceivedSpan> {
        find(s, "ambit-agent", SERVER)
            .into_iter()
            .filter(|x| x.attributes.contains_key("ambit.refused"))
            .collect()
    };
    let spans = otlp.wait_for(Duration::from_secs(20), |s| !refused(s).is_empty());
    let all = format!("{spans:#?}");
    let refused = refused(&spans);
    assert_eq!(refused.len(), 1, "{all}");
    let r = &refused[0];
    assert_eq!(r.attributes["ambit.refused"], "strict_mtls", "{all}");
    assert_eq!(r.status, 2, "failed: {all}");
    assert_eq!(
        r.attributes["ambit.destination.workload"],
        format!("default/{}", c.pod(2, 0).name)
    );
    assert_eq!(r.attributes["client.address"], c.pod(1, 2).ip4.to_string());
    assert!(r.parent_span_id.is_empty(), "{all}");
}
