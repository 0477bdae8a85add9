//! The mirror's connection to etcd: TLS (a CA bundle, a client certificate) and etcd
//! authentication (a user's password, exchanged for a token, or a token given as is).
//!
//! etcd reads the token from the `token` request metadata; [`TokenInterceptor`] adds the
//! current one to every upstream request. A password's token is fetched at the start of each
//! upstream session, renewed every [`TOKEN_REFRESH`] (etcd's simple tokens expire
//! `--auth-token-ttl`, default 300 s, after their last use; JWT ones at their `exp`), and
//! fetched again when etcd answers `invalid auth token` (the failed call is retried once with
//! it, [`is_invalid_token`]).

use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use watch_proto::etcdserverpb as pb;
use watch_proto::etcdserverpb::auth_client::AuthClient;

/// How often a password's token is renewed while the mirror runs: below etcd's default
/// token TTL (300 s) with room for a slow `Authenticate` (bcrypt on etcd's side). A shorter
/// upstream TTL is covered by the renewal on `invalid auth token`.
pub const TOKEN_REFRESH: Duration = Duration::from_secs(60);

/// TLS towards the upstream (https endpoints).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct UpstreamTls {
    /// CA bundle (PEM) the upstream's server certificates must chain to. Required for an
    /// https endpoint: the system's roots are not loaded.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and its private key (PEM), for an etcd with `--client-cert-auth`.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl UpstreamTls {
    /// TLS trusting `ca_pem`, without a client certificate.
    pub fn new(ca_pem: Vec<u8>) -> Self {
        Self {
            ca_pem: Some(ca_pem),
            identity: None,
        }
    }

    /// Adds a client certificate and key (PEM).
    pub fn with_identity(mut self, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Self {
        self.identity = Some((cert_pem, key_pem));
        self
    }
}

/// etcd credentials of the mirror.
#[derive(Clone)]
#[non_exhaustive]
pub enum UpstreamAuth {
    /// A user and password, exchanged for a token (`Auth.Authenticate`) and renewed.
    Password {
        /// The etcd user.
        user: String,
        /// Its password.
        password: String,
    },
    /// A token used as is (never renewed: once etcd refuses it, calls fail with etcd's
    /// `invalid auth token` until the mirror restarts with a new one).
    Token(String),
}

impl std::fmt::Debug for UpstreamAuth {
    // The password and token stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAuth::Password { user, .. } => f
                .debug_struct("Password")
                .field("user", user)
                .finish_non_exhaustive(),
            UpstreamAuth::Token(_) => f.write_str("Token(..)"),
        }
    }
}

/// The token in use, shared by every upstream client; `None` without credentials (or before
/// the first `Authenticate`).
#[derive(Debug, Clone, Default)]
pub struct TokenInterceptor(Arc<parking_lot::RwLock<Option<MetadataValue<Ascii>>>>);

impl TokenInterceptor {
    fn set(&self, token: &str) -> Result<(), String> {
        let value = MetadataValue::try_from(token)
            .map_err(|_| "the upstream token is not printable ASCII".to_owned())?;
        *self.0.write() = Some(value);
        Ok(())
    }
}

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = self.0.read().clone() {
            req.metadata_mut().insert("token", token);
        }
        Ok(req)
    }
}

/// A channel to one upstream endpoint carrying the mirror's token.
pub type UpstreamChannel = InterceptedService<Channel, TokenInterceptor>;

/// The mirror's credentials and current token.
#[derive(Debug, Default)]
pub(crate) struct Credentials {
    auth: Option<UpstreamAuth>,
    token: TokenInterceptor,
}

impl Credentials {
    /// Credentials for `auth`; a given token is installed at once.
    pub(crate) fn new(auth: Option<UpstreamAuth>) -> Result<Self, String> {
        let token = TokenInterceptor::default();
        if let Some(UpstreamAuth::Token(t)) = &auth {
            token.set(t)?;
        }
        Ok(Self { auth, token })
    }

    /// `channel` with the token added to every request.
    pub(crate) fn wrap(&self, channel: Channel) -> UpstreamChannel {
        InterceptedService::new(channel, self.token.clone())
    }

    /// True when a password is configured and no token was fetched yet.
    pub(crate) fn needs_token(&self) -> bool {
        self.renewable() && self.token.0.read().is_none()
    }

    /// True when a password's token can be fetched again.
    pub(crate) fn renewable(&self) -> bool {
        matches!(self.auth, Some(UpstreamAuth::Password { .. }))
    }

    /// Fetches a fresh token over `channel` (no-op without a password).
    pub(crate) async fn authenticate(&self, channel: Channel) -> Result<(), tonic::Status> {
        let Some(UpstreamAuth::Password { user, password }) = &self.auth else {
            return Ok(());
        };
        let resp = AuthClient::new(channel)
            .authenticate(pb::AuthenticateRequest {
                name: user.clone(),
                password: password.clone(),
            })
            .await?
            .into_inner();
        self.token
            .set(&resp.token)
            .map_err(tonic::Status::unauthenticated)
    }
}

/// True when etcd refused the request's token (expired, or from before an auth change), so a
/// fresh token may make it pass: etcd's `ErrInvalidAuthToken` and `ErrAuthOldRevision`.
pub(crate) fn is_invalid_token(status: &tonic::Status) -> bool {
    let m = status.message();
    m.contains("invalid auth token") || m.contains("revision of auth store is old")
}

/// Which transport errors let a forwarded call go to the next endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resend {
    /// A read (or the barrier's probe): sending it again changes nothing, so any
    /// `Unavailable` (connect failure, connection lost, etcd's `no leader` or `leader
    /// changed`) sends it to the next endpoint.
    Read,
    /// A write: sent again only when it never left (the connection to the endpoint could not
    /// be made), since a write lost with its connection may have been applied; an etcd that
    /// got it answers, and its answer (error or not) is returned.
    Write,
}

impl Resend {
    /// True when `status` lets the call go to the next endpoint.
    pub(crate) fn allows(self, status: &tonic::Status) -> bool {
        match self {
            Resend::Read => status.code() == tonic::Code::Unavailable,
            Resend::Write => is_unsent(status),
        }
    }
}

/// True when the request never reached an endpoint: the channel could not connect (tonic
/// reports it as `Unavailable` from a `ConnectError`, "tcp connect error" and the OS error).
pub(crate) fn is_unsent(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut chain: Vec<String> = vec![status.message().to_owned()];
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        chain.push(e.to_string());
        source = e.source();
    }
    chain.iter().any(|m| {
        m.contains("tcp connect error")
            || m.contains("error trying to connect")
            || m.contains("Connection refused")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call to a port nobody listens on never left: both kinds may be resent. An answer
    /// from etcd is never resent as a write.
    #[tokio::test]
    async fn refused_connections_are_unsent() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        }; // closed again here: connecting is refused
        let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("url")
            .connect_lazy();
        let err = watch_proto::etcdserverpb::kv_client::KvClient::new(ch)
            .put(pb::PutRequest::default())
            .await
            .expect_err("nothing listens");
        assert!(is_unsent(&err), "{err:?}");
        assert!(Resend::Write.allows(&err) && Resend::Read.allows(&err));
        let answered = tonic::Status::unavailable("etcdserver: request timed out");
        assert!(!Resend::Write.allows(&answered));
        assert!(Resend::Read.allows(&answered));
        assert!(!Resend::Read.allows(&tonic::Status::invalid_argument("x")));
    }
}
