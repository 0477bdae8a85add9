//! Black-box compatibility suite, end to end through `etcdctl` (API v3): the printed output of
//! put/get/del/txn/compaction/watch must be byte-for-byte what etcd itself makes etcdctl print.
//! Each expected transcript below passes against a real etcd; keywatch must produce the same.

use crate::common::{Server, compat_test};

/// etcdctl's `-w fields` output without the lines that name the cluster, member and raft term,
/// which legitimately differ between servers.
fn portable_fields(out: &str) -> String {
    out.lines()
        .filter(|l| {
            !["\"ClusterID\"", "\"MemberID\"", "\"RaftTerm\""]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Runs a failing etcdctl command and returns its stderr, checking the exit code.
fn etcdctl_fails(server: &Server, args: &[&str], code: i32) -> String {
    let out = server.etcdctl_output(args, "");
    assert_eq!(out.status.code(), Some(code), "etcdctl {args:?}: {out:?}");
    String::from_utf8(out.stderr).expect("UTF-8 stderr")
}

// [tests/e2e/ctl_v3_kv_test.go] put, get (key, prefix, keys-only, fields), del, compaction and
// the errors etcdctl prints for a compacted revision and an empty key.
async fn etcdctl_put_get_del(server: Server) {
    if !server.has_etcdctl() {
        return;
    }
    let ctl = |args: &[&str]| server.etcdctl(args);
    assert_eq!(ctl(&["put", "foo", "bar"]), "OK\n");
    assert_eq!(ctl(&["put", "foo2", "baz"]), "OK\n");
    assert_eq!(ctl(&["get", "foo"]), "foo\nbar\n");
    assert_eq!(ctl(&["get", "foo", "--prefix"]), "foo\nbar\nfoo2\nbaz\n");
    assert_eq!(
        ctl(&["get", "foo", "--prefix", "--keys-only"]),
        "foo\n\nfoo2\n\n"
    );
    assert_eq!(
        ctl(&["get", "foo", "--prefix", "--print-value-only"]),
        "bar\nbaz\n"
    );
    assert_eq!(ctl(&["get", "nope"]), "");
    assert_eq!(
        portable_fields(&ctl(&["get", "foo", "-w", "fields"])),
        concat!(
            "\"Revision\" : 3\n",
            "\"Key\" : \"foo\"\n",
            "\"CreateRevision\" : 2\n",
            "\"ModRevision\" : 2\n",
            "\"Version\" : 1\n",
            "\"Value\" : \"bar\"\n",
            "\"Lease\" : 0\n",
            "\"More\" : false\n",
            "\"Count\" : 1\n",
        )
    );
    assert_eq!(ctl(&["put", "foo", "bar2"]), "OK\n"); // 4
    assert_eq!(ctl(&["del", "nope"]), "0\n");
    assert_eq!(ctl(&["del", "foo2"]), "1\n"); // 5
    assert_eq!(ctl(&["get", "", "--from-key"]), "foo\nbar2\n");
    assert_eq!(ctl(&["get", "foo", "--rev", "3"]), "foo\nbar\n");
    assert_eq!(ctl(&["compaction", "4"]), "compacted revision 4\n");
    assert_eq!(ctl(&["del", "foo", "--prefix"]), "1\n"); // 6
    assert_eq!(ctl(&["get", "", "--from-key"]), "");

    // etcdctl maps the server's message back to its typed error before printing it.
    let err = etcdctl_fails(&server, &["get", "foo", "--rev", "3"], 1);
    assert!(
        err.contains("Error: etcdserver: mvcc: required revision has been compacted"),
        "{err}"
    );
    let err = etcdctl_fails(&server, &["get", "foo", "--rev", "7"], 1);
    assert!(
        err.contains("Error: etcdserver: mvcc: required revision is a future revision"),
        "{err}"
    );
    let err = etcdctl_fails(&server, &["put", "", "x"], 1);
    assert!(
        err.contains("Error: etcdserver: key is not provided"),
        "{err}"
    );
}
compat_test!(etcdctl_put_get_del);

// `etcdctl txn` in its stdin format: compares, blank line, success ops, blank line, failure ops.
async fn etcdctl_txn(server: Server) {
    if !server.has_etcdctl() {
        return;
    }
    assert_eq!(server.etcdctl(&["put", "foo", "bar"]), "OK\n");
    let run = |script: &str| {
        let out = server.etcdctl_output(&["txn"], script);
        assert!(out.status.success(), "etcdctl txn: {out:?}");
        String::from_utf8(out.stdout).expect("UTF-8 stdout")
    };
    assert_eq!(
        run("value(\"foo\") = \"bar\"\n\nput foo x\n\nget foo\n\n"),
        "SUCCESS\n\nOK\n"
    );
    assert_eq!(
        run("value(\"foo\") = \"bar\"\n\nput foo y\n\nget foo\n\n"),
        "FAILURE\n\nfoo\nx\n"
    );
    assert_eq!(
        run("mod(\"absent\") = \"0\"\n\nput absent 1\n\n\n"),
        "SUCCESS\n\nOK\n"
    );
    assert_eq!(server.etcdctl(&["get", "absent"]), "absent\n1\n");
}
compat_test!(etcdctl_txn);

// [tests/e2e/ctl_v3_watch_test.go] `etcdctl watch --prefix --rev 1 --prev-kv`: history replay,
// then live events, three lines per event (type, key, value) with the previous kv first; and a
// watch from a compacted revision ends with etcdctl's compaction message and exit code 5.
async fn etcdctl_watch(server: Server) {
    if !server.has_etcdctl() {
        return;
    }
    let ctl = |args: &[&str]| server.etcdctl(args);
    ctl(&["put", "w/a", "1"]); // 2
    ctl(&["put", "w/a", "2"]); // 3
    ctl(&["put", "w/b", "x"]); // 4
    ctl(&["del", "w/a"]); // 5
    ctl(&["put", "other", "y"]); // 6

    let mut watch = server.etcdctl_spawn(&["watch", "--prefix", "w/", "--rev", "1", "--prev-kv"]);
    assert_eq!(
        watch.lines(16),
        [
            "PUT", "w/a", "1", //
            "PUT", "w/a", "1", "w/a", "2", //
            "PUT", "w/b", "x", //
            "DELETE", "w/a", "2", "w/a", "",
        ]
    );
    ctl(&["put", "w/c", "z"]);
    ctl(&["put", "w/b", "y"]);
    ctl(&["put", "other", "not watched"]);
    ctl(&["del", "w/", "--prefix"]);
    assert_eq!(
        watch.lines(18),
        [
            "PUT", "w/c", "z", //
            "PUT", "w/b", "x", "w/b", "y", //
            // One txn-like delete of two keys: both events, in key order.
            "DELETE", "w/b", "y", "w/b", "", //
            "DELETE", "w/c", "z", "w/c", "",
        ]
    );
    drop(watch);

    ctl(&["compaction", "5"]);
    let err = etcdctl_fails(&server, &["watch", "w/a", "--rev", "2"], 5);
    assert!(
        err.contains("watch was canceled (etcdserver: mvcc: required revision has been compacted)"),
        "{err}"
    );
}
compat_test!(etcdctl_watch);
