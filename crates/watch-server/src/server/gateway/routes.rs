//! The gateway's path table: one entry per etcd HTTP path, naming the gRPC method it calls and
//! the request and response types it converts between JSON and protobuf.
//!
//! A service added later gets its gateway path by one line in [`table`]: the gateway calls the
//! gRPC method through the same in-process router the gRPC clients reach, so the service's
//! logic, its auth checks, its health gate and its metrics are the gRPC ones.

use std::collections::HashMap;
use std::sync::LazyLock;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use watch_proto::etcdserverpb as pb;
use watch_proto::{v3electionpb as election, v3lockpb as lock};

/// How a method's messages flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// One JSON request object, one JSON response object.
    Unary,
    /// A run of JSON request objects in, a newline-delimited `{"result":...}` stream out
    /// (etcd's bidi streams: Watch, LeaseKeepAlive).
    Stream,
    /// One JSON request object in (read as a unary body), a `{"result":...}` stream out
    /// (etcd's server streams: Election.Observe).
    ServerStream,
}

/// What parsing the front of a JSON buffer yielded.
#[derive(Debug)]
pub(super) enum Parsed {
    /// One request, as a gRPC length-prefixed frame, and the bytes of JSON it consumed.
    Message(Bytes, usize),
    /// The buffer ends before a complete object: `true` when it holds more than whitespace.
    Incomplete(bool),
    /// Not a request object; the decoder's message.
    Invalid(String),
}

/// One gateway path.
#[derive(Debug, Clone, Copy)]
pub(super) struct Route {
    /// The gRPC path called, `/package.Service/Method`.
    pub(super) grpc_path: &'static str,
    pub(super) kind: Kind,
    /// Parses the first JSON object of a buffer into a request frame.
    pub(super) parse: fn(&[u8]) -> Parsed,
    /// The frame of an empty request (a unary call with an empty body, as etcd's gateway).
    pub(super) empty: fn() -> Bytes,
    /// Renders one protobuf response message as JSON.
    pub(super) render: fn(&[u8]) -> Result<Vec<u8>, String>,
}

fn rpc<Req, Resp>(grpc_path: &'static str, kind: Kind) -> Route
where
    Req: prost::Message + Default + DeserializeOwned,
    Resp: prost::Message + Default + Serialize,
{
    Route {
        grpc_path,
        kind,
        parse: parse::<Req>,
        empty: || frame(&Req::default()),
        render: render::<Resp>,
    }
}

/// etcd 3.4's gateway paths (`/v3beta/` is rewritten to `/v3/` before the lookup) for every
/// method of the services keywatch serves. A method keywatch does not implement still has its
/// path: the gRPC service answers it (UNIMPLEMENTED becomes HTTP 501), as over gRPC.
fn table() -> Vec<(&'static str, Route)> {
    use Kind::{ServerStream, Stream, Unary};
    vec![
        (
            "/v3/kv/range",
            rpc::<pb::RangeRequest, pb::RangeResponse>("/etcdserverpb.KV/Range", Unary),
        ),
        (
            "/v3/kv/put",
            rpc::<pb::PutRequest, pb::PutResponse>("/etcdserverpb.KV/Put", Unary),
        ),
        (
            "/v3/kv/deleterange",
            rpc::<pb::DeleteRangeRequest, pb::DeleteRangeResponse>(
                "/etcdserverpb.KV/DeleteRange",
                Unary,
            ),
        ),
        (
            "/v3/kv/txn",
            rpc::<pb::TxnRequest, pb::TxnResponse>("/etcdserverpb.KV/Txn", Unary),
        ),
        (
            "/v3/kv/compaction",
            rpc::<pb::CompactionRequest, pb::CompactionResponse>("/etcdserverpb.KV/Compact", Unary),
        ),
        (
            "/v3/watch",
            rpc::<pb::WatchRequest, pb::WatchResponse>("/etcdserverpb.Watch/Watch", Stream),
        ),
        (
            "/v3/lease/grant",
            rpc::<pb::LeaseGrantRequest, pb::LeaseGrantResponse>(
                "/etcdserverpb.Lease/LeaseGrant",
                Unary,
            ),
        ),
        (
            "/v3/lease/revoke",
            rpc::<pb::LeaseRevokeRequest, pb::LeaseRevokeResponse>(
                "/etcdserverpb.Lease/LeaseRevoke",
                Unary,
            ),
        ),
        (
            "/v3/kv/lease/revoke",
            rpc::<pb::LeaseRevokeRequest, pb::LeaseRevokeResponse>(
                "/etcdserverpb.Lease/LeaseRevoke",
                Unary,
            ),
        ),
        (
            "/v3/lease/keepalive",
            rpc::<pb::LeaseKeepAliveRequest, pb::LeaseKeepAliveResponse>(
                "/etcdserverpb.Lease/LeaseKeepAlive",
                Stream,
            ),
        ),
        (
            "/v3/lease/timetolive",
            rpc::<pb::LeaseTimeToLiveRequest, pb::LeaseTimeToLiveResponse>(
                "/etcdserverpb.Lease/LeaseTimeToLive",
                Unary,
            ),
        ),
        (
            "/v3/kv/lease/timetolive",
            rpc::<pb::LeaseTimeToLiveRequest, pb::LeaseTimeToLiveResponse>(
                "/etcdserverpb.Lease/LeaseTimeToLive",
                Unary,
            ),
        ),
        (
            "/v3/lease/leases",
            rpc::<pb::LeaseLeasesRequest, pb::LeaseLeasesResponse>(
                "/etcdserverpb.Lease/LeaseLeases",
                Unary,
            ),
        ),
        (
            "/v3/kv/lease/leases",
            rpc::<pb::LeaseLeasesRequest, pb::LeaseLeasesResponse>(
                "/etcdserverpb.Lease/LeaseLeases",
                Unary,
            ),
        ),
        (
            "/v3/cluster/member/list",
            rpc::<pb::MemberListRequest, pb::MemberListResponse>(
                "/etcdserverpb.Cluster/MemberList",
                Unary,
            ),
        ),
        (
            "/v3/maintenance/status",
            rpc::<pb::StatusRequest, pb::StatusResponse>("/etcdserverpb.Maintenance/Status", Unary),
        ),
        (
            "/v3/maintenance/alarm",
            rpc::<pb::AlarmRequest, pb::AlarmResponse>("/etcdserverpb.Maintenance/Alarm", Unary),
        ),
        (
            "/v3/maintenance/defragment",
            rpc::<pb::DefragmentRequest, pb::DefragmentResponse>(
                "/etcdserverpb.Maintenance/Defragment",
                Unary,
            ),
        ),
        // etcd 3.4 maps HashKV to this path too, and answers it with Hash (measured): HashKV
        // has its own path only from 3.5 on, below.
        (
            "/v3/maintenance/hash",
            rpc::<pb::HashRequest, pb::HashResponse>("/etcdserverpb.Maintenance/Hash", Unary),
        ),
        (
            "/v3/maintenance/hashkv",
            rpc::<pb::HashKvRequest, pb::HashKvResponse>("/etcdserverpb.Maintenance/HashKV", Unary),
        ),
        (
            "/v3/maintenance/snapshot",
            rpc::<pb::SnapshotRequest, pb::SnapshotResponse>(
                "/etcdserverpb.Maintenance/Snapshot",
                ServerStream,
            ),
        ),
        (
            "/v3/maintenance/transfer-leadership",
            rpc::<pb::MoveLeaderRequest, pb::MoveLeaderResponse>(
                "/etcdserverpb.Maintenance/MoveLeader",
                Unary,
            ),
        ),
        (
            "/v3/auth/enable",
            rpc::<pb::AuthEnableRequest, pb::AuthEnableResponse>(
                "/etcdserverpb.Auth/AuthEnable",
                Unary,
            ),
        ),
        (
            "/v3/auth/disable",
            rpc::<pb::AuthDisableRequest, pb::AuthDisableResponse>(
                "/etcdserverpb.Auth/AuthDisable",
                Unary,
            ),
        ),
        // etcd 3.5's path (3.4 has no AuthStatus).
        (
            "/v3/auth/status",
            rpc::<pb::AuthStatusRequest, pb::AuthStatusResponse>(
                "/etcdserverpb.Auth/AuthStatus",
                Unary,
            ),
        ),
        (
            "/v3/auth/authenticate",
            rpc::<pb::AuthenticateRequest, pb::AuthenticateResponse>(
                "/etcdserverpb.Auth/Authenticate",
                Unary,
            ),
        ),
        (
            "/v3/auth/user/add",
            rpc::<pb::AuthUserAddRequest, pb::AuthUserAddResponse>(
                "/etcdserverpb.Auth/UserAdd",
                Unary,
            ),
        ),
        (
            "/v3/auth/user/get",
            rpc::<pb::AuthUserGetRequest, pb::AuthUserGetResponse>(
                "/etcdserverpb.Auth/UserGet",
                Unary,
            ),
        ),
        (
            "/v3/auth/user/list",
            rpc::<pb::AuthUserListRequest, pb::AuthUserListResponse>(
                "/etcdserverpb.Auth/UserList",
                Unary,
            ),
        ),
        (
            "/v3/auth/user/delete",
            rpc::<pb::AuthUserDeleteRequest, pb::AuthUserDeleteResponse>(
                "/etcdserverpb.Auth/UserDelete",
                Unary,
            ),
        ),
        (
            "/v3/auth/user/changepw",
            rpc::<pb::AuthUserChangePasswordRequest, pb::AuthUserChangePasswordResponse>(
                "/etcdserverpb.Auth/UserChangePassword",
                Unary,
            ),
        ),
        (
            "/v3/auth/user/grant",
            rpc::<pb::AuthUserGrantRoleRequest, pb::AuthUserGrantRoleResponse>(
                "/etcdserverpb.Auth/UserGrantRole",
                Unary,
            ),
        ),
        (
            "/v3/auth/user/revoke",
            rpc::<pb::AuthUserRevokeRoleRequest, pb::AuthUserRevokeRoleResponse>(
                "/etcdserverpb.Auth/UserRevokeRole",
                Unary,
            ),
        ),
        (
            "/v3/auth/role/add",
            rpc::<pb::AuthRoleAddRequest, pb::AuthRoleAddResponse>(
                "/etcdserverpb.Auth/RoleAdd",
                Unary,
            ),
        ),
        (
            "/v3/auth/role/get",
            rpc::<pb::AuthRoleGetRequest, pb::AuthRoleGetResponse>(
                "/etcdserverpb.Auth/RoleGet",
                Unary,
            ),
        ),
        (
            "/v3/auth/role/list",
            rpc::<pb::AuthRoleListRequest, pb::AuthRoleListResponse>(
                "/etcdserverpb.Auth/RoleList",
                Unary,
            ),
        ),
        (
            "/v3/auth/role/delete",
            rpc::<pb::AuthRoleDeleteRequest, pb::AuthRoleDeleteResponse>(
                "/etcdserverpb.Auth/RoleDelete",
                Unary,
            ),
        ),
        (
            "/v3/auth/role/grant",
            rpc::<pb::AuthRoleGrantPermissionRequest, pb::AuthRoleGrantPermissionResponse>(
                "/etcdserverpb.Auth/RoleGrantPermission",
                Unary,
            ),
        ),
        (
            "/v3/auth/role/revoke",
            rpc::<pb::AuthRoleRevokePermissionRequest, pb::AuthRoleRevokePermissionResponse>(
                "/etcdserverpb.Auth/RoleRevokePermission",
                Unary,
            ),
        ),
        (
            "/v3/lock/lock",
            rpc::<lock::LockRequest, lock::LockResponse>("/v3lockpb.Lock/Lock", Unary),
        ),
        (
            "/v3/lock/unlock",
            rpc::<lock::UnlockRequest, lock::UnlockResponse>("/v3lockpb.Lock/Unlock", Unary),
        ),
        (
            "/v3/election/campaign",
            rpc::<election::CampaignRequest, election::CampaignResponse>(
                "/v3electionpb.Election/Campaign",
                Unary,
            ),
        ),
        (
            "/v3/election/proclaim",
            rpc::<election::ProclaimRequest, election::ProclaimResponse>(
                "/v3electionpb.Election/Proclaim",
                Unary,
            ),
        ),
        (
            "/v3/election/leader",
            rpc::<election::LeaderRequest, election::LeaderResponse>(
                "/v3electionpb.Election/Leader",
                Unary,
            ),
        ),
        (
            "/v3/election/observe",
            rpc::<election::LeaderRequest, election::LeaderResponse>(
                "/v3electionpb.Election/Observe",
                ServerStream,
            ),
        ),
        (
            "/v3/election/resign",
            rpc::<election::ResignRequest, election::ResignResponse>(
                "/v3electionpb.Election/Resign",
                Unary,
            ),
        ),
    ]
}

static ROUTES: LazyLock<HashMap<&'static str, Route>> =
    LazyLock::new(|| table().into_iter().collect());

/// The route of a `/v3/...` path (after the `/v3beta/` rewrite).
pub(super) fn lookup(path: &str) -> Option<Route> {
    ROUTES.get(path).copied()
}

/// `msg` as a gRPC length-prefixed message (uncompressed).
fn frame(msg: &impl prost::Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    // A request over u32::MAX bytes cannot be built from a body bounded far below it.
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // `BytesMut` grows as needed, so encoding cannot run out of space.
    let _ = msg.encode(&mut buf);
    buf.freeze()
}

fn parse<M: prost::Message + DeserializeOwned>(json: &[u8]) -> Parsed {
    let mut stream = serde_json::Deserializer::from_slice(json).into_iter::<M>();
    match stream.next() {
        Some(Ok(m)) => Parsed::Message(frame(&m), stream.byte_offset()),
        Some(Err(e)) if e.is_eof() => Parsed::Incomplete(true),
        None => Parsed::Incomplete(false),
        Some(Err(e)) => Parsed::Invalid(describe(&e)),
    }
}

/// serde_json's message without its ` at line L column C` suffix (etcd's messages carry none).
fn describe(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

fn render<M: prost::Message + Default + Serialize>(pb: &[u8]) -> Result<Vec<u8>, String> {
    let m = M::decode(pb).map_err(|e| e.to_string())?;
    serde_json::to_vec(&m).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_unique_and_names_a_grpc_method() {
        let t = table();
        assert_eq!(ROUTES.len(), t.len(), "a path is listed twice");
        for (path, r) in t {
            assert!(path.starts_with("/v3/"), "{path}");
            assert!(
                r.grpc_path.starts_with('/') && r.grpc_path[1..].contains('/'),
                "{path}"
            );
        }
    }

    #[test]
    fn parse_takes_one_object_at_a_time() {
        let r = lookup("/v3/kv/range").unwrap();
        let body = br#" {"key":"Zm9v"} {"key":"YmFy"}"#;
        let Parsed::Message(_, used) = (r.parse)(body) else {
            panic!("not parsed")
        };
        assert!(matches!((r.parse)(&body[used..]), Parsed::Message(..)));
        assert!(matches!((r.parse)(b"  "), Parsed::Incomplete(false)));
        assert!(matches!((r.parse)(br#"{"key":"#), Parsed::Incomplete(true)));
        match (r.parse)(br#"{"key":"Zm9"}"#) {
            Parsed::Invalid(m) => assert!(!m.contains(" at line "), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
