//! The HBONE server's reading of a CONNECT request head (`ConnectRequest::from_head`) and
//! of the `forwarded` and `baggage` headers, from arbitrary method, URI and headers.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use ambit_hbone::baggage::PeerMetadata;
use ambit_hbone::connect::{ConnectRequest, parse_forwarded};
use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Head<'a> {
    method: &'a [u8],
    uri: &'a str,
    headers: Vec<(&'a str, &'a [u8])>,
    forwarded: &'a str,
    baggage: &'a str,
    workload: String,
    ip: IpAddr,
}

fuzz_target!(|head: Head<'_>| {
    // A header value the parser must read without panicking, whatever it holds.
    let _ = parse_forwarded(head.forwarded);
    // What our client writes must read back as the same address.
    let written = match head.ip {
        IpAddr::V4(a) => format!("for={a}"),
        IpAddr::V6(a) => format!("for=\"[{a}]\""),
    };
    assert_eq!(parse_forwarded(&written), Some(head.ip), "{written}");
    // Baggage: any value reads without panicking; what we write reads back the same and
    // is a valid header value.
    let _ = PeerMetadata::parse(head.baggage);
    if !head.workload.is_empty() {
        let meta = PeerMetadata {
            namespace: Some("shop".into()),
            workload_kind: Some("pod".into()),
            workload: Some(head.workload.clone()),
            ..Default::default()
        };
        let h = meta.to_header();
        assert!(HeaderValue::from_str(&h).is_ok(), "{h:?}");
        if h.len() <= ambit_hbone::baggage::MAX_LEN {
            assert_eq!(PeerMetadata::parse(&h), meta, "{h:?}");
        }
    }

    let (Ok(method), Ok(uri)) = (Method::from_bytes(head.method), head.uri.parse::<Uri>()) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for (name, value) in head.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    if let Ok(req) = ConnectRequest::from_head(&method, &uri, &headers) {
        // Only a CONNECT to a literal ip:port is a tunnel.
        assert_eq!(method, Method::CONNECT);
        let authority = uri
            .authority()
            .expect("an accepted request has an authority");
        assert_eq!(
            authority.as_str().parse::<SocketAddr>().ok(),
            Some(req.authority)
        );
    }
});
