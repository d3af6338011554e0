//! Running under systemd: the notify protocol (READY, STOPPING, WATCHDOG).

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

fn messages_until(socket: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = socket.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg == want;
            seen.push(msg);
            if done {
                break;
            }
        }
    }
    seen
}

#[test]
fn notifies_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let mut gw = Gateway::start(
        GatewayOptions::offline()
            .env("NOTIFY_SOCKET", path.display())
            .env("WATCHDOG_USEC", 200_000)
            .env("EDGEGATE_KAFKA_DRAIN_TIMEOUT_SECS", 0),
    );
    let seen = messages_until(&socket, "READY=1", WAIT);
    assert!(seen.contains(&"READY=1".to_owned()), "{seen:?}");
    // Pings every 100 ms (half of WATCHDOG_USEC).
    let pings = messages_until(&socket, "never", Duration::from_millis(700));
    let count = pings.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(count >= 3, "only {count} watchdog pings: {pings:?}");
    gw.signal("TERM");
    let seen = messages_until(&socket, "STOPPING=1", WAIT);
    assert!(seen.contains(&"STOPPING=1".to_owned()), "{seen:?}");
    assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
}
