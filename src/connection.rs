//! One device connection: frames in, replies and downlink out.
//!
//! An idle connection holds no read buffer: the task waits for readability
//! and then reads into a per-thread buffer, keeping only the bytes of a frame
//! that is split across reads. Replies to the frames of one read are written
//! together, in order, once their outbox append is on disk.

use std::cell::RefCell;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;

use smol::io::AsyncWriteExt;
use smol::{Async, Timer};
use uuid::Uuid;

use crate::frame::{Frame, LineDecoder};
use crate::listener::Shared;
use crate::outbox::{AppendBatch, AppendError};
use crate::protocol::{self, ErrorCode, Inbound, Origin, Timestamp};
use crate::router::{Downlink, Mailbox};

/// Bytes read per syscall, into the per-thread buffer.
const READ_CHUNK: usize = 64 << 10;
/// Frames handled before yielding to other tasks, so a connection whose
/// socket always has data cannot starve the rest.
const FRAMES_PER_YIELD: usize = 256;
/// Downlink bytes gathered into one write.
const DOWNLINK_WRITE_BYTES: usize = 64 << 10;

thread_local! {
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_CHUNK]);
}

pub async fn serve(socket: Arc<Async<TcpStream>>, peer: SocketAddr, shared: Arc<Shared>) {
    let client_id = Uuid::new_v4();
    let mailbox = Arc::new(Mailbox::default());
    shared
        .router
        .register(client_id, socket.clone(), mailbox.clone());
    let idle = shared.limits.idle_timeout;
    let mut conn = Connection {
        decoder: LineDecoder::new(shared.limits.max_frame_bytes),
        socket,
        shared,
        client_id,
        bound: None,
        idle_timer: Timer::after(idle),
    };
    let end = conn.run(&mailbox).await;
    match &end {
        Ok(reason) => log::debug!("connection {client_id} from {peer} closed: {reason:?}"),
        Err(e) => log::debug!("connection {client_id} from {peer} ended: {e}"),
    }
    let _ = conn.socket.get_ref().shutdown(std::net::Shutdown::Both);
    conn.shared.router.unregister(&client_id);
    conn.shared.open.fetch_sub(1, SeqCst);
    conn.shared.metrics.connections_open.fetch_sub(1, Relaxed);
}

#[derive(Debug)]
enum Closed {
    ByPeer,
    Idle,
    ShuttingDown,
}

struct Connection {
    socket: Arc<Async<TcpStream>>,
    shared: Arc<Shared>,
    client_id: Uuid,
    decoder: LineDecoder,
    /// The deviceUid this connection is bound to (PROTOCOL 1.4).
    bound: Option<Arc<str>>,
    idle_timer: Timer,
}

enum Wake {
    Readable(io::Result<()>),
    Downlink(Downlink),
    Idle,
}

/// The frames of one read, before their append is on disk.
#[derive(Default)]
struct Work {
    /// Reply text and the uids of accepted requests, referenced by range.
    text: Vec<u8>,
    replies: Vec<Reply>,
    batch: AppendBatch,
    frames: usize,
    close: bool,
}

enum Reply {
    Ready(Range<usize>),
    /// Accepted: an ack if the append succeeds, else an error. Holds the
    /// range of the uid's raw JSON.
    Pending(Range<usize>, Uuid),
}

enum Step {
    Work(Work),
    Drained,
    Eof,
}

impl Connection {
    async fn run(&mut self, mailbox: &Mailbox) -> io::Result<Closed> {
        loop {
            let wake = smol::future::or(
                smol::future::race(
                    async { Wake::Readable(self.socket.readable().await) },
                    async { Wake::Downlink(mailbox.pop().await) },
                ),
                async {
                    (&mut self.idle_timer).await;
                    Wake::Idle
                },
            )
            .await;
            match wake {
                Wake::Readable(ready) => {
                    ready?;
                    if let Some(closed) = self.read_frames().await? {
                        return Ok(closed);
                    }
                }
                Wake::Downlink(first) => self.write_downlink(first, mailbox).await?,
                Wake::Idle => {
                    self.shared
                        .metrics
                        .connections_closed_idle
                        .fetch_add(1, Relaxed);
                    return Ok(Closed::Idle);
                }
            }
        }
    }

    /// Reads and answers until the socket has nothing more for now.
    async fn read_frames(&mut self) -> io::Result<Option<Closed>> {
        let mut since_yield = 0;
        loop {
            let step = READ_BUF.with(|buf| {
                let mut buf = buf.borrow_mut();
                loop {
                    match self.socket.get_ref().read(&mut buf) {
                        Ok(0) => return Ok(Step::Eof),
                        Ok(n) => return Ok(Step::Work(self.decode(&buf[..n]))),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            return Ok(Step::Drained)
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                }
            })?;
            let work = match step {
                Step::Work(work) => work,
                Step::Drained => return Ok(None),
                Step::Eof => return Ok(Some(Closed::ByPeer)),
            };
            since_yield += work.frames;
            if work.frames > 0 {
                self.idle_timer.set_after(self.shared.limits.idle_timeout);
            }
            if self.answer(work).await? {
                return Ok(Some(Closed::ShuttingDown));
            }
            if since_yield >= FRAMES_PER_YIELD {
                since_yield = 0;
                smol::future::yield_now().await;
            }
        }
    }

    /// Decodes and checks the frames of one read (no I/O).
    fn decode(&mut self, bytes: &[u8]) -> Work {
        let mut work = Work::default();
        let shared = &*self.shared;
        let bound = self.bound.as_deref();
        let client_id = &self.client_id;
        let now = Timestamp::now();
        self.decoder.decode(bytes, |frame| {
            work.frames += 1;
            shared.metrics.frames.fetch_add(1, Relaxed);
            if work.close {
                return; // the connection closes after the reply already queued
            }
            let start = work.text.len();
            let line = match frame {
                Frame::TooLarge => {
                    let msg = format!(
                        "the frame is longer than {} bytes and was discarded",
                        shared.limits.max_frame_bytes
                    );
                    error(&mut work, shared, None, ErrorCode::FrameTooLarge, &msg);
                    return;
                }
                Frame::Line(line) => line,
            };
            match protocol::parse_frame(line) {
                Err(rejection) => {
                    shared.metrics.error(rejection.code);
                    protocol::write_rejection(&mut work.text, &rejection);
                    work.replies.push(Reply::Ready(start..work.text.len()));
                }
                Ok(Inbound::TextPing) => {
                    work.text.extend_from_slice(b"Pong\n");
                    work.replies.push(Reply::Ready(start..work.text.len()));
                }
                Ok(Inbound::JsonPing(uid)) => {
                    protocol::write_pong(&mut work.text, uid.raw);
                    work.replies.push(Reply::Ready(start..work.text.len()));
                }
                Ok(Inbound::Request(req)) => {
                    if shared.shutting_down.load(Relaxed) {
                        work.close = true;
                        let msg = "the gateway is shutting down; send this request again after reconnecting";
                        error(&mut work, shared, Some(req.uid.raw), ErrorCode::ShuttingDown, msg);
                        return;
                    }
                    if let (Some(b), Some(claimed)) = (bound, &req.device_uid) {
                        if *b != *claimed.value {
                            let msg = "this connection is bound to another deviceUid";
                            error(&mut work, shared, Some(req.uid.raw), ErrorCode::Unauthorized, msg);
                            return;
                        }
                    }
                    let message_id = Uuid::new_v4();
                    let origin = Origin {
                        server_id: &shared.server_id,
                        client_id,
                        bound_device: bound,
                    };
                    let mut key_buf = [0u8; 45];
                    let key = protocol::record_key(&req, &origin, &mut key_buf);
                    work.batch.push(key, &message_id, |out| {
                        protocol::write_envelope(out, &req, &origin, &message_id, &now)
                    });
                    work.text.extend_from_slice(req.uid.raw.as_bytes());
                    work.replies.push(Reply::Pending(start..work.text.len(), message_id));
                }
            }
        });
        work
    }

    /// Stores the accepted requests, then writes every reply in order.
    /// Returns true when the connection must close.
    async fn answer(&mut self, work: Work) -> io::Result<bool> {
        if work.replies.is_empty() {
            return Ok(false);
        }
        let accepted = work.batch.len();
        let outcome = if !work.batch.is_empty() {
            self.shared.appender.append(work.batch).await
        } else {
            Ok(())
        };
        let metrics = &self.shared.metrics;
        match &outcome {
            Ok(()) => {
                metrics.acks.fetch_add(accepted as u64, Relaxed);
            }
            Err(e) => {
                let code = refusal_code(e);
                for _ in 0..accepted {
                    metrics.error(code);
                }
            }
        }
        let mut out = Vec::with_capacity(work.text.len() + accepted * 80);
        for reply in &work.replies {
            match reply {
                Reply::Ready(range) => out.extend_from_slice(&work.text[range.clone()]),
                Reply::Pending(uid, id) => {
                    let uid = std::str::from_utf8(&work.text[uid.clone()]).unwrap_or("\"\"");
                    match &outcome {
                        Ok(()) => protocol::write_ack(&mut out, uid, id),
                        Err(e) => protocol::write_error(
                            &mut out,
                            Some(uid),
                            refusal_code(e),
                            &refusal_message(e),
                        ),
                    }
                }
            }
        }
        self.write(&out).await?;
        Ok(work.close)
    }

    async fn write_downlink(&mut self, first: Downlink, mailbox: &Mailbox) -> io::Result<()> {
        let mut out = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            if let Some(device) = msg.bind {
                self.bound = Some(device);
            }
            if out.is_empty() {
                out = msg.line;
            } else {
                out.extend_from_slice(&msg.line);
            }
            if out.len() < DOWNLINK_WRITE_BYTES {
                next = mailbox.try_pop();
            }
        }
        self.write(&out).await
    }

    /// Writes all of `bytes`, giving up if the device reads nothing for
    /// `idle_timeout` (it would otherwise hold this task forever).
    async fn write(&self, bytes: &[u8]) -> io::Result<()> {
        let mut socket = &*self.socket;
        let limit = self.shared.limits.idle_timeout;
        smol::future::or(socket.write_all(bytes), async {
            Timer::after(limit).await;
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the device did not read its replies within idle_timeout",
            ))
        })
        .await
    }
}

fn error(work: &mut Work, shared: &Shared, uid: Option<&str>, code: ErrorCode, message: &str) {
    let start = work.text.len();
    shared.metrics.error(code);
    protocol::write_error(&mut work.text, uid, code, message);
    work.replies.push(Reply::Ready(start..work.text.len()));
}

fn refusal_code(e: &AppendError) -> ErrorCode {
    match e {
        AppendError::Full => ErrorCode::OutboxFull,
        AppendError::Closed => ErrorCode::ShuttingDown,
        AppendError::Store(_) => ErrorCode::Internal,
    }
}

fn refusal_message(e: &AppendError) -> String {
    match e {
        AppendError::Full => {
            "the outbox is full; keep the request and send it again later".to_owned()
        }
        AppendError::Closed => {
            "the gateway is shutting down; send this request again after reconnecting".to_owned()
        }
        AppendError::Store(_) => "the request could not be stored; send it again".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_refusals_map_to_the_contract_codes() {
        assert_eq!(refusal_code(&AppendError::Full), ErrorCode::OutboxFull);
        assert_eq!(
            refusal_code(&AppendError::Store("io".into())),
            ErrorCode::Internal
        );
        assert_eq!(refusal_code(&AppendError::Closed), ErrorCode::ShuttingDown);
        // The device is told to keep and resend its request in each case.
        for e in [
            AppendError::Full,
            AppendError::Store("x".into()),
            AppendError::Closed,
        ] {
            assert!(refusal_message(&e).contains("again"), "{e}");
        }
    }
}
