//! watch-server's integration tests, one binary with a module per area (as rust-analyzer
//! does): one link instead of one per file, and fixtures compiled once as a normal module.
//!
//! - `common`: the `compat_test!` harness (every case against keywatch and a real etcd) and
//!   the values the cases compare; processes come from `testkit`.
//! - `compat*`: black-box compatibility with etcd 3.4 (KV, watch, leases, auth and its
//!   runtime management, Lock and Election, maintenance and the space quota, etcdctl).
//! - `gateway`: the HTTP/JSON gateway, differentially against etcd, and the `etcd3gw` client.
//! - `mirror`: mirror mode against a real 3-member etcd cluster.
//! - `ops`: metrics, health, reflection, signals and shutdown of the binary.
//! - `watch_stream`: the in-process watch stream (the store's own tests are kv-store's).
//! - `tls`: TLS and mutual TLS end to end.
//!
//! `cargo test -p watch-server --test it compat::` runs one area; `::etcd` one side of every
//! compat case. Tests needing etcd print a `SKIPPED` line without it, and fail when
//! `KEYWATCH_REQUIRE_ETCD=1`.

mod common;

mod compat;
mod compat_auth;
mod compat_auth_mgmt;
mod compat_concurrency;
mod compat_etcdctl;
mod compat_kv;
mod compat_lease;
mod compat_maintenance;
mod gateway;
mod mirror;
mod ops;
mod tls;
mod watch_stream;
