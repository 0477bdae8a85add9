//! Generates the etcd v3 wire types and tonic services from `proto/` at the workspace root.
//!
//! The `.proto` files are parsed by `protox`, a pure-Rust protobuf compiler, so neither a
//! developer machine nor CI needs `protoc`. The resulting descriptor set is both handed to
//! `tonic-prost-build` for code generation and written to `OUT_DIR` so the crate can expose it
//! (for gRPC reflection), and `pbjson-build` generates serde impls from the same descriptors
//! (for the HTTP/JSON gateway).

use std::error::Error;
use std::path::PathBuf;

/// The proto files compiled, relative to the proto root. Imports are resolved from the root.
const PROTOS: [&str; 5] = [
    "etcdserverpb/rpc.proto",
    "mvccpb/kv.proto",
    "authpb/auth.proto",
    "v3lockpb/v3lock.proto",
    "v3electionpb/v3election.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let proto_root = manifest_dir.join("../../proto");

    // Any edit under proto/ (including a new file) reruns generation; nothing else does.
    println!("cargo:rerun-if-changed={}", proto_root.display());
    for proto in PROTOS {
        println!(
            "cargo:rerun-if-changed={}",
            proto_root.join(proto).display()
        );
    }

    let fds = protox::compile(PROTOS, [&proto_root])?;
    let encoded = prost::Message::encode_to_vec(&fds);
    std::fs::write(out_dir.join("etcd_descriptor_set.bin"), &encoded)?;

    // serde impls for the same messages, in protobuf's canonical JSON as etcd's grpc-gateway
    // (jsonpb with `OrigName: true`) writes it: field names as written in the .proto
    // (`cluster_id`, `dbSize`), 64-bit integers as strings, bytes as standard base64, enums by
    // name, default values left out. Input also takes lowerCamelCase names, numbers for
    // 64-bit integers and enums, and ignores unknown fields, as jsonpb does.
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .out_dir(&out_dir)
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&[
            ".etcdserverpb",
            ".mvccpb",
            ".authpb",
            ".v3lockpb",
            ".v3electionpb",
        ])?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .out_dir(&out_dir)
        // Payloads (keys, values, range ends) become `bytes::Bytes`, so events fan out to many
        // watchers by reference count instead of by copy.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
