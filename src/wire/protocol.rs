//! The wire contract: device requests and replies (PROTOCOL 1), the Kafka
//! envelopes (PROTOCOL 2). Parsing borrows from the frame and splices the raw
//! JSON of validated fields into the envelope instead of re-serialising it.

use std::borrow::Cow;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

/// Longest `action`, `uid` or `deviceUid`, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// The `errorCode` values of PROTOCOL 1.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadJson,
    BadRequest,
    FrameTooLarge,
    OutboxFull,
    Unauthorized,
    ServerBusy,
    ShuttingDown,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::BadJson,
        ErrorCode::BadRequest,
        ErrorCode::FrameTooLarge,
        ErrorCode::OutboxFull,
        ErrorCode::Unauthorized,
        ErrorCode::ServerBusy,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::OutboxFull => "outbox_full",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ServerBusy => "server_busy",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A frame the gateway refuses, with what to tell the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The request's uid as raw JSON (a quoted string), if one could be read.
    pub uid_json: Option<String>,
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
}

impl Rejection {
    fn new(
        uid: Option<&JsonStr<'_>>,
        code: ErrorCode,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Rejection {
            uid_json: uid.map(|u| u.raw.to_owned()),
            code,
            message: message.into(),
        }
    }
}

/// A JSON string field: its raw form (with quotes and escapes, ready to
/// splice) and its decoded value (for validation and routing).
#[derive(Debug, Clone)]
pub struct JsonStr<'a> {
    pub raw: &'a str,
    pub value: Cow<'a, str>,
}

/// A validated DeviceRequest (PROTOCOL 1.1).
#[derive(Debug)]
pub struct Request<'a> {
    pub action: JsonStr<'a>,
    pub uid: JsonStr<'a>,
    pub device_uid: Option<JsonStr<'a>>,
    pub data: Option<&'a RawValue>,
}

/// What a well-formed frame asks for.
#[derive(Debug)]
pub enum Inbound<'a> {
    /// The bare `Ping` line of the original server's clients.
    TextPing,
    /// `{"action":"ping",...}`: answered, never forwarded.
    JsonPing(JsonStr<'a>),
    Request(Request<'a>),
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow)]
    action: Option<&'a RawValue>,
    #[serde(borrow)]
    uid: Option<&'a RawValue>,
    #[serde(borrow, rename = "deviceUid")]
    device_uid: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// Parses and validates one frame (a line without its terminator).
pub fn parse_frame(line: &[u8]) -> Result<Inbound<'_>, Rejection> {
    if line == b"Ping" {
        return Ok(Inbound::TextPing);
    }
    let bad_json = |e: serde_json::Error| {
        Rejection::new(
            None,
            ErrorCode::BadJson,
            format!("the frame is not valid JSON: {e}"),
        )
    };
    if line.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        // serde would read an array into the struct field by field; check
        // the syntax alone, then refuse anything but an object.
        serde_json::from_slice::<serde::de::IgnoredAny>(line).map_err(bad_json)?;
        return Err(Rejection::new(
            None,
            ErrorCode::BadRequest,
            "the frame must be a JSON object",
        ));
    }
    let raw: RawRequest<'_> = serde_json::from_slice(line).map_err(|e| {
        if e.classify() == serde_json::error::Category::Data {
            Rejection::new(
                None,
                ErrorCode::BadRequest,
                format!("the request is not valid: {e}"),
            )
        } else {
            bad_json(e)
        }
    })?;

    // Read uid first so that every later error can echo it.
    let uid = match optional_str(raw.uid) {
        Ok(Some(uid)) => uid,
        Ok(None) => {
            return Err(Rejection::new(
                None,
                ErrorCode::BadRequest,
                "uid is missing",
            ))
        }
        Err(()) => {
            return Err(Rejection::new(
                None,
                ErrorCode::BadRequest,
                "uid must be a string",
            ))
        }
    };
    let uid_ref = Some(&uid);
    if uid.value.is_empty() || uid.value.len() > MAX_ID_BYTES {
        return Err(Rejection::new(
            uid_ref,
            ErrorCode::BadRequest,
            "uid must be 1 to 128 bytes long",
        ));
    }
    let action = match optional_str(raw.action) {
        Ok(Some(a)) => a,
        Ok(None) => {
            return Err(Rejection::new(
                uid_ref,
                ErrorCode::BadRequest,
                "action is missing",
            ))
        }
        Err(()) => {
            return Err(Rejection::new(
                uid_ref,
                ErrorCode::BadRequest,
                "action must be a string",
            ))
        }
    };
    if !valid_action(&action.value) {
        return Err(Rejection::new(
            uid_ref,
            ErrorCode::BadRequest,
            "action must be 1 to 128 characters of A-Z a-z 0-9 . _ : -",
        ));
    }
    let device_uid = match optional_str(raw.device_uid) {
        Ok(d) => d,
        Err(()) => {
            return Err(Rejection::new(
                uid_ref,
                ErrorCode::BadRequest,
                "deviceUid must be a string or null",
            ))
        }
    };
    if let Some(d) = &device_uid {
        if d.value.is_empty() || d.value.len() > MAX_ID_BYTES {
            return Err(Rejection::new(
                uid_ref,
                ErrorCode::BadRequest,
                "deviceUid must be 1 to 128 bytes long",
            ));
        }
    }
    if action.value == "ping" {
        return Ok(Inbound::JsonPing(uid));
    }
    let data = raw.data.filter(|d| d.get() != "null");
    Ok(Inbound::Request(Request {
        action,
        uid,
        device_uid,
        data,
    }))
}

/// The claim of an auth frame (PROTOCOL 5).
#[derive(Debug)]
pub struct AuthClaim<'a> {
    pub device_uid: Cow<'a, str>,
    pub token: Cow<'a, str>,
}

/// Reads `deviceUid` and `data.token` from a request whose action is
/// `auth`; `Err` says what is missing (never echoing the token).
pub fn auth_claim<'a>(req: &Request<'a>) -> Result<AuthClaim<'a>, &'static str> {
    #[derive(Deserialize)]
    struct AuthData<'a> {
        #[serde(borrow)]
        token: Option<Cow<'a, str>>,
    }
    let device_uid = req
        .device_uid
        .as_ref()
        .ok_or("the auth frame needs a deviceUid")?
        .value
        .clone();
    let data = req.data.ok_or("the auth frame needs data.token")?;
    let token = serde_json::from_str::<AuthData<'a>>(data.get())
        .ok()
        .and_then(|d| d.token)
        .ok_or("the auth frame needs data.token as a string")?;
    Ok(AuthClaim { device_uid, token })
}

/// A deviceUid taken from elsewhere (a certificate's CN) obeys the same
/// rule as one in a request.
pub fn valid_device_uid(device_uid: &str) -> bool {
    !device_uid.is_empty() && device_uid.len() <= MAX_ID_BYTES
}

/// `Ok(None)` for absent or null, `Err` for a value that is not a string.
fn optional_str(raw: Option<&RawValue>) -> Result<Option<JsonStr<'_>>, ()> {
    let Some(raw) = raw else { return Ok(None) };
    let text = raw.get();
    if text == "null" {
        return Ok(None);
    }
    if !text.starts_with('"') {
        return Err(());
    }
    let value: Cow<'_, str> = if text.contains('\\') {
        Cow::Owned(serde_json::from_str::<String>(text).map_err(|_| ())?)
    } else {
        Cow::Borrowed(&text[1..text.len() - 1])
    };
    Ok(Some(JsonStr { raw: text, value }))
}

fn valid_action(action: &str) -> bool {
    !action.is_empty()
        && action.len() <= MAX_ID_BYTES
        && action
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

// ---- replies (PROTOCOL 1.2) ----

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
    // Writing a &str into a Vec cannot fail.
    serde_json::to_writer(&mut *out, s).expect("serialising a string into memory");
}

// ---- ServerRequest (PROTOCOL 2.1) ----

/// Who sent a request, as the envelope records it.
pub struct Origin<'a> {
    pub server_id: &'a str,
    pub client_id: &'a Uuid,
    pub bound_device: Option<&'a str>,
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
    out.extend_from_slice(b"\"}");
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
#[derive(Clone, Copy)]
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

// ---- ServerResponse (PROTOCOL 2.2) ----

/// A downlink record from a worker.
#[derive(Debug)]
pub struct ServerResponse<'a> {
    pub server_id: Option<Cow<'a, str>>,
    pub client_id: Option<Cow<'a, str>>,
    pub device_uid: Option<Cow<'a, str>>,
    /// The `deviceResponse` object as one line for the device, with `\n`.
    pub line: Vec<u8>,
    /// `deviceResponse.action == "connect.response"` and `status == "ok"`.
    pub binds: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResponseError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("deviceResponse is missing")]
    MissingDeviceResponse,
    #[error("deviceResponse is not a JSON object")]
    DeviceResponseNotObject,
}

#[derive(Deserialize)]
struct RawResponse<'a> {
    #[serde(borrow, rename = "deviceResponse")]
    device_response: Option<&'a RawValue>,
    #[serde(borrow, rename = "serverId", default)]
    server_id: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "clientId", default)]
    client_id: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "deviceUid", default)]
    device_uid: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ResponseHead<'a> {
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
}

pub fn parse_server_response(payload: &[u8]) -> Result<ServerResponse<'_>, ResponseError> {
    let raw: RawResponse<'_> =
        serde_json::from_slice(payload).map_err(|e| ResponseError::Json(e.to_string()))?;
    let body = raw
        .device_response
        .ok_or(ResponseError::MissingDeviceResponse)?;
    let text = body.get();
    if !text.starts_with('{') {
        return Err(if text == "null" {
            ResponseError::MissingDeviceResponse
        } else {
            ResponseError::DeviceResponseNotObject
        });
    }
    // Only the two fields that decide binding are read; a worker is free to
    // put anything else in deviceResponse.
    let head: ResponseHead<'_> = serde_json::from_str(text).unwrap_or(ResponseHead {
        action: None,
        status: None,
    });
    let binds =
        head.action.as_deref() == Some("connect.response") && head.status.as_deref() == Some("ok");
    let mut line = Vec::with_capacity(text.len() + 1);
    if text.contains(['\n', '\r']) {
        // A pretty-printed object would break the device's line framing.
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ResponseError::Json(e.to_string()))?;
        serde_json::to_writer(&mut line, &value).map_err(|e| ResponseError::Json(e.to_string()))?;
    } else {
        line.extend_from_slice(text.as_bytes());
    }
    line.push(b'\n');
    Ok(ServerResponse {
        server_id: raw.server_id.filter(|s| !s.is_empty()),
        client_id: raw.client_id.filter(|s| !s.is_empty()),
        device_uid: raw.device_uid.filter(|s| !s.is_empty()),
        line,
        binds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reject(line: &str) -> Rejection {
        match parse_frame(line.as_bytes()) {
            Err(r) => r,
            Ok(other) => panic!("{line} was accepted as {other:?}"),
        }
    }

    fn request(line: &str) -> Request<'_> {
        match parse_frame(line.as_bytes()) {
            Ok(Inbound::Request(r)) => r,
            other => panic!("{line} gave {other:?}"),
        }
    }

    proptest::proptest! {
        /// Any auth frame the parser accepts gives back exactly its claim,
        /// and damaged frames never panic (they are refused or parsed).
        #[test]
        fn auth_frame_parsing_is_exact_and_total(
            device in "\\PC{0,140}",
            token in "\\PC{0,90}",
            edits in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 0..4),
        ) {
            let frame = serde_json::json!({"action":"auth","uid":"a1","deviceUid":device,"data":{"token":token}}).to_string();
            match parse_frame(frame.as_bytes()) {
                Ok(Inbound::Request(req)) => {
                    let claim = auth_claim(&req).unwrap();
                    proptest::prop_assert_eq!(&*claim.device_uid, device.as_str());
                    proptest::prop_assert_eq!(&*claim.token, token.as_str());
                }
                Ok(other) => proptest::prop_assert!(false, "{:?}", other),
                Err(r) => proptest::prop_assert!(device.is_empty() || device.len() > 128, "{:?}", r),
            }
            let mut damaged = frame.into_bytes();
            for (at, byte) in edits {
                let at = at % damaged.len();
                damaged[at] = byte;
            }
            if let Ok(Inbound::Request(req)) = parse_frame(&damaged) {
                let _ = auth_claim(&req);
            }
        }
    }

    #[test]
    fn auth_frames_give_their_claim() {
        let r = request(
            r#"{"action":"auth","uid":"a1","deviceUid":"dev-42","data":{"token":"ab\u0063"}}"#,
        );
        let claim = auth_claim(&r).unwrap();
        assert_eq!(claim.device_uid, "dev-42");
        assert_eq!(claim.token, "abc");
        for (line, why) in [
            (
                r#"{"action":"auth","uid":"a1","data":{"token":"t"}}"#,
                "deviceUid",
            ),
            (
                r#"{"action":"auth","uid":"a1","deviceUid":"d"}"#,
                "data.token",
            ),
            (
                r#"{"action":"auth","uid":"a1","deviceUid":"d","data":{"token":7}}"#,
                "string",
            ),
            (
                r#"{"action":"auth","uid":"a1","deviceUid":"d","data":[1]}"#,
                "string",
            ),
            (
                r#"{"action":"auth","uid":"a1","deviceUid":"d","data":{}}"#,
                "string",
            ),
        ] {
            let e = auth_claim(&request(line)).unwrap_err();
            assert!(e.contains(why), "{line}: {e}");
        }
        let mut out = Vec::new();
        write_auth_ok(&mut out, "\"a1\"");
        assert_eq!(
            out,
            b"{\"action\":\"auth\",\"uid\":\"a1\",\"status\":\"ok\"}\n"
        );
    }

    #[test]
    fn full_request_is_accepted() {
        let r = request(
            r#"{"action":"telemetry","deviceUid":"dev-42","uid":"req-1","data":{"t":21.5},"extra":1}"#,
        );
        assert_eq!(r.action.value, "telemetry");
        assert_eq!(r.uid.raw, "\"req-1\"");
        assert_eq!(r.device_uid.unwrap().value, "dev-42");
        assert_eq!(r.data.unwrap().get(), r#"{"t":21.5}"#);
    }

    #[test]
    fn nulls_count_as_absent() {
        let r = request(r#"{"action":"a","uid":"u","deviceUid":null,"data":null}"#);
        assert!(r.device_uid.is_none());
        assert!(r.data.is_none());
    }

    #[test]
    fn escaped_strings_are_decoded_for_checks_and_kept_raw_for_splicing() {
        let r = request(r#"{"action":"a","uid":"\u0041\n","deviceUid":"d\"x"}"#);
        assert_eq!(r.uid.value, "A\n");
        assert_eq!(r.uid.raw, r#""\u0041\n""#);
        assert_eq!(r.device_uid.unwrap().value, "d\"x");
    }

    #[test]
    fn pings() {
        assert!(matches!(parse_frame(b"Ping"), Ok(Inbound::TextPing)));
        match parse_frame(br#"{"action":"ping","uid":"p1"}"#) {
            Ok(Inbound::JsonPing(uid)) => assert_eq!(uid.raw, "\"p1\""),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_json_cases() {
        for line in ["{", "ping", "{\"uid\":\"x\"", "{\"a\":\u{0}}"] {
            assert_eq!(reject(line).code, ErrorCode::BadJson, "{line}");
        }
        let invalid_utf8 = b"{\"action\":\"a\",\"uid\":\"\xff\"}";
        assert_eq!(
            parse_frame(invalid_utf8).unwrap_err().code,
            ErrorCode::BadJson
        );
    }

    #[test]
    fn bad_request_cases_echo_the_uid() {
        let long = "x".repeat(129);
        let cases = [
            (r#"[1,2]"#.to_string(), None, "object"),
            (r#""str""#.to_string(), None, "object"),
            (r#"{"action":"a"}"#.to_string(), None, "uid is missing"),
            (
                r#"{"action":"a","uid":7}"#.to_string(),
                None,
                "uid must be a string",
            ),
            (
                r#"{"action":"a","uid":""}"#.to_string(),
                Some("\"\""),
                "uid must be",
            ),
            (
                format!(r#"{{"action":"a","uid":"{long}"}}"#),
                Some(&*format!("\"{long}\"")),
                "uid must be",
            ),
            (
                r#"{"uid":"u1"}"#.to_string(),
                Some("\"u1\""),
                "action is missing",
            ),
            (
                r#"{"uid":"u1","action":5}"#.to_string(),
                Some("\"u1\""),
                "action must be a string",
            ),
            (
                r#"{"uid":"u1","action":"a b"}"#.to_string(),
                Some("\"u1\""),
                "action must be",
            ),
            (
                r#"{"uid":"u1","action":""}"#.to_string(),
                Some("\"u1\""),
                "action must be",
            ),
            (
                format!(r#"{{"uid":"u1","action":"{long}"}}"#),
                Some("\"u1\""),
                "action must be",
            ),
            (
                r#"{"uid":"u1","action":"a","deviceUid":1}"#.to_string(),
                Some("\"u1\""),
                "deviceUid must be",
            ),
            (
                r#"{"uid":"u1","action":"a","deviceUid":""}"#.to_string(),
                Some("\"u1\""),
                "deviceUid must be",
            ),
        ];
        for (line, uid, msg) in cases {
            let r = reject(&line);
            assert_eq!(r.code, ErrorCode::BadRequest, "{line}");
            assert_eq!(r.uid_json.as_deref(), uid, "{line}");
            assert!(r.message.contains(msg), "{line}: {}", r.message);
        }
    }

    #[test]
    fn action_limit_is_inclusive() {
        let ok = "a".repeat(128);
        request(&format!(
            r#"{{"action":"{ok}","uid":"{ok}","deviceUid":"{ok}"}}"#
        ));
    }

    #[test]
    fn replies_are_single_json_lines() {
        let mut out = Vec::new();
        let id = Uuid::nil();
        write_ack(&mut out, "\"r1\"", &id);
        write_error(
            &mut out,
            None,
            ErrorCode::FrameTooLarge,
            "frame \"too\" large",
        );
        write_pong(&mut out, "\"p\"");
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0]["messageId"],
            "00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(lines[0]["status"], "accepted");
        assert_eq!(lines[1]["uid"], "");
        assert_eq!(lines[1]["errorCode"], "frame_too_large");
        assert_eq!(lines[1]["errorMessage"], "frame \"too\" large");
        assert_eq!(
            lines[2],
            serde_json::json!({"action":"pong","uid":"p","status":"ok"})
        );
    }

    #[test]
    fn envelope_has_every_field_of_the_contract() {
        let line =
            r#"{"action":"telemetry","uid":"req-1","deviceUid":"dev-\"42","data":{"t":[1,2]}}"#;
        let req = request(line);
        let client = Uuid::new_v4();
        let mid = Uuid::new_v4();
        let origin = Origin {
            server_id: "gw-1",
            client_id: &client,
            bound_device: None,
        };
        let mut out = Vec::new();
        write_envelope(
            &mut out,
            &req,
            &origin,
            &mid,
            &Timestamp::from_unix_millis(1_795_644_000_123),
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["deviceRequest"],
            serde_json::json!({"action":"telemetry","deviceUid":"dev-\"42","uid":"req-1","data":{"t":[1,2]}})
        );
        assert_eq!(v["serverId"], "gw-1");
        assert_eq!(v["clientId"], client.to_string());
        assert_eq!(v["deviceUid"], serde_json::Value::Null);
        assert_eq!(v["messageId"], mid.to_string());
        assert_eq!(v["receivedAt"], "2026-11-25T22:00:00.123Z");

        let mut buf = [0u8; 45];
        assert_eq!(record_key(&req, &origin, &mut buf), b"dev-\"42");
        let bound = Origin {
            bound_device: Some("dev-b"),
            ..origin
        };
        assert_eq!(record_key(&req, &bound, &mut buf), b"dev-b");
        let anon = request(r#"{"action":"a","uid":"u"}"#);
        let origin = Origin {
            server_id: "gw-1",
            client_id: &client,
            bound_device: None,
        };
        assert_eq!(
            record_key(&anon, &origin, &mut buf),
            client.to_string().as_bytes()
        );
        let mut out = Vec::new();
        write_envelope(&mut out, &anon, &origin, &mid, &Timestamp::now());
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["deviceRequest"]["data"], serde_json::Value::Null);
        assert_eq!(v["deviceRequest"]["deviceUid"], serde_json::Value::Null);
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            Timestamp::from_unix_millis(0).to_string(),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            Timestamp::from_unix_millis(951_782_400_999).to_string(),
            "2000-02-29T00:00:00.999Z"
        );
        assert_eq!(
            Timestamp::from_unix_millis(4_102_444_799_000).to_string(),
            "2099-12-31T23:59:59.000Z"
        );
    }

    #[test]
    fn server_response_routing_fields() {
        let r = parse_server_response(
            br#"{"deviceResponse":{"action":"connect.response","uid":"1","status":"ok"},"serverId":"","clientId":"c","deviceUid":"d"}"#,
        )
        .unwrap();
        assert!(r.binds);
        assert_eq!(r.server_id, None);
        assert_eq!(r.client_id.as_deref(), Some("c"));
        assert_eq!(
            r.line,
            b"{\"action\":\"connect.response\",\"uid\":\"1\",\"status\":\"ok\"}\n"
        );
        let r = parse_server_response(
            br#"{"deviceResponse":{"action":"connect.response","status":"error"}}"#,
        )
        .unwrap();
        assert!(!r.binds);
    }

    #[test]
    fn pretty_printed_device_response_becomes_one_line() {
        let r = parse_server_response(
            b"{\"deviceResponse\":{\n  \"action\": \"x\",\n  \"data\": [1,\n 2]\n}}",
        )
        .unwrap();
        assert_eq!(r.line, b"{\"action\":\"x\",\"data\":[1,2]}\n");
    }

    #[test]
    fn garbage_server_responses_are_errors() {
        assert!(matches!(
            parse_server_response(b"nope"),
            Err(ResponseError::Json(_))
        ));
        assert_eq!(
            parse_server_response(b"{}").unwrap_err(),
            ResponseError::MissingDeviceResponse
        );
        assert_eq!(
            parse_server_response(br#"{"deviceResponse":null}"#).unwrap_err(),
            ResponseError::MissingDeviceResponse
        );
        assert_eq!(
            parse_server_response(br#"{"deviceResponse":"hi"}"#).unwrap_err(),
            ResponseError::DeviceResponseNotObject
        );
        assert!(matches!(
            parse_server_response(br#"{"deviceResponse":{},"clientId":5}"#),
            Err(ResponseError::Json(_))
        ));
    }
}
