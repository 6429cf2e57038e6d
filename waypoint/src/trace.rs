//! W3C Trace Context (`traceparent`): a request's trace is propagated as it came, or
//! started when it came without a valid one, so that the access logs of every hop (and,
//! later, spans) share its trace id.

/// The header's name.
pub const TRACEPARENT: &str = "traceparent";

/// A new `traceparent`: random trace and parent ids, not sampled (the waypoint records
/// no spans of its own).
pub fn new_traceparent() -> String {
    format!(
        "00-{:016x}{:016x}-{:016x}-00",
        fastrand::u64(1..),
        fastrand::u64(..),
        fastrand::u64(1..)
    )
}

/// Whether `v` is a `traceparent` to propagate (W3C Trace Context level 1, §3.2): version
/// `00` exactly 55 characters, a later version at least that with `-` after them;
/// lowercase hex ids, neither all zeros; version `ff` is invalid. The rules are
/// [`ambit_otel::parse_traceparent`]'s, shared with the spans.
pub fn is_valid(v: &[u8]) -> bool {
    std::str::from_utf8(v)
        .ok()
        .and_then(ambit_otel::parse_traceparent)
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_checked_as_the_spec_says() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(is_valid(good.as_bytes()));
        assert!(
            is_valid(new_traceparent().as_bytes()),
            "{}",
            new_traceparent()
        );
        // A later version may carry more, after a dash.
        assert!(is_valid(format!("01{}-xyz", &good[2..]).as_bytes()));
        for bad in [
            "",
            &good[..54],
            &format!("{good}-"),
            &good.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)),
            &good.replace("00f067aa0ba902b7", &"0".repeat(16)),
            &good.replace("4bf9", "4BF9"),
            &good.replacen("00", "ff", 1),
            &good.replace("-01", "-0x"),
            &good.replacen('-', "_", 1),
        ] {
            assert!(!is_valid(bad.as_bytes()), "{bad:?}");
        }
    }
}
