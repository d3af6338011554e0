//! `/metrics`: the gateway's counters in the OpenMetrics text format. At a
//! scrape, [`Scrape`] hands the values of [`Metrics`]' atomics to
//! prometheus-client, which writes the text (names, `_total` suffixes,
//! labels, histogram buckets, escaping, the `# EOF`).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::ops::build::{build_info, process_stats};
use crate::ops::histogram::Histogram;
use crate::ops::metrics::{AuthFailure, HandshakeError, HoldDrop, Metrics};
use crate::wire::protocol::ErrorCode;

impl Metrics {
    /// Every metric, in the OpenMetrics text format, encoded by
    /// prometheus-client.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(self.clone())));
        let mut out = String::with_capacity(16 << 10);
        encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }

    fn encode(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        counter(
            e,
            "edgegate_connections_accepted_total",
            "Device connections accepted.",
            get(&self.connections_accepted),
        )?;
        counter(
            e,
            "edgegate_connections_rejected_total",
            "Device connections refused with server_busy (max_connections).",
            get(&self.connections_rejected_busy),
        )?;
        counter(
            e,
            "edgegate_connections_idle_closed_total",
            "Connections closed by idle_timeout.",
            get(&self.connections_closed_idle),
        )?;
        counter(
            e,
            "edgegate_connections_slow_closed_total",
            "Connections closed because they did not read their downlink.",
            get(&self.connections_closed_slow),
        )?;
        counter(
            e,
            "edgegate_connections_taken_over_total",
            "Connections closed because a newer connection bound the same deviceUid.",
            get(&self.connections_taken_over),
        )?;
        counter(
            e,
            "edgegate_connections_partial_closed_total",
            "Connections closed because their incomplete frame would go past listener.max_partial_bytes (all connections) or, before authentication, auth.max_pending_bytes.",
            get(&self.connections_closed_partial),
        )?;
        counter(
            e,
            "edgegate_input_deferred_total",
            "Times a connection's frames were left for later, unread from the socket meanwhile: its turn of 256 frames ended, or its replies reached listener.max_pending_reply_bytes.",
            get(&self.input_deferred),
        )?;
        counter(
            e,
            "edgegate_frames_total",
            "Frames received from devices (including pings and refused frames).",
            get(&self.frames),
        )?;
        counter(
            e,
            "edgegate_acks_total",
            "Requests acknowledged (durably stored in the outbox).",
            get(&self.acks),
        )?;
        counter(
            e,
            "edgegate_outbox_flushes_total",
            "Outbox group-commit flushes.",
            get(&self.outbox_flushes),
        )?;
        counter(
            e,
            "edgegate_outbox_corrupt_batches_total",
            "Outbox batches skipped because their checksum or layout was wrong.",
            get(&self.outbox_corrupt_batches),
        )?;
        counter(
            e,
            "edgegate_outbox_store_recoveries_total",
            "Times an outbox store that would not open was moved aside and replaced.",
            get(&self.outbox_store_recoveries),
        )?;
        counter(
            e,
            "edgegate_outbox_lost_batches_total",
            "Flushed outbox batches that the store could not give back after a restart (damage on disk).",
            get(&self.outbox_lost_batches),
        )?;
        counter(
            e,
            "edgegate_outbox_spilled_total",
            "Records written to the outbox because Kafka had not confirmed them within outbox.spill_after_ms (or memory for them ran out).",
            get(&self.outbox_spilled),
        )?;
        counter(
            e,
            "edgegate_outbox_confirmed_in_memory_total",
            "Records Kafka confirmed before they had to be written to the outbox.",
            get(&self.outbox_confirmed_in_memory),
        )?;
        counter(
            e,
            "edgegate_outbox_memory_full_total",
            "Times the records waiting in memory for Kafka reached their limit and were all written to the outbox at once.",
            get(&self.outbox_memory_full),
        )?;
        counter(
            e,
            "edgegate_outbox_outages_total",
            "Times Kafka left a record unconfirmed for outbox.spill_after_ms and the writer began writing every request at once, in larger group commits, until Kafka confirmed again.",
            get(&self.outbox_outages),
        )?;
        counter(
            e,
            "edgegate_outbox_write_errors_total",
            "Outbox writes or flushes that failed.",
            get(&self.outbox_write_errors),
        )?;
        counter(
            e,
            "edgegate_kafka_delivered_total",
            "Requests confirmed by Kafka.",
            get(&self.kafka_delivered),
        )?;
        counter(
            e,
            "edgegate_kafka_failed_total",
            "Kafka delivery reports with an error (the request is sent again).",
            get(&self.kafka_failed),
        )?;
        counter(
            e,
            "edgegate_kafka_tx_bytes_total",
            "Bytes the Kafka producer sent to brokers (librdkafka's txbytes, as of its last statistics, once a second): the uplink's cost on the WAN.",
            get(&self.kafka_tx_bytes),
        )?;
        counter(
            e,
            "edgegate_kafka_rx_bytes_total",
            "Bytes the downlink consumer received from brokers (librdkafka's rxbytes, fetches and protocol overhead, as of its last statistics, once a second).",
            get(&self.kafka_rx_bytes),
        )?;
        counter(
            e,
            "edgegate_kafka_quarantined_total",
            "Requests Kafka refused for good (too large, invalid), kept in data_dir/quarantine/ instead.",
            get(&self.kafka_quarantined),
        )?;
        counter(
            e,
            "edgegate_kafka_quarantine_dropped_total",
            "Requests Kafka refused for good that the full quarantine could not keep (logged with their messageId).",
            get(&self.kafka_quarantine_dropped),
        )?;
        counter(
            e,
            "edgegate_hold_errors_total",
            "Messages for offline devices the hold could not store (a disk error); counted undeliverable too.",
            get(&self.hold_errors),
        )?;
        counter(
            e,
            "edgegate_presence_events_total",
            "Connected/disconnected events stored in the outbox for kafka.presence_topic.",
            get(&self.presence_events),
        )?;
        counter(
            e,
            "edgegate_presence_dropped_total",
            "Presence events that never went out (presence turned off since they were stored, or the outbox refused them for good).",
            get(&self.presence_dropped),
        )?;
        counter(
            e,
            "edgegate_downlink_received_total",
            "Records read from the consumer topics.",
            get(&self.downlink_received),
        )?;
        counter(
            e,
            "edgegate_downlink_routed_total",
            "Backend messages handed to a device connection.",
            get(&self.downlink_routed),
        )?;
        counter(
            e,
            "edgegate_downlink_undeliverable_total",
            "Backend messages that reached no device: no such connection, or held too long.",
            get(&self.downlink_undeliverable),
        )?;
        counter(
            e,
            "edgegate_downlink_held_total",
            "Backend messages held on disk for a device that was not connected (PROTOCOL 6.3).",
            get(&self.downlink_held),
        )?;
        counter(
            e,
            "edgegate_downlink_held_released_total",
            "Held messages handed to their device once it connected and was bound.",
            get(&self.downlink_held_released),
        )?;
        counter(
            e,
            "edgegate_downlink_other_server_total",
            "Backend messages skipped because they name another gateway.",
            get(&self.downlink_other_server),
        )?;
        counter(
            e,
            "edgegate_downlink_malformed_total",
            "Backend records skipped because they are not a valid ServerResponse.",
            get(&self.downlink_malformed),
        )?;
        counter(
            e,
            "edgegate_downlink_consumer_errors_total",
            "Errors reported by the Kafka consumer.",
            get(&self.downlink_consumer_errors),
        )?;

        counter(
            e,
            "edgegate_auth_ok_total",
            "Connections that authenticated (token or client certificate).",
            get(&self.auth_ok),
        )?;
        counter(
            e,
            "edgegate_auth_timeouts_total",
            "Connections closed for not authenticating within auth.timeout_secs.",
            get(&self.auth_timeouts),
        )?;
        counter(
            e,
            "edgegate_auth_damped_total",
            "Connections closed at once because their address failed authentication too often.",
            get(&self.auth_damped),
        )?;
        counter(
            e,
            "edgegate_auth_revoked_closed_total",
            "Open connections closed because their device was revoked.",
            get(&self.auth_revoked_closed),
        )?;
        counter(
            e,
            "edgegate_reloads_total",
            "SIGHUP reloads applied.",
            get(&self.reloads),
        )?;
        counter(
            e,
            "edgegate_reloads_failed_total",
            "SIGHUP reloads refused (the running settings were kept).",
            get(&self.reloads_failed),
        )?;
        labelled(
            e,
            "edgegate_auth_failures_total",
            "Refused authentications, by reason.",
            "reason",
            &AuthFailure::ALL.map(|r| (r.as_str(), get(&self.auth_failures[r as usize]))),
        )?;
        labelled(
            e,
            "edgegate_hold_dropped_total",
            "Held messages dropped, by the bound that dropped them (downlink.hold_secs, hold_max_per_device, hold_max_bytes).",
            "bound",
            &HoldDrop::ALL.map(|r| (r.as_str(), get(&self.hold_dropped[r as usize]))),
        )?;
        labelled(
            e,
            "edgegate_tls_handshake_errors_total",
            "Failed TLS handshakes, by reason.",
            "reason",
            &HandshakeError::ALL.map(|r| (r.as_str(), get(&self.tls_handshake_errors[r as usize]))),
        )?;

        labelled(
            e,
            "edgegate_errors_total",
            "Error replies sent to devices, by errorCode.",
            "code",
            &ErrorCode::ALL.map(|c| (c.as_str(), get(&self.errors[c.index()]))),
        )?;
        gauge(
            e,
            "edgegate_connections",
            "Open device connections.",
            self.connections_open.load(Relaxed),
        )?;
        gauge(
            e,
            "edgegate_partial_frame_bytes",
            "Bytes held for frames split across reads, all connections.",
            self.partial_bytes.load(Relaxed),
        )?;
        gauge(
            e,
            "edgegate_hold_messages",
            "Messages held on disk for devices not connected (PROTOCOL 6.3).",
            self.hold_messages.load(Relaxed),
        )?;
        gauge(
            e,
            "edgegate_hold_bytes",
            "Bytes of the messages held for devices not connected.",
            self.hold_bytes.load(Relaxed),
        )?;
        gauge(
            e,
            "edgegate_outbox_records",
            "Requests in the outbox, not yet confirmed by Kafka.",
            self.outbox_records.load(Relaxed),
        )?;
        gauge(
            e,
            "edgegate_outbox_full",
            "1 while the outbox refuses requests for lack of room (outbox_full); /readyz answers 503 then.",
            self.outbox_full.load(Relaxed),
        )?;
        gauge(
            e,
            "edgegate_outbox_batches",
            "Group-commit batches in the outbox.",
            self.outbox_batches.load(Relaxed),
        )?;
        gauge(
            e,
            "edgegate_outbox_bytes",
            "Bytes of live outbox batches.",
            self.outbox_bytes.load(Relaxed),
        )?;
        gauge(
            e,
            "edgegate_outbox_disk_bytes",
            "Bytes the outbox store occupies on disk.",
            self.outbox_disk_bytes.load(Relaxed),
        )?;
        gauge(
            e,
            "edgegate_outbox_max_bytes",
            "outbox.max_bytes: past it requests get outbox_full.",
            self.outbox_max_bytes.load(Relaxed),
        )?;
        gauge(
            e,
            "edgegate_kafka_broker_connected",
            "1 while the producer has a connection to at least one broker.",
            self.kafka_broker_connected.load(Relaxed),
        )?;
        gauge(
            e,
            "edgegate_kafka_consumer_partitions",
            "Partitions assigned to the downlink consumer.",
            self.kafka_consumer_partitions.load(Relaxed),
        )?;
        gauge(
            e,
            "edgegate_outbox_oldest_age_seconds",
            "Age of the oldest request waiting on disk for Kafka (0: none; found at start: counted from the start).",
            self.outbox_oldest_age().map_or(0.0, |d| d.as_secs_f64()),
        )?;
        histogram(
            e,
            "edgegate_ack_seconds",
            "Time from a request's turn to its ack (Kafka's confirmation or the outbox fsync, whichever came first).",
            &self.ack_seconds,
        )?;
        histogram(
            e,
            "edgegate_kafka_delivery_seconds",
            "Time from handing a request to librdkafka to its delivery report.",
            &self.kafka_delivery_seconds,
        )?;
        build_and_process(e)
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Relaxed)
}

/// The metrics as prometheus-client collects them at a scrape.
struct Scrape(Arc<Metrics>);

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrape")
    }
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        self.0.encode(&mut e)
    }
}

/// `name` as exposed, with `_total` (the encoder adds it to counters).
fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: impl EncodeCounterValue,
) -> fmt::Result {
    let name = name.strip_suffix("_total").unwrap_or(name);
    e.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: impl EncodeGaugeValue,
) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

/// A counter with one label, a value per label value.
fn labelled(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> fmt::Result {
    let name = name.strip_suffix("_total").unwrap_or(name);
    let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        family
            .encode_family(&[(label, *value)])?
            .encode_counter::<NoLabelSet, _, u64>(n, None)?;
    }
    Ok(())
}

fn histogram(e: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> fmt::Result {
    let (sum, count, buckets) = h.snapshot();
    e.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

/// `edgegate_build_info` and the `process_*` metrics the Prometheus client
/// libraries export (Linux), for what a hub runs short of: memory, files.
fn build_and_process(e: &mut DescriptorEncoder) -> fmt::Result {
    let b = build_info();
    let labels = [
        ("version", b.version),
        ("commit", b.commit),
        ("target", b.target),
        ("librdkafka", b.librdkafka.as_str()),
    ];
    e.encode_descriptor(
        "edgegate_build_info",
        "The running binary (always 1).",
        None,
        MetricType::Gauge,
    )?
    .encode_family(&labels)?
    .encode_gauge(&1u64)?;
    let p = process_stats();
    if let Some(bytes) = p.resident_bytes {
        gauge(
            e,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            bytes,
        )?;
    }
    if let Some(open) = p.open_fds {
        gauge(
            e,
            "process_open_fds",
            "Number of open file descriptors.",
            open,
        )?;
    }
    if let Some(max) = p.max_fds {
        gauge(
            e,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            max,
        )?;
    }
    counter(
        e,
        "process_cpu_seconds_total",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let m = Arc::new(Metrics::default());
        m.ack_seconds.observe(Duration::from_micros(500), 2);
        m.ack_seconds.observe(Duration::from_millis(30), 1);
        m.ack_seconds.observe(Duration::from_secs(20), 1);
        let text = m.render();
        for line in [
            "edgegate_ack_seconds_bucket{le=\"0.001\"} 2\n",
            "edgegate_ack_seconds_bucket{le=\"0.025\"} 2\n",
            "edgegate_ack_seconds_bucket{le=\"0.05\"} 3\n",
            "edgegate_ack_seconds_bucket{le=\"10.0\"} 3\n",
            "edgegate_ack_seconds_bucket{le=\"+Inf\"} 4\n",
            "edgegate_ack_seconds_sum 20.031\n",
            "edgegate_ack_seconds_count 4\n",
            "# TYPE edgegate_kafka_delivery_seconds histogram\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn render_is_openmetrics_text() {
        let m = Arc::new(Metrics::default());
        m.error(ErrorCode::OutboxFull);
        m.acks.fetch_add(3, Relaxed);
        let text = m.render();
        assert!(text.contains("edgegate_errors_total{code=\"outbox_full\"} 1\n"));
        assert!(text.contains("edgegate_acks_total 3\n"));
        m.auth_failure(AuthFailure::Revoked);
        m.handshake_error(HandshakeError::NotTls);
        let text = m.render();
        assert!(text.contains("edgegate_auth_failures_total{reason=\"revoked\"} 1\n"));
        assert!(text.contains("edgegate_tls_handshake_errors_total{reason=\"not_tls\"} 1\n"));
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(
                name.starts_with("edgegate_") || name.starts_with("process_"),
                "{line}"
            );
            value
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("{e}: {line}"));
        }
    }
}
