//! watch-proto's integration tests in one binary, a module per area (one link instead of
//! two): `engine` (an engine batch as the WatchResponse a client receives) and `wire`
//! (encodings, field numbers and service names as etcd's).

mod engine;
mod wire;
