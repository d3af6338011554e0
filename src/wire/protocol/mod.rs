//! The wire contract: device requests and replies (PROTOCOL 1), the Kafka
//! envelopes (PROTOCOL 2). Parsing borrows from the frame and splices the raw
//! JSON of validated fields into the envelope instead of re-serialising it.
//!
//! Here: a device's frame, parsed and checked (PROTOCOL 1.1). Beside it:
//! `reply` (1.2), `envelope` (2.1), `downlink` (2.2).

mod downlink;
mod envelope;
mod presence;
mod reply;
mod shape;
#[cfg(test)]
mod tests;

pub use downlink::{parse_server_response, ResponseError, ServerResponse};
pub use envelope::{record_key, write_envelope, Origin, Timestamp, RECORD_OVERHEAD_BYTES};
pub use presence::{write_presence, Change, Presence, Reason};
pub use reply::{
    write_ack, write_auth_ok, write_error, write_json_str, write_pong, write_rate_limited,
    write_rejection,
};

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use shape::ShapeError;

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
    RateLimited,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadJson,
        ErrorCode::BadRequest,
        ErrorCode::FrameTooLarge,
        ErrorCode::OutboxFull,
        ErrorCode::Unauthorized,
        ErrorCode::ServerBusy,
        ErrorCode::ShuttingDown,
        ErrorCode::RateLimited,
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
            ErrorCode::RateLimited => "rate_limited",
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

/// The default of `listener.max_json_depth` (PROTOCOL 1.1).
pub const DEFAULT_MAX_JSON_DEPTH: usize = 32;

/// Parses and validates one frame (a line without its terminator); arrays
/// and objects may nest `max_depth` levels, the frame's own included.
pub fn parse_frame(line: &[u8], max_depth: usize) -> Result<Inbound<'_>, Rejection> {
    if line == b"Ping" {
        return Ok(Inbound::TextPing);
    }
    let text = match shape::check_shape(line, max_depth) {
        Ok(text) => text,
        Err(ShapeError::NotUtf8) => {
            return Err(Rejection::new(
                None,
                ErrorCode::BadJson,
                "the frame is not valid UTF-8",
            ))
        }
        Err(ShapeError::LoneSurrogate) => {
            return Err(Rejection::new(
                None,
                ErrorCode::BadJson,
                "the frame holds an escaped lone surrogate (\\ud800 to \\udfff without its pair), which is no Unicode text",
            ))
        }
        Err(ShapeError::TooDeep) => {
            // The uid is still read (serde skips `data` without recursing).
            let uid = serde_json::from_slice::<RawRequest<'_>>(line)
                .ok()
                .and_then(|r| optional_str(r.uid).ok().flatten());
            return Err(Rejection::new(
                uid.as_ref(),
                ErrorCode::BadRequest,
                format!("arrays and objects nest deeper than {max_depth} levels"),
            ));
        }
    };
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
        serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(bad_json)?;
        return Err(Rejection::new(
            None,
            ErrorCode::BadRequest,
            "the frame must be a JSON object",
        ));
    }
    let raw: RawRequest<'_> = serde_json::from_str(text).map_err(|e| {
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
        if !valid_device_uid(&d.value) {
            return Err(Rejection::new(
                uid_ref,
                ErrorCode::BadRequest,
                DEVICE_UID_RULE,
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

/// The one rule for a deviceUid, wherever it comes from (a request, an auth
/// frame, `edgegate token`, a certificate's CN): 1 to 128 bytes, no control
/// characters, no whitespace at either end, and not starting with `#`. The
/// contract asks only for the length; the rest keeps every identity one
/// that the revocation file (lines trimmed, `#` lines skipped) can list and
/// that a log line cannot be forged with.
pub fn valid_device_uid(device_uid: &str) -> bool {
    !device_uid.is_empty()
        && device_uid.len() <= MAX_ID_BYTES
        && !device_uid.starts_with('#')
        && device_uid.trim() == device_uid
        && !device_uid.chars().any(char::is_control)
}

/// Why [`valid_device_uid`] refused, for the device.
pub const DEVICE_UID_RULE: &str =
    "deviceUid must be 1 to 128 bytes, without control characters, surrounding whitespace or a leading #";

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
