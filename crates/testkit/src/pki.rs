//! [`Pki`]: a throwaway certificate authority with a server and a client certificate, for
//! TLS clusters, proxies and servers started by the kit.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair,
};
use tempfile::TempDir;

use crate::Error;

/// PEM files in a temporary directory (removed on drop): `ca.pem`; `server.pem` and
/// `server.key`, valid for `127.0.0.1` and `localhost`; `client.pem` and `client.key`, a
/// client certificate **without a common name** (etcd's grpc-proxy refuses one that has it,
/// since etcd would take the name for a user).
///
/// ```
/// let pki = testkit::Pki::new()?;
/// assert!(std::fs::read_to_string(pki.path("ca.pem"))?.contains("BEGIN CERTIFICATE"));
/// let tls = testkit::EtcdTls::new(pki.path("ca.pem"), pki.path("server.pem"), pki.path("server.key"))
///     .client_cert_auth(pki.path("client.pem"), pki.path("client.key"));
/// # let _ = tls;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Pki {
    dir: TempDir,
}

fn pki_err(e: impl std::fmt::Display) -> Error {
    Error::Io {
        what: "generate test certificates".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

impl Pki {
    /// Generates the CA and both certificates and writes them. Blocking (key generation).
    pub fn new() -> Result<Pki, Error> {
        let dir = tempfile::Builder::new()
            .prefix("testkit-pki-")
            .tempdir()
            .map_err(|source| Error::Io {
                what: "create a temporary certificate directory".into(),
                source,
            })?;
        let ca_key = KeyPair::generate().map_err(pki_err)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(pki_err)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "keywatch testkit CA");
        let ca_pem = ca.self_signed(&ca_key).map_err(pki_err)?.pem();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |names: &[&str], cn: Option<&str>, usage| -> Result<(String, String), Error> {
            let key = KeyPair::generate().map_err(pki_err)?;
            let mut p =
                CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .map_err(pki_err)?;
            // rcgen puts a default common name: none unless asked for.
            p.distinguished_name = DistinguishedName::new();
            if let Some(cn) = cn {
                p.distinguished_name.push(DnType::CommonName, cn);
            }
            p.extended_key_usages = vec![usage];
            let cert = p.signed_by(&key, &issuer).map_err(pki_err)?.pem();
            Ok((cert, key.serialize_pem()))
        };
        let server = leaf(
            &["127.0.0.1", "localhost"],
            Some("127.0.0.1"),
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let client = leaf(&["client"], None, ExtendedKeyUsagePurpose::ClientAuth)?;
        let pki = Pki { dir };
        for (name, text) in [
            ("ca.pem", &ca_pem),
            ("server.pem", &server.0),
            ("server.key", &server.1),
            ("client.pem", &client.0),
            ("client.key", &client.1),
        ] {
            let path = pki.path(name);
            std::fs::write(&path, text).map_err(|source| Error::Io {
                what: format!("write {}", path.display()),
                source,
            })?;
        }
        Ok(pki)
    }

    /// The file `name` (`ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
