//! Cost of the per-request permission check (`watch_server::auth::Gate`): auth off (one branch,
//! the request's metadata is not read) and auth on (token lookup + interval cover test) for a
//! user whose roles grant `grants` disjoint prefixes, on a Range of one key.
//!
//! Run: `cargo bench -p keywatch-benches --bench auth_check`.

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tonic::Request;
use watch_proto::etcdserverpb as pb;
use watch_server::auth::{Auth, AuthFileConfig, AuthSettings, DEFAULT_TOKEN_TTL, Gate, Perm};

/// Runs `gate`'s checks for one Range request, as the KV service does.
fn check(gate: &Gate, request: &Request<pb::RangeRequest>) -> bool {
    match gate.caller(request) {
        Ok(None) => true,
        Ok(Some(caller)) => {
            let r = request.get_ref();
            caller.check(Perm::Read, &r.key, &r.range_end).is_ok()
        }
        Err(_) => false,
    }
}

fn gate_check(c: &mut Criterion) {
    let mut group = c.benchmark_group("auth_check");
    let key = "/p00042/key";
    let off = Request::new(pb::RangeRequest {
        key: key.into(),
        ..Default::default()
    });
    group.bench_function("off", |b| {
        let gate = Gate::off();
        b.iter(|| assert!(check(&gate, std::hint::black_box(&off))));
    });
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let hash = watch_server::auth::hash_password("pw", 4).expect("hash");
    for grants in [1usize, 100, 10_000] {
        let permissions: Vec<String> = (0..grants)
            .map(|i| format!("{{ type = \"read\", prefix = \"/p{i:05}/\" }}"))
            .collect();
        let text = format!(
            "[users.u]\npassword_hash = \"{hash}\"\nroles = [\"r\"]\n[roles.r]\npermissions = [{}]\n",
            permissions.join(", ")
        );
        let file: AuthFileConfig = toml::from_str(&text).expect("auth config");
        let settings = AuthSettings::from_file(&file, DEFAULT_TOKEN_TTL).expect("settings");
        let auth = Arc::new(Auth::new(&settings));
        let token = rt.block_on(auth.authenticate("u", "pw")).expect("token");
        let gate = Gate::on(auth);
        // The granted key of the smallest grant set: `/p00000/`.
        let key = if grants == 1 { "/p00000/key" } else { key };
        let mut request = Request::new(pb::RangeRequest {
            key: key.into(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("token", token.parse().expect("ASCII token"));
        group.bench_with_input(BenchmarkId::new("on", grants), &request, |b, request| {
            b.iter(|| assert!(check(&gate, std::hint::black_box(request))));
        });
    }
    group.finish();
}

// In a private module so the generated `pub fn` needs no doc.
mod harness {
    use super::*;

    criterion_group!(benches, gate_check);
}
criterion_main!(harness::benches);
