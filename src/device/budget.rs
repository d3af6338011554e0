//! What a connection's incomplete frame may hold: bytes split across reads
//! wait in the connection's decoder, counted against one gateway-wide
//! budget (`listener.max_partial_bytes`) and, before token authentication,
//! a small per-connection one (`auth.max_pending_bytes`). PROTOCOL 7: a
//! hostile device's half-sent lines cannot take more than that.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use crate::device::turn::{error, refuse, Closed, Work};
use crate::device::Shared;
use crate::ops::metrics::AuthFailure;
use crate::wire::protocol::ErrorCode;

/// Accounts `held` bytes of incomplete frame for a connection that held
/// `*counted` until now, and closes it (after `work`'s replies) if that
/// goes past a budget.
pub(super) fn hold(
    shared: &Shared,
    peer: SocketAddr,
    pending_auth: bool,
    counted: &mut usize,
    held: usize,
    work: &mut Work,
) {
    let metrics = &shared.metrics;
    let change = held as i64 - *counted as i64;
    let total = metrics.partial_bytes.fetch_add(change, Relaxed) + change;
    let grew = held > *counted;
    *counted = held;
    if work.close.is_some() {
        return;
    }
    if pending_auth && held > shared.gate.max_pending_bytes {
        metrics.connections_closed_partial.fetch_add(1, Relaxed);
        let msg = "authenticate first: before authentication a frame may hold only auth.max_pending_bytes";
        refuse(work, shared, peer, None, AuthFailure::NotAuthFirst, msg);
    } else if grew && total > shared.limits.max_partial_bytes as i64 {
        metrics.connections_closed_partial.fetch_add(1, Relaxed);
        log::warn!(
            "closing {peer}: its incomplete frame would take the gateway past listener.max_partial_bytes ({total} bytes held by all connections)"
        );
        let msg = "the gateway holds too many incomplete frames; send whole frames";
        error(work, shared, None, ErrorCode::ServerBusy, msg);
        work.close = Some(Closed::PartialBudget);
    }
}
