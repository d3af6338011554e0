use super::*;
use crate::wire::protocol::{Change, Reason};
use std::time::Duration;
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

fn hold(metrics: &Arc<Metrics>) -> Arc<Hold> {
    // Kept for the test binary's life: the router outlives any one scope.
    let dir: &'static tempfile::TempDir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
    let limits = hold::HoldLimits {
        ttl: Duration::from_secs(3600),
        max_per_device: 1000,
        max_bytes: 1 << 20,
    };
    Arc::new(Hold::open(dir.path(), limits, metrics.clone()).unwrap())
}

fn router_with(max_pending: usize, metrics: Arc<Metrics>) -> Router {
    let hold = hold(&metrics);
    Router::new("gw".into(), max_pending, metrics, hold)
}

fn router() -> Router {
    router_with(3, Arc::new(Metrics::default()))
}

impl Router {
    /// A record from nowhere in particular: its receipt tracks nothing.
    fn route_untracked(&self, payload: &[u8]) -> Routed {
        self.route(payload, Receipt::untracked())
    }
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
        r.route_untracked(&msg(&a, "dev-1", "connect.response", "ok")),
        Routed::Delivered
    );
    assert_eq!(rx.try_pop().unwrap().bind.as_deref(), Some("dev-1"));
    let other = Uuid::new_v4();
    assert_eq!(
        r.route_untracked(&msg(&other, "dev-1", "notice", "ok")),
        Routed::Delivered
    );
    assert!(rx.try_pop().unwrap().bind.is_none());
}

#[test]
fn failed_connect_response_binds_nothing() {
    let r = router();
    let (a, rx, _peer) = conn(&r);
    assert_eq!(
        r.route_untracked(&msg(&a, "dev-1", "connect.response", "error")),
        Routed::Delivered
    );
    assert!(rx.try_pop().unwrap().bind.is_none());
    // Nobody is dev-1: the message is held for it, not delivered here.
    assert_eq!(
        r.route_untracked(&msg(&Uuid::new_v4(), "dev-1", "x", "ok")),
        Routed::Held
    );
    assert_eq!(rx.len(), 0);
}

#[test]
fn newer_binding_takes_over_and_rebinding_moves() {
    let r = router();
    let (a, _rxa, mut peer_a) = conn(&r);
    let (b, rxb, _peer_b) = conn(&r);
    r.route_untracked(&msg(&a, "dev-1", "connect.response", "ok"));
    r.route_untracked(&msg(&b, "dev-1", "connect.response", "ok"));
    // a's socket was shut down: its peer reads EOF.
    let mut buf = [0u8; 1];
    use std::io::Read;
    assert_eq!(peer_a.read(&mut buf).unwrap(), 0);
    // b moves to dev-2: dev-1 no longer routes anywhere.
    r.route_untracked(&msg(&b, "dev-2", "connect.response", "ok"));
    assert_eq!(
        r.route_untracked(&msg(&Uuid::new_v4(), "dev-1", "x", "ok")),
        Routed::Held
    );
    assert_eq!(
        r.route_untracked(&msg(&Uuid::new_v4(), "dev-2", "x", "ok")),
        Routed::Delivered
    );
    assert_eq!(rxb.len(), 3);
    r.unregister(&b, Reason::Closed);
    assert_eq!(
        r.route_untracked(&msg(&Uuid::new_v4(), "dev-2", "x", "ok")),
        Routed::Held
    );
}

#[test]
fn authenticated_identity_is_not_moved_by_the_backend() {
    use std::io::Read;
    let r = router().identity_from_auth();
    let (a, rx, _peer) = conn(&r);
    r.route_untracked(&msg(&a, "dev-9", "connect.response", "ok"));
    assert!(rx.try_pop().unwrap().bind.is_none());
    assert_eq!(
        r.route_untracked(&msg(&Uuid::new_v4(), "dev-9", "x", "ok")),
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
        r.route_untracked(&msg(&Uuid::new_v4(), "dev-9", "x", "ok")),
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
    let r = router_with(100, Arc::new(Metrics::default()));
    let gone = Uuid::new_v4();
    for i in 0..3 {
        let m = msg(&gone, "dev-h", &format!("n{i}"), "ok");
        assert_eq!(r.route_untracked(&m), Routed::Held);
    }
    // Addressed by clientId alone, to a connection that is gone: nobody
    // could claim it.
    assert_eq!(
        r.route_untracked(br#"{"deviceResponse":{"action":"x"},"clientId":"4f1e9c39-1c4e-4bb8-9a5e-4a0a4c4b7f00"}"#),
        Routed::Undeliverable
    );
    let (a, rx, _peer) = conn(&r);
    r.route_untracked(&msg(&a, "dev-h", "connect.response", "ok"));
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
fn held_messages_leave_the_hold_only_once_written() {
    let r = router();
    let gone = Uuid::new_v4();
    for i in 0..2 {
        let m = msg(&gone, "dev-w", &format!("n{i}"), "ok");
        assert_eq!(r.route_untracked(&m), Routed::Held);
    }
    let (a, rx, _peer) = conn(&r);
    r.route_untracked(&msg(&a, "dev-w", "connect.response", "ok"));
    let mut got: Vec<Downlink> = std::iter::from_fn(|| rx.try_pop()).collect();
    assert_eq!(got.len(), 3);
    // The connection writes the first two, then fails on the last: what it
    // could not write goes back to the hold, for the device's next bind.
    let last = got.pop().unwrap();
    r.written(got.into_iter().map(|d| d.done).collect());
    assert_eq!(r.hold.len(), 1);
    r.unwritten(a, vec![last]);
    r.unregister(&a, Reason::Error);
    let (b, rx, _peer) = conn(&r);
    r.route_untracked(&msg(&b, "dev-w", "connect.response", "ok"));
    let lines: Vec<String> = std::iter::from_fn(|| rx.try_pop())
        .map(|d| String::from_utf8(d.line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].contains("\"n1\""), "{lines:?}");
}

#[test]
fn what_a_closing_connection_never_wrote_is_held_for_its_device() {
    let r = router_with(100, Arc::new(Metrics::default()));
    let (a, rx, _peer) = conn(&r);
    r.route_untracked(&msg(&a, "dev-l", "connect.response", "ok"));
    let _ = rx.try_pop();
    for i in 0..3 {
        r.route_untracked(&msg(&Uuid::new_v4(), "dev-l", &format!("m{i}"), "ok"));
    }
    assert_eq!(rx.len(), 3);
    r.unregister(&a, Reason::Closed);
    assert_eq!(r.hold.len(), 3);
}

#[test]
fn other_servers_and_garbage_are_skipped() {
    let r = router();
    let (a, rx, _peer) = conn(&r);
    let mut for_other = msg(&a, "d", "x", "ok");
    for_other.truncate(for_other.len() - 1);
    for_other.extend_from_slice(br#","serverId":"other"}"#);
    assert_eq!(r.route_untracked(&for_other), Routed::OtherServer);
    assert_eq!(r.route_untracked(b"{not json"), Routed::Malformed);
    assert_eq!(r.route_untracked(br#"{"clientId":"x"}"#), Routed::Malformed);
    assert_eq!(rx.len(), 0);
}

#[test]
fn full_queue_disconnects_instead_of_growing() {
    let r = router();
    let (a, rx, mut peer) = conn(&r);
    for _ in 0..3 {
        assert_eq!(
            r.route_untracked(&msg(&a, "d", "x", "ok")),
            Routed::Delivered
        );
    }
    assert_eq!(
        r.route_untracked(&msg(&a, "d", "x", "ok")),
        Routed::Undeliverable
    );
    assert_eq!(rx.len(), 3);
    let mut buf = [0u8; 1];
    use std::io::Read;
    assert_eq!(peer.read(&mut buf).unwrap(), 0);
}

#[test]
fn presence_events_follow_the_bindings_in_order() {
    let metrics = Arc::new(Metrics::default());
    let (queue, events) = presence::Queue::new(metrics.clone());
    let r = router_with(3, metrics).with_presence(queue);
    let seen = || -> Vec<(String, Uuid, Change)> {
        std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| (e.device_uid.to_string(), e.client_id, e.change))
            .collect()
    };
    let (a, _rxa, _pa) = conn(&r);
    let (b, _rxb, _pb) = conn(&r);
    r.route_untracked(&msg(&a, "dev-1", "connect.response", "ok"));
    // The same binding again changes nothing.
    r.route_untracked(&msg(&a, "dev-1", "connect.response", "ok"));
    assert_eq!(seen(), vec![("dev-1".into(), a, Change::Connected)]);
    // Takeover: the old holder's end comes first; its own unregister later
    // says nothing more, since it holds the device no longer.
    r.route_untracked(&msg(&b, "dev-1", "connect.response", "ok"));
    r.unregister(&a, Reason::Closed);
    assert_eq!(
        seen(),
        vec![
            ("dev-1".into(), a, Change::Disconnected(Reason::TakenOver)),
            ("dev-1".into(), b, Change::Connected),
        ]
    );
    // Moving to another device ends the first binding.
    r.route_untracked(&msg(&b, "dev-2", "connect.response", "ok"));
    assert_eq!(
        seen(),
        vec![
            ("dev-1".into(), b, Change::Disconnected(Reason::Closed)),
            ("dev-2".into(), b, Change::Connected),
        ]
    );
    // The router's reason for closing wins over what the connection saw.
    assert!(r.close_device("dev-2"));
    r.unregister(&b, Reason::Error);
    assert_eq!(
        seen(),
        vec![("dev-2".into(), b, Change::Disconnected(Reason::Revoked))]
    );
    let (c, _rxc, _pc) = conn(&r);
    r.route_untracked(&msg(&c, "dev-3", "connect.response", "ok"));
    r.close_all();
    r.end_presence();
    r.unregister(&c, Reason::Error);
    assert_eq!(seen(), vec![("dev-3".into(), c, Change::Connected)]);
    // Unbound connections make no events.
    let (d, _rxd, _pd) = conn(&r);
    r.unregister(&d, Reason::Idle);
    assert!(events.try_recv().is_err());
}

#[test]
fn shutdown_is_the_reason_when_the_router_closes_everyone() {
    let metrics = Arc::new(Metrics::default());
    let (queue, events) = presence::Queue::new(metrics.clone());
    let r = router_with(3, metrics).with_presence(queue);
    let (c, _rx, _p) = conn(&r);
    r.route_untracked(&msg(&c, "dev-3", "connect.response", "ok"));
    r.close_all();
    r.unregister(&c, Reason::Error);
    let changes: Vec<Change> = std::iter::from_fn(|| events.try_recv().ok())
        .map(|e| e.change)
        .collect();
    assert_eq!(
        changes,
        vec![Change::Connected, Change::Disconnected(Reason::Shutdown)]
    );
}
