//! A TLS 1.3 stream that frames its own records, with rustls doing everything else.
//!
//! rustls's buffered API (what tokio-rustls drives) copies the plaintext of every received
//! record into a fresh `Vec` before anyone reads it, and reads its socket 4 KiB at a time:
//! on a bulk HBONE transfer those copies were the largest user-space cost after the cipher
//! (`Payload::into_vec` 4.6 % of the agents' CPU, the read-ahead buffer's copy 1.1 %).
//! Here the handshake runs on rustls's unbuffered API and then the connection becomes a
//! [`KernelConnection`], the API rustls offers for kTLS: rustls still derives every key
//! update and stores the session tickets a server sends, and this stream does what the
//! kernel would: it frames records, encrypts and decrypts them with the negotiated suite's
//! own rustls encrypter and decrypter (the same code the buffered API runs; decryption is
//! in place in the socket's read buffer), and handles the post-handshake messages and
//! alerts of RFC 8446. A received byte is copied once, into its reader's buffer.
//!
//! What the stream enforces, as rustls does: records are protected application-data
//! records of at most 2^14 + 256 bytes; inner plaintext at most 2^14; after the handshake
//! only `NewSessionTicket` (from a server) and `KeyUpdate` are accepted, never spanning a
//! key change; `close_notify` ends the stream, any other alert but `user_canceled` is an
//! error, and so is a TCP end without `close_notify`. The sending key is renewed with a
//! `KeyUpdate` before the suite's confidentiality limit, and a peer's `update_requested`
//! is answered.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{
    AlertDescription, ConnectionTrafficSecrets, ContentType, HandshakeType, ProtocolVersion,
    SupportedCipherSuite, Tls13CipherSuite,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// A record header: type, legacy version, length.
const HEADER: usize = 5;
/// Largest plaintext of one record.
const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest protected record body (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// What one read takes from the socket at most; the read buffer's size.
const READ_SIZE: usize = 64 * 1024;
/// Ciphertext queued for the socket beyond which a write waits for it to drain.
const QUEUE_LIMIT: usize = 64 * 1024;
/// Records written to the socket in one `writev`.
const MAX_IOVS: usize = 16;
/// Plaintext slices of one vectored write gathered into records.
const MAX_GATHER: usize = 32;
/// A post-handshake message larger than this is refused (a session ticket is a few
/// hundred bytes).
const MAX_POST_HANDSHAKE: usize = 64 * 1024;
/// Records sent under one key before it is renewed, at most; below every suite's
/// confidentiality limit (AES-GCM: 2^24.5), which is used when smaller.
const RENEW_AFTER: u64 = 1 << 24;
/// Key updates accepted in a row without application data between them (as rustls).
const MAX_KEY_UPDATES: u32 = 32;
/// Empty application-data records accepted in a row.
const MAX_EMPTY_RECORDS: u32 = 32;
/// `user_canceled` warnings accepted (rustls allows 4 warning alerts).
const MAX_WARNINGS: u32 = 4;

/// Completes a server handshake on `io` with `config`, then frames records itself.
pub async fn accept<IO>(config: Arc<rustls::ServerConfig>, io: IO) -> io::Result<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    handshake(conn, io).await
}

/// Completes a client handshake with `name` on `io` with `config`, then frames records
/// itself.
pub async fn connect<IO>(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    io: IO,
) -> io::Result<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedClientConnection::new(config, name).map_err(invalid)?;
    handshake(conn, io).await
}

/// A rustls error as the I/O error tokio-rustls makes of it (callers look inside).
fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The two unbuffered connection types, for one handshake driver.
trait Unbuffered:
    std::ops::Deref<Target = rustls::unbuffered::UnbufferedConnectionCommon<Self::Data>>
{
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error>;
}

/// The same two methods on each side's connection type.
macro_rules! unbuffered {
    ($conn:ty, $data:ty, $kernel:ident) => {
        impl Unbuffered for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error> {
                let (s, k) = self.dangerous_into_kernel_connection()?;
                Ok((s, Kernel::$kernel(k)))
            }
        }
    };
}

unbuffered!(UnbufferedServerConnection, ServerConnectionData, Server);
unbuffered!(UnbufferedClientConnection, ClientConnectionData, Client);

/// What the handshake loop does next, once rustls's state (which borrows the buffers)
/// is released.
enum Step {
    /// Ask rustls again.
    Again,
    Receive,
    /// rustls may send application data: done, unless it still waits for the client's
    /// Finished (a server may send data before it, never is done before it).
    MaySend,
}

async fn handshake<C, IO>(mut conn: C, mut io: IO) -> io::Result<TlsStream<IO>>
where
    C: Unbuffered,
    IO: AsyncRead + AsyncWrite + Unpin,
{
    // Grown when a flight needs more (a certificate chain is a few KiB).
    let mut incoming = vec![0u8; HEADER + MAX_CIPHERTEXT];
    let mut filled = 0;
    let mut outgoing = vec![0u8; 4 * 1024];
    let mut encoded = 0;
    // rustls is handed whole records one at a time (`incoming[..fed]`), so it sees none
    // past the one that completes the handshake: what follows (a client's first bytes, a
    // KeyUpdate, session tickets) is this stream's. rustls would otherwise take a
    // KeyUpdate arriving with the Finished, switch its sending key and keep the answer
    // for its next write, which it never makes: the peer would not know the new key.
    let mut fed = 0;
    // Application data rustls decrypted during the handshake (none, records being fed
    // one by one; kept should rustls ever report some).
    let mut early = Vec::new();
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..fed]);
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                // rustls queued an alert saying why: send it, as the buffered API does.
                incoming.copy_within(discard..filled, 0);
                fed -= discard;
                send_alert(&mut conn, &mut io, &mut incoming[..fed]).await;
                return Err(invalid(e));
            }
        };
        let step = match state {
            ConnectionState::EncodeTlsData(mut e) => {
                loop {
                    match e.encode(&mut outgoing[encoded..]) {
                        Ok(n) => {
                            encoded += n;
                            break;
                        }
                        Err(EncodeError::InsufficientSize(s)) => {
                            outgoing.resize(encoded + s.required_size, 0);
                        }
                        Err(e) => {
                            return Err(io::Error::other(format!("encoding a handshake: {e}")));
                        }
                    }
                }
                Step::Again
            }
            ConnectionState::TransmitTlsData(t) => {
                io.write_all(&outgoing[..encoded]).await?;
                io.flush().await?;
                encoded = 0;
                t.done();
                Step::Again
            }
            ConnectionState::BlockedHandshake => Step::Receive,
            ConnectionState::WriteTraffic(_) => Step::MaySend,
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(record) = r.next_record() {
                    let record = record.map_err(invalid)?;
                    discard += record.discard;
                    early.extend_from_slice(record.payload);
                }
                Step::Again
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ));
            }
            _ => {
                return Err(io::Error::other(
                    "unexpected TLS state during the handshake (early data is not offered)",
                ));
            }
        };
        if discard > 0 {
            incoming.copy_within(discard..filled, 0);
            filled -= discard;
            fed -= discard;
        }
        let receive = match step {
            Step::Again => false,
            Step::Receive => true,
            Step::MaySend if conn.is_handshaking() => true,
            Step::MaySend => break,
        };
        if receive {
            if let Some(n) = record_len(&incoming[fed..filled]) {
                fed += n;
            } else {
                if filled == incoming.len() {
                    incoming.resize(incoming.len() * 2, 0);
                }
                let n = io.read(&mut incoming[filled..]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tls handshake eof",
                    ));
                }
                filled += n;
            }
        }
    }
    debug_assert_eq!(
        encoded, 0,
        "nothing left to send when the handshake is done"
    );
    debug_assert_eq!(fed, 0, "rustls consumed every record it was given");
    let peer_identity = crate::tls::peer_identity(&conn);
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let key_exchange = conn.negotiated_key_exchange_group().map(|g| g.name());
    let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let (secrets, kernel) = conn.into_kernel().map_err(invalid)?;
    let suite = match kernel.suite() {
        SupportedCipherSuite::Tls13(s) => s,
        #[allow(unreachable_patterns)] // without rustls's `tls12` feature
        _ => return Err(io::Error::other("HBONE requires TLS 1.3")),
    };
    let limit = suite.common.confidentiality_limit.min(RENEW_AFTER);
    let (rx_seq, rx_secrets) = secrets.rx;
    let (tx_seq, tx_secrets) = secrets.tx;
    // The bytes after the handshake: first what rustls decrypted, then records not yet
    // read, in one buffer of at least the read size.
    let mut buf = BytesMut::with_capacity(early.len() + filled - fed);
    buf.extend_from_slice(&early);
    let plain = (0, buf.len());
    buf.extend_from_slice(&incoming[fed..filled]);
    let start = plain.1;
    Ok(TlsStream {
        io,
        kernel,
        suite,
        peer_identity,
        alpn,
        key_exchange,
        resumed,
        rx: Rx {
            dec: decrypter(suite, rx_secrets),
            seq: rx_seq,
            buf,
            start,
            plain,
            handshake: Vec::new(),
            closed: false,
            key_updates: 0,
            empty_records: 0,
            warnings: 0,
        },
        tx: Tx {
            enc: encrypter(suite, tx_secrets),
            seq: tx_seq,
            renew_at: tx_seq + limit,
            renew_every: limit,
            queue: VecDeque::new(),
            head_written: 0,
            queued: 0,
            close_sent: false,
            answer_key_update: false,
        },
        failed: None,
    })
}

/// The length of the whole record at the front of `buf`, if it is all there.
fn record_len(buf: &[u8]) -> Option<usize> {
    let len = HEADER + usize::from(u16::from_be_bytes([*buf.get(3)?, *buf.get(4)?]));
    (buf.len() >= len).then_some(len)
}

/// After a handshake error: encodes and sends what rustls queued (its alert), best effort.
async fn send_alert<C, IO>(conn: &mut C, io: &mut IO, incoming: &mut [u8])
where
    C: Unbuffered,
    IO: AsyncWrite + Unpin,
{
    let mut out = vec![0u8; 512];
    let mut encoded = 0;
    // Bounded: an alert is one record; anything else ends the loop.
    for _ in 0..4 {
        // The same buffer as before (rustls's deframer keeps offsets into it).
        match conn.process(incoming).state {
            Ok(ConnectionState::EncodeTlsData(mut e)) => match e.encode(&mut out[encoded..]) {
                Ok(n) => encoded += n,
                Err(EncodeError::InsufficientSize(s)) => {
                    out.resize(encoded + s.required_size, 0);
                    if let Ok(n) = e.encode(&mut out[encoded..]) {
                        encoded += n;
                    }
                }
                Err(_) => break,
            },
            Ok(ConnectionState::TransmitTlsData(t)) => {
                let _ = io.write_all(&out[..encoded]).await;
                let _ = io.flush().await;
                encoded = 0;
                t.done();
            }
            _ => break,
        }
    }
    if encoded > 0 {
        let _ = io.write_all(&out[..encoded]).await;
        let _ = io.flush().await;
    }
}

fn split(
    secrets: ConnectionTrafficSecrets,
) -> (rustls::crypto::cipher::AeadKey, rustls::crypto::cipher::Iv) {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
        // The enum is non-exhaustive; every TLS 1.3 suite rustls offers is above.
        #[allow(unreachable_patterns)]
        _ => unreachable!("a TLS 1.3 suite's secrets"),
    }
}

fn decrypter(
    suite: &Tls13CipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> Box<dyn MessageDecrypter> {
    let (key, iv) = split(secrets);
    suite.aead_alg.decrypter(key, iv)
}

fn encrypter(
    suite: &Tls13CipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> Box<dyn MessageEncrypter> {
    let (key, iv) = split(secrets);
    suite.aead_alg.encrypter(key, iv)
}

/// rustls's side of an established connection: key updates and session tickets.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Self::Client(k) => k.negotiated_cipher_suite(),
            Self::Server(k) => k.negotiated_cipher_suite(),
        }
    }

    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Self::Client(k) => k.update_rx_secret(),
            Self::Server(k) => k.update_rx_secret(),
        }
    }

    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Self::Client(k) => k.update_tx_secret(),
            Self::Server(k) => k.update_tx_secret(),
        }
    }

    fn session_ticket(&mut self, payload: &[u8]) -> io::Result<()> {
        match self {
            Self::Client(k) => k.handle_new_session_ticket(payload).map_err(invalid),
            Self::Server(_) => Err(protocol("a client sent a NewSessionTicket")),
        }
    }
}

fn protocol(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {what}"))
}

/// A fatal error of the record layer, and the alert that tells the peer (none for the
/// peer's own fatal alert).
struct Fatal {
    alert: Option<AlertDescription>,
    error: io::Error,
}

impl Fatal {
    fn rustls(alert: AlertDescription, e: rustls::Error) -> Self {
        Self {
            alert: Some(alert),
            error: invalid(e),
        }
    }
}

fn fatal(alert: AlertDescription, what: &str) -> Fatal {
    Fatal {
        alert: Some(alert),
        error: protocol(what),
    }
}

/// The receiving half.
struct Rx {
    dec: Box<dyn MessageDecrypter>,
    seq: u64,
    /// `buf[start..]` is ciphertext not yet decoded. Empty, with no allocation, while
    /// the connection is idle: a read allocates it, and finding the socket dry frees it.
    buf: BytesMut,
    start: usize,
    /// Decrypted application data in `buf` not yet read.
    plain: (usize, usize),
    /// A post-handshake message arriving in pieces.
    handshake: Vec<u8>,
    /// `close_notify` received: the stream has ended.
    closed: bool,
    /// Key updates received since the last application data.
    key_updates: u32,
    /// Empty application-data records in a row.
    empty_records: u32,
    /// `user_canceled` warnings received.
    warnings: u32,
}

/// The sending half.
struct Tx {
    enc: Box<dyn MessageEncrypter>,
    seq: u64,
    /// The sequence number at which the sending key is renewed, and records per key.
    renew_at: u64,
    renew_every: u64,
    /// Encrypted records not yet written, oldest first; `head_written` bytes of the first
    /// are.
    queue: VecDeque<Vec<u8>>,
    head_written: usize,
    queued: usize,
    close_sent: bool,
    /// The peer asked for a key update: send one before the next application data.
    answer_key_update: bool,
}

/// An established TLS 1.3 connection over `IO` (see the module's documentation).
pub struct TlsStream<IO> {
    io: IO,
    kernel: Kernel,
    suite: &'static Tls13CipherSuite,
    /// The verified peer's SPIFFE identity (its chain itself is not kept).
    peer_identity: Option<ambit_identity::Identity>,
    alpn: Option<Vec<u8>>,
    key_exchange: Option<rustls::NamedGroup>,
    resumed: bool,
    rx: Rx,
    tx: Tx,
    /// The fatal error that ended the stream.
    failed: Option<(io::ErrorKind, String)>,
}

impl<IO> std::fmt::Debug for TlsStream<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("suite", &self.suite.common.suite)
            .field("rx_seq", &self.rx.seq)
            .field("tx_seq", &self.tx.seq)
            .finish_non_exhaustive()
    }
}

impl<IO> TlsStream<IO> {
    /// The transport.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The SPIFFE identity of the (verified) peer.
    pub fn peer_identity(&self) -> Option<ambit_identity::Identity> {
        self.peer_identity.clone()
    }

    /// The protocol agreed by ALPN.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// The key exchange group agreed.
    pub fn key_exchange_group(&self) -> Option<rustls::NamedGroup> {
        self.key_exchange
    }

    /// Whether the handshake resumed an earlier session.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Bytes of read buffer held (none once a read found the socket dry).
    #[doc(hidden)]
    pub fn read_buffer_capacity(&self) -> usize {
        self.rx.buf.capacity()
    }

    /// Renews the sending key after `records` more records (tests: key updates without
    /// sending 2^24 records).
    #[doc(hidden)]
    pub fn renew_sending_key_after(&mut self, records: u64) {
        self.tx.renew_every = records.max(1);
        self.tx.renew_at = self.tx.seq + self.tx.renew_every;
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    /// Decodes the next whole record in the read buffer: `Ok(false)` if there is none yet.
    fn next_record(&mut self) -> Result<bool, Fatal> {
        use AlertDescription as A;
        let rx = &mut self.rx;
        let avail = &rx.buf[rx.start..];
        if avail.len() < HEADER {
            return Ok(false);
        }
        let len = usize::from(u16::from_be_bytes([avail[3], avail[4]]));
        if avail[0] != u8::from(ContentType::ApplicationData) {
            return Err(fatal(
                A::UnexpectedMessage,
                &format!("unexpected record type {} after the handshake", avail[0]),
            ));
        }
        if avail[1] != 3 {
            return Err(fatal(A::DecodeError, "a record with a bad version"));
        }
        if len > MAX_CIPHERTEXT {
            return Err(Fatal::rustls(
                A::RecordOverflow,
                rustls::Error::PeerSentOversizedRecord,
            ));
        }
        if avail.len() < HEADER + len {
            return Ok(false);
        }
        let body = rx.start + HEADER;
        let payload = &mut rx.buf[body..body + len];
        let msg = rx
            .dec
            .decrypt(
                InboundOpaqueMessage::new(
                    ContentType::ApplicationData,
                    ProtocolVersion::TLSv1_2,
                    payload,
                ),
                rx.seq,
            )
            .map_err(|e| {
                let alert = match e {
                    rustls::Error::DecryptError => A::BadRecordMac,
                    rustls::Error::PeerSentOversizedRecord => A::RecordOverflow,
                    _ => A::UnexpectedMessage,
                };
                Fatal::rustls(alert, e)
            })?;
        let (typ, n) = (msg.typ, msg.payload.len());
        debug_assert_eq!(msg.payload.as_ptr(), rx.buf[body..].as_ptr(), "in place");
        rx.seq += 1;
        rx.start += HEADER + len;
        if typ != ContentType::Handshake && !rx.handshake.is_empty() {
            // RFC 8446 §5.1: nothing may come between the pieces of a handshake message.
            return Err(fatal(
                A::UnexpectedMessage,
                "a record interleaved with a fragmented handshake message",
            ));
        }
        match typ {
            ContentType::ApplicationData if n == 0 => {
                // Allowed, but not without end (a cheap way to keep a peer busy).
                rx.empty_records += 1;
                if rx.empty_records > MAX_EMPTY_RECORDS {
                    return Err(fatal(A::UnexpectedMessage, "too many empty records"));
                }
            }
            ContentType::ApplicationData => {
                rx.plain = (body, body + n);
                rx.key_updates = 0;
                rx.empty_records = 0;
            }
            ContentType::Alert => match rx.buf[body..body + n] {
                [level, _] if level != 1 && level != 2 => {
                    return Err(fatal(A::IllegalParameter, "an alert of an unknown level"));
                }
                [_, d] if d == u8::from(A::CloseNotify) => rx.closed = true,
                [_, d] if d == u8::from(A::UserCanceled) => {
                    rx.warnings += 1;
                    if rx.warnings > MAX_WARNINGS {
                        return Err(fatal(A::UnexpectedMessage, "too many warning alerts"));
                    }
                }
                [_, d] => {
                    // Never answered: the peer has given up.
                    return Err(Fatal {
                        alert: None,
                        error: io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            format!("TLS: the peer sent a fatal alert: {:?}", A::from(d)),
                        ),
                    });
                }
                _ => return Err(fatal(A::DecodeError, "a malformed alert")),
            },
            ContentType::Handshake => {
                if n == 0 {
                    return Err(fatal(A::UnexpectedMessage, "an empty handshake record"));
                }
                if rx.handshake.len() + n > MAX_POST_HANDSHAKE {
                    return Err(fatal(
                        A::UnexpectedMessage,
                        "a post-handshake message too large",
                    ));
                }
                rx.handshake.extend_from_slice(&rx.buf[body..body + n]);
                self.post_handshake()?;
            }
            _ => {
                return Err(fatal(
                    A::UnexpectedMessage,
                    "an unexpected inner content type",
                ));
            }
        }
        Ok(true)
    }

    /// Handles the whole post-handshake messages received so far.
    fn post_handshake(&mut self) -> Result<(), Fatal> {
        use AlertDescription as A;
        let mut done = 0;
        let result = loop {
            let hs = &self.rx.handshake[done..];
            if hs.len() < 4 {
                break Ok(());
            }
            let len = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
            if 4 + len > MAX_POST_HANDSHAKE {
                break Err(fatal(
                    A::UnexpectedMessage,
                    "a post-handshake message too large",
                ));
            }
            if hs.len() < 4 + len {
                break Ok(());
            }
            let typ = HandshakeType::from(hs[0]);
            let body = hs[4..4 + len].to_vec();
            done += 4 + len;
            match typ {
                HandshakeType::NewSessionTicket => {
                    if let Err(e) = self.kernel.session_ticket(&body) {
                        break Err(Fatal {
                            alert: Some(A::UnexpectedMessage),
                            error: e,
                        });
                    }
                }
                HandshakeType::KeyUpdate => {
                    let requested = match body[..] {
                        [0] => false,
                        [1] => true,
                        _ => break Err(fatal(A::DecodeError, "a malformed KeyUpdate")),
                    };
                    if done != self.rx.handshake.len() {
                        break Err(fatal(
                            A::UnexpectedMessage,
                            "a handshake message spanning a key change",
                        ));
                    }
                    self.rx.key_updates += 1;
                    if self.rx.key_updates > MAX_KEY_UPDATES {
                        break Err(Fatal::rustls(
                            A::UnexpectedMessage,
                            rustls::PeerMisbehaved::TooManyKeyUpdateRequests.into(),
                        ));
                    }
                    let (seq, secrets) = match self.kernel.update_rx() {
                        Ok(s) => s,
                        Err(e) => break Err(Fatal::rustls(A::InternalError, e)),
                    };
                    self.rx.dec = decrypter(self.suite, secrets);
                    self.rx.seq = seq;
                    // Answered before our next application data: requests that arrive
                    // while we are silent get one update (RFC 8446 §4.6.3).
                    self.tx.answer_key_update |= requested;
                }
                other => {
                    break Err(fatal(
                        A::UnexpectedMessage,
                        &format!("an unexpected {other:?} after the handshake"),
                    ));
                }
            }
        };
        self.rx.handshake.drain(..done);
        result
    }

    /// Ends the stream for good on a fatal error: says why to the peer with an alert
    /// (best effort) and gives the same error to every later read and write.
    fn fail(&mut self, f: Fatal, cx: &mut Context<'_>) -> io::Error {
        self.failed = Some((f.error.kind(), f.error.to_string()));
        if let Some(alert) = f.alert
            && !self.tx.close_sent
        {
            self.tx.renew_at = u64::MAX;
            if self
                .seal(
                    ContentType::Alert,
                    OutboundChunks::Single(&[2, u8::from(alert)]),
                )
                .is_ok()
            {
                let _ = self.poll_send(cx);
            }
            self.tx.close_sent = true;
        }
        f.error
    }

    /// The error that ended the stream, again.
    fn failed(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|(kind, what)| io::Error::new(*kind, what.clone()))
    }

    /// Reads more ciphertext from the socket: `Ok(0)` at its end. Called only once the
    /// plaintext in the buffer has been read.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let rx = &mut self.rx;
        // What was decoded goes (the partial record left is moved at most once, by the
        // reserve below); room for a whole read.
        rx.buf.advance(rx.start);
        rx.start = 0;
        rx.plain = (0, 0);
        if rx.buf.capacity() - rx.buf.len() < READ_SIZE / 2 {
            rx.buf.reserve(READ_SIZE);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut rx.buf) {
            Poll::Pending => {
                if rx.buf.is_empty() {
                    // Dry and nothing partial: hold no memory while the connection waits.
                    rx.buf = BytesMut::new();
                }
                Poll::Pending
            }
            ready => ready,
        }
    }

    /// Encrypts `chunks` as one record of type `typ` onto the send queue.
    fn seal(&mut self, typ: ContentType, chunks: OutboundChunks<'_>) -> io::Result<()> {
        let record = self
            .tx
            .enc
            .encrypt(
                OutboundPlainMessage {
                    typ,
                    version: ProtocolVersion::TLSv1_2,
                    payload: chunks,
                },
                self.tx.seq,
            )
            .map_err(invalid)?
            .encode();
        self.tx.seq += 1;
        self.tx.queued += record.len();
        self.tx.queue.push_back(record);
        if self.tx.seq >= self.tx.renew_at {
            self.renew_tx()?;
        }
        Ok(())
    }

    /// Sends a `KeyUpdate` under the current key, then uses the next one.
    fn renew_tx(&mut self) -> io::Result<()> {
        let key_update = [u8::from(HandshakeType::KeyUpdate), 0, 0, 1, 0];
        // Not again for the KeyUpdate's own record.
        self.tx.renew_at = u64::MAX;
        self.seal(ContentType::Handshake, OutboundChunks::Single(&key_update))?;
        let (seq, secrets) = self.kernel.update_tx().map_err(invalid)?;
        self.tx.enc = encrypter(self.suite, secrets);
        self.tx.seq = seq;
        self.tx.renew_at = seq + self.tx.renew_every;
        Ok(())
    }

    /// Writes queued records until none is left.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.tx.queue.is_empty() {
            let mut iovs = [IoSlice::new(&[]); MAX_IOVS];
            let mut n = 0;
            for (i, r) in self.tx.queue.iter().take(MAX_IOVS).enumerate() {
                let from = if i == 0 { self.tx.head_written } else { 0 };
                iovs[i] = IoSlice::new(&r[from..]);
                n += 1;
            }
            let mut wrote = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &iovs[..n]))?;
            if wrote == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tx.queued -= wrote;
            while wrote > 0 {
                let head = self.tx.queue.front().expect("wrote from the queue").len();
                let left = head - self.tx.head_written;
                if wrote >= left {
                    wrote -= left;
                    self.tx.queue.pop_front();
                    self.tx.head_written = 0;
                } else {
                    self.tx.head_written += wrote;
                    wrote = 0;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Waits while the queue is full; `Ready` when a write may queue more.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.failed() {
            return Poll::Ready(Err(e));
        }
        if self.tx.close_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after the TLS stream was shut down",
            )));
        }
        if self.tx.queued >= QUEUE_LIMIT {
            // Drained or not, more room may have been made.
            if self.poll_send(cx)?.is_pending() && self.tx.queued >= QUEUE_LIMIT {
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Starts writing what was queued; `Pending` is fine (the waker is registered, the
    /// bytes are accepted), only an error counts.
    fn send_some(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.poll_send(cx) {
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let (a, b) = this.rx.plain;
            if a < b {
                let n = (b - a).min(out.remaining());
                out.put_slice(&this.rx.buf[a..a + n]);
                this.rx.plain.0 += n;
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = this.failed() {
                return Poll::Ready(Err(e));
            }
            if this.rx.closed || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match this.next_record() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(f) => return Poll::Ready(Err(this.fail(f, cx))),
            }
            if ready!(this.poll_fill(cx))? == 0 {
                let what = if this.rx.start == this.rx.buf.len() {
                    "peer closed connection without sending TLS close_notify"
                } else {
                    "peer closed connection in the middle of a TLS record"
                };
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, what)));
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_room(cx))?;
        let mut slices: [&[u8]; MAX_GATHER] = [&[]; MAX_GATHER];
        let mut count = 0;
        let mut total = 0;
        for b in bufs.iter().filter(|b| !b.is_empty()).take(MAX_GATHER) {
            slices[count] = b;
            count += 1;
            total += b.len();
        }
        // Accept what fits under the queue's limit, at least one record's worth.
        let take = total.min((QUEUE_LIMIT - this.tx.queued.min(QUEUE_LIMIT)).max(MAX_PLAINTEXT));
        if take == 0 {
            return Poll::Ready(Ok(0));
        }
        if this.tx.answer_key_update {
            this.tx.answer_key_update = false;
            this.renew_tx()?;
        }
        let chunks = &slices[..count];
        let mut at = 0;
        while at < take {
            let end = (at + MAX_PLAINTEXT).min(take);
            let payload = if count == 1 {
                OutboundChunks::Single(&chunks[0][at..end])
            } else {
                OutboundChunks::Multiple {
                    chunks,
                    start: at,
                    end,
                }
            };
            this.seal(ContentType::ApplicationData, payload)?;
            at = end;
        }
        this.send_some(cx)?;
        Poll::Ready(Ok(take))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.tx.close_sent {
            // Nothing after the closure alert, not even a key update.
            this.tx.renew_at = u64::MAX;
            let alert = [1, u8::from(AlertDescription::CloseNotify)];
            this.seal(ContentType::Alert, OutboundChunks::Single(&alert))?;
            this.tx.close_sent = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
