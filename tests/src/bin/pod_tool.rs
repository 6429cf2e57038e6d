//! `ambit-pod-tool`: the workload the simulated cluster runs inside its pods.
//!
//! `serve` accepts on any number of addresses. On each connection it first writes one
//! line, `peer=<addr> local=<addr>`, saying what it saw (so a client can tell whether its
//! connection went through the node agent, and where it landed), then reads a mode byte:
//! `E` echoes everything back until EOF; `S` discards everything and, at EOF, answers
//! with the byte count as 8 big-endian bytes.
//!
//! `client` opens connections, checks what the server saw, and (mode `E`) sends a
//! deterministic pattern and checks that exactly the same bytes come back. It prints one
//! JSON line per connection and exits non-zero if any failed. `--hold` waits for a line on
//! stdin between connecting and sending, so a test can change the world in between.
//! `rr`, `bulk` and `cps` are the benchmarks' load generators.

use std::io::BufRead;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept connections (addresses like 10.244.1.2:8080 or 10.244.1.2:20000-20019).
    Serve {
        #[arg(long = "listen", required = true)]
        listen: Vec<String>,
    },
    /// Open connections and verify them.
    Client {
        /// Targets; connection i uses target i % len.
        #[arg(long = "connect", required = true)]
        connect: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        /// Bytes each connection sends (and expects echoed).
        #[arg(long, default_value_t = 0)]
        bytes: u64,
        /// Wait for a line on stdin after connecting, before sending.
        #[arg(long)]
        hold: bool,
        /// Give up on a connection after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Ask the server to reset the connection instead of echoing; the connection
        /// succeeds only if the reset reaches this client.
        #[arg(long)]
        expect_reset: bool,
    },
    /// Request/response latency: 1-byte round trips on one connection.
    Rr {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
    /// Single-stream bulk throughput into a sink.
    Bulk {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// Time spent in the connect() system call (blocking socket), sequentially.
    ConnectLat {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 5_000)]
        count: usize,
    },
    /// An HTTP/1.1 and HTTP/2 server answering every request with 200, header
    /// `x-backend: <name>` and body `<name> <peer ip>`; `/bytes/<n>` streams n bytes,
    /// `/delay/<ms>` answers after ms milliseconds.
    HttpServe {
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long)]
        name: String,
        /// Answer every Nth request (1st, N+1th, ...) with 503: a flaky backend.
        #[arg(long)]
        fail_every: Option<u64>,
    },
    /// HTTP/1.1 GETs on one connection; one JSON line per request
    /// (`{"status", "backend", "body"}` or `{"error"}`), exits non-zero on a failure.
    HttpGet {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long)]
        host: String,
        /// `name:value`.
        #[arg(long = "header")]
        headers: Vec<String>,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// POST a body of this many bytes (made as it is sent) instead of a GET.
        #[arg(long)]
        upload: Option<u64>,
        /// Report bodies up to this many bytes as text (longer ones as their size).
        #[arg(long, default_value_t = 4096)]
        keep: usize,
    },
    /// Connections per second (connect, hello, close), sequentially.
    Cps {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 2_000)]
        count: usize,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
}

/// What one client connection observed.
#[derive(Debug, Serialize)]
struct ConnReport {
    index: usize,
    target: SocketAddr,
    local: Option<SocketAddr>,
    server_peer: Option<SocketAddr>,
    server_local: Option<SocketAddr>,
    bytes: u64,
    ok: bool,
    error: Option<String>,
    error_kind: Option<String>,
    elapsed_ms: f64,
}

fn main() -> std::process::ExitCode {
    raise_fd_limit();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambit-pod-tool: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        match Cli::parse().cmd {
            Cmd::Serve { listen } => serve(listen).await,
            Cmd::HttpServe {
                listen,
                name,
                fail_every,
            } => http_serve(listen, name, fail_every).await,
            Cmd::HttpGet {
                connect,
                path,
                host,
                headers,
                count,
                upload,
                keep,
            } => {
                let req = GetRequests {
                    path,
                    host,
                    headers,
                    count,
                    upload,
                    keep,
                };
                http_get(connect, req).await
            }
            Cmd::Client {
                connect,
                conns,
                bytes,
                hold,
                timeout,
                expect_reset,
            } => {
                client(
                    connect,
                    conns,
                    bytes,
                    hold,
                    expect_reset,
                    Duration::from_secs(timeout),
                )
                .await
            }
            Cmd::Rr { connect, count } => rr(connect, count).await,
            Cmd::Bulk { connect, seconds } => bulk(connect, seconds).await,
            Cmd::Cps {
                connect,
                count,
                seconds,
            } => cps(connect, count, seconds).await,
            Cmd::ConnectLat { connect, count } => {
                tokio::task::spawn_blocking(move || connect_lat(connect, count)).await?
            }
        }
    })
}

fn expand(spec: &str) -> anyhow::Result<Vec<SocketAddr>> {
    let (ip, ports) = spec
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("bad address {spec}"))?;
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (a.parse::<u16>()?, b.parse::<u16>()?),
        None => (ports.parse()?, ports.parse()?),
    };
    let ip: std::net::IpAddr = ip.parse()?;
    Ok((lo..=hi).map(|p| SocketAddr::new(ip, p)).collect())
}

/// Listens on `addr` with a backlog of 4,096 (the kernel's default `somaxconn`), as
/// servers built for load do. Rust's and tokio's `bind` ask for 128: when the agent
/// delivers a thousand tunnels at once, the rest overflow the accept queue, the kernel
/// drops their handshakes and each retries its SYN after 1, 3, 7, 15 s
/// (`TcpExtListenOverflows` in the pod: 522 of 1,000), which the idle-tunnels bench
/// took for a stall.
fn listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(4096)
}

async fn serve(listen: Vec<String>) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for spec in &listen {
        for addr in expand(spec)? {
            let l = listener(addr).map_err(|e| anyhow::anyhow!("bind {addr}: {e}"))?;
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((s, peer)) = l.accept().await else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let _ = serve_conn(s, peer).await;
                    });
                }
            }));
        }
    }
    println!("listening");
    // The accept loops never end; the test harness kills the server.
    drop(tasks);
    std::future::pending::<anyhow::Result<()>>().await
}

async fn serve_conn(mut s: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let local = s.local_addr()?;
    s.write_all(format!("peer={peer} local={local}\n").as_bytes())
        .await?;
    let mode = match s.read_u8().await {
        Ok(m) => m,
        Err(_) => return Ok(()), // connect-and-close clients
    };
    if mode == b'R' {
        // Abort: close with RST.
        return s.set_zero_linger();
    }
    let (mut r, mut w) = s.split();
    match mode {
        b'E' => {
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await?;
        }
        b'S' => {
            let n = tokio::io::copy(&mut r, &mut tokio::io::sink()).await?;
            w.write_all(&n.to_be_bytes()).await?;
            w.shutdown().await?;
        }
        _ => {}
    }
    Ok(())
}

/// The byte at `offset` of connection `index`'s pattern (period 251, a prime, so shifted
/// or dropped chunks are detected).
fn pattern(index: usize, offset: u64) -> u8 {
    ((offset + index as u64 * 7) % 251) as u8
}

async fn connect_hello(
    target: SocketAddr,
) -> std::io::Result<(BufReader<TcpStream>, SocketAddr, SocketAddr, SocketAddr)> {
    let s = TcpStream::connect(target).await?;
    s.set_nodelay(true)?;
    let local = s.local_addr()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad hello {line:?}"),
        )
    };
    let mut peer = None;
    let mut srv_local = None;
    for field in line.split_whitespace() {
        if let Some(v) = field.strip_prefix("peer=") {
            peer = v.parse().ok();
        } else if let Some(v) = field.strip_prefix("local=") {
            srv_local = v.parse().ok();
        }
    }
    Ok((r, local, peer.ok_or_else(bad)?, srv_local.ok_or_else(bad)?))
}

async fn client(
    targets: Vec<SocketAddr>,
    conns: usize,
    bytes: u64,
    hold: bool,
    expect_reset: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    // All connections are open at once before any sends: the barrier holds them.
    let barrier = Arc::new(tokio::sync::Barrier::new(conns + usize::from(hold)));
    let (up_tx, mut up_rx) = tokio::sync::mpsc::channel::<()>(conns.max(1));
    let mut tasks = Vec::new();
    for index in 0..conns {
        let target = targets[index % targets.len()];
        let barrier = barrier.clone();
        let up_tx = up_tx.clone();
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut rep = ConnReport {
                index,
                target,
                local: None,
                server_peer: None,
                server_local: None,
                bytes,
                ok: false,
                error: None,
                error_kind: None,
                elapsed_ms: 0.0,
            };
            // Every task reaches the barrier exactly once, whatever happened before it
            // (a hello that never came times out): one missing would hold the others,
            // and the process, for ever.
            let deadline = tokio::time::Instant::now() + timeout;
            let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
            let hello = tokio::time::timeout_at(deadline, connect_hello(target))
                .await
                .unwrap_or_else(|_| Err(timed_out()));
            let _ = up_tx.send(()).await;
            barrier.wait().await;
            let res = match hello {
                Ok((r, local, peer, srv_local)) => {
                    rep.local = Some(local);
                    rep.server_peer = Some(peer);
                    rep.server_local = Some(srv_local);
                    let exchange = async {
                        if expect_reset {
                            reset_exchange(r).await
                        } else {
                            echo_exchange(r, index, bytes).await
                        }
                    };
                    tokio::time::timeout_at(deadline, exchange)
                        .await
                        .unwrap_or_else(|_| Err(timed_out()))
                }
                Err(e) => Err(e),
            };
            match res {
                Ok(()) => rep.ok = true,
                Err(e) => {
                    rep.error_kind = Some(format!("{:?}", e.kind()));
                    rep.error = Some(if rep.local.is_none() {
                        format!("before the hello: {e}")
                    } else {
                        e.to_string()
                    });
                }
            }
            rep.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
            rep
        }));
    }
    drop(up_tx);
    if hold {
        // Every connection has its hello (or has failed) before we say so.
        for _ in 0..conns {
            up_rx.recv().await;
        }
        println!("connected");
        tokio::task::spawn_blocking(|| {
            let mut l = String::new();
            let _ = std::io::stdin().lock().read_line(&mut l);
        })
        .await?;
        barrier.wait().await;
    }
    let mut failed = 0;
    for t in tasks {
        let rep = t.await?;
        failed += usize::from(!rep.ok);
        println!("{}", serde_json::to_string(&rep)?);
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {conns} connections failed");
    }
    Ok(())
}

async fn echo_exchange(r: BufReader<TcpStream>, index: usize, bytes: u64) -> std::io::Result<()> {
    let mut s = r.into_inner();
    s.write_u8(b'E').await?;
    let (mut rd, mut wr) = s.into_split();
    let writer = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        while off < bytes {
            let n = (bytes - off).min(buf.len() as u64) as usize;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(index, off + i as u64);
            }
            wr.write_all(&buf[..n]).await?;
            off += n as u64;
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            for (i, b) in buf[..n].iter().enumerate() {
                if *b != pattern(index, off + i as u64) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("echo differs at byte {}", off + i as u64),
                    ));
                }
            }
            off += n as u64;
        }
        if off != bytes {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("echoed {off} of {bytes} bytes"),
            ));
        }
        Ok(())
    };
    tokio::try_join!(writer, reader)?;
    Ok(())
}

async fn reset_exchange(r: BufReader<TcpStream>) -> std::io::Result<()> {
    let mut s = r.into_inner();
    s.write_u8(b'R').await?;
    let mut buf = [0u8; 64];
    match s.read(&mut buf).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Err(e) => Err(e),
        Ok(n) => Err(std::io::Error::other(format!(
            "expected a reset, read {n} bytes"
        ))),
    }
}

async fn rr(target: SocketAddr, count: usize) -> anyhow::Result<()> {
    let (r, ..) = connect_hello(target).await?;
    let mut s = r.into_inner();
    s.write_u8(b'E').await?;
    let mut lat = Vec::with_capacity(count);
    let mut b = [0u8; 1];
    for i in 0..count + count / 10 {
        let t = Instant::now();
        s.write_all(&[i as u8]).await?;
        s.read_exact(&mut b).await?;
        anyhow::ensure!(
            b[0] == i as u8,
            "round trip {i}: echoed {} not {}",
            b[0],
            i as u8
        );
        if i >= count / 10 {
            lat.push(t.elapsed().as_nanos() as u64); // the first tenth warms up
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1e3;
    println!(
        "{}",
        serde_json::json!({"p50_us": pct(0.50), "p99_us": pct(0.99), "count": lat.len()})
    );
    Ok(())
}

async fn bulk(target: SocketAddr, seconds: f64) -> anyhow::Result<()> {
    let (r, ..) = connect_hello(target).await?;
    let mut s = r.into_inner();
    s.write_u8(b'S').await?;
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        s.write_all(&buf).await?;
        sent += buf.len() as u64;
    }
    s.shutdown().await?;
    let acked = s.read_u64().await?; // the sink's count: everything arrived
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(acked == sent, "sink counted {acked} of {sent} bytes");
    println!(
        "{}",
        serde_json::json!({"gbit_per_s": sent as f64 * 8.0 / secs / 1e9, "bytes": sent})
    );
    Ok(())
}

fn connect_lat(target: SocketAddr, count: usize) -> anyhow::Result<()> {
    let mut lat = Vec::with_capacity(count);
    for i in 0..count + count / 10 {
        let t = Instant::now();
        let s = std::net::TcpStream::connect(target)?;
        let took = t.elapsed().as_nanos() as u64;
        // RST instead of FIN: no TIME_WAIT pile-up over thousands of connections.
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
        drop(s);
        if i >= count / 10 {
            lat.push(took);
        }
    }
    lat.sort_unstable();
    let mean = lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1e3;
    println!(
        "{}",
        serde_json::json!({"p50_us": lat[lat.len() / 2] as f64 / 1e3, "mean_us": mean, "count": lat.len()})
    );
    Ok(())
}

async fn cps(target: SocketAddr, count: usize, seconds: f64) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut done = 0;
    while done < count && start.elapsed().as_secs_f64() < seconds {
        let (r, ..) = connect_hello(target).await?;
        // Close with RST: thousands of client-side TIME_WAIT sockets per round would
        // exhaust the ephemeral ports and measure that instead.
        r.get_ref().set_zero_linger()?;
        drop(r);
        done += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"conns_per_s": done as f64 / secs, "count": done})
    );
    Ok(())
}

/// Thousands of concurrent connections need more than the default 1024 descriptors.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn http_serve(
    listen: Vec<SocketAddr>,
    name: String,
    fail_every: Option<u64>,
) -> anyhow::Result<()> {
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for addr in listen {
        let l = listener(addr)?;
        let name = name.clone();
        let served = served.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = l.accept().await else {
                    return;
                };
                let name = name.clone();
                let served = served.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let text = format!("{name} {}", peer.ip());
                            let name = name.clone();
                            let n = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let fail = fail_every.is_some_and(|k| k > 0 && n.is_multiple_of(k));
                            async move {
                                if fail {
                                    return Ok(hyper::Response::builder()
                                        .status(503)
                                        .header("x-backend", name)
                                        .body(http_body_util::BodyExt::boxed(
                                            http_body_util::Empty::new(),
                                        ))
                                        .expect("a valid response"));
                                }
                                http_answer(req, name, text).await
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
                });
            }
        }));
    }
    println!("listening");
    for t in tasks {
        t.await?;
    }
    Ok(())
}

type HttpBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

/// `n` bytes of `fill` as a body, made as it is sent (never held whole).
fn made_body(n: u64, fill: u8) -> HttpBody {
    use http_body_util::BodyExt;
    const CHUNK: u64 = 64 * 1024;
    let chunk = bytes::Bytes::from(vec![fill; CHUNK as usize]);
    let frames = (0..n.div_ceil(CHUNK)).map(move |i| {
        let len = CHUNK.min(n - i * CHUNK) as usize;
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk.slice(..len)))
    });
    http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed()
}

/// Drains the request body (counting it, never holding it: header `x-body-bytes`), then
/// answers `<text>`, or for `/bytes/<n>` streams `n` bytes.
async fn http_answer(
    req: hyper::Request<hyper::body::Incoming>,
    name: String,
    text: String,
) -> Result<hyper::Response<HttpBody>, hyper::Error> {
    use http_body_util::BodyExt;
    let n: Option<u64> = req
        .uri()
        .path()
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse().ok());
    if let Some(ms) = req
        .uri()
        .path()
        .strip_prefix("/delay/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let mut body = req.into_body();
    let mut received = 0u64;
    while let Some(f) = body.frame().await {
        if let Some(d) = f?.data_ref() {
            received += d.len() as u64;
        }
    }
    let out = match n {
        None => http_body_util::Full::new(bytes::Bytes::from(text))
            .map_err(|e| match e {})
            .boxed(),
        Some(n) => made_body(n, b'x'),
    };
    Ok(hyper::Response::builder()
        .header("x-backend", name)
        .header("x-body-bytes", received.to_string())
        .body(out)
        .expect("a valid response"))
}

/// What `http-get` sends.
struct GetRequests {
    path: String,
    host: String,
    headers: Vec<String>,
    count: usize,
    upload: Option<u64>,
    keep: usize,
}

async fn http_get(connect: SocketAddr, r: GetRequests) -> anyhow::Result<()> {
    let GetRequests {
        path,
        host,
        headers,
        count,
        upload,
        keep,
    } = r;
    use http_body_util::BodyExt;
    let fail = |e: String| {
        println!("{}", serde_json::json!({ "error": e }));
        anyhow::anyhow!(e)
    };
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(connect))
        .await
        .map_err(|_| fail("connect timeout".into()))?
        .map_err(|e| fail(format!("connect: {e}")))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| fail(format!("handshake: {e}")))?;
    tokio::spawn(conn);
    for _ in 0..count {
        let mut req = hyper::Request::builder()
            .method(if upload.is_some() { "POST" } else { "GET" })
            .uri(path.as_str())
            .header("host", host.as_str());
        for h in &headers {
            let (k, v) = h
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("header {h:?}: want name:value"))?;
            req = req.header(k.trim(), v.trim());
        }
        let req = req.body(made_body(upload.unwrap_or(0), b'u'))?;
        let started = std::time::Instant::now();
        let work = async {
            send.ready().await?;
            let r = send.send_request(req).await?;
            let status = r.status().as_u16();
            let backend = r
                .headers()
                .get("x-backend")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            let uploaded: u64 = r
                .headers()
                .get("x-body-bytes")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0);
            // Counted as it arrives; kept only if small.
            let mut body = r.into_body();
            let (mut kept, mut downloaded) = (Vec::new(), 0u64);
            while let Some(f) = body.frame().await {
                if let Some(d) = f?.data_ref() {
                    downloaded += d.len() as u64;
                    if kept.len() < keep {
                        kept.extend_from_slice(d);
                    }
                }
            }
            let text = if downloaded > keep as u64 {
                format!("{downloaded} bytes")
            } else {
                String::from_utf8_lossy(&kept).into_owned()
            };
            anyhow::Ok((status, backend, text, uploaded, downloaded))
        };
        let (status, backend, body, uploaded, downloaded) =
            tokio::time::timeout(Duration::from_secs(120), work)
                .await
                .map_err(|_| fail("request timeout".into()))?
                .map_err(|e| fail(format!("request: {e}")))?;
        println!(
            "{}",
            serde_json::json!({ "status": status, "backend": backend, "body": body,
                                "uploaded": uploaded, "downloaded": downloaded,
                                "ms": started.elapsed().as_secs_f64() * 1e3 })
        );
    }
    Ok(())
}
