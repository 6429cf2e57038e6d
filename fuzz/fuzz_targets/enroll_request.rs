//! The enrollment API: one JSON line from the unix socket (what a CNI plugin sends), as
//! the agent decodes and validates it before it touches a network namespace.
#![no_main]

use ambit_mesh::enroll::{MAX_REQUEST_BYTES, Request};
use ambit_node_agent::capture::validate_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    if line.len() > MAX_REQUEST_BYTES {
        return; // the server refuses longer lines before it parses them
    }
    let Ok(request) = serde_json::from_slice::<Request>(line) else {
        return;
    };
    // What was read writes back as the same request.
    let again: Request = serde_json::from_slice(&serde_json::to_vec(&request).unwrap()).unwrap();
    assert_eq!(again, request);
    if let Request::Add { pod } = &request
        && validate_request(pod).is_ok()
    {
        assert!(!pod.ips.is_empty() && !pod.uid.trim().is_empty());
    }
});
