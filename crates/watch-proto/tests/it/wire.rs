//! Wire-level checks: encodings etcd clients produce decode as expected, field numbers match
//! etcd, and the generated services carry etcd's names.

use prost::Message;
use watch_proto::etcdserverpb::watch_create_request::FilterType;
use watch_proto::etcdserverpb::{
    WatchCreateRequest, WatchRequest, WatchResponse, auth_server, cluster_server, kv_server,
    lease_server, maintenance_server, watch_server,
};
use watch_proto::{FILE_DESCRIPTOR_SET, from_proto, mvccpb};

const BOTH: [i32; 2] = [FilterType::Noput as i32, FilterType::Nodelete as i32];

#[test]
fn filters_decode_packed_and_unpacked() {
    // Field 5, wire type 2 (packed): length 2, values 0 and 1.
    let packed = [0x2a, 0x02, 0x00, 0x01];
    // Field 5, wire type 0 (one varint per element), as older encoders send it.
    let unpacked = [0x28, 0x00, 0x28, 0x01];
    // A decoder must also accept a mix of both in one message.
    let mixed = [0x28, 0x00, 0x2a, 0x01, 0x01];
    for bytes in [&packed[..], &unpacked[..], &mixed[..]] {
        let req = WatchCreateRequest::decode(bytes).unwrap();
        assert_eq!(req.filters, BOTH, "{bytes:02x?}");
        let (_, opts) = from_proto::watch_create(&WatchCreateRequest {
            key: "k".into(),
            ..req
        })
        .unwrap();
        assert!(opts.no_put && opts.no_delete);
    }
    // prost itself sends the packed form, as proto3 asks.
    let encoded = WatchCreateRequest {
        filters: BOTH.to_vec(),
        ..Default::default()
    }
    .encode_to_vec();
    assert_eq!(encoded, packed);
}

#[test]
fn initial_state_is_field_100_and_unset_costs_nothing() {
    // keywatch's extension: field 100, varint (tag 800 = a0 06), far from etcd's 1-8.
    let on = WatchCreateRequest {
        initial_state: true,
        ..Default::default()
    };
    assert_eq!(on.encode_to_vec(), [0xa0, 0x06, 0x01]);
    // An etcd client never sets it: its requests decode with the extension off.
    let plain = WatchCreateRequest::decode(&[0x0a, 0x01, b'k'][..]).unwrap();
    assert!(!plain.initial_state);
    assert!(WatchCreateRequest::default().encode_to_vec().is_empty());
}

#[test]
fn etcd_field_numbers() {
    // WatchResponse.events is field 11 (tag 0x5a), after a gap from fragment = 7.
    let resp = WatchResponse {
        events: vec![mvccpb::Event::default()],
        ..Default::default()
    };
    assert_eq!(resp.encode_to_vec(), [0x5a, 0x00]);
    // WatchRequest.create_request is field 1 and WatchCreateRequest.start_revision field 3.
    let req = WatchRequest {
        request_union: Some(
            watch_proto::etcdserverpb::watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    start_revision: 1,
                    ..Default::default()
                },
            ),
        ),
    };
    assert_eq!(req.encode_to_vec(), [0x0a, 0x02, 0x18, 0x01]);
    // Compare.range_end is field 64 (tag 0x0202 as varint 0x82 0x04).
    let cmp = watch_proto::etcdserverpb::Compare {
        range_end: "z".into(),
        ..Default::default()
    };
    assert_eq!(cmp.encode_to_vec(), [0x82, 0x04, 0x01, b'z']);
}

#[test]
fn service_names_match_etcd() {
    assert_eq!(kv_server::SERVICE_NAME, "etcdserverpb.KV");
    assert_eq!(watch_server::SERVICE_NAME, "etcdserverpb.Watch");
    assert_eq!(lease_server::SERVICE_NAME, "etcdserverpb.Lease");
    assert_eq!(cluster_server::SERVICE_NAME, "etcdserverpb.Cluster");
    assert_eq!(maintenance_server::SERVICE_NAME, "etcdserverpb.Maintenance");
    assert_eq!(auth_server::SERVICE_NAME, "etcdserverpb.Auth");
    assert_eq!(
        watch_proto::v3lockpb::lock_server::SERVICE_NAME,
        "v3lockpb.Lock"
    );
    assert_eq!(
        watch_proto::v3electionpb::election_server::SERVICE_NAME,
        "v3electionpb.Election"
    );
}

#[test]
fn lock_and_election_field_numbers_match_etcd() {
    use watch_proto::v3electionpb::{CampaignRequest, LeaderKey};
    use watch_proto::v3lockpb::LockRequest;
    // LockRequest{name=1 bytes, lease=2 int64}.
    let req = LockRequest {
        name: "n".into(),
        lease: 1,
    };
    assert_eq!(req.encode_to_vec(), [0x0a, 0x01, b'n', 0x10, 0x01]);
    // CampaignRequest{name=1, lease=2, value=3}.
    let req = CampaignRequest {
        name: "n".into(),
        lease: 2,
        value: "v".into(),
    };
    assert_eq!(
        req.encode_to_vec(),
        [0x0a, 0x01, b'n', 0x10, 0x02, 0x1a, 0x01, b'v']
    );
    // LeaderKey{name=1, key=2, rev=3, lease=4}.
    let key = LeaderKey {
        name: "n".into(),
        key: "k".into(),
        rev: 3,
        lease: 4,
    };
    assert_eq!(
        key.encode_to_vec(),
        [0x0a, 0x01, b'n', 0x12, 0x01, b'k', 0x18, 0x03, 0x20, 0x04]
    );
}

#[test]
fn descriptor_set_describes_every_package() {
    let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
    let mut files: Vec<_> = fds.file.iter().map(|f| (f.name(), f.package())).collect();
    files.sort();
    assert_eq!(
        files,
        [
            ("authpb/auth.proto", "authpb"),
            ("etcdserverpb/rpc.proto", "etcdserverpb"),
            ("mvccpb/kv.proto", "mvccpb"),
            ("v3electionpb/v3election.proto", "v3electionpb"),
            ("v3lockpb/v3lock.proto", "v3lockpb"),
        ]
    );
}
