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
use crate::wire::protocol::{
    parse_server_response, Change, Presence, Reason, ServerResponse, Timestamp,
};
use hold::Hold;
use receipt::Receipt;

pub mod hold;
pub mod presence;
pub mod receipt;

/// What the router sends to a connection task.
#[derive(Debug)]
pub struct Downlink {
    /// One JSON line for the device, with its `\n`.
    pub line: Vec<u8>,
    /// What to confirm once the line is on the device's socket.
    pub done: Done,
    /// A binding event: set when the router bound the connection to this
    /// deviceUid on this message. The router's tables are the binding; the
    /// connection keeps a copy for the envelopes it writes, changed only by
    /// these events.
    pub bind: Option<Arc<str>>,
}

/// What a downlink message confirms once written to the device's socket.
#[derive(Debug)]
pub enum Done {
    /// A record from Kafka: its offset may be stored.
    Receipt(Receipt),
    /// A message from the hold: it may leave it.
    Held { device: Arc<str>, seq: u64 },
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
    /// The device it held until another connection took it over: what it
    /// could not write goes to that connection.
    taken_from: Option<Arc<str>>,
    /// Why the router closed it (revoked, shutdown, not reading), which
    /// its presence event gives rather than what the connection saw.
    closed_for: Option<Reason>,
}

#[derive(Default)]
struct Tables {
    clients: HashMap<Uuid, Conn>,
    devices: HashMap<Arc<str>, Uuid>,
    /// Presence events go here, made under this lock so that they are in
    /// the order the bindings changed. `None`: presence is off, or stopped.
    presence: Option<presence::Queue>,
}

impl Tables {
    fn presence(&self, change: Change, device: &Arc<str>, client: Uuid) {
        if let Some(queue) = &self.presence {
            queue.push(Presence {
                change,
                device_uid: device.clone(),
                client_id: client,
                at: Timestamp::now(),
            });
        }
    }
}

/// What became of one downlink record.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    Delivered,
    /// For a device not connected now: held on disk for it (PROTOCOL 6.3).
    Held,
    OtherServer,
    Undeliverable,
    Malformed,
}

pub struct Router {
    server_id: String,
    hold: Arc<Hold>,
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
    pub fn new(
        server_id: String,
        max_pending: usize,
        metrics: Arc<Metrics>,
        hold: Arc<Hold>,
    ) -> Self {
        Router {
            server_id,
            hold,
            max_pending,
            binds_on_connect_response: true,
            metrics,
            tables: Mutex::new(Tables::default()),
            skipped_log: Mutex::new((None, 0)),
        }
    }

    /// Binding changes produce presence events into `queue` (PROTOCOL 6.2).
    pub fn with_presence(self, queue: presence::Queue) -> Self {
        self.tables().presence = Some(queue);
        self
    }

    /// No more presence events: the last ones (shutdown) were queued.
    pub fn end_presence(&self) {
        self.tables().presence = None;
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
                taken_from: None,
                closed_for: None,
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
                taken_from: None,
                closed_for: None,
            },
        );
        let device = self.bind(&mut t, client_id, device);
        self.release_held(&mut t, client_id, &device);
        device
    }

    /// Closes the connection bound to `device`, if any (revocation).
    pub fn close_device(&self, device: &str) -> bool {
        let mut t = self.tables();
        let Some(&client) = t.devices.get(device) else {
            return false;
        };
        let Some(conn) = t.clients.get_mut(&client) else {
            return false;
        };
        conn.closed_for = Some(Reason::Revoked);
        log::warn!(
            "device {} is revoked: closing its connection",
            escaped(device)
        );
        self.metrics.auth_revoked_closed.fetch_add(1, Relaxed);
        let _ = conn.socket.get_ref().shutdown(Shutdown::Both);
        true
    }

    /// Forgets a connection that ended; `reason` is why, as the connection
    /// saw it (the router's own reason for closing it comes first).
    pub fn unregister(&self, client_id: &Uuid, reason: Reason) {
        // One lock for all of it: a message routed to this connection
        // between draining its mailbox and removing it would be lost.
        let mut t = self.tables();
        let leftovers: Vec<Downlink> = match t.clients.get(client_id) {
            Some(conn) => std::iter::from_fn(|| conn.mailbox.try_pop()).collect(),
            None => Vec::new(),
        };
        if !leftovers.is_empty() {
            self.unwritten_in(&mut t, *client_id, leftovers);
        }
        if let Some(conn) = t.clients.remove(client_id) {
            if let Some(device) = conn.device {
                if t.devices.get(&device) == Some(client_id) {
                    t.devices.remove(&device);
                    let reason = conn.closed_for.unwrap_or(reason);
                    t.presence(Change::Disconnected(reason), &device, *client_id);
                }
            }
        }
    }

    /// Closes every connection (the last step of shutdown).
    pub fn close_all(&self) {
        for conn in self.tables().clients.values_mut() {
            conn.closed_for.get_or_insert(Reason::Shutdown);
            let _ = conn.socket.get_ref().shutdown(Shutdown::Both);
        }
    }

    /// How many connections are registered.
    pub fn connections(&self) -> usize {
        self.tables().clients.len()
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

    /// Routes one record from a consumer topic (PROTOCOL 2.2). `receipt`
    /// goes where the record goes, and is dropped once it is handled.
    pub fn route(&self, payload: &[u8], receipt: Receipt) -> Routed {
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
        let routed = self.deliver(response, receipt);
        match routed {
            Routed::Delivered => self.metrics.downlink_routed.fetch_add(1, Relaxed),
            Routed::Held => self.metrics.downlink_held.fetch_add(1, Relaxed),
            _ => self.metrics.downlink_undeliverable.fetch_add(1, Relaxed),
        };
        routed
    }

    fn deliver(&self, r: ServerResponse<'_>, receipt: Receipt) -> Routed {
        let mut t = self.tables();
        let by_client = r
            .client_id
            .as_deref()
            .and_then(|c| Uuid::try_parse(c).ok())
            .filter(|id| t.clients.contains_key(id));
        let done = Done::Receipt(receipt);
        if let Some(client) = by_client {
            let bind = match (&r.device_uid, r.binds) {
                (Some(device), true) if self.binds_on_connect_response => {
                    Some(self.bind(&mut t, client, device))
                }
                _ => None,
            };
            let device = bind.clone();
            let line = r.line;
            let routed = self.push(&mut t, client, Downlink { line, done, bind });
            if let Some(device) = device {
                self.release_held(&mut t, client, &device);
            }
            return routed;
        }
        let by_device = r
            .device_uid
            .as_deref()
            .and_then(|d| t.devices.get(d).copied());
        match (by_device, r.device_uid.as_deref()) {
            (Some(client), _) => {
                let msg = Downlink {
                    line: r.line,
                    done,
                    bind: None,
                };
                self.push(&mut t, client, msg)
            }
            // The device may come back (after a restart of this gateway,
            // say): the hold keeps the message for it, on disk.
            (None, Some(device)) => self.hold(device, &r.line, done),
            (None, None) => {
                log::debug!(
                    "undeliverable downlink for clientId {:?}: not connected here",
                    r.client_id
                );
                Routed::Undeliverable
            }
        }
    }

    /// Puts a message in the hold (a message already there stays).
    fn hold(&self, device: &str, line: &[u8], done: Done) -> Routed {
        let receipt = match done {
            Done::Receipt(r) => r,
            Done::Held { device, .. } => {
                self.hold.returned(&device);
                return Routed::Held;
            }
        };
        match self.hold.put(device, line, receipt) {
            Ok(_) => Routed::Held,
            Err(e) => {
                self.metrics.hold_errors.fetch_add(1, Relaxed);
                self.log_skipped(&format_args!(
                    "cannot hold a message for an offline device: {e}"
                ));
                Routed::Undeliverable
            }
        }
    }

    /// Hands the messages held for `device` to its new connection, in order.
    fn release_held(&self, t: &mut Tables, client: Uuid, device: &Arc<str>) {
        let released = match self.hold.release(device) {
            Ok(r) => r,
            Err(e) => {
                log::error!("cannot read the messages held for {}: {e}", escaped(device));
                return;
            }
        };
        for (seq, line) in released {
            let done = Done::Held {
                device: device.clone(),
                seq,
            };
            let msg = Downlink {
                line,
                done,
                bind: None,
            };
            if self.push(t, client, msg) != Routed::Delivered {
                self.hold.returned(device);
                break; // the connection was closed for not reading
            }
        }
    }

    /// The hold's writes since the last call, made durable (the consumer
    /// stores offsets of held records only after this).
    pub fn sync_hold(&self) {
        if let Err(e) = self.hold.sync() {
            log::error!("syncing the hold failed: {e}; its records' offsets wait");
        }
    }

    /// Messages `client` wrote to its device's socket.
    pub fn written(&self, msgs: Vec<Done>) {
        for done in msgs {
            if let Done::Held { device, seq } = done {
                if let Err(e) = self.hold.written(&device, seq) {
                    log::warn!("hold: {e}");
                }
            }
        }
    }

    /// Messages `client` could not write (its connection failed or ended
    /// first): they go to the device's new connection if it has one, else
    /// to the hold; a connection never bound counts them undeliverable.
    pub fn unwritten(&self, client: Uuid, msgs: Vec<Downlink>) {
        self.unwritten_in(&mut self.tables(), client, msgs);
    }

    fn unwritten_in(&self, t: &mut Tables, client: Uuid, msgs: Vec<Downlink>) {
        let device = t
            .clients
            .get(&client)
            .and_then(|c| c.device.clone().or_else(|| c.taken_from.clone()));
        for msg in msgs {
            let Some(device) = &device else {
                self.metrics.downlink_undeliverable.fetch_add(1, Relaxed);
                continue;
            };
            match t.devices.get(device).copied().filter(|&c| c != client) {
                Some(other) => {
                    self.push(t, other, msg);
                }
                None => {
                    self.hold(device, &msg.line, msg.done);
                }
            }
        }
    }

    /// Binds `client` to `device`; a previous holder of the device is closed.
    ///
    /// Presence: the old holder's `disconnected` (taken over) comes before
    /// the new one's `connected`; a connection bound again to another
    /// device (a second `connect.response`) ends the first binding
    /// (`closed`).
    fn bind(&self, t: &mut Tables, client: Uuid, device: &str) -> Arc<str> {
        let device: Arc<str> = Arc::from(device);
        if let Some(old) = t.devices.insert(device.clone(), client) {
            if old != client {
                if let Some(conn) = t.clients.get_mut(&old) {
                    conn.taken_from = conn.device.take();
                    log::info!(
                        "device {} moved to connection {client}; closing {old}",
                        escaped(&device)
                    );
                    self.metrics.connections_taken_over.fetch_add(1, Relaxed);
                    let _ = conn.socket.get_ref().shutdown(Shutdown::Both);
                    t.presence(Change::Disconnected(Reason::TakenOver), &device, old);
                }
            }
        }
        let Some(conn) = t.clients.get_mut(&client) else {
            return device;
        };
        let previous = conn.device.replace(device.clone());
        if previous.as_ref() == Some(&device) {
            return device; // bound again to the same device: nothing changed
        }
        if let Some(previous) = previous {
            if t.devices.get(&previous) == Some(&client) {
                t.devices.remove(&previous);
                t.presence(Change::Disconnected(Reason::Closed), &previous, client);
            }
        }
        t.presence(Change::Connected, &device, client);
        device
    }

    fn push(&self, t: &mut Tables, client: Uuid, msg: Downlink) -> Routed {
        let Some(conn) = t.clients.get_mut(&client) else {
            return Routed::Undeliverable;
        };
        let pending = conn.mailbox.len();
        if pending >= self.max_pending {
            log::warn!(
                "connection {client} has {pending} downlink messages unread; disconnecting it"
            );
            self.metrics.connections_closed_slow.fetch_add(1, Relaxed);
            conn.closed_for.get_or_insert(Reason::Error);
            let _ = conn.socket.get_ref().shutdown(Shutdown::Both);
            return match conn.device.clone() {
                Some(device) => self.hold(&device, &msg.line, msg.done),
                None => Routed::Undeliverable,
            };
        }
        conn.mailbox.push(msg);
        Routed::Delivered
    }
}

#[cfg(test)]
mod tests;
