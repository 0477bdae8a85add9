//! Translation between the etcd wire messages of the KV service and the store API, and the
//! mapping of watch-server's errors ([`StoreError`], the mirror's [`BarrierError`]) to
//! `tonic::Status`.
//!
//! watch-proto owns the watch and event conversions and the etcd error table
//! ([`EtcdError`]); the KV request types are kv-store's, which watch-proto does not depend
//! on, so their translation lives here, next to the services that use it.

use tonic::{Code, Status};
use watch_core::Revision;
use watch_proto::ConvertError;
use watch_proto::etcdserverpb as pb;
use watch_proto::status::{EtcdError, from_convert_error, from_watch_error};
use watch_proto::to_proto;

use crate::mirror::BarrierError;
use kv_store::{CodeClass, ErrorClass, EtcdKind, StoreError};
use kv_store::{
    Compare, CompareOp, CompareTarget, DeleteResult, KeyRange, PutOptions, PutResult, RangeRequest,
    RangeResult, SortOrder, SortTarget, TxnOp, TxnOpResult, TxnRequest, TxnResult,
};

/// Fixed identity of this single-member cluster (any non-zero values; clients only compare
/// them between responses).
pub const CLUSTER_ID: u64 = 0x6b65_7977_6174_6368; // "keywatch"
/// The member ID of this server.
pub const MEMBER_ID: u64 = 0x6b77_0000_0000_0001;
/// The raft term reported (there is no raft; one term forever).
pub const RAFT_TERM: u64 = 1;

/// The response header at `revision`.
pub fn header(revision: Revision) -> pb::ResponseHeader {
    pb::ResponseHeader {
        cluster_id: CLUSTER_ID,
        member_id: MEMBER_ID,
        revision: to_proto::revision(revision),
        raft_term: RAFT_TERM,
    }
}

/// The gRPC status of a store error: the one mapping of [`StoreError`] to `tonic::Status`.
/// kv-store classifies each error exhaustively ([`StoreError::class`]); this maps the classes,
/// also exhaustively, so a new variant or class fails to build instead of becoming INTERNAL.
pub fn store_status(e: &StoreError) -> Status {
    match e.class() {
        ErrorClass::Etcd(kind) => etcd_error(kind).status(),
        ErrorClass::Own(class) => Status::new(code(class), e.to_string()),
        ErrorClass::Watch(w) => from_watch_error(w),
    }
}

/// The etcd error (code and exact text) of a store [`EtcdKind`].
fn etcd_error(kind: EtcdKind) -> EtcdError {
    match kind {
        EtcdKind::Compacted => EtcdError::Compacted,
        EtcdKind::FutureRevision => EtcdError::FutureRevision,
        EtcdKind::EmptyKey => EtcdError::EmptyKey,
        EtcdKind::KeyNotFound => EtcdError::KeyNotFound,
        EtcdKind::ValueProvided => EtcdError::ValueProvided,
        EtcdKind::LeaseProvided => EtcdError::LeaseProvided,
        EtcdKind::DuplicateKey => EtcdError::DuplicateKey,
        EtcdKind::TooManyOps => EtcdError::TooManyOps,
        EtcdKind::TooManyRequests => EtcdError::TooManyRequests,
        EtcdKind::LeaseNotFound => EtcdError::LeaseNotFound,
        EtcdKind::LeaseExists => EtcdError::LeaseExists,
        EtcdKind::LeaseTtlTooLarge => EtcdError::LeaseTtlTooLarge,
        EtcdKind::Stopped => EtcdError::Stopped,
        EtcdKind::Corrupt => EtcdError::Corrupt,
        EtcdKind::NoSpace => EtcdError::NoSpace,
    }
}

/// The gRPC code of a store [`CodeClass`].
fn code(class: CodeClass) -> Code {
    match class {
        CodeClass::FailedPrecondition => Code::FailedPrecondition,
        CodeClass::ResourceExhausted => Code::ResourceExhausted,
        CodeClass::Unavailable => Code::Unavailable,
        CodeClass::Internal => Code::Internal,
    }
}

/// The gRPC status of a failed mirror barrier (a linearizable read or a forwarded write
/// waiting for the mirror to reach the upstream's revision).
pub fn barrier_status(e: &BarrierError) -> Status {
    match e {
        // keywatch's own condition: Unavailable, so clients retry or go elsewhere.
        BarrierError::Timeout { .. } => Status::unavailable(e.to_string()),
        BarrierError::Store(s) => store_status(s),
    }
}

fn non_negative(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A wire range request as a store request. Negative revisions and limits mean "none", as in
/// etcd; an unknown sort enum is etcd's invalid sort option error.
pub fn range_request(r: &pb::RangeRequest) -> Result<RangeRequest, Status> {
    use pb::range_request::{SortOrder as O, SortTarget as T};
    let sort_order = match O::try_from(r.sort_order) {
        Ok(O::None) => SortOrder::None,
        Ok(O::Ascend) => SortOrder::Ascend,
        Ok(O::Descend) => SortOrder::Descend,
        Err(_) => return Err(EtcdError::InvalidSortOption.status()),
    };
    let sort_target = match T::try_from(r.sort_target) {
        Ok(T::Key) => SortTarget::Key,
        Ok(T::Version) => SortTarget::Version,
        Ok(T::Create) => SortTarget::Create,
        Ok(T::Mod) => SortTarget::Mod,
        Ok(T::Value) => SortTarget::Value,
        Err(_) => return Err(EtcdError::InvalidSortOption.status()),
    };
    Ok(
        RangeRequest::new(KeyRange::new(r.key.clone(), r.range_end.clone()))
            .limit(non_negative(r.limit))
            .revision(non_negative(r.revision))
            .sort(sort_order, sort_target)
            .keys_only(r.keys_only)
            .count_only(r.count_only)
            .mod_revision_bounds(
                non_negative(r.min_mod_revision),
                non_negative(r.max_mod_revision),
            )
            .create_revision_bounds(
                non_negative(r.min_create_revision),
                non_negative(r.max_create_revision),
            ),
    )
}

/// A store range result as the wire response.
pub fn range_response(r: RangeResult) -> pb::RangeResponse {
    pb::RangeResponse {
        header: Some(header(r.revision)),
        kvs: r.kvs.iter().map(to_proto::key_value).collect(),
        more: r.more,
        count: i64::try_from(r.count).unwrap_or(i64::MAX),
    }
}

/// A wire put as a store op.
pub fn put_op(r: &pb::PutRequest) -> TxnOp {
    TxnOp::Put {
        key: r.key.clone(),
        value: r.value.clone(),
        options: put_options(r),
    }
}

/// A wire put's options.
pub fn put_options(r: &pb::PutRequest) -> PutOptions {
    PutOptions::default()
        .lease(r.lease)
        .prev_kv(r.prev_kv)
        .ignore_value(r.ignore_value)
        .ignore_lease(r.ignore_lease)
}

/// A store put result as the wire response.
pub fn put_response(r: PutResult) -> pb::PutResponse {
    pb::PutResponse {
        header: Some(header(r.revision)),
        prev_kv: r.prev_kv.as_ref().map(to_proto::key_value),
    }
}

/// A wire delete as a store op.
pub fn delete_op(r: &pb::DeleteRangeRequest) -> TxnOp {
    TxnOp::Delete {
        range: delete_range(r),
        prev_kv: r.prev_kv,
    }
}

/// A wire delete's range.
pub fn delete_range(r: &pb::DeleteRangeRequest) -> KeyRange {
    KeyRange::new(r.key.clone(), r.range_end.clone())
}

/// A store delete result as the wire response.
pub fn delete_response(r: DeleteResult) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header: Some(header(r.revision)),
        deleted: i64::try_from(r.deleted).unwrap_or(i64::MAX),
        prev_kvs: r.prev_kvs.iter().map(to_proto::key_value).collect(),
    }
}

fn compare(c: &pb::Compare) -> Result<Compare, Status> {
    use pb::compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let op = match R::try_from(c.result) {
        Ok(R::Equal) => CompareOp::Equal,
        Ok(R::Greater) => CompareOp::Greater,
        Ok(R::Less) => CompareOp::Less,
        Ok(R::NotEqual) => CompareOp::NotEqual,
        Err(_) => {
            return Err(from_convert_error(&ConvertError::UnknownEnumValue {
                field: "result",
                value: c.result,
            }));
        }
    };
    // etcd reads the operand only from the union member matching the target; any other
    // member (or none) compares against zero / the empty value.
    let u = c.target_union.as_ref();
    let target = match T::try_from(c.target) {
        Ok(T::Version) => CompareTarget::Version(if let Some(U::Version(v)) = u { *v } else { 0 }),
        Ok(T::Create) => CompareTarget::CreateRevision(if let Some(U::CreateRevision(v)) = u {
            *v
        } else {
            0
        }),
        Ok(T::Mod) => CompareTarget::ModRevision(if let Some(U::ModRevision(v)) = u {
            *v
        } else {
            0
        }),
        Ok(T::Value) => CompareTarget::Value(if let Some(U::Value(v)) = u {
            v.clone()
        } else {
            bytes::Bytes::new()
        }),
        Ok(T::Lease) => CompareTarget::Lease(if let Some(U::Lease(v)) = u { *v } else { 0 }),
        Err(_) => {
            return Err(from_convert_error(&ConvertError::UnknownEnumValue {
                field: "target",
                value: c.target,
            }));
        }
    };
    Ok(Compare {
        range: KeyRange::new(c.key.clone(), c.range_end.clone()),
        target,
        op,
    })
}

fn request_op(op: &pb::RequestOp) -> Result<TxnOp, Status> {
    use pb::request_op::Request;
    match &op.request {
        Some(Request::RequestRange(r)) => Ok(TxnOp::Range(range_request(r)?)),
        Some(Request::RequestPut(r)) => Ok(put_op(r)),
        Some(Request::RequestDeleteRange(r)) => Ok(delete_op(r)),
        Some(Request::RequestTxn(t)) => Ok(TxnOp::Txn(txn_request(t)?)),
        // etcd answers an op with no request with its key-not-found error.
        None => Err(EtcdError::KeyNotFound.status()),
    }
}

/// A wire txn as a store txn.
pub fn txn_request(t: &pb::TxnRequest) -> Result<TxnRequest, Status> {
    Ok(TxnRequest {
        compare: t.compare.iter().map(compare).collect::<Result<_, _>>()?,
        success: t.success.iter().map(request_op).collect::<Result<_, _>>()?,
        failure: t.failure.iter().map(request_op).collect::<Result<_, _>>()?,
    })
}

/// etcd fills only `revision` in the headers of a txn's nested responses (its apply layer
/// builds them bare; the server fills only the outer header's ids).
fn nested_header(header: &mut Option<pb::ResponseHeader>) {
    if let Some(h) = header {
        *h = pb::ResponseHeader {
            revision: h.revision,
            ..Default::default()
        };
    }
}

/// A store txn result as the wire response.
pub fn txn_response(t: TxnResult) -> pb::TxnResponse {
    use pb::response_op::Response;
    pb::TxnResponse {
        header: Some(header(t.revision)),
        succeeded: t.succeeded,
        responses: t
            .responses
            .into_iter()
            .map(|r| pb::ResponseOp {
                response: Some(match r {
                    TxnOpResult::Range(r) => {
                        let mut r = range_response(r);
                        nested_header(&mut r.header);
                        Response::ResponseRange(r)
                    }
                    TxnOpResult::Put(r) => {
                        let mut r = put_response(r);
                        nested_header(&mut r.header);
                        Response::ResponsePut(r)
                    }
                    TxnOpResult::Delete(r) => {
                        let mut r = delete_response(r);
                        nested_header(&mut r.header);
                        Response::ResponseDeleteRange(r)
                    }
                    TxnOpResult::Txn(t) => {
                        let mut t = txn_response(t);
                        nested_header(&mut t.header);
                        Response::ResponseTxn(t)
                    }
                }),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(e: StoreError, code: Code, message: &str) {
        let s = store_status(&e);
        assert_eq!((s.code(), s.message()), (code, message));
    }

    #[test]
    fn store_errors() {
        check(
            StoreError::Compacted {
                requested: 1,
                compacted: 4,
            },
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted",
        );
        check(
            StoreError::LeaseNotFound { lease: 7 },
            Code::NotFound,
            "etcdserver: requested lease not found",
        );
        check(
            StoreError::Closed,
            Code::Unavailable,
            "etcdserver: server stopped",
        );
        let own = StoreError::TooManyLeases { limit: 3 };
        let text = own.to_string();
        check(own, Code::ResourceExhausted, &text);
        let mirror = StoreError::MirrorReadOnly;
        let text = mirror.to_string();
        check(mirror, Code::FailedPrecondition, &text);
        check(
            StoreError::Log(event_log::LogError::QueueFull),
            Code::ResourceExhausted,
            "etcdserver: too many requests",
        );
        let poisoned = StoreError::Log(event_log::LogError::Poisoned {
            cause: "fsync".into(),
        });
        let text = poisoned.to_string();
        check(poisoned, Code::Unavailable, &text);
        check(
            StoreError::Watch(watch_core::WatchError::EmptyRange {
                start: "b".into(),
                end: "a".into(),
            }),
            Code::InvalidArgument,
            "mvcc: watcher range is empty",
        );
    }
}
