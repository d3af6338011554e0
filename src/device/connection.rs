//! One device connection: frames in, replies and downlink out.
//!
//! An idle plain connection holds no read buffer: the task waits for
//! readability and then reads into a per-thread buffer, keeping only the
//! bytes of a frame that is split across reads. Replies to the frames of one read are written
//! together, in order, once their outbox append is on disk.

use std::cell::RefCell;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::ops::ControlFlow;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::Instant;

use futures_rustls::TlsAcceptor;
use smol::{Async, Timer};
use uuid::Uuid;

use crate::config::AuthMode;
use crate::device::dispatch::{self, AuthState, Decision, Session};
use crate::device::rate::Bucket;
use crate::device::transport::Transport;
use crate::device::turn::{self, error, refuse, Closed, Reply, Work};
use crate::device::{budget, handshake, Shared};
use crate::ops::logging::escaped;
use crate::ops::metrics::AuthFailure;
use crate::security::auth::REVOKED;

use crate::routing::{Downlink, Mailbox};
use crate::wire::frame::{Frame, LineDecoder};
use crate::wire::ids;
use crate::wire::protocol::{self, ErrorCode, Origin, Timestamp};

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

/// Serves one accepted socket until it closes. `tls` is set for
/// connections from the TLS listener.
pub async fn serve(
    socket: Arc<Async<TcpStream>>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
) {
    let client_id = ids::new_v4();
    let opened = match tls {
        None => Ok((Transport::Plain(socket.clone()), None)),
        // Boxed: a handshake's state is large and would otherwise be part of
        // every connection's task, plain ones included, for its whole life.
        Some(acceptor) => {
            Box::pin(handshake::handshake(
                &acceptor,
                socket.clone(),
                peer,
                &shared,
            ))
            .await
        }
    };
    match opened {
        Ok((transport, certified)) => {
            let end = open(transport, certified, client_id, peer, &shared).await;
            match &end {
                Ok(reason) => log::debug!("connection {client_id} from {peer} closed: {reason:?}"),
                Err(e) => log::debug!("connection {client_id} from {peer} ended: {e}"),
            }
            shared
                .router
                .unregister(&client_id, turn::presence_reason(&end));
        }
        Err(why) => log::debug!("connection from {peer} closed before it started: {why}"),
    }
    let _ = socket.get_ref().shutdown(std::net::Shutdown::Both);
    shared.open.fetch_sub(1, SeqCst);
    shared.metrics.connections_open.fetch_sub(1, Relaxed);
}

/// Runs the connection once its transport is up; `certified` is the
/// deviceUid of an mtls client certificate.
async fn open(
    transport: Transport,
    certified: Option<String>,
    client_id: Uuid,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> io::Result<Closed> {
    let mailbox = Arc::new(Mailbox::default());
    let gate = &shared.gate;
    let (auth, bound) = match (gate.mode, certified) {
        (AuthMode::Mtls, Some(device)) => {
            let bound = shared.router.register_bound(
                client_id,
                transport.socket().clone(),
                mailbox.clone(),
                &device,
            );
            // As for tokens: revoked between the handshake's check and now.
            if gate.revoked.is_revoked(&bound) {
                shared.metrics.auth_failure(AuthFailure::Revoked);
                return Ok(Closed::Unauthorized);
            }
            (AuthState::Done, Some(bound))
        }
        // Registered with the router only once authenticated: until then
        // nothing but replies to its own frames reaches the device.
        (AuthMode::Token, _) => (AuthState::Pending, None),
        _ => {
            shared
                .router
                .register(client_id, transport.socket().clone(), mailbox.clone());
            (AuthState::Open, None)
        }
    };
    let first_deadline = match auth {
        AuthState::Pending => gate.timeout.min(shared.limits.idle_timeout),
        _ => shared.limits.idle_timeout,
    };
    let mut conn = Connection {
        decoder: LineDecoder::new(shared.limits.max_frame_bytes),
        transport,
        shared: shared.clone(),
        client_id,
        peer,
        mailbox: mailbox.clone(),
        bound,
        auth,
        idle_timer: Timer::after(first_deadline),
        since_yield: 0,
        stash: Vec::new(),
        stash_used: 0,
        partial_held: 0,
        rate: shared.rate.as_ref().map(|r| r.bucket(Instant::now())),
    };
    let end = conn.run(&mailbox).await;
    conn.transport.close().await;
    shared
        .metrics
        .partial_bytes
        .fetch_sub(conn.partial_held as i64, Relaxed);
    end
}

struct Connection {
    transport: Transport,
    shared: Arc<Shared>,
    client_id: Uuid,
    peer: SocketAddr,
    mailbox: Arc<Mailbox>,
    decoder: LineDecoder,
    /// The deviceUid this connection is bound to (PROTOCOL 1.4, 5): a copy
    /// of the router's binding, which owns it. It changes only by what the
    /// router says: its answer to `register_bound`, or a binding event that
    /// arrives in the mailbox with the `connect.response` that made it, in
    /// order with the messages before and after.
    bound: Option<Arc<str>>,
    auth: AuthState,
    /// Idle timeout, or the authentication deadline while `Pending`.
    idle_timer: Timer,
    /// Frames since the task last yielded.
    since_yield: usize,
    /// Bytes read but not decoded yet, because the replies of those before
    /// them reached `listener.max_pending_reply_bytes`. Nothing more is read
    /// from the socket while it holds any.
    stash: Vec<u8>,
    /// How much of `stash` was decoded already.
    stash_used: usize,
    /// What this connection's partial frame counts in `partial_bytes`.
    partial_held: usize,
    /// Its token bucket when rate limits are on.
    rate: Option<Bucket>,
}

enum Wake {
    Input(io::Result<()>),
    Downlink(Downlink),
    Timer,
}

enum Step {
    Work(Work),
    Drained,
    Eof,
}

impl Connection {
    async fn run(&mut self, mailbox: &Mailbox) -> io::Result<Closed> {
        loop {
            if !self.stash.is_empty() {
                // Frames left over from an earlier read.
                let stash = std::mem::take(&mut self.stash);
                let (work, used) = self.take_input(&stash[self.stash_used..]);
                self.stash_used += used;
                if self.stash_used < stash.len() {
                    self.stash = stash;
                } else {
                    self.stash_used = 0;
                }
                if let Some(closed) = Box::pin(self.handle(work)).await? {
                    return Ok(closed);
                }
                if !self.mailbox.is_empty() {
                    Box::pin(self.downlink_between_turns()).await?;
                }
                continue;
            }
            let transport = &mut self.transport;
            let timer = &mut self.idle_timer;
            let wake = smol::future::or(
                smol::future::race(async { Wake::Input(transport.ready().await) }, async {
                    Wake::Downlink(mailbox.pop().await)
                }),
                async {
                    timer.await;
                    Wake::Timer
                },
            )
            .await;
            match wake {
                Wake::Input(ready) => {
                    ready?;
                    if let Some(closed) = self.read_frames().await? {
                        return Ok(closed);
                    }
                }
                Wake::Downlink(first) => Box::pin(self.write_downlink(first, mailbox)).await?,
                Wake::Timer if self.auth == AuthState::Pending => {
                    log::info!(
                        "closing {}: no authentication within the time allowed",
                        self.peer
                    );
                    self.shared.metrics.auth_timeouts.fetch_add(1, Relaxed);
                    return Ok(Closed::AuthTimeout);
                }
                Wake::Timer => {
                    self.shared
                        .metrics
                        .connections_closed_idle
                        .fetch_add(1, Relaxed);
                    return Ok(Closed::Idle);
                }
            }
        }
    }

    /// Reads and answers until the connection has nothing more for now.
    async fn read_frames(&mut self) -> io::Result<Option<Closed>> {
        loop {
            if !self.stash.is_empty() {
                return Ok(None); // the run loop answers those first
            }
            let step = READ_BUF.with(|buf| {
                let mut buf = buf.borrow_mut();
                loop {
                    match self.transport.try_read(&mut buf) {
                        Ok(Some(0)) => return Ok(Step::Eof),
                        Ok(Some(n)) => return Ok(Step::Work(self.take_input_read(&buf[..n]))),
                        Ok(None) => return Ok(Step::Drained),
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
            // Boxed, like the downlink write: the state of a batch in
            // flight is allocated while it is, not kept in every idle task.
            if let Some(closed) = Box::pin(self.handle(work)).await? {
                return Ok(Some(closed));
            }
            if !self.mailbox.is_empty() {
                // Boxed only then: most turns have no downlink waiting.
                Box::pin(self.downlink_between_turns()).await?;
            }
        }
    }

    /// A device that sends faster than its acks come back always has input
    /// waiting, so this loop would never return to the run loop's wait:
    /// its downlink goes out between turns instead of after the input stops.
    async fn downlink_between_turns(&mut self) -> io::Result<()> {
        if let Some(first) = self.mailbox.try_pop() {
            let mailbox = self.mailbox.clone();
            Box::pin(self.write_downlink(first, &mailbox)).await?;
        }
        Ok(())
    }

    /// Answers the frames of one read; yields now and then so that a
    /// connection whose input never runs dry cannot starve the rest.
    async fn handle(&mut self, work: Work) -> io::Result<Option<Closed>> {
        self.since_yield += work.frames;
        if work.frames > 0 && self.auth != AuthState::Pending {
            // Pings do not extend the authentication deadline.
            self.idle_timer.set_after(self.shared.limits.idle_timeout);
        }
        if let Some(closed) = self.answer(work).await? {
            return Ok(Some(closed));
        }
        if self.since_yield >= FRAMES_PER_YIELD {
            self.since_yield = 0;
            smol::future::yield_now().await;
        }
        Ok(None)
    }

    /// Decodes and checks the frames of one read (no I/O), stopping once
    /// their replies reach `listener.max_pending_reply_bytes`; returns them
    /// and how many bytes it used.
    fn decode(&mut self, bytes: &[u8]) -> (Work, usize) {
        let mut work = Work::with_room_for(bytes.len());
        let Connection {
            shared,
            client_id,
            peer,
            decoder,
            bound,
            auth,
            transport,
            mailbox,
            rate,
            ..
        } = self;
        let shared = &**shared;
        let now = Timestamp::now();
        let budget = shared.limits.max_pending_reply_bytes;
        let mut on_frame = |work: &mut Work, frame: Frame<'_>| {
            work.frames += 1;
            shared.metrics.frames.fetch_add(1, Relaxed);
            if work.close.is_some() {
                return; // the connection closes after the reply already queued
            }
            let session = Session {
                auth: *auth,
                bound: bound.as_deref(),
                shutting_down: shared.shutting_down.load(Relaxed),
                max_frame_bytes: shared.limits.max_frame_bytes,
                max_json_depth: shared.limits.max_json_depth,
            };
            let start = work.text.len();
            match dispatch::decide(frame, &session, |req| shared.gate.authenticate(req)) {
                Decision::Pong => {
                    work.text.extend_from_slice(b"Pong\n");
                    work.replies.push(Reply::Ready(start..work.text.len()));
                }
                Decision::JsonPong { uid } => {
                    protocol::write_pong(&mut work.text, uid);
                    work.replies.push(Reply::Ready(start..work.text.len()));
                }
                Decision::Reject(rejection) => {
                    shared.metrics.error(rejection.code);
                    protocol::write_rejection(&mut work.text, &rejection);
                    work.replies.push(Reply::Ready(start..work.text.len()));
                }
                Decision::Error { uid, code, message } => {
                    error(work, shared, uid, code, &message);
                }
                Decision::ShuttingDown { uid } => {
                    work.close = Some(Closed::ShuttingDown);
                    let msg =
                        "the gateway is shutting down; send this request again after reconnecting";
                    error(work, shared, Some(uid), ErrorCode::ShuttingDown, msg);
                }
                Decision::Refuse { uid, why, message } => {
                    if why != AuthFailure::NotAuthFirst {
                        log::info!("refused authentication from {peer}: {message}");
                    }
                    refuse(work, shared, *peer, uid.as_deref(), why, message);
                }
                Decision::Authenticated { uid, device } => {
                    let device = shared.router.register_bound(
                        *client_id,
                        transport.socket().clone(),
                        mailbox.clone(),
                        &device,
                    );
                    // Checked again now that the router knows it: a list
                    // replaced since the first check closed everyone it
                    // names before this connection was there to be closed.
                    if shared.gate.revoked.is_revoked(&device) {
                        refuse(
                            work,
                            shared,
                            *peer,
                            Some(uid),
                            AuthFailure::Revoked,
                            REVOKED,
                        );
                        return;
                    }
                    log::debug!(
                        "connection {client_id} from {peer} authenticated as {}",
                        escaped(&device)
                    );
                    *bound = Some(device);
                    *auth = AuthState::Done;
                    shared.metrics.auth_ok.fetch_add(1, Relaxed);
                    protocol::write_auth_ok(&mut work.text, uid);
                    work.replies.push(Reply::Ready(start..work.text.len()));
                }
                Decision::Accept(req) => {
                    if let (Some(limits), Some(bucket)) = (&shared.rate, rate.as_mut()) {
                        if let Err(wait) = limits.admit(bucket, bound.as_ref(), Instant::now()) {
                            shared.metrics.error(ErrorCode::RateLimited);
                            let ms = wait.as_millis().max(1) as u64;
                            protocol::write_rate_limited(&mut work.text, req.uid.raw, ms);
                            work.replies.push(Reply::Ready(start..work.text.len()));
                            return;
                        }
                    }
                    let message_id = ids::new_v4();
                    let origin = Origin {
                        server_id: &shared.server_id,
                        client_id,
                        bound_device: bound.as_deref(),
                        reply_topic: shared.reply_topic.as_deref(),
                    };
                    let mut key_buf = [0u8; 45];
                    let key = protocol::record_key(&req, &origin, &mut key_buf);
                    work.batch.push(key, &message_id, |out| {
                        protocol::write_envelope(out, &req, &origin, &message_id, &now)
                    });
                    work.text.extend_from_slice(req.uid.raw.as_bytes());
                    work.accepted += 1;
                    work.replies
                        .push(Reply::Pending(start..work.text.len(), message_id));
                }
            }
        };
        let used = decoder.decode_until(bytes, |frame| {
            on_frame(&mut work, frame);
            // A turn answers a bounded number of frames, then other
            // connections get theirs (the rest of the read waits).
            if work.close.is_some()
                || work.reply_bytes() >= budget
                || work.frames >= FRAMES_PER_YIELD
            {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        (work, used)
    }

    /// Decodes a read from the socket, keeping what [`Connection::decode`]
    /// left for later: nothing more is read from the socket until it is used.
    fn take_input_read(&mut self, bytes: &[u8]) -> Work {
        let (work, used) = self.take_input(bytes);
        if used < bytes.len() {
            self.stash.extend_from_slice(&bytes[used..]);
            self.stash_used = 0;
        }
        work
    }

    /// Decodes input and holds the connection to its budgets for partial
    /// frames; returns the work and how many bytes it used.
    fn take_input(&mut self, bytes: &[u8]) -> (Work, usize) {
        let (mut work, used) = self.decode(bytes);
        if used < bytes.len() {
            self.shared.metrics.input_deferred.fetch_add(1, Relaxed);
        }
        let held = self.decoder.buffered();
        let pending_auth = self.auth == AuthState::Pending;
        budget::hold(
            &self.shared,
            self.peer,
            pending_auth,
            &mut self.partial_held,
            held,
            &mut work,
        );
        (work, used)
    }

    /// Stores the accepted requests, then writes every reply in order.
    /// Returns why the connection must close, if it must.
    async fn answer(&mut self, mut work: Work) -> io::Result<Option<Closed>> {
        if work.replies.is_empty() {
            return Ok(None);
        }
        let accepted = work.batch.len();
        let appending = Instant::now();
        let outcome = if !work.batch.is_empty() {
            self.shared
                .appender
                .append(std::mem::take(&mut work.batch))
                .await
        } else {
            Ok(())
        };
        let metrics = &self.shared.metrics;
        match &outcome {
            Ok(()) => {
                metrics.acks.fetch_add(accepted as u64, Relaxed);
                if accepted > 0 {
                    metrics
                        .ack_seconds
                        .observe(appending.elapsed(), accepted as u64);
                }
            }
            Err(e) => {
                let code = turn::refusal_code(e);
                for _ in 0..accepted {
                    metrics.error(code);
                }
            }
        }
        let out = work.replies_text(&outcome);
        // Only the bytes being written stay alive while the device reads.
        let close = work.close.take();
        drop((work.text, work.replies));
        self.write(&out).await?;
        Ok(close)
    }

    /// Writes the backend's messages in the mailbox, several per write;
    /// what they confirm (a record's offset, a held message's removal) is
    /// confirmed once the write is done, and what could not be written goes
    /// back to the router (the device's next connection, or the hold).
    async fn write_downlink(&mut self, first: Downlink, mailbox: &Mailbox) -> io::Result<()> {
        let mut out = Vec::new();
        let mut msgs = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            if let Some(device) = &msg.bind {
                self.bound = Some(device.clone());
            }
            out.extend_from_slice(&msg.line);
            msgs.push(msg);
            if out.len() < DOWNLINK_WRITE_BYTES {
                next = mailbox.try_pop();
            }
        }
        match self.write(&out).await {
            Ok(()) => {
                let dones = msgs.into_iter().map(|m| m.done).collect();
                self.shared.router.written(dones);
                Ok(())
            }
            Err(e) => {
                self.shared.router.unwritten(self.client_id, msgs);
                Err(e)
            }
        }
    }

    /// Writes all of `bytes`, giving up if the device reads nothing for
    /// `idle_timeout` (it would otherwise hold this task forever).
    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let limit = self.shared.limits.idle_timeout;
        smol::future::or(self.transport.write_all(bytes), async {
            Timer::after(limit).await;
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the device did not read its replies within idle_timeout",
            ))
        })
        .await
    }
}

#[cfg(test)]
mod tests;
