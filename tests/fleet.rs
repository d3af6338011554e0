//! A fleet on one broker (PROTOCOL 6.1): three gateways, each with its own
//! reply topic, and an echo worker. Each device gets its own responses;
//! each gateway's consumer reads only its own traffic, where the shared
//! topic makes every gateway read everything. Prints the figures.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::TopicPartitionList;
use serde_json::{json, Value};

/// Answers every request on `uplink`: on its `reply-topic` when
/// `use_reply_topic` and the header is there, else on `shared`.
struct EchoWorker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoWorker {
    fn start(brokers: &str, uplink: &str, shared: &str, use_reply_topic: bool) -> EchoWorker {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("echo"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(uplink, 0, rdkafka::Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let producer = producer(brokers);
        let shared = shared.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let request: Value =
                    serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
                let header = m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "reply-topic")
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8(v.to_vec()).unwrap())
                });
                let topic = match header {
                    Some(t) if use_reply_topic => t,
                    _ => shared.clone(),
                };
                let reply = json!({
                    "deviceResponse": {
                        "action": "echo",
                        "uid": request["deviceRequest"]["uid"],
                        "status": "ok",
                    },
                    "serverId": request["serverId"],
                    "clientId": request["clientId"],
                })
                .to_string();
                let mut record = BaseRecord::<(), str>::to(&topic).payload(&reply);
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((_, back)) => {
                            record = back;
                            producer.poll(Duration::from_millis(10));
                        }
                    }
                }
                producer.poll(Duration::ZERO);
            }
            let _ = producer.flush(Duration::from_secs(10));
        });
        EchoWorker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoWorker {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Fleet {
    gateways: Vec<Gateway>,
    up: String,
    shared: String,
    prefix: String,
}

fn fleet(reply_topics: bool) -> Fleet {
    let broker = shared_broker();
    let (up, shared) = broker.fresh_topics(1, 1);
    let prefix = unique("replies");
    // Ids of their own: the tests of this file run at once on one broker,
    // and the consumer group is named after the serverId.
    let fleet = unique("fleet");
    let gateways = (0..3)
        .map(|i| {
            let mut opts = GatewayOptions::new(broker.addr())
                .topics(&up, &shared)
                .env("EDGEGATE_SERVER_ID", format!("{fleet}-gw{i}"));
            if reply_topics {
                opts = opts.env(
                    "EDGEGATE_KAFKA_REPLY_TOPIC",
                    format!("{prefix}.{{serverId}}"),
                );
            }
            Gateway::start(opts)
        })
        .collect::<Vec<_>>();
    for gw in &gateways {
        let want = if reply_topics { 2.0 } else { 1.0 };
        gw.wait_metric("edgegate_kafka_consumer_partitions", |v| v >= want);
    }
    Fleet {
        gateways,
        up,
        shared,
        prefix,
    }
}

/// Each gateway's devices send `n` requests each and read every echo;
/// returns, per gateway, records and bytes its consumer fetched meanwhile.
fn exchange(f: &Fleet, n: usize) -> Vec<(f64, f64)> {
    let mut devices: Vec<(usize, Device)> = Vec::new();
    for (i, gw) in f.gateways.iter().enumerate() {
        for _ in 0..2 {
            devices.push((i, gw.device()));
        }
    }
    // Echoes of the warm-up request prove each path works before counting.
    for (_, d) in devices.iter_mut() {
        d.set_timeout(WAIT);
        let id = ack_id(&d.request("t", "warm", None, Value::Null));
        let echo = d.json();
        assert_eq!(
            (&echo["action"], &echo["uid"]),
            (&json!("echo"), &json!("warm")),
            "{id}"
        );
    }
    // The statistics behind the byte counter come once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let before: Vec<(f64, f64)> = f.gateways.iter().map(fetched).collect();
    for (_, d) in devices.iter_mut() {
        for k in 0..n {
            d.send(&json!({"action":"t","uid":format!("r{k}"),"data":{"k":k}}).to_string());
        }
    }
    for (i, d) in devices.iter_mut() {
        let mut echoes = 0;
        let mut acks = 0;
        while echoes < n || acks < n {
            let v = d.json();
            match v["action"].as_str() {
                Some("ack") => acks += 1,
                Some("echo") => {
                    assert_eq!(
                        v["uid"],
                        format!("r{echoes}"),
                        "gateway {i}: echoes in order"
                    );
                    echoes += 1;
                }
                _ => panic!("gateway {i}: unexpected {v}"),
            }
        }
    }
    // Nothing more arrives: every device got exactly its own.
    for (i, d) in devices.iter_mut() {
        d.set_timeout(Duration::from_millis(300));
        assert_eq!(d.line(), None, "gateway {i}: a message for someone else");
    }
    std::thread::sleep(Duration::from_millis(1500));
    f.gateways
        .iter()
        .zip(before)
        .map(|(gw, (r0, b0))| {
            let (r, b) = fetched(gw);
            (r - r0, b - b0)
        })
        .collect()
}

fn fetched(gw: &Gateway) -> (f64, f64) {
    (
        gw.metric("edgegate_downlink_received_total"),
        gw.metric("edgegate_kafka_rx_bytes_total"),
    )
}

const PER_DEVICE: usize = 200;

#[test]
fn reply_topics_keep_each_gateways_replies_to_itself() {
    let f = fleet(true);
    // Created at start, one per gateway, named after its serverId.
    let brokers = shared_broker().addr();
    let _worker = EchoWorker::start(&brokers, &f.up, &f.shared, true);
    let own = exchange(&f, PER_DEVICE);
    let traffic = (2 * PER_DEVICE) as f64;
    for (i, (records, bytes)) in own.iter().enumerate() {
        println!("reply topics: gateway {i} fetched {records} records, {bytes} bytes for {traffic} replies");
        assert_eq!(*records, traffic, "gateway {i} read more than its own");
        assert_eq!(
            f.gateways[i].metric("edgegate_downlink_other_server_total"),
            0.0
        );
    }
    // The envelope names the topic too.
    let records = read_topic(&brokers, &f.up, 1, 1, WAIT);
    let server = records[0].payload["serverId"].as_str().unwrap();
    assert_eq!(
        records[0].payload["replyTopic"],
        format!("{}.{server}", f.prefix)
    );
    assert_eq!(
        records[0].headers.get("reply-topic").map(|v| v.as_slice()),
        Some(format!("{}.{server}", f.prefix).as_bytes())
    );
    drop(_worker);

    // A worker that ignores reply-topic still reaches every device through
    // the shared topic, which each gateway also reads.
    let _worker = EchoWorker::start(&brokers, &f.up, &f.shared, false);
    let shared = exchange(&f, 20);
    for (i, (records, _)) in shared.iter().enumerate() {
        assert_eq!(
            *records,
            3.0 * 40.0,
            "gateway {i} reads the whole shared topic"
        );
    }

    // A restart finds its reply topic there and goes on with it.
    let mut gw = f.gateways.into_iter().next().unwrap();
    gw.restart();
    gw.wait_metric("edgegate_kafka_consumer_partitions", |v| v >= 2.0);
    assert!(gw.log().contains("which exists"), "{}", gw.log());
}

#[test]
fn the_shared_topic_makes_every_gateway_read_everything() {
    let f = fleet(false);
    let brokers = shared_broker().addr();
    let _worker = EchoWorker::start(&brokers, &f.up, &f.shared, true);
    let all = exchange(&f, PER_DEVICE);
    let traffic = (2 * PER_DEVICE) as f64;
    for (i, (records, bytes)) in all.iter().enumerate() {
        println!("shared topic: gateway {i} fetched {records} records, {bytes} bytes for {traffic} replies");
        assert_eq!(*records, 3.0 * traffic, "gateway {i}");
    }
}
