//! The ServerRequest envelope a request becomes in Kafka (PROTOCOL 2.1):
//! the request's raw JSON spliced in, its record key and its timestamp.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use super::reply::write_json_str;
use super::Request;

/// What a Kafka record adds to the frame it carries, at most: the
/// envelope's own fields (a 128-byte bound deviceUid of control characters
/// escaped six times over included), the record key and the `message-id`
/// header. A frame of `max_frame_bytes` must fit Kafka's message limit with
/// this added, or it would be acked and then refused by every retry.
pub const RECORD_OVERHEAD_BYTES: usize = 2048;

/// Who sent a request, as the envelope records it.
pub struct Origin<'a> {
    pub server_id: &'a str,
    pub client_id: &'a Uuid,
    pub bound_device: Option<&'a str>,
    /// The gateway's reply topic (PROTOCOL 6.1), when it has one.
    pub reply_topic: Option<&'a str>,
}

/// Appends the ServerRequest JSON for `req` (no trailing newline).
pub fn write_envelope(
    out: &mut Vec<u8>,
    req: &Request<'_>,
    origin: &Origin<'_>,
    message_id: &Uuid,
    received_at: &Timestamp,
) {
    let mut ids = Uuid::encode_buffer();
    out.extend_from_slice(b"{\"deviceRequest\":{\"action\":");
    out.extend_from_slice(req.action.raw.as_bytes());
    out.extend_from_slice(b",\"deviceUid\":");
    match &req.device_uid {
        Some(d) => out.extend_from_slice(d.raw.as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"uid\":");
    out.extend_from_slice(req.uid.raw.as_bytes());
    out.extend_from_slice(b",\"data\":");
    match req.data {
        Some(d) => out.extend_from_slice(d.get().as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b"},\"serverId\":");
    write_json_str(out, origin.server_id);
    out.extend_from_slice(b",\"clientId\":\"");
    out.extend_from_slice(
        origin
            .client_id
            .hyphenated()
            .encode_lower(&mut ids)
            .as_bytes(),
    );
    out.extend_from_slice(b"\",\"deviceUid\":");
    match origin.bound_device {
        Some(d) => write_json_str(out, d),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"messageId\":\"");
    out.extend_from_slice(message_id.hyphenated().encode_lower(&mut ids).as_bytes());
    out.extend_from_slice(b"\",\"receivedAt\":\"");
    out.extend_from_slice(received_at.as_bytes());
    out.push(b'"');
    if let Some(topic) = origin.reply_topic {
        out.extend_from_slice(b",\"replyTopic\":");
        write_json_str(out, topic);
    }
    out.push(b'}');
}

/// The Kafka record key: bound deviceUid, else the claimed one, else clientId.
pub fn record_key<'a>(
    req: &'a Request<'_>,
    origin: &'a Origin<'_>,
    client_id_buf: &'a mut [u8; 45],
) -> &'a [u8] {
    if let Some(d) = origin.bound_device {
        d.as_bytes()
    } else if let Some(d) = &req.device_uid {
        d.value.as_bytes()
    } else {
        origin
            .client_id
            .hyphenated()
            .encode_lower(client_id_buf)
            .as_bytes()
    }
}

/// An RFC 3339 UTC timestamp with milliseconds, e.g. `2026-11-25T22:00:00.123Z`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Timestamp([u8; 24]);

impl Timestamp {
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self::from_unix_millis(since.as_millis() as i64)
    }

    pub fn from_unix_millis(ms: i64) -> Self {
        let secs = ms.div_euclid(1000);
        let millis = ms.rem_euclid(1000) as u32;
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400) as u32;
        let (y, m, d) = civil_from_days(days);
        let mut b = [0u8; 24];
        let mut put = |at: usize, v: u32, width: usize| {
            let mut v = v;
            for i in (0..width).rev() {
                b[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, y.clamp(0, 9999) as u32, 4);
        put(5, m, 2);
        put(8, d, 2);
        put(11, sod / 3600, 2);
        put(14, sod / 60 % 60, 2);
        put(17, sod % 60, 2);
        put(20, millis, 3);
        b[4] = b'-';
        b[7] = b'-';
        b[10] = b'T';
        b[13] = b':';
        b[16] = b':';
        b[19] = b'.';
        b[23] = b'Z';
        Timestamp(b)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.0).unwrap_or("?"))
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}
