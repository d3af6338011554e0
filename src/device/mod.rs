//! The device side: the listeners that accept sockets, the transport (plain
//! TCP or TLS) and one task per connection that frames, checks, stores and
//! answers, and writes the backend's messages.

mod budget;
pub mod connection;
pub mod dispatch;
pub mod handshake;
pub mod listener;
pub mod rate;
pub mod transport;
mod turn;

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use crate::config::ListenerConfig;
use crate::ops::metrics::Metrics;
use crate::outbox::Appender;
use crate::routing::Router;
use crate::security::auth::Gate;

/// What every connection task shares.
pub struct Shared {
    pub server_id: String,
    /// Written into every envelope when set (PROTOCOL 6.1).
    pub reply_topic: Option<String>,
    pub limits: ListenerConfig,
    pub metrics: Arc<Metrics>,
    pub router: Arc<Router>,
    pub appender: Appender,
    pub gate: Arc<Gate>,
    /// `limits.*` (PROTOCOL 7); `None`: off.
    pub rate: Option<rate::RateLimits>,
    /// Set when shutdown begins: later frames get `shutting_down`.
    pub shutting_down: AtomicBool,
    pub open: AtomicUsize,
}
