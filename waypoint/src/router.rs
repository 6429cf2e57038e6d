//! Picking a route, with Envoy's semantics: the virtual host by `Host` (exact, then the
//! longest suffix wildcard, then the longest prefix wildcard, then `*`), then the first
//! route of that host whose match holds.

use http::request::Parts;

use crate::config::{HeaderMatch, PathMatch, Route, RouteConfig, StringMatch, VirtualHost};

/// The `Host` a request names, without a port, lowercase.
pub fn host_of(parts: &Parts) -> std::borrow::Cow<'_, str> {
    let raw = parts
        .uri
        .authority()
        .map(|a| a.host())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(strip_port)
        })
        .unwrap_or_default();
    // Borrowed unless it needs lowering: no allocation per request for the usual host.
    if raw.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(raw.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(raw)
    }
}

fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        return h.split_once(']').map_or(h, |(a, _)| &a[1..]);
    }
    match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => h,
    }
}

/// The virtual host for `host`.
pub fn virtual_host<'a>(rc: &'a RouteConfig, host: &str) -> Option<&'a VirtualHost> {
    let mut best: Option<(u8, usize, &VirtualHost)> = None;
    for vh in &rc.virtual_hosts {
        for d in &vh.domains {
            let rank = if d == host {
                Some((0, usize::MAX))
            } else if let Some(suffix) = d.strip_prefix('*') {
                (d.len() > 1 && host.ends_with(suffix) && host.len() > suffix.len())
                    .then_some((1, suffix.len()))
                    .or((d == "*").then_some((3, 0)))
            } else if let Some(prefix) = d.strip_suffix('*') {
                (host.starts_with(prefix) && host.len() > prefix.len()).then_some((2, prefix.len()))
            } else {
                None
            };
            if let Some((class, len)) = rank {
                let better = match best {
                    None => true,
                    Some((c, l, _)) => class < c || (class == c && len > l),
                };
                if better {
                    best = Some((class, len, vh));
                }
            }
        }
    }
    best.map(|(_, _, vh)| vh)
}

/// The first route of `vh` that matches.
pub fn route<'a>(vh: &'a VirtualHost, parts: &Parts) -> Option<&'a Route> {
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    vh.routes.iter().find(|r| {
        path_matches(&r.matcher.path, path)
            && r.matcher.headers.iter().all(|h| header_matches(h, parts))
            && r.matcher.query.iter().all(|q| {
                let v = query_value(query, &q.name);
                match (&q.value, v) {
                    (StringMatch::Present, v) => v.is_some(),
                    (m, Some(v)) => string_matches(m, &v),
                    (_, None) => false,
                }
            })
    })
}

/// Does path match `m` hold for `path`?
pub fn path_matches(m: &PathMatch, path: &str) -> bool {
    match m {
        PathMatch::Prefix(p) => path.starts_with(p.as_str()),
        PathMatch::Exact(p) => path == p,
        PathMatch::SeparatedPrefix(p) => path
            .strip_prefix(p.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        PathMatch::Regex(r) => r.is_match(path),
    }
}

/// Does `m` hold for `v`?
pub fn string_matches(m: &StringMatch, v: &str) -> bool {
    match m {
        StringMatch::Exact(s) => v == s,
        StringMatch::Prefix(s) => v.starts_with(s.as_str()),
        StringMatch::Suffix(s) => v.ends_with(s.as_str()),
        StringMatch::Contains(s) => v.contains(s.as_str()),
        StringMatch::Regex(r) => r.is_match(v),
        StringMatch::Present => true,
        StringMatch::IgnoreCase(m) => string_matches(m, &v.to_ascii_lowercase()),
    }
}

/// Does header match `h` hold for the request `parts`?
pub fn header_matches(h: &HeaderMatch, parts: &Parts) -> bool {
    let value: Option<String> = match h.name.as_str() {
        ":method" => Some(parts.method.as_str().to_owned()),
        ":path" => parts.uri.path_and_query().map(|p| p.as_str().to_owned()),
        ":authority" => Some(host_of(parts).into_owned()),
        ":scheme" => Some(parts.uri.scheme_str().unwrap_or("http").to_owned()),
        name => {
            // Several values are matched as Envoy does: joined with ",".
            let vals: Vec<&str> = parts
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!vals.is_empty()).then(|| vals.join(","))
        }
    };
    // As Envoy: a missing header matches no value, inverted or not; only "present"
    // inverts into "absent".
    match (&h.value, value) {
        (StringMatch::Present, v) => v.is_some() != h.invert,
        (m, Some(v)) => string_matches(m, &v) != h.invert,
        (_, None) => false,
    }
}

/// The first value of query parameter `name`, percent-decoded.
fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_as_envoy_matches_them() {
        let sep = PathMatch::SeparatedPrefix("/api".into());
        assert!(path_matches(&sep, "/api"));
        assert!(path_matches(&sep, "/api/v1"));
        assert!(!path_matches(&sep, "/apiv1"));
        assert!(path_matches(&PathMatch::Prefix("/api".into()), "/apiv1"));
        let re = PathMatch::Regex(regex::Regex::new("^(?:/u/[0-9]+)$").unwrap());
        assert!(path_matches(&re, "/u/42") && !path_matches(&re, "/u/42/x"));
    }

    #[test]
    fn query_parameters_are_decoded() {
        assert_eq!(query_value("a=1&b=x%20y", "b").as_deref(), Some("x y"));
        assert_eq!(query_value("a=1&flag", "flag").as_deref(), Some(""));
        assert_eq!(query_value("a=1", "b"), None);
        assert_eq!(query_value("a=%zz", "a").as_deref(), Some("%zz"));
    }

    #[test]
    fn hosts_lose_their_ports() {
        assert_eq!(strip_port("web.shop:80"), "web.shop");
        assert_eq!(strip_port("[fd00::1]:80"), "fd00::1");
        assert_eq!(strip_port("web"), "web");
    }
}
