//! Envoy's JWT authentication filter (`envoy.filters.http.jwt_authn`): providers (an
//! issuer, its audiences, where its tokens are, its keys) and rules (which providers a
//! path requires), with Envoy's semantics:
//!
//! - a token is looked for where its provider says (default: `Authorization: Bearer`,
//!   then the `access_token` query parameter);
//! - it is checked in Envoy's order: its form and algorithm (never `none`), its issuer,
//!   its times (`exp`, `nbf`, 60 s of clock skew), its audiences, then its signature with
//!   a key of the JWKS that matches its `kid` and algorithm;
//! - a verified payload goes to dynamic metadata (for RBAC: request principals and
//!   claims), claims to request headers (removed from every request first, so that a
//!   client cannot set them), and a token in a header leaves the request unless
//!   `forward` (one in a query parameter stays, as in Envoy);
//! - anything else is answered 401 (403 for a wrong audience) with Envoy's message.
//!
//! Keys come inline or from a `remote_jwks` URL fetched through a cluster, cached for
//! `cache_duration` (one fetch at a time). Beyond Envoy: a token whose `kid` the cached
//! keys lack makes the waypoint fetch them again (at most once per
//! [`REFETCH_COOLDOWN`]), so an issuer's key rotation needs no restart and no wait for
//! the cache to expire.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as jwt;
use envoy_types::pb::google::protobuf;
use http::{HeaderName, HeaderValue};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use serde_json::Value;

use super::Metadata;
use crate::config::decode::{self, Error};
use crate::config::{Config, PathMatch};
use crate::upstream::Upstreams;

/// At most one fetch of a provider's keys per this long for unknown `kid`s, so that a
/// flood of tokens naming made-up keys cannot flood the issuer.
pub const REFETCH_COOLDOWN: Duration = Duration::from_secs(2);
/// The largest JWKS document taken.
const MAX_JWKS: usize = 1024 * 1024;
/// Envoy's default clock skew.
const DEFAULT_CLOCK_SKEW: u64 = 60;

/// The filter's configuration.
#[derive(Debug)]
pub struct JwtAuthn {
    /// By name.
    pub providers: BTreeMap<String, Arc<Provider>>,
    /// Path prefixes and what they require; the first that matches applies.
    pub rules: Vec<(PathMatch, Requirement)>,
    /// Every provider's claim headers: removed from every request.
    claim_headers: Vec<HeaderName>,
}

/// What a path requires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// A valid token of this provider.
    Provider(String),
    /// Any of these.
    Any(Vec<Requirement>),
    /// All of these.
    All(Vec<Requirement>),
    /// A valid token of any provider, or none at all.
    AllowMissing,
    /// A valid token of any provider, or none, or an invalid one (never refused).
    AllowMissingOrFailed,
}

/// A JWT provider.
#[derive(Debug)]
pub struct Provider {
    /// Its name.
    pub name: String,
    /// The `iss` its tokens have (empty: any).
    pub issuer: String,
    /// One must be in `aud` (none: any).
    pub audiences: Vec<String>,
    locations: Vec<Location>,
    forward: bool,
    payload_key: Option<String>,
    payload_header: Option<HeaderName>,
    claim_to_headers: Vec<(HeaderName, Vec<String>)>,
    clock_skew: u64,
    /// Its keys.
    pub keys: Keys,
    /// Tokens whose signature verified, with the key set that verified them: a client
    /// sends one token many times, and the signature (tens of microseconds for ECDSA
    /// or RSA) is the check's whole cost. Every other check runs on every request; new
    /// keys (another `Arc`) make the memo moot.
    verified: Mutex<HashMap<String, Arc<JwkSet>>>,
}

/// How many verified signatures a provider remembers (it forgets them all beyond).
const VERIFIED_MEMO: usize = 1024;

/// Where a token may be.
#[derive(Clone, Debug)]
enum Location {
    Header { name: HeaderName, prefix: String },
    Param(String),
    Cookie(String),
}

/// A provider's keys.
#[derive(Debug)]
pub enum Keys {
    /// Given inline.
    Inline(Arc<JwkSet>),
    /// Fetched.
    Remote(Box<RemoteJwks>),
}

/// Keys fetched from a URL through a cluster, cached.
#[derive(Debug)]
pub struct RemoteJwks {
    /// The URL.
    pub uri: http::Uri,
    /// The cluster it is fetched through.
    pub cluster: String,
    timeout: Duration,
    cache_duration: Duration,
    cached: Mutex<Option<Fetched>>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Clone, Debug)]
struct Fetched {
    keys: Arc<JwkSet>,
    at: Instant,
}

/// Why a request was refused, with Envoy's message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No token where one is required.
    Missing,
    /// Not three base64url parts of JSON.
    BadFormat,
    /// An algorithm that is not supported (`none` among them).
    BadAlgorithm,
    /// No provider has its issuer.
    UnknownIssuer,
    /// Past `exp`.
    Expired,
    /// Before `nbf`.
    NotYetValid,
    /// None of the accepted audiences.
    Audience,
    /// No key matches its `kid` and algorithm.
    KidMismatch,
    /// The signature does not verify.
    Signature,
    /// The keys could not be fetched.
    FetchFailed,
}

impl Failure {
    /// Envoy's message (the body of the answer).
    pub fn message(self) -> &'static str {
        match self {
            Failure::Missing => "Jwt is missing",
            Failure::BadFormat => {
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            }
            Failure::BadAlgorithm => "Jwt header [alg] is not supported",
            Failure::UnknownIssuer => "Jwt issuer is not configured",
            Failure::Expired => "Jwt is expired",
            Failure::NotYetValid => "Jwt not yet valid",
            Failure::Audience => "Audiences in Jwt are not allowed",
            Failure::KidMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
            Failure::Signature => "Jwt verification fails",
            Failure::FetchFailed => "Jwks remote fetch is failed",
        }
    }

    /// The status it is answered with: 401, but 403 for a token of the wrong audience
    /// (authenticated, but not for this service), as Envoy answers.
    pub fn status(self) -> http::StatusCode {
        match self {
            Failure::Audience => http::StatusCode::FORBIDDEN,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }

    /// A short name, for metrics.
    pub fn code(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::BadFormat => "bad_format",
            Failure::BadAlgorithm => "bad_algorithm",
            Failure::UnknownIssuer => "unknown_issuer",
            Failure::Expired => "expired",
            Failure::NotYetValid => "not_yet_valid",
            Failure::Audience => "audience",
            Failure::KidMismatch => "unknown_key",
            Failure::Signature => "signature",
            Failure::FetchFailed => "jwks_fetch_failed",
        }
    }

    /// A missing token or one no provider could even be chosen for: less telling than
    /// any other reason, when several requirements failed.
    fn vague(self) -> bool {
        matches!(self, Failure::Missing | Failure::UnknownIssuer)
    }
}

/// A verified token.
#[derive(Debug)]
pub struct Verified {
    provider: Arc<Provider>,
    payload: Value,
    raw_payload: String,
    found: Location,
}

/// What the filter did with a request.
#[derive(Debug)]
pub enum Outcome {
    /// A token verified (by this provider).
    Verified(String),
    /// No token, and none was required.
    Unauthenticated,
    /// Refused.
    Refused(Failure),
}

/// What verifying needs from the waypoint: upstream connections and the clusters they
/// go to (to fetch remote keys), owned by the fetch task.
#[derive(Clone)]
pub struct Fetcher {
    /// Upstream connections.
    pub upstreams: Arc<Upstreams>,
    /// The configuration the request runs with.
    pub config: Arc<Config>,
}

/// The keys of the providers a request's tokens may need, fetched before the
/// requirement is judged (which then needs no I/O).
type KeysFor = BTreeMap<String, Result<Arc<JwkSet>, Failure>>;

impl JwtAuthn {
    /// Runs the filter on a request: verifies what its rule requires and, if it passes,
    /// records the payload in `metadata` and edits the request's headers.
    pub async fn run(
        &self,
        parts: &mut http::request::Parts,
        metadata: &mut Metadata,
        fetch: Fetcher,
    ) -> Outcome {
        for h in &self.claim_headers {
            parts.headers.remove(h);
        }
        let path = parts.uri.path();
        let Some((_, req)) = self
            .rules
            .iter()
            .find(|(m, _)| crate::router::path_matches(m, path))
        else {
            return Outcome::Unauthenticated;
        };
        // The providers that could verify a token the request carries: whose place it is
        // in, or whose issuer it names.
        let issuers: Vec<String> = self
            .providers
            .values()
            .filter_map(|p| p.extract(parts))
            .filter_map(|(t, _)| unverified_issuer(&t).ok())
            .collect();
        let needed: Vec<Arc<Provider>> = self
            .providers
            .values()
            .filter(|p| {
                p.extract(parts).is_some()
                    || issuers
                        .iter()
                        .any(|i| p.issuer.is_empty() || &p.issuer == i)
            })
            .cloned()
            .collect();
        let mut keys = KeysFor::new();
        for p in &needed {
            keys.insert(p.name.clone(), p.keys(&fetch, None).await);
        }
        let mut result = self.satisfy(req, parts, &keys);
        if result.as_ref().err() == Some(&Failure::KidMismatch) {
            // A key the cache lacks: perhaps an issuer rotated its keys.
            let mut refreshed = false;
            for p in &needed {
                if let Keys::Remote(r) = &p.keys {
                    keys.insert(p.name.clone(), r.get(&fetch, Some(REFETCH_COOLDOWN)).await);
                    refreshed = true;
                }
            }
            if refreshed {
                result = self.satisfy(req, parts, &keys);
            }
        }
        match result {
            Ok(None) => Outcome::Unauthenticated,
            Ok(Some(v)) => {
                let name = v.provider.name.clone();
                apply(v, parts, metadata);
                Outcome::Verified(name)
            }
            Err(f) => Outcome::Refused(f),
        }
    }

    fn satisfy(
        &self,
        req: &Requirement,
        parts: &http::request::Parts,
        keys: &KeysFor,
    ) -> Result<Option<Verified>, Failure> {
        match req {
            Requirement::Provider(name) => {
                let p = self.providers.get(name).ok_or(Failure::UnknownIssuer)?;
                let (token, found) = p.extract(parts).ok_or(Failure::Missing)?;
                p.verify(&token, found, keys).map(Some)
            }
            Requirement::Any(list) => {
                let mut failure = Failure::Missing;
                for r in list {
                    match self.satisfy(r, parts, keys) {
                        Ok(v) => return Ok(v),
                        Err(f) if failure.vague() => failure = f,
                        Err(_) => {}
                    }
                }
                Err(failure)
            }
            Requirement::All(list) => {
                let mut last = None;
                for r in list {
                    if let Some(v) = self.satisfy(r, parts, keys)? {
                        last = Some(v);
                    }
                }
                Ok(last)
            }
            Requirement::AllowMissing => self.any_token(parts, keys),
            Requirement::AllowMissingOrFailed => Ok(self.any_token(parts, keys).unwrap_or(None)),
        }
    }

    /// A token in any provider's place, verified by the provider of its issuer; none
    /// found is fine.
    fn any_token(
        &self,
        parts: &http::request::Parts,
        keys: &KeysFor,
    ) -> Result<Option<Verified>, Failure> {
        let Some((token, found)) = self.providers.values().find_map(|p| p.extract(parts)) else {
            return Ok(None);
        };
        let iss = unverified_issuer(&token)?;
        let p = self
            .providers
            .values()
            .find(|p| p.issuer.is_empty() || p.issuer == iss)
            .ok_or(Failure::UnknownIssuer)?;
        p.verify(&token, found, keys).map(Some)
    }
}

/// The payload's `iss`, before anything is verified (to choose a provider).
fn unverified_issuer(token: &str) -> Result<String, Failure> {
    let (_, payload, _) = split(token)?;
    let v = decode_json(payload)?;
    Ok(v.get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned())
}

fn split(token: &str) -> Result<(&str, &str, &str), Failure> {
    let mut it = token.split('.');
    match (it.next(), it.next(), it.next(), it.next()) {
        // Envoy skips empty sections: an unsigned token (`alg: none`, nothing after the
        // second dot) is malformed before its algorithm is looked at.
        (Some(h), Some(p), Some(s), None) if !h.is_empty() && !p.is_empty() && !s.is_empty() => {
            Ok((h, p, s))
        }
        _ => Err(Failure::BadFormat),
    }
}

fn decode_json(part: &str) -> Result<Value, Failure> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| Failure::BadFormat)?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| Failure::BadFormat)?;
    if v.is_object() {
        Ok(v)
    } else {
        Err(Failure::BadFormat)
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The algorithms Envoy verifies (all but `none`).
fn algorithm(name: &str) -> Option<jsonwebtoken::Algorithm> {
    use jsonwebtoken::Algorithm::*;
    Some(match name {
        "HS256" => HS256,
        "HS384" => HS384,
        "HS512" => HS512,
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        _ => return None,
    })
}

impl Provider {
    /// The first token in one of the provider's places.
    fn extract(&self, parts: &http::request::Parts) -> Option<(String, Location)> {
        for loc in &self.locations {
            let token = match loc {
                Location::Header { name, prefix } => parts
                    .headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(|v| {
                        let rest = v.strip_prefix(prefix.as_str())?;
                        // Up to the end, a ',' or a ' ' (Envoy's extractor).
                        let t = rest.split([',', ' ']).next().unwrap_or_default();
                        (!t.is_empty()).then(|| t.to_owned())
                    }),
                Location::Param(name) => parts.uri.query().and_then(|q| {
                    q.split('&').find_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        (k == name && !v.is_empty()).then(|| v.to_owned())
                    })
                }),
                Location::Cookie(name) => parts
                    .headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(';'))
                    .find_map(|c| {
                        let (k, v) = c.trim().split_once('=')?;
                        (k == name && !v.is_empty()).then(|| v.to_owned())
                    }),
            };
            if let Some(t) = token {
                return Some((t, loc.clone()));
            }
        }
        None
    }

    /// Checks a token, in Envoy's order.
    fn verify(
        self: &Arc<Self>,
        token: &str,
        found: Location,
        keys: &KeysFor,
    ) -> Result<Verified, Failure> {
        let (header, payload_part, _) = split(token)?;
        let header = decode_json(header)?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(Failure::BadFormat)?;
        let alg = algorithm(alg).ok_or(Failure::BadAlgorithm)?;
        let kid = header.get("kid").and_then(Value::as_str).map(str::to_owned);
        let payload = decode_json(payload_part)?;
        let claim = |k: &str| payload.get(k);
        let iss = claim("iss").and_then(Value::as_str).unwrap_or_default();
        if !self.issuer.is_empty() && iss != self.issuer {
            return Err(Failure::UnknownIssuer);
        }
        let t = now();
        if let Some(exp) = claim("exp").and_then(Value::as_u64)
            && t > exp.saturating_add(self.clock_skew)
        {
            return Err(Failure::Expired);
        }
        if let Some(nbf) = claim("nbf").and_then(Value::as_u64)
            && t.saturating_add(self.clock_skew) < nbf
        {
            return Err(Failure::NotYetValid);
        }
        if !self.audiences.is_empty() {
            let ok = match claim("aud") {
                Some(Value::String(a)) => self.audiences.iter().any(|x| x == a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| self.audiences.iter().any(|x| x == a)),
                _ => false,
            };
            if !ok {
                return Err(Failure::Audience);
            }
        }
        let keys = keys
            .get(&self.name)
            .cloned()
            .unwrap_or(Err(Failure::FetchFailed))?;
        let verified = |p: &Arc<Self>| Verified {
            provider: p.clone(),
            payload,
            raw_payload: payload_part.to_owned(),
            found,
        };
        let memo =
            |m: &HashMap<String, Arc<JwkSet>>| m.get(token).is_some_and(|k| Arc::ptr_eq(k, &keys));
        if memo(&self.verified.lock().expect("jwt memo")) {
            return Ok(verified(self));
        }
        let candidates = matching(&keys, kid.as_deref(), alg);
        if candidates.is_empty() {
            return Err(Failure::KidMismatch);
        }
        let mut validation = jsonwebtoken::Validation::new(alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        for jwk in candidates {
            let Ok(key) = jsonwebtoken::DecodingKey::from_jwk(jwk) else {
                continue;
            };
            if jsonwebtoken::decode::<Value>(token, &key, &validation).is_ok() {
                let mut m = self.verified.lock().expect("jwt memo");
                if m.len() >= VERIFIED_MEMO {
                    m.clear();
                }
                m.insert(token.to_owned(), keys.clone());
                drop(m);
                return Ok(verified(self));
            }
        }
        Err(Failure::Signature)
    }

    async fn keys(
        &self,
        fetch: &Fetcher,
        refresh_older_than: Option<Duration>,
    ) -> Result<Arc<JwkSet>, Failure> {
        match &self.keys {
            Keys::Inline(k) => Ok(k.clone()),
            Keys::Remote(r) => r.get(fetch, refresh_older_than).await,
        }
    }
}

/// The keys that may have signed a token of `alg` with `kid`: with that `kid` (any key
/// if the token has none), of the algorithm's family, and of that algorithm if the key
/// names one.
fn matching<'a>(keys: &'a JwkSet, kid: Option<&str>, alg: jsonwebtoken::Algorithm) -> Vec<&'a Jwk> {
    use jsonwebtoken::jwk::AlgorithmParameters as P;
    keys.keys
        .iter()
        .filter(|k| kid.is_none() || k.common.key_id.as_deref() == kid)
        .filter(|k| {
            use jsonwebtoken::Algorithm as A;
            match &k.algorithm {
                P::RSA(_) => matches!(
                    alg,
                    A::RS256 | A::RS384 | A::RS512 | A::PS256 | A::PS384 | A::PS512
                ),
                P::EllipticCurve(_) => matches!(alg, A::ES256 | A::ES384),
                P::OctetKey(_) => matches!(alg, A::HS256 | A::HS384 | A::HS512),
                P::OctetKeyPair(_) => alg == A::EdDSA,
            }
        })
        .filter(|k| k.common.key_algorithm.is_none_or(|ka| names(ka, alg)))
        .collect()
}

/// Does a key's `alg` name this algorithm?
fn names(ka: jsonwebtoken::jwk::KeyAlgorithm, alg: jsonwebtoken::Algorithm) -> bool {
    use jsonwebtoken::Algorithm as A;
    use jsonwebtoken::jwk::KeyAlgorithm as K;
    matches!(
        (ka, alg),
        (K::HS256, A::HS256)
            | (K::HS384, A::HS384)
            | (K::HS512, A::HS512)
            | (K::RS256, A::RS256)
            | (K::RS384, A::RS384)
            | (K::RS512, A::RS512)
            | (K::PS256, A::PS256)
            | (K::PS384, A::PS384)
            | (K::PS512, A::PS512)
            | (K::ES256, A::ES256)
            | (K::ES384, A::ES384)
            | (K::EdDSA, A::EdDSA)
    )
}

impl RemoteJwks {
    /// The keys: cached if fresh (and, with `refresh_older_than`, fetched again if they
    /// are older than that), else fetched now.
    async fn get(
        &self,
        fetch: &Fetcher,
        refresh_older_than: Option<Duration>,
    ) -> Result<Arc<JwkSet>, Failure> {
        let usable = |c: &Option<Fetched>| -> Option<Arc<JwkSet>> {
            let f = c.as_ref()?;
            let age = f.at.elapsed();
            let fresh = age < self.cache_duration && refresh_older_than.is_none_or(|r| age < r);
            fresh.then(|| f.keys.clone())
        };
        if let Some(k) = usable(&self.cached.lock().expect("jwks cache")) {
            return Ok(k);
        }
        let _one = self.fetching.lock().await;
        // Someone else may have fetched them while this waited.
        if let Some(k) = usable(&self.cached.lock().expect("jwks cache")) {
            return Ok(k);
        }
        match tokio::time::timeout(self.timeout, self.fetch(fetch)).await {
            Ok(Ok(keys)) => {
                let keys = Arc::new(keys);
                *self.cached.lock().expect("jwks cache") = Some(Fetched {
                    keys: keys.clone(),
                    at: Instant::now(),
                });
                Ok(keys)
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e,
                    _ => "timed out".to_owned(),
                };
                tracing::warn!(uri = %self.uri, cluster = %self.cluster, "fetching JWKS failed: {why}");
                // The last keys, if any, stay in use (and are tried again a moment
                // later, as Envoy retries after a failed fetch).
                let mut cached = self.cached.lock().expect("jwks cache");
                match cached.as_mut() {
                    Some(f) => {
                        f.at = Instant::now()
                            .checked_sub(self.cache_duration.saturating_sub(Duration::from_secs(1)))
                            .unwrap_or_else(Instant::now);
                        Ok(f.keys.clone())
                    }
                    None => Err(Failure::FetchFailed),
                }
            }
        }
    }

    /// The cluster and endpoints the keys are fetched from.
    fn target(
        &self,
        config: &Config,
    ) -> Result<
        (
            Arc<crate::config::Cluster>,
            Arc<Vec<crate::config::Endpoint>>,
        ),
        String,
    > {
        match config.cluster(&self.cluster) {
            Some((c, e)) => Ok((c.clone(), e)),
            None => Err(format!("no cluster {}", self.cluster)),
        }
    }

    /// Fetches the keys, in a task of its own: if the request that wanted them goes
    /// away, the fetch still ends and fills the cache for the next.
    async fn fetch(&self, fetch: &Fetcher) -> Result<JwkSet, String> {
        let (cluster, endpoints) = self.target(&fetch.config)?;
        let ep = fetch
            .upstreams
            .choose(&cluster, &endpoints, &[])
            .ok_or("no endpoint")?;
        let task = tokio::spawn(fetch_jwks(
            fetch.upstreams.clone(),
            cluster,
            ep,
            self.uri.clone(),
        ));
        task.await.map_err(|e| e.to_string())?
    }
}

/// GETs a JWKS document from `ep` of `cluster`.
async fn fetch_jwks(
    upstreams: Arc<Upstreams>,
    cluster: Arc<crate::config::Cluster>,
    ep: crate::config::Endpoint,
    uri: http::Uri,
) -> Result<JwkSet, String> {
    use http_body_util::BodyExt;
    let authority = uri.authority().ok_or("the URI has no host")?.clone();
    let pq = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let mut req = http::Request::new(crate::body::full(""));
    match cluster.protocol {
        crate::config::UpstreamProtocol::Http1 => {
            *req.uri_mut() = http::Uri::from(pq);
            req.headers_mut().insert(
                http::header::HOST,
                HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?,
            );
        }
        crate::config::UpstreamProtocol::Http2 => {
            let mut p = http::uri::Parts::default();
            p.scheme = Some(http::uri::Scheme::HTTP);
            p.authority = Some(authority);
            p.path_and_query = Some(pq);
            *req.uri_mut() = http::Uri::from_parts(p).map_err(|e| e.to_string())?;
            *req.version_mut() = http::Version::HTTP_2;
        }
    }
    let resp = upstreams
        .send(&cluster, &ep, None, req)
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut doc = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(d) = frame.data_ref() {
            doc.extend_from_slice(d);
            if doc.len() > MAX_JWKS {
                return Err(format!("the document is over {MAX_JWKS} bytes"));
            }
        }
    }
    serde_json::from_slice(&doc).map_err(|e| e.to_string())
}

/// A verified token's effects on the request.
fn apply(v: Verified, parts: &mut http::request::Parts, metadata: &mut Metadata) {
    let p = &v.provider;
    for (header, path) in &p.claim_to_headers {
        let mut at = Some(&v.payload);
        for k in path {
            at = at.and_then(|x| x.get(k));
        }
        let text = match at {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(Value::Bool(b)) => Some(b.to_string()),
            _ => None,
        };
        if let Some(val) = text.and_then(|t| HeaderValue::from_str(&t).ok()) {
            parts.headers.insert(header.clone(), val);
        }
    }
    if let Some(h) = &p.payload_header
        && let Ok(val) = HeaderValue::from_str(&v.raw_payload)
    {
        parts.headers.insert(h.clone(), val);
    }
    if !p.forward
        && let Location::Header { name, .. } = &v.found
    {
        parts.headers.remove(name);
    }
    if let Some(key) = &p.payload_key {
        metadata.insert(ambit_xds::waypoint::JWT_FILTER, key, v.payload);
    }
}

// ---- Decoding Envoy's proto.

/// A `JwtAuthentication` config.
pub fn decode(any: &protobuf::Any) -> Result<JwtAuthn, Error> {
    let f: jwt::JwtAuthentication = decode::unpack(any, ambit_xds::type_url::HTTP_JWT_AUTHN)?;
    if f.filter_state_rules.is_some()
        || !f.requirement_map.is_empty()
        || f.bypass_cors_preflight
        || f.strip_failure_response
    {
        return Err("JWT filter_state_rules, requirement_map, bypass_cors_preflight and strip_failure_response are not supported".into());
    }
    let mut providers = BTreeMap::new();
    for (name, p) in &f.providers {
        providers.insert(
            name.clone(),
            Arc::new(provider(name, p).map_err(|e| format!("JWT provider {name:?}: {e}"))?),
        );
    }
    let mut rules = Vec::new();
    for r in &f.rules {
        let m = r.r#match.as_ref().ok_or("a JWT rule needs a match")?;
        let matcher = decode::route_match(m)?;
        if !matcher.headers.is_empty() || !matcher.query.is_empty() {
            return Err("JWT rules match paths only (no headers or query parameters)".into());
        }
        let req = match &r.requirement_type {
            None => continue,
            Some(jwt::requirement_rule::RequirementType::Requires(req)) => {
                requirement(req, &providers)?
            }
            Some(_) => return Err("JWT requirement_name is not supported".into()),
        };
        rules.push((matcher.path, req));
    }
    let mut claim_headers: Vec<HeaderName> = providers
        .values()
        .flat_map(|p| p.claim_to_headers.iter().map(|(h, _)| h.clone()))
        .collect();
    claim_headers.dedup();
    Ok(JwtAuthn {
        providers,
        rules,
        claim_headers,
    })
}

fn requirement(
    r: &jwt::JwtRequirement,
    providers: &BTreeMap<String, Arc<Provider>>,
) -> Result<Requirement, Error> {
    use jwt::jwt_requirement::RequiresType as T;
    Ok(match &r.requires_type {
        Some(T::ProviderName(n)) => {
            if !providers.contains_key(n) {
                return Err(format!("JWT requirement names no provider {n:?}"));
            }
            Requirement::Provider(n.clone())
        }
        Some(T::RequiresAny(l)) => Requirement::Any(
            l.requirements
                .iter()
                .map(|r| requirement(r, providers))
                .collect::<Result<_, _>>()?,
        ),
        Some(T::RequiresAll(l)) => Requirement::All(
            l.requirements
                .iter()
                .map(|r| requirement(r, providers))
                .collect::<Result<_, _>>()?,
        ),
        Some(T::AllowMissing(_)) => Requirement::AllowMissing,
        Some(T::AllowMissingOrFailed(_)) => Requirement::AllowMissingOrFailed,
        Some(T::ProviderAndAudiences(_)) | Some(T::ExtractOnlyWithoutValidation(_)) => {
            return Err(
                "JWT provider_and_audiences and extract_only_without_validation are not supported"
                    .into(),
            );
        }
        None => return Err("a JWT requirement needs a type".into()),
    })
}

fn header(name: &str) -> Result<HeaderName, Error> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a header name"))
}

fn provider(name: &str, p: &jwt::JwtProvider) -> Result<Provider, Error> {
    use jwt::jwt_provider::JwksSourceSpecifier as S;
    if p.subjects.is_some()
        || p.require_expiration
        || p.max_lifetime.is_some()
        || !p.header_in_metadata.is_empty()
        || !p.failed_status_in_metadata.is_empty()
        || p.normalize_payload_in_metadata.is_some()
        || p.jwt_cache_config.is_some()
        || p.pad_forward_payload_header
        || p.clear_route_cache
    {
        return Err("subjects, require_expiration, max_lifetime, header and failure metadata, payload normalization, the JWT cache, payload padding and clear_route_cache are not supported".into());
    }
    let keys = match &p.jwks_source_specifier {
        Some(S::LocalJwks(ds)) => {
            use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
            let doc = match &ds.specifier {
                Some(Specifier::InlineString(s)) => s.as_bytes().to_vec(),
                Some(Specifier::InlineBytes(b)) => b.clone(),
                _ => return Err("local_jwks must be inline".into()),
            };
            let set: JwkSet =
                serde_json::from_slice(&doc).map_err(|e| format!("local_jwks: {e}"))?;
            Keys::Inline(Arc::new(set))
        }
        Some(S::RemoteJwks(r)) => {
            if r.async_fetch.is_some() || r.retry_policy.is_some() {
                return Err("remote_jwks async_fetch and retry_policy are not supported".into());
            }
            let uri = r.http_uri.as_ref().ok_or("remote_jwks needs http_uri")?;
            use envoy_types::pb::envoy::config::core::v3::http_uri::HttpUpstreamType;
            let Some(HttpUpstreamType::Cluster(cluster)) = &uri.http_upstream_type else {
                return Err("remote_jwks http_uri needs a cluster".into());
            };
            Keys::Remote(Box::new(RemoteJwks {
                uri: uri
                    .uri
                    .parse()
                    .map_err(|e| format!("remote_jwks uri {:?}: {e}", uri.uri))?,
                cluster: cluster.clone(),
                timeout: uri
                    .timeout
                    .as_ref()
                    .map(decode::duration)
                    .transpose()?
                    .filter(|d| !d.is_zero())
                    .ok_or("remote_jwks http_uri needs a timeout")?,
                cache_duration: r
                    .cache_duration
                    .as_ref()
                    .map(decode::duration)
                    .transpose()?
                    .unwrap_or(Duration::from_secs(600)),
                cached: Mutex::new(None),
                fetching: tokio::sync::Mutex::new(()),
            }))
        }
        None => return Err("needs local_jwks or remote_jwks".into()),
    };
    let mut locations: Vec<Location> = Vec::new();
    for h in &p.from_headers {
        locations.push(Location::Header {
            name: header(&h.name)?,
            prefix: h.value_prefix.clone(),
        });
    }
    locations.extend(p.from_params.iter().cloned().map(Location::Param));
    locations.extend(p.from_cookies.iter().cloned().map(Location::Cookie));
    if locations.is_empty() {
        // Envoy's default places.
        locations = vec![
            Location::Header {
                name: http::header::AUTHORIZATION,
                prefix: "Bearer ".into(),
            },
            Location::Param("access_token".into()),
        ];
    }
    let claim_to_headers = p
        .claim_to_headers
        .iter()
        .map(|c| {
            if !c.claim_path.is_empty() {
                return Err("claim_to_headers claim_path is not supported (use claim_name)".into());
            }
            Ok((
                header(&c.header_name)?,
                c.claim_name.split('.').map(str::to_owned).collect(),
            ))
        })
        .collect::<Result<_, Error>>()?;
    Ok(Provider {
        name: name.to_owned(),
        issuer: p.issuer.clone(),
        audiences: p.audiences.clone(),
        locations,
        forward: p.forward,
        payload_key: Some(p.payload_in_metadata.clone()).filter(|k| !k.is_empty()),
        payload_header: Some(&p.forward_payload_header)
            .filter(|h| !h.is_empty())
            .map(|h| header(h))
            .transpose()?,
        claim_to_headers,
        verified: Mutex::default(),
        clock_skew: match p.clock_skew_seconds {
            0 => DEFAULT_CLOCK_SKEW,
            s => u64::from(s),
        },
        keys,
    })
}
