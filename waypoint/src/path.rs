//! Path normalization, as Envoy's HTTP connection manager does it before any filter or
//! route sees a request (`normalize_path`, `merge_slashes`): what authorization matches,
//! what routes match and what the upstream receives are one path, so `/a/../admin` or
//! `/%61dmin` cannot slip past a rule on `/admin`.
//!
//! RFC 3986 normalization: percent-encoded unreserved characters are decoded (§6.2.2.2)
//! and other percent-encodings written in upper case (§6.2.2.1), then dot segments are
//! removed (§5.2.4). Encoded slashes (`%2F`) stay encoded (Envoy's default,
//! `KEEP_UNCHANGED`). The query is left alone.

/// The normalized form of `path` (without its query), or `None` if it is not a path
/// (does not start with `/`) and the request must be refused (400), as Envoy does.
pub fn normalize(path: &str, merge_slashes: bool) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let decoded = decode_unreserved(path);
    let mut out = remove_dot_segments(&decoded);
    if merge_slashes {
        let mut merged = String::with_capacity(out.len());
        for c in out.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        out = merged;
    }
    if out.is_empty() {
        out.push('/');
    }
    Some(out)
}

/// Whether `path` is already normal (the common case: no copy needed).
pub fn is_normal(path: &str, merge_slashes: bool) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') || b.contains(&b'%') {
        return b.first() == Some(&b'/') && normalize(path, merge_slashes).as_deref() == Some(path);
    }
    let dots = path.split('/').any(|s| s == "." || s == "..");
    let doubled = merge_slashes && path.contains("//");
    !(dots || doubled)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            let v = (h * 16 + l) as u8;
            if is_unreserved(v) {
                out.push(v as char);
            } else {
                out.push('%');
                out.push(b[i + 1].to_ascii_uppercase() as char);
                out.push(b[i + 2].to_ascii_uppercase() as char);
            }
            i += 3;
            continue;
        }
        // Paths are ASCII on the wire (hyper refuses others); copy byte for byte.
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// RFC 3986 §5.2.4.
fn remove_dot_segments(path: &str) -> String {
    let mut input = path;
    let mut out: Vec<&str> = Vec::new();
    // Segments with their leading '/', as the RFC's algorithm moves them.
    while !input.is_empty() {
        if let Some(rest) = input.strip_prefix("../") {
            input = rest;
        } else if let Some(rest) = input.strip_prefix("./") {
            input = rest;
        } else if input.starts_with("/./") {
            input = &input[2..];
        } else if input == "/." {
            input = "/";
        } else if input.starts_with("/../") {
            input = &input[3..];
            out.pop();
        } else if input == "/.." {
            input = "/";
            out.pop();
        } else if input == "." || input == ".." {
            input = "";
        } else {
            // The first segment: its leading '/' and everything to the next '/'.
            let start = usize::from(input.starts_with('/'));
            let end = input[start..].find('/').map_or(input.len(), |i| i + start);
            out.push(&input[..end]);
            input = &input[end..];
        }
    }
    out.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_go_and_unreserved_escapes_decode() {
        for (raw, want) in [
            ("/a/b/c/./../../g", "/a/g"),
            ("/items/../admin/users", "/admin/users"),
            ("/items/%2e%2e/admin", "/admin"),
            ("/items/%2E%2e/admin", "/admin"),
            ("/%61dmin/users", "/admin/users"),
            ("/a/%7euser", "/a/~user"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb/../c", "/c"),
            ("/a/%zz", "/a/%zz"),
            ("/a/%4", "/a/%4"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/.", "/"),
            ("/a/.", "/a/"),
            ("/a/..", "/"),
            ("/a//b", "/a//b"),
            ("/", "/"),
            ("/a/b/", "/a/b/"),
        ] {
            assert_eq!(normalize(raw, false).as_deref(), Some(want), "{raw}");
            assert_eq!(is_normal(raw, false), raw == want, "{raw}");
        }
        assert_eq!(normalize("/a//b///c", true).as_deref(), Some("/a/b/c"));
        assert!(!is_normal("/a//b", true));
        assert_eq!(normalize("a/b", false), None);
        assert_eq!(normalize("*", false), None);
    }
}
