//! watch-proto: keywatch's etcd v3 wire types and their conversions to and from watch-core.
//!
//! - [`mvccpb`] and [`etcdserverpb`]: prost messages and tonic clients and servers generated
//!   at build time from `proto/` at the workspace root (compiled by the pure-Rust `protox`, so
//!   no `protoc` is needed). Payload fields (`key`, `value`, `range_end`, ...) are
//!   [`bytes::Bytes`], so one event is shared, not copied, when it fans out to many watchers.
//! - [`to_proto`]: core values to wire messages (infallible).
//! - [`from_proto`]: wire messages to core values (fallible, [`ConvertError`]).
//! - [`status`]: the one mapping from core and conversion errors to `tonic::Status`, with
//!   etcd's codes and messages.
//! - [`wire`]: the Watch service's encode-once responses, codec and service definition.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC reflection.
//!
//! Invariant: this is the only crate that generates or includes protobuf code. Every other
//! crate names the wire types through these module paths and converts through this crate, so
//! there is one copy of the wire types and one place that knows both models.
//!
//! ```
//! use watch_core::{Event, KeyValue};
//! use watch_proto::etcdserverpb::{ResponseHeader, WatchResponse};
//! use watch_proto::{from_proto, to_proto};
//!
//! let put = Event::put(
//!     KeyValue {
//!         key: "k".into(),
//!         value: "v".into(),
//!         create_revision: 2,
//!         mod_revision: 2,
//!         version: 1,
//!         lease: 0,
//!     },
//!     None,
//! );
//! let delete = Event::delete("k".into(), 3, Some(put.kv.clone()));
//!
//! // A watch response for a watcher that did not ask for prev_kv.
//! let resp = WatchResponse {
//!     header: Some(ResponseHeader { revision: 3, ..Default::default() }),
//!     watch_id: 0,
//!     events: to_proto::watch_events([&put, &delete], false),
//!     ..Default::default()
//! };
//! let wire_delete = &resp.events[1];
//! assert!(wire_delete.prev_kv.is_none());
//! // etcd's DELETE shape: only the key and the revision of the delete.
//! let kv = wire_delete.kv.as_ref().unwrap();
//! assert_eq!((&kv.key[..], kv.mod_revision, kv.version), (&b"k"[..], 3, 0));
//!
//! // And back again.
//! assert_eq!(from_proto::event(&resp.events[0]).unwrap(), put);
//! ```

pub mod error;
pub mod from_proto;
pub mod status;
pub mod to_proto;
pub mod wire;

pub use error::ConvertError;

/// etcd's `mvccpb` package: `KeyValue` and `Event` (generated from `proto/mvccpb/kv.proto`).
pub mod mvccpb {
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
}

/// etcd's `authpb` package: `Permission` and `UserAddOptions`, carried by the Auth service's
/// messages (generated from `proto/authpb/auth.proto`).
pub mod authpb {
    include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
}

/// etcd's `etcdserverpb` package: requests, responses, and a client module (`*_client`) and
/// server module (`*_server`) per service: KV, Watch, Lease, Cluster, Maintenance, Auth
/// (generated from `proto/etcdserverpb/rpc.proto`).
pub mod etcdserverpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}

/// etcd's `v3lockpb` package: the Lock service (Lock, Unlock), generated from
/// `proto/v3lockpb/v3lock.proto`.
pub mod v3lockpb {
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.rs"));
}

/// etcd's `v3electionpb` package: the Election service (Campaign, Proclaim, Leader, Observe,
/// Resign), generated from `proto/v3electionpb/v3election.proto`.
pub mod v3electionpb {
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.rs"));
}

/// The encoded `google.protobuf.FileDescriptorSet` of `proto/` (every package, with source
/// info), as a gRPC reflection service expects it.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/etcd_descriptor_set.bin"));
