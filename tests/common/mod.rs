//! Test harness: a real tansu broker behind a cuttable TCP proxy, the real
//! edgegate binary, device clients over plain sockets, and Kafka helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::TopicPartitionList;
use serde_json::Value;

pub mod cutfs;
pub mod tokens;

pub const WAIT: Duration = Duration::from_secs(30);

/// A free TCP port below 32768 (outside Linux's ephemeral range, so an
/// outgoing connection cannot take it between the check and its use).
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 400) as u16 * 30,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let mut port = NEXT.fetch_add(1, Ordering::SeqCst);
        if port >= 32_000 {
            NEXT.store(20_000, Ordering::SeqCst);
            port = 20_000;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

// ---------------------------------------------------------------- proxy ----

/// A TCP proxy that can cut every connection and refuse new ones, to
/// simulate a broker outage as the gateway sees it.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        // Port 0: the kernel picks one that is free, with no window between
        // a check and the bind (free_port's check once lost that race).
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("proxy bind");
        let port = listener.local_addr().expect("proxy address").port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (up2, conns2) = (up.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut list = conns2.lock().unwrap();
                    list.retain(|s| s.peer_addr().is_ok());
                    list.push(client.try_clone().unwrap());
                    list.push(server.try_clone().unwrap());
                }
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Proxy { port, up, conns }
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

// --------------------------------------------------------------- broker ----

/// A tansu broker (memory storage) reached through a [`Proxy`]: the broker
/// advertises the proxy's address, so every client goes through it.
pub struct Broker {
    child: Child,
    pub proxy: Proxy,
    _dir: tempfile::TempDir,
    port: u16,
    storage: String,
}

/// tansu runs under a small shell that kills it when our end of its stdin
/// closes, so a broker outlives no test process (a shared broker in a
/// static is never dropped).
fn spawn_tansu(dir: &Path, port: u16, advertised_port: u16, storage: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("tansu.log"))
        .unwrap();
    Command::new("sh")
        .arg("-c")
        .arg("\"$0\" \"$@\" </dev/null & child=$!; read _; kill $child; wait $child")
        .arg(tansu_bin())
        .arg("broker")
        .arg("--listener-url")
        .arg(format!("tcp://127.0.0.1:{port}"))
        .arg("--advertised-listener-url")
        .arg(format!("tcp://127.0.0.1:{advertised_port}"))
        .arg("--storage-engine")
        .arg(storage)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting tansu (run .ci/install-tansu.sh to install it)")
}

pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let candidate = Path::new(&home).join(".cargo/bin/tansu");
    if candidate.exists() {
        candidate
    } else {
        PathBuf::from("tansu")
    }
}

impl Broker {
    /// A broker with memory storage: fast, gone when it stops.
    pub fn start() -> Broker {
        Broker::start_with("memory://tansu/")
    }

    /// A broker with SQLite storage in its directory, which survives
    /// [`Broker::restart`].
    pub fn start_persistent() -> Broker {
        Broker::start_with("sqlite://tansu.db")
    }

    fn start_with(storage: &str) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let proxy = Proxy::start(port);
        let child = spawn_tansu(dir.path(), port, proxy.port, storage);
        let broker = Broker {
            child,
            proxy,
            _dir: dir,
            port,
            storage: storage.to_owned(),
        };
        broker.wait_listening();
        broker
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the broker process and starts it again on the same port and
    /// storage (the proxy stays, so clients see one broker going away).
    pub fn restart(&mut self, down_for: Duration) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
        std::thread::sleep(down_for);
        self.child = spawn_tansu(self._dir.path(), self.port, self.proxy.port, &self.storage);
        self.wait_listening();
    }

    /// The address clients use (the proxy's).
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.proxy.port)
    }

    /// A new uplink and downlink topic pair, with these partition counts.
    pub fn fresh_topics(&self, up_partitions: i32, down_partitions: i32) -> (String, String) {
        let (up, down) = (unique("up"), unique("down"));
        self.create_topic(&up, up_partitions);
        self.create_topic(&down, down_partitions);
        (up, down)
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.addr())
            .create()
            .unwrap();
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let result = smol::block_on(admin.create_topics([&topic], &opts)).expect("create_topics");
        for r in result {
            if let Err((t, e)) = r {
                assert_eq!(
                    e,
                    rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                    "creating {t}"
                );
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        drop(self.child.stdin.take()); // the shell kills tansu
        let _ = self.child.wait();
    }
}

/// One broker shared by the tests of a binary that do not cut its link.
pub fn shared_broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

/// A record as read back from Kafka.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Value,
    pub headers: HashMap<String, Vec<u8>>,
}

/// Reads `topic` from the beginning (assign, no group) until `want` records
/// arrived or `timeout` passed. Counts records: never trusts watermarks.
pub fn read_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    want: usize,
    timeout: Duration,
) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let mut headers = HashMap::new();
            if let Some(h) = m.headers() {
                for header in h.iter() {
                    headers.insert(
                        header.key.to_owned(),
                        header.value.unwrap_or_default().to_vec(),
                    );
                }
            }
            out.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().unwrap_or_default().to_vec(),
                payload: serde_json::from_slice(m.payload().unwrap_or_default())
                    .unwrap_or(Value::Null),
                headers,
            });
        }
    }
    out
}

pub fn producer(brokers: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .create()
        .unwrap()
}

/// Produces raw payloads to `topic` and waits until they are delivered.
pub fn produce(p: &BaseProducer, topic: &str, payloads: &[Vec<u8>]) {
    produce_to(p, topic, None, payloads)
}

/// Like [`produce`], to one partition (or the partitioner's choice).
pub fn produce_to(p: &BaseProducer, topic: &str, partition: Option<i32>, payloads: &[Vec<u8>]) {
    for payload in payloads {
        let mut record = BaseRecord::<(), [u8]>::to(topic).payload(payload);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        loop {
            match p.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    p.poll(Duration::from_millis(10));
                }
            }
        }
    }
    p.flush(Duration::from_secs(20)).expect("downlink produce");
}

// -------------------------------------------------------------- gateway ----

pub struct GatewayOptions {
    pub brokers: String,
    pub env: Vec<(String, String)>,
    /// A config file (`--config`), for what only a file can set.
    pub config: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub wait_ready: bool,
}

impl GatewayOptions {
    pub fn new(brokers: impl Into<String>) -> Self {
        GatewayOptions {
            brokers: brokers.into(),
            env: Vec::new(),
            config: None,
            data_dir: None,
            wait_ready: true,
        }
    }

    /// A gateway whose Kafka is unreachable: for tests of the device side.
    pub fn offline() -> Self {
        Self::new(format!("127.0.0.1:{}", free_port()))
    }

    /// Sets a variable for the gateway; an empty value removes it (e.g.
    /// the harness's RUST_LOG, so that a config file's `log.level` counts).
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_owned(), value.to_string()));
        self
    }

    pub fn config(mut self, path: &Path) -> Self {
        self.config = Some(path.to_owned());
        self
    }

    pub fn topics(self, uplink: &str, downlink: &str) -> Self {
        self.env("EDGEGATE_KAFKA_PRODUCER_TOPIC", uplink)
            .env("EDGEGATE_KAFKA_CONSUMER_TOPICS", downlink)
    }
}

pub struct Gateway {
    child: Option<Child>,
    pub port: u16,
    pub admin_port: u16,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    opts_env: Vec<(String, String)>,
    config: Option<PathBuf>,
    brokers: String,
}

/// The binary under test: this build's, or `EDGEGATE_TEST_BIN` (e.g. a
/// cross-compiled one), run through `EDGEGATE_TEST_RUNNER` if set (e.g.
/// `qemu-aarch64-static`).
pub fn bin() -> String {
    std::env::var("EDGEGATE_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_edgegate").to_owned())
}

pub fn command() -> Command {
    let mut c = match std::env::var("EDGEGATE_TEST_RUNNER") {
        Ok(runner) if !runner.is_empty() => {
            let mut c = Command::new(runner);
            c.arg(bin());
            c
        }
        _ => Command::new(bin()),
    };
    // The gateway refuses EDGEGATE_* variables that name no key, and the
    // test runs' own (EDGEGATE_TEST_BIN, EDGEGATE_POWER_CUTS...) are some:
    // a gateway gets only the settings its test gives it.
    for (k, _) in std::env::vars() {
        if k.starts_with("EDGEGATE_") {
            c.env_remove(k);
        }
    }
    // Run by a systemd unit (a CI runner), the gateway would log in the
    // journal format; the tests read the text one unless they ask.
    c.env_remove("JOURNAL_STREAM");
    c
}

/// Runs the binary once (not as a gateway): its exit code, stdout, stderr.
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = command()
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Gateway {
    pub fn start(opts: GatewayOptions) -> Gateway {
        let (tmp, data_dir) = match opts.data_dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().unwrap();
                let d = t.path().join("data");
                (Some(t), d)
            }
        };
        let mut g = Gateway {
            child: None,
            port: 0,
            admin_port: 0,
            log_path: PathBuf::new(),
            data_dir,
            _tmp: tmp,
            opts_env: opts.env,
            config: opts.config,
            brokers: opts.brokers,
        };
        g.spawn(opts.wait_ready);
        g
    }

    fn spawn(&mut self, wait_ready: bool) {
        self.port = free_port();
        self.admin_port = free_port();
        self.spawn_on_ports(wait_ready);
    }

    fn spawn_on_ports(&mut self, wait_ready: bool) {
        std::fs::create_dir_all(&self.data_dir).unwrap();
        self.log_path = self.data_dir.with_extension(format!("{}.log", self.port));
        // Appended to: a loop's restarts on the same ports share one log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let mut cmd = command();
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{}", self.admin_port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--brokers")
            .arg(&self.brokers)
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            // Quick group joins on tansu (it takes about half the session timeout).
            .env("EDGEGATE_KAFKA_DRAIN_TIMEOUT_SECS", "5")
            // tansu answers a fetch only when its wait is over, not when a
            // reply arrives: at the default 500 ms every reply would wait.
            .env("EDGEGATE_KAFKA_FETCH_WAIT_MS", "10")
            // The suites run in both outbox modes: CI sets 0 for a second pass.
            .env(
                "EDGEGATE_OUTBOX_SPILL_AFTER_MS",
                std::env::var("EDGEGATE_TEST_SPILL_AFTER_MS").unwrap_or_else(|_| "50".into()),
            )
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.opts_env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        self.child = Some(cmd.spawn().expect("starting edgegate"));
        if wait_ready {
            self.wait_ready();
        }
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((200, _)) = http_get(self.admin_port, "/readyz") {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "edgegate exited with {status} before ready:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "edgegate not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn device(&self) -> Device {
        Device::connect(self.port)
    }

    pub fn metrics(&self) -> HashMap<String, f64> {
        let (_, body) = http_get(self.admin_port, "/metrics").expect("metrics");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect()
    }

    /// The `/status` document.
    pub fn status(&self) -> Value {
        let (code, body) = http_get(self.admin_port, "/status").expect("/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    pub fn metric(&self, name: &str) -> f64 {
        self.metrics().get(name).copied().unwrap_or(f64::NAN)
    }

    /// Waits until `f(metric)` holds.
    pub fn wait_metric(&self, name: &str, f: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.metric(name);
            if f(v) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} stayed at {v}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (up to 2 minutes) until the outbox is empty: all sent to Kafka.
    pub fn wait_drained(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.metric("edgegate_outbox_records") != 0.0 {
            assert!(
                Instant::now() < deadline,
                "the outbox never drained:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the downlink consumer has its partitions.
    pub fn wait_consumer(&self) {
        self.wait_metric("edgegate_kafka_consumer_partitions", |v| v >= 1.0);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                panic!("edgegate did not exit:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts again on the same data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(true);
    }

    /// SIGKILL, then start again on the same data directory and ports,
    /// without waiting for it to be ready (devices reconnect by themselves).
    pub fn kill_and_respawn(&mut self) {
        self.kill();
        self.spawn_on_ports(false);
    }

    /// Starts again on the same data directory and ports after [`Gateway::kill`],
    /// without waiting for it to be ready.
    pub fn respawn(&mut self) {
        assert!(self.child.is_none(), "respawn after kill");
        self.spawn_on_ports(false);
    }

    /// True once /readyz answers 200.
    pub fn is_ready(&self) -> bool {
        matches!(http_get(self.admin_port, "/readyz"), Some((200, _)))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- edgegate log ----\n{}", self.log());
        }
        self.kill();
    }
}

/// A process's resident memory, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let (status, _, body) = http(port, "GET", path)?;
    Some((status, body))
}

/// One request to the admin endpoint: status, head and body.
pub fn http(port: u16, method: &str, path: &str) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((status, head.to_owned(), body.to_owned()))
}

// --------------------------------------------------------------- device ----

pub struct Device {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Device {
    pub fn connect(port: u16) -> Device {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to gateway");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let _ = stream.set_nodelay(true);
        let reader = BufReader::new(stream.try_clone().unwrap());
        Device { stream, reader }
    }

    /// Connects from the loopback address `source` (any 127.x.y.z), so a
    /// test has a source address of its own (damping is per address).
    pub fn connect_from(port: u16, source: std::net::Ipv4Addr) -> Device {
        Device::wrap(connect_from(port, source).expect("connect to gateway"))
    }

    pub fn wrap(stream: TcpStream) -> Device {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let _ = stream.set_nodelay(true);
        let reader = BufReader::new(stream.try_clone().unwrap());
        Device { stream, reader }
    }

    pub fn try_connect(port: u16) -> Option<Device> {
        let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut reader = BufReader::new(stream.try_clone().ok()?);
        // A listener that stopped accepting may still complete the handshake
        // in the kernel backlog; count it as refused if nothing is served.
        let _ = (&stream).write_all(b"Ping\n");
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(n) if n > 0 => Some(Device { stream, reader }),
            _ => None,
        }
    }

    pub fn send(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\n").unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next line, without its newline; None on EOF or timeout.
    pub fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end_matches(['\n', '\r']).to_owned()),
        }
    }

    pub fn json(&mut self) -> Value {
        let line = self.line().expect("a reply line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"))
    }

    pub fn set_timeout(&self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).unwrap();
    }

    /// Sends one request and returns the reply (ack or error).
    pub fn request(
        &mut self,
        action: &str,
        uid: &str,
        device_uid: Option<&str>,
        data: Value,
    ) -> Value {
        let mut req = serde_json::json!({"action": action, "uid": uid, "data": data});
        if let Some(d) = device_uid {
            req["deviceUid"] = Value::from(d);
        }
        self.send(&req.to_string());
        self.json()
    }

    /// True once the gateway closed the connection (EOF within `t`).
    pub fn closed_within(&mut self, t: Duration) -> bool {
        self.set_timeout(t);
        let mut buf = [0u8; 256];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// A TCP connection to 127.0.0.1:`port` from `source`.
pub fn connect_from(port: u16, source: std::net::Ipv4Addr) -> std::io::Result<TcpStream> {
    use rustix::net::{AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None)?;
    rustix::net::bind(&fd, &std::net::SocketAddrV4::new(source, 0))?;
    rustix::net::connect(
        &fd,
        &std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port),
    )?;
    Ok(TcpStream::from(fd))
}

/// A loopback source address no other test in this process uses.
pub fn fresh_source() -> std::net::Ipv4Addr {
    static NEXT: AtomicU16 = AtomicU16::new(1);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    std::net::Ipv4Addr::new(127, 77, (n >> 8) as u8, n as u8)
}

/// Sends requests `from..from + n` for `device` in pipelined bursts of 50
/// (each with `pad` bytes of padding) and returns the acks, checking that
/// replies come in order.
pub fn send_numbered(d: &mut Device, device: &str, from: u64, n: u64, pad: usize) -> Vec<Acked> {
    let padding = "p".repeat(pad);
    let mut acked = Vec::new();
    for start in (from..from + n).step_by(50) {
        let end = (start + 50).min(from + n);
        let mut burst = String::new();
        for i in start..end {
            burst.push_str(&format!(
                "{{\"action\":\"seq\",\"uid\":\"{i}\",\"deviceUid\":\"{device}\",\"data\":{{\"i\":{i},\"pad\":\"{padding}\"}}}}\n"
            ));
        }
        d.send_raw(burst.as_bytes());
        for i in start..end {
            let r = d.json();
            assert_eq!(r["uid"], i.to_string());
            acked.push((ack_id(&r), i, device.to_owned()));
        }
    }
    acked
}

/// A device that sends seq n until it is acked, then n + 1, and records
/// every ack; it reconnects after any failure and sends the unacknowledged
/// seq again (a new messageId), until `stop`.
pub fn stream_numbered(
    port: u16,
    name: String,
    pad: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
) {
    let padding = "p".repeat(pad);
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let mut d = Device::wrap(stream);
        d.set_timeout(Duration::from_secs(3));
        while !stop.load(Ordering::SeqCst) {
            let frame = if pad == 0 {
                format!("{{\"action\":\"seq\",\"uid\":\"{seq}\",\"deviceUid\":\"{name}\",\"data\":{seq}}}\n")
            } else {
                format!(
                    "{{\"action\":\"seq\",\"uid\":\"{seq}\",\"deviceUid\":\"{name}\",\"data\":{{\"i\":{seq},\"pad\":\"{padding}\"}}}}\n"
                )
            };
            if d.stream.write_all(frame.as_bytes()).is_err() {
                break;
            }
            let Some(line) = d.line() else { break };
            let reply: Value = serde_json::from_str(&line).unwrap();
            if reply["action"] == "ack" {
                assert_eq!(reply["uid"], seq.to_string(), "{name}: reply out of order");
                acked
                    .lock()
                    .unwrap()
                    .push((ack_id(&reply), seq, name.clone()));
                seq += 1;
            } else {
                // shutting_down or outbox_full: nothing stored, send again.
                assert_eq!(reply["action"], "error", "{line}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `n` devices running [`stream_numbered`] against `port`.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub acked: Arc<Mutex<Vec<Acked>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16, devices: usize) -> Load {
        Load::start_padded(port, devices, 0)
    }

    /// Devices whose requests carry `pad` bytes of padding in `data`.
    pub fn start_padded(port: u16, devices: usize, pad: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let threads = (0..devices)
            .map(|i| {
                let (stop, acked) = (stop.clone(), acked.clone());
                std::thread::spawn(move || {
                    stream_numbered(port, format!("dev-{i}"), pad, stop, acked)
                })
            })
            .collect();
        Load {
            stop,
            acked,
            threads,
        }
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops the devices and returns every ack they got.
    pub fn stop(self) -> Vec<Acked> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("device thread");
        }
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

/// One acknowledged request: (messageId, the device's sequence number, deviceUid).
pub type Acked = (String, u64, String);

/// Checks the promise: every acked messageId of `acked` is in `topic`, and
/// for each device the first copies are in sequence order. Returns the
/// number of records read and of duplicate copies among them.
pub fn assert_all_delivered(
    brokers: &str,
    topic: &str,
    partitions: i32,
    acked: &[Acked],
) -> (usize, usize) {
    let mut records = read_topic(
        brokers,
        topic,
        partitions,
        acked.len(),
        Duration::from_secs(60),
    );
    let mut first: HashMap<String, (i32, i64)> = HashMap::new();
    let index = |records: &[Record], first: &mut HashMap<String, (i32, i64)>| {
        for r in records {
            let id = r.payload["messageId"].as_str().unwrap().to_owned();
            assert_eq!(
                r.headers["message-id"],
                id.as_bytes(),
                "header matches the envelope"
            );
            first.entry(id).or_insert((r.partition, r.offset));
        }
    };
    index(&records, &mut first);
    if acked.iter().any(|(id, _, _)| !first.contains_key(id)) {
        // Duplicates may have filled the count early: read everything.
        records = read_topic(
            brokers,
            topic,
            partitions,
            usize::MAX,
            Duration::from_secs(15),
        );
        first.clear();
        index(&records, &mut first);
    }
    let missing: Vec<_> = acked
        .iter()
        .filter(|(id, _, _)| !first.contains_key(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acked messages missing, e.g. {:?}",
        missing.len(),
        acked.len(),
        missing.first()
    );
    // device -> [((partition, offset) of the first copy, seq)]
    type Rows = Vec<((i32, i64), u64)>;
    let mut by_device: HashMap<&str, Rows> = HashMap::new();
    for (id, seq, device) in acked {
        by_device.entry(device).or_default().push((first[id], *seq));
    }
    for (device, mut rows) in by_device {
        rows.sort();
        assert!(
            rows.windows(2).all(|w| w[0].1 < w[1].1),
            "{device}: first copies out of order"
        );
    }
    (records.len(), records.len() - first.len())
}

/// How a kill or power-cut loop went.
pub struct LoopStats {
    /// Interruptions that came before the gateway was ready.
    pub before_ready: usize,
    /// Cycles with the broker link cut.
    pub broker_cut: usize,
}

/// The cycles of a kill or power-cut loop: the broker link is cut in about
/// a third of them; `interrupt` is called at a random moment (one in four
/// during start-up, the others within 1.5 s of streaming once the gateway
/// is ready) and must leave the gateway starting again.
pub fn interrupt_loop(
    name: &str,
    cycles: usize,
    rng: &mut Rng,
    broker: &Broker,
    gw: &mut Gateway,
    load: &Load,
    mut interrupt: impl FnMut(&mut Gateway),
) -> LoopStats {
    let mut stats = LoopStats {
        before_ready: 0,
        broker_cut: 0,
    };
    for cycle in 0..cycles {
        let cut = rng.below(3) == 0;
        if cut {
            broker.proxy.cut();
            stats.broker_cut += 1;
        }
        if rng.below(4) == 0 {
            std::thread::sleep(Duration::from_millis(rng.below(100)));
        } else {
            gw.wait_ready();
            std::thread::sleep(Duration::from_millis(rng.below(1500)));
        }
        if !gw.is_ready() {
            stats.before_ready += 1;
        }
        interrupt(gw);
        if cut {
            broker.proxy.restore();
        }
        if cycle % 10 == 9 {
            eprintln!(
                "{name} cycle {}: {} acked so far",
                cycle + 1,
                load.acked_count()
            );
        }
    }
    stats
}

/// The end of a kill or power-cut loop: the last gateway comes up, takes
/// traffic for a moment and drains; then every ack of `load` is checked
/// against `topic` ([`assert_all_delivered`]) and no loss may have been
/// reported. Returns the acks, the records read and the duplicate copies.
pub fn settle_and_check(
    gw: &mut Gateway,
    load: Load,
    brokers: &str,
    topic: &str,
    partitions: i32,
    cycles: usize,
) -> (Vec<Acked>, usize, usize) {
    gw.wait_ready();
    std::thread::sleep(Duration::from_millis(500));
    let acked = load.stop();
    gw.wait_drained();
    assert!(
        acked.len() > cycles,
        "too little traffic to mean anything: {}",
        acked.len()
    );
    let (records, duplicates) = assert_all_delivered(brokers, topic, partitions, &acked);
    // Nothing was lost, so the last start must not have reported a loss.
    assert_eq!(
        gw.metric("edgegate_outbox_lost_batches_total"),
        0.0,
        "a loss was reported where none happened:\n{}",
        gw.log()
    );
    (acked, records, duplicates)
}

pub fn ack_id(reply: &Value) -> String {
    assert_eq!(reply["action"], "ack", "expected an ack, got {reply}");
    assert_eq!(reply["status"], "accepted", "{reply}");
    reply["messageId"].as_str().expect("messageId").to_owned()
}

/// Finds the clientId the gateway gave a device: it sends one request and
/// reads its envelope back from the uplink topic.
pub fn client_id_of(device: &mut Device, brokers: &str, uplink: &str) -> String {
    let uid = unique("whoami");
    let id = ack_id(&device.request("whoami", &uid, None, Value::Null));
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let records = read_topic(brokers, uplink, 1, usize::MAX, Duration::from_secs(2));
        if let Some(r) = records.iter().find(|r| r.payload["messageId"] == id) {
            return r.payload["clientId"].as_str().unwrap().to_owned();
        }
    }
    panic!("envelope of {id} never reached {uplink}");
}

pub fn server_response(client_id: Option<&str>, device_uid: Option<&str>, body: Value) -> Vec<u8> {
    let mut v = serde_json::json!({ "deviceResponse": body });
    if let Some(c) = client_id {
        v["clientId"] = Value::from(c);
    }
    if let Some(d) = device_uid {
        v["deviceUid"] = Value::from(d);
    }
    v.to_string().into_bytes()
}

/// Produces `probe` downlink messages to `client_id` until the device gets
/// one: the consumer joined and its start offset is resolved. Swallows the
/// probes it receives.
pub fn wait_downlink(device: &mut Device, p: &BaseProducer, topic: &str, client_id: &str) {
    device.set_timeout(Duration::from_millis(500));
    let deadline = Instant::now() + WAIT;
    loop {
        let probe = server_response(
            Some(client_id),
            None,
            serde_json::json!({"action":"probe","status":"ok"}),
        );
        produce_to(p, topic, Some(0), &[probe]);
        if let Some(line) = device.line() {
            assert!(line.contains("probe"), "unexpected line {line}");
            break;
        }
        assert!(Instant::now() < deadline, "downlink never arrived");
    }
    // Drain probes still in flight.
    device.set_timeout(Duration::from_millis(300));
    while device.line().is_some() {}
    device.set_timeout(WAIT);
}

// ---------------------------------------------------------------- random ----

/// A small deterministic generator, so a failing schedule can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1) // xorshift never leaves 0
    }

    pub fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A loop's seed: from `var` to replay a run, else a fresh random one.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            let random = uuid::Uuid::new_v4();
            u64::from_le_bytes(random.as_bytes()[..8].try_into().unwrap()) | 1
        })
}
