//! TLS and mutual TLS for the client listener (rustls, the ring provider tonic also uses),
//! configured with etcd's flag names: `--cert-file`, `--key-file`, `--trusted-ca-file`,
//! `--client-cert-auth`.
//!
//! The server offers ALPN `h2` and `http/1.1`, so gRPC clients get HTTP/2 and the HTTP/JSON
//! gateway's HTTP/1.1-only clients can connect too (tonic's own TLS offers `h2` only, which
//! makes rustls refuse a client that offers only `http/1.1`). Handshakes run concurrently,
//! each bounded by `--tls-handshake-timeout` ([`accept`]).
//!
//! - cert + key: clients connect with `https://` and verify the server against their CA.
//! - plus `--client-cert-auth` and `--trusted-ca-file`: every client must present a
//!   certificate signed by that CA, or the handshake fails (etcd's `RequireAndVerifyClientCert`).
//! - `--trusted-ca-file` without `--client-cert-auth` asks for no client certificate (as etcd).
//!
//! Everything is read and parsed when the configuration is loaded ([`TlsSettings::load`]), so a
//! missing file, a key without a certificate or a malformed PEM stops the server before it
//! binds anything.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config_error::ConfigError;

/// Default of `--tls-handshake-timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Loaded TLS material.
#[derive(Clone)]
pub struct TlsSettings {
    /// A connection that has not finished its handshake by then is closed, so clients that
    /// connect and stall cannot pile up.
    handshake_timeout: Duration,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    /// PEM of the CA that client certificates must chain to; `Some` only with client cert auth.
    client_ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("client_cert_auth", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

fn invalid(field: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { field, message }
}

/// Reads a PEM file and checks it holds at least one block whose label ends with `label`.
fn read_pem(field: &'static str, path: &Path, label: &str) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|e| invalid(field, format!("reading {}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text.lines().any(|l| {
        l.strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    });
    if !found {
        return Err(invalid(
            field,
            format!("{} holds no PEM \"{label}\" block", path.display()),
        ));
    }
    Ok(bytes)
}

impl TlsSettings {
    /// Validates and reads the TLS flags. `Ok(None)`: plain TCP (no flag given).
    pub fn load(
        cert_file: Option<&PathBuf>,
        key_file: Option<&PathBuf>,
        trusted_ca_file: Option<&PathBuf>,
        client_cert_auth: bool,
        handshake_timeout: Duration,
    ) -> Result<Option<TlsSettings>, ConfigError> {
        if handshake_timeout.is_zero() {
            return Err(invalid(
                "tls_handshake_timeout",
                "must be at least 1ms".to_owned(),
            ));
        }
        let (cert_file, key_file) = match (cert_file, key_file) {
            (None, None) => {
                if client_cert_auth || trusted_ca_file.is_some() {
                    return Err(invalid(
                        "client_cert_auth",
                        "client certificates need TLS: give cert_file and key_file too".to_owned(),
                    ));
                }
                return Ok(None);
            }
            (Some(_), None) => {
                return Err(invalid(
                    "key_file",
                    "cert_file is set but key_file is not".to_owned(),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "cert_file",
                    "key_file is set but cert_file is not".to_owned(),
                ));
            }
            (Some(c), Some(k)) => (c, k),
        };
        let cert_pem = read_pem("cert_file", cert_file, "CERTIFICATE")?;
        let key_pem = read_pem("key_file", key_file, "PRIVATE KEY")?;
        let client_ca_pem = match (trusted_ca_file, client_cert_auth) {
            (Some(ca), true) => Some(read_pem("trusted_ca_file", ca, "CERTIFICATE")?),
            (None, true) => {
                return Err(invalid(
                    "client_cert_auth",
                    "client_cert_auth needs trusted_ca_file (the CA client certificates must chain to)"
                        .to_owned(),
                ));
            }
            // As etcd: a CA without client cert auth requests no client certificate; the file
            // is still checked, so a typo is found now rather than when auth is turned on.
            (Some(ca), false) => {
                read_pem("trusted_ca_file", ca, "CERTIFICATE")?;
                None
            }
            (None, false) => None,
        };
        let settings = TlsSettings {
            handshake_timeout,
            cert_pem,
            key_pem,
            client_ca_pem,
        };
        // Builds the rustls config the server will use, so what the PEM check above cannot see
        // (a malformed block, an unsupported key) is also reported now.
        settings.rustls_config().map_err(|e| {
            invalid(
                "cert_file",
                format!(
                    "{} / {}: {}",
                    cert_file.display(),
                    key_file.display(),
                    error_chain(&e)
                ),
            )
        })?;
        Ok(Some(settings))
    }

    /// True when clients must present a certificate.
    pub fn client_cert_auth(&self) -> bool {
        self.client_ca_pem.is_some()
    }

    /// The rustls server configuration: the identity, client certificate verification when
    /// asked for, ALPN `h2` then `http/1.1`.
    pub fn rustls_config(&self) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let pem_err = |e: rustls::pki_types::pem::Error| rustls::Error::General(e.to_string());
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(pem_err)?;
        let builder = rustls::ServerConfig::builder();
        let builder = match &self.client_ca_pem {
            // With a client CA, a client certificate chaining to it is required and verified.
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    roots.add(cert.map_err(pem_err)?)?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(roots.into())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The handshake timeout (`--tls-handshake-timeout`).
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }
}

/// TLS over the accepted connections of `tcp`: each handshake runs as a task of its own,
/// bounded by `timeout`, so a stalled client holds up no other; a failed or timed-out
/// handshake closes that connection (logged at debug) and the stream goes on. Accept errors
/// pass through. Dropping the stream aborts the handshakes in flight.
pub(crate) fn accept<S, IO, E>(
    tcp: S,
    config: Arc<rustls::ServerConfig>,
    timeout: Duration,
) -> impl Stream<Item = Result<tokio_rustls::server::TlsStream<IO>, E>> + Send + 'static
where
    S: Stream<Item = Result<IO, E>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let state = (Box::pin(tcp), tokio::task::JoinSet::new(), false);
    futures_util::stream::unfold(state, move |(mut tcp, mut handshakes, mut closed)| {
        let acceptor = acceptor.clone();
        async move {
            loop {
                if closed && handshakes.is_empty() {
                    return None;
                }
                tokio::select! {
                    conn = tcp.next(), if !closed => match conn {
                        Some(Ok(io)) => {
                            let accepting = acceptor.accept(io);
                            handshakes.spawn(tokio::time::timeout(timeout, accepting));
                        }
                        Some(Err(e)) => return Some((Err(e), (tcp, handshakes, closed))),
                        None => closed = true,
                    },
                    Some(done) = handshakes.join_next(), if !handshakes.is_empty() => match done {
                        Ok(Ok(Ok(tls))) => return Some((Ok(tls), (tcp, handshakes, closed))),
                        Ok(Ok(Err(e))) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Ok(Err(_)) => tracing::debug!(?timeout, "TLS handshake timed out"),
                        Err(e) => tracing::debug!(error = %e, "TLS handshake task failed"),
                    },
                }
            }
        }
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Validates and reads the mirror's upstream TLS flags (`--upstream-cacert`,
/// `--upstream-cert`, `--upstream-key`). `Ok(None)`: none given (plain http upstream).
pub fn load_upstream(
    cacert: Option<&PathBuf>,
    cert: Option<&PathBuf>,
    key: Option<&PathBuf>,
) -> Result<Option<crate::mirror::UpstreamTls>, ConfigError> {
    let ca_pem = cacert
        .map(|p| read_pem("upstream_cacert", p, "CERTIFICATE"))
        .transpose()?;
    let identity = match (cert, key) {
        (None, None) => None,
        (Some(c), Some(k)) => Some((
            read_pem("upstream_cert", c, "CERTIFICATE")?,
            read_pem("upstream_key", k, "PRIVATE KEY")?,
        )),
        (Some(_), None) => {
            return Err(invalid(
                "upstream_key",
                "--upstream-cert needs --upstream-key".to_owned(),
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "upstream_cert",
                "--upstream-key needs --upstream-cert".to_owned(),
            ));
        }
    };
    let Some(ca_pem) = ca_pem else {
        if identity.is_some() {
            return Err(invalid(
                "upstream_cacert",
                "a client certificate needs --upstream-cacert (the system's roots are not \
                 loaded)"
                    .to_owned(),
            ));
        }
        return Ok(None);
    };
    let mut tls = crate::mirror::UpstreamTls::new(ca_pem);
    if let Some((c, k)) = identity {
        tls = tls.with_identity(c, k);
    }
    Ok(Some(tls))
}
