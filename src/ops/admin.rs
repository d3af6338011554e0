//! Admin HTTP: `/healthz`, `/readyz`, `/status`, `/metrics`.
//!
//! Four fixed GET routes do not justify an HTTP stack: this reads one
//! request head (bounded), answers and closes.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use async_net::{TcpListener, TcpStream};
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::{Executor, Timer};

use crate::ops::metrics::Metrics;
use crate::ops::status::{self, Lifecycle};

const MAX_HEAD: usize = 8 << 10;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What prometheus-client writes; Prometheus asks for it by this name.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub life: Lifecycle,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot start the admin endpoint on {address}: {source}")]
pub struct AdminError {
    address: SocketAddr,
    source: std::io::Error,
}

pub async fn bind(address: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| AdminError { address, source })
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>, ex: Arc<Executor<'static>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let admin = admin.clone();
                ex.spawn(async move {
                    let _ = smol::future::or(handle(stream, &admin), async {
                        Timer::after(CLIENT_TIMEOUT).await;
                        Ok(())
                    })
                    .await;
                })
                .detach();
            }
            Err(e) => {
                log::warn!("admin accept failed: {e}");
                Timer::after(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, admin: &Admin) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            let body = "too large\n";
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                body.len(),
                Some(body),
            )
            .await;
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (metrics, status);
    let (code, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/healthz") => ("200 OK", "text/plain", "ok\n"),
        ("GET" | "HEAD", "/readyz") => {
            // Ready: the listener is up, the gateway is not stopping, and
            // the outbox takes requests.
            if admin.life.stopping.load(SeqCst) {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready: shutting down\n",
                )
            } else if !admin.life.ready.load(SeqCst) {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready: starting\n",
                )
            } else if admin.metrics.outbox_full.load(SeqCst) != 0 {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready: the outbox is full (requests get outbox_full)\n",
                )
            } else {
                ("200 OK", "text/plain", "ready\n")
            }
        }
        ("GET" | "HEAD", "/status") => {
            status = format!("{:#}\n", status::document(&admin.metrics, &admin.life));
            ("200 OK", "application/json", status.as_str())
        }
        ("GET" | "HEAD", "/metrics") => {
            metrics = admin.metrics.render();
            ("200 OK", OPENMETRICS, metrics.as_str())
        }
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n"),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET and HEAD\n",
        ),
    };
    // HEAD: the same head, with the length the body would have, and no body.
    let length = body.len();
    let body = if method == "HEAD" { None } else { Some(body) };
    respond(&mut stream, code, content_type, length, body).await
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    length: usize,
    body: Option<&str>,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    if let Some(body) = body {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.flush().await
}
