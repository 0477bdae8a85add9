//! TLS and mutual TLS, end to end: a throwaway CA, server and client certificates (rcgen), the
//! `watch-server` binary configured by flags, environment variables and the config file, and
//! clients that must be accepted or refused: watch-proto's tonic clients and etcdctl.

use std::path::PathBuf;
use std::process::Command;

use crate::common::{Server, Target};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tempfile::TempDir;
use testkit::ServerProcess;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use watch_proto::etcdserverpb as pb;

/// A CA with a server certificate (for 127.0.0.1 and localhost) and a client certificate, plus
/// a client certificate from a second, untrusted CA. PEM files in a temp dir (`ca.pem`,
/// `server.pem`/`server.key`, `client.pem`/`client.key`); the mirror tests use them for etcd.
pub(crate) struct Pki {
    dir: TempDir,
    ca_pem: String,
    client: (String, String),
    stranger: (String, String),
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("self-sign the CA");
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().expect("leaf key");
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).expect("sign the leaf");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    pub(crate) fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir for certificates");
        let (ca_pem, issuer) = ca("keywatch test CA");
        let server = leaf(
            &issuer,
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = leaf(&issuer, &["client"], ExtendedKeyUsagePurpose::ClientAuth);
        let (_, other) = ca("untrusted CA");
        let stranger = leaf(&other, &["stranger"], ExtendedKeyUsagePurpose::ClientAuth);
        let pki = Pki {
            dir,
            ca_pem,
            client,
            stranger,
        };
        pki.write("ca.pem", &pki.ca_pem);
        pki.write("server.pem", &server.0);
        pki.write("server.key", &server.1);
        pki.write("client.pem", &pki.client.0);
        pki.write("client.key", &pki.client.1);
        pki
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text).expect("write a PEM file");
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// keywatch with the server certificate by flags (no client certificates asked for).
fn start_tls(pki: &Pki, name: &str) -> Server {
    tokio::task::block_in_place(|| {
        Server::start_with(
            Target::Keywatch,
            name,
            &[
                "--cert-file",
                &pki.arg("server.pem"),
                "--key-file",
                &pki.arg("server.key"),
            ],
        )
    })
}

/// `host:port` of a started server.
fn addr(server: &Server) -> String {
    let endpoint = server.endpoint();
    endpoint
        .strip_prefix("https://")
        .or_else(|| endpoint.strip_prefix("http://"))
        .expect("a URL endpoint")
        .to_owned()
}

/// Connects over TLS trusting `ca_pem`, optionally with a client certificate, then puts and
/// reads back a key. Any failure (handshake or call) comes back as its text.
async fn put_get(
    addr: &str,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(crate::common::GUARD)
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    round_trip(channel).await
}

async fn round_trip(channel: Channel) -> Result<(), String> {
    let mut kv = pb::kv_client::KvClient::new(channel);
    kv.put(pb::PutRequest {
        key: "tls-key".into(),
        value: "tls-value".into(),
        ..Default::default()
    })
    .await
    .map_err(|e| format!("put: {e}"))?;
    let got = kv
        .range(pb::RangeRequest {
            key: "tls-key".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("range: {e}"))?
        .into_inner();
    assert_eq!(got.kvs.len(), 1);
    assert_eq!(&got.kvs[0].value[..], b"tls-value");
    Ok(())
}

async fn plaintext(addr: &str) -> Result<(), String> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(crate::common::GUARD)
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    round_trip(channel).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_by_flags_serves_https_only() {
    let pki = Pki::new();
    let server = start_tls(&pki, "tls_by_flags");
    let addr = addr(&server);
    put_get(&addr, &pki.ca_pem, None)
        .await
        .expect("a client trusting the CA is served");
    // Without client cert auth a client certificate is not needed, and one is not refused.
    put_get(&addr, &pki.ca_pem, Some(&pki.client))
        .await
        .expect("a client presenting a certificate is served too");
    plaintext(&addr)
        .await
        .expect_err("plaintext gRPC must not be served on a TLS listener");
    // A client that does not trust the server's CA refuses it.
    let (other_ca, _) = ca("another CA");
    put_get(&addr, &other_ca, None)
        .await
        .expect_err("the server's certificate does not chain to this CA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_from_config_file_requires_a_trusted_client_certificate() {
    let pki = Pki::new();
    let config = pki.path("keywatch.toml");
    std::fs::write(
        &config,
        format!(
            "cert_file = {:?}\nkey_file = {:?}\ntrusted_ca_file = {:?}\nclient_cert_auth = true\n",
            pki.arg("server.pem"),
            pki.arg("server.key"),
            pki.arg("ca.pem")
        ),
    )
    .unwrap();
    let server = tokio::task::block_in_place(|| {
        Server::start_with(
            Target::Keywatch,
            "mtls_from_config_file",
            &["--config", &config.display().to_string()],
        )
    });
    // The harness sees TLS set in the config file too (its endpoint is what clients dial).
    assert!(
        server.endpoint().starts_with("https://"),
        "{}",
        server.endpoint()
    );
    let addr = addr(&server);
    put_get(&addr, &pki.ca_pem, Some(&pki.client))
        .await
        .expect("a client with a certificate from the trusted CA is served");
    let err = put_get(&addr, &pki.ca_pem, None)
        .await
        .expect_err("a client without a certificate must be refused");
    println!("without a client certificate: {err}");
    let err = put_get(&addr, &pki.ca_pem, Some(&pki.stranger))
        .await
        .expect_err("a client certificate from another CA must be refused");
    println!("with an untrusted client certificate: {err}");
    plaintext(&addr)
        .await
        .expect_err("plaintext gRPC must not be served on a TLS listener");
}

fn etcdctl(endpoint: &str, tls: &[String], args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint)
        .args(["--dial-timeout", "5s"])
        .args(tls)
        .args(args);
    crate::common::run_guarded(cmd, "", &format!("etcdctl {args:?} on {endpoint}"))
}

/// etcdctl against a server with mutual TLS: the same transcript from keywatch (configured by
/// `KEYWATCH_*` environment variables) and from a real etcd (the same flags as keywatch's).
fn etcdctl_over_mtls(target: Target) {
    let name = format!("etcdctl_over_mtls::{target}");
    let tools: &[&str] = match target {
        Target::Keywatch => &["etcdctl"],
        Target::Etcd => &["etcd", "etcdctl"],
    };
    if !testkit::tools_present(&name, tools, "etcd/etcdctl") {
        return;
    }
    let pki = Pki::new();
    let server = match target {
        // The TLS settings come from KEYWATCH_* variables of the server process only.
        Target::Keywatch => Server::start_with_env(
            target,
            "etcdctl_over_mtls",
            &[],
            &[
                ("KEYWATCH_CERT_FILE", pki.arg("server.pem")),
                ("KEYWATCH_KEY_FILE", pki.arg("server.key")),
                ("KEYWATCH_TRUSTED_CA_FILE", pki.arg("ca.pem")),
                ("KEYWATCH_CLIENT_CERT_AUTH", "true".to_owned()),
            ],
        ),
        Target::Etcd => Server::start_with(
            target,
            "etcdctl_over_mtls",
            &[
                "--cert-file",
                &pki.arg("server.pem"),
                "--key-file",
                &pki.arg("server.key"),
                "--trusted-ca-file",
                &pki.arg("ca.pem"),
                "--client-cert-auth",
            ],
        ),
    };
    let endpoint = format!("https://{}", addr(&server));
    let full = vec![
        format!("--cacert={}", pki.arg("ca.pem")),
        format!("--cert={}", pki.arg("client.pem")),
        format!("--key={}", pki.arg("client.key")),
    ];
    let out = etcdctl(&endpoint, &full, &["put", "greeting", "hello"]);
    assert!(
        out.status.success(),
        "{target}: etcdctl put over mTLS: {out:?}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "OK\n");
    let out = etcdctl(&endpoint, &full, &["get", "greeting"]);
    assert!(
        out.status.success(),
        "{target}: etcdctl get over mTLS: {out:?}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "greeting\nhello\n");

    // Only the CA, no client certificate: refused, nothing printed on stdout.
    let ca_only = vec![format!("--cacert={}", pki.arg("ca.pem"))];
    let out = etcdctl(&endpoint, &ca_only, &["get", "greeting"]);
    assert!(
        !out.status.success(),
        "{target}: etcdctl without a client certificate must fail: {out:?}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    // Plaintext to a TLS listener: refused.
    let plain = format!("http://{}", addr(&server));
    let out = etcdctl(&plain, &[], &["get", "greeting"]);
    assert!(
        !out.status.success(),
        "{target}: plaintext must fail: {out:?}"
    );
}

mod etcdctl_over_mtls {
    #[test]
    fn keywatch() {
        super::etcdctl_over_mtls(super::Target::Keywatch);
    }
    #[test]
    fn etcd() {
        super::etcdctl_over_mtls(super::Target::Etcd);
    }
}

/// Runs the binary with `args`; it must exit non-zero before binding, saying `expected`.
fn refuses_to_start(args: &[&str], expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = ServerProcess::builder(env!("CARGO_BIN_EXE_watch-server"))
        .data_dir(dir.path())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .run_to_exit()
        .expect("run watch-server");
    let stderr = &out.stderr;
    assert!(!out.status.success(), "{args:?} must fail: {out:?}");
    assert!(
        !out.stdout.contains("listening on"),
        "{args:?} bound a socket: {out:?}"
    );
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
    // Refused before opening the store: nothing was created in the data dir.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn bad_tls_config_is_refused_before_binding() {
    let pki = Pki::new();
    let cert = pki.arg("server.pem");
    let key = pki.arg("server.key");
    let ca = pki.arg("ca.pem");
    refuses_to_start(
        &["--cert-file", &cert],
        "cert_file is set but key_file is not",
    );
    refuses_to_start(
        &["--key-file", &key],
        "key_file is set but cert_file is not",
    );
    refuses_to_start(
        &[
            "--cert-file",
            &cert,
            "--key-file",
            "/nonexistent/server.key",
        ],
        "reading /nonexistent/server.key",
    );
    // A key where the certificate belongs.
    refuses_to_start(
        &["--cert-file", &key, "--key-file", &key],
        "holds no PEM \"CERTIFICATE\" block",
    );
    let garbage = pki.path("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    refuses_to_start(
        &[
            "--cert-file",
            &garbage.display().to_string(),
            "--key-file",
            &key,
        ],
        "invalid cert_file",
    );
    // A key that is not the certificate's.
    let other_key = pki.arg("client.key");
    refuses_to_start(
        &["--cert-file", &cert, "--key-file", &other_key],
        "KeyMismatch",
    );
    refuses_to_start(
        &[
            "--cert-file",
            &cert,
            "--key-file",
            &key,
            "--client-cert-auth",
        ],
        "client_cert_auth needs trusted_ca_file",
    );
    refuses_to_start(
        &["--trusted-ca-file", &ca, "--client-cert-auth"],
        "client certificates need TLS",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_closed() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new();
    let server = tokio::task::block_in_place(|| {
        Server::start_with(
            Target::Keywatch,
            "stalled_handshake",
            &[
                "--cert-file",
                &pki.arg("server.pem"),
                "--key-file",
                &pki.arg("server.key"),
                "--tls-handshake-timeout",
                "200ms",
            ],
        )
    });
    // Connect and never send a ClientHello: the server must close the connection by itself.
    let mut stalled = tokio::net::TcpStream::connect(addr(&server))
        .await
        .expect("TCP connect");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(crate::common::GUARD, stalled.read(&mut buf))
        .await
        .expect("the server closes a stalled handshake (failure guard, not a threshold)");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected EOF or reset, got {read:?}"
    );
    // The server still serves.
    put_get(&addr(&server), &pki.ca_pem, None)
        .await
        .expect("served after closing the stalled connection");
}

/// One JSON gateway request over TLS, with the client offering only `alpn` (an HTTP/1.1-only
/// client such as Python's urllib3, or an HTTP/2 one); the status and body.
async fn gateway_over_tls(
    addr: &str,
    ca_pem: &str,
    alpn: &[u8],
    path: &str,
    body: &str,
) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("add the CA");
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("127.0.0.1".try_into().expect("server name"), tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(alpn),
        "negotiated ALPN"
    );
    let io = hyper_util::rt::TokioIo::new(tls);
    let req = http::Request::builder()
        .method(if body.is_empty() { "GET" } else { "POST" })
        .uri(format!("https://{addr}{path}"))
        .header(http::header::HOST, addr)
        .body(Full::new(bytes::Bytes::from(body.to_owned())))
        .expect("request");
    let resp = if alpn == b"h2" {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        sender.send_request(req).await.expect("h2 answer")
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        sender.send_request(req).await.expect("HTTP/1.1 answer")
    };
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The TLS client port carries gRPC and the JSON gateway side by side, for HTTP/1.1-only and
/// HTTP/2 clients alike (keywatch's TLS offers ALPN `http/1.1` beside `h2`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_and_grpc_share_the_tls_port() {
    let pki = Pki::new();
    let server = start_tls(&pki, "tls_gateway");
    let addr = addr(&server);
    put_get(&addr, &pki.ca_pem, None)
        .await
        .expect("gRPC over TLS");
    let (status, body) = gateway_over_tls(
        &addr,
        &pki.ca_pem,
        b"http/1.1",
        "/v3/kv/put",
        r#"{"key":"Zm9v","value":"YmFy"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = gateway_over_tls(
        &addr,
        &pki.ca_pem,
        b"h2",
        "/v3/kv/range",
        r#"{"key":"Zm9v"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""value":"YmFy""#), "{body}");
    let (status, body) = gateway_over_tls(&addr, &pki.ca_pem, b"http/1.1", "/health", "").await;
    assert_eq!((status, body.as_str()), (200, r#"{"health":"true"}"#));
    // gRPC still works on the same port afterwards.
    put_get(&addr, &pki.ca_pem, None)
        .await
        .expect("gRPC over TLS");
}
