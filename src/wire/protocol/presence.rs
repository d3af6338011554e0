//! Presence events (PROTOCOL 6.2): a record each time a connection becomes
//! bound to a device and each time a bound connection ends, keyed by the
//! deviceUid, so a compacted topic holds where every device is now.

use uuid::Uuid;

use super::reply::write_json_str;
use super::Timestamp;

/// Why a bound connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The device closed it.
    Closed,
    /// No frame within `listener.idle_timeout_secs`.
    Idle,
    /// The device connected again, and the new connection has it now.
    TakenOver,
    /// The device was put on the revocation list.
    Revoked,
    /// The gateway stopped.
    Shutdown,
    /// Anything else: a socket error, a device that would not read.
    Error,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Closed => "closed",
            Reason::Idle => "idle",
            Reason::TakenOver => "taken_over",
            Reason::Revoked => "revoked",
            Reason::Shutdown => "shutdown",
            Reason::Error => "error",
        }
    }
}

/// What happened: bound, or the end of a bound connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Connected,
    Disconnected(Reason),
}

/// One presence event, as the router saw it happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub change: Change,
    pub device_uid: std::sync::Arc<str>,
    pub client_id: Uuid,
    pub at: Timestamp,
}

/// Appends the event's JSON (no newline).
pub fn write_presence(
    out: &mut Vec<u8>,
    event: &Presence,
    server_id: &str,
    reply_topic: Option<&str>,
) {
    let name = match event.change {
        Change::Connected => "connected",
        Change::Disconnected(_) => "disconnected",
    };
    out.extend_from_slice(b"{\"event\":\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\",\"deviceUid\":");
    write_json_str(out, &event.device_uid);
    out.extend_from_slice(b",\"serverId\":");
    write_json_str(out, server_id);
    out.extend_from_slice(b",\"clientId\":\"");
    let mut ids = Uuid::encode_buffer();
    out.extend_from_slice(
        event
            .client_id
            .hyphenated()
            .encode_lower(&mut ids)
            .as_bytes(),
    );
    out.extend_from_slice(b"\",\"replyTopic\":");
    match reply_topic {
        Some(t) => write_json_str(out, t),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"at\":\"");
    out.extend_from_slice(event.at.as_bytes());
    out.push(b'"');
    if let Change::Disconnected(reason) = event.change {
        out.extend_from_slice(b",\"reason\":\"");
        out.extend_from_slice(reason.as_str().as_bytes());
        out.push(b'"');
    }
    out.push(b'}');
}
