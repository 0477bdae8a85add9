//! watch-server: keywatch's etcd v3 compatible KV + watch server, and the embeddable store the
//! gRPC services wrap.
