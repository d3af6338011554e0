//! The device listener: accepts connections, enforces `max_connections`, and
//! hands each socket to its own connection task.

use std::net::SocketAddr;
use std::sync::atomic::{Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use async_net::TcpListener;
use smol::channel::Receiver;
use smol::io::AsyncWriteExt;
use smol::{Async, Executor, Timer};

use crate::device::{connection, Shared};
use crate::security::tls;
use crate::wire::protocol::{write_error, ErrorCode};

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {source}")]
pub struct BindError {
    pub address: SocketAddr,
    pub source: std::io::Error,
}

/// Pending connections the kernel queues before we accept them. std's
/// `bind` asks for 128: when thousands of devices reconnect at once (after a
/// restart of the gateway, or of the network), the rest of their SYNs are
/// dropped and each waits 1, 3, 7... seconds to try again. The kernel caps
/// it at `net.core.somaxconn` (4096 by default).
const LISTEN_BACKLOG: i32 = 4096;

pub async fn bind(address: SocketAddr) -> Result<TcpListener, BindError> {
    listen(address).map_err(|source| BindError { address, source })
}

fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    use rustix::net::{sockopt, AddressFamily, SocketFlags, SocketType};
    let family = match address {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    // As std does: a restarted gateway can bind while old connections of
    // the previous one are still in TIME_WAIT.
    sockopt::set_socket_reuseaddr(&fd, true)?;
    rustix::net::bind(&fd, &address)?;
    rustix::net::listen(&fd, LISTEN_BACKLOG)?;
    TcpListener::try_from(std::net::TcpListener::from(fd))
}

/// Accepts until `stop` closes; with `tls`, every connection starts with a
/// TLS handshake.
pub async fn run(
    listener: TcpListener,
    tls: Option<Arc<tls::Acceptor>>,
    shared: Arc<Shared>,
    ex: Arc<Executor<'static>>,
    stop: Receiver<()>,
) {
    loop {
        let accepted = smol::future::or(async { Some(listener.accept().await) }, async {
            let _ = stop.recv().await;
            None
        })
        .await;
        let (stream, peer) = match accepted {
            None => break,
            Some(Ok(pair)) => pair,
            Some(Err(e)) => {
                // Typically EMFILE: back off instead of spinning on the error.
                log::warn!("accept failed: {e}");
                Timer::after(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.gate.damper.is_damped(peer.ip()) {
            // Closed at once, before any byte is read or a handshake starts.
            log::debug!("closing {peer}: damped after failed authentications");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let socket: Arc<Async<std::net::TcpStream>> = stream.into();
        if shared.open.fetch_add(1, SeqCst) >= shared.limits.max_connections {
            shared.open.fetch_sub(1, SeqCst);
            shared
                .metrics
                .connections_rejected_busy
                .fetch_add(1, Relaxed);
            shared.metrics.error(ErrorCode::ServerBusy);
            log::debug!("refusing {peer}: max_connections reached");
            if tls.is_none() {
                ex.spawn(refuse_busy(socket)).detach();
            } // a TLS client could not read a plain reply: just closed
            continue;
        }
        shared.metrics.connections_accepted.fetch_add(1, Relaxed);
        shared.metrics.connections_open.fetch_add(1, Relaxed);
        let tls = tls.as_ref().map(|t| t.current());
        ex.spawn(connection::serve(socket, peer, shared.clone(), tls))
            .detach();
    }
    log::info!("device listener stopped accepting");
}

async fn refuse_busy(socket: Arc<Async<std::net::TcpStream>>) {
    let mut line = Vec::with_capacity(160);
    write_error(
        &mut line,
        None,
        ErrorCode::ServerBusy,
        "the gateway is at its connection limit; try again later",
    );
    let mut s = &*socket;
    let _ = smol::future::or(async { s.write_all(&line).await }, async {
        Timer::after(Duration::from_secs(1)).await;
        Ok(())
    })
    .await;
    let _ = socket.get_ref().shutdown(std::net::Shutdown::Both);
}
