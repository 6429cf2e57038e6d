//! HBONE tunnels over real mutual TLS on loopback: byte-exact copies with half-close,
//! the CONNECT request as the server sees it, refusals, malformed input, and many
//! streams on one connection.

mod common;

use ambit_hbone::connect::HboneError;
use ambit_hbone::tls::{MeshRoots, client_config};
use common::*;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_tunnel_is_byte_exact_both_ways_and_half_closes() {
    let ca = ca();
    let app = echo().await;
    let (server, seen) = hbone_server(&ca, 1, 2).await;
    let c = client(&ca, server).await;
    let mut t = c
        .connect(
            app,
            "10.244.1.10".parse().unwrap(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .await
        .unwrap();
    let data = pattern(4 << 20, 1);
    let (mut r, mut w) = tokio::io::split(&mut t);
    let sent = data.clone();
    let writer = async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap(); // half-close: the echo server sees EOF, answers, closes
    };
    let reader = async move {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::join!(writer, reader);
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echo differs");
    let req = seen.lock().unwrap()[0].clone();
    assert_eq!(req.authority, app);
    assert_eq!(req.forwarded_for, Some("10.244.1.10".parse().unwrap()));
    assert!(req.traceparent.unwrap().starts_with("00-0af7"));
}

#[tokio::test]
async fn refusals_map_to_401_and_503() {
    let ca = ca();
    let (server, _) = hbone_server(&ca, 7001, 7002).await;
    let c = client(&ca, server).await;
    let src = "10.0.0.1".parse().unwrap();
    let denied = c
        .connect("127.0.0.1:7001".parse().unwrap(), src, "t")
        .await
        .unwrap_err();
    assert!(matches!(denied, HboneError::Denied), "{denied}");
    let gone = c
        .connect("127.0.0.1:7002".parse().unwrap(), src, "t")
        .await
        .unwrap_err();
    assert!(matches!(gone, HboneError::Unreachable), "{gone}");
    // The connection is still good for the next stream.
    let app = echo().await;
    let mut t = c.connect(app, src, "t").await.unwrap();
    t.write_all(b"still here").await.unwrap();
    t.shutdown().await.unwrap();
    let mut b = Vec::new();
    t.read_to_end(&mut b).await.unwrap();
    assert_eq!(b, b"still here");
}

#[tokio::test]
async fn malformed_requests_are_refused_without_harming_other_streams() {
    let ca = ca();
    let app = echo().await;
    let (server, _) = hbone_server(&ca, 1, 2).await;
    // A raw h2 client over the same mutual TLS, to send what HboneClient never would.
    let roots = MeshRoots::from_pem(&ca.pem).unwrap();
    let connector = tokio_rustls::TlsConnector::from(
        client_config(
            &leaf(&ca, FRONTEND),
            &roots,
            [ambit_identity::Identity::parse(WEB).unwrap()],
        )
        .unwrap(),
    );
    let tls = connector
        .connect(
            ServerName::IpAddress(server.ip().into()),
            TcpStream::connect(server).await.unwrap(),
        )
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let status = |req: http::Request<()>| {
        let send = send.clone();
        async move {
            let mut send = send.ready().await?;
            let (resp, _body) = send.send_request(req, true)?;
            resp.await.map(|r| r.status())
        }
    };
    let get = http::Request::get(format!("http://{app}/"))
        .body(())
        .unwrap();
    assert_eq!(status(get).await.unwrap(), 400);
    let bad_authority = http::Request::builder()
        .method("CONNECT")
        .uri("not-an-ip:80")
        .body(())
        .unwrap();
    assert_eq!(status(bad_authority).await.unwrap(), 400);
    let huge = http::Request::builder()
        .method("CONNECT")
        .uri(app.to_string())
        .header("x-big", "a".repeat(32 * 1024))
        .body(())
        .unwrap();
    assert!(
        status(huge).await.map(|s| s != 200).unwrap_or(true),
        "an oversized header block was accepted"
    );

    // Garbage instead of HTTP/2 on another connection: that connection fails, the server lives.
    let tls = connector
        .connect(
            ServerName::IpAddress(server.ip().into()),
            TcpStream::connect(server).await.unwrap(),
        )
        .await
        .unwrap();
    let (_, mut w) = tokio::io::split(tls);
    let _ = w
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01\x02garbage")
        .await;

    // A well-formed tunnel still works.
    let c = client(&ca, server).await;
    let mut t = c
        .connect(app, "10.0.0.1".parse().unwrap(), "t")
        .await
        .unwrap();
    t.write_all(b"ok").await.unwrap();
    t.shutdown().await.unwrap();
    let mut b = Vec::new();
    t.read_to_end(&mut b).await.unwrap();
    assert_eq!(b, b"ok");
}

#[tokio::test]
async fn hundreds_of_concurrent_tunnels_share_one_connection() {
    let ca = ca();
    let app = echo().await;
    let (server, _) = hbone_server(&ca, 1, 2).await;
    let c = client(&ca, server).await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = c
                .connect(app, "10.0.0.1".parse().unwrap(), "t")
                .await
                .unwrap();
            let data = pattern(20_000, i);
            t.write_all(&data).await.unwrap();
            t.shutdown().await.unwrap();
            let mut back = Vec::new();
            t.read_to_end(&mut back).await.unwrap();
            back == data
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap(), "a tunnel's bytes differ");
    }
}
