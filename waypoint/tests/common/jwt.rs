//! A test issuer of JWTs: ES256 signing keys (ring), their JWKS, and tokens signed with
//! them (jsonwebtoken), or forged in the ways a verifier must catch.

use base64::Engine;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

/// An ES256 key of the issuer.
pub struct SigningKey {
    /// Its `kid`.
    pub kid: String,
    pkcs8: Vec<u8>,
    /// Its public half, as a JWK.
    pub jwk: Value,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl SigningKey {
    /// A new P-256 key named `kid`.
    pub fn es256(kid: &str) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap()
            .as_ref()
            .to_vec();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng).unwrap();
        // An uncompressed point: 0x04, x, y.
        let point = pair.public_key().as_ref();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        });
        Self {
            kid: kid.to_owned(),
            pkcs8,
            jwk,
        }
    }

    /// A token of `claims`, with this key's `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(&self.kid, claims)
    }

    /// A token of `claims` signed with this key but naming `kid`.
    pub fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some(kid.to_owned());
        jsonwebtoken::encode(
            &h,
            claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&self.pkcs8),
        )
        .unwrap()
    }
}

/// A JWKS document of `keys`.
pub fn jwks(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// An unsigned token (`alg: none`), which must never verify.
pub fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    )
}

/// Seconds since the epoch, plus `delta`.
pub fn at(delta: i64) -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + delta
}

pub const ISS: &str = "https://idp.example";
pub const API: &str = "api.shop.svc.cluster.local";

/// The mesh of the JWT tests: `api` (keys from `idp`, a service of the mesh; policies
/// needing a request principal, and the admins group under /admin) and `inline` (keys
/// inline, the token in `x-token`, forwarded; no policy).
pub fn mesh(inline_jwks: &str) -> String {
    format!(
        r#"
namespaces: [{{name: shop}}]
nodes: [{{name: node-1}}]
waypoints: [{{name: wp, namespace: shop}}]
workloads:
  - {{name: wp-0, namespace: shop, node: node-1, serviceAccount: wp, ips: [10.244.1.20],
     labels: {{gateway.networking.k8s.io/gateway-name: wp}}}}
  - {{name: api-0, namespace: shop, node: node-1, ips: [10.244.2.40], labels: {{app: api}}}}
  - {{name: inline-0, namespace: shop, node: node-1, ips: [10.244.2.41], labels: {{app: inline}}}}
  - {{name: idp-0, namespace: shop, node: node-1, ips: [10.244.2.50], labels: {{app: idp}}}}
services:
  - {{name: api, namespace: shop, vips: [10.96.3.10], ports: [{{name: http, port: 8000, targetPort: 8080}}],
     selector: {{app: api}}, labels: {{ambit.dev/waypoint: wp}}}}
  - {{name: inline, namespace: shop, vips: [10.96.3.11], ports: [{{name: http, port: 8000, targetPort: 8080}}],
     selector: {{app: inline}}, labels: {{ambit.dev/waypoint: wp}}}}
  - {{name: idp, namespace: shop, vips: [10.96.3.50], ports: [{{name: http, port: 8080, targetPort: 8080}}],
     selector: {{app: idp}}}}
requestAuthentications:
  - name: api-jwt
    namespace: shop
    targetRefs: [{{kind: Service, name: api}}]
    jwtRules:
      - issuer: {ISS}
        audiences: [api, api.shop]
        jwksUri: http://idp.shop.svc.cluster.local:8080/jwks.json
        outputClaimToHeaders: [{{header: x-user, claim: sub}}, {{header: x-tier, claim: plan.tier}}]
  - name: inline-jwt
    namespace: shop
    targetRefs: [{{kind: Service, name: inline}}]
    jwtRules:
      - issuer: https://inline.example
        jwks: '{inline_jwks}'
        fromHeaders: [{{name: x-token}}]
        forwardOriginalToken: true
policies:
  # Public pages need no token; everything else a verified one.
  - name: public
    namespace: shop
    targetRefs: [{{kind: Service, name: api}}]
    action: ALLOW
    rules:
      - to: [{{paths: ["/public/*"]}}]
      - from: [{{requestPrincipals: ["{ISS}/*"]}}]
  # Admin pages need the admins group.
  - name: admins
    namespace: shop
    targetRefs: [{{kind: Service, name: api}}]
    action: DENY
    rules:
      - to: [{{paths: ["/admin/*"]}}]
        when: [{{key: "request.auth.claims[groups]", notValues: [admins]}}]
"#
    )
}

/// Claims of a good token of the issuer for `sub`.
pub fn claims(sub: &str) -> Value {
    json!({"iss": ISS, "sub": sub, "aud": "api", "exp": at(600), "iat": at(0),
           "plan": {"tier": "gold"}})
}

pub fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// A request of the table.
pub struct Case {
    /// Path and query.
    pub path: String,
    /// Its `authorization` header.
    pub auth: Option<String>,
    /// The expected status.
    pub want: u16,
    /// The expected body of the JWT filter's refusal (empty: none, an answer of the
    /// backend or of RBAC).
    pub body: &'static str,
}

/// Tokens (signed by `k1`, the issuer's key, or forged) x paths of `api`, with their
/// answers.
pub fn table(k1: &SigningKey) -> Vec<Case> {
    let good = k1.sign(&claims("alice"));
    let other_key = SigningKey::es256("k1");

    let mut expired = claims("alice");
    expired["exp"] = json!(at(-120));
    let mut early = claims("alice");
    early["nbf"] = json!(at(3600));
    let mut foreign = claims("alice");
    foreign["iss"] = json!("https://evil.example");
    let mut audience = claims("alice");
    audience["aud"] = json!(["web", "billing"]);
    let mut audiences = claims("alice");
    audiences["aud"] = json!(["web", "api.shop"]);
    let mut admin = claims("root");
    admin["groups"] = json!(["dev", "admins"]);
    let mut dev = claims("bob");
    dev["groups"] = json!(["dev"]);
    let mut single = claims("carol");
    single["groups"] = json!("admins");
    let tampered = {
        let t = k1.sign(&claims("alice"));
        let mut p: Vec<&str> = t.split('.').collect();
        let forged = b64(claims("mallory").to_string().as_bytes());
        p[1] = &forged;
        p.join(".")
    };

    let b = |t: &str| Some(bearer(t));
    let q = |path: &str, t: &str| format!("{path}?access_token={t}");
    #[rustfmt::skip]
    let cases: Vec<(String, Option<String>, u16, &str)> = vec![
        // (path, authorization, status, 401 body)
        ("/public/a".into(), None, 200, ""),
        ("/items".into(), None, 403, ""),
        ("/items".into(), b(&good), 200, ""),
        (q("/items", &good), None, 200, ""),
        ("/items".into(), b(&k1.sign(&audiences)), 200, ""),
        ("/items".into(), b(&k1.sign(&expired)), 401, "Jwt is expired"),
        ("/items".into(), b(&k1.sign(&early)), 401, "Jwt not yet valid"),
        ("/items".into(), b(&k1.sign(&foreign)), 401, "Jwt issuer is not configured"),
        ("/items".into(), b(&k1.sign(&audience)), 403, "Audiences in Jwt are not allowed"),
        ("/items".into(), b(&other_key.sign(&claims("alice"))), 401, "Jwt verification fails"),
        ("/items".into(), b(&tampered), 401, "Jwt verification fails"),
        ("/items".into(), b(&unsigned(&claims("alice"))), 401,
         "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"),
        ("/items".into(), b("not-a-token"), 401,
         "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"),
        // A token that is present must be valid, even where none is needed.
        ("/public/a".into(), b(&k1.sign(&expired)), 401, "Jwt is expired"),
        ("/admin/x".into(), b(&k1.sign(&admin)), 200, ""),
        ("/admin/x".into(), b(&k1.sign(&single)), 200, ""),
        ("/admin/x".into(), b(&k1.sign(&dev)), 403, ""),
        ("/admin/x".into(), b(&good), 403, ""),
        ("/admin/x".into(), None, 403, ""),
    ];
    cases
        .into_iter()
        .map(|(path, auth, want, body)| Case {
            path,
            auth,
            want,
            body,
        })
        .collect()
}
