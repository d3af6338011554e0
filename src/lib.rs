//! edgegate: a device-to-Kafka gateway for edge hubs, as a library; the
//! `edgegate` binary (`main.rs`) is its command line.
//!
//! # The data path
//!
//! Uplink: device socket → `device::listener` (accept) →
//! `device::connection` (one task per connection: `wire::frame` splits lines,
//! `wire::protocol` parses and checks them and builds the envelope) →
//! `outbox` (group commit; the record waits in memory and goes to the
//! producer at once, and the ack comes when Kafka confirms it or, if that
//! takes longer than `outbox.spill_after_ms`, once it is fsynced) →
//! `kafka::producer` → Kafka. Downlink: Kafka → `kafka::consumer` → `routing` (by clientId or
//! deviceUid, or held on disk for a device that is away) → the connection's mailbox
//! → `device::connection` → device socket.
//!
//! # Who owns what
//!
//! - `wire/`: bytes in, values out; imports nothing of the crate.
//! - `config/`: the settings, from file, environment and flags; imports
//!   nothing of the crate.
//! - `outbox/`: the durable queue, in memory and on disk; knows no sockets
//!   and no Kafka.
//! - `device/`, `kafka/`, `routing/`, `security/`, `ops/`: one side each.
//! - `reload`: what SIGHUP re-reads and replaces in a running gateway.
//! - `app`: the only place that wires the sides together.
//!
//! Without the default `gateway` feature the library is `wire` alone, with
//! no librdkafka, sled or TLS to build: the fuzz targets use it that way.

#![forbid(unsafe_code)]

#[cfg(feature = "gateway")]
pub mod app;
#[cfg(feature = "gateway")]
pub mod config;
#[cfg(feature = "gateway")]
pub mod device;
#[cfg(feature = "gateway")]
pub mod kafka;
#[cfg(feature = "gateway")]
pub mod ops;
#[cfg(feature = "gateway")]
pub mod outbox;
#[cfg(feature = "gateway")]
pub mod reload;
#[cfg(feature = "gateway")]
pub mod routing;
#[cfg(feature = "gateway")]
pub mod security;
pub mod wire;
