//! edgegate: a device-to-Kafka gateway for edge hubs, as a library; the
//! `edgegate` binary (`main.rs`) is its command line.
//!
//! # The data path
//!
//! Uplink: device socket → `device::listener` (accept) →
//! `device::connection` (one task per connection: `wire::frame` splits lines,
//! `wire::protocol` parses and checks them and builds the envelope) →
//! `outbox` (group commit, fsynced, then the ack) → `kafka::producer` →
//! Kafka. Downlink: Kafka → `kafka::consumer` → `routing` (by clientId or
//! deviceUid, or held for a device that is away) → the connection's mailbox
//! → `device::connection` → device socket.
//!
//! # Who owns what
//!
//! - `wire/`: bytes in, values out; imports nothing of the crate.
//! - `config/`: the settings, from file, environment and flags; imports
//!   nothing of the crate.
//! - `outbox/`: the durable queue; knows no sockets and no Kafka.
//! - `device/`, `kafka/`, `routing/`, `security/`, `ops/`: one side each.
//! - `app`: the only place that wires the sides together.

#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod device;
pub mod kafka;
pub mod ops;
pub mod outbox;
pub mod routing;
pub mod security;
pub mod wire;
