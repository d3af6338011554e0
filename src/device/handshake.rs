//! The TLS handshake of a connection from the TLS listener, bounded by
//! `auth.timeout_secs`; in mtls mode also the device its certificate names,
//! checked against the revocation list (PROTOCOL 5).

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures_rustls::TlsAcceptor;
use smol::{Async, Timer};

use crate::config::AuthMode;
use crate::device::transport::{SharedSocket, Transport};
use crate::device::Shared;
use crate::ops::logging::escaped;
use crate::ops::metrics::{AuthFailure, HandshakeError};
use crate::security::auth::REVOKED;
use crate::security::tls;
use crate::wire::protocol::{self, ErrorCode};

/// The TLS handshake, bounded by `auth.timeout_secs`; in mtls mode also
/// the certificate's device, checked against the revocation list.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    socket: Arc<Async<TcpStream>>,
    peer: SocketAddr,
    shared: &Shared,
) -> Result<(Transport, Option<String>), &'static str> {
    let metrics = &shared.metrics;
    let accepted = smol::future::or(
        async { Some(acceptor.accept(SharedSocket(socket)).await) },
        async {
            Timer::after(shared.gate.timeout).await;
            None
        },
    )
    .await;
    let stream = match accepted {
        Some(Ok(stream)) => stream,
        Some(Err(e)) => {
            let why = tls::classify(&e);
            log::debug!("TLS handshake with {peer} failed ({}): {e}", why.as_str());
            metrics.handshake_error(why);
            return Err(why.as_str());
        }
        None => {
            metrics.handshake_error(HandshakeError::Timeout);
            return Err(HandshakeError::Timeout.as_str());
        }
    };
    if shared.gate.mode != AuthMode::Mtls {
        return Ok((Transport::tls(stream), None));
    }
    let device = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| tls::subject_common_name(cert))
        .filter(|cn| protocol::valid_device_uid(cn));
    let Some(device) = device else {
        log::info!("refusing {peer}: its certificate has no usable subject CN");
        metrics.handshake_error(HandshakeError::NoCommonName);
        return Err(HandshakeError::NoCommonName.as_str());
    };
    let mut transport = Transport::tls(stream);
    if shared.gate.revoked.is_revoked(&device) {
        log::info!("refusing {peer}: device {} is revoked", escaped(&device));
        metrics.auth_failure(AuthFailure::Revoked);
        shared.gate.damper.failure(peer.ip());
        shared.metrics.error(ErrorCode::Unauthorized);
        let mut line = Vec::new();
        protocol::write_error(&mut line, None, ErrorCode::Unauthorized, REVOKED);
        let _ = smol::future::or(transport.write_all(&line), async {
            Timer::after(Duration::from_secs(1)).await;
            Ok(())
        })
        .await;
        transport.close().await;
        return Err("revoked");
    }
    metrics.auth_ok.fetch_add(1, Relaxed);
    Ok((transport, Some(device)))
}
