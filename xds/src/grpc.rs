//! One bidirectional gRPC call over a tonic [`Channel`], as the ADS stream makes it.
//!
//! tonic's generated client decodes responses with its `Streaming`, whose receive buffer
//! reserves room for a whole message and never gives it back: the buffer stays as large
//! as the largest message for as long as the stream lives. An agent's first sync of a
//! 10,000-workload mesh is one 1.9 MB response, so that buffer alone was a third of the
//! agent's memory per workload, held for the process's life. [`Call`] reads the response
//! body itself, and lets a buffer grown past [`KEEP_CAPACITY`] go as soon as the large
//! message is decoded.
//!
//! The wire is gRPC's over HTTP/2, as tonic writes it: `POST` to the method's path with
//! `content-type: application/grpc` and `te: trailers`; each message a 5-byte prefix (a
//! compressed flag, then the length, big-endian) and the protobuf bytes; the call's status
//! in the trailers (or in the headers of a trailers-only answer). Nothing here asks for
//! compression, so a compressed message is a protocol error.

use std::convert::Infallible;
use std::future::poll_fn;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

/// The 5-byte message prefix.
const PREFIX: usize = 5;

/// A receive buffer grown for a message larger than this is let go once that message is
/// decoded (and a new one grown when a message needs it).
pub const KEEP_CAPACITY: usize = 64 << 10;

/// The responses of a call under way.
#[derive(Debug)]
pub struct Call<M> {
    body: Body,
    buf: BytesMut,
    /// `buf` was grown for a message larger than [`KEEP_CAPACITY`].
    large: bool,
    max_message: usize,
    ended: bool,
    _message: std::marker::PhantomData<fn() -> M>,
}

/// Opens the call `path` (`/package.Service/Method`) on `channel`, sending each message
/// `requests` yields, with `metadata` as its headers. Fails with the call's status if the
/// server answers with one straight away.
pub async fn bidi<Req, Resp>(
    channel: &Channel,
    path: &'static str,
    metadata: MetadataMap,
    requests: mpsc::Receiver<Req>,
    max_message: usize,
) -> Result<Call<Resp>, Status>
where
    Req: Message + Send + 'static,
    Resp: Message + Default,
{
    let frames =
        ReceiverStream::new(requests).map(|m| Ok::<_, Infallible>(Frame::data(encode(&m))));
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(http::Uri::from_static(path))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(Body::new(StreamBody::new(frames)))
        .map_err(|e| Status::internal(format!("building the request: {e}")))?;
    request.headers_mut().extend(metadata.into_headers());
    let mut channel = channel.clone();
    poll_fn(|cx| Service::poll_ready(&mut channel, cx))
        .await
        .map_err(|e| Status::unavailable(format!("connecting: {e}")))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::unavailable(format!("sending the request: {e}")))?;
    Call::from_response(response, max_message)
}

/// A message with its gRPC prefix.
fn encode(m: &impl Message) -> Bytes {
    let len = m.encoded_len();
    let mut out = BytesMut::with_capacity(PREFIX + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    m.encode(&mut out)
        .expect("the buffer has room for the message");
    out.freeze()
}

impl<M: Message + Default> Call<M> {
    /// The call answered by `response`: refused if it is not a gRPC answer, or carries a
    /// status in its headers that is not OK.
    pub fn from_response(
        response: http::Response<Body>,
        max_message: usize,
    ) -> Result<Self, Status> {
        let (head, body) = response.into_parts();
        let mut call = Self {
            body,
            buf: BytesMut::new(),
            large: false,
            max_message,
            ended: false,
            _message: Default::default(),
        };
        if head.status != http::StatusCode::OK {
            return Err(Status::unknown(format!(
                "the server answered HTTP {} to a gRPC call",
                head.status
            )));
        }
        if let Some(status) = Status::from_header_map(&head.headers) {
            if status.code() != tonic::Code::Ok {
                return Err(status);
            }
            call.ended = true; // trailers-only: no messages
        }
        let grpc = head
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        if !grpc && !call.ended {
            return Err(Status::unknown(format!(
                "the server's answer is not gRPC (content-type {:?})",
                head.headers.get(http::header::CONTENT_TYPE)
            )));
        }
        Ok(call)
    }

    /// The next message; `None` once the server ended the call with status OK.
    pub async fn message(&mut self) -> Result<Option<M>, Status> {
        loop {
            if let Some(m) = self.decode()? {
                return Ok(Some(m));
            }
            if self.ended {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Status::internal(format!(
                        "the call ended inside a message ({} bytes of it received)",
                        self.buf.len()
                    )))
                };
            }
            match self.body.frame().await {
                None => self.ended = true,
                Some(Err(e)) => return Err(Status::unavailable(format!("receiving: {e}"))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.buf.extend_from_slice(&data),
                    Err(frame) => {
                        self.ended = true;
                        if let Some(status) = frame
                            .trailers_ref()
                            .and_then(Status::from_header_map)
                            .filter(|s| s.code() != tonic::Code::Ok)
                        {
                            return Err(status);
                        }
                    }
                },
            }
        }
    }

    /// Decodes one whole message from the buffer, if it holds one.
    fn decode(&mut self) -> Result<Option<M>, Status> {
        if self.buf.len() < PREFIX {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(Status::internal(
                "the server sent a compressed message, and no compression was asked for",
            ));
        }
        let len = u32::from_be_bytes(self.buf[1..PREFIX].try_into().expect("4 bytes")) as usize;
        if len > self.max_message {
            return Err(Status::resource_exhausted(format!(
                "a message of {len} bytes, more than the {} allowed",
                self.max_message
            )));
        }
        if self.buf.len() < PREFIX + len {
            self.buf.reserve(PREFIX + len - self.buf.len());
            self.large |= PREFIX + len > KEEP_CAPACITY;
            return Ok(None);
        }
        let m = M::decode(&self.buf[PREFIX..PREFIX + len])
            .map_err(|e| Status::internal(format!("decoding a message: {e}")))?;
        self.buf.advance(PREFIX + len);
        // A buffer grown for a large message goes as soon as what is left in it (the
        // start of the next message, if any) is small: that is copied to a new one.
        // (`capacity()` cannot tell when: after `advance` it counts only what is left
        // past the read position, not the allocation.)
        if self.large && self.buf.len() <= KEEP_CAPACITY {
            self.buf = BytesMut::from(&self.buf[..]);
            self.large = false;
        }
        Ok(Some(m))
    }

    /// The receive buffer's capacity (for tests).
    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envoy::{Any, DeltaDiscoveryResponse, Resource};

    fn response(resources: usize) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            nonce: format!("n{resources}"),
            resources: (0..resources)
                .map(|i| Resource {
                    name: format!("r{i}"),
                    version: "1".into(),
                    resource: Some(Any {
                        type_url: "t".into(),
                        value: vec![7; 100],
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// A call whose body is `frames` (each `Ok(bytes)` a DATA frame, `Err(map)` trailers).
    fn call(
        frames: Vec<Result<Vec<u8>, http::HeaderMap>>,
    ) -> Result<Call<DeltaDiscoveryResponse>, Status> {
        let frames = tokio_stream::iter(frames.into_iter().map(|f| {
            Ok::<_, Infallible>(match f {
                Ok(b) => Frame::data(Bytes::from(b)),
                Err(t) => Frame::trailers(t),
            })
        }));
        let response = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(Body::new(StreamBody::new(frames)))
            .unwrap();
        Call::from_response(response, 4 << 20)
    }

    fn trailers(code: i32, message: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", code.to_string().parse().unwrap());
        h.insert("grpc-message", message.parse().unwrap());
        h
    }

    #[tokio::test]
    async fn messages_split_and_joined_across_frames_arrive_whole() {
        let (a, b, c) = (response(1), response(3), response(0));
        let mut wire = Vec::new();
        for m in [&a, &b, &c] {
            wire.extend_from_slice(&encode(m));
        }
        // Every way of cutting the bytes into two frames, then one byte per frame.
        for cut in 0..=wire.len() {
            let mut call = call(vec![
                Ok(wire[..cut].to_vec()),
                Ok(wire[cut..].to_vec()),
                Err(trailers(0, "")),
            ])
            .unwrap();
            for want in [&a, &b, &c] {
                assert_eq!(
                    call.message().await.unwrap().as_ref(),
                    Some(want),
                    "cut {cut}"
                );
            }
            assert_eq!(call.message().await.unwrap(), None);
        }
        let mut call = call(wire.iter().map(|&b| Ok(vec![b])).collect()).unwrap();
        for want in [&a, &b, &c] {
            assert_eq!(call.message().await.unwrap().as_ref(), Some(want));
        }
        // No trailers at all: the end of the body ends the call.
        assert_eq!(call.message().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_large_message_does_not_keep_its_buffer() {
        let (big, small) = (response(10_000), response(2));
        let big_wire = encode(&big);
        assert!(big_wire.len() > 1 << 20);
        // Alone, cut into frames as h2 delivers it: let go as soon as it is decoded,
        // though the read position is then at the end of the allocation.
        let frames = big_wire.chunks(16 << 10).map(|c| Ok(c.to_vec())).collect();
        let mut c = call(frames).unwrap();
        assert_eq!(c.message().await.unwrap().as_ref(), Some(&big));
        assert_eq!(c.buffered_capacity(), 0);
        assert_eq!(c.message().await.unwrap(), None);

        // The start of the next message came with its tail: moved to a small buffer.
        let mut wire = big_wire.to_vec();
        let small_wire = encode(&small);
        wire.extend_from_slice(&small_wire[..7]);
        let (first, rest) = wire.split_at(big_wire.len() - 10);
        let frames = vec![
            Ok(first.to_vec()),
            Ok(rest.to_vec()),
            Ok(small_wire[7..].to_vec()),
        ];
        let mut c = call(frames).unwrap();
        assert_eq!(c.message().await.unwrap(), Some(big));
        assert!((7..KEEP_CAPACITY).contains(&c.buffered_capacity()));
        assert_eq!(c.message().await.unwrap(), Some(small.clone()));
        assert_eq!(c.message().await.unwrap(), None);

        // Small messages keep theirs (reused, never marked to go).
        let mut c = call(vec![
            Ok(encode(&small).to_vec()),
            Ok(encode(&small).to_vec()),
        ])
        .unwrap();
        assert_eq!(c.message().await.unwrap().as_ref(), Some(&small));
        assert!(!c.large);
        assert_eq!(c.message().await.unwrap(), Some(small));
    }

    #[tokio::test]
    async fn statuses_bad_prefixes_and_truncation_are_errors() {
        // An error status in the trailers, after a message.
        let m = response(1);
        let mut c = call(vec![
            Ok(encode(&m).to_vec()),
            Err(trailers(14, "going away")),
        ])
        .unwrap();
        assert_eq!(c.message().await.unwrap(), Some(m.clone()));
        let e = c.message().await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (tonic::Code::Unavailable, "going away")
        );

        // Trailers-only: the status is in the headers.
        let refused = http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "16")
            .header("grpc-message", "no token")
            .body(Body::empty())
            .unwrap();
        let e = Call::<DeltaDiscoveryResponse>::from_response(refused, 1 << 20).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);

        // Not gRPC at all.
        let html = http::Response::builder()
            .status(404)
            .body(Body::empty())
            .unwrap();
        let e = Call::<DeltaDiscoveryResponse>::from_response(html, 1 << 20).unwrap_err();
        assert!(e.message().contains("HTTP 404"), "{e}");

        // Compressed, too large, cut short, not protobuf.
        let mut compressed = encode(&m).to_vec();
        compressed[0] = 1;
        let e = call(vec![Ok(compressed)])
            .unwrap()
            .message()
            .await
            .unwrap_err();
        assert!(e.message().contains("compressed"), "{e}");
        let mut huge = vec![0, 0x7f, 0xff, 0xff, 0xff];
        huge.extend_from_slice(&[0; 16]);
        let e = call(vec![Ok(huge)]).unwrap().message().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let whole = encode(&m);
        let e = call(vec![Ok(whole[..whole.len() - 1].to_vec())])
            .unwrap()
            .message()
            .await
            .unwrap_err();
        assert!(e.message().contains("ended inside a message"), "{e}");
        let e = call(vec![Ok(vec![0, 0, 0, 0, 2, 0xff, 0xff])])
            .unwrap()
            .message()
            .await
            .unwrap_err();
        assert!(e.message().contains("decoding"), "{e}");
    }
}
