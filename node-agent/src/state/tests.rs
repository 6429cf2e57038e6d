use ambit_xds::ambit;
use ambit_xds::client::{Handler, Update, Version};
use ambit_xds::envoy::Any;
use ambit_xds::type_url;
use prost::Message;

use super::xds::StoreHandler;
use super::*;

/// An update of `name` at version 1.
fn update(name: &str, body: Any) -> Update {
    Update {
        name: name.into(),
        version: Version::new("0000000000000001"),
        body,
    }
}

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.into(),
        value: m.encode_to_vec(),
    }
}

fn workload(uid: &str, node: &str, ips: Vec<Vec<u8>>) -> ambit::Workload {
    ambit::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "a".into(),
        service_account: "b".into(),
        node: node.into(),
        ips,
        enrolled: true,
        identity: "spiffe://td/ns/a/sa/b".into(),
        labels: [("app".to_string(), "web".to_string())].into(),
        ..Default::default()
    }
}

fn handler() -> (Arc<Store>, StoreHandler) {
    let store = Arc::new(Store::new("n"));
    let h = StoreHandler::new(store.clone());
    (store, h)
}

fn put(h: &mut StoreHandler, w: ambit::Workload) {
    let name = w.uid.clone();
    h.apply(
        type_url::WORKLOAD,
        vec![update(&name, any(type_url::WORKLOAD, &w))],
        vec![],
    )
    .unwrap();
}

#[test]
fn applies_valid_updates_and_removals() {
    let (store, mut h) = handler();
    let mut changes = store.changes();
    put(&mut h, workload("a", "n", vec![vec![10, 0, 0, 1]]));
    assert!(store.workload("a").is_some_and(|w| w.enrolled()));
    assert!(changes.has_changed().unwrap());
    changes.mark_unchanged();
    h.apply(type_url::WORKLOAD, vec![], vec!["a".into()])
        .unwrap();
    assert!(store.workload("a").is_none_or(|w| !w.enrolled()));
    assert!(changes.has_changed().unwrap());
}

#[test]
fn indexes_follow_updates_and_only_local_workloads_keep_labels() {
    let (store, mut h) = handler();
    put(&mut h, workload("a", "n", vec![vec![10, 0, 0, 1]]));
    put(&mut h, workload("b", "other", vec![vec![10, 0, 0, 2]]));
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    store.read(|s| {
        assert_eq!(&*s.workload_by_ip(ip("10.0.0.1")).unwrap().uid, "a");
        assert!(!s.workload("a").unwrap().labels().is_empty());
        assert!(s.workload("b").unwrap().labels.is_none());
        assert_eq!(s.workload("b").unwrap().canonical().service, "web".into());
        assert_eq!(s.local_identities().len(), 1);
    });
    // An IP change moves the index entry.
    put(&mut h, workload("a", "n", vec![vec![10, 0, 0, 9]]));
    store.read(|s| {
        assert!(s.workload_by_ip(ip("10.0.0.1")).is_none());
        assert_eq!(&*s.workload_by_ip(ip("10.0.0.9")).unwrap().uid, "a");
    });
    // An update replaces only its own entry: a connection holding the old `b` keeps it,
    // and `a` is the very same allocation as before.
    let held_a = store.workload("a").unwrap();
    let held_b = store.workload("b").unwrap();
    put(&mut h, workload("b", "other", vec![vec![10, 0, 0, 3]]));
    assert!(Arc::ptr_eq(&held_a, &store.workload("a").unwrap()));
    assert!(!Arc::ptr_eq(&held_b, &store.workload("b").unwrap()));
    assert_eq!(held_b.ips.iter().collect::<Vec<_>>(), vec![ip("10.0.0.2")]);
}

#[test]
fn a_reused_ip_finds_its_older_holder_again_when_the_newer_one_leaves() {
    let (store, mut h) = handler();
    let ip = "10.0.0.1".parse::<IpAddr>().unwrap();
    // A new pod takes an IP whose old pod's removal has not arrived yet...
    put(&mut h, workload("old", "n", vec![vec![10, 0, 0, 1]]));
    put(&mut h, workload("new", "n", vec![vec![10, 0, 0, 1]]));
    assert_eq!(
        &*store.read(|s| s.workload_by_ip(ip).cloned()).unwrap().uid,
        "new"
    );
    // ...then the new one goes first: the IP is the old one's again, not nobody's.
    h.apply(type_url::WORKLOAD, vec![], vec!["new".into()])
        .unwrap();
    assert_eq!(
        &*store.read(|s| s.workload_by_ip(ip).cloned()).unwrap().uid,
        "old"
    );
    store.read(MeshState::check_indexes).unwrap();
    h.apply(type_url::WORKLOAD, vec![], vec!["old".into()])
        .unwrap();
    assert!(store.read(|s| s.workload_by_ip(ip).is_none()));
    store.read(MeshState::check_indexes).unwrap();
}

#[test]
fn canonical_names_share_one_allocation_per_value_and_the_defaults() {
    let labels: Labels = [("app".to_string(), "web".to_string())].into();
    let (a, b) = (
        Canonical::derive("a", &labels),
        Canonical::derive("b", &labels),
    );
    assert_eq!(
        (&*a.service, &*a.app, &*a.revision, &*a.version),
        ("web", "web", "latest", "unknown")
    );
    assert!(
        Arc::ptr_eq(&a.service, &a.app),
        "one allocation for one value"
    );
    assert!(Arc::ptr_eq(&a.revision, &b.revision) && Arc::ptr_eq(&a.version, &b.version));
    let named = Canonical::derive("pod-1", &Labels::new());
    assert_eq!((&*named.service, &*named.app), ("pod-1", "unknown"));
}

#[test]
fn workloads_share_what_they_have_in_common_and_the_dump_still_shows_it_all() {
    let (store, mut h) = handler();
    let mut waypoint = workload("w1", "node-x", vec![vec![10, 0, 0, 1]]);
    waypoint.waypoint = "wp".into();
    put(&mut h, waypoint);
    let mut w2 = workload("w2", "node-x", vec![vec![10, 0, 0, 2], vec![0xfd; 16]]);
    w2.waypoint = "wp".into();
    put(&mut h, w2);
    let (a, b) = (store.workload("w1").unwrap(), store.workload("w2").unwrap());
    // One placement (node-x behind wp), and its names shared with every other.
    assert!(Arc::ptr_eq(&a.placement, &b.placement));
    assert_eq!((a.node(), a.waypoint()), ("node-x", Some("wp")));
    assert!(Arc::ptr_eq(a.identity(), b.identity()));
    assert!(Arc::ptr_eq(
        &a.canonical().revision,
        &b.canonical().revision
    ));
    assert_eq!((a.namespace(), a.service_account()), ("a", "b"));
    assert_eq!(b.ips.len(), 2);
    assert_eq!(
        store.read(|s| s
            .workload_by_ip("fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd".parse().unwrap())
            .map(|w| w.uid.clone())),
        Some("w2".into())
    );
    let dump = store.read(|s| serde_json::to_value(s).unwrap());
    let w = &dump["workloads"]["w2"];
    assert_eq!(w["namespace"], "a");
    assert_eq!(w["service_account"], "b");
    assert_eq!(
        w["ips"],
        serde_json::json!(["10.0.0.2", "fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd"])
    );
    assert_eq!(w["identity"], "spiffe://td/ns/a/sa/b");
    // Moved to other nodes many times over: the names nobody holds any more are let go
    // (a sweep runs once as many were handed out as the last one kept, at least 16).
    drop((a, b));
    for i in 0..200 {
        put(
            &mut h,
            workload("w1", &format!("node-{i}"), vec![vec![10, 0, 0, 1]]),
        );
    }
    let held = h.shared_strings();
    assert!(
        held <= 20,
        "{held} shared strings held for 2 nodes and a waypoint"
    );
    store.read(|s| s.check_indexes()).unwrap();
}

#[test]
fn a_pod_not_yet_described_is_captured_when_its_namespace_is_enrolled() {
    let (store, mut h) = handler();
    assert!(!store.captures("new", "a"), "nothing is enrolled yet");
    put(&mut h, workload("w1", "other", vec![vec![10, 0, 0, 1]]));
    assert!(
        store.captures("new", "a"),
        "namespace a has an enrolled workload"
    );
    assert!(!store.captures("new", "b"));
    // Once described, the workload's own flag decides.
    let mut opted_out = workload("new", "n", vec![vec![10, 0, 0, 2]]);
    opted_out.enrolled = false;
    put(&mut h, opted_out);
    assert!(!store.captures("new", "a"));
    assert_eq!(
        store.read(MeshState::enrolled_namespaces),
        ["a".to_string()].into()
    );
    h.apply(type_url::WORKLOAD, vec![], vec!["w1".into()])
        .unwrap();
    assert!(store.read(MeshState::enrolled_namespaces).is_empty());
    store.read(MeshState::check_indexes).unwrap();
}

#[test]
fn a_bad_resource_rejects_the_whole_update() {
    let (store, mut h) = handler();
    let good = update(
        "a",
        any(
            type_url::WORKLOAD,
            &workload("a", "n", vec![vec![10, 0, 0, 1]]),
        ),
    );
    let bad = update(
        "b",
        any(type_url::WORKLOAD, &workload("b", "n", vec![vec![1, 2, 3]])),
    );
    let err = h
        .apply(type_url::WORKLOAD, vec![good, bad], vec![])
        .unwrap_err();
    assert_eq!(err.to_string(), "resource b: an IP address of 3 bytes");
    assert_eq!(
        store.read(|s| s.counts()),
        (0, 0, 0),
        "part of a rejected update was applied"
    );
    let garbage = update(
        "c",
        Any {
            type_url: type_url::WORKLOAD.into(),
            value: vec![0xff, 0xff, 0xff],
        },
    );
    assert!(
        h.apply(type_url::WORKLOAD, vec![garbage], vec![])
            .unwrap_err()
            .to_string()
            .starts_with("resource c: not a Workload")
    );
    let renamed = update(
        "x",
        any(
            type_url::WORKLOAD,
            &workload("a", "n", vec![vec![10, 0, 0, 1]]),
        ),
    );
    assert!(
        h.apply(type_url::WORKLOAD, vec![renamed], vec![])
            .unwrap_err()
            .to_string()
            .contains("differs from the resource name")
    );
    let mut liar = workload("d", "n", vec![vec![10, 0, 0, 4]]);
    liar.identity = "spiffe://td/ns/kube-system/sa/admin".into();
    let e = h
        .apply(
            type_url::WORKLOAD,
            vec![update("d", any(type_url::WORKLOAD, &liar))],
            vec![],
        )
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("does not name the workload's namespace"),
        "{e}"
    );
}

#[test]
fn policies_are_indexed_by_namespace_and_bad_cidrs_are_refused() {
    let (store, mut h) = handler();
    let rule = |len| ambit::Rule {
        from: vec![ambit::SourceMatch {
            principals: vec!["cluster.local/ns/a/sa/b".into()],
            ip_blocks: vec![ambit::Cidr {
                address: vec![10, 0, 0, 0],
                length: len,
            }],
            ..Default::default()
        }],
        to: vec![ambit::DestinationMatch {
            ports: vec![8080],
            not_ports: vec![],
        }],
    };
    let policy = |len| ambit::Authorization {
        name: "p".into(),
        namespace: "shop".into(),
        action: ambit::authorization::Action::Deny as i32,
        rules: vec![rule(len)],
        ..Default::default()
    };
    h.apply(
        type_url::AUTHORIZATION,
        vec![update("shop/p", any(type_url::AUTHORIZATION, &policy(8)))],
        vec![],
    )
    .unwrap();
    store.read(|s| {
        let p = &s.policies_for("shop")[0];
        assert_eq!(p.action, ambit_policy::Action::Deny);
        assert_eq!(
            p.rules[0].from[0].ip_blocks,
            vec!["10.0.0.0/8".parse().unwrap()]
        );
        assert_eq!(p.rules[0].to[0].ports, vec![8080]);
        assert!(s.policies_for("other").is_empty());
    });
    let err = h
        .apply(
            type_url::AUTHORIZATION,
            vec![update("shop/p", any(type_url::AUTHORIZATION, &policy(33)))],
            vec![],
        )
        .unwrap_err();
    assert!(err.to_string().contains("bad prefix length"), "{err}");
    h.apply(type_url::AUTHORIZATION, vec![], vec!["shop/p".into()])
        .unwrap();
    assert!(store.read(|s| s.policies_for("shop").is_empty()));
}

/// What the handler says it holds, by name: what a reconnect tells the control plane.
fn held(h: &StoreHandler, type_url: &str) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    h.held(type_url, &mut |name, v| {
        assert!(
            out.insert(name.to_owned(), v.to_string()).is_none(),
            "{name} twice"
        );
    });
    out
}

#[test]
fn the_versions_held_are_those_last_applied_exactly_as_they_came() {
    let (_store, mut h) = handler();
    let at = |name: &str, version: &str, ip: u8| Update {
        name: name.into(),
        version: Version::new(version),
        body: any(
            type_url::WORKLOAD,
            &workload(name, "n", vec![vec![10, 0, 0, ip]]),
        ),
    };
    let hex = "00a1b2c3d4e5f607";
    let count = h
        .apply(
            type_url::WORKLOAD,
            vec![at("a", hex, 1), at("b", "v-7", 2), at("c", "", 3)],
            vec![],
        )
        .unwrap();
    assert_eq!(count, 3);
    let want = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(
        held(&h, type_url::WORKLOAD),
        want(&[("a", hex), ("b", "v-7"), ("c", "")])
    );
    // A text version replaced by a hex one, and a hex one by text.
    h.apply(
        type_url::WORKLOAD,
        vec![at("b", "ffffffffffffffff", 2), at("a", "A", 1)],
        vec![],
    )
    .unwrap();
    assert_eq!(
        held(&h, type_url::WORKLOAD),
        want(&[("a", "A"), ("b", "ffffffffffffffff"), ("c", "")])
    );
    // A refused update changes no version; a removal forgets one.
    let bad = Update {
        body: any(type_url::WORKLOAD, &workload("x", "n", vec![vec![1]])),
        ..at("x", hex, 9)
    };
    assert!(
        h.apply(type_url::WORKLOAD, vec![at("a", hex, 1), bad], vec![])
            .is_err()
    );
    let count = h
        .apply(type_url::WORKLOAD, vec![], vec!["a".into(), "c".into()])
        .unwrap();
    assert_eq!(count, 1);
    assert_eq!(
        held(&h, type_url::WORKLOAD),
        want(&[("b", "ffffffffffffffff")])
    );
    // Services and policies keep theirs beside them.
    let svc = ambit::Service {
        name: "web".into(),
        namespace: "a".into(),
        hostname: "web.a.svc.cluster.local".into(),
        vips: vec![vec![10, 96, 0, 1]],
        endpoints: vec!["b".into()],
        ..Default::default()
    };
    let s = |version: &str| Update {
        name: "a/web".into(),
        version: Version::new(version),
        body: any(type_url::SERVICE, &svc),
    };
    assert_eq!(
        h.apply(type_url::SERVICE, vec![s("s1")], vec![]).unwrap(),
        1
    );
    h.apply(type_url::SERVICE, vec![s("s2")], vec![]).unwrap();
    assert_eq!(held(&h, type_url::SERVICE), want(&[("a/web", "s2")]));
    assert_eq!(
        h.apply(type_url::SERVICE, vec![], vec!["a/web".into()])
            .unwrap(),
        0
    );
    assert!(held(&h, type_url::SERVICE).is_empty());
    assert!(held(&h, type_url::AUTHORIZATION).is_empty());
}

#[test]
fn a_workload_fits_one_96_byte_heap_chunk_with_its_arc_counts() {
    // 10k of them per agent: the struct (72) and the `Arc`'s two counts (16) are 88
    // bytes, which glibc serves from a 96-byte chunk (8 bytes of it its header); one
    // byte more would take a 112-byte one.
    assert_eq!(std::mem::size_of::<Workload>(), 72);
    // A service: 112 and 16, one 144-byte chunk.
    assert_eq!(std::mem::size_of::<Service>(), 112);
}
