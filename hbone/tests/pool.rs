//! The HBONE connection pool: few connections for many tunnels, single-flight dialing,
//! idle connections closed.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ambit_hbone::connect::{HboneClient, HboneError};
use ambit_hbone::pool::{Dialer, Pool, PoolConfig, PoolError, PoolKey};
use ambit_identity::Identity;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct TestDialer {
    ca: Arc<Ca>,
}

impl Dialer for TestDialer {
    type Target = ();
    type Error = HboneError;
    async fn dial(&self, key: &PoolKey, _: &()) -> Result<HboneClient, HboneError> {
        Ok(client(&self.ca, key.dst).await)
    }
}

/// Fails every dial, after a moment.
struct FailingDialer;

impl Dialer for FailingDialer {
    type Target = ();
    type Error = std::io::Error;
    async fn dial(&self, _: &PoolKey, _: &()) -> Result<HboneClient, std::io::Error> {
        tokio::task::yield_now().await;
        Err(std::io::ErrorKind::ConnectionRefused.into())
    }
}

fn id(s: &str) -> Identity {
    Identity::parse(s).unwrap()
}

async fn setup(config: PoolConfig) -> (Arc<Pool<TestDialer>>, PoolKey, SocketAddr) {
    let ca = Arc::new(ca());
    let app = echo().await;
    let (server, _) = hbone_server(&ca, 1, 2).await;
    let key = PoolKey {
        src_identity: id(FRONTEND),
        src: "127.0.0.1".parse().unwrap(),
        dst_identity: id(WEB),
        dst: server,
    };
    (Pool::new(TestDialer { ca }, config), key, app)
}

async fn echo_through(pool: &Pool<TestDialer>, key: &PoolKey, app: SocketAddr, i: usize) -> bool {
    echo_held(pool, key, app, i, None).await
}

/// Opens a tunnel, waits at `barrier` (so every tunnel is open at once), then echoes.
async fn echo_held(
    pool: &Pool<TestDialer>,
    key: &PoolKey,
    app: SocketAddr,
    i: usize,
    barrier: Option<&tokio::sync::Barrier>,
) -> bool {
    let mut t = pool
        .connect(key, &(), app, "10.0.0.1".parse().unwrap(), "t")
        .await
        .unwrap();
    if let Some(b) = barrier {
        b.wait().await;
    }
    let data = pattern(10_000, i);
    t.write_all(&data).await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.unwrap();
    back == data
}

#[tokio::test]
async fn a_thousand_concurrent_tunnels_use_few_connections() {
    let (pool, key, app) = setup(PoolConfig::default()).await;
    // All 1000 open at the same time: at 100 streams a connection, that takes 10.
    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let (pool, key, barrier) = (pool.clone(), key.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            echo_held(&pool, &key, app, i, Some(&barrier)).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap(), "a tunnel's bytes differ");
    }
    let dials = pool.dials.load(Ordering::Relaxed);
    eprintln!("1000 concurrent tunnels used {dials} HTTP/2 connections");
    assert_eq!(
        dials, 10,
        "1000 tunnels open at once at 100 streams a connection"
    );
}

#[tokio::test]
async fn a_burst_to_a_new_destination_dials_once() {
    let (pool, key, app) = setup(PoolConfig::default()).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (pool, key) = (pool.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            echo_through(&pool, &key, app, i).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap());
    }
    assert_eq!(pool.dials.load(Ordering::Relaxed), 1);
}

/// The pool's maps are sharded by key: bursts to many destinations from several worker
/// threads at once, with reaps running beside them, still dial exactly once per key
/// and deliver every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bursts_to_many_destinations_on_many_threads_dial_once_each() {
    let (pool, key, app) = setup(PoolConfig::default()).await;
    const KEYS: usize = 40;
    let keys: Vec<PoolKey> = (0..KEYS)
        .map(|k| PoolKey {
            src: format!("127.0.{}.{}", k / 200, k % 200 + 1)
                .parse()
                .unwrap(),
            ..key.clone()
        })
        .collect();
    let reaping = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reaper = {
        let (pool, reaping) = (pool.clone(), reaping.clone());
        tokio::spawn(async move {
            while reaping.load(Ordering::Relaxed) {
                pool.reap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for i in 0..KEYS * 25 {
        let (pool, key) = (pool.clone(), keys[i % KEYS].clone());
        tasks.push(tokio::spawn(async move {
            echo_through(&pool, &key, app, i).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap(), "a tunnel's bytes differ");
    }
    reaping.store(false, Ordering::Relaxed);
    reaper.await.unwrap();
    assert_eq!(pool.dials.load(Ordering::Relaxed), KEYS as u64);
    assert_eq!(
        pool.bookkeeping(),
        (KEYS, 0),
        "(keys with connections, dialing)"
    );
    assert_eq!(pool.connections(), KEYS);
}

#[tokio::test]
async fn idle_connections_close_and_are_dialed_again_when_needed() {
    let (pool, key, app) = setup(PoolConfig {
        idle_timeout: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    assert!(echo_through(&pool, &key, app, 0).await);
    assert_eq!(pool.connections(), 1);
    assert_eq!(pool.reap(), 0, "a fresh connection was reaped");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(pool.reap(), 1);
    assert_eq!(pool.connections(), 0);
    assert!(echo_through(&pool, &key, app, 1).await);
    assert_eq!(pool.dials.load(Ordering::Relaxed), 2);
}

/// Dials an in-memory HBONE server whose every tunnel is refused (503): a real
/// HTTP/2 connection per key, without the cost of TLS.
struct MemoryDialer;

impl Dialer for MemoryDialer {
    type Target = ();
    type Error = HboneError;
    async fn dial(&self, _: &PoolKey, _: &()) -> Result<HboneClient, HboneError> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(ambit_hbone::connect::serve(server_io, |_req| async {
            Err::<ambit_hbone::connect::Pipe<tokio::io::DuplexStream>, _>(
                ambit_hbone::connect::Refusal::Unreachable,
            )
        }));
        HboneClient::handshake(client_io).await
    }
}

#[tokio::test]
async fn bookkeeping_stays_bounded_as_a_thousand_short_lived_pods_come_and_go() {
    let pool = Pool::new(
        MemoryDialer,
        PoolConfig {
            idle_timeout: Duration::from_millis(1),
            ..Default::default()
        },
    );
    // Each "pod" has its own source IP, so its own key: one tunnel, then it is gone.
    for i in 0..1000u32 {
        let key = PoolKey {
            src_identity: id(FRONTEND),
            src: std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0af4_0000 + i)),
            dst_identity: id(WEB),
            dst: "127.0.0.1:15008".parse().unwrap(),
        };
        let r = pool
            .connect(&key, &(), "10.0.0.1:80".parse().unwrap(), key.src, "t")
            .await;
        assert!(
            matches!(r, Err(PoolError::Tunnel(HboneError::Unreachable))),
            "{r:?}"
        );
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            pool.reap();
        }
    }
    tokio::time::sleep(Duration::from_millis(2)).await;
    pool.reap();
    assert_eq!(pool.dials.load(Ordering::Relaxed), 1000);
    assert_eq!(
        pool.bookkeeping(),
        (0, 0),
        "keys of gone pods are still tracked"
    );

    // Failed dials leave nothing behind either, also when many wait on one gate.
    let failing = Pool::new(FailingDialer, PoolConfig::default());
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let failing = failing.clone();
        tasks.push(tokio::spawn(async move {
            let key = PoolKey {
                src_identity: id(FRONTEND),
                src: std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0af5_0000 + i % 100)),
                dst_identity: id(WEB),
                dst: "127.0.0.1:9".parse().unwrap(),
            };
            let r = failing
                .connect(&key, &(), "127.0.0.1:9".parse().unwrap(), key.src, "t")
                .await;
            matches!(r, Err(PoolError::Dial(_)))
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap());
    }
    assert_eq!(failing.bookkeeping(), (0, 0));
}
