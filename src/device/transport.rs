//! The byte stream under a device connection: plain TCP or TLS.
//!
//! Both keep the raw socket in an `Arc` that the router also holds, so a
//! takeover, a revocation or shutdown can close any connection from outside
//! by shutting the socket down.

use std::io::{self, Read};
use std::net::TcpStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures_rustls::server::TlsStream;
use smol::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use smol::Async;

/// A shared socket as an owned async stream, for rustls to wrap.
pub struct SharedSocket(pub Arc<Async<TcpStream>>);

impl AsyncRead for SharedSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SharedSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_close(cx)
    }
}

pub enum Transport {
    /// Readiness, then a non-blocking read into the caller's (per-thread)
    /// buffer, so that an idle plain connection holds no buffer at all.
    Plain(Arc<Async<TcpStream>>),
    /// The same for TLS: rustls keeps only its own buffers (about 4 KiB
    /// idle), plaintext goes straight into the caller's buffer.
    Tls {
        stream: Box<TlsStream<SharedSocket>>,
        /// Set after a read returned data: rustls may hold more plaintext
        /// than fitted, which no socket readiness would announce.
        maybe_buffered: bool,
    },
}

impl Transport {
    pub fn tls(stream: TlsStream<SharedSocket>) -> Transport {
        Transport::Tls {
            stream: Box::new(stream),
            // The handshake may have read the first records too.
            maybe_buffered: true,
        }
    }

    /// The raw socket, for the router and for closing.
    pub fn socket(&self) -> &Arc<Async<TcpStream>> {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls { stream, .. } => &stream.get_ref().0 .0,
        }
    }

    /// Waits until [`Transport::try_read`] may find input. Cancel-safe.
    pub async fn ready(&mut self) -> io::Result<()> {
        match self {
            Transport::Tls {
                maybe_buffered: true,
                ..
            } => Ok(()),
            _ => self.socket().readable().await,
        }
    }

    /// Reads what has arrived without waiting: `Ok(None)` when nothing has
    /// (then [`Transport::ready`] waits for more), `Ok(Some(0))` at the end.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let read = match self {
            Transport::Plain(s) => match s.get_ref().read(buf) {
                Ok(n) => Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            Transport::Tls {
                stream,
                maybe_buffered,
            } => {
                // Pending means rustls has no plaintext and the socket has
                // nothing more: the socket's readiness is then the signal to
                // wait for, so no waker needs to be kept from this poll.
                let mut cx = Context::from_waker(Waker::noop());
                let read = Pin::new(&mut **stream).poll_read(&mut cx, buf);
                *maybe_buffered = matches!(read, Poll::Ready(Ok(n)) if n > 0);
                read
            }
        };
        match read {
            Poll::Ready(Ok(n)) => Ok(Some(n)),
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(None),
        }
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Transport::Plain(s) => (&**s).write_all(bytes).await,
            Transport::Tls { stream, .. } => {
                stream.write_all(bytes).await?;
                stream.flush().await
            }
        }
    }

    /// Ends the connection: a TLS close_notify where possible, then the
    /// socket is shut down either way.
    pub async fn close(&mut self) {
        if let Transport::Tls { stream, .. } = self {
            stream.get_mut().1.send_close_notify();
            let _ = smol::future::or(stream.flush(), async {
                smol::Timer::after(std::time::Duration::from_millis(100)).await;
                Ok(())
            })
            .await;
        }
        let _ = self.socket().get_ref().shutdown(std::net::Shutdown::Both);
    }
}
