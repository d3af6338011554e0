//! Wires the gateway together on one smol executor: [`Checked`] reads and
//! checks what the configuration names (shared with `check-config`),
//! [`start`] brings every part up, [`Running::shutdown`] stops them in order
//! (stop accepting, answer what was read, give Kafka a bounded time to take
//! the backlog, flush). [`run`] does the three around a wait for SIGTERM.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_net::TcpListener;
use smol::channel;
use smol::{Executor, Task, Timer};

use crate::config::{AuthMode, Config, OutboxCompression};
use crate::device::rate::RateLimits;
use crate::device::{listener, Shared};
use crate::kafka::consumer::DownlinkConsumer;
use crate::kafka::producer::Pipeline;
use crate::ops::admin::{self, Admin};
use crate::ops::signals;
use crate::ops::systemd;
use crate::outbox::{self, Quarantine, Store};
use crate::reload;
use crate::routing::hold::{Hold, HoldLimits};
use crate::routing::{presence, Router};
use crate::security::tls;

mod checks;

pub use checks::{check_data_dir_writable, Checked};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
    #[error(transparent)]
    Hold(#[from] crate::routing::hold::HoldError),
    #[error(transparent)]
    Producer(#[from] crate::kafka::producer::ProducerError),
    #[error(transparent)]
    Consumer(#[from] crate::kafka::consumer::ConsumerError),
    #[error(transparent)]
    Listen(#[from] listener::BindError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error(transparent)]
    Key(#[from] crate::security::auth::KeyError),
    #[error(transparent)]
    Tls(#[from] crate::security::tls::TlsError),
    #[error("kafka.properties {entry} refused by librdkafka for the {client}: {reason}")]
    KafkaProperties {
        client: &'static str,
        /// `"key" = "value"`, as written in the file.
        entry: String,
        reason: String,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot start the executor threads: {0}")]
    Threads(std::io::Error),
    #[error("listener.max_frame_bytes ({frame}) plus what a Kafka record adds (up to {overhead} bytes) does not fit kafka.properties \"message.max.bytes\" ({limit}{default}): Kafka would refuse the largest requests after they were acked; lower the one or raise the other")]
    FrameTooLargeForKafka {
        frame: usize,
        overhead: usize,
        limit: String,
        default: &'static str,
    },
}

/// The gateway, from a loaded configuration until it has stopped.
pub fn run(checked: Checked, load: reload::Load) -> Result<(), AppError> {
    // Before anything starts, so a stop during start-up is not lost (and a
    // SIGHUP then is a reload, not the default death).
    let signals = signals::listen().map_err(AppError::Signals)?;
    let running = start(checked)?;
    running.wait(&signals, load);
    running.shutdown();
    Ok(())
}

/// A started gateway: its executor threads and every task, held for an
/// orderly [`Running::shutdown`].
pub struct Running {
    ex: Arc<Executor<'static>>,
    /// Dropping it ends the executor threads' run futures.
    stop_workers: channel::Sender<()>,
    drain_timeout: std::time::Duration,
    store: Arc<Store>,
    shared: Arc<Shared>,
    router: Arc<Router>,
    stop_accepting: channel::Sender<()>,
    accepting: Vec<Task<()>>,
    producer: Task<()>,
    producer_stop: Arc<AtomicBool>,
    consumer: DownlinkConsumer,
    presence: Option<Task<()>>,
    writer: Task<()>,
    admin: Arc<Admin>,
    /// What a reload replaces.
    tls: Option<Arc<tls::Acceptor>>,
    settings: Vec<crate::config::Setting>,
}

/// Opens the data directory and the outbox, starts the executor threads,
/// the outbox writer, the Kafka producer and consumer, the admin endpoint
/// and the device listeners, then tells systemd it is ready.
pub fn start(checked: Checked) -> Result<Running, AppError> {
    let Checked {
        config,
        gate,
        tls,
        metrics,
    } = checked;
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| AppError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let server_id = match &config.server_id {
        Some(id) => id.clone(),
        None => load_server_id(&data_dir)?,
    };
    let group = config.consumer_group(&server_id);
    let reply_topic = config.reply_topic(&server_id)?;
    log::info!(
        "edgegate {} starting: serverId {server_id}, consumer group {group}",
        env!("CARGO_PKG_VERSION")
    );
    let (store, doorbell) = Store::open(
        &data_dir.join("outbox"),
        config.outbox.max_bytes,
        metrics.clone(),
    )?;

    let ex: Arc<Executor<'static>> = Arc::new(Executor::new());
    let (stop_workers, workers_stopped) = channel::bounded::<()>(1);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    // The main thread runs the executor too, while starting and stopping.
    // The threads are not joined: a task stuck in a blocking call cannot
    // hold the exit.
    for i in 0..threads - 1 {
        let ex = ex.clone();
        let stopped = workers_stopped.clone();
        std::thread::Builder::new()
            .name(format!("edgegate-{i}"))
            .spawn(move || smol::block_on(ex.run(async { stopped.recv().await.ok() })))
            .map_err(AppError::Threads)?;
    }

    store.set_compression(match config.outbox.compression {
        OutboxCompression::Zstd => outbox::Compression::Zstd,
        OutboxCompression::Lz4 => outbox::Compression::Lz4,
        OutboxCompression::None => outbox::Compression::None,
    });
    let (appender, writer) = outbox::start_writer(
        store.clone(),
        config.outbox.flush_interval,
        config.outbox.spill_after,
    );
    let writer = ex.spawn(writer);

    let producer_stop = Arc::new(AtomicBool::new(false));
    let quarantine = Arc::new(Quarantine::new(
        &data_dir.join("quarantine"),
        config.outbox.quarantine_max_bytes,
    ));
    let pipeline = Pipeline::new(
        store.clone(),
        &config.kafka,
        reply_topic.clone(),
        metrics.clone(),
        quarantine,
    )?;
    let producer = ex.spawn(pipeline.run(doorbell, producer_stop.clone()));

    let hold = Hold::open(
        &data_dir.join("hold"),
        HoldLimits {
            ttl: config.downlink.hold_for,
            max_per_device: config.downlink.hold_max_per_device,
            max_bytes: config.downlink.hold_max_bytes,
        },
        metrics.clone(),
    )?;
    let mut router = Router::new(
        server_id.clone(),
        config.listener.max_pending_downlink,
        metrics.clone(),
        Arc::new(hold),
    );
    if gate.mode != AuthMode::None {
        router = router.identity_from_auth();
    }
    let presence = match &config.kafka.presence_topic {
        Some(topic) => {
            log::info!("presence events go to {topic}");
            let (queue, events) = presence::Queue::new(metrics.clone());
            router = router.with_presence(queue);
            Some(ex.spawn(presence::run(
                events,
                appender.clone(),
                server_id.clone(),
                reply_topic.clone(),
                metrics.clone(),
            )))
        }
        None => None,
    };
    let router = Arc::new(router);
    let closer = router.clone();
    gate.revoked.watch(move |device| {
        closer.close_device(device);
    });
    let consumer = DownlinkConsumer::start(
        &config.kafka,
        &group,
        reply_topic.clone(),
        router.clone(),
        metrics.clone(),
    )?;

    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        life: crate::ops::status::Lifecycle::new(server_id.clone()),
    });
    ex.spawn(crate::ops::status::report_backlog(metrics.clone()))
        .detach();
    let bound = smol::block_on(ex.run(bind_listeners(&config)));
    let (admin_listener, plain, tls_listener) = bound?;
    ex.spawn(admin::serve(admin_listener, admin.clone(), ex.clone()))
        .detach();
    let shared = Arc::new(Shared {
        server_id,
        reply_topic,
        limits: config.listener.clone(),
        metrics,
        router: router.clone(),
        appender,
        gate: Arc::new(gate),
        rate: RateLimits::new(config.limits.requests_per_sec, config.limits.burst),
        shutting_down: AtomicBool::new(false),
        open: AtomicUsize::new(0),
    });
    let (stop_accepting, accept_stopped) = channel::bounded::<()>(1);
    let mut accepting = Vec::new();
    if let Some(l) = plain {
        let task = listener::run(l, None, shared.clone(), ex.clone(), accept_stopped.clone());
        accepting.push(ex.spawn(task));
    }
    let tls = tls.map(|a| Arc::new(tls::Acceptor::new(a)));
    if let (Some(l), Some(acceptor)) = (tls_listener, &tls) {
        let task = listener::run(
            l,
            Some(acceptor.clone()),
            shared.clone(),
            ex.clone(),
            accept_stopped,
        );
        accepting.push(ex.spawn(task));
    }
    admin.life.ready.store(true, SeqCst);
    systemd::notify("READY=1");
    if let Some(every) = systemd::watchdog_interval() {
        ex.spawn(systemd::watchdog(every)).detach();
    }
    let plain_address = match config.auth.mode {
        AuthMode::Mtls => "-".to_owned(),
        _ => config.listener.address.to_string(),
    };
    let tls_address = config.tls.address.map_or("-".to_owned(), |a| a.to_string());
    log::info!(
        "listening for devices on {plain_address} (TLS: {tls_address}, auth: {:?}), admin on {}, Kafka at {}",
        config.auth.mode,
        config.admin.address,
        config.kafka.brokers
    );
    Ok(Running {
        ex,
        stop_workers,
        drain_timeout: config.kafka.drain_timeout,
        store,
        shared,
        router,
        stop_accepting,
        accepting,
        producer,
        producer_stop,
        consumer,
        presence,
        writer,
        admin,
        tls,
        settings: config.settings,
    })
}

/// The admin listener, the plain device listener (none in mtls mode: every
/// device must show a certificate) and the TLS one if configured.
async fn bind_listeners(
    config: &Config,
) -> Result<(TcpListener, Option<TcpListener>, Option<TcpListener>), AppError> {
    let admin = admin::bind(config.admin.address).await?;
    let plain = match config.auth.mode {
        AuthMode::Mtls => None,
        _ => Some(listener::bind(config.listener.address).await?),
    };
    let tls = match config.tls.address {
        Some(address) => Some(listener::bind(address).await?),
        None => None,
    };
    Ok((admin, plain, tls))
}

impl Running {
    /// Serves until a stop signal (SIGTERM, SIGINT), reloading at each SIGHUP.
    pub fn wait(&self, signals: &signals::Listening, load: reload::Load) {
        let targets = reload::Targets {
            gate: self.shared.gate.clone(),
            router: self.router.clone(),
            tls: self.tls.clone(),
            metrics: self.shared.metrics.clone(),
        };
        let reloader = reload::Reloader::new(load, targets, self.settings.clone());
        smol::block_on(self.ex.run(async {
            loop {
                let stop = async {
                    let _ = signals.stop.recv().await;
                    true
                };
                let reload = async {
                    match signals.reload.recv().await {
                        Ok(()) => false,
                        Err(_) => std::future::pending().await,
                    }
                };
                if smol::future::or(stop, reload).await {
                    break;
                }
                reloader.reload();
            }
        }));
    }

    /// Stops in order: stop accepting, answer what was read, give Kafka
    /// `kafka.drain_timeout_secs` to take the backlog, flush, return.
    pub fn shutdown(self) {
        let ex = self.ex.clone();
        let stop_workers = self.stop_workers.clone();
        smol::block_on(ex.run(self.stop_in_order()));
        drop(stop_workers);
    }

    async fn stop_in_order(self) {
        let Running {
            store,
            shared,
            router,
            stop_accepting,
            accepting,
            producer,
            producer_stop,
            consumer,
            presence,
            writer,
            drain_timeout,
            admin,
            ..
        } = self;
        // Load balancers and health checks see it at once.
        admin.life.stopping.store(true, SeqCst);
        admin.life.ready.store(false, SeqCst);
        systemd::notify("STOPPING=1");
        log::info!("shutting down: no new connections; frames from now on get shutting_down");
        shared.shutting_down.store(true, SeqCst);
        drop(stop_accepting);
        for task in accepting {
            task.await;
        }

        let deadline = Instant::now() + drain_timeout;
        // Let appends already read reach the disk and their replies go out.
        Timer::after(Duration::from_millis(50)).await;
        while !store.is_empty() && Instant::now() < deadline {
            Timer::after(Duration::from_millis(20)).await;
        }
        if store.is_empty() {
            log::info!("outbox drained to Kafka");
        } else {
            log::warn!("outbox not drained within kafka.drain_timeout_secs; the rest is sent after the next start");
        }
        router.close_all();
        if let Some(task) = presence {
            // The connections' `disconnected` events (shutdown) are stored,
            // and get the rest of the drain time to reach Kafka.
            let closing = Instant::now() + STEP_LIMIT;
            while router.connections() > 0 && Instant::now() < closing {
                Timer::after(Duration::from_millis(10)).await;
            }
            router.end_presence();
            if within(STEP_LIMIT, task).await.is_none() {
                log::warn!("presence events were not all stored in time");
            }
            let deadline = deadline.max(Instant::now() + Duration::from_secs(1));
            while !store.is_empty() && Instant::now() < deadline {
                Timer::after(Duration::from_millis(20)).await;
            }
        }
        producer_stop.store(true, SeqCst);
        store.wake();
        // Every remaining step is bounded: a stuck broker or disk must not
        // turn a stop into a hang (systemd would SIGKILL us anyway; nothing
        // acked is lost either way, it was on disk or in Kafka before its ack).
        if within(STEP_LIMIT, producer).await.is_none() {
            log::warn!("the Kafka producer did not stop in time");
        }
        if within(STEP_LIMIT, smol::unblock(move || consumer.stop()))
            .await
            .is_none()
        {
            log::warn!("the Kafka consumer did not stop in time");
        }
        drop(shared);
        // Connections still finishing hold the appender; the writer stops
        // once they are gone.
        let _ = within(STEP_LIMIT, writer).await;
        let final_flush = store.clone();
        match within(STEP_LIMIT, smol::unblock(move || final_flush.flush())).await {
            Some(Ok(())) => {}
            Some(Err(e)) => log::error!("final outbox flush failed: {e}"),
            None => log::error!("final outbox flush did not finish in time"),
        }
        log::info!("stopped");
    }
}

/// How long each step of the shutdown may take once the drain is over.
const STEP_LIMIT: Duration = Duration::from_secs(5);

async fn within<T>(limit: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    smol::future::or(async { Some(fut.await) }, async {
        Timer::after(limit).await;
        None
    })
    .await
}

/// The configured id, else the one kept in `data_dir/server_id`, else a new
/// UUID written there (atomically, so a crash cannot leave half an id).
fn load_server_id(data_dir: &Path) -> Result<String, AppError> {
    let path = data_dir.join("server_id");
    let io_err = |source| AppError::DataDir {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let id = uuid::Uuid::new_v4().to_string();
    let tmp = data_dir.join("server_id.tmp");
    std::fs::write(&tmp, format!("{id}\n")).map_err(io_err)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err)?;
    std::fs::rename(&tmp, &path).map_err(io_err)?;
    // The rename is only on disk once the directory is: a power cut would
    // otherwise bring up a new serverId, and with it a new consumer group.
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err)?;
    log::info!("generated serverId {id}, kept in {}", path.display());
    Ok(id)
}
