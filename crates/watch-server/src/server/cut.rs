//! Connections that can be cut: a wrapper around each accepted socket whose reads and writes
//! fail once the server's grace period expired.
//!
//! tonic and axum spawn every accepted connection as its own task, so dropping the serve
//! future leaves those tasks (and the services they hold, with their [`kv_store::Store`] clones)
//! running. Their graceful shutdown waits for calls the server cannot end by itself (a
//! client's open bidirectional stream, a half-sent HTTP request). Cutting the socket makes the
//! connection's next read or write fail, so hyper ends the connection, its streams are reset,
//! and the transport's own "wait for every connection" returns.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::listen::{Accepted, ConnInfo};

/// Resolves once the cut signal turns true (or its sender is gone).
type Cutting = Pin<Box<dyn Future<Output = ()> + Send>>;

fn cutting(mut cut: watch::Receiver<bool>) -> Cutting {
    Box::pin(async move {
        // A dropped sender means the server is gone: cut too.
        let _ = cut.wait_for(|c| *c).await;
    })
}

/// A socket whose IO fails with `ConnectionAborted` once the cut signal turns true.
pub(crate) struct CutIo<T> {
    io: T,
    cutting: Cutting,
    cut: bool,
}

impl<T> CutIo<T> {
    pub(crate) fn new(io: T, cut: watch::Receiver<bool>) -> Self {
        Self {
            io,
            cutting: cutting(cut),
            cut: false,
        }
    }

    /// Polls the cut signal (registering the task's waker with it, so a connection parked on
    /// a read is woken by the cut); `Err` once cut.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.cut && self.cutting.as_mut().poll(cx).is_ready() {
            self.cut = true;
        }
        if self.cut {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "keywatch: shutdown grace period expired; connection cut",
            ));
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CutIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CutIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Shutting down a cut socket is allowed: it only ends it sooner.
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for CutIo<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The metrics endpoint's listener for axum: every accepted socket is a [`CutIo`].
pub(crate) struct CutListener {
    listener: TcpListener,
    cut: watch::Receiver<bool>,
}

impl CutListener {
    pub(crate) fn new(listener: TcpListener, cut: watch::Receiver<bool>) -> Self {
        Self { listener, cut }
    }
}

impl axum::serve::Listener for CutListener {
    type Io = CutIo<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        (CutIo::new(io, self.cut.clone()), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A client connection: plain, or TLS over the same cut-able socket. Both report the
/// connection's [`ConnInfo`] (its peer and its watcher count), read from each request's
/// extensions; no service reads the client certificate (verification happens in the
/// handshake).
pub(crate) enum Conn {
    /// Plain TCP.
    Plain(CutIo<Accepted>),
    /// TLS (boxed: the rustls session state is large).
    Tls(Box<tokio_rustls::server::TlsStream<CutIo<Accepted>>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_flush(cx),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Conn::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(io) => io.is_write_vectored(),
            Conn::Tls(io) => io.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Conn::Plain(io) => io.connect_info(),
            Conn::Tls(io) => io.get_ref().0.connect_info(),
        }
    }
}
