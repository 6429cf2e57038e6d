//! End-to-end tests of L4 capture in the simulated cluster (run as root: `cargo xtask test`).
//!
//! Each test builds its own cluster (unique names; addresses only exist inside its own
//! namespaces), so tests run in parallel.

use std::time::{Duration, Instant};

use ambit_tests::cluster::metric_value;
use ambit_tests::{Cluster, ClusterSpec, Pod};
use serde_json::Value;

const MB: u64 = 1_000_000;

fn s(v: impl ToString) -> String {
    v.to_string()
}

fn addr(v: &Value, key: &str) -> std::net::SocketAddr {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
        .parse()
        .unwrap()
}

/// Did the connection go through the agent? A direct connection's server sees the client's own
/// socket as its peer; a proxied one sees the agent's socket. Whole addresses are compared: the
/// agent's socket may well get the same ephemeral port as the client's (another local address),
/// which comparing ports alone mistook for "not proxied" once in a few hundred connections.
fn proxied(report: &Value) -> bool {
    let canonical = |a: std::net::SocketAddr| (a.ip().to_canonical(), a.port());
    canonical(addr(report, "local")) != canonical(addr(report, "server_peer"))
}

fn client_args<T: AsRef<str>>(targets: &[T], conns: usize, bytes: u64) -> Vec<String> {
    let mut a = Vec::new();
    for t in targets {
        a.push(s("--connect"));
        a.push(t.as_ref().to_owned());
    }
    a.extend([s("--conns"), s(conns), s("--bytes"), s(bytes)]);
    a
}

/// Was a connection from `pod` to `dst` recorded by `pod`'s agent with this client port?
fn agent_saw(c: &Cluster, pod: &Pod, client_port: u16, dst: std::net::SocketAddr) -> bool {
    c.captured(pod.node).unwrap().iter().any(|e| {
        e["uid"] == pod.uid.as_str()
            && addr(e, "client").port() == client_port
            && addr(e, "original_destination") == dst
    })
}

/// The usual setup: a 2x2 cluster, an echo server on pod(2, 0):8080, pod(1, 0) enrolled.
fn cluster_with_enrolled_client() -> (Cluster, ambit_tests::PodProcess) {
    let c = Cluster::new(ClusterSpec::default()).unwrap();
    let (client, server) = (c.pod(1, 0), c.pod(2, 0));
    let srv = c
        .start_server(server, &[format!("{}:8080", server.ip4)])
        .unwrap();
    c.enroll(client).unwrap();
    (c, srv)
}

#[test]
fn enrolled_pod_is_captured_across_nodes_byte_exact() {
    let (c, _srv) = cluster_with_enrolled_client();
    let (client, server) = (c.pod(1, 0), c.pod(2, 0));

    let dst = format!("{}:8080", server.ip4);
    let (ok, reports) = c
        .run_client(client, &client_args(&[&dst], 1, 10 * MB))
        .unwrap();
    assert!(ok, "transfer failed: {reports:?}\n{}", c.agent_log_tail(1));
    let r = &reports[0];
    assert!(proxied(r), "connection was not captured: {r}");
    assert_eq!(
        addr(r, "server_local"),
        dst.parse().unwrap(),
        "landed at the wrong destination"
    );
    assert_eq!(
        addr(r, "server_peer").ip(),
        client.ip4,
        "source must stay the pod's IP"
    );
    assert!(
        agent_saw(&c, client, addr(r, "local").port(), dst.parse().unwrap()),
        "agent did not record the original destination"
    );
}

#[test]
fn non_enrolled_pod_is_not_captured() {
    let c = Cluster::new(ClusterSpec::default()).unwrap();
    let (enrolled, other, server) = (c.pod(1, 0), c.pod(1, 1), c.pod(2, 0));
    let _srv = c
        .start_server(server, &[format!("{}:8080", server.ip4)])
        .unwrap();
    c.enroll(enrolled).unwrap();

    let dst = format!("{}:8080", server.ip4);
    let (ok, reports) = c
        .run_client(other, &client_args(&[dst], 3, 100_000))
        .unwrap();
    assert!(ok, "{reports:?}");
    for r in &reports {
        assert!(
            !proxied(r),
            "a non-enrolled pod's connection went through the agent: {r}"
        );
        assert_eq!(addr(r, "server_peer").ip(), other.ip4);
    }
    let seen = c.captured(1).unwrap();
    assert!(
        seen.iter().all(|e| e["uid"] != other.uid.as_str()),
        "agent saw the non-enrolled pod: {seen:?}"
    );
    let m = c.metrics(1).unwrap();
    assert_eq!(
        metric_value(
            &m,
            "ambit_outbound_connections_opened_total",
            &[("workload", &other.name)]
        ),
        None
    );
}

#[test]
fn released_pod_stops_being_captured_and_open_connections_finish() {
    let (c, _srv) = cluster_with_enrolled_client();
    let (client, server) = (c.pod(1, 0), c.pod(2, 0));
    let dst = format!("{}:8080", server.ip4);

    // A connection opened while enrolled, held open across the release.
    let mut args = vec![s("client")];
    args.extend(client_args(&[&dst], 1, 2 * MB));
    args.push(s("--hold"));
    let mut held = c.spawn_in_pod(client, &args).unwrap();
    held.wait_for_line("connected").unwrap();

    c.release(client).unwrap();
    let (ok, after) = c
        .run_client(client, &client_args(&[&dst], 1, 100_000))
        .unwrap();
    assert!(ok, "{after:?}");
    assert!(!proxied(&after[0]), "captured after release: {}", after[0]);

    held.write_line("go").unwrap();
    let (status, lines) = held.finish(Duration::from_secs(60)).unwrap();
    assert!(
        status.success(),
        "the connection open at release did not finish: {lines:?}"
    );
    let r: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert!(proxied(&r) && r["ok"] == true, "{r}");
}

#[test]
fn ipv6_and_v4_mapped_connections_are_captured() {
    let c = Cluster::new(ClusterSpec::default()).unwrap();
    let (client, server) = (c.pod(1, 0), c.pod(2, 0));
    let _srv = c
        .start_server(
            server,
            &[
                format!("[{}]:8080", server.ip6),
                format!("{}:8081", server.ip4),
            ],
        )
        .unwrap();
    c.enroll(client).unwrap();

    let v6 = format!("[{}]:8080", server.ip6);
    let (ok, reports) = c
        .run_client(client, &client_args(&[&v6], 1, 10 * MB))
        .unwrap();
    assert!(ok, "{reports:?}\n{}", c.agent_log_tail(1));
    let r = &reports[0];
    assert!(proxied(r), "IPv6 connection not captured: {r}");
    assert_eq!(addr(r, "server_local"), v6.parse().unwrap());
    assert_eq!(
        addr(r, "server_peer").ip(),
        std::net::IpAddr::V6(client.ip6)
    );
    assert!(agent_saw(
        &c,
        client,
        addr(r, "local").port(),
        v6.parse().unwrap()
    ));

    // An AF_INET6 socket dialing a v4-mapped address talks IPv4 on the wire.
    let mapped = format!("[::ffff:{}]:8081", server.ip4);
    let (ok, reports) = c
        .run_client(client, &client_args(&[mapped], 1, MB))
        .unwrap();
    assert!(ok, "{reports:?}");
    let r = &reports[0];
    assert!(proxied(r), "v4-mapped connection not captured: {r}");
    assert_eq!(
        addr(r, "server_local"),
        format!("{}:8081", server.ip4).parse().unwrap()
    );
    assert_eq!(
        addr(r, "server_peer").ip(),
        std::net::IpAddr::V4(client.ip4)
    );
}

#[test]
fn kernel_counters_match_the_traffic_and_reach_metrics() {
    let (c, _srv) = cluster_with_enrolled_client();
    let (client, server) = (c.pod(1, 0), c.pod(2, 0));

    let payload = 4 * MB;
    let (ok, reports) = c
        .run_client(
            client,
            &client_args(&[format!("{}:8080", server.ip4)], 1, payload),
        )
        .unwrap();
    assert!(ok, "{reports:?}");
    let m = c.metrics(1).unwrap();
    let labels = |dir| {
        [
            ("workload", client.name.as_str()),
            ("workload_namespace", "default"),
            ("direction", dir),
        ]
    };
    // The pod sent `payload` bytes (to the agent, over loopback) and got them echoed back.
    // Counters are at the IP layer: payload plus, per packet, its IP and TCP headers
    // (data segments, ACKs, the handshake), plus the hello line. How the stream is cut
    // into packets depends on timing (a loaded machine sends many small segments), so
    // the bound is per packet counted: at most 120 bytes of headers each (IPv4 60 +
    // TCP 60), and 4 KiB for the hello line and the handshake's options, and 1 % of the
    // payload for segments a loaded machine retransmits (counted again at the IP layer:
    // CI once saw 38,902 bytes over the payload in 176 coalesced packets).
    for dir in ["egress", "ingress"] {
        let bytes = metric_value(&m, "ambit_workload_bytes_total", &labels(dir))
            .unwrap_or_else(|| panic!("{dir} bytes on /metrics:\n{m}"));
        let packets = metric_value(&m, "ambit_workload_packets_total", &labels(dir))
            .unwrap_or_else(|| panic!("{dir} packets on /metrics:\n{m}"));
        assert!(packets >= 3.0, "{dir}: {packets} packets\n{m}");
        let most = payload as f64 * 1.01 + packets * 120.0 + 4096.0;
        assert!(
            bytes >= payload as f64 && bytes <= most,
            "{dir}: {bytes} bytes in {packets} packets for a payload of {payload} (at most {most}):\n{m}"
        );
    }
    // The agent's own view of the same connection is exact.
    let sent = metric_value(
        &m,
        "ambit_outbound_sent_bytes_total",
        &[("workload", &client.name)],
    )
    .unwrap();
    assert_eq!(
        sent,
        (payload + 1) as f64,
        "agent forwarded bytes (payload + mode byte)"
    );
    assert_eq!(metric_value(&m, "ambit_enrolled_workloads", &[]), Some(1.0));
}

#[test]
fn two_hundred_concurrent_connections_get_their_own_original_destination() {
    let c = Cluster::new(ClusterSpec::default()).unwrap();
    let client = c.pod(1, 0);
    let (far, near) = (c.pod(2, 0), c.pod(1, 1));
    let _s1 = c
        .start_server(
            far,
            &[
                format!("{}:20000-20019", far.ip4),
                format!("[{}]:20100-20104", far.ip6),
            ],
        )
        .unwrap();
    let _s2 = c
        .start_server(near, &[format!("{}:21000-21009", near.ip4)])
        .unwrap();
    c.enroll(client).unwrap();

    let mut targets: Vec<String> = (20000..20020).map(|p| format!("{}:{p}", far.ip4)).collect();
    targets.extend((20100..20105).map(|p| format!("[{}]:{p}", far.ip6)));
    targets.extend((21000..21010).map(|p| format!("{}:{p}", near.ip4)));
    let (ok, reports) = c
        .run_client(client, &client_args(&targets, 200, 20_000))
        .unwrap();
    assert_eq!(reports.len(), 200);
    assert!(
        ok,
        "{:?}",
        reports
            .iter()
            .filter(|r| r["ok"] != true)
            .take(5)
            .collect::<Vec<_>>()
    );
    for r in &reports {
        assert!(proxied(r), "{r}");
        assert_eq!(
            addr(r, "server_local"),
            addr(r, "target"),
            "wrong original destination: {r}"
        );
    }
}

#[test]
fn killed_agent_fails_closed_and_restarted_agent_takes_over() {
    let (c, _srv) = cluster_with_enrolled_client();
    let (client, server) = (c.pod(1, 0), c.pod(2, 0));
    let dst = format!("{}:8080", server.ip4);

    c.stop_agent(1, libc::SIGKILL).unwrap();
    let t = Instant::now();
    let (ok, reports) = c
        .run_client(client, &client_args(&[&dst], 1, 1000))
        .unwrap();
    let took = t.elapsed();
    assert!(
        !ok,
        "connected with the agent dead: the mesh was bypassed: {reports:?}"
    );
    assert_eq!(
        reports[0]["error_kind"], "ConnectionRefused",
        "{}",
        reports[0]
    );
    assert!(
        reports[0]["elapsed_ms"].as_f64().unwrap() < 1000.0,
        "did not fail fast: {}",
        reports[0]
    );
    assert!(took < Duration::from_secs(10));

    c.start_agent(1).unwrap();
    let pods = c.enroll_client(1).unwrap().list().unwrap();
    assert_eq!(
        pods.len(),
        1,
        "restarted agent did not take over the enrolled pod: {pods:?}"
    );
    let (ok, reports) = c.run_client(client, &client_args(&[dst], 1, MB)).unwrap();
    assert!(ok, "{reports:?}\n{}", c.agent_log_tail(1));
    assert!(proxied(&reports[0]), "{}", reports[0]);
}

#[test]
fn malformed_enrollment_requests_are_rejected_and_the_agent_keeps_working() {
    let c = Cluster::new(ClusterSpec::default()).unwrap();
    let (client, server) = (c.pod(1, 0), c.pod(2, 0));
    let _srv = c
        .start_server(server, &[format!("{}:8080", server.ip4)])
        .unwrap();
    let good =
        serde_json::to_string(&ambit_mesh::enroll::Request::Add { pod: client.spec() }).unwrap();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_str(&good).unwrap();
        f(&mut v);
        v.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        (s("this is not json"), "malformed request"),
        (s(r#"{"op":"explode"}"#), "malformed request"),
        (
            with(&|v| {
                v["pod"]
                    .as_object_mut()
                    .unwrap()
                    .remove("ips")
                    .map(drop)
                    .unwrap()
            }),
            "missing field `ips`",
        ),
        (
            with(&|v| v["pod"]["ips"] = serde_json::json!(["10.0.0.300"])),
            "malformed request",
        ),
        (
            with(&|v| v["pod"]["ips"] = serde_json::json!([])),
            "ips is empty",
        ),
        (
            with(&|v| v["pod"]["uid"] = serde_json::json!("")),
            "uid is empty",
        ),
        (
            with(&|v| v["pod"]["netns"] = serde_json::json!("/var/run/netns/does-not-exist")),
            "No such file",
        ),
        (
            with(&|v| v["pod"]["netns"] = serde_json::json!("/etc/hostname")),
            "not a namespace",
        ),
        (
            with(&|v| v["pod"]["surprise"] = serde_json::json!(1)),
            "unknown field",
        ),
        (
            format!(r#"{{"op":"remove","uid":"{}"}}"#, client.uid),
            "not enrolled",
        ),
        ("x".repeat(200_000), "longer than"),
    ];
    for (line, want) in &cases {
        let mut cl = c.enroll_client(1).unwrap();
        let err = cl.send_raw(format!("{line}\n").as_bytes()).expect_err(line);
        assert!(
            err.to_string().contains(want),
            "{:.80}: got {err}, want {want:?}",
            line
        );
    }
    assert!(
        c.enroll_client(1).unwrap().list().unwrap().is_empty(),
        "a bad request changed state"
    );

    // Duplicate uid: the second add is refused and the first stays.
    c.enroll(client).unwrap();
    let err = c.enroll_client(1).unwrap().add(client.spec()).unwrap_err();
    assert!(err.to_string().contains("already enrolled"), "{err}");
    let mut other = c.pod(1, 1).spec();
    other.netns = client.spec().netns;
    let err = c.enroll_client(1).unwrap().add(other).unwrap_err();
    assert!(err.to_string().contains("already enrolled as pod"), "{err}");

    let (ok, reports) = c
        .run_client(
            client,
            &client_args(&[format!("{}:8080", server.ip4)], 1, MB),
        )
        .unwrap();
    assert!(ok && proxied(&reports[0]), "{reports:?}");
    assert!(c.node(1).agent_pid().is_some());
}

/// The ids of the links and maps pinned under `bpffs` (no fd is kept open).
fn pinned_ids(bpffs: &std::path::Path) -> (Vec<u32>, Vec<u32>) {
    use aya::programs::links::{FdLink, PinnedLink};
    let files = |dir: std::path::PathBuf| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_file())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut link_pins = files(bpffs.join("links"));
    link_pins.extend(files(bpffs.join("links/sk_lookup")));
    let links = link_pins
        .iter()
        .map(|p| {
            let link = FdLink::from(PinnedLink::from_pin(p).unwrap());
            link.info().unwrap().id()
        })
        .collect();
    let maps = files(bpffs.join("maps"))
        .iter()
        .map(|p| aya::maps::MapInfo::from_pin(p).unwrap().id())
        .collect();
    (links, maps)
}

#[test]
fn sigterm_drains_and_fails_closed_and_only_uninstall_removes_capture() {
    let (c, _srv) = cluster_with_enrolled_client();
    let (client, server) = (c.pod(1, 0), c.pod(2, 0));
    let dst = format!("{}:8080", server.ip4);

    // A connection open at SIGTERM is drained: it finishes.
    let mut args = vec![s("client")];
    args.extend(client_args(&[&dst], 1, 2 * MB));
    args.push(s("--hold"));
    let mut held = c.spawn_in_pod(client, &args).unwrap();
    held.wait_for_line("connected").unwrap();
    c.signal_agent(1, libc::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while matches!(
        c.http_get(1, "127.0.0.1:15021", "/healthz/ready"),
        Ok((200, _))
    ) {
        assert!(Instant::now() < deadline, "still ready 5 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    // While it drains, new connections fail closed.
    let (ok, reports) = c
        .run_client(client, &client_args(&[&dst], 1, 1000))
        .unwrap();
    assert!(!ok, "connected while the agent drained: {reports:?}");
    held.write_line("go").unwrap();
    let (status, lines) = held.finish(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "the drained connection failed: {lines:?}");
    let r: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert!(proxied(&r) && r["ok"] == true, "{r}");
    let status = c.stop_agent(1, libc::SIGTERM).unwrap();
    assert!(
        status.success(),
        "agent exited with {status}:\n{}",
        c.agent_log_tail(1)
    );

    // Stopped, the agent left capture in place: connections are refused, fast.
    assert!(c.node(1).bpffs_dir.join("links").is_dir(), "pins removed");
    let (ok, reports) = c
        .run_client(client, &client_args(&[&dst], 1, 1000))
        .unwrap();
    assert!(!ok, "the mesh was bypassed after SIGTERM: {reports:?}");
    assert_eq!(
        reports[0]["error_kind"], "ConnectionRefused",
        "{}",
        reports[0]
    );

    // The next agent takes over.
    c.start_agent(1).unwrap();
    let (ok, reports) = c.run_client(client, &client_args(&[&dst], 1, MB)).unwrap();
    assert!(
        ok && proxied(&reports[0]),
        "{reports:?}\n{}",
        c.agent_log_tail(1)
    );

    // `uninstall` refuses while an agent runs, and changes nothing then.
    let out = c.uninstall_agent(1).unwrap();
    assert!(!out.status.success(), "uninstall ran under a live agent");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("an agent is running"),
        "{out:?}"
    );
    let (links, maps) = pinned_ids(&c.node(1).bpffs_dir);
    assert!(links.len() >= 5 && !maps.is_empty(), "{links:?} {maps:?}");

    // Stopped, then uninstalled: every link and map is gone from the kernel, the pins
    // and the state file from disk, and the pod talks directly.
    c.stop_agent(1, libc::SIGTERM).unwrap();
    let out = c.uninstall_agent(1).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!c.node(1).bpffs_dir.exists(), "pins left behind");
    assert!(!c.node(1).state_dir.join("pods.json").exists());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let live_links: Vec<u32> = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .map(|l| l.id())
            .filter(|id| links.contains(id))
            .collect();
        let live_maps: Vec<u32> = aya::maps::loaded_maps()
            .filter_map(Result::ok)
            .map(|m| m.id())
            .filter(|id| maps.contains(id))
            .collect();
        if live_links.is_empty() && live_maps.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still in the kernel after uninstall: links {live_links:?}, maps {live_maps:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, reports) = c
        .run_client(client, &client_args(&[&dst], 1, 1000))
        .unwrap();
    assert!(ok && !proxied(&reports[0]), "{reports:?}");
}

/// Open file descriptors of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn resets_propagate_and_connections_leak_nothing() {
    let (c, _srv) = cluster_with_enrolled_client();
    let (client, server) = (c.pod(1, 0), c.pod(2, 0));
    let dst = format!("{}:8080", server.ip4);
    let agent = c.node(1).agent_pid().unwrap();
    // Warm up (the runtime allocates what it keeps), then take the baseline.
    let (ok, _) = c
        .run_client(client, &client_args(&[&dst], 1, 1000))
        .unwrap();
    assert!(ok);
    let baseline = fd_count(agent);

    // The server aborts: the RST must reach the client through the agent.
    let mut args = client_args(&[&dst], 20, 0);
    args.push(s("--expect-reset"));
    let (ok, reports) = c.run_client(client, &args).unwrap();
    assert!(
        ok,
        "a reset did not propagate: {:?}",
        reports.iter().find(|r| r["ok"] != true)
    );
    assert!(reports.iter().all(proxied));
    // And clean exchanges with half-close (the client shuts down writing first).
    let (ok, reports) = c
        .run_client(client, &client_args(&[dst], 50, 10_000))
        .unwrap();
    assert!(ok, "{reports:?}");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = c.metrics(1).unwrap();
        let active = metric_value(&m, "ambit_outbound_active_connections", &[]).unwrap();
        let fds = fd_count(agent);
        if active == 0.0 && fds <= baseline {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leak: {active} active connections, {fds} fds (baseline {baseline})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = c.metrics(1).unwrap();
    let opened = metric_value(
        &m,
        "ambit_outbound_connections_opened_total",
        &[("workload", &client.name)],
    )
    .unwrap();
    let closed = metric_value(
        &m,
        "ambit_outbound_connections_closed_total",
        &[("workload", &client.name)],
    )
    .unwrap();
    assert_eq!((opened, closed), (71.0, 71.0));
}

#[test]
fn excluded_cidrs_and_ports_are_not_captured() {
    let spec = ClusterSpec {
        agent_args: vec![
            s("--exclude-port=9000"),
            s("--exclude-cidr=10.244.2.11/32"),
            s("--exclude-cidr=fd00:10:244:2::/64"),
        ],
        ..Default::default()
    };
    let c = Cluster::new(spec).unwrap();
    let client = c.pod(1, 0);
    let (s1, s2) = (c.pod(2, 0), c.pod(2, 1));
    let _a = c
        .start_server(
            s1,
            &[
                format!("{}:8080", s1.ip4),
                format!("{}:9000", s1.ip4),
                format!("[{}]:8080", s1.ip6),
            ],
        )
        .unwrap();
    let _b = c.start_server(s2, &[format!("{}:8080", s2.ip4)]).unwrap();
    c.enroll(client).unwrap();
    for (dst, captured) in [
        (format!("{}:8080", s1.ip4), true),
        (format!("{}:9000", s1.ip4), false),
        (format!("{}:8080", s2.ip4), false),
        (format!("[{}]:8080", s1.ip6), false),
    ] {
        let (ok, reports) = c
            .run_client(client, &client_args(&[&dst], 1, 1000))
            .unwrap();
        assert!(ok, "{dst}: {reports:?}");
        assert_eq!(proxied(&reports[0]), captured, "{dst}: {}", reports[0]);
    }
}

#[test]
fn an_agent_inside_the_pod_cgroup_refuses_and_own_cgroup_moves_it_out() {
    let c = Cluster::new(ClusterSpec {
        agents: false,
        pods_per_node: 1,
        ..Default::default()
    })
    .unwrap();
    let node = c.node(1);
    let run = |extra: &[String]| {
        let mut cmd = c.agent_command(1);
        cmd.args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // Started the way a DaemonSet's container is: inside a pod's cgroup.
        let child =
            ambit_tests::process::spawn_in(&node.netns_path(), &c.pod(1, 0).cgroup, &mut cmd)
                .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an agent inside the pod cgroup started"
    );
    assert!(
        stderr.contains("inside the pod cgroup") && stderr.contains("--own-cgroup"),
        "{stderr}"
    );
    // Moved out first, it gets past the check (and then stops at the missing eBPF
    // object, which this test points nowhere on purpose).
    let own = node.agent_cgroup.join("moved");
    let out = run(&[
        format!("--own-cgroup={}", own.display()),
        "--ebpf-object=/nonexistent/ambit-ebpf".into(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("inside the pod cgroup"), "{stderr}");
    assert!(stderr.contains("/nonexistent/ambit-ebpf"), "{stderr}");
}
