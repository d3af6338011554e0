//! SIGTERM/SIGINT through signal-hook: the first starts a graceful shutdown,
//! a second one exits at once (nothing acknowledged is lost either way: the
//! outbox is on disk before any ack).

use std::io;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use smol::channel::{self, Receiver};

/// A receiver that yields once the first stop signal arrives.
pub fn listen() -> io::Result<Receiver<()>> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let (tx, rx) = channel::bounded(1);
    std::thread::Builder::new()
        .name("edgegate-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen == 1 {
                    log::info!("received signal {signal}; stopping gracefully (send it again to exit at once)");
                    let _ = tx.try_send(());
                } else {
                    log::warn!("received signal {signal} again; exiting now");
                    std::process::exit(1);
                }
            }
        })?;
    Ok(rx)
}
