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

use crate::ops::metrics::Metrics;
use crate::wire::protocol::{parse_server_response, ServerResponse};

/// What the router sends to a connection task.
#[derive(Debug)]
pub struct Downlink {
    /// One JSON line for the device, with its `\n`.
    pub line: Vec<u8>,
    /// Set when this message binds the connection to a deviceUid.
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
}

impl Router {
    pub fn new(server_id: String, max_pending: usize, metrics: Arc<Metrics>) -> Self {
        Router {
            server_id,
            max_pending,
            binds_on_connect_response: true,
            metrics,
            tables: Mutex::new(Tables::default()),
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
        log::warn!("device {device} is revoked: closing its connection");
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

    /// Routes one record from a consumer topic (PROTOCOL 2.2).
    pub fn route(&self, payload: &[u8]) -> Routed {
        self.metrics.downlink_received.fetch_add(1, Relaxed);
        let response = match parse_server_response(payload) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.downlink_malformed.fetch_add(1, Relaxed);
                log::warn!("skipping a downlink record: {e}");
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
                    log::info!("device {device} moved to connection {client}; closing {old}");
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
mod tests {
    use super::*;
    fn socket() -> (Arc<Async<std::net::TcpStream>>, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        (Arc::new(Async::new(ours).unwrap()), peer)
    }

    fn conn(router: &Router) -> (Uuid, Arc<Mailbox>, std::net::TcpStream) {
        let (ours, peer) = socket();
        let mailbox = Arc::new(Mailbox::default());
        let id = Uuid::new_v4();
        router.register(id, ours, mailbox.clone());
        (id, mailbox, peer)
    }

    fn router() -> Router {
        Router::new("gw".into(), 3, Arc::new(Metrics::default()))
    }

    fn msg(client: &Uuid, device: &str, action: &str, status: &str) -> Vec<u8> {
        format!(
            r#"{{"deviceResponse":{{"action":"{action}","status":"{status}"}},"clientId":"{client}","deviceUid":"{device}"}}"#
        )
        .into_bytes()
    }

    #[test]
    fn connect_response_binds_and_device_routing_follows() {
        let r = router();
        let (a, rx, _peer) = conn(&r);
        assert_eq!(
            r.route(&msg(&a, "dev-1", "connect.response", "ok")),
            Routed::Delivered
        );
        assert_eq!(rx.try_pop().unwrap().bind.as_deref(), Some("dev-1"));
        let other = Uuid::new_v4();
        assert_eq!(
            r.route(&msg(&other, "dev-1", "notice", "ok")),
            Routed::Delivered
        );
        assert!(rx.try_pop().unwrap().bind.is_none());
    }

    #[test]
    fn failed_connect_response_binds_nothing() {
        let r = router();
        let (a, rx, _peer) = conn(&r);
        assert_eq!(
            r.route(&msg(&a, "dev-1", "connect.response", "error")),
            Routed::Delivered
        );
        assert!(rx.try_pop().unwrap().bind.is_none());
        // Nobody is dev-1: the message is held for it, not delivered here.
        assert_eq!(
            r.route(&msg(&Uuid::new_v4(), "dev-1", "x", "ok")),
            Routed::Held
        );
        assert_eq!(rx.len(), 0);
    }

    #[test]
    fn newer_binding_takes_over_and_rebinding_moves() {
        let r = router();
        let (a, _rxa, mut peer_a) = conn(&r);
        let (b, rxb, _peer_b) = conn(&r);
        r.route(&msg(&a, "dev-1", "connect.response", "ok"));
        r.route(&msg(&b, "dev-1", "connect.response", "ok"));
        // a's socket was shut down: its peer reads EOF.
        let mut buf = [0u8; 1];
        use std::io::Read;
        assert_eq!(peer_a.read(&mut buf).unwrap(), 0);
        // b moves to dev-2: dev-1 no longer routes anywhere.
        r.route(&msg(&b, "dev-2", "connect.response", "ok"));
        assert_eq!(
            r.route(&msg(&Uuid::new_v4(), "dev-1", "x", "ok")),
            Routed::Held
        );
        assert_eq!(
            r.route(&msg(&Uuid::new_v4(), "dev-2", "x", "ok")),
            Routed::Delivered
        );
        assert_eq!(rxb.len(), 3);
        r.unregister(&b);
        assert_eq!(
            r.route(&msg(&Uuid::new_v4(), "dev-2", "x", "ok")),
            Routed::Held
        );
    }

    #[test]
    fn authenticated_identity_is_not_moved_by_the_backend() {
        use std::io::Read;
        let r = router().identity_from_auth();
        let (a, rx, _peer) = conn(&r);
        r.route(&msg(&a, "dev-9", "connect.response", "ok"));
        assert!(rx.try_pop().unwrap().bind.is_none());
        assert_eq!(
            r.route(&msg(&Uuid::new_v4(), "dev-9", "x", "ok")),
            Routed::Held
        );
        // Authentication binds at once, and a second one takes over.
        let (first, mut first_peer) = socket();
        r.register_bound(Uuid::new_v4(), first, Arc::new(Mailbox::default()), "dev-9");
        let (second, mut second_peer) = socket();
        let rx2 = Arc::new(Mailbox::default());
        r.register_bound(Uuid::new_v4(), second, rx2.clone(), "dev-9");
        let mut buf = [0u8; 1];
        assert_eq!(first_peer.read(&mut buf).unwrap(), 0);
        assert_eq!(
            r.route(&msg(&Uuid::new_v4(), "dev-9", "x", "ok")),
            Routed::Delivered
        );
        assert_eq!(rx2.len(), 1);
        // Revocation closes the device's connection.
        assert!(r.close_device("dev-9"));
        assert_eq!(second_peer.read(&mut buf).unwrap(), 0);
        assert!(!r.close_device("nobody"));
    }

    #[test]
    fn messages_for_absent_devices_are_held_until_they_bind() {
        let r = Router::new("gw".into(), 100, Arc::new(Metrics::default()));
        let gone = Uuid::new_v4();
        for i in 0..3 {
            let m = msg(&gone, "dev-h", &format!("n{i}"), "ok");
            assert_eq!(r.route(&m), Routed::Held);
        }
        // Addressed by clientId alone, to a connection that is gone: nobody
        // could claim it.
        assert_eq!(
            r.route(br#"{"deviceResponse":{"action":"x"},"clientId":"4f1e9c39-1c4e-4bb8-9a5e-4a0a4c4b7f00"}"#),
            Routed::Undeliverable
        );
        let (a, rx, _peer) = conn(&r);
        r.route(&msg(&a, "dev-h", "connect.response", "ok"));
        let lines: Vec<String> = std::iter::from_fn(|| rx.try_pop())
            .map(|d| String::from_utf8(d.line).unwrap())
            .collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(lines[0].contains("connect.response"));
        for (i, line) in lines[1..].iter().enumerate() {
            assert!(
                line.contains(&format!("\"n{i}\"")),
                "held messages in order: {lines:?}"
            );
        }
        assert_eq!(r.metrics.downlink_held.load(Relaxed), 3);
        assert_eq!(r.metrics.downlink_held_released.load(Relaxed), 3);
    }

    #[test]
    fn held_messages_expire_and_are_capped() {
        let mut held = Held::default();
        let t0 = Instant::now();
        assert_eq!(held.hold("a", b"1".to_vec(), t0), 0);
        assert_eq!(
            held.hold("b", b"2".to_vec(), t0 + Duration::from_secs(30)),
            0
        );
        // The first one is past HOLD_FOR when the third arrives.
        assert_eq!(
            held.hold("a", b"3".to_vec(), t0 + HOLD_FOR + Duration::from_millis(1)),
            1
        );
        assert_eq!(held.take("a"), VecDeque::from([b"3".to_vec()]));
        let mut full = Held::default();
        let mut dropped = 0;
        for i in 0..HOLD_MAX + 5 {
            dropped += full.hold(&format!("d{}", i % 7), vec![], t0);
        }
        assert_eq!(dropped, 5);
        assert_eq!(full.order.len(), HOLD_MAX);
        let total: usize = full.by_device.values().map(VecDeque::len).sum();
        assert_eq!(total, HOLD_MAX);
    }

    #[test]
    fn other_servers_and_garbage_are_skipped() {
        let r = router();
        let (a, rx, _peer) = conn(&r);
        let mut for_other = msg(&a, "d", "x", "ok");
        for_other.truncate(for_other.len() - 1);
        for_other.extend_from_slice(br#","serverId":"other"}"#);
        assert_eq!(r.route(&for_other), Routed::OtherServer);
        assert_eq!(r.route(b"{not json"), Routed::Malformed);
        assert_eq!(r.route(br#"{"clientId":"x"}"#), Routed::Malformed);
        assert_eq!(rx.len(), 0);
    }

    #[test]
    fn full_queue_disconnects_instead_of_growing() {
        let r = router();
        let (a, rx, mut peer) = conn(&r);
        for _ in 0..3 {
            assert_eq!(r.route(&msg(&a, "d", "x", "ok")), Routed::Delivered);
        }
        assert_eq!(r.route(&msg(&a, "d", "x", "ok")), Routed::Undeliverable);
        assert_eq!(rx.len(), 3);
        let mut buf = [0u8; 1];
        use std::io::Read;
        assert_eq!(peer.read(&mut buf).unwrap(), 0);
    }
}
