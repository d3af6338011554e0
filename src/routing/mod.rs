//! Which connection is which: clientId → connection, deviceUid → clientId.
//!
//! The router is the one owner of connection identity (PROTOCOL 1.4). The
//! Kafka consumer hands it every ServerResponse; it decides where the message
//! goes, applies `connect.response` bindings and takeovers, and disconnects
//! a device whose downlink queue is full instead of letting memory grow.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::net::Shutdown;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use smol::Async;
use uuid::Uuid;

use crate::ops::logging::escaped;
use crate::ops::metrics::Metrics;
use crate::wire::protocol::{parse_server_response, ServerResponse};

/// What the router sends to a connection task.
#[derive(Debug)]
pub struct Downlink {
    /// One JSON line for the device, with its `\n`.
    pub line: Vec<u8>,
    /// A binding event: set when the router bound the connection to this
    /// deviceUid on this message. The router's tables are the binding; the
    /// connection keeps a copy for the envelopes it writes, changed only by
    /// these events.
    pub bind: Option<Arc<str>>,
}

/// A connection's downlink queue. A plain mutex-guarded deque and one waker,
/// instead of a channel: it allocates nothing until a message arrives, which
/// keeps idle connections small. The router bounds its length.
#[derive(Default)]
pub struct Mailbox {
    state: Mutex<MailboxState>,
}

#[derive(Default)]
struct MailboxState {
    queue: VecDeque<Downlink>,
    waker: Option<Waker>,
}

impl Mailbox {
    fn state(&self) -> MutexGuard<'_, MailboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.state().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.state().queue.is_empty()
    }

    fn push(&self, msg: Downlink) {
        let waker = {
            let mut state = self.state();
            state.queue.push_back(msg);
            state.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub fn try_pop(&self) -> Option<Downlink> {
        let mut state = self.state();
        let msg = state.queue.pop_front();
        if state.queue.is_empty() && state.queue.capacity() > 16 {
            state.queue = VecDeque::new(); // give a burst's memory back
        }
        msg
    }

    /// Waits for the next message.
    pub async fn pop(&self) -> Downlink {
        poll_fn(|cx| {
            let mut state = self.state();
            match state.queue.pop_front() {
                Some(msg) => Poll::Ready(msg),
                None => {
                    if !state
                        .waker
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        state.waker = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
            }
        })
        .await
    }
}

struct Conn {
    mailbox: Arc<Mailbox>,
    /// Kept to close the socket from outside: a takeover, a full queue, the
    /// end of shutdown. Shutting the socket down also wakes a blocked write.
    socket: Arc<Async<std::net::TcpStream>>,
    device: Option<Arc<str>>,
}

#[derive(Default)]
struct Tables {
    clients: HashMap<Uuid, Conn>,
    devices: HashMap<Arc<str>, Uuid>,
    held: Held,
}

/// How long a message for a device that is not connected is held for it.
/// Long enough for devices to reconnect after a gateway restart (which
/// reads what the backend sent meanwhile) or a network blip.
pub const HOLD_FOR: Duration = Duration::from_secs(60);
/// Held messages at most, over all devices; past it the oldest go.
pub const HOLD_MAX: usize = 10_000;

/// Messages for devices not connected here, by deviceUid, oldest first.
#[derive(Default)]
struct Held {
    by_device: HashMap<Arc<str>, VecDeque<Vec<u8>>>,
    /// Arrival order over all devices, for expiry and the cap.
    order: VecDeque<(Instant, Arc<str>)>,
}

impl Held {
    fn hold(&mut self, device: &str, line: Vec<u8>, now: Instant) -> usize {
        let device: Arc<str> = match self.by_device.get_key_value(device) {
            Some((k, _)) => k.clone(),
            None => Arc::from(device),
        };
        self.by_device
            .entry(device.clone())
            .or_default()
            .push_back(line);
        self.order.push_back((now, device));
        let mut dropped = 0;
        while self.order.len() > HOLD_MAX {
            dropped += self.drop_oldest();
        }
        dropped + self.expire(now)
    }

    /// Drops what has waited longer than [`HOLD_FOR`]; returns how many.
    fn expire(&mut self, now: Instant) -> usize {
        let mut dropped = 0;
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= HOLD_FOR)
        {
            dropped += self.drop_oldest();
        }
        dropped
    }

    fn drop_oldest(&mut self) -> usize {
        let Some((_, device)) = self.order.pop_front() else {
            return 0;
        };
        // A device's queue is in arrival order too, so its front is this one
        // (unless the device took its messages in the meantime).
        match self.by_device.get_mut(&device) {
            Some(queue) => {
                queue.pop_front();
                if queue.is_empty() {
                    self.by_device.remove(&device);
                }
                1
            }
            None => 0,
        }
    }

    fn take(&mut self, device: &str) -> VecDeque<Vec<u8>> {
        self.by_device.remove(device).unwrap_or_default()
    }
}

/// What became of one downlink record.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    Delivered,
    /// For a device not connected now: held for it (see [`HOLD_FOR`]).
    Held,
    OtherServer,
    Undeliverable,
    Malformed,
}

pub struct Router {
    server_id: String,
    max_pending: usize,
    /// False when devices authenticate themselves (token, mtls): then the
    /// backend's `connect.response` no longer binds anything.
    binds_on_connect_response: bool,
    metrics: Arc<Metrics>,
    tables: Mutex<Tables>,
    /// When a skipped record was last logged, and how many were skipped
    /// since: a worker writing garbage must not fill the hub's flash with
    /// log lines.
    skipped_log: Mutex<(Option<Instant>, u64)>,
}

/// At most one log line per this long about skipped downlink records.
const SKIPPED_LOG_EVERY: Duration = Duration::from_secs(10);

impl Router {
    pub fn new(server_id: String, max_pending: usize, metrics: Arc<Metrics>) -> Self {
        Router {
            server_id,
            max_pending,
            binds_on_connect_response: true,
            metrics,
            tables: Mutex::new(Tables::default()),
            skipped_log: Mutex::new((None, 0)),
        }
    }

    /// Identity comes from authentication, not from the backend.
    pub fn identity_from_auth(mut self) -> Self {
        self.binds_on_connect_response = false;
        self
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        // A panic elsewhere must not take routing down with it.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(
        &self,
        client_id: Uuid,
        socket: Arc<Async<std::net::TcpStream>>,
        mailbox: Arc<Mailbox>,
    ) {
        self.tables().clients.insert(
            client_id,
            Conn {
                mailbox,
                socket,
                device: None,
            },
        );
    }

    /// Registers an authenticated connection bound to `device` at once; an
    /// older connection of the same device is closed (takeover).
    pub fn register_bound(
        &self,
        client_id: Uuid,
        socket: Arc<Async<std::net::TcpStream>>,
        mailbox: Arc<Mailbox>,
        device: &str,
    ) -> Arc<str> {
        let mut t = self.tables();
        t.clients.insert(
            client_id,
            Conn {
                mailbox,
                socket,
                device: None,
            },
        );
        let device = self.bind(&mut t, client_id, device);
        self.release_held(&mut t, client_id, &device);
        device
    }

    /// Closes the connection bound to `device`, if any (revocation).
    pub fn close_device(&self, device: &str) -> bool {
        let t = self.tables();
        let Some(conn) = t.devices.get(device).and_then(|c| t.clients.get(c)) else {
            return false;
        };
        log::warn!(
            "device {} is revoked: closing its connection",
            escaped(device)
        );
        self.metrics.auth_revoked_closed.fetch_add(1, Relaxed);
        let _ = conn.socket.get_ref().shutdown(Shutdown::Both);
        true
    }

    pub fn unregister(&self, client_id: &Uuid) {
        let mut t = self.tables();
        if let Some(conn) = t.clients.remove(client_id) {
            if let Some(device) = conn.device {
                if t.devices.get(&device) == Some(client_id) {
                    t.devices.remove(&device);
                }
            }
        }
    }

    /// Closes every connection (the last step of shutdown).
    pub fn close_all(&self) {
        for conn in self.tables().clients.values() {
            let _ = conn.socket.get_ref().shutdown(Shutdown::Both);
        }
    }

    fn log_skipped(&self, e: &dyn std::fmt::Display) {
        let mut last = self.skipped_log.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match last.0 {
            Some(at) if now.duration_since(at) < SKIPPED_LOG_EVERY => last.1 += 1,
            _ => {
                let more = match last.1 {
                    0 => String::new(),
                    n => format!(" ({n} more skipped since the last line)"),
                };
                log::warn!("skipping a downlink record: {e}{more}");
                *last = (Some(now), 0);
            }
        }
    }

    /// Routes one record from a consumer topic (PROTOCOL 2.2).
    pub fn route(&self, payload: &[u8]) -> Routed {
        self.metrics.downlink_received.fetch_add(1, Relaxed);
        let response = match parse_server_response(payload) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.downlink_malformed.fetch_add(1, Relaxed);
                // serde's message may quote the record's own text.
                self.log_skipped(&escaped(&e.to_string()));
                return Routed::Malformed;
            }
        };
        if response
            .server_id
            .as_deref()
            .is_some_and(|s| s != self.server_id)
        {
            self.metrics.downlink_other_server.fetch_add(1, Relaxed);
            return Routed::OtherServer;
        }
        let routed = self.deliver(response);
        match routed {
            Routed::Delivered => self.metrics.downlink_routed.fetch_add(1, Relaxed),
            Routed::Held => self.metrics.downlink_held.fetch_add(1, Relaxed),
            _ => self.metrics.downlink_undeliverable.fetch_add(1, Relaxed),
        };
        routed
    }

    fn deliver(&self, r: ServerResponse<'_>) -> Routed {
        let mut t = self.tables();
        let by_client = r
            .client_id
            .as_deref()
            .and_then(|c| Uuid::try_parse(c).ok())
            .filter(|id| t.clients.contains_key(id));
        if let Some(client) = by_client {
            let bind = match (&r.device_uid, r.binds) {
                (Some(device), true) if self.binds_on_connect_response => {
                    Some(self.bind(&mut t, client, device))
                }
                _ => None,
            };
            let device = bind.clone();
            let routed = self.push(&mut t, client, Downlink { line: r.line, bind });
            if let Some(device) = device {
                self.release_held(&mut t, client, &device);
            }
            return routed;
        }
        let by_device = r
            .device_uid
            .as_deref()
            .and_then(|d| t.devices.get(d).copied());
        match by_device {
            Some(client) => self.push(
                &mut t,
                client,
                Downlink {
                    line: r.line,
                    bind: None,
                },
            ),
            None => match r.device_uid.as_deref() {
                // The device may be about to reconnect (after a restart of
                // this gateway, say): hold the message for it a while.
                Some(device) => {
                    let expired = t.held.hold(device, r.line, Instant::now());
                    self.count_expired(expired);
                    Routed::Held
                }
                None => {
                    log::debug!(
                        "undeliverable downlink for clientId {:?}: not connected here",
                        r.client_id
                    );
                    Routed::Undeliverable
                }
            },
        }
    }

    /// Hands the messages held for `device` to its new connection, in order.
    fn release_held(&self, t: &mut Tables, client: Uuid, device: &str) {
        let expired = t.held.expire(Instant::now());
        self.count_expired(expired);
        for line in t.held.take(device) {
            self.metrics.downlink_held_released.fetch_add(1, Relaxed);
            if self.push(t, client, Downlink { line, bind: None }) != Routed::Delivered {
                break; // the connection was closed for not reading
            }
        }
    }

    fn count_expired(&self, n: usize) {
        if n > 0 {
            self.metrics
                .downlink_undeliverable
                .fetch_add(n as u64, Relaxed);
        }
    }

    /// Binds `client` to `device`; a previous holder of the device is closed.
    fn bind(&self, t: &mut Tables, client: Uuid, device: &str) -> Arc<str> {
        let device: Arc<str> = Arc::from(device);
        if let Some(old) = t.devices.insert(device.clone(), client) {
            if old != client {
                if let Some(conn) = t.clients.get_mut(&old) {
                    conn.device = None;
                    log::info!(
                        "device {} moved to connection {client}; closing {old}",
                        escaped(&device)
                    );
                    self.metrics.connections_taken_over.fetch_add(1, Relaxed);
                    let _ = conn.socket.get_ref().shutdown(Shutdown::Both);
                }
            }
        }
        if let Some(conn) = t.clients.get_mut(&client) {
            if let Some(previous) = conn.device.replace(device.clone()) {
                if previous != device && t.devices.get(&previous) == Some(&client) {
                    t.devices.remove(&previous);
                }
            }
        }
        device
    }

    fn push(&self, t: &mut Tables, client: Uuid, msg: Downlink) -> Routed {
        let Some(conn) = t.clients.get(&client) else {
            return Routed::Undeliverable;
        };
        let pending = conn.mailbox.len();
        if pending >= self.max_pending {
            log::warn!(
                "connection {client} has {pending} downlink messages unread; disconnecting it"
            );
            self.metrics.connections_closed_slow.fetch_add(1, Relaxed);
            let _ = conn.socket.get_ref().shutdown(Shutdown::Both);
            return Routed::Undeliverable;
        }
        conn.mailbox.push(msg);
        Routed::Delivered
    }
}

#[cfg(test)]
mod tests;
