//! `edgegate device`: a scripted or interactive device session, so that a
//! hub's own binary can talk to its gateway without other tools. Lines from
//! stdin are sent as frames; every line the gateway sends (replies and
//! backend messages) is printed as it arrives.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs until stdin ends and the gateway has answered, or it closes.
pub fn run(address: &str) -> Result<(), DeviceError> {
    let stream = TcpStream::connect(address).map_err(|source| DeviceError::Connect {
        address: address.to_owned(),
        source,
    })?;
    let reader = BufReader::new(stream.try_clone()?);
    let printer = std::thread::spawn(move || -> std::io::Result<()> {
        let stdout = std::io::stdout();
        for line in reader.lines() {
            let mut out = stdout.lock();
            writeln!(out, "{}", line?)?;
            out.flush()?;
        }
        Ok(())
    });
    let mut writer = stream.try_clone()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        writer.write_all(line.as_bytes())?;
        writer.write_all(b"\n")?;
    }
    // End of input: half-close, so the gateway answers what it read and
    // then closes; the printer stops at that end of stream.
    stream.shutdown(Shutdown::Write)?;
    printer.join().unwrap_or(Ok(()))?;
    Ok(())
}
