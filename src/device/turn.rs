//! The frames of one turn of a connection (one read, or part of one): their
//! replies in order, and the requests to append to the outbox, gathered
//! without I/O and answered together once the append is on disk.

use std::net::SocketAddr;
use std::ops::Range;

use uuid::Uuid;

use crate::device::Shared;
use crate::ops::metrics::AuthFailure;
use crate::outbox::{AppendBatch, AppendError};
use crate::wire::protocol::{self, ErrorCode, Reason};

/// An ack without its uid: `{"action":"ack","uid":,"messageId":"<36>","status":"accepted"}\n`.
const ACK_BYTES: usize = 96;

/// Input bytes a turn's buffers are sized for at most, before it starts.
const INPUT_ESTIMATE_CAP: usize = 32 << 10;

/// Why a connection ended.
#[derive(Debug)]
pub(super) enum Closed {
    ByPeer,
    Idle,
    ShuttingDown,
    AuthTimeout,
    Unauthorized,
    /// Its incomplete frame would go past `listener.max_partial_bytes`.
    PartialBudget,
}

/// The presence reason (PROTOCOL 6.2) for how a connection ended.
pub(super) fn presence_reason(end: &std::io::Result<Closed>) -> Reason {
    use std::io::ErrorKind::*;
    match end {
        Ok(Closed::ByPeer) => Reason::Closed,
        Ok(Closed::Idle) => Reason::Idle,
        Ok(Closed::ShuttingDown) => Reason::Shutdown,
        // A bound connection is refused only when found revoked.
        Ok(Closed::Unauthorized) => Reason::Revoked,
        Ok(Closed::AuthTimeout | Closed::PartialBudget) => Reason::Error,
        Err(e) if matches!(e.kind(), ConnectionReset | BrokenPipe | UnexpectedEof) => {
            Reason::Closed
        }
        Err(_) => Reason::Error,
    }
}

/// The frames of one read, before their append is on disk.
#[derive(Default)]
pub(super) struct Work {
    /// Accepted requests, each to be answered with an ack of about
    /// [`ACK_BYTES`].
    pub(super) accepted: usize,
    /// Reply text and the uids of accepted requests, referenced by range.
    pub(super) text: Vec<u8>,
    pub(super) replies: Vec<Reply>,
    pub(super) batch: AppendBatch,
    pub(super) frames: usize,
    /// Set when the connection closes after these replies.
    pub(super) close: Option<Closed>,
}

impl Work {
    /// Room for the requests of `input` bytes of frames, so a turn's
    /// buffers are allocated once rather than grown by doubling (each
    /// growth copied everything so far: 650 instructions a request).
    /// An envelope is about twice its request plus 250 bytes; the estimate
    /// is capped, so a read of pings or errors wastes little.
    pub(super) fn with_room_for(input: usize) -> Self {
        let input = input.min(INPUT_ESTIMATE_CAP);
        let mut work = Work::default();
        work.batch.reserve(input * 5 / 2);
        work.text.reserve(input / 4);
        work.replies.reserve(input / 128);
        work
    }

    /// Every reply in order, the accepted requests' acks or errors
    /// according to how their append went.
    pub(super) fn replies_text(&self, outcome: &Result<(), AppendError>) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.reply_bytes());
        for reply in &self.replies {
            match reply {
                Reply::Ready(range) => out.extend_from_slice(&self.text[range.clone()]),
                Reply::Pending(uid, id) => {
                    let uid = std::str::from_utf8(&self.text[uid.clone()]).unwrap_or("\"\"");
                    match outcome {
                        Ok(()) => protocol::write_ack(&mut out, uid, id),
                        Err(e) => protocol::write_error(
                            &mut out,
                            Some(uid),
                            refusal_code(e),
                            &refusal_message(e),
                        ),
                    }
                }
            }
        }
        out
    }

    /// What the replies will take once written.
    pub(super) fn reply_bytes(&self) -> usize {
        self.text.len() + self.accepted * ACK_BYTES
    }
}

pub(super) enum Reply {
    Ready(Range<usize>),
    /// Accepted: an ack if the append succeeds, else an error. Holds the
    /// range of the uid's raw JSON.
    Pending(Range<usize>, Uuid),
}

pub(super) fn error(
    work: &mut Work,
    shared: &Shared,
    uid: Option<&str>,
    code: ErrorCode,
    message: &str,
) {
    let start = work.text.len();
    shared.metrics.error(code);
    protocol::write_error(&mut work.text, uid, code, message);
    work.replies.push(Reply::Ready(start..work.text.len()));
}

/// A failed authentication: `unauthorized`, then the connection closes;
/// counted, and towards damping of the source address.
pub(super) fn refuse(
    work: &mut Work,
    shared: &Shared,
    peer: SocketAddr,
    uid: Option<&str>,
    why: AuthFailure,
    message: &str,
) {
    shared.metrics.auth_failure(why);
    shared.gate.damper.failure(peer.ip());
    error(work, shared, uid, ErrorCode::Unauthorized, message);
    work.close = Some(Closed::Unauthorized);
}

pub(super) fn refusal_code(e: &AppendError) -> ErrorCode {
    match e {
        AppendError::Full => ErrorCode::OutboxFull,
        AppendError::Closed => ErrorCode::ShuttingDown,
        AppendError::Store(_) => ErrorCode::Internal,
    }
}

fn refusal_message(e: &AppendError) -> String {
    match e {
        AppendError::Full => {
            "the outbox is full; keep the request and send it again later".to_owned()
        }
        AppendError::Closed => {
            "the gateway is shutting down; send this request again after reconnecting".to_owned()
        }
        AppendError::Store(_) => "the request could not be stored; send it again".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_refusals_map_to_the_contract_codes() {
        assert_eq!(refusal_code(&AppendError::Full), ErrorCode::OutboxFull);
        assert_eq!(
            refusal_code(&AppendError::Store("io".into())),
            ErrorCode::Internal
        );
        assert_eq!(refusal_code(&AppendError::Closed), ErrorCode::ShuttingDown);
        // The device is told to keep and resend its request in each case.
        for e in [
            AppendError::Full,
            AppendError::Store("x".into()),
            AppendError::Closed,
        ] {
            assert!(refusal_message(&e).contains("again"), "{e}");
        }
    }
}
