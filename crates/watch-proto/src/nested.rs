//! `RequestOp` and `ResponseOp` written out instead of generated, so a transaction nests as
//! deep as etcd accepts.
//!
//! A txn nests through `TxnRequest.success → RequestOp.request_txn → TxnRequest …`: two
//! messages per level. prost's decoder stops at 100 nested messages (about 49 txn levels) and
//! the request then failed with INTERNAL "failed to decode", where etcd 3.4 decodes any depth
//! and refuses 128 levels or more (with the default `--max-txn-ops` 128) with InvalidArgument
//! "too many operations in txn request" (each level spends one op of its parent's budget).
//!
//! These two messages decode a nested txn with a fresh prost recursion budget and count the
//! txn levels themselves, per thread (a decode runs on one thread, start to end), up to
//! [`MAX_TXN_NESTING`]: deep enough for every txn the op limit lets through, shallow enough
//! that the recursive decode, conversion, check and execution fit a worker thread's stack
//! (beyond it prost's own limit applies again).
//! Everything else is what prost-build generates for these messages: the wire format, the
//! Rust shape (`request_op::Request`, `response_op::Response`) and `Debug`.

use std::cell::Cell;

use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::etcdserverpb::{TxnRequest, TxnResponse};

/// Txns nested in one another (the outermost counts) that decode with a fresh prost
/// recursion budget each. Deeper ones spend the budget as any message, so decoding fails with
/// prost's "recursion limit reached" about 49 levels further: the stack a decode uses stays
/// bounded. etcd refuses a txn of `--max-txn-ops` levels or more (128 by default), so this
/// covers the default op limit; a server with a larger one still refuses deeper txns (with
/// "failed to decode" instead of "too many operations"). Not more: the server's conversion,
/// checks and execution of a txn are recursive too, and 512 levels overflowed a worker
/// thread's 2 MiB stack in a debug build.
pub const MAX_TXN_NESTING: usize = 128;

thread_local! {
    /// Nested txns being decoded on this thread with a fresh budget (the outermost txn is
    /// not one of them).
    static NESTING: Cell<usize> = const { Cell::new(0) };
}

/// One more nested txn for as long as it lives.
struct Level;

impl Level {
    /// The level, or `None` when [`MAX_TXN_NESTING`] are decoding already.
    fn enter() -> Option<Self> {
        NESTING.with(|n| {
            // `n` nested txns are open: with the outermost one and this one, `n + 2`.
            (n.get() + 2 <= MAX_TXN_NESTING).then(|| {
                n.set(n.get() + 1);
                Level
            })
        })
    }
}

impl Drop for Level {
    fn drop(&mut self) {
        NESTING.with(|n| n.set(n.get() - 1));
    }
}

/// Decodes a nested txn message into `slot`: with a fresh prost budget up to
/// [`MAX_TXN_NESTING`] levels, with the caller's `ctx` beyond.
fn merge_nested<M: Message>(
    slot: &mut M,
    wire_type: WireType,
    buf: &mut impl Buf,
    ctx: DecodeContext,
) -> Result<(), DecodeError> {
    match Level::enter() {
        Some(_level) => {
            prost::encoding::message::merge(wire_type, slot, buf, DecodeContext::default())
        }
        None => prost::encoding::message::merge(wire_type, slot, buf, ctx),
    }
}

/// `prost::Message` for a txn op wrapper `$ty` whose oneof `$field` (of type `$oneof`) holds
/// a nested txn in variant `$txn_variant` (`$txn`, tag 4): the generated code, except that
/// tag 4 decodes through [`merge_nested`].
macro_rules! txn_op_message {
    ($ty:ident, $field:ident, $module:ident :: $oneof:ident, $txn_variant:ident, $txn:ty) => {
        impl Message for $ty {
            fn encode_raw(&self, buf: &mut impl BufMut) {
                if let Some(op) = &self.$field {
                    op.encode(buf);
                }
            }

            fn merge_field(
                &mut self,
                tag: u32,
                wire_type: WireType,
                buf: &mut impl Buf,
                ctx: DecodeContext,
            ) -> Result<(), DecodeError> {
                let result = if tag == 4 {
                    let mut txn = match self.$field.take() {
                        Some($module::$oneof::$txn_variant(t)) => t,
                        _ => <$txn>::default(),
                    };
                    let r = merge_nested(&mut txn, wire_type, buf, ctx);
                    self.$field = Some($module::$oneof::$txn_variant(txn));
                    r
                } else if (1..=3).contains(&tag) {
                    $module::$oneof::merge(&mut self.$field, tag, wire_type, buf, ctx)
                } else {
                    return prost::encoding::skip_field(wire_type, tag, buf, ctx);
                };
                result.map_err(|mut e| {
                    e.push(stringify!($ty), stringify!($field));
                    e
                })
            }

            fn encoded_len(&self) -> usize {
                self.$field.as_ref().map_or(0, $module::$oneof::encoded_len)
            }

            fn clear(&mut self) {
                self.$field = None;
            }
        }
    };
}

/// One operation of a transaction.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct RequestOp {
    /// The operation.
    pub request: Option<request_op::Request>,
}

/// Nested message and enum types in `RequestOp`.
pub mod request_op {
    /// The operation.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Request {
        /// A read.
        #[prost(message, tag = "1")]
        RequestRange(crate::etcdserverpb::RangeRequest),
        /// A write.
        #[prost(message, tag = "2")]
        RequestPut(crate::etcdserverpb::PutRequest),
        /// A delete.
        #[prost(message, tag = "3")]
        RequestDeleteRange(crate::etcdserverpb::DeleteRangeRequest),
        /// A nested transaction.
        #[prost(message, tag = "4")]
        RequestTxn(crate::etcdserverpb::TxnRequest),
    }
}

txn_op_message!(
    RequestOp,
    request,
    request_op::Request,
    RequestTxn,
    TxnRequest
);

/// The result of one transaction operation.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct ResponseOp {
    /// The result, of the same kind as the operation.
    pub response: Option<response_op::Response>,
}

/// Nested message and enum types in `ResponseOp`.
pub mod response_op {
    /// The result, of the same kind as the operation.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Response {
        /// Result of a read.
        #[prost(message, tag = "1")]
        ResponseRange(crate::etcdserverpb::RangeResponse),
        /// Result of a write.
        #[prost(message, tag = "2")]
        ResponsePut(crate::etcdserverpb::PutResponse),
        /// Result of a delete.
        #[prost(message, tag = "3")]
        ResponseDeleteRange(crate::etcdserverpb::DeleteRangeResponse),
        /// Result of a nested transaction.
        #[prost(message, tag = "4")]
        ResponseTxn(crate::etcdserverpb::TxnResponse),
    }
}

txn_op_message!(
    ResponseOp,
    response,
    response_op::Response,
    ResponseTxn,
    TxnResponse
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcdserverpb::PutRequest;

    /// A txn whose success branch nests `levels` txns, the innermost putting `k`.
    fn nested(levels: usize) -> TxnRequest {
        let mut txn = TxnRequest {
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: "k".into(),
                    value: "v".into(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        for _ in 1..levels {
            txn = TxnRequest {
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestTxn(txn)),
                }],
                ..Default::default()
            };
        }
        txn
    }

    #[test]
    fn a_txn_nested_as_deep_as_etcd_takes_round_trips() {
        // etcd 3.4.23 decodes 128 levels and refuses them as too many ops; 129 as well.
        for levels in [1, 2, 50, 128, 129, MAX_TXN_NESTING] {
            let txn = nested(levels);
            let bytes = txn.encode_to_vec();
            assert_eq!(
                TxnRequest::decode(&bytes[..]).as_ref(),
                Ok(&txn),
                "{levels}"
            );
            assert_eq!(NESTING.with(Cell::get), 0);
        }
    }

    #[test]
    fn far_deeper_than_the_bound_is_a_decode_error() {
        let bytes = nested(MAX_TXN_NESTING + 50).encode_to_vec();
        let err = TxnRequest::decode(&bytes[..]).unwrap_err();
        assert!(err.to_string().contains("recursion limit reached"), "{err}");
        // The level count unwound with the error.
        assert_eq!(NESTING.with(Cell::get), 0);
        // A response nests the same way.
        let mut resp = TxnResponse::default();
        for _ in 1..MAX_TXN_NESTING {
            resp = TxnResponse {
                responses: vec![ResponseOp {
                    response: Some(response_op::Response::ResponseTxn(resp)),
                }],
                ..Default::default()
            };
        }
        let bytes = resp.encode_to_vec();
        assert_eq!(TxnResponse::decode(&bytes[..]).as_ref(), Ok(&resp));
    }
}
