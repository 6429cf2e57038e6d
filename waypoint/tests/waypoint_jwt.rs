//! JWT authentication at the waypoint: Istio RequestAuthentications with `targetRefs`,
//! from the mesh file through the control plane's translator (Envoy's JWT filter, its
//! remote JWKS through a cluster of the mesh) into the waypoint. An issuer's keys are
//! served by a backend inside the test's mesh (`idp`), which counts its fetches; tokens
//! are signed by the test (ES256) or forged in the ways a verifier must catch.

mod common;

use std::sync::atomic::Ordering;

use common::jwt::*;
use common::*;
use serde_json::json;

const INLINE: &str = "inline.shop.svc.cluster.local";
const CALLER: (&str, &str) = ("spiffe://cluster.local/ns/shop/sa/web", "127.1.1.20");

struct Fixture {
    wp: TestWaypoint,
    api: Backend,
    inline: Backend,
    idp: Backend,
    k1: SigningKey,
    inline_key: SigningKey,
}

impl Fixture {
    async fn start() -> Self {
        let wp = TestWaypoint::start().await;
        let (api, inline, idp) = (
            Backend::start("api").await,
            Backend::start("inline").await,
            Backend::start("idp").await,
        );
        wp.map("10.244.2.40:8080", api.addr);
        wp.map("10.244.2.41:8080", inline.addr);
        wp.map("10.244.2.50:8080", idp.addr);
        let k1 = SigningKey::es256("k1");
        let inline_key = SigningKey::es256("i1");
        *idp.state.document.lock().unwrap() = Some(jwks(&[&k1]));
        wp.apply(&model(&mesh(&jwks(&[&inline_key])))).unwrap();
        Self {
            wp,
            api,
            inline,
            idp,
            k1,
            inline_key,
        }
    }

    async fn ask(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        let vip = if host == INLINE {
            "10.96.3.11:8000"
        } else {
            "10.96.3.10:8000"
        };
        let mut c = self.wp.http1_as(CALLER.0, CALLER.1, vip).await;
        send1(&mut c, req("GET", host, path, headers)).await
    }

    fn fetches(&self) -> u64 {
        self.idp.state.requests.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn tokens_are_verified_as_istio_request_authentications_say() {
    let f = Fixture::start().await;
    let good = f.k1.sign(&claims("alice"));
    let b = |t: &str| bearer(t);
    let cases = table(&f.k1);
    let mut wrong = Vec::new();
    for Case {
        path,
        auth,
        want,
        body,
    } in &cases
    {
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let a = f.ask(API, path, &headers).await;
        let ok = a.status == *want
            && if body.is_empty() {
                a.status != 401 && !a.body.starts_with("Jwt") && !a.body.starts_with("Aud")
            } else {
                a.body == *body
            };
        if !ok {
            wrong.push(format!(
                "{path} {}: {} {:?} (want {want} {body:?})",
                auth.as_deref()
                    .unwrap_or("-")
                    .chars()
                    .take(24)
                    .collect::<String>(),
                a.status,
                a.body
            ));
        }
        if !body.is_empty() {
            let challenge = a.headers["www-authenticate"].to_str().unwrap();
            assert!(
                challenge.starts_with("Bearer realm=\"http://api.shop.svc.cluster.local/")
                    && challenge.contains("error=\"invalid_token\""),
                "{challenge}"
            );
        }
    }
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    // The keys were fetched once, and kept.
    assert_eq!(f.fetches(), 1, "JWKS fetches");

    // A verified token's claims reach the backend as headers, the token does not; a
    // client's own claim headers are dropped, with or without a token.
    let a = f
        .ask(
            API,
            "/items",
            &[("authorization", &b(&good)), ("x-user", "root")],
        )
        .await;
    assert!(
        a.body.contains("x-user=alice") && !a.body.contains("root"),
        "{}",
        a.body
    );
    assert!(a.body.contains("x-tier=gold"), "{}", a.body);
    assert!(!a.body.contains("authorization="), "{}", a.body);
    let a = f.ask(API, "/public/a", &[("x-user", "root")]).await;
    assert_eq!(a.status, 200);
    assert!(!a.body.contains("x-user"), "{}", a.body);
    // A token in the query stays there, as in Envoy (which removes only headers).
    let a = f
        .ask(API, &format!("/items?a=1&access_token={good}&b=2"), &[])
        .await;
    assert!(
        a.body
            .starts_with(&format!("api GET /items?a=1&access_token={good}&b=2 ")),
        "{}",
        a.body
    );

    // Inline keys, a token in a header of its own, kept for the backend; no policy, so a
    // missing token passes.
    let it = f
        .inline_key
        .sign(&json!({"iss": "https://inline.example", "sub": "svc",
                                       "exp": at(600)}));
    let a = f.ask(INLINE, "/", &[("x-token", &it)]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains(&format!("x-token={it}")), "{}", a.body);
    assert_eq!(f.ask(INLINE, "/", &[]).await.status, 200);
    let a = f.ask(INLINE, "/", &[("x-token", &good)]).await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (401, "Jwt issuer is not configured")
    );
    // A bearer token is not where this provider looks: ignored.
    assert_eq!(
        f.ask(INLINE, "/", &[("authorization", &b(&good))])
            .await
            .status,
        200
    );
    assert_eq!(f.inline.state.requests.load(Ordering::SeqCst), 3);
    assert!(f.api.state.requests.load(Ordering::SeqCst) >= 9);

    // What the filter made of them.
    let metrics = f.wp.metrics.encode();
    for line in [
        r#"ambit_waypoint_jwt_authn_total{listener="api.shop.svc.cluster.local:8000",result="expired"} 2"#,
        r#"ambit_waypoint_jwt_authn_total{listener="api.shop.svc.cluster.local:8000",result="signature"} 2"#,
        r#"ambit_waypoint_jwt_authn_total{listener="api.shop.svc.cluster.local:8000",result="bad_format"} 2"#,
        r#"ambit_waypoint_jwt_authn_total{listener="inline.shop.svc.cluster.local:8000",result="unauthenticated"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

#[tokio::test]
async fn a_key_the_cache_lacks_makes_the_waypoint_fetch_the_keys_again() {
    let f = Fixture::start().await;
    let a = f
        .ask(
            API,
            "/items",
            &[("authorization", &bearer(&f.k1.sign(&claims("a"))))],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(f.fetches(), 1);

    // The issuer rotates: a second key is published and used (once the cool-down since
    // the last fetch is over: within it, the waypoint would not fetch again).
    let k2 = SigningKey::es256("k2");
    *f.idp.state.document.lock().unwrap() = Some(jwks(&[&f.k1, &k2]));
    tokio::time::sleep(ambit_waypoint::filter::jwt::REFETCH_COOLDOWN).await;
    let a = f
        .ask(
            API,
            "/items",
            &[("authorization", &bearer(&k2.sign(&claims("b"))))],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(f.fetches(), 2, "the new key was fetched");
    // Both keys are good now, with no more fetches.
    for k in [&f.k1, &k2] {
        let a = f
            .ask(
                API,
                "/items",
                &[("authorization", &bearer(&k.sign(&claims("c"))))],
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    assert_eq!(f.fetches(), 2);
    // A made-up kid right after: refused, and no fetch (the cool-down).
    let k3 = SigningKey::es256("k3");
    let a = f
        .ask(
            API,
            "/items",
            &[("authorization", &bearer(&k3.sign(&claims("d"))))],
        )
        .await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (401, "Jwks doesn't have key to match kid or alg from Jwt")
    );
    assert_eq!(
        f.fetches(),
        2,
        "a made-up kid within the cool-down fetched the keys"
    );
    // After the cool-down one fetch is allowed again.
    tokio::time::sleep(ambit_waypoint::filter::jwt::REFETCH_COOLDOWN).await;
    let a = f
        .ask(
            API,
            "/items",
            &[("authorization", &bearer(&k3.sign(&claims("d"))))],
        )
        .await;
    assert_eq!(a.status, 401);
    assert_eq!(f.fetches(), 3);

    // The issuer withdraws k1: once the keys are fetched again, a k1 token that verified
    // before (its signature remembered) is refused.
    let k1_token = f.k1.sign(&claims("e"));
    let a = f
        .ask(API, "/items", &[("authorization", &bearer(&k1_token))])
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    *f.idp.state.document.lock().unwrap() = Some(jwks(&[&k2]));
    tokio::time::sleep(ambit_waypoint::filter::jwt::REFETCH_COOLDOWN).await;
    let a = f
        .ask(
            API,
            "/items",
            &[("authorization", &bearer(&k3.sign(&claims("f"))))],
        )
        .await;
    assert_eq!(a.status, 401);
    assert_eq!(f.fetches(), 4);
    let a = f
        .ask(API, "/items", &[("authorization", &bearer(&k1_token))])
        .await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (401, "Jwks doesn't have key to match kid or alg from Jwt")
    );
}

#[tokio::test]
async fn an_issuer_that_cannot_be_reached_refuses_tokens_and_recovers() {
    let f = Fixture::start().await;
    f.idp.state.status.store(500, Ordering::SeqCst);
    let token = f.k1.sign(&claims("a"));
    let a = f
        .ask(API, "/items", &[("authorization", &bearer(&token))])
        .await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (401, "Jwks remote fetch is failed")
    );
    // Requests without a token are not held up by it.
    assert_eq!(f.ask(API, "/public/x", &[]).await.status, 200);
    // The issuer comes back: the next token fetches the keys.
    f.idp.state.status.store(0, Ordering::SeqCst);
    let a = f
        .ask(API, "/items", &[("authorization", &bearer(&token))])
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    // Down again: the keys already fetched stay in use.
    f.idp.state.status.store(500, Ordering::SeqCst);
    let a = f
        .ask(API, "/items", &[("authorization", &bearer(&token))])
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[test]
fn request_authentications_are_validated_with_their_place() {
    for (rule, want) in [
        (
            "{issuer: a, jwks: 'nope'}",
            "jwtRules[0].jwks: not a JWKS document",
        ),
        (
            "{issuer: a, jwks: '{\"keys\": []}'}",
            "jwtRules[0].jwks: has no keys",
        ),
        (
            "{issuer: a, jwksUri: 'https://idp.example/keys'}",
            "jwtRules[0].jwksUri",
        ),
        (
            "{issuer: a, jwksUri: 'http://nobody.shop.svc.cluster.local/keys'}",
            "service shop/nobody is not defined",
        ),
        (
            "{issuer: a, jwksUri: 'http://idp.shop.svc.cluster.local:9/keys'}",
            "has no port 9",
        ),
        ("{issuer: a}", "jwtRules[0]"),
        (
            "{issuer: a, jwks: '{\"keys\": [{\"kty\": \"oct\", \"k\": \"AA\"}]}', fromHeaders: [{name: 'bad header'}]}",
            "jwtRules[0].fromHeaders[0]",
        ),
        (
            "{issuer: a, jwksUri: 'http://idp.shop.svc.cluster.local:8080/k', timeout: 0s}",
            "jwtRules[0].timeout: must be over 0",
        ),
    ] {
        let yaml = mesh("{}").replace(
            "jwtRules:\n      - issuer: https://inline.example",
            &format!("jwtRules:\n      - {rule}\n      - issuer: https://inline.example"),
        );
        let yaml = yaml.replace(
            "jwks: '{}'",
            "jwks: '{\"keys\": [{\"kty\": \"oct\", \"k\": \"AA\"}]}'",
        );
        let e = ambit_control_plane::source::file::parse(std::path::Path::new("mesh.yaml"), &yaml)
            .err()
            .unwrap_or_else(|| panic!("{rule} was accepted"))
            .to_string();
        assert!(
            e.contains("requestAuthentications (shop/inline-jwt)") && e.contains(want),
            "{rule}: {e}"
        );
    }
}
