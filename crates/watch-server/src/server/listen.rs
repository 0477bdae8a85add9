//! The client port's accept loop: the total connection limit and the back-off on accept
//! errors (issue 17, item 7).
//!
//! - **Connection limit** (`--max-connections`): each accepted socket takes one permit, held by
//!   the socket until it closes (TLS handshakes in flight included, so the limit bounds file
//!   descriptors). A connection beyond it is accepted and closed at once (counted in
//!   `keywatch_connections_refused`). Closing, not leaving it in the kernel's backlog: the
//!   kernel completes the TCP handshake of a backlogged connection, so its client would wait
//!   on a silent socket until its own timeout; a close tells it now (grpc-go then retries
//!   with its back-off). Each refusal costs one accept and one close for one connection
//!   attempt of the client, so the loop cannot spin on it.
//! - **Accept errors** (EMFILE, ENFILE, ENOBUFS, ENOMEM: out of descriptors or memory): the
//!   pending connection stays in the backlog, so retrying at once fails at once, forever: the
//!   loop used to spin on a core. After an error the loop sleeps 1 ms, doubling up to 1 s,
//!   reset by the next successful accept; each error is counted
//!   (`keywatch_accept_errors`) and logged at warn, at most 10 lines a second. Errors of one
//!   connection (reset or aborted before it was accepted) are counted and skipped without a
//!   pause: the next connection is unaffected.
//!
//! Every accepted connection carries a [`ConnInfo`], which tonic puts into each request's
//! extensions: its peer address and the count of watchers it holds (for
//! `--max-watchers-per-connection`, see [`super::admit::WatchBudget`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::admit::ConnWatchers;
use parking_lot::Mutex;

/// First pause after an accept error.
const BACKOFF_MIN: Duration = Duration::from_millis(1);
/// Longest pause between accept attempts while they fail: one attempt a second costs nothing,
/// and a descriptor freed meanwhile is used within a second.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Client-port connection metrics, recorded by the accept loop, registered by
/// [`super::metrics::Metrics`]. Cheap to
/// clone; `Default` gives unregistered handles.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnMetrics {
    open: Gauge,
    accepted: Counter,
    refused: Counter,
    accept_errors: Counter,
}

impl ConnMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "keywatch_connections",
            "Open client connections (gRPC and HTTP, TLS handshakes included)",
            m.open.clone(),
        );
        registry.register(
            "keywatch_connections_accepted",
            "Client connections accepted within --max-connections",
            m.accepted.clone(),
        );
        registry.register(
            "keywatch_connections_refused",
            "Client connections closed at once because --max-connections were open",
            m.refused.clone(),
        );
        registry.register(
            "keywatch_accept_errors",
            "Failed accepts on the client port (e.g. out of file descriptors), each followed by \
             a back-off pause of 1 ms doubling to 1 s",
            m.accept_errors.clone(),
        );
        m
    }

    pub(crate) fn opened(&self) {
        self.accepted.inc();
        self.open.inc();
    }

    pub(crate) fn closed(&self) {
        self.open.dec();
    }

    pub(crate) fn refused(&self) {
        self.refused.inc();
    }

    pub(crate) fn accept_error(&self) {
        self.accept_errors.inc();
    }

    /// (open, refused, accept errors).
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (i64, u64, u64) {
        (
            self.open.get(),
            self.refused.get(),
            self.accept_errors.get(),
        )
    }
}

/// Lines a [`LogRate`] lets through per second; more go to debug.
pub(crate) const LINES_PER_SECOND: u32 = 10;

/// Rate limit of warn/info lines a client can cause (failed logins, accept errors, refused
/// connections): a one-second window and its count.
#[derive(Debug)]
pub(crate) struct LogRate(Mutex<(Instant, u32)>);

impl Default for LogRate {
    fn default() -> Self {
        LogRate(Mutex::new((Instant::now(), 0)))
    }
}

impl LogRate {
    /// `Some(n)` if this line may be logged at its level, `n` lines having been demoted to
    /// debug since the last one; `None` to log it at debug.
    pub(crate) fn admit(&self, now: Instant) -> Option<u32> {
        let mut w = self.0.lock();
        if now.saturating_duration_since(w.0) >= Duration::from_secs(1) {
            let demoted = w.1.saturating_sub(LINES_PER_SECOND);
            *w = (now, 1);
            return Some(demoted);
        }
        w.1 = w.1.saturating_add(1);
        (w.1 <= LINES_PER_SECOND).then_some(0)
    }
}

/// What the requests of one client connection share (tonic's `ConnectInfo` of the client
/// port: a clone goes into every request's extensions, the HTTP gateway's included).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    tcp: TcpConnectInfo,
    watchers: ConnWatchers,
}

impl ConnInfo {
    /// The client's address.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.tcp.remote_addr()
    }

    /// Watchers held on this connection, over all its streams.
    pub(crate) fn watchers(&self) -> &ConnWatchers {
        &self.watchers
    }
}

/// An accepted client socket within the connection limit; its permit goes back when it is
/// dropped (closed).
pub(crate) struct Accepted {
    tcp: TcpStream,
    info: ConnInfo,
    _slot: ConnSlot,
}

/// One connection's share of `--max-connections`, and its count in `keywatch_connections`.
struct ConnSlot {
    /// Always `Some` until dropped.
    permit: Option<OwnedSemaphorePermit>,
    metrics: ConnMetrics,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        // The permit first: once the gauge shows the connection gone, its slot is free.
        drop(self.permit.take());
        self.metrics.closed();
    }
}

/// The accepted connections of `listener`, at most `max_connections` open at once (see the
/// module docs). Never yields an error: accept errors are counted, logged and waited out here.
pub(crate) fn incoming(
    listener: TcpListener,
    max_connections: usize,
    metrics: ConnMetrics,
) -> impl Stream<Item = io::Result<Accepted>> + Send + 'static {
    let state = Acceptor {
        listener,
        permits: Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS))),
        max_connections,
        metrics,
        backoff: BACKOFF_MIN,
        errors_log: LogRate::default(),
        refused_log: LogRate::default(),
    };
    futures_util::stream::unfold(state, |mut a| async move {
        let next = a.next().await;
        Some((Ok(next), a))
    })
}

struct Acceptor {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    max_connections: usize,
    metrics: ConnMetrics,
    /// The pause after the next accept error.
    backoff: Duration,
    errors_log: LogRate,
    refused_log: LogRate,
}

impl Acceptor {
    async fn next(&mut self) -> Accepted {
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff = BACKOFF_MIN;
                    accepted
                }
                Err(e) => {
                    self.metrics.accept_error();
                    let pause = if connection_error(&e) {
                        None
                    } else {
                        let pause = self.backoff;
                        self.backoff = (pause * 2).min(BACKOFF_MAX);
                        Some(pause)
                    };
                    if let Some(demoted) = self.errors_log.admit(Instant::now()) {
                        tracing::warn!(error = %e, ?pause, demoted_to_debug = demoted, "accept failed");
                    } else {
                        tracing::debug!(error = %e, ?pause, "accept failed");
                    }
                    if let Some(pause) = pause {
                        tokio::time::sleep(pause).await;
                    }
                    continue;
                }
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                self.metrics.refused();
                if let Some(demoted) = self.refused_log.admit(Instant::now()) {
                    tracing::warn!(
                        %peer,
                        limit = self.max_connections,
                        demoted_to_debug = demoted,
                        "connection refused: --max-connections reached"
                    );
                } else {
                    tracing::debug!(%peer, "connection refused: --max-connections reached");
                }
                // Dropped: closed at once.
                continue;
            };
            // Small watch responses must not wait for the peer's delayed ACK (~40 ms).
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, %peer, "setting TCP_NODELAY");
            }
            self.metrics.opened();
            let info = ConnInfo {
                tcp: tcp.connect_info(),
                watchers: ConnWatchers::default(),
            };
            return Accepted {
                tcp,
                info,
                _slot: ConnSlot {
                    permit: Some(permit),
                    metrics: self.metrics.clone(),
                },
            };
        }
    }
}

/// An error of one pending connection (reset or aborted by its client before the accept),
/// not of the listener: the next accept can succeed at once.
fn connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

impl Connected for Accepted {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_a_freed_slot_is_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = ConnMetrics::default();
        let mut incoming = Box::pin(incoming(listener, 1, metrics.clone()));
        let (tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some(Ok(a)) = incoming.next().await {
                if tx.send(a).is_err() {
                    return;
                }
            }
        });
        let _first_client = TcpStream::connect(addr).await.unwrap();
        let first = accepted.recv().await.unwrap();
        assert!(first.info.remote_addr().is_some());
        // Beyond the limit: accepted and closed, so its client reads EOF (or a reset).
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut second, &mut buf)
            .await
            .unwrap_or(0);
        assert_eq!(n, 0, "the refused connection was closed");
        // Once the first closes, its slot is free again.
        drop(first);
        let _third_client = TcpStream::connect(addr).await.unwrap();
        let third = accepted.recv().await.unwrap();
        assert!(third.info.remote_addr().is_some());
        assert_eq!(metrics.counts(), (1, 1, 0));
        task.abort();
    }
}
