//! Replies the gateway itself writes to a device (PROTOCOL 1.2), appended
//! to a buffer as JSON lines.

use uuid::Uuid;

use super::{ErrorCode, Rejection};

/// Appends `{"action":"auth","uid":...,"status":"ok"}\n`.
pub fn write_auth_ok(out: &mut Vec<u8>, uid_json: &str) {
    out.extend_from_slice(b"{\"action\":\"auth\",\"uid\":");
    out.extend_from_slice(uid_json.as_bytes());
    out.extend_from_slice(b",\"status\":\"ok\"}\n");
}

/// Appends `{"action":"ack",...}\n`.
pub fn write_ack(out: &mut Vec<u8>, uid_json: &str, message_id: &Uuid) {
    out.extend_from_slice(b"{\"action\":\"ack\",\"uid\":");
    out.extend_from_slice(uid_json.as_bytes());
    out.extend_from_slice(b",\"status\":\"accepted\",\"messageId\":\"");
    out.extend_from_slice(
        message_id
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    out.extend_from_slice(b"\"}\n");
}

/// Appends `{"action":"error",...}\n`; `uid_json` is a raw JSON string or None.
pub fn write_error(out: &mut Vec<u8>, uid_json: Option<&str>, code: ErrorCode, message: &str) {
    out.extend_from_slice(b"{\"action\":\"error\",\"uid\":");
    out.extend_from_slice(uid_json.unwrap_or("\"\"").as_bytes());
    out.extend_from_slice(b",\"status\":\"error\",\"errorCode\":\"");
    out.extend_from_slice(code.as_str().as_bytes());
    out.extend_from_slice(b"\",\"errorMessage\":");
    write_json_str(out, message);
    out.extend_from_slice(b"}\n");
}

/// Appends a `rate_limited` error with `retryAfterMs` (PROTOCOL 7).
pub fn write_rate_limited(out: &mut Vec<u8>, uid_json: &str, retry_after_ms: u64) {
    out.extend_from_slice(b"{\"action\":\"error\",\"uid\":");
    out.extend_from_slice(uid_json.as_bytes());
    out.extend_from_slice(
        b",\"status\":\"error\",\"errorCode\":\"rate_limited\",\"errorMessage\":\"over the rate limit: nothing was stored; send it again after retryAfterMs\",\"retryAfterMs\":",
    );
    out.extend_from_slice(retry_after_ms.to_string().as_bytes());
    out.extend_from_slice(b"}\n");
}

pub fn write_rejection(out: &mut Vec<u8>, r: &Rejection) {
    write_error(out, r.uid_json.as_deref(), r.code, &r.message);
}

/// Appends `{"action":"pong","uid":...,"status":"ok"}\n`.
pub fn write_pong(out: &mut Vec<u8>, uid_json: &str) {
    out.extend_from_slice(b"{\"action\":\"pong\",\"uid\":");
    out.extend_from_slice(uid_json.as_bytes());
    out.extend_from_slice(b",\"status\":\"ok\"}\n");
}

pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Most strings written per request (serverId, the reply topic) need no
    // escape: copied as they are, the same bytes serde_json would write.
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    // Writing a &str into a Vec cannot fail.
    serde_json::to_writer(&mut *out, s).expect("serialising a string into memory");
}
