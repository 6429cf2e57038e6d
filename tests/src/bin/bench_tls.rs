//! `cargo xtask bench tls`: the crypto provider under HBONE's mutual TLS, ring against
//! aws-lc-rs, in memory on one thread (no sockets, no kernel): what a handshake and a
//! gigabyte cost each library with Ambit's own TLS configs (SPIFFE verification
//! included). Reported, never asserted.
//!
//! Each round runs every variant once, alternating; the table gives the median of the
//! rounds with their range.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_hbone::tls::{
    Crypto, KX_GROUPS, MeshRoots, WorkloadKey, client_config_with, provider_with,
    server_config_with,
};
use ambit_identity::Identity;
use ambit_tests::{bench_rounds, median, pki, spread};
use anyhow::{Context, bail};
use rustls::crypto::SupportedKxGroup;
use rustls::crypto::aws_lc_rs::kx_group;
use rustls::{ClientConnection, Connection, ServerConnection};

const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
/// Handshakes per round, and the time they may take.
const HANDSHAKES: usize = 2_000;
const HANDSHAKE_TIME: Duration = Duration::from_secs(3);
/// Bytes per bulk round, written as 16 KiB application writes (HBONE's relay buffer).
const BULK_BYTES: usize = 512 << 20;
const CHUNK: usize = 16 << 10;

/// One provider with one key exchange the client offers.
struct Variant {
    name: &'static str,
    crypto: Crypto,
    client_kx: &'static dyn SupportedKxGroup,
}

const VARIANTS: [Variant; 3] = [
    Variant {
        name: "ring, X25519",
        crypto: Crypto::Ring,
        client_kx: kx_group::X25519,
    },
    Variant {
        name: "aws-lc-rs, X25519",
        crypto: Crypto::AwsLcRs,
        client_kx: kx_group::X25519,
    },
    Variant {
        name: "ring, X25519MLKEM768 (Ambit)",
        crypto: Crypto::DEFAULT,
        client_kx: kx_group::X25519MLKEM768,
    },
];

struct Configs {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn main() -> anyhow::Result<()> {
    let ca = pki::root();
    let roots = MeshRoots::from_pem(&ca.pem)?;
    let key = |id: &str| {
        let (chain, key) = pki::leaf(&ca, id);
        WorkloadKey::from_pem(&chain, &key)
    };
    let (server_key, client_key) = (key(SERVER)?, key(CLIENT)?);
    let configs = VARIANTS
        .iter()
        .map(|v| {
            let server = server_config_with(
                provider_with(v.crypto, KX_GROUPS),
                &server_key,
                &roots,
                "cluster.local",
            )?;
            let client = client_config_with(
                provider_with(v.crypto, &[v.client_kx]),
                &client_key,
                &roots,
                [Identity::parse(SERVER)?],
            )?;
            Ok(Configs { server, client })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let rounds = bench_rounds();
    let mut handshakes = vec![Vec::new(); VARIANTS.len()];
    let mut bulk = vec![Vec::new(); VARIANTS.len()];
    for round in 0..rounds {
        eprintln!("bench-tls: round {} of {rounds}...", round + 1);
        for (i, (v, c)) in VARIANTS.iter().zip(&configs).enumerate() {
            handshakes[i].push(handshakes_per_s(c, v).with_context(|| v.name)?);
            bulk[i].push(bulk_gbyte_per_s(c).with_context(|| v.name)?);
        }
    }

    println!(
        "\n## Ambit TLS crypto bench (one thread, in memory, both ends' work; medians of {rounds} rounds [min–max])\n"
    );
    println!("| measurement | {} | aws-lc-rs/ring |", names().join(" | "));
    println!("|---|---|---|---|---|");
    let row = |name: &str, v: &[Vec<f64>], unit_digits: usize| {
        let m: Vec<f64> = v.iter().map(|x| median(x.clone())).collect();
        let cells: Vec<String> = m
            .iter()
            .zip(v)
            .map(|(m, all)| format!("{m:.unit_digits$} {}", spread(all)))
            .collect();
        println!("| {name} | {} | {:.2}x |", cells.join(" | "), m[1] / m[0]);
    };
    row("mutual-TLS handshakes/s (client + server)", &handshakes, 0);
    let us = |v: &[f64]| 1e6 / median(v.to_vec());
    let pq = us(&handshakes[2]) - us(&handshakes[0]);
    row("bulk, encrypt + decrypt (GB/s of payload)", &bulk, 2);
    println!(
        "\nThe hybrid post-quantum key exchange adds {pq:.0} µs of CPU to a handshake (both ends).\n"
    );
    println!(
        "Each handshake is a full TLS 1.3 mutual-TLS handshake with Ambit's configs: ECDSA P-256 certificates signed by the mesh root, SPIFFE verification on both sides, no resumption. Bulk is one connection's AES-128-GCM (the suite both ends choose), 16 KiB writes. The aws-lc-rs/ring column compares the X25519 variants; the third is what Ambit offers first (ML-KEM from aws-lc-rs, the rest from ring)."
    );
    Ok(())
}

fn names() -> Vec<&'static str> {
    VARIANTS.iter().map(|v| v.name).collect()
}

/// Full handshakes per second, both ends on this thread.
fn handshakes_per_s(c: &Configs, v: &Variant) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut n = 0;
    while n < HANDSHAKES && start.elapsed() < HANDSHAKE_TIME {
        let (client, server) = handshake(c)?;
        if n == 0 {
            check(&client, &server, v)?;
        }
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The negotiated parameters are the ones the variant is meant to measure.
fn check(client: &Connection, server: &Connection, v: &Variant) -> anyhow::Result<()> {
    let group = |c: &Connection| c.negotiated_key_exchange_group().map(|g| g.name());
    if group(client) != Some(v.client_kx.name()) || group(server) != group(client) {
        bail!(
            "negotiated {:?}/{:?}, not {:?}",
            group(client),
            group(server),
            v.client_kx.name()
        );
    }
    let suite = client.negotiated_cipher_suite().map(|s| s.suite());
    if suite != Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256) {
        bail!("negotiated {suite:?}");
    }
    Ok(())
}

fn handshake(c: &Configs) -> anyhow::Result<(Connection, Connection)> {
    let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut client = Connection::from(ClientConnection::new(c.client.clone(), name)?);
    let mut server = Connection::from(ServerConnection::new(c.server.clone())?);
    let mut buf = Vec::new();
    for _ in 0..10 {
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok((client, server));
        }
        transfer(&mut client, &mut server, &mut buf)?;
        transfer(&mut server, &mut client, &mut buf)?;
    }
    bail!("the handshake did not finish in 10 flights")
}

/// Moves every TLS record `from` has to send into `to`.
fn transfer(from: &mut Connection, to: &mut Connection, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf)?;
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd)?;
        to.process_new_packets()?;
    }
    Ok(())
}

/// One connection's payload rate, client to server: encrypting, decrypting and reading.
fn bulk_gbyte_per_s(c: &Configs) -> anyhow::Result<f64> {
    let (mut client, mut server) = handshake(c)?;
    let chunk = vec![0x5au8; CHUNK];
    let mut out = vec![0u8; CHUNK];
    let mut buf = Vec::with_capacity(2 * CHUNK);
    let mut received = 0;
    let start = Instant::now();
    for _ in 0..BULK_BYTES / CHUNK {
        client.writer().write_all(&chunk)?;
        transfer(&mut client, &mut server, &mut buf)?;
        loop {
            match server.reader().read(&mut out) {
                Ok(0) => bail!("the server saw the end of the stream"),
                Ok(n) => received += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if received != BULK_BYTES {
        bail!("received {received} of {BULK_BYTES} bytes");
    }
    Ok(received as f64 / secs / 1e9)
}
