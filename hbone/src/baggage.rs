//! Peer metadata in a W3C `baggage` header, as Istio's ztunnel sends it on HBONE
//! CONNECTs: `k8s.cluster.name`, `k8s.namespace.name`, `k8s.<kind>.name` (the workload:
//! `deployment`, `statefulset`, `daemonset`, `job`, `cronjob`, `replicaset` or `pod`),
//! `service.name` (the canonical service) and `service.version` (its revision). The far
//! side uses it for telemetry only (the source's workload labels); identity comes from
//! the certificate, never from here.
//!
//! Parsing follows the W3C Baggage format: comma-separated `key=value` members,
//! optional `;properties` ignored, values percent-decoded; unknown keys are skipped, and
//! a member that is not well formed is dropped rather than failing the whole header.

/// The longest header read (W3C's limit); a longer one is ignored whole.
pub const MAX_LEN: usize = 8192;

/// Workload kinds as ztunnel names them in `k8s.<kind>.name`.
const KINDS: [&str; 7] = [
    "deployment",
    "statefulset",
    "daemonset",
    "job",
    "cronjob",
    "replicaset",
    "pod",
];

/// What one side says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerMetadata {
    /// `k8s.cluster.name`.
    pub cluster: Option<String>,
    /// `k8s.namespace.name`.
    pub namespace: Option<String>,
    /// The `<kind>` of `k8s.<kind>.name`.
    pub workload_kind: Option<String>,
    /// `k8s.<kind>.name`.
    pub workload: Option<String>,
    /// `service.name`: the canonical service.
    pub service: Option<String>,
    /// `service.version`: the canonical revision.
    pub revision: Option<String>,
}

impl PeerMetadata {
    /// The header value (members in ztunnel's order; absent fields left out).
    pub fn to_header(&self) -> String {
        let mut out = String::new();
        let mut member = |key: &str, value: &Option<String>| {
            if let Some(v) = value {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(key);
                out.push('=');
                encode_into(v, &mut out);
            }
        };
        member("k8s.cluster.name", &self.cluster);
        member("k8s.namespace.name", &self.namespace);
        let kind = self.workload_kind.as_deref().unwrap_or("pod");
        member(&format!("k8s.{kind}.name"), &self.workload);
        member("service.name", &self.service);
        member("service.version", &self.revision);
        out
    }

    /// Reads a `baggage` header value; what it does not carry stays `None`.
    pub fn parse(header: &str) -> Self {
        let mut m = Self::default();
        if header.len() > MAX_LEN {
            return m;
        }
        for member in header.split(',') {
            let kv = member.split(';').next().unwrap_or("").trim();
            let Some((key, value)) = kv.split_once('=') else {
                continue;
            };
            let Some(value) = decode(value.trim()) else {
                continue;
            };
            if value.is_empty() {
                continue;
            }
            match key.trim() {
                "k8s.cluster.name" => m.cluster = Some(value),
                "k8s.namespace.name" => m.namespace = Some(value),
                "service.name" => m.service = Some(value),
                "service.version" => m.revision = Some(value),
                k => {
                    if let Some(kind) = k
                        .strip_prefix("k8s.")
                        .and_then(|k| k.strip_suffix(".name"))
                        .filter(|kind| KINDS.contains(kind))
                    {
                        m.workload_kind = Some(kind.to_owned());
                        m.workload = Some(value);
                    }
                }
            }
        }
        m
    }
}

/// Percent-encodes what a baggage value may not carry (RFC 3986 unreserved plus the
/// sub-delimiters W3C allows stay as they are).
fn encode_into(v: &str, out: &mut String) {
    for b in v.bytes() {
        let plain = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'#'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b'/'
                    | b':'
                    | b'<'
                    | b'>'
                    | b'?'
                    | b'@'
                    | b'['
                    | b']'
                    | b'^'
                    | b'`'
                    | b'{'
                    | b'|'
                    | b'}'
            );
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// Percent-decodes a value; `None` if it is not valid (bad escape, not UTF-8, or a
/// character the format forbids).
fn decode(v: &str) -> Option<String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = v.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if b.is_ascii_graphic() && !matches!(b, b',' | b';' | b'"' | b'\\') => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    #[test]
    fn reads_what_ztunnel_sends() {
        let m = PeerMetadata::parse(
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=frontend,service.name=frontend,service.version=v1",
        );
        assert_eq!(
            m,
            PeerMetadata {
                cluster: some("Kubernetes"),
                namespace: some("shop"),
                workload_kind: some("deployment"),
                workload: some("frontend"),
                service: some("frontend"),
                revision: some("v1"),
            }
        );
    }

    #[test]
    fn round_trips_and_encodes() {
        let m = PeerMetadata {
            cluster: some("Kubernetes"),
            namespace: some("shop"),
            workload_kind: some("pod"),
            workload: some("web 0,\"x\""),
            service: some("web"),
            revision: some("latest"),
        };
        let h = m.to_header();
        assert!(!h.contains(' ') && h.matches(',').count() == 4, "{h}");
        assert_eq!(PeerMetadata::parse(&h), m);
        assert!(http::HeaderValue::from_str(&h).is_ok());
    }

    #[test]
    fn bad_members_are_dropped_not_fatal() {
        let m = PeerMetadata::parse(
            " k8s.namespace.name = shop ;prop=1, service.name=%zz, junk, k8s.secret.name=x, service.version=v%202",
        );
        assert_eq!(m.namespace, some("shop"));
        assert_eq!(m.service, None);
        assert_eq!(m.workload, None, "unknown kinds are ignored");
        assert_eq!(m.revision, some("v 2"));
        assert_eq!(
            PeerMetadata::parse(&"a=b,".repeat(5000)),
            PeerMetadata::default()
        );
    }
}
