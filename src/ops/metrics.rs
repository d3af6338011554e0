//! The gateway's counters, gauges and histograms: plain atomics in one
//! struct, so every hot-path update is one relaxed add on a field (a
//! labelled counter is an array indexed by an enum, no lookup).
//! `ops::exposition` writes them out for `/metrics`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::ops::build::unix_ms;
use crate::ops::histogram::Histogram;
use crate::wire::protocol::ErrorCode;

#[derive(Default)]
pub struct Metrics {
    /// From the start of a turn's append to its acks (Kafka's confirmation
    /// or the fsync).
    pub ack_seconds: Histogram,
    /// From a batch's hand-over to librdkafka to each delivery report.
    pub kafka_delivery_seconds: Histogram,
    pub connections_open: AtomicI64,
    pub connections_accepted: AtomicU64,
    pub connections_rejected_busy: AtomicU64,
    pub connections_closed_idle: AtomicU64,
    pub connections_closed_slow: AtomicU64,
    pub connections_taken_over: AtomicU64,
    /// Connections closed because their partial frame would go past
    /// `listener.max_partial_bytes`.
    pub connections_closed_partial: AtomicU64,
    /// Times a connection's decoding stopped before the end of its input.
    pub input_deferred: AtomicU64,
    /// Bytes held in partial frames, all connections.
    pub partial_bytes: AtomicI64,
    pub frames: AtomicU64,
    pub acks: AtomicU64,
    pub errors: [AtomicU64; ErrorCode::ALL.len()],

    pub outbox_records: AtomicI64,
    pub outbox_batches: AtomicI64,
    pub outbox_bytes: AtomicI64,
    pub outbox_disk_bytes: AtomicU64,
    /// `outbox.max_bytes`.
    pub outbox_max_bytes: AtomicU64,
    /// When the oldest batch still on disk was written (Unix ms; 0: none).
    /// Batches found at start count from the start.
    pub outbox_oldest_unix_ms: AtomicU64,
    pub outbox_flushes: AtomicU64,
    pub outbox_corrupt_batches: AtomicU64,
    pub outbox_store_recoveries: AtomicU64,
    pub outbox_lost_batches: AtomicU64,
    pub outbox_write_errors: AtomicU64,
    pub outbox_spilled: AtomicU64,
    /// 1 while appends are refused for lack of room.
    pub outbox_full: AtomicI64,
    pub outbox_memory_full: AtomicU64,
    pub outbox_outages: AtomicU64,
    pub outbox_confirmed_in_memory: AtomicU64,

    pub kafka_delivered: AtomicU64,
    pub kafka_failed: AtomicU64,
    pub kafka_quarantined: AtomicU64,
    pub kafka_tx_bytes: AtomicU64,
    pub kafka_rx_bytes: AtomicU64,
    pub kafka_quarantine_dropped: AtomicU64,
    /// Presence events stored in the outbox for the presence topic.
    pub presence_events: AtomicU64,
    /// Presence events that never went out: stored while presence was on
    /// and read after it was turned off, or refused by a full outbox.
    pub presence_dropped: AtomicU64,
    pub kafka_broker_connected: AtomicI64,
    pub kafka_consumer_partitions: AtomicI64,

    pub downlink_received: AtomicU64,
    pub downlink_routed: AtomicU64,
    pub downlink_undeliverable: AtomicU64,
    pub downlink_held: AtomicU64,
    /// Messages and line bytes in the durable hold.
    pub hold_messages: AtomicI64,
    pub hold_bytes: AtomicI64,
    pub hold_dropped: [AtomicU64; HoldDrop::ALL.len()],
    /// Messages the hold could not store (disk error): counted undeliverable too.
    pub hold_errors: AtomicU64,
    pub downlink_held_released: AtomicU64,
    pub downlink_other_server: AtomicU64,
    pub downlink_malformed: AtomicU64,
    pub downlink_consumer_errors: AtomicU64,

    pub auth_ok: AtomicU64,
    pub auth_failures: [AtomicU64; AuthFailure::ALL.len()],
    pub auth_timeouts: AtomicU64,
    pub auth_damped: AtomicU64,
    pub auth_revoked_closed: AtomicU64,
    pub tls_handshake_errors: [AtomicU64; HandshakeError::ALL.len()],

    pub reloads: AtomicU64,
    pub reloads_failed: AtomicU64,
}

/// Which bound of the hold dropped a message (PROTOCOL 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldDrop {
    /// Older than `downlink.hold_secs`.
    Expired,
    /// Past `downlink.hold_max_per_device`.
    PerDevice,
    /// Past `downlink.hold_max_bytes`.
    Bytes,
}

impl HoldDrop {
    pub const ALL: [HoldDrop; 3] = [HoldDrop::Expired, HoldDrop::PerDevice, HoldDrop::Bytes];
    pub fn as_str(self) -> &'static str {
        match self {
            HoldDrop::Expired => "expired",
            HoldDrop::PerDevice => "per_device",
            HoldDrop::Bytes => "bytes",
        }
    }
}

/// Why an authentication was refused (each counts towards damping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// The auth frame's token is wrong, for another device or missing.
    BadToken,
    /// The device is on the revocation list.
    Revoked,
    /// A frame other than auth or ping came first.
    NotAuthFirst,
}

impl AuthFailure {
    pub const ALL: [AuthFailure; 3] = [
        AuthFailure::BadToken,
        AuthFailure::Revoked,
        AuthFailure::NotAuthFirst,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::BadToken => "bad_token",
            AuthFailure::Revoked => "revoked",
            AuthFailure::NotAuthFirst => "not_auth_first",
        }
    }
}

/// Why a TLS handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// Not finished within `auth.timeout_secs`.
    Timeout,
    /// The peer does not speak TLS (plain TCP on the TLS port, say).
    NotTls,
    /// mtls: the device presented no certificate.
    NoCertificate,
    /// A certificate that does not verify (unknown CA, expired, ...).
    BadCertificate,
    /// mtls: a verified certificate without a usable subject CN.
    NoCommonName,
    /// The peer closed or reset the connection, or anything else.
    Other,
}

impl HandshakeError {
    pub const ALL: [HandshakeError; 6] = [
        HandshakeError::Timeout,
        HandshakeError::NotTls,
        HandshakeError::NoCertificate,
        HandshakeError::BadCertificate,
        HandshakeError::NoCommonName,
        HandshakeError::Other,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeError::Timeout => "timeout",
            HandshakeError::NotTls => "not_tls",
            HandshakeError::NoCertificate => "no_certificate",
            HandshakeError::BadCertificate => "bad_certificate",
            HandshakeError::NoCommonName => "no_common_name",
            HandshakeError::Other => "other",
        }
    }
}

impl Metrics {
    pub fn error(&self, code: ErrorCode) {
        self.errors[code.index()].fetch_add(1, Relaxed);
    }

    pub fn hold_dropped(&self, why: HoldDrop) {
        self.hold_dropped[why as usize].fetch_add(1, Relaxed);
    }

    pub fn auth_failure(&self, why: AuthFailure) {
        self.auth_failures[why as usize].fetch_add(1, Relaxed);
    }

    pub fn handshake_error(&self, why: HandshakeError) {
        self.tls_handshake_errors[why as usize].fetch_add(1, Relaxed);
    }

    /// How long the oldest request on disk has waited for Kafka.
    pub fn outbox_oldest_age(&self) -> Option<Duration> {
        let since = self.outbox_oldest_unix_ms.load(Relaxed);
        (since != 0).then(|| Duration::from_millis(unix_ms().saturating_sub(since)))
    }
}
