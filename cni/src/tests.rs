use std::io;

use ambit_mesh::enroll::{EnrollError, EnrolledPod, PodSpec};
use rscni_plugin::types::NetConf;

use super::*;

/// The agent as the decision logic sees it: the pods it knows, or not answering.
#[derive(Default)]
struct Known {
    pods: Vec<EnrolledPod>,
    refuse: Option<String>,
    calls: Vec<String>,
}

impl Agent for Known {
    fn list(&mut self) -> Result<Vec<EnrolledPod>, EnrollError> {
        self.calls.push("list".into());
        Ok(self.pods.clone())
    }
    fn add(&mut self, spec: PodSpec) -> Result<EnrolledPod, EnrollError> {
        self.calls.push(format!("add {}", spec.uid));
        if let Some(m) = &self.refuse {
            return Err(EnrollError::Refused(m.clone()));
        }
        let p = EnrolledPod {
            spec,
            workload_id: 1,
            netns_cookie: 1,
            captured: true,
        };
        self.pods.push(p.clone());
        Ok(p)
    }
    fn remove(&mut self, uid: &str) -> Result<(), EnrollError> {
        self.calls.push(format!("remove {uid}"));
        self.pods.retain(|p| p.spec.uid != uid);
        Ok(())
    }
}

fn down() -> Result<&'static mut dyn Agent, EnrollError> {
    Err(EnrollError::Io(io::Error::from(
        io::ErrorKind::ConnectionRefused,
    )))
}

fn pod() -> PodRef {
    PodRef::from_cni_args(
        Some("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u-1"),
        "c1",
    )
    .unwrap()
}

fn ips() -> Vec<IpAddr> {
    vec!["10.244.1.5".parse().unwrap()]
}

fn shop() -> BTreeSet<String> {
    ["shop".to_string()].into()
}

#[test]
fn cni_args_name_the_pod_and_a_missing_uid_falls_back_to_the_container() {
    assert_eq!(
        pod(),
        PodRef {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "u-1".into()
        }
    );
    let p = PodRef::from_cni_args(Some("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b"), "abc").unwrap();
    assert_eq!(p.uid, "cni-abc");
    let e = PodRef::from_cni_args(Some("K8S_POD_NAME=b"), "abc").unwrap_err();
    assert!(e.to_string().contains("K8S_POD_NAMESPACE"), "{e}");
    assert!(PodRef::from_cni_args(Some("novalue"), "abc").is_err());
    assert!(PodRef::from_cni_args(None, "abc").is_err());
}

#[test]
fn the_plugin_config_has_defaults_and_rejects_bad_paths() {
    let conf = |extra: &str| -> NetConf {
        serde_json::from_str(&format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni"{extra}}}"#
        ))
        .unwrap()
    };
    let c = Config::from_net_conf(&conf("")).unwrap();
    assert_eq!(c.enroll_socket, PathBuf::from(DEFAULT_ENROLL_SOCKET));
    let c = Config::from_net_conf(&conf(r#","enrollSocket":"/x.sock","stateDir":"/s""#)).unwrap();
    assert_eq!(
        (c.enroll_socket, c.state_dir),
        ("/x.sock".into(), "/s".into())
    );
    assert!(Config::from_net_conf(&conf(r#","enrollSocket":3"#)).is_err());
}

#[test]
fn the_pods_ips_come_from_the_previous_result_one_per_family() {
    let prev: CNIResult = serde_json::from_str(
        r#"{"cniVersion":"1.0.0","ips":[{"address":"10.244.1.5/24"},{"address":"10.244.1.6/24"},{"address":"fd00::5/64"}]}"#,
    )
    .unwrap();
    let got = pod_ips(Some(&prev)).unwrap();
    assert_eq!(
        got,
        [
            "10.244.1.5".parse::<IpAddr>().unwrap(),
            "fd00::5".parse().unwrap()
        ]
    );
    assert!(pod_ips(None).unwrap_err().to_string().contains("chained"));
    assert!(pod_ips(Some(&CNIResult::default())).is_err());
}

#[test]
fn add_enrolls_and_is_idempotent_and_a_new_sandbox_replaces_the_old() {
    let mut agent = Known::default();
    let netns = Path::new("/var/run/netns/a");
    let p = add(Ok(&mut agent), &shop(), &pod(), netns, ips())
        .unwrap()
        .unwrap();
    assert_eq!(p.spec.uid, "u-1");
    // The kubelet retries the same ADD: nothing changes.
    add(Ok(&mut agent), &shop(), &pod(), netns, ips())
        .unwrap()
        .unwrap();
    assert_eq!(agent.calls, ["list", "add u-1", "list"]);
    // A new sandbox (another netns) of the same pod replaces the old enrollment.
    agent.calls.clear();
    add(
        Ok(&mut agent),
        &shop(),
        &pod(),
        Path::new("/var/run/netns/b"),
        ips(),
    )
    .unwrap();
    assert_eq!(agent.calls, ["list", "remove u-1", "add u-1"]);
    assert_eq!(agent.pods.len(), 1);
}

#[test]
fn an_absent_agent_holds_pods_of_enrolled_namespaces_only() {
    let netns = Path::new("/var/run/netns/a");
    let e = add(down(), &shop(), &pod(), netns, ips()).unwrap_err();
    assert!(matches!(e, Error::TryAgainLater(_)), "{e:?}");
    assert!(e.to_string().contains("shop"), "{e}");
    // Another namespace starts at once, uncaptured.
    let other: BTreeSet<String> = ["prod".to_string()].into();
    assert_eq!(add(down(), &other, &pod(), netns, ips()).unwrap(), None);
    assert_eq!(
        add(down(), &BTreeSet::new(), &pod(), netns, ips()).unwrap(),
        None
    );
}

#[test]
fn a_refusal_fails_an_enrolled_pod_and_lets_another_start() {
    let netns = Path::new("/var/run/netns/a");
    let mut agent = Known {
        refuse: Some("netns does not exist".into()),
        ..Default::default()
    };
    let e = add(Ok(&mut agent), &shop(), &pod(), netns, ips()).unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
    assert_eq!(
        add(Ok(&mut agent), &BTreeSet::new(), &pod(), netns, ips()).unwrap(),
        None
    );
}

#[test]
fn del_releases_known_pods_and_never_fails() {
    let mut agent = Known::default();
    add(Ok(&mut agent), &shop(), &pod(), Path::new("/n"), ips()).unwrap();
    del(Ok(&mut agent), &pod()).unwrap();
    assert!(agent.pods.is_empty());
    del(Ok(&mut agent), &pod()).unwrap();
    del(down(), &pod()).unwrap();
}

#[test]
fn check_wants_enrolled_namespaces_pods_known_to_the_agent() {
    let mut agent = Known::default();
    assert!(check(Ok(&mut agent), &shop(), &pod()).is_err());
    check(Ok(&mut agent), &BTreeSet::new(), &pod()).unwrap();
    add(Ok(&mut agent), &shop(), &pod(), Path::new("/n"), ips()).unwrap();
    check(Ok(&mut agent), &shop(), &pod()).unwrap();
    assert!(matches!(
        check(down(), &shop(), &pod()),
        Err(Error::TryAgainLater(_))
    ));
}
