//! `tls_stream`, the TLS 1.3 stream that frames its own records: byte-exact transfers,
//! half-close, key updates both ways, session resumption, and refusal of malformed
//! records — against rustls's own buffered implementation (tokio-rustls) and itself.

mod common;

use std::sync::Arc;

use ambit_hbone::tls::{MeshRoots, client_config, server_config};
use ambit_hbone::tls_stream::{self, TlsStream};
use common::*;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let ca = ca();
    let roots = MeshRoots::from_pem(&ca.pem).unwrap();
    let server = server_config(&leaf(&ca, WEB), &roots, "cluster.local").unwrap();
    let client = client_config(
        &leaf(&ca, FRONTEND),
        &roots,
        [ambit_identity::Identity::parse(WEB).unwrap()],
    )
    .unwrap();
    (server, client)
}

/// A listener on a free loopback port.
async fn listen() -> (TcpListener, std::net::SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// `tls_stream`'s client connected to `addr`.
async fn ours_client(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    tls_stream::connect(config, name, tcp).await.unwrap()
}

/// rustls's own (buffered, tokio-rustls) client connected to `addr`.
async fn rustls_client(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// A connected pair: (server, client), each `tls_stream` or tokio-rustls.
async fn pair(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    ours_server: bool,
    ours_at_client: bool,
) -> (Box<dyn Io>, Box<dyn Io>) {
    let (listener, addr) = listen().await;
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let s: Box<dyn Io> = if ours_server {
            Box::new(tls_stream::accept(server, tcp).await.unwrap())
        } else {
            Box::new(
                tokio_rustls::TlsAcceptor::from(server)
                    .accept(tcp)
                    .await
                    .unwrap(),
            )
        };
        s
    });
    let c: Box<dyn Io> = if ours_at_client {
        Box::new(ours_client(addr, client).await)
    } else {
        Box::new(rustls_client(addr, client).await)
    };
    (srv.await.unwrap(), c)
}

/// Writes `data` in uneven pieces (some vectored), then shuts down; reads everything the
/// other way until its end.
async fn exchange(mut s: Box<dyn Io>, data: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(&mut s);
    let write = async {
        let mut at = 0;
        let mut step = 1;
        while at < data.len() {
            let n = (step * 7919 % 70_000 + 1).min(data.len() - at);
            if step % 3 == 0 && n > 10 {
                let (a, b) = data[at..at + n].split_at(n / 3);
                let iov = [std::io::IoSlice::new(a), std::io::IoSlice::new(b)];
                let wrote = w.write_vectored(&iov).await.unwrap();
                at += wrote;
            } else {
                w.write_all(&data[at..at + n]).await.unwrap();
                at += n;
            }
            step += 1;
        }
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::join!(write, read);
    back
}

#[tokio::test]
async fn transfers_are_byte_exact_both_ways_with_every_pairing() {
    let (server, client) = configs();
    for (ours_server, ours_client) in [(true, true), (true, false), (false, true)] {
        let (s, c) = pair(server.clone(), client.clone(), ours_server, ours_client).await;
        let up = pattern(3_000_000, 1);
        let down = pattern(2_000_001, 2);
        let (got_up, got_down) = tokio::join!(exchange(s, down.clone()), exchange(c, up.clone()));
        assert!(
            got_up == up,
            "client → server ({ours_server}, {ours_client})"
        );
        assert!(
            got_down == down,
            "server → client ({ours_server}, {ours_client})"
        );
    }
}

#[tokio::test]
async fn a_half_closed_stream_still_carries_the_answer() {
    let (server, client) = configs();
    for (ours_server, ours_client) in [(true, true), (true, false), (false, true)] {
        let (mut s, mut c) = pair(server.clone(), client.clone(), ours_server, ours_client).await;
        c.write_all(b"question").await.unwrap();
        c.shutdown().await.unwrap();
        let mut q = Vec::new();
        s.read_to_end(&mut q).await.unwrap();
        assert_eq!(
            q, b"question",
            "close_notify ends the stream after the data"
        );
        s.write_all(b"answer").await.unwrap();
        s.shutdown().await.unwrap();
        let mut a = Vec::new();
        c.read_to_end(&mut a).await.unwrap();
        assert_eq!(a, b"answer");
    }
}

/// An idle connection holds no read buffer: it is allocated for a read and freed when the
/// socket is found dry (thousands of idle HBONE connections must not hold 64 KiB each).
#[tokio::test]
async fn an_idle_connection_holds_no_read_buffer() {
    let (server, client) = configs();
    let (listener, addr) = listen().await;
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = tls_stream::accept(server, tcp).await.unwrap();
        s.write_all(&pattern(300_000, 9)).await.unwrap();
        s.flush().await.unwrap();
        // Stay open, idle, until the client is done.
        let mut b = [0u8; 1];
        let _ = s.read(&mut b).await;
    });
    let mut c = ours_client(addr, client).await;
    let mut got = vec![0u8; 300_000];
    c.read_exact(&mut got).await.unwrap();
    assert!(got == pattern(300_000, 9));
    // The next read finds nothing: the buffer goes.
    let idle = tokio::time::timeout(
        std::time::Duration::from_millis(100),
        c.read(&mut [0u8; 16]),
    )
    .await;
    assert!(idle.is_err(), "nothing more was sent");
    assert_eq!(
        c.read_buffer_capacity(),
        0,
        "an idle connection's read buffer"
    );
    c.shutdown().await.unwrap();
    srv.await.unwrap();
}

/// `tls_stream` renews its sending key every few records; a rustls peer asks for key
/// updates (`update_requested`) in the middle of a transfer and gets them answered.
#[tokio::test]
async fn key_updates_both_ways_keep_the_bytes_exact() {
    let (server, client) = configs();
    // Ours renews every 3 records, against rustls and against itself.
    for ours_server in [false, true] {
        let (listener, addr) = listen().await;
        let server = server.clone();
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let s: Box<dyn Io> = if ours_server {
                let mut s = tls_stream::accept(server, tcp).await.unwrap();
                s.renew_sending_key_after(3);
                Box::new(s)
            } else {
                Box::new(
                    tokio_rustls::TlsAcceptor::from(server)
                        .accept(tcp)
                        .await
                        .unwrap(),
                )
            };
            exchange(s, pattern(1_000_000, 3)).await
        });
        let mut c = ours_client(addr, client.clone()).await;
        c.renew_sending_key_after(3);
        let got = exchange(Box::new(c), pattern(1_500_000, 4)).await;
        assert!(got == pattern(1_000_000, 3), "server → client");
        assert!(
            srv.await.unwrap() == pattern(1_500_000, 4),
            "client → server"
        );
    }

    // A rustls client requests key updates while it talks; ours answers each (before its
    // next record, as RFC 8446 §4.6.3 requires).
    let (listener, addr) = listen().await;
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = tls_stream::accept(server, tcp).await.unwrap();
        let mut buf = vec![0u8; 40_000];
        loop {
            match s.read(&mut buf).await.unwrap() {
                0 => break,
                n => s.write_all(&buf[..n]).await.unwrap(),
            }
        }
        s.shutdown().await.unwrap();
    });
    let mut c = rustls_client(addr, client).await;
    let data = pattern(400_000, 5);
    for piece in data.chunks(40_000) {
        c.get_mut().1.refresh_traffic_keys().unwrap();
        c.write_all(piece).await.unwrap();
        let mut back = vec![0u8; piece.len()];
        c.read_exact(&mut back).await.unwrap();
        assert!(back == piece, "echoed under the renewed keys");
    }
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    srv.await.unwrap();

    // Requests that arrive while ours is silent get one update, before its answer.
    let (server, client) = configs();
    let (listener, addr) = listen().await;
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = tls_stream::accept(server, tcp).await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(&got).await.unwrap();
        s.shutdown().await.unwrap();
        got
    });
    let mut c = rustls_client(addr, client).await;
    for piece in data.chunks(40_000) {
        c.get_mut().1.refresh_traffic_keys().unwrap();
        c.write_all(piece).await.unwrap();
    }
    c.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    c.read_to_end(&mut echoed).await.unwrap();
    assert!(srv.await.unwrap() == data);
    assert!(echoed == data, "answered under the renewed keys");
}

/// A client keeps the tickets a server sends after the handshake (they arrive as
/// post-handshake messages `tls_stream` hands to rustls), so its next connection resumes.
#[tokio::test]
async fn session_tickets_are_kept_and_the_next_handshake_resumes() {
    let (server, client) = configs();
    let (listener, addr) = listen().await;
    let srv = tokio::spawn(async move {
        let mut resumed = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s = tls_stream::accept(server.clone(), tcp).await.unwrap();
            resumed.push(s.resumed());
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(b"ok").await.unwrap();
            s.shutdown().await.unwrap();
        }
        resumed
    });
    for _ in 0..2 {
        let mut c = ours_client(addr, client.clone()).await;
        c.write_all(b"hi").await.unwrap();
        let mut b = Vec::new();
        // Reading to the end takes the tickets the server sent with its answer.
        c.read_to_end(&mut b).await.unwrap();
        assert_eq!(b, b"ok");
        c.shutdown().await.unwrap();
    }
    assert_eq!(srv.await.unwrap(), [false, true]);
}

/// A server that completes the handshake with rustls, then writes `raw` bytes of its own
/// to the socket (after `before`, sent properly) and closes its sending side; it then
/// reports what it reads back (the client's alert, if any).
async fn raw_peer(
    before: &'static [u8],
    raw: Vec<u8>,
) -> (TlsStream<TcpStream>, tokio::task::JoinHandle<String>) {
    let (server, client) = configs();
    let (listener, addr) = listen().await;
    let peer = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = tokio_rustls::TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .unwrap();
        s.write_all(before).await.unwrap();
        s.flush().await.unwrap();
        s.get_mut().0.write_all(&raw).await.unwrap();
        let _ = s.get_mut().0.shutdown().await;
        let mut back = Vec::new();
        match tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut back))
            .await
        {
            Ok(Ok(_)) => format!("read {} bytes and the end", back.len()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "nothing in 5 s".into(),
        }
    });
    (ours_client(addr, client).await, peer)
}

/// What reading the stream to its end gives: the bytes, then the error, if any.
async fn read_all(s: &mut TlsStream<TcpStream>) -> (Vec<u8>, Option<std::io::Error>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e)),
        }
    }
}

/// Each case: what the peer sends raw, what our error says, and the alert the peer then
/// receives from us (none when the connection just ended).
#[tokio::test]
async fn malformed_records_and_unannounced_ends_are_errors_after_the_good_bytes() {
    let cases: [(&str, Vec<u8>, &str, &str); 5] = [
        (
            "a record that does not decrypt",
            [&[0x17, 3, 3, 0, 40][..], &[0xab; 40]].concat(),
            "cannot decrypt",
            "BadRecordMac",
        ),
        (
            "a record longer than TLS allows",
            vec![0x17, 3, 3, 0x41, 0x01],
            "excess record size",
            "RecordOverflow",
        ),
        (
            "a plaintext handshake record after the handshake",
            vec![0x16, 3, 3, 0, 4, 1, 0, 0, 0],
            "unexpected record type 22",
            "UnexpectedMessage",
        ),
        (
            "the connection closed without close_notify",
            vec![],
            "close_notify",
            "read 0 bytes",
        ),
        (
            "the connection closed in the middle of a record",
            vec![0x17, 3, 3, 0, 40, 1, 2, 3],
            "middle of a TLS record",
            "read 0 bytes",
        ),
    ];
    for (case, raw, want, peer_sees) in cases {
        let (mut s, peer) = raw_peer(b"good bytes", raw).await;
        let (got, err) = read_all(&mut s).await;
        assert_eq!(got, b"good bytes", "{case}: what came before is delivered");
        let err = err.unwrap_or_else(|| panic!("{case}: not an error"));
        assert!(err.to_string().contains(want), "{case}: {err}");
        // The stream stays failed: the same error again, for reads and writes.
        let again = s.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(again.to_string(), err.to_string(), "{case}: a second read");
        if peer_sees.starts_with("read") {
            s.shutdown().await.unwrap_or_default();
        } else {
            let w = s.write_all(b"more").await.unwrap_err();
            assert_eq!(w.to_string(), err.to_string(), "{case}: a write after");
        }
        drop(s);
        let seen = peer.await.unwrap();
        assert!(seen.contains(peer_sees), "{case}: the peer saw {seen}");
    }
}
