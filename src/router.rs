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

use smol::Async;
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::protocol::{parse_server_response, ServerResponse};

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
}

/// What became of one downlink record.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    Delivered,
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
        self.bind(&mut t, client_id, device)
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
            return self.push(&mut t, client, Downlink { line: r.line, bind });
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
            None => {
                log::debug!(
                    "undeliverable downlink for clientId {:?} deviceUid {:?}: not connected here",
                    r.client_id,
                    r.device_uid
                );
                Routed::Undeliverable
            }
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
        assert_eq!(
            r.route(&msg(&Uuid::new_v4(), "dev-1", "x", "ok")),
            Routed::Undeliverable
        );
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
            Routed::Undeliverable
        );
        assert_eq!(
            r.route(&msg(&Uuid::new_v4(), "dev-2", "x", "ok")),
            Routed::Delivered
        );
        assert_eq!(rxb.len(), 3);
        r.unregister(&b);
        assert_eq!(
            r.route(&msg(&Uuid::new_v4(), "dev-2", "x", "ok")),
            Routed::Undeliverable
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
            Routed::Undeliverable
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
