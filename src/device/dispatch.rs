//! The decision for one frame, as a pure function of the frame and what the
//! connection knows: where it stands with authentication, the deviceUid it
//! is bound to, whether the gateway is shutting down. The connection task
//! (`connection.rs`) carries the decision out (replies, the outbox, the
//! router, metrics); nothing here does I/O, so the auth state machine of
//! PROTOCOL 5 is tested below without a socket.

use std::borrow::Cow;

use crate::ops::metrics::AuthFailure;
use crate::wire::frame::Frame;
use crate::wire::protocol::{self, ErrorCode, Inbound, Rejection, Request};

/// Where a connection stands with authentication (PROTOCOL 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthState {
    /// `auth.mode = none`.
    Open,
    /// Token mode, before a valid auth frame: only pings and auth.
    Pending,
    /// Authenticated by token or certificate.
    Done,
}

/// What the connection knows when a frame arrives.
#[derive(Debug, Clone, Copy)]
pub struct Session<'s> {
    pub auth: AuthState,
    /// The deviceUid the connection is bound to (PROTOCOL 1.4, 5).
    pub bound: Option<&'s str>,
    pub shutting_down: bool,
    pub max_frame_bytes: usize,
    pub max_json_depth: usize,
}

/// The device's claim in an auth frame, checked by the caller's
/// authenticator: the deviceUid it proves, or why not.
pub type AuthResult = Result<String, (AuthFailure, &'static str)>;

/// What to do with one frame.
#[derive(Debug)]
pub enum Decision<'f> {
    /// The text ping: answer `Pong`.
    Pong,
    /// The JSON ping: answer a pong with its uid.
    JsonPong { uid: &'f str },
    /// Not valid per PROTOCOL 1.1: the rejection's error; nothing stored.
    Reject(Rejection),
    /// An error reply; the connection stays open.
    Error {
        uid: Option<&'f str>,
        code: ErrorCode,
        message: Cow<'static, str>,
    },
    /// A request read after shutdown began: `shutting_down`, then close.
    ShuttingDown { uid: &'f str },
    /// Token mode: `unauthorized`, counted towards damping, then close.
    /// (The uid of a frame that did not parse is owned by its rejection.)
    Refuse {
        uid: Option<Cow<'f, str>>,
        why: AuthFailure,
        message: &'static str,
    },
    /// Token mode: a valid auth frame; bind the connection to `device`.
    Authenticated { uid: &'f str, device: String },
    /// A request to store, and ack once it is durable.
    Accept(Request<'f>),
}

pub const NOT_AUTH_FIRST: &str = "authenticate first: the first frame must be an auth frame";

/// Decides what one frame calls for. `authenticate` checks an auth frame's
/// token and revocation (only called for an auth frame before
/// authentication).
pub fn decide<'f>(
    frame: Frame<'f>,
    session: &Session<'_>,
    authenticate: impl FnOnce(&Request<'f>) -> AuthResult,
) -> Decision<'f> {
    let pending = session.auth == AuthState::Pending;
    let line = match frame {
        Frame::TooLarge if pending => return not_auth_first(None),
        Frame::TooLarge => {
            return Decision::Error {
                uid: None,
                code: ErrorCode::FrameTooLarge,
                message: format!(
                    "the frame is longer than {} bytes and was discarded",
                    session.max_frame_bytes
                )
                .into(),
            }
        }
        Frame::Line(line) => line,
    };
    let req = match protocol::parse_frame(line, session.max_json_depth) {
        // Pings are answered whatever the state, and do not authenticate.
        Ok(Inbound::TextPing) => return Decision::Pong,
        Ok(Inbound::JsonPing(uid)) => return Decision::JsonPong { uid: uid.raw },
        Err(rejection) if pending => {
            return Decision::Refuse {
                uid: rejection.uid_json.map(Cow::Owned),
                why: AuthFailure::NotAuthFirst,
                message: NOT_AUTH_FIRST,
            }
        }
        Err(rejection) => return Decision::Reject(rejection),
        Ok(Inbound::Request(req)) => req,
    };
    let is_auth = req.action.value == "auth";
    match session.auth {
        AuthState::Pending if !is_auth => not_auth_first(Some(req.uid.raw)),
        AuthState::Pending => match authenticate(&req) {
            Ok(device) => Decision::Authenticated {
                uid: req.uid.raw,
                device,
            },
            Err((why, message)) => Decision::Refuse {
                uid: Some(Cow::Borrowed(req.uid.raw)),
                why,
                message,
            },
        },
        AuthState::Done if is_auth => Decision::Error {
            uid: Some(req.uid.raw),
            code: ErrorCode::BadRequest,
            message: "this connection is already authenticated".into(),
        },
        _ if session.shutting_down => Decision::ShuttingDown { uid: req.uid.raw },
        _ => match (session.bound, &req.device_uid) {
            (Some(bound), Some(claimed)) if bound != &*claimed.value => Decision::Error {
                uid: Some(req.uid.raw),
                code: ErrorCode::Unauthorized,
                message: "this connection is bound to another deviceUid".into(),
            },
            _ => Decision::Accept(req),
        },
    }
}

fn not_auth_first(uid: Option<&str>) -> Decision<'_> {
    Decision::Refuse {
        uid: uid.map(Cow::Borrowed),
        why: AuthFailure::NotAuthFirst,
        message: NOT_AUTH_FIRST,
    }
}

#[cfg(test)]
mod tests;
