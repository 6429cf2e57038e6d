//! Workload identities as the mesh names them: SPIFFE IDs of the Kubernetes shape
//! `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
//!
//! An [`Identity`] is parsed once, where it enters the process (a certificate, an xDS
//! resource, a CSR, a mesh file), and is carried as a type from then on: its parts are
//! slices of one shared string, so cloning it is a reference-count bump and asking for
//! its trust domain or namespace never parses again.
//!
//! Istio's authorization policies name identities without the scheme
//! (`cluster.local/ns/shop/sa/web`); that form is a *principal*
//! ([`Identity::principal`]). Patterns over principals live in `ambit-policy`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The URI scheme of SPIFFE IDs.
pub const SCHEME: &str = "spiffe://";

/// Why a string is not a mesh identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// It does not start with `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID (it must start with spiffe://)")]
    NotSpiffe(String),
    /// The trust domain is empty or has characters SPIFFE does not allow.
    #[error("{0:?}: the trust domain must be lowercase letters, digits, '.', '-' or '_'")]
    TrustDomain(String),
    /// The path is not `/ns/<namespace>/sa/<service account>`.
    #[error("{0:?}: the path must be /ns/<namespace>/sa/<service account>")]
    Path(String),
}

/// A workload identity: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
///
/// Equality, ordering and hashing are those of the URI.
#[derive(Clone)]
pub struct Identity {
    uri: Arc<str>,
    /// End of the trust domain in `uri`.
    td_end: u16,
    /// Start and end of the namespace.
    ns: (u16, u16),
    /// Start of the service account (it runs to the end).
    sa_start: u16,
}

/// Longest identity accepted (a SPIFFE ID may be up to 2048 bytes).
const MAX_LEN: usize = 2048;

impl Identity {
    /// Builds the identity of a service account.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The identity a certificate (DER) proves: its one URI SAN, which must be a mesh
    /// identity. An error names what is wrong (unreadable, no or several URI SANs, not
    /// a mesh identity). It does not verify the certificate: callers do, first.
    pub fn from_certificate(der: &[u8]) -> Result<Self, String> {
        use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};
        let (_, c) =
            X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
        let mut uris = Vec::new();
        for ext in c.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for n in &san.general_names {
                    if let GeneralName::URI(u) = n {
                        uris.push(u.to_string());
                    }
                }
            }
        }
        match uris.as_slice() {
            [one] => Self::parse(one).map_err(|e| format!("URI SAN: {e}")),
            _ => Err(format!(
                "the certificate has {} URI SANs, not exactly one",
                uris.len()
            )),
        }
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::NotSpiffe(s.to_owned()))?;
        if s.len() > MAX_LEN {
            let head: String = s.chars().take(64).collect();
            return Err(IdentityError::Path(format!("{head}...")));
        }
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        if td.is_empty()
            || !td
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(IdentityError::TrustDomain(s.to_owned()));
        }
        let path_err = || IdentityError::Path(s.to_owned());
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(path_err());
        };
        if !segment(ns) || !segment(sa) {
            return Err(path_err());
        }
        let td_end = SCHEME.len() + td.len();
        let ns_start = td_end + "/ns/".len();
        let ns_end = ns_start + ns.len();
        let sa_start = ns_end + "/sa/".len();
        Ok(Self {
            uri: s.into(),
            td_end: td_end as u16,
            ns: (ns_start as u16, ns_end as u16),
            sa_start: sa_start as u16,
        })
    }

    /// The whole SPIFFE ID, `spiffe://...`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The identity without the scheme, as Istio's policies write it:
    /// `<td>/ns/<ns>/sa/<sa>`.
    pub fn principal(&self) -> &str {
        &self.uri[SCHEME.len()..]
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end as usize]
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.uri[self.ns.0 as usize..self.ns.1 as usize]
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.uri[self.sa_start as usize..]
    }

    /// The shared string itself (for labels that must own it without copying).
    pub fn to_arc_str(&self) -> Arc<str> {
        self.uri.clone()
    }
}

/// A SPIFFE path segment: not empty, and only letters, digits, `.`, `-` and `_`
/// (never `.` or `..` alone).
fn segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, IdentityError> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for Identity {
    type Error = IdentityError;

    fn try_from(s: &str) -> Result<Self, IdentityError> {
        Self::parse(s)
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.uri == other.uri
    }
}

impl Eq for Identity {}

impl std::hash::Hash for Identity {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.uri.hash(state)
    }
}

impl PartialOrd for Identity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Identity {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.uri.cmp(&other.uri)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.uri)
    }
}

impl std::borrow::Borrow<str> for Identity {
    fn borrow(&self) -> &str {
        &self.uri
    }
}

/// As the SPIFFE ID string.
impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

/// From a SPIFFE ID string; anything else is an error.
impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_slices_of_the_uri() {
        let id = Identity::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.principal(), "cluster.local/ns/shop/sa/web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(Identity::new("cluster.local", "shop", "web").unwrap(), id);
    }

    #[test]
    fn malformed_ids_are_refused_with_a_reason() {
        for (s, want) in [
            ("https://cluster.local/ns/a/sa/b", "not a SPIFFE ID"),
            ("spiffe:///ns/a/sa/b", "trust domain"),
            ("spiffe://Cluster.Local/ns/a/sa/b", "trust domain"),
            ("spiffe://td", "path"),
            ("spiffe://td/ns/a", "path"),
            ("spiffe://td/ns//sa/b", "path"),
            ("spiffe://td/ns/a/sa/b/c", "path"),
            ("spiffe://td/ns/a/sa/", "path"),
            ("spiffe://td/ns/../sa/b", "path"),
            ("spiffe://td/namespace/a/sa/b", "path"),
            ("spiffe://td/ns/a b/sa/c", "path"),
        ] {
            let e = Identity::parse(s).unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
        let long = format!("spiffe://td/ns/{}/sa/b", "a".repeat(3000));
        assert!(Identity::parse(&long).is_err());
    }

    #[test]
    fn serde_round_trip() {
        let id = Identity::parse("spiffe://td/ns/a/sa/b").unwrap();
        let j = serde_json::to_string(&id).unwrap();
        assert_eq!(j, "\"spiffe://td/ns/a/sa/b\"");
        assert_eq!(serde_json::from_str::<Identity>(&j).unwrap(), id);
        assert!(serde_json::from_str::<Identity>("\"td/ns/a/sa/b\"").is_err());
    }
}
