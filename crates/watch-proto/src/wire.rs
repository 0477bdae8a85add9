//! The Watch service's encode-once response path.
//!
//! A `WatchResponse` is a few small fields (header, `watch_id`, flags) followed by its events,
//! each a length-delimited field 11 (`mvccpb.Event`). Protobuf lets the fields of a message be
//! written one after the other, so a response can be written as a small per-watcher *head*
//! followed by event encodings made once per change set and shared by every watcher and stream
//! that sends them:
//!
//! - [`EncodedEvents`] holds one change set's events, each framed as field 11, in one buffer;
//!   [`encoded`] builds it at most once per change set and variant (with or without `prev_kv`;
//!   filters only choose which events) and keeps it on the change set itself
//!   ([`watch_core::ChangeSet::attachment`]), so it lives exactly as long as the change set.
//! - [`WireResponse`] is a head plus reference-counted slices of those buffers; building one
//!   copies no payload and runs no per-event encoding.
//! - [`WatchCodec`] writes a [`WireResponse`] into tonic's buffer (one copy, which a prost
//!   message would make too) and decodes requests with prost; [`watch_server`] is the Watch
//!   service definition that uses it in place of the generated one.
//!
//! ```
//! use watch_core::{ChangeSet, Event, KeyValue};
//! use watch_proto::etcdserverpb::WatchResponse;
//! use watch_proto::wire::{self, WireResponse};
//! use prost::Message;
//!
//! let kv = KeyValue { key: "k".into(), value: "v".into(), create_revision: 5,
//!                     mod_revision: 5, version: 1, lease: 0 };
//! let cs = ChangeSet::new(5, vec![Event::put(kv, None)]);
//! let header = watch_proto::etcdserverpb::ResponseHeader { revision: 5, ..Default::default() };
//! let mut resp = WireResponse::events(header, 7, false);
//! wire::encoded(&cs, false, |enc| resp.push_events(enc, None));
//!
//! let decoded = WatchResponse::decode(resp.to_bytes()).unwrap();
//! assert_eq!((decoded.watch_id, decoded.events.len()), (7, 1));
//! assert_eq!(decoded.header.unwrap().revision, 5);
//! assert_eq!(&decoded.events[0].kv.as_ref().unwrap().key[..], b"k");
//! ```

use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use smallvec::SmallVec;
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use watch_core::ChangeSet;

use crate::etcdserverpb::{ResponseHeader, WatchRequest, WatchResponse};
use crate::to_proto;

/// The tag byte of `WatchResponse.events` (field 11, wire type 2: length-delimited).
const EVENTS_TAG: u8 = (11 << 3) | 2;

/// One change set's events encoded as `WatchResponse` field 11 entries, back to back.
#[derive(Debug)]
pub struct EncodedEvents {
    buf: Bytes,
    /// `ends[i]`: end offset of event `i` in `buf` (its start is `ends[i - 1]`, or 0).
    ends: Box<[u32]>,
}

impl EncodedEvents {
    fn new(cs: &ChangeSet, prev_kv: bool) -> Self {
        let wire: Vec<_> = cs
            .events
            .iter()
            .map(|e| to_proto::event(e, prev_kv))
            .collect();
        let total: usize = wire
            .iter()
            .map(|e| {
                1 + prost::encoding::encoded_len_varint(e.encoded_len() as u64) + e.encoded_len()
            })
            .sum();
        let mut buf = BytesMut::with_capacity(total);
        let mut ends = Vec::with_capacity(wire.len());
        for e in &wire {
            buf.put_u8(EVENTS_TAG);
            // Infallible: the buffer was sized for every event.
            let _ = e.encode_length_delimited(&mut buf);
            ends.push(u32::try_from(buf.len()).unwrap_or(u32::MAX));
        }
        Self {
            buf: buf.freeze(),
            ends: ends.into_boxed_slice(),
        }
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when the change set had no event.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Event `i`'s framed bytes (a shared slice, no copy).
    pub fn event(&self, i: usize) -> Bytes {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.buf.slice(start..self.ends[i] as usize)
    }

    /// Every event's framed bytes (a shared slice, no copy).
    pub fn all(&self) -> Bytes {
        self.buf.clone()
    }

    /// Encoded bytes of the events `picked` selects (`None`: all).
    pub fn picked_len(&self, picked: Option<&[u32]>) -> usize {
        match picked {
            None => self.buf.len(),
            Some(idx) => idx
                .iter()
                .filter(|&&i| (i as usize) < self.len())
                .map(|&i| {
                    let i = i as usize;
                    let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
                    self.ends[i] as usize - start
                })
                .sum(),
        }
    }
}

/// The two variants of one change set that really differ on the wire.
#[derive(Default)]
struct Variants {
    plain: OnceLock<EncodedEvents>,
    with_prev_kv: OnceLock<EncodedEvents>,
}

/// Calls `f` with `cs`'s events encoded with or without `prev_kv`, encoding them only the
/// first time any caller asks for that variant of that change set.
pub fn encoded<R>(cs: &ChangeSet, prev_kv: bool, f: impl FnOnce(&EncodedEvents) -> R) -> R {
    match cs.attachment(|_| Variants::default()) {
        Some(v) => {
            let slot = if prev_kv { &v.with_prev_kv } else { &v.plain };
            f(slot.get_or_init(|| EncodedEvents::new(cs, prev_kv)))
        }
        // Another consumer attached its own type: encode without caching.
        None => f(&EncodedEvents::new(cs, prev_kv)),
    }
}

/// A `WatchResponse` ready for the wire: a small encoded head (header, `watch_id`, flags)
/// followed by shared event encodings.
#[derive(Debug, Clone, Default)]
pub struct WireResponse {
    head: SmallVec<[u8; 48]>,
    events: SmallVec<[Bytes; 1]>,
    event_count: usize,
    events_len: usize,
}

impl WireResponse {
    /// A response carrying no events (created, canceled, progress): `resp` encoded whole.
    pub fn message(resp: &WatchResponse) -> Self {
        let mut out = Self {
            head: SmallVec::from_vec(resp.encode_to_vec()),
            ..Self::default()
        };
        for e in &resp.events {
            let mut b = BytesMut::new();
            b.put_u8(EVENTS_TAG);
            let _ = e.encode_length_delimited(&mut b);
            out.push_part(b.freeze(), 1);
        }
        out
    }

    /// The head of an events response for `watch_id` with `header`; add the events with
    /// [`WireResponse::push_events`].
    pub fn events(header: ResponseHeader, watch_id: i64, fragment: bool) -> Self {
        let head_msg = WatchResponse {
            header: Some(header),
            watch_id,
            fragment,
            ..WatchResponse::default()
        };
        // Encoded on the stack: a header, an id and a flag take at most 64 bytes.
        let mut buf = [0u8; 64];
        let mut rest = &mut buf[..];
        let head = if head_msg.encode(&mut rest).is_ok() {
            let n = 64 - rest.len();
            SmallVec::from_slice(&buf[..n])
        } else {
            SmallVec::from_vec(head_msg.encode_to_vec())
        };
        Self {
            head,
            ..Self::default()
        }
    }

    /// Appends the events of `enc` picked by `picked` (indices; `None`: all), sharing their
    /// bytes.
    pub fn push_events(&mut self, enc: &EncodedEvents, picked: Option<&[u32]>) {
        match picked {
            None => self.push_part(enc.all(), enc.len()),
            Some(idx) => {
                for &i in idx {
                    if (i as usize) < enc.len() {
                        self.push_part(enc.event(i as usize), 1);
                    }
                }
            }
        }
    }

    /// Appends `events` already framed events (field 11 entries) as one part.
    pub fn push_part(&mut self, part: Bytes, events: usize) {
        self.events_len += part.len();
        self.event_count += events;
        self.events.push(part);
    }

    /// Number of events.
    pub fn event_count(&self) -> usize {
        self.event_count
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        self.head.len() + self.events_len
    }

    /// The encoded message in one buffer (tests, and consumers that want prost's type back via
    /// `WatchResponse::decode`).
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        b.put_slice(&self.head);
        for p in &self.events {
            b.put_slice(p);
        }
        b.freeze()
    }

    /// Replaces the head with an events head (see [`WireResponse::events`]), keeping the
    /// events: a merged response names its last revision, fragments set `fragment`.
    pub fn set_header(&mut self, header: ResponseHeader, watch_id: i64, fragment: bool) {
        self.head = Self::events(header, watch_id, fragment).head;
    }

    /// The framed events one by one, in order (shared slices), to split a response into
    /// fragments at event boundaries.
    pub fn into_events(self) -> impl Iterator<Item = Bytes> {
        self.events.into_iter().flat_map(split_events)
    }
}

/// Splits a run of framed events (tag, length, body; repeated) into one slice per event.
fn split_events(run: Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < run.len() {
        let mut rest = &run[at + 1..];
        let before = rest.len();
        let Ok(len) = prost::encoding::decode_varint(&mut rest) else {
            // Unreachable for runs built here; keep the remainder whole rather than lose it.
            out.push(run.slice(at..));
            return out;
        };
        let end = (at + 1 + (before - rest.len()) + len as usize).min(run.len());
        out.push(run.slice(at..end));
        at = end;
    }
    out
}

/// The codec of the Watch service: [`WireResponse`] out, prost-decoded [`WatchRequest`] in.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchCodec;

/// Writes a [`WireResponse`] into tonic's frame buffer.
#[derive(Debug, Clone, Copy, Default)]
pub struct WireEncoder;

impl Encoder for WireEncoder {
    type Item = WireResponse;
    type Error = Status;

    fn encode(&mut self, item: WireResponse, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        dst.put_slice(&item.head);
        for p in &item.events {
            dst.put_slice(p);
        }
        Ok(())
    }
}

impl Codec for WatchCodec {
    type Encode = WireResponse;
    type Decode = WatchRequest;
    type Encoder = WireEncoder;
    type Decoder = tonic_prost::ProstDecoder<WatchRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        WireEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(Default::default())
    }
}

/// The Watch service definition over [`WatchCodec`]: what tonic generates for
/// `etcdserverpb.Watch`, with the response type replaced by [`WireResponse`].
pub mod watch_server {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use tonic::body::Body;
    use tonic::codegen::{BoxFuture, StdError, http};
    use tonic::server::{Grpc, NamedService, StreamingService};
    use tonic::{Request, Response, Status, Streaming};

    use super::{WatchCodec, WireResponse};
    use crate::etcdserverpb::WatchRequest;

    /// The service's one method, as the generated `Watch` trait with wire responses.
    #[tonic::async_trait]
    pub trait Watch: Send + Sync + 'static {
        /// The response stream.
        type WatchStream: futures_core::Stream<Item = Result<WireResponse, Status>> + Send + 'static;

        /// Serves one bidirectional Watch stream.
        async fn watch(
            &self,
            request: Request<Streaming<WatchRequest>>,
        ) -> Result<Response<Self::WatchStream>, Status>;
    }

    /// The tower service routing `/etcdserverpb.Watch/Watch` to a [`Watch`] implementation.
    #[derive(Debug)]
    pub struct WatchServer<T> {
        inner: Arc<T>,
        max_decoding_message_size: Option<usize>,
        max_encoding_message_size: Option<usize>,
    }

    impl<T> Clone for WatchServer<T> {
        fn clone(&self) -> Self {
            Self {
                inner: self.inner.clone(),
                max_decoding_message_size: self.max_decoding_message_size,
                max_encoding_message_size: self.max_encoding_message_size,
            }
        }
    }

    impl<T> WatchServer<T> {
        /// Serves `inner`.
        pub fn new(inner: T) -> Self {
            Self {
                inner: Arc::new(inner),
                max_decoding_message_size: None,
                max_encoding_message_size: None,
            }
        }

        /// Largest request accepted (tonic's default is 4 MiB).
        #[must_use]
        pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
            self.max_decoding_message_size = Some(limit);
            self
        }

        /// Largest response sent.
        #[must_use]
        pub fn max_encoding_message_size(mut self, limit: usize) -> Self {
            self.max_encoding_message_size = Some(limit);
            self
        }
    }

    struct Method<T>(Arc<T>);

    impl<T: Watch> StreamingService<WatchRequest> for Method<T> {
        type Response = WireResponse;
        type ResponseStream = T::WatchStream;
        type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

        fn call(&mut self, request: Request<Streaming<WatchRequest>>) -> Self::Future {
            let inner = self.0.clone();
            Box::pin(async move { inner.watch(request).await })
        }
    }

    impl<T, B> tonic::codegen::Service<http::Request<B>> for WatchServer<T>
    where
        T: Watch,
        B: http_body::Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<B>) -> Self::Future {
            if req.uri().path() != "/etcdserverpb.Watch/Watch" {
                return Box::pin(async move {
                    let mut response = http::Response::new(Body::default());
                    let headers = response.headers_mut();
                    headers.insert(
                        Status::GRPC_STATUS,
                        (tonic::Code::Unimplemented as i32).into(),
                    );
                    headers.insert(
                        http::header::CONTENT_TYPE,
                        tonic::metadata::GRPC_CONTENT_TYPE,
                    );
                    Ok(response)
                });
            }
            let inner = self.inner.clone();
            let (dec, enc) = (
                self.max_decoding_message_size,
                self.max_encoding_message_size,
            );
            Box::pin(async move {
                let mut grpc = Grpc::new(WatchCodec).apply_max_message_size_config(dec, enc);
                Ok(grpc.streaming(Method(inner), req).await)
            })
        }
    }

    impl<T> NamedService for WatchServer<T> {
        const NAME: &'static str = "etcdserverpb.Watch";
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use watch_core::{ATTACHMENT_FIXED, BYTES_OVERHEAD, Event, KeyValue};

    fn kv(key: &str, value_len: usize, revision: u64) -> KeyValue {
        KeyValue {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::from(vec![b'v'; value_len]),
            create_revision: revision,
            mod_revision: revision,
            version: i64::MAX as u64,
            lease: -1,
        }
    }

    /// What `ChangeSet::mem_size` counts for the attachment must hold both encodings this
    /// module attaches, whatever the events: framing, the largest varints, prev_kv, deletes.
    #[test]
    fn both_encodings_fit_the_reserve_mem_size_counts() {
        let big = i64::MAX as u64;
        let cases = [
            ChangeSet::new(5, vec![Event::put(kv("k", 1, 5), None)]),
            ChangeSet::new(6, vec![Event::put(kv("k", 0, 6), None)]),
            ChangeSet::new(
                big,
                vec![Event::put(
                    kv("key", 100, big),
                    Some(kv("key", 50, big - 1)),
                )],
            ),
            ChangeSet::new(
                big,
                (0..100)
                    .map(|i| {
                        let key = format!("k{i}");
                        Event::delete(key.clone().into(), big, Some(kv(&key, 300, big - 1)))
                    })
                    .collect(),
            ),
            ChangeSet::new(7, vec![Event::put(kv(&"x".repeat(1000), 1 << 20, 7), None)]),
        ];
        // The slot, its two buffers and two offset arrays.
        assert!(std::mem::size_of::<Variants>() + 5 * BYTES_OVERHEAD <= ATTACHMENT_FIXED);
        for cs in cases {
            let held: usize = [false, true]
                .into_iter()
                .map(|prev_kv| encoded(&cs, prev_kv, |e| e.buf.len() + 4 * e.len()))
                .sum();
            let reserve = cs.attachment_reserve();
            assert!(
                held + ATTACHMENT_FIXED <= reserve,
                "revision {}: {held} encoded bytes, reserve {reserve}",
                cs.revision
            );
            // And the reserve is what a window or queue counts.
            assert!(cs.mem_size() >= reserve + cs.payload_len());
        }
    }
}
