//! Black-box compatibility suite for the Maintenance service and the space quota: every case
//! runs against keywatch and a real etcd (3.4.23) with the same assertions, through the
//! etcd-client crate and etcdctl (`snapshot save`, `endpoint status/hash/hashkv`, `defrag`,
//! `alarm list/disarm`, `move-leader`). Plus (keywatch only) the backup → `watch-server
//! restore` → serve round trip: etcd's snapshot is a bbolt file that keywatch does not read or
//! write, so only the stream framing is shared.

use crate::common::{Server, assert_status, compat_test};
use etcd_client::{
    AlarmAction, AlarmType, Client, CompactionOptions, DeleteOptions, GetOptions, PutOptions,
};
use sha2::{Digest, Sha256};
use tonic::Code;
use watch_proto::etcdserverpb as pb;

const NOSPACE: &str = "etcdserver: mvcc: database space exceeded";
const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
const FUTURE: &str = "etcdserver: mvcc: required revision is a future revision";
const BAD_TRANSFEREE: &str = "etcdserver: bad leader transferee";

/// The answering member's ID (from Status).
async fn member_id(client: &mut Client) -> u64 {
    let status = client.status().await.expect("status");
    status.header().expect("status header").member_id()
}

/// The server's `host:port`. etcdctl 3.4's per-endpoint commands (`endpoint status/hash/
/// hashkv`, `defrag`, `move-leader`) dial an `http://` endpoint as a gRPC target whose HTTP/2
/// `:authority` is the whole URL, which the HTTP/2 library under tonic rejects as malformed
/// (RST_STREAM PROTOCOL_ERROR); grpc-go accepts it. So these commands get `host:port`, as
/// docs/operations.md tells operators.
fn endpoint(server: &Server) -> String {
    let url = server.endpoint();
    url.trim_start_matches("http://").to_owned()
}

/// `etcdctl --endpoints host:port <args>`: stdout on success, else the exit code and stderr.
fn ctl(server: &Server, args: &[&str]) -> Result<String, (Option<i32>, String)> {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint(server))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run etcdctl");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("UTF-8"))
    } else {
        Err((
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

/// [`ctl`] that must succeed.
fn ctl_ok(server: &Server, args: &[&str]) -> String {
    ctl(server, args).unwrap_or_else(|e| panic!("{}: etcdctl {args:?}: {e:?}", server.target))
}

/// Writes the same history to a server: revisions 2..=5.
async fn history(client: &mut Client) {
    client.put("a", "1", None).await.expect("put");
    client.put("b", "2", None).await.expect("put");
    client.put("a", "3", None).await.expect("put");
    client.delete("b", None).await.expect("delete");
}

// HashKV's revision rules (current, past, future, compacted; `compact_revision` -1 until the
// first compaction) and that two servers holding the same data report the same hash.
async fn hash_kv_rules(server: Server) {
    let mut client = server.client().await;
    history(&mut client).await;
    let now = client.hash_kv(0).await.expect("hashkv");
    assert_eq!(now.compact_version(), -1, "never compacted");
    assert_eq!(now.header().expect("header").revision(), 5);
    let past = client.hash_kv(3).await.expect("hashkv at 3");
    assert_eq!(
        past.header().expect("header").revision(),
        5,
        "the current revision"
    );
    assert_ne!(
        past.hash(),
        now.hash(),
        "a at 3 is 1, at 5 it is 3 and b is gone"
    );
    assert_eq!(client.hash_kv(3).await.expect("again").hash(), past.hash());
    assert_status(client.hash_kv(99).await, Code::OutOfRange, FUTURE);

    // A second server of the same kind, same writes: same hashes.
    let other = Server::start(server.target, "hash_kv_rules_other");
    let mut other_client = other.client().await;
    history(&mut other_client).await;
    assert_eq!(
        other_client.hash_kv(0).await.expect("hashkv").hash(),
        now.hash()
    );
    assert_eq!(
        other_client.hash_kv(3).await.expect("hashkv").hash(),
        past.hash()
    );

    client
        .compact(3, Some(CompactionOptions::new().with_physical()))
        .await
        .expect("compact");
    assert_status(client.hash_kv(3).await, Code::OutOfRange, COMPACTED);
    assert_status(client.hash_kv(2).await, Code::OutOfRange, COMPACTED);
    let after = client.hash_kv(4).await.expect("hashkv at 4");
    assert_eq!(after.compact_version(), 3);
    let now_after = client.hash_kv(0).await.expect("hashkv");
    assert_eq!(now_after.compact_version(), 3);

    if server.has_etcdctl() {
        let out = ctl_ok(&server, &["endpoint", "hashkv"]);
        assert_eq!(
            out,
            format!("{}, {}\n", endpoint(&server), now_after.hash())
        );
    }
}
compat_test!(hash_kv_rules);

// Status (sizes, indexes, leader = self, no errors), Hash, and MoveLeader as a single member
// answers it: to itself it succeeds, to anyone else "bad leader transferee".
async fn status_hash_move_leader(server: Server) {
    let mut client = server.client().await;
    client.put("k", "v", None).await.expect("put");
    let status = client.status().await.expect("status");
    let member = status.header().expect("header").member_id();
    assert_eq!(status.leader(), member, "a single member leads");
    assert!(status.raft_index() >= 2 && status.raft_applied_index() >= 2);
    // The etcd-client crate does not expose dbSizeInUse: read it raw.
    let mut raw = pb::maintenance_client::MaintenanceClient::connect(server.endpoint().to_owned())
        .await
        .expect("connect");
    let raw = raw
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(raw.db_size > 0 && raw.db_size_in_use > 0);
    assert!(raw.db_size_in_use <= raw.db_size);
    assert!(status.errors().is_empty(), "{:?}", status.errors());
    assert!(!status.is_learner());

    let h1 = client.hash().await.expect("hash");
    let h2 = client.hash().await.expect("hash");
    assert_eq!(h1.hash(), h2.hash(), "nothing changed in between");

    client.move_leader(member).await.expect("move to self");
    assert_status(
        client.move_leader(member.wrapping_add(1)).await,
        Code::FailedPrecondition,
        BAD_TRANSFEREE,
    );
    if server.has_etcdctl() {
        let hex = format!("{member:x}");
        assert_eq!(
            ctl_ok(&server, &["move-leader", &hex]),
            format!("Leadership transferred from {hex} to {hex}\n")
        );
        let other = format!("{:x}", member.wrapping_add(1));
        let (code, err) = ctl(&server, &["move-leader", &other]).expect_err("unknown member");
        assert_eq!(code, Some(1));
        assert!(err.contains(&format!("Error: {BAD_TRANSFEREE}")), "{err}");
        // etcdctl's own JSON of Status: leader and index fields as etcd fills them.
        let json = ctl_ok(&server, &["endpoint", "status", "-w", "json"]);
        assert!(json.contains(&format!("\"leader\":{member},")), "{json}");
        assert!(json.contains("\"raftIndex\":"), "{json}");
        assert!(json.contains("\"dbSizeInUse\":"), "{json}");
    }
}
compat_test!(status_hash_move_leader);

/// Checks the framing etcdctl relies on: `512 * n + 32` bytes, the last 32 the SHA-256 of
/// the rest.
fn check_snapshot_file(bytes: &[u8]) {
    assert_eq!(bytes.len() % 512, 32, "size {}", bytes.len());
    let (data, digest) = bytes.split_at(bytes.len() - 32);
    assert_eq!(Sha256::digest(data).as_slice(), digest);
}

// The Snapshot stream as etcd sends it: chunks of at most 32 KiB whose `remaining_bytes`
// counts what follows (0 on the last data chunk), then one message holding the SHA-256; and
// `etcdctl snapshot save` accepts it.
async fn snapshot_stream(server: Server) {
    let mut client = server.client().await;
    // Enough data for several chunks.
    let value = "v".repeat(4096);
    for i in 0..40 {
        client
            .put(format!("key/{i:03}"), value.as_str(), None)
            .await
            .expect("put");
    }
    let mut stream = client.snapshot().await.expect("snapshot");
    let mut chunks = Vec::new();
    while let Some(msg) = stream.message().await.expect("snapshot message") {
        chunks.push((msg.remaining_bytes(), msg.blob().to_vec()));
    }
    let (digest_msg, data) = chunks.split_last().expect("at least the digest");
    assert!(data.len() >= 4, "{} data chunks", data.len());
    let total: u64 = data.iter().map(|(_, b)| b.len() as u64).sum();
    let mut sent = 0;
    for (remaining, blob) in data {
        assert!(
            !blob.is_empty() && blob.len() <= 32 * 1024,
            "{}",
            blob.len()
        );
        sent += blob.len() as u64;
        assert_eq!(*remaining, total - sent);
    }
    assert_eq!(digest_msg.0, 0);
    let all: Vec<u8> = data.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    assert_eq!(Sha256::digest(&all).as_slice(), digest_msg.1.as_slice());

    if server.has_etcdctl() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("backup.db");
        let path = path.to_str().expect("UTF-8 path");
        let out = server.etcdctl_output(&["snapshot", "save", path], "");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("Snapshot saved at {path}\n")
        );
        check_snapshot_file(&std::fs::read(path).expect("read the snapshot"));
    }
}
compat_test!(snapshot_stream);

// Alarms: none at first (etcdctl prints nothing, the response has no header); a client may
// raise CORRUPT, which stops writes ("corrupt cluster") but not reads, until deactivated.
async fn alarms_and_defrag(server: Server) {
    let mut client = server.client().await;
    let member = member_id(&mut client).await;
    let none = client
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .expect("alarm get");
    assert!(none.alarms().is_empty());
    assert!(
        none.header().is_none(),
        "etcd's Alarm response has no header"
    );
    client.put("k", "v", None).await.expect("put");
    let mut options = etcd_client::AlarmOptions::new();
    options.with_member(member);
    let raised = client
        .alarm(AlarmAction::Activate, AlarmType::Corrupt, Some(options))
        .await
        .expect("activate");
    assert_eq!(raised.alarms().len(), 1);
    assert_eq!(raised.alarms()[0].member_id(), member);
    assert_eq!(raised.alarms()[0].alarm(), AlarmType::Corrupt);
    assert_status(
        client.put("k", "w", None).await,
        Code::DataLoss,
        "etcdserver: corrupt cluster",
    );
    let listed = client
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .expect("alarm get");
    assert_eq!(listed.alarms().len(), 1);
    let mut options = etcd_client::AlarmOptions::new();
    options.with_member(member);
    let cleared = client
        .alarm(AlarmAction::Deactivate, AlarmType::Corrupt, Some(options))
        .await
        .expect("deactivate");
    assert_eq!(cleared.alarms().len(), 1);
    client
        .put("k", "w", None)
        .await
        .expect("put after the alarm");

    if server.has_etcdctl() {
        assert_eq!(server.etcdctl(&["alarm", "list"]), "");
        assert_eq!(server.etcdctl(&["alarm", "disarm"]), "");
        assert_eq!(
            ctl_ok(&server, &["defrag"]),
            format!(
                "Finished defragmenting etcd member[{}]\n",
                endpoint(&server)
            )
        );
    }
    client.defragment().await.expect("defragment");
    assert_eq!(
        client.get("k", None).await.expect("get").kvs()[0].value(),
        b"w"
    );
}
compat_test!(alarms_and_defrag);

/// A 4 MiB quota: 256 KiB puts soon exceed it on both servers, whatever their files' layout.
fn quota(_target: crate::common::Target) -> Vec<&'static str> {
    vec!["--quota-backend-bytes", "4194304"]
}

// The space quota end to end: past it a put fails with etcd's NOSPACE error and raises the
// alarm; while it is raised every put and lease grant fails (a small one too), while reads,
// deletes, lease revokes, compaction and defrag work; once space is freed `alarm disarm`
// clears it and writes work again.
async fn quota_nospace(server: Server) {
    if !server.has_etcdctl() {
        return;
    }
    let mut client = server.client().await;
    let member = member_id(&mut client).await;
    // keywatch's fresh files hold preallocated space: start from compact files.
    client.defragment().await.expect("defragment");
    let lease = client.lease_grant(600, None).await.expect("grant").id();
    client
        .put("leased", "v", Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("put");
    let big = "x".repeat(256 * 1024);
    let mut written = 0;
    let refused = loop {
        assert!(written < 64, "16 MiB written under a 4 MiB quota");
        match client
            .put(format!("big/{written}"), big.as_str(), None)
            .await
        {
            Ok(_) => written += 1,
            Err(e) => break e,
        }
    };
    assert!(written >= 1, "the first 256 KiB put fits in 4 MiB");
    assert_status::<()>(Err(refused), Code::ResourceExhausted, NOSPACE);

    let alarm_line = format!("memberID:{member} alarm:NOSPACE ");
    let alarms = client
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .expect("alarm get");
    assert_eq!(alarms.alarms().len(), 1);
    assert_eq!(alarms.alarms()[0].member_id(), member);
    assert_eq!(alarms.alarms()[0].alarm(), AlarmType::Nospace);
    assert_eq!(
        client.status().await.expect("status").errors(),
        std::slice::from_ref(&alarm_line)
    );
    assert_eq!(
        server.etcdctl(&["alarm", "list"]),
        format!("{alarm_line}\n")
    );

    // Whatever its size, a write that adds data fails while the alarm is raised.
    assert_status(
        client.put("small", "v", None).await,
        Code::ResourceExhausted,
        NOSPACE,
    );
    assert_status(
        client.lease_grant(60, None).await,
        Code::ResourceExhausted,
        NOSPACE,
    );
    // Reads, deletes, revokes, compaction and defrag work.
    assert_eq!(client.get("leased", None).await.expect("get").count(), 1);
    client.lease_revoke(lease).await.expect("revoke");
    // One delete per key: each delete's record keeps only its own key's previous value.
    for i in 0..written {
        let deleted = client
            .delete(format!("big/{i}"), None)
            .await
            .expect("delete");
        assert_eq!(deleted.deleted(), 1);
    }
    let left = client
        .get("big/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    assert_eq!(left.count(), 0);
    let rev = left.header().expect("header").revision();
    client
        .compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
        .expect("compact");
    assert_eq!(
        ctl_ok(&server, &["defrag"]),
        format!(
            "Finished defragmenting etcd member[{}]\n",
            endpoint(&server)
        )
    );
    let size = client.status().await.expect("status").db_size();
    assert!(size < 4 * 1024 * 1024, "{size} bytes after defrag");
    // Still raised until disarmed.
    assert_status(
        client.put("small", "v", None).await,
        Code::ResourceExhausted,
        NOSPACE,
    );
    assert_eq!(
        server.etcdctl(&["alarm", "disarm"]),
        format!("{alarm_line}\n")
    );
    assert_eq!(server.etcdctl(&["alarm", "list"]), "");
    client
        .put("small", "v", None)
        .await
        .expect("put after disarm");
    client
        .lease_grant(60, None)
        .await
        .expect("grant after disarm");
    assert!(client.status().await.expect("status").errors().is_empty());
    let deleted = client
        .delete("small", Some(DeleteOptions::new()))
        .await
        .expect("delete");
    assert_eq!(deleted.deleted(), 1);
}
compat_test!(quota_nospace, flags = quota);

// Backup → `watch-server restore` → serve: every key with its revisions, versions and lease,
// the revision counter, the compaction revision, history at past revisions, the leases, and
// the users and roles come back (keywatch only: its backup is its own format; etcd's is a bbolt file).
async fn restore_round_trip(server: Server) {
    if !server.has_etcdctl() {
        return;
    }
    let mut client = server.client().await;
    history(&mut client).await; // revisions 2..=5
    let lease = client.lease_grant(600, None).await.expect("grant").id();
    client
        .put("leased", "l", Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("put"); // 6
    client.put("c", "x", None).await.expect("put"); // 7
    client.put("c", "y", None).await.expect("put"); // 8
    client
        .compact(4, Some(CompactionOptions::new().with_physical()))
        .await
        .expect("compact");
    // Users and roles travel with the backup, as in etcd's snapshot.
    client
        .user_add("dave", "davepw", None)
        .await
        .expect("user add");
    client.role_add("ops").await.expect("role add");
    client.user_grant_role("dave", "ops").await.expect("grant");

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("backup.db");
    let file_arg = file.to_str().expect("UTF-8 path");
    server.etcdctl(&["snapshot", "save", file_arg]);
    let bytes = std::fs::read(&file).expect("read the snapshot");
    check_snapshot_file(&bytes);

    let restore = |target: &std::path::Path, file: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_watch-server"))
            .arg("restore")
            .arg(file)
            .arg("--data-dir")
            .arg(target)
            .output()
            .expect("run watch-server restore")
    };
    // A damaged file is refused by its checksum.
    let damaged = dir.path().join("damaged.db");
    let mut bad = bytes.clone();
    bad[20] ^= 1;
    std::fs::write(&damaged, &bad).expect("write");
    let out = restore(&dir.path().join("nowhere"), &damaged);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SHA-256"),
        "{out:?}"
    );
    let data = tempfile::tempdir().expect("data dir");
    let out = restore(data.path(), &file);
    assert!(out.status.success(), "{out:?}");
    // A data directory that holds a store is refused.
    let again = restore(data.path(), &file);
    assert!(!again.status.success(), "{again:?}");
    // Declared after `data`, so dropped (killed) before the directory is removed.
    let restored = Server::start_keywatch_in("restore_round_trip_restored", data.path());
    let mut copy = restored.client().await;

    let all = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            c.get("", Some(GetOptions::new().with_from_key()))
                .await
                .expect("get all")
        }
    };
    let (a, b) = (all(&mut client).await, all(&mut copy).await);
    assert_eq!(a.header().unwrap().revision(), 8);
    assert_eq!(b.header().unwrap().revision(), 8, "the revision counter");
    let kvs = |r: &etcd_client::GetResponse| {
        r.kvs()
            .iter()
            .map(|kv| {
                (
                    kv.key().to_vec(),
                    kv.value().to_vec(),
                    kv.create_revision(),
                    kv.mod_revision(),
                    kv.version(),
                    kv.lease(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(kvs(&a), kvs(&b));
    assert_eq!(
        client.hash_kv(0).await.unwrap().hash(),
        copy.hash_kv(0).await.unwrap().hash()
    );
    assert_eq!(copy.hash_kv(0).await.unwrap().compact_version(), 4);
    // History from the compaction revision on.
    let then = copy
        .get("c", Some(GetOptions::new().with_revision(7)))
        .await
        .expect("get at 7");
    assert_eq!(then.kvs()[0].value(), b"x");
    assert_status(
        copy.get("a", Some(GetOptions::new().with_revision(3)))
            .await,
        Code::OutOfRange,
        COMPACTED,
    );
    // The lease, with its granted TTL, still owns its key.
    let leases = copy.leases().await.expect("leases");
    assert_eq!(
        leases.leases().iter().map(|l| l.id()).collect::<Vec<_>>(),
        vec![lease]
    );
    copy.lease_revoke(lease).await.expect("revoke");
    assert_eq!(copy.get("leased", None).await.unwrap().count(), 0);
    assert_eq!(copy.user_list().await.expect("users").users(), ["dave"]);
    assert_eq!(copy.user_get("dave").await.expect("dave").roles(), ["ops"]);
    // Writes continue from the restored revision.
    let put = copy.put("d", "1", None).await.expect("put");
    assert_eq!(put.header().unwrap().revision(), 10);
}
compat_test!(restore_round_trip, keywatch_only);
