//! The byte stream under a device connection: plain TCP or TLS.
//!
//! Both keep the raw socket in an `Arc` that the router also holds, so a
//! takeover, a revocation or shutdown can close any connection from outside
//! by shutting the socket down.

use std::io;
use std::net::TcpStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_rustls::server::TlsStream;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::Async;

/// Plaintext read per TLS read: one TLS record's worth.
const TLS_READ_CHUNK: usize = 16 << 10;

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
    /// Read with readiness plus a non-blocking read into a per-thread
    /// buffer, so that an idle plain connection holds no buffer at all.
    Plain(Arc<Async<TcpStream>>),
    /// rustls keeps its own buffers per connection; plaintext is read into
    /// one more of ours.
    Tls(Box<TlsStream<SharedSocket>>, Box<[u8]>),
}

/// What [`Transport::ready`] found.
pub enum Ready {
    /// Plain: the socket can be read without blocking.
    Readable,
    /// TLS: this many plaintext bytes are in the transport's buffer (0: the
    /// peer closed).
    Read(usize),
}

impl Transport {
    pub fn tls(stream: TlsStream<SharedSocket>) -> Transport {
        Transport::Tls(Box::new(stream), vec![0; TLS_READ_CHUNK].into_boxed_slice())
    }

    /// The raw socket, for the router and for closing.
    pub fn socket(&self) -> &Arc<Async<TcpStream>> {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(s, _) => &s.get_ref().0 .0,
        }
    }

    /// Waits for input. Cancel-safe: dropping the future loses no bytes.
    pub async fn ready(&mut self) -> io::Result<Ready> {
        match self {
            Transport::Plain(s) => s.readable().await.map(|()| Ready::Readable),
            Transport::Tls(s, buf) => s.read(buf).await.map(Ready::Read),
        }
    }

    /// The TLS plaintext buffer (empty for plain TCP).
    pub fn take_buffer(&mut self) -> Box<[u8]> {
        match self {
            Transport::Plain(_) => Box::default(),
            Transport::Tls(_, buf) => std::mem::take(buf),
        }
    }

    pub fn put_buffer(&mut self, b: Box<[u8]>) {
        if let Transport::Tls(_, buf) = self {
            *buf = b;
        }
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Transport::Plain(s) => (&**s).write_all(bytes).await,
            Transport::Tls(s, _) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    /// Ends the connection: a TLS close_notify where possible, then the
    /// socket is shut down either way.
    pub async fn close(&mut self) {
        if let Transport::Tls(s, _) = self {
            s.get_mut().1.send_close_notify();
            let _ = smol::future::or(s.flush(), async {
                smol::Timer::after(std::time::Duration::from_millis(100)).await;
                Ok(())
            })
            .await;
        }
        let _ = self.socket().get_ref().shutdown(std::net::Shutdown::Both);
    }
}
