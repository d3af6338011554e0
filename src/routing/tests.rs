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
