//! `edgegate-bench`: load and measurement modes. Each mode prints progress on stderr
//! and one final `key=value` line on stdout.
//!
//! - `raw`: librdkafka straight to the broker, with the gateway's producer
//!   settings: the limit the gateway is compared with.
//! - `uplink`: C connections pipelining W frames each; ack latency
//!   percentiles, msgs/s, and a check that every acked messageId is in the
//!   topic (assign-based reader, no group join).
//! - `roundtrip`: an in-process echo worker (reads the uplink topic, answers
//!   each request by clientId on the reply topic) and devices sending at a
//!   fixed rate; send-to-echo latency percentiles.
//! - `hop`: one trip through the broker alone (a producer with no linger to
//!   a consumer with the echo worker's settings), at a fixed rate: the
//!   floor under each of the round trip's two Kafka hops.
//! - `idle`: N idle connections; the gateway's RSS per connection.
//! - `replay` (or `drain`): watches a gateway's outbox drain (after a
//!   backlog was built while its broker was unreachable): time and RSS curve.
//! - `plot`: draws saved result lines as an SVG (see `plot`).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::TopicPartitionList;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Failed(String),
}

pub const USAGE: &str = "\
usage: edgegate-bench raw    --brokers LIST --topic T [--messages N] [--size BYTES | --payload telemetry]
       edgegate-bench uplink --gateway ADDR --brokers LIST --topic T [--partitions P]
                             [--connections C] [--window W] [--rate MSGS_PER_SEC] [--messages N]
                             [--size BYTES | --payload telemetry] [--no-verify]
       edgegate-bench roundtrip --gateway ADDR --admin ADDR --brokers LIST --topic T --reply-topic T
                             [--partitions P] [--connections C] [--rate MSGS_PER_SEC] [--seconds S]
       edgegate-bench hop    --brokers LIST --topic EMPTY_TOPIC [--partitions P] [--rate MSGS_PER_SEC] [--seconds S]
       edgegate-bench idle   --gateway ADDR --pid PID [--connections N]
       edgegate-bench replay --admin ADDR --pid PID    (alias: drain)
       edgegate-bench plot   --input RESULTS --output FILE.svg
       edgegate-bench report --input RESULTS [--profile PROFILE]   (Markdown on stdout)";

/// Options shared by the modes, parsed from `--key value` pairs.
pub struct Options {
    pub mode: String,
    pub brokers: String,
    pub topic: String,
    pub partitions: i32,
    pub gateway: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub pid: Option<u32>,
    pub connections: usize,
    pub window: usize,
    pub messages: u64,
    pub size: usize,
    /// `--payload telemetry`: realistic sensor readings instead of padding.
    pub telemetry: bool,
    pub verify: bool,
    /// roundtrip: the topic the echo worker answers on, the total request
    /// rate and how long to send.
    pub reply_topic: String,
    pub rate: u64,
    /// uplink: `--rate` was given, so requests are paced at `rate` in all
    /// instead of sent as fast as the window allows.
    pub paced: bool,
    pub seconds: u64,
    /// plot: the result lines to read and the SVG to write.
    pub input: Option<String>,
    pub output: Option<String>,
    /// report: benches/profile.sh's output, if any.
    pub profile: Option<String>,
}

impl Options {
    pub fn payload(&self) -> Payload {
        if self.telemetry {
            Payload::Telemetry
        } else {
            Payload::Fixed(self.size)
        }
    }

    pub fn parse(mode: String, args: &mut lexopt::Parser) -> Result<Options, BenchError> {
        use lexopt::prelude::*;
        let mut o = Options {
            mode,
            brokers: "localhost:9092".into(),
            topic: "edgegate_bench".into(),
            partitions: 1,
            gateway: None,
            admin: None,
            pid: None,
            connections: 50,
            window: 64,
            messages: 200_000,
            size: 200,
            telemetry: false,
            verify: true,
            reply_topic: "workers_layer_messages".into(),
            rate: 5000,
            paced: false,
            seconds: 10,
            input: None,
            output: None,
            profile: None,
        };
        let bad = |e: lexopt::Error| BenchError::Usage(e.to_string());
        while let Some(arg) = args.next().map_err(bad)? {
            let name = match arg {
                Long(name) => name.to_owned(),
                other => return Err(BenchError::Usage(other.unexpected().to_string())),
            };
            let mut value = || -> Result<String, BenchError> {
                args.value().map_err(bad)?.string().map_err(bad)
            };
            let num = |v: String| {
                v.parse::<u64>()
                    .map_err(|_| BenchError::Usage(format!("`{v}` is not a number")))
            };
            let addr = |v: String| {
                v.parse::<SocketAddr>()
                    .map_err(|_| BenchError::Usage(format!("`{v}` is not IP:port")))
            };
            match name.as_str() {
                "brokers" => o.brokers = value()?,
                "topic" => o.topic = value()?,
                "partitions" => o.partitions = num(value()?)? as i32,
                "gateway" => o.gateway = Some(addr(value()?)?),
                "admin" => o.admin = Some(addr(value()?)?),
                "pid" => o.pid = Some(num(value()?)? as u32),
                "connections" => o.connections = num(value()?)?.max(1) as usize,
                "window" => o.window = num(value()?)?.max(1) as usize,
                "messages" => o.messages = num(value()?)?.max(1),
                "size" => o.size = num(value()?)?.max(64) as usize,
                "no-verify" => o.verify = false,
                "payload" => match value()?.as_str() {
                    "telemetry" => o.telemetry = true,
                    "fixed" => o.telemetry = false,
                    other => {
                        return Err(BenchError::Usage(format!(
                            "--payload is fixed or telemetry, not `{other}`"
                        )))
                    }
                },
                "reply-topic" => o.reply_topic = value()?,
                "rate" => {
                    o.rate = num(value()?)?.max(1);
                    o.paced = true;
                }
                "seconds" => o.seconds = num(value()?)?.max(1),
                "input" => o.input = Some(value()?),
                "output" => o.output = Some(value()?),
                "profile" => o.profile = Some(value()?),
                other => {
                    return Err(BenchError::Usage(format!(
                        "unknown option --{other}\n{USAGE}"
                    )))
                }
            }
        }
        Ok(o)
    }
}

pub fn run(o: &Options) -> Result<(), BenchError> {
    match o.mode.as_str() {
        "raw" => raw(o),
        "uplink" => uplink(o),
        "idle" => idle(o),
        "drain" | "replay" => drain(o),
        "plot" => plot(o),
        "report" => report(o),
        "roundtrip" => roundtrip(o),
        "hop" => hop(o),
        "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(BenchError::Usage(format!(
            "unknown bench mode `{other}`\n{USAGE}"
        ))),
    }
}

fn require<T: Copy>(v: Option<T>, name: &str) -> Result<T, BenchError> {
    v.ok_or_else(|| BenchError::Usage(format!("--{name} is required\n{USAGE}")))
}

/// What the requests carry.
#[derive(Debug, Clone, Copy)]
pub enum Payload {
    /// Frames of exactly this many bytes, padded with `x` (compresses far
    /// better than real data: for throughput, not for bytes).
    Fixed(usize),
    /// Sensor readings as a hub's devices send them: see [`telemetry`].
    Telemetry,
}

/// A request frame (without the newline).
fn frame(conn: usize, seq: u64, payload: Payload) -> String {
    let head = format!("{{\"action\":\"telemetry\",\"uid\":\"{conn}-{seq}\",\"deviceUid\":\"bench-{conn}\",\"data\":");
    match payload {
        Payload::Telemetry => format!("{head}{}}}", telemetry(conn, seq)),
        Payload::Fixed(size) => {
            let head = format!("{head}{{\"p\":\"");
            let tail = "\"}}";
            let pad = size.saturating_sub(head.len() + tail.len());
            format!("{head}{}{tail}", "x".repeat(pad))
        }
    }
}

/// One reading of device `conn`, its `seq`-th: a millisecond timestamp one
/// second after the last, and five sensors that drift slowly around a
/// per-device level with a little noise, printed with the precision a
/// sensor has (temperature 0.01 °C, humidity 0.1 %, pressure 0.1 hPa,
/// battery 1 mV, signal 1 dBm). Deterministic (a hash of device and seq),
/// so runs are comparable. About 140-byte frames.
fn telemetry(conn: usize, seq: u64) -> String {
    let device = conn as f64;
    let noise = |salt: u64| {
        let mut x = (conn as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ seq.wrapping_mul(0xBF58_476D_1CE4_E5B9)
            ^ salt;
        x ^= x >> 31;
        x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 29;
        (x % 10_000) as f64 / 10_000.0 - 0.5
    };
    let t = seq as f64 / 600.0; // a slow cycle: ten minutes of readings
    let temp = 21.0 + (device % 7.0) + 2.5 * t.sin() + 0.2 * noise(1);
    let hum = 45.0 + (device % 11.0) - 8.0 * t.sin() + noise(2);
    let press = 1013.0 - (device % 5.0) + 1.5 * (t / 3.0).cos() + 0.3 * noise(3);
    let bat = 4.15 - (seq as f64 / 1e6).min(0.8) + 0.004 * noise(4);
    let rssi = -60.0 - (device % 25.0) + 6.0 * noise(5);
    let ts = 1_795_644_000_000u64 + seq * 1000 + (conn as u64 % 1000);
    format!(
        "{{\"ts\":{ts},\"temp\":{temp:.2},\"hum\":{hum:.1},\"press\":{press:.1},\"bat\":{bat:.3},\"rssi\":{rssi:.0}}}"
    )
}

fn raw(o: &Options) -> Result<(), BenchError> {
    let delivered = Arc::new(AtomicU64::new(0));
    // The gateway's own producer settings, from the library, with its
    // defaults: the baseline differs from the gateway by the gateway alone.
    let defaults = edgegate::config::Config::load(&Default::default(), &Default::default())
        .map_err(|e| BenchError::Failed(e.to_string()))?;
    let kafka = edgegate::config::KafkaConfig {
        brokers: o.brokers.clone(),
        ..defaults.kafka
    };
    let producer: ThreadedProducer<DefaultProducerContext> =
        edgegate::kafka::producer::client_config(&kafka)
            .set("statistics.interval.ms", "0")
            .create()?;
    let mut payload = frame(0, 0, o.payload());
    let start = Instant::now();
    for i in 0..o.messages {
        let key = format!("bench-{}", i % 50);
        if o.telemetry {
            // Readings differ, or compression would flatter the baseline.
            payload = frame((i % 50) as usize, i / 50, o.payload());
        }
        let mut record = BaseRecord::<str, str>::to(&o.topic)
            .key(&key)
            .payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(600))?;
    delivered.store(o.messages, Relaxed);
    let secs = start.elapsed().as_secs_f64();
    println!(
        "mode=raw messages={} size={} seconds={secs:.3} msgs_per_sec={:.0}",
        o.messages,
        if o.telemetry {
            "telemetry".to_owned()
        } else {
            o.size.to_string()
        },
        o.messages as f64 / secs
    );
    Ok(())
}

struct ConnResult {
    latencies_us: Vec<u32>,
    acked: Vec<String>,
    errors: u64,
    /// Bytes of the frames sent, newlines included.
    sent_bytes: u64,
}

fn uplink(o: &Options) -> Result<(), BenchError> {
    let gateway = require(o.gateway, "gateway")?;
    let per_conn = o.messages.div_ceil(o.connections as u64);
    let cpu_before = cpu_secs(std::process::id());
    let start = Instant::now();
    let progress = Arc::new(AtomicU64::new(0));
    let pacing = o.paced.then(|| Pacing {
        start,
        per_conn_per_sec: o.rate as f64 / o.connections as f64,
        phase: 0.0,
    });
    let threads: Vec<_> = (0..o.connections)
        .map(|c| {
            let (progress, window, payload) = (progress.clone(), o.window, o.payload());
            let pacing = pacing.map(|p| Pacing {
                phase: c as f64 / o.connections as f64,
                ..p
            });
            std::thread::spawn(move || {
                drive(gateway, c, per_conn, window, pacing, payload, &progress)
            })
        })
        .collect();
    let reporter = {
        let progress = progress.clone();
        let total = per_conn * o.connections as u64;
        std::thread::spawn(move || {
            while progress.load(Relaxed) < total {
                std::thread::sleep(Duration::from_secs(1));
                eprintln!("uplink: {} / {total} acked", progress.load(Relaxed));
                if start.elapsed() > Duration::from_secs(600) {
                    break;
                }
            }
        })
    };
    let mut latencies = Vec::new();
    let mut acked = Vec::new();
    let mut errors = 0;
    let mut sent_bytes = 0;
    for t in threads {
        let r = t
            .join()
            .map_err(|_| BenchError::Failed("a client thread panicked".into()))??;
        latencies.extend(r.latencies_us);
        acked.extend(r.acked);
        errors += r.errors;
        sent_bytes += r.sent_bytes;
    }
    let secs = start.elapsed().as_secs_f64();
    let client_cpu = cpu_secs(std::process::id())
        .zip(cpu_before)
        .map(|(a, b)| a - b);
    let _ = reporter.join();
    latencies.sort_unstable();
    let pct = |p: f64| percentile_ms(&latencies, p);
    let verified = if o.verify {
        let found = count_in_topic(&o.brokers, &o.topic, o.partitions, &acked)?;
        format!(" verified={found} missing={}", acked.len() - found)
    } else {
        String::new()
    };
    println!(
        "mode=uplink connections={} window={} size={} acked={} errors={errors} sent_bytes={sent_bytes} seconds={secs:.3} msgs_per_sec={:.0} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2} client_cpu_secs={:.2}{verified}",
        o.connections,
        o.window,
        if o.telemetry { "telemetry".to_owned() } else { o.size.to_string() },
        acked.len(),
        acked.len() as f64 / secs,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        client_cpu.unwrap_or(f64::NAN),
    );
    Ok(())
}

/// `uplink --rate`: when each connection's requests are due.
#[derive(Clone, Copy)]
struct Pacing {
    start: Instant,
    per_conn_per_sec: f64,
    /// This connection's offset, a fraction of the interval: devices are not
    /// in step.
    phase: f64,
}

impl Pacing {
    fn due(&self, n: u64) -> Instant {
        self.start + Duration::from_secs_f64((n as f64 + self.phase) / self.per_conn_per_sec)
    }
}

/// One connection: keeps up to `window` frames in flight until `count` are
/// answered, each sent when due if paced (late ones as soon as the window
/// allows).
fn drive(
    gateway: SocketAddr,
    conn: usize,
    count: u64,
    window: usize,
    pacing: Option<Pacing>,
    payload: Payload,
    progress: &AtomicU64,
) -> Result<ConnResult, BenchError> {
    let stream = TcpStream::connect(gateway)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    let mut sent_at = std::collections::VecDeque::with_capacity(window);
    let mut result = ConnResult {
        latencies_us: Vec::with_capacity(count as usize),
        acked: Vec::with_capacity(count as usize),
        errors: 0,
        sent_bytes: 0,
    };
    let mut next = 0u64;
    let mut out = String::new();
    let mut line = String::new();
    while (result.acked.len() as u64 + result.errors) < count {
        out.clear();
        if let (Some(p), true) = (pacing, sent_at.is_empty() && next < count) {
            if let Some(wait) = p.due(next).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        while next < count
            && sent_at.len() < window
            && pacing.is_none_or(|p| p.due(next) <= Instant::now())
        {
            out.push_str(&frame(conn, next, payload));
            out.push('\n');
            sent_at.push_back(Instant::now());
            next += 1;
        }
        if !out.is_empty() {
            writer.write_all(out.as_bytes())?;
            result.sent_bytes += out.len() as u64;
        }
        // Take every reply already buffered before refilling the window, so
        // the client costs one write per burst, not one per reply.
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(BenchError::Failed(
                    "the gateway closed the connection".into(),
                ));
            }
            let sent = sent_at
                .pop_front()
                .ok_or_else(|| BenchError::Failed("unexpected reply".into()))?;
            result
                .latencies_us
                .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
            match extract(&line, "\"messageId\":\"") {
                Some(id) => result.acked.push(id.to_owned()),
                None => result.errors += 1,
            }
            progress.fetch_add(1, Relaxed);
            if !reader.buffer().contains(&b'\n') {
                break;
            }
        }
    }
    Ok(result)
}

fn extract<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let start = line.find(marker)? + marker.len();
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

/// How many of `ids` are in `topic`, read from the beginning.
fn count_in_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    ids: &[String],
) -> Result<usize, BenchError> {
    let mut want: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let total = want.len();
    let consumer = reader(brokers, topic, partitions, rdkafka::Offset::Beginning)?;
    let mut last_progress = Instant::now();
    while !want.is_empty() && last_progress.elapsed() < Duration::from_secs(20) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let payload = std::str::from_utf8(m.payload().unwrap_or_default()).unwrap_or("");
            if let Some(id) = extract(payload, "\"messageId\":\"") {
                if want.remove(id) {
                    last_progress = Instant::now();
                }
            }
        }
    }
    Ok(total - want.len())
}

/// User plus system CPU seconds a process has used (Linux /proc; the
/// kernel reports them in ticks of 1/100 s on every common platform).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may itself hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn idle(o: &Options) -> Result<(), BenchError> {
    let gateway = require(o.gateway, "gateway")?;
    let pid = require(o.pid, "pid")?;
    let before = rss_kib(pid).ok_or_else(|| BenchError::Failed(format!("no process {pid}")))?;
    let mut conns = Vec::with_capacity(o.connections);
    for i in 0..o.connections {
        let mut s = TcpStream::connect(gateway)?;
        // One ping each, answered: the gateway has really taken the connection.
        s.write_all(b"Ping\n")?;
        conns.push(s);
        if (i + 1) % 1000 == 0 {
            eprintln!("idle: {} connections", i + 1);
        }
    }
    for s in &mut conns {
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = [0u8; 5];
        std::io::Read::read_exact(s, &mut buf)?;
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid).unwrap_or(before);
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / o.connections as f64;
    println!(
        "mode=idle connections={} rss_before_kib={before} rss_after_kib={after} bytes_per_connection={per:.0}",
        o.connections
    );
    Ok(())
}

fn drain(o: &Options) -> Result<(), BenchError> {
    let admin = require(o.admin, "admin")?;
    let pid = require(o.pid, "pid")?;
    let start = Instant::now();
    let first = outbox_records(admin)?;
    let mut peak_rss = 0;
    let mut samples = Vec::new();
    loop {
        let left = outbox_records(admin)?;
        let rss = rss_kib(pid).unwrap_or(0);
        peak_rss = peak_rss.max(rss);
        samples.push((start.elapsed().as_secs_f64(), left, rss));
        eprintln!(
            "drain: t={:.1}s outbox_records={left} rss_kib={rss}",
            start.elapsed().as_secs_f64()
        );
        if left == 0 {
            break;
        }
        if start.elapsed() > Duration::from_secs(3600) {
            return Err(BenchError::Failed(
                "the outbox did not drain within an hour".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = start.elapsed().as_secs_f64();
    let curve: Vec<String> = samples
        .iter()
        .map(|(t, n, r)| format!("{t:.2}:{n}:{r}"))
        .collect();
    println!(
        "mode=drain records={first} seconds={secs:.3} msgs_per_sec={:.0} peak_rss_kib={peak_rss} curve={}",
        first as f64 / secs.max(0.001),
        curve.join(",")
    );
    Ok(())
}

fn plot(o: &Options) -> Result<(), BenchError> {
    let input = o
        .input
        .as_deref()
        .ok_or_else(|| BenchError::Usage(format!("--input is required\n{USAGE}")))?;
    let output = o
        .output
        .as_deref()
        .ok_or_else(|| BenchError::Usage(format!("--output is required\n{USAGE}")))?;
    let text = std::fs::read_to_string(input)?;
    std::fs::write(output, crate::plot::svg(&text))?;
    println!("mode=plot output={output}");
    Ok(())
}

fn report(o: &Options) -> Result<(), BenchError> {
    let input = o
        .input
        .as_deref()
        .ok_or_else(|| BenchError::Usage(format!("--input is required\n{USAGE}")))?;
    let results = std::fs::read_to_string(input)?;
    let profile = match &o.profile {
        Some(p) => std::fs::read_to_string(p).ok(),
        None => None,
    };
    print!("{}", crate::report::markdown(&results, profile.as_deref()));
    Ok(())
}

fn outbox_records(admin: SocketAddr) -> Result<u64, BenchError> {
    Ok(metric(admin, "edgegate_outbox_records")? as u64)
}

fn roundtrip(o: &Options) -> Result<(), BenchError> {
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    let gateway = require(o.gateway, "gateway")?;
    let admin = require(o.admin, "admin")?;
    // The gateway must be consuming the reply topic before anything is sent.
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(admin, "edgegate_kafka_consumer_partitions")? < 1.0 {
        if Instant::now() > deadline {
            return Err(BenchError::Failed(
                "the gateway's downlink consumer has no partitions".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let stop = Arc::new(AtomicBool::new(false));
    // When the worker saw each request: splits the round trip into the way
    // up (device to worker) and the way down (worker to device).
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let worker = {
        let (brokers, topic, reply, partitions, worker_stop, seen) = (
            o.brokers.clone(),
            o.topic.clone(),
            o.reply_topic.clone(),
            o.partitions,
            stop.clone(),
            seen.clone(),
        );
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            echo_worker(
                &brokers,
                &topic,
                &reply,
                partitions,
                &worker_stop,
                &seen,
                ready_tx,
            )
        });
        // The worker reads from the end; a request sent before it knows where
        // the end is would never be answered. It says when it is positioned.
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            stop.store(true, Relaxed);
            return match worker.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(BenchError::Failed(
                    "the echo worker never saw its own probe on the uplink topic".into(),
                )),
            };
        }
        worker
    };

    let per_conn = o.rate as f64 / o.connections as f64;
    let connections = o.connections;
    let sending = Duration::from_secs(o.seconds);
    let start = Instant::now();
    let threads: Vec<_> = (0..o.connections)
        .map(|c| -> Result<_, BenchError> {
            let stream = TcpStream::connect(gateway)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_millis(200)))?;
            let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
            let mut writer = stream.try_clone()?;
            let (sent_w, payload) = (sent.clone(), o.payload());
            // Set once this connection's last request is written: until then
            // an empty `sent` does not mean every request came back (the
            // sender may be asleep until a send due after `sending`).
            let done = Arc::new(AtomicBool::new(false));
            let done_w = done.clone();
            let send = std::thread::spawn(move || -> std::io::Result<u64> {
                let mut n = 0u64;
                // Each connection's sends are offset by its share of the
                // interval: devices are not in step, and 50 sending at the
                // same instant made every rate look like bursts of 50 (one
                // Kafka batch each, whatever linger.ms was).
                let phase = c as f64 / connections as f64;
                while start.elapsed() < sending {
                    let due = start + Duration::from_secs_f64((n as f64 + phase) / per_conn);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let f = frame(c, n, payload);
                    sent_w
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(format!("{c}-{n}"), Instant::now());
                    writer.write_all(f.as_bytes())?;
                    writer.write_all(b"\n")?;
                    n += 1;
                }
                done_w.store(true, Relaxed);
                Ok(n)
            });
            let seen = seen.clone();
            let recv = std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut latencies = Vec::new();
                let (mut ups, mut downs) = (Vec::new(), Vec::new());
                let mut line = String::new();
                let quiet_until = start + sending + Duration::from_secs(5);
                while Instant::now() < quiet_until {
                    // A read timeout keeps the part of a line read so far in
                    // `line`; only a whole line is taken and cleared.
                    if line.ends_with('\n') {
                        line.clear();
                    }
                    match reader.read_line(&mut line) {
                        Ok(0) => break,
                        Ok(_) if line.contains("\"action\":\"echo\"") => {
                            if let Some(uid) = extract(&line, "\"uid\":\"") {
                                let mut sent = sent.lock().unwrap_or_else(|p| p.into_inner());
                                if let Some(at) = sent.remove(uid) {
                                    let now = Instant::now();
                                    latencies.push(micros(now - at));
                                    let worker_at =
                                        seen.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
                                    if let Some(w) = worker_at {
                                        ups.push(micros(w.saturating_duration_since(at)));
                                        downs.push(micros(now.saturating_duration_since(w)));
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                    let all_back = sent.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
                    if all_back && done.load(Relaxed) {
                        break;
                    }
                }
                (latencies, ups, downs)
            });
            Ok((send, recv))
        })
        .collect::<Result<_, _>>()?;
    let (mut total, mut latencies, mut ups, mut downs) = (0u64, Vec::new(), Vec::new(), Vec::new());
    for (send, recv) in threads {
        total += send
            .join()
            .map_err(|_| BenchError::Failed("a sender panicked".into()))??;
        let (l, u, d) = recv
            .join()
            .map_err(|_| BenchError::Failed("a reader panicked".into()))?;
        latencies.extend(l);
        ups.extend(u);
        downs.extend(d);
    }
    ups.sort_unstable();
    downs.sort_unstable();
    stop.store(true, Relaxed);
    let _ = worker.join();
    latencies.sort_unstable();
    let pct = |p: f64| percentile_ms(&latencies, p);
    println!(
        "mode=roundtrip connections={} rate={} seconds={} sent={total} echoed={} lost={} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2} up_p50_ms={:.2} up_p99_ms={:.2} down_p50_ms={:.2} down_p99_ms={:.2}",
        o.connections,
        o.rate,
        o.seconds,
        latencies.len(),
        total.saturating_sub(latencies.len() as u64),
        pct(0.50),
        pct(0.99),
        pct(0.999),
        percentile_ms(&ups, 0.50),
        percentile_ms(&ups, 0.99),
        percentile_ms(&downs, 0.50),
        percentile_ms(&downs, 0.99),
    );
    Ok(())
}

fn hop(o: &Options) -> Result<(), BenchError> {
    use rdkafka::producer::{BaseProducer, BaseRecord as Record};
    // From the beginning of a topic that must be empty: some brokers report
    // the end of a partition wrongly, which would skew every sample.
    let consumer = reader(
        &o.brokers,
        &o.topic,
        o.partitions,
        rdkafka::Offset::Beginning,
    )?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &o.brokers)
        .set("linger.ms", "1")
        .create()?;
    // Let the consumer resolve its start offsets before anything is sent.
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle {
        let _ = consumer.poll(Duration::from_millis(50));
    }
    let start = Instant::now();
    let sending = Duration::from_secs(o.seconds);
    let (rate, topic) = (o.rate, o.topic.clone());
    let sender = std::thread::spawn(move || {
        let mut sent = 0u64;
        while start.elapsed() < sending {
            let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let stamp = (start.elapsed().as_micros() as u64).to_string();
            let mut record = Record::<(), str>::to(&topic).payload(&stamp);
            while let Err((_, back)) = producer.send(record) {
                record = back;
                producer.poll(Duration::from_millis(1));
            }
            producer.poll(Duration::ZERO);
            sent += 1;
        }
        let _ = producer.flush(Duration::from_secs(5));
        sent
    });
    let mut latencies = Vec::new();
    while start.elapsed() < sending + Duration::from_secs(3) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) {
            let stamp = std::str::from_utf8(m.payload().unwrap_or_default())
                .ok()
                .and_then(|t| t.parse::<u64>().ok());
            if let Some(at) = stamp {
                let now = start.elapsed().as_micros() as u64;
                latencies.push(now.saturating_sub(at).min(u64::from(u32::MAX)) as u32);
            }
        }
    }
    let sent = sender
        .join()
        .map_err(|_| BenchError::Failed("the sender panicked".into()))?;
    latencies.sort_unstable();
    println!(
        "mode=hop rate={} seconds={} sent={sent} received={} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2}",
        o.rate,
        o.seconds,
        latencies.len(),
        percentile_ms(&latencies, 0.50),
        percentile_ms(&latencies, 0.99),
        percentile_ms(&latencies, 0.999),
    );
    Ok(())
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// A backend worker: answers every ServerRequest with an echo to its clientId.
fn echo_worker(
    brokers: &str,
    topic: &str,
    reply: &str,
    partitions: i32,
    stop: &std::sync::atomic::AtomicBool,
    seen: &std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    ready: std::sync::mpsc::Sender<()>,
) -> Result<(), BenchError> {
    use rdkafka::producer::{BaseProducer, BaseRecord as Record};
    let consumer = reader(brokers, topic, partitions, rdkafka::Offset::End)?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .create()?;
    // Positioned once a probe written to each partition has been read back:
    // resolving "the end" takes a fetch, which a loaded machine can delay
    // past any fixed sleep. Probes are re-sent, as one written before the
    // end was resolved is skipped.
    let probe = format!(
        "edgegate-bench-probe-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    );
    let mut unseen: HashSet<i32> = (0..partitions).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut resend = Instant::now();
    while !unseen.is_empty() {
        if stop.load(Relaxed) || Instant::now() > deadline {
            return Err(BenchError::Failed(
                "the echo worker never saw its own probe on the uplink topic".into(),
            ));
        }
        if Instant::now() >= resend {
            for &p in &unseen {
                let _ = producer.send(Record::<(), str>::to(topic).partition(p).payload(&probe));
            }
            resend = Instant::now() + Duration::from_millis(500);
        }
        producer.poll(Duration::ZERO);
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) {
            if m.payload() == Some(probe.as_bytes()) {
                unseen.remove(&m.partition());
            }
        }
    }
    let _ = ready.send(());
    while !stop.load(Relaxed) {
        producer.poll(Duration::ZERO);
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) else {
            continue;
        };
        let payload = std::str::from_utf8(m.payload().unwrap_or_default()).unwrap_or("");
        let (Some(client), Some(uid)) = (
            extract(payload, "\"clientId\":\""),
            extract(payload, "\"uid\":\""),
        ) else {
            continue;
        };
        seen.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid.to_owned(), Instant::now());
        let answer = format!(
            "{{\"deviceResponse\":{{\"action\":\"echo\",\"uid\":\"{uid}\",\"status\":\"ok\"}},\"clientId\":\"{client}\"}}"
        );
        let mut record = Record::<(), str>::to(reply).payload(&answer);
        while let Err((_, back)) = producer.send(record) {
            record = back;
            producer.poll(Duration::from_millis(1));
        }
    }
    let _ = producer.flush(Duration::from_secs(5));
    Ok(())
}

fn metric(admin: SocketAddr, name: &str) -> Result<f64, BenchError> {
    let mut s = TcpStream::connect(admin)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body)?;
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// A consumer of every partition of `topic` from `start`, by assignment (no
/// group join, which some brokers make slow).
fn reader(
    brokers: &str,
    topic: &str,
    partitions: i32,
    start: rdkafka::Offset,
) -> Result<BaseConsumer, BenchError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "edgegate-bench")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, start)?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// The `p` quantile of sorted microsecond latencies, in milliseconds.
fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    let i = ((sorted_us.len() as f64 * p) as usize).min(sorted_us.len().saturating_sub(1));
    sorted_us.get(i).copied().unwrap_or(0) as f64 / 1000.0
}
