use std::time::Duration;

use super::*;

/// Every open connection is one task: its state is what an idle
/// connection costs (with the socket's registration and the router's
/// entry). It once grew past 4 KiB when the TLS handshake's state was
/// kept inline in every task; boxing that and the transient paths (a
/// batch being answered, a downlink write) brought it to about 800.
#[test]
fn an_idle_connection_task_stays_small() {
    use crate::config::{AuthConfig, ListenerConfig};
    use crate::ops::metrics::Metrics;
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let (store, _bell) =
        crate::outbox::Store::open(&dir.path().join("outbox"), 1 << 30, metrics.clone()).unwrap();
    let (appender, _writer) =
        crate::outbox::start_writer(store, Duration::from_millis(2), Duration::ZERO);
    let limits = crate::routing::hold::HoldLimits {
        ttl: Duration::from_secs(60),
        max_per_device: 10,
        max_bytes: 1 << 20,
    };
    let hold = crate::routing::hold::Hold::open(&dir.path().join("hold"), limits, metrics.clone())
        .unwrap();
    let auth = AuthConfig {
        mode: AuthMode::None,
        token_key_file: None,
        revoked_file: None,
        timeout: Duration::from_secs(10),
        max_pending_bytes: 4096,
    };
    let shared = Arc::new(Shared {
        server_id: "gw".into(),
        reply_topic: None,
        limits: ListenerConfig {
            address: "127.0.0.1:0".parse().unwrap(),
            max_frame_bytes: 65536,
            max_json_depth: 32,
            max_connections: 10,
            idle_timeout: Duration::from_secs(300),
            max_pending_downlink: 10,
            max_pending_reply_bytes: 256 << 10,
            max_partial_bytes: 64 << 20,
        },
        metrics: metrics.clone(),
        router: Arc::new(crate::routing::Router::new(
            "gw".into(),
            10,
            metrics.clone(),
            Arc::new(hold),
        )),
        appender,
        gate: Arc::new(crate::security::auth::Gate::new(&auth, metrics).unwrap()),
        rate: None,
        shutting_down: Default::default(),
        open: Default::default(),
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let _peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (ours, peer) = listener.accept().unwrap();
    let task = serve(Arc::new(Async::new(ours).unwrap()), peer, shared, None);
    let size = std::mem::size_of_val(&task);
    eprintln!("connection task: {size} bytes");
    assert!(size <= 1024, "a connection task takes {size} bytes");
}
