//! Wires the gateway together on one smol executor and runs it until SIGTERM
//! or SIGINT, then shuts down in order: stop accepting, answer what was read,
//! give Kafka a bounded time to take the backlog, flush, exit.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::channel;
use smol::{Executor, Timer};

use futures_rustls::TlsAcceptor;

use crate::config::{AuthMode, Config};
use crate::device::{listener, Shared};
use crate::kafka::consumer::DownlinkConsumer;
use crate::kafka::producer::Pipeline;
use crate::ops::admin::{self, Admin};
use crate::ops::metrics::Metrics;
use crate::ops::signals;
use crate::ops::systemd;
use crate::outbox::{self, Store};
use crate::routing::Router;
use crate::security::auth::Gate;
use crate::security::tls;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
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
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

pub fn run(config: Config) -> Result<(), AppError> {
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
    log::info!(
        "edgegate {} starting: serverId {server_id}, consumer group {group}",
        env!("CARGO_PKG_VERSION")
    );

    let metrics = Arc::new(Metrics::default());
    // Key, certificates and CA are checked before anything else starts, so
    // a bad one stops the service with a message naming the file.
    let gate = Gate::new(&config.auth, metrics.clone())?;
    let tls = match config.tls.address {
        Some(_) => Some(tls::acceptor(&config.tls, config.auth.mode)?),
        None => None,
    };
    let (store, doorbell) = Store::open(
        &data_dir.join("outbox"),
        config.outbox.max_bytes,
        metrics.clone(),
    )?;
    let stop_signal = signals::listen().map_err(AppError::Signals)?;

    let ex: Arc<Executor<'static>> = Arc::new(Executor::new());
    let (stop_workers, workers_stopped) = channel::bounded::<()>(1);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let workers: Vec<_> = (0..threads - 1)
        .map(|i| {
            let ex = ex.clone();
            let stopped = workers_stopped.clone();
            std::thread::Builder::new()
                .name(format!("edgegate-{i}"))
                .spawn(move || smol::block_on(ex.run(async { stopped.recv().await.ok() })))
                .expect("spawning an executor thread")
        })
        .collect();

    let result = smol::block_on(ex.run(serve(
        config,
        Security { gate, tls },
        server_id,
        group,
        metrics,
        store,
        doorbell,
        stop_signal,
        ex.clone(),
    )));
    // The executor threads end with their run futures; they are not joined,
    // so a task stuck in a blocking call cannot hold the exit.
    drop(stop_workers);
    drop(workers);
    result
}

/// Authentication and the TLS acceptor, ready before the listeners start.
struct Security {
    gate: Gate,
    tls: Option<TlsAcceptor>,
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    config: Config,
    security: Security,
    server_id: String,
    group: String,
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    doorbell: channel::Receiver<()>,
    stop_signal: channel::Receiver<()>,
    ex: Arc<Executor<'static>>,
) -> Result<(), AppError> {
    let (appender, writer) = outbox::start_writer(store.clone(), config.outbox.flush_interval);
    let writer = ex.spawn(writer);

    let producer_stop = Arc::new(AtomicBool::new(false));
    let pipeline = Pipeline::new(store.clone(), &config.kafka, metrics.clone())?;
    let producer = ex.spawn(pipeline.run(doorbell, producer_stop.clone()));

    let mut router = Router::new(
        server_id.clone(),
        config.listener.max_pending_downlink,
        metrics.clone(),
    );
    if security.gate.mode != AuthMode::None {
        router = router.identity_from_auth();
    }
    let router = Arc::new(router);
    let closer = router.clone();
    security.gate.revoked.watch(move |device| {
        closer.close_device(device);
    });
    let consumer = DownlinkConsumer::start(&config.kafka, &group, router.clone(), metrics.clone())?;

    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        ready: AtomicBool::new(false),
    });
    let admin_listener = admin::bind(config.admin.address).await?;
    ex.spawn(admin::serve(admin_listener, admin.clone(), ex.clone()))
        .detach();

    // mtls: every device must show a certificate, so no plain listener.
    let plain = match config.auth.mode {
        AuthMode::Mtls => None,
        _ => Some(listener::bind(config.listener.address).await?),
    };
    let tls_listener = match (config.tls.address, security.tls) {
        (Some(address), Some(acceptor)) => Some((listener::bind(address).await?, acceptor)),
        _ => None,
    };
    let shared = Arc::new(Shared {
        server_id,
        limits: config.listener.clone(),
        metrics: metrics.clone(),
        router: router.clone(),
        appender,
        gate: security.gate,
        shutting_down: AtomicBool::new(false),
        open: AtomicUsize::new(0),
    });
    let (stop_accepting, accept_stopped) = channel::bounded::<()>(1);
    let mut accepting = Vec::new();
    if let Some(l) = plain {
        let task = listener::run(l, None, shared.clone(), ex.clone(), accept_stopped.clone());
        accepting.push(ex.spawn(task));
    }
    if let Some((l, acceptor)) = tls_listener {
        let task = listener::run(
            l,
            Some(acceptor),
            shared.clone(),
            ex.clone(),
            accept_stopped,
        );
        accepting.push(ex.spawn(task));
    }
    admin.ready.store(true, SeqCst);
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

    let _ = stop_signal.recv().await;
    systemd::notify("STOPPING=1");
    log::info!("shutting down: no new connections; frames from now on get shutting_down");
    shared.shutting_down.store(true, SeqCst);
    drop(stop_accepting);
    for task in accepting {
        task.await;
    }

    let deadline = Instant::now() + config.kafka.drain_timeout;
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
    producer_stop.store(true, SeqCst);
    store.wake();
    // Every remaining step is bounded: a stuck broker or disk must not turn
    // a stop into a hang (systemd would SIGKILL us anyway; nothing acked is
    // lost either way, the outbox was flushed before each ack).
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
    // Connections still finishing hold the appender; the writer stops once
    // they are gone.
    let _ = within(STEP_LIMIT, writer).await;
    let final_flush = store.clone();
    match within(STEP_LIMIT, smol::unblock(move || final_flush.flush())).await {
        Some(Ok(())) => {}
        Some(Err(e)) => log::error!("final outbox flush failed: {e}"),
        None => log::error!("final outbox flush did not finish in time"),
    }
    log::info!("stopped");
    Ok(())
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
