//! A ServerResponse record from a worker (PROTOCOL 2.2), read for routing.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

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
