//! Conversions between the recorded types and etcd's wire messages.

use watch_proto::etcdserverpb as pb;
use watch_proto::mvccpb;

use crate::record::{
    AckDetail, Event, EventKind, Kv, TxnOp, TxnOpResult, VersionCompare, WatchSpec,
};

/// A wire kv as recorded.
pub fn kv(k: &mvccpb::KeyValue) -> Kv {
    Kv {
        key: k.key.to_vec(),
        value: k.value.to_vec(),
        create_revision: k.create_revision,
        mod_revision: k.mod_revision,
        version: k.version,
        lease: k.lease,
    }
}

/// A wire event as recorded.
pub fn event(e: &mvccpb::Event) -> Event {
    Event {
        kind: if e.r#type == mvccpb::event::EventType::Delete as i32 {
            EventKind::Delete
        } else {
            EventKind::Put
        },
        kv: e.kv.as_ref().map(kv).unwrap_or(Kv {
            key: Vec::new(),
            value: Vec::new(),
            create_revision: 0,
            mod_revision: 0,
            version: 0,
            lease: 0,
        }),
        prev: e.prev_kv.as_ref().map(kv),
    }
}

fn op(o: &TxnOp) -> pb::RequestOp {
    use pb::request_op::Request as R;
    let request = match o {
        TxnOp::Put { key, value } => R::RequestPut(pb::PutRequest {
            key: key.clone().into(),
            value: value.clone().into(),
            prev_kv: true,
            ..Default::default()
        }),
        TxnOp::Delete { key } => R::RequestDeleteRange(pb::DeleteRangeRequest {
            key: key.clone().into(),
            prev_kv: true,
            ..Default::default()
        }),
        TxnOp::Get { key } => R::RequestRange(pb::RangeRequest {
            key: key.clone().into(),
            ..Default::default()
        }),
    };
    pb::RequestOp {
        request: Some(request),
    }
}

fn compare(c: &VersionCompare) -> pb::Compare {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let result = match c.ordering {
        -1 => CompareResult::Less,
        0 => CompareResult::Equal,
        _ => CompareResult::Greater,
    };
    pb::Compare {
        result: result as i32,
        target: CompareTarget::Version as i32,
        key: c.key.clone().into(),
        range_end: Default::default(),
        target_union: Some(TargetUnion::Version(c.version)),
    }
}

/// The txn request of a [`Request::Txn`].
pub fn txn(compares: &[VersionCompare], success: &[TxnOp], failure: &[TxnOp]) -> pb::TxnRequest {
    pb::TxnRequest {
        compare: compares.iter().map(compare).collect(),
        success: success.iter().map(op).collect(),
        failure: failure.iter().map(op).collect(),
    }
}

/// The ack detail of a txn response for the branch that ran.
pub fn txn_detail(resp: &pb::TxnResponse) -> AckDetail {
    use pb::response_op::Response as R;
    let results = resp
        .responses
        .iter()
        .map(|r| match &r.response {
            Some(R::ResponsePut(p)) => TxnOpResult::Put {
                prev: p.prev_kv.as_ref().map(kv),
            },
            Some(R::ResponseDeleteRange(d)) => TxnOpResult::Delete {
                prev: d.prev_kvs.iter().map(kv).collect(),
            },
            _ => TxnOpResult::Get,
        })
        .collect();
    AckDetail::Txn {
        succeeded: resp.succeeded,
        results,
    }
}

/// The create request of a watch.
pub fn create(spec: &WatchSpec, start_revision: i64) -> pb::WatchRequest {
    use pb::watch_create_request::FilterType;
    let mut filters = Vec::new();
    if spec.no_put {
        filters.push(FilterType::Noput as i32);
    }
    if spec.no_delete {
        filters.push(FilterType::Nodelete as i32);
    }
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: spec.key.clone().into(),
                range_end: spec.range_end.clone().into(),
                start_revision,
                progress_notify: spec.progress_notify,
                filters,
                prev_kv: spec.prev_kv,
                initial_state: spec.initial_state,
                ..Default::default()
            },
        )),
    }
}

/// A stream-wide progress request.
pub fn progress_request() -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
            pb::WatchProgressRequest {},
        )),
    }
}

/// Whether a write error is definite (the server refused the request, nothing happened) rather
/// than an unknown outcome.
pub fn definite(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::OutOfRange
            | tonic::Code::NotFound
            | tonic::Code::FailedPrecondition
            | tonic::Code::AlreadyExists
            | tonic::Code::PermissionDenied
    )
}
