//! Signals through signal-hook. SIGTERM/SIGINT: the first starts a graceful
//! shutdown, a second one exits at once (nothing acknowledged is lost either
//! way: the outbox is on disk before any ack). SIGHUP: a reload, never a
//! stop (systemd counts a SIGHUP death as clean, and would not restart).

use std::io;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use smol::channel::{self, Receiver};

/// What the signal thread reports.
pub struct Listening {
    /// Yields once the first stop signal arrives.
    pub stop: Receiver<()>,
    /// Yields after SIGHUP; several before one is taken count as one.
    pub reload: Receiver<()>,
}

pub fn listen() -> io::Result<Listening> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let (stop_tx, stop) = channel::bounded(1);
    let (reload_tx, reload) = channel::bounded(1);
    std::thread::Builder::new()
        .name("edgegate-signals".into())
        .spawn(move || {
            let mut stops = 0;
            for signal in signals.forever() {
                if signal == SIGHUP {
                    log::info!("received SIGHUP: reloading");
                    let _ = reload_tx.try_send(());
                    continue;
                }
                stops += 1;
                if stops == 1 {
                    log::info!("received signal {signal}; stopping gracefully (send it again to exit at once)");
                    let _ = stop_tx.try_send(());
                } else {
                    log::warn!("received signal {signal} again; exiting now");
                    std::process::exit(1);
                }
            }
        })?;
    Ok(Listening { stop, reload })
}
