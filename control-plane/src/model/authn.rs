//! Request authentication at waypoints: Istio `RequestAuthentication`s with
//! `targetRefs`, the JWTs a waypoint accepts for a service. A request with a valid token
//! gets a request principal (`<iss>/<sub>`) and claims that authorization policies can
//! match; one with an invalid token is refused (401); one without a token passes
//! unauthenticated (an authorization policy may require a request principal).
//!
//! Keys come inline (`jwks`) or from a `jwksUri` served inside the mesh (an
//! `http://<service>.<namespace>.svc.cluster.local[:port]/...` URL: the waypoint fetches
//! it through that service's cluster, over HBONE when it is enrolled, caches it, and
//! fetches it again when a token names a key it does not have).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::authz::{PolicyTarget, TargetRefSpec};
use super::{NamespacedName, Problems, Service, Waypoint};

/// A `RequestAuthentication` as a source reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct RequestAuthenticationSpec {
    /// Its name, unique in its namespace.
    pub name: String,
    /// Its namespace: its targets' too.
    pub namespace: String,
    /// What it applies to (a Service through a waypoint, or the waypoint's Gateway).
    pub target_refs: Vec<TargetRefSpec>,
    /// The issuers it accepts tokens of.
    pub jwt_rules: Vec<JwtRuleSpec>,
}

/// Istio's `JWTRule`, as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct JwtRuleSpec {
    /// The `iss` tokens must have.
    pub issuer: String,
    /// One of these must be in the token's `aud` (none: any audience).
    pub audiences: Vec<String>,
    /// Where the keys are (in the mesh).
    pub jwks_uri: Option<String>,
    /// The keys, inline (a JWKS document).
    pub jwks: Option<String>,
    /// Headers the token may come in (default: `Authorization: Bearer <token>`).
    pub from_headers: Vec<JwtHeaderSpec>,
    /// Query parameters the token may come in (default: `access_token`).
    pub from_params: Vec<String>,
    /// Cookies the token may come in.
    pub from_cookies: Vec<String>,
    /// Claims copied into request headers for the backend.
    pub output_claim_to_headers: Vec<ClaimToHeaderSpec>,
    /// The header the verified payload is sent in (base64url), if any.
    pub output_payload_to_header: Option<String>,
    /// Keep the token in the request (else it is removed once verified).
    pub forward_original_token: bool,
    /// How long fetching the keys may take (default 5 s).
    pub timeout: Option<String>,
}

/// `fromHeaders[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct JwtHeaderSpec {
    /// The header.
    pub name: String,
    /// What precedes the token in it (`Bearer `).
    pub prefix: String,
}

/// `outputClaimToHeaders[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ClaimToHeaderSpec {
    /// The request header set.
    pub header: String,
    /// The claim copied (a string, number or boolean; nested with `.`).
    pub claim: String,
}

/// A validated `RequestAuthentication`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestAuthentication {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// What it applies to.
    pub targets: Vec<PolicyTarget>,
    /// Its issuers.
    pub rules: Vec<JwtRule>,
}

/// A validated JWT rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtRule {
    /// The issuer.
    pub issuer: String,
    /// Accepted audiences (none: any).
    pub audiences: Vec<String>,
    /// Where its keys come from.
    pub keys: Jwks,
    /// Headers (name, prefix); empty with no params and cookies: Istio's default.
    pub from_headers: Vec<(String, String)>,
    /// Query parameters.
    pub from_params: Vec<String>,
    /// Cookies.
    pub from_cookies: Vec<String>,
    /// (header, claim path).
    pub claim_to_headers: Vec<(String, String)>,
    /// The payload's header, if any.
    pub payload_header: Option<String>,
    /// Keep the token.
    pub forward: bool,
    /// How long a fetch may take.
    pub timeout: Duration,
}

/// A rule's keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Jwks {
    /// Inline (the JWKS document, checked).
    Inline(String),
    /// Fetched from a service of the mesh.
    Remote {
        /// The URL as written.
        uri: String,
        /// The service serving it.
        service: NamespacedName,
        /// Its port.
        port: u16,
    },
}

impl RequestAuthentication {
    /// Does it apply to requests for `service` through `waypoint` (both of `namespace`)?
    pub fn applies_to(&self, namespace: &str, service: &str, waypoint: &str) -> bool {
        self.namespace == namespace
            && self.targets.iter().any(|t| match t {
                PolicyTarget::Service(s) => s == service,
                PolicyTarget::Waypoint(w) => w == waypoint,
            })
    }
}

/// How long fetching keys may take unless a rule says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks the request authentications against the services and waypoints.
pub(super) fn validate(
    p: &mut Problems,
    specs: Vec<RequestAuthenticationSpec>,
    services: &imbl::OrdMap<NamespacedName, std::sync::Arc<Service>>,
    waypoints: &BTreeMap<NamespacedName, Waypoint>,
) -> BTreeMap<NamespacedName, RequestAuthentication> {
    let mut out = BTreeMap::new();
    for ra in specs {
        let place = format!("requestAuthentications ({}/{})", ra.namespace, ra.name);
        let before = p.0.len();
        let key = NamespacedName {
            namespace: ra.namespace.clone(),
            name: ra.name.clone(),
        };
        if !super::is_dns_subdomain(&ra.name) {
            p.add(&place, "name must be a DNS name");
        }
        if out.contains_key(&key) {
            p.add(&place, format!("{key} is defined twice"));
        }
        if ra.target_refs.is_empty() {
            p.add(&place, "targetRefs is empty: a waypoint authenticates requests for the services or the waypoint it names");
        }
        let targets = super::authz::targets(
            p,
            &place,
            &ra.namespace,
            &ra.target_refs,
            services,
            waypoints,
        );
        if ra.jwt_rules.is_empty() {
            p.add(&place, "jwtRules is empty");
        }
        let mut rules = Vec::new();
        let mut issuers = std::collections::BTreeSet::new();
        for (i, r) in ra.jwt_rules.into_iter().enumerate() {
            let at = format!("{place}.jwtRules[{i}]");
            if !issuers.insert(r.issuer.clone()) {
                p.add(&at, format!("issuer {:?} has two rules", r.issuer));
            }
            if let Some(rule) = validate_rule(p, &at, r, Some(services)) {
                rules.push(rule);
            }
        }
        if p.0.len() > before {
            continue;
        }
        out.insert(
            key,
            RequestAuthentication {
                name: ra.name,
                namespace: ra.namespace,
                targets,
                rules,
            },
        );
    }
    out
}

/// What is wrong with `rules`' values alone (everything but the services their
/// `jwksUri`s name), as `jwtRules[i]…: problem; …`: the Kubernetes source refuses an
/// object for it at once and keeps its last valid version applied (dropping a request
/// authentication would let unverified tokens and their claim headers through).
pub fn check_rules(rules: &[JwtRuleSpec]) -> Result<(), String> {
    let mut p = Problems::default();
    if rules.is_empty() {
        p.add("jwtRules", "is empty");
    }
    let mut issuers = std::collections::BTreeSet::new();
    for (i, r) in rules.iter().enumerate() {
        let at = format!("jwtRules[{i}]");
        if !issuers.insert(r.issuer.as_str()) {
            p.add(&at, format!("issuer {:?} has two rules", r.issuer));
        }
        validate_rule(&mut p, &at, r.clone(), None);
    }
    super::joined(p)
}

fn header_name(p: &mut Problems, at: &str, h: &str) {
    if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
        p.add(at, format!("{h:?} is not a header name"));
    }
}

fn validate_rule(
    p: &mut Problems,
    at: &str,
    r: JwtRuleSpec,
    services: Option<&imbl::OrdMap<NamespacedName, std::sync::Arc<Service>>>,
) -> Option<JwtRule> {
    let before = p.0.len();
    if r.issuer.is_empty() {
        p.add(at, "issuer is empty");
    }
    let keys = match (&r.jwks, &r.jwks_uri) {
        (Some(_), Some(_)) => {
            p.add(at, "jwks and jwksUri exclude each other");
            None
        }
        (None, None) => {
            p.add(
                at,
                "needs jwks (the keys, inline) or jwksUri (a URL served in the mesh); OpenID discovery is not supported",
            );
            None
        }
        (Some(doc), None) => match serde_json::from_str::<jsonwebtoken::jwk::JwkSet>(doc) {
            Ok(set) if set.keys.is_empty() => {
                p.add(&format!("{at}.jwks"), "has no keys");
                None
            }
            Ok(_) => Some(Jwks::Inline(doc.clone())),
            Err(e) => {
                p.add(&format!("{at}.jwks"), format!("not a JWKS document: {e}"));
                None
            }
        },
        (None, Some(uri)) => match jwks_service(uri, services) {
            Ok((service, port)) => Some(Jwks::Remote {
                uri: uri.clone(),
                service,
                port,
            }),
            Err(e) => {
                p.add(&format!("{at}.jwksUri"), e);
                None
            }
        },
    };
    for (k, h) in r.from_headers.iter().enumerate() {
        header_name(p, &format!("{at}.fromHeaders[{k}]"), &h.name);
    }
    for (k, c) in r.output_claim_to_headers.iter().enumerate() {
        header_name(p, &format!("{at}.outputClaimToHeaders[{k}]"), &c.header);
        if c.claim.is_empty() {
            p.add(&format!("{at}.outputClaimToHeaders[{k}]"), "claim is empty");
        }
    }
    if let Some(h) = &r.output_payload_to_header {
        header_name(p, &format!("{at}.outputPayloadToHeader"), h);
    }
    let timeout = match r.timeout.as_deref().map(super::http::parse_duration) {
        None => DEFAULT_TIMEOUT,
        Some(Ok(d)) if !d.is_zero() => d,
        Some(Ok(_)) => {
            p.add(&format!("{at}.timeout"), "must be over 0");
            DEFAULT_TIMEOUT
        }
        Some(Err(e)) => {
            p.add(&format!("{at}.timeout"), e);
            DEFAULT_TIMEOUT
        }
    };
    if p.0.len() > before {
        return None;
    }
    Some(JwtRule {
        issuer: r.issuer,
        audiences: r.audiences,
        keys: keys?,
        from_headers: r
            .from_headers
            .into_iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.prefix))
            .collect(),
        from_params: r.from_params,
        from_cookies: r.from_cookies,
        claim_to_headers: r
            .output_claim_to_headers
            .into_iter()
            .map(|c| (c.header.to_ascii_lowercase(), c.claim))
            .collect(),
        payload_header: r.output_payload_to_header.map(|h| h.to_ascii_lowercase()),
        forward: r.forward_original_token,
        timeout,
    })
}

/// The mesh service (and port) a `jwksUri` names (without `services`, whatever it
/// names).
fn jwks_service(
    uri: &str,
    services: Option<&imbl::OrdMap<NamespacedName, std::sync::Arc<Service>>>,
) -> Result<(NamespacedName, u16), String> {
    let u: http::Uri = uri.parse().map_err(|e| format!("{uri:?}: {e}"))?;
    if u.scheme_str() != Some("http") {
        return Err(format!(
            "{uri:?}: only http:// URLs of services in the mesh are fetched (HBONE encrypts them); give keys of an outside issuer inline (jwks)"
        ));
    }
    let host = u.host().unwrap_or_default();
    let labels: Vec<&str> = host.split('.').collect();
    let (name, namespace) = match labels.as_slice() {
        [n, ns] | [n, ns, "svc", "cluster", "local"] => (*n, *ns),
        _ => {
            return Err(format!(
                "{uri:?}: the host must be a mesh service (<service>.<namespace>.svc.cluster.local)"
            ));
        }
    };
    let key = NamespacedName {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    let port = u.port_u16().unwrap_or(80);
    let Some(services) = services else {
        return Ok((key, port));
    };
    match services.get(&key) {
        None => Err(format!("{uri:?}: service {key} is not defined")),
        Some(s) if !s.ports.iter().any(|sp| sp.port == port) => {
            Err(format!("{uri:?}: service {key} has no port {port}"))
        }
        Some(_) => Ok((key, port)),
    }
}
