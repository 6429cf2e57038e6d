//! The mesh file (YAML written by a user): parsed and validated, and, when valid,
//! translated into xDS resources that every node agent must accept. A mesh the control
//! plane takes but an agent NACKs would stall the whole mesh on that version. And a
//! version re-parsed incrementally (after another) must read as the full parse reads it.
#![no_main]

use std::path::Path;

use ambit_control_plane::source::file;
use ambit_control_plane::translate::Snapshot;
use ambit_node_agent::state::xds::{decode_authorization, decode_service, decode_workload};
use ambit_xds::type_url;
use libfuzzer_sys::fuzz_target;

const EXAMPLE: &str = include_str!("../../examples/mesh.yaml");

fuzz_target!(|text: &str| {
    let path = Path::new("fuzz.yaml");
    let full = format!("{:?}", file::parse_spec(path, text));
    // After the example, and after this text without its last line.
    let shorter = text.trim_end_matches('\n').rsplit_once('\n').map_or("", |(a, _)| a);
    let model = file::parse(path, text);
    for before in [EXAMPLE, shorter] {
        let mut r = file::Reparser::new();
        let _ = r.parse_spec(path, before);
        assert_eq!(full, format!("{:?}", r.parse_spec(path, text)), "after {before:?}");
        // Derived from the version before: the model (or the refusal) of a full parse.
        if let Ok(mut derived) = file::Derived::load(path, before) {
            let got = derived.next(path, text);
            assert_eq!(
                format!("{:?}", model.as_ref().map_err(ToString::to_string)),
                format!("{:?}", got.as_ref().map_err(ToString::to_string)),
                "derived after {before:?}"
            );
        }
    }
    let Ok(model) = model else {
        return;
    };
    let snapshot = Snapshot::from_model(&model);
    assert!(!snapshot.version().is_empty());
    for node in model.workloads.values().map(|w| w.node.as_str()) {
        for r in snapshot.resources(node, type_url::WORKLOAD) {
            decode_workload(&r.name, &r.resource.value).expect("agents accept every workload");
        }
        for r in snapshot.resources(node, type_url::SERVICE) {
            decode_service(&r.name, &r.resource.value).expect("agents accept every service");
        }
        for r in snapshot.resources(node, type_url::AUTHORIZATION) {
            decode_authorization(&r.name, &r.resource.value).expect("agents accept every policy");
        }
    }
});
