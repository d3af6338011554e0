//! What an operator sees and drives: the admin HTTP endpoints, metrics,
//! signals, systemd notifications, and the `edgegate device` test client.

pub mod admin;
pub mod build;
pub mod device_cli;
pub mod exposition;
pub mod histogram;
pub mod logging;
pub mod metrics;
pub mod signals;
pub mod status;
pub mod systemd;

/// Raises the soft open-file limit to the hard one (each device is a
/// socket); the new limit, or `None` when it was already there.
pub fn raise_open_file_limit() -> Result<Option<u64>, rustix::io::Errno> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current >= limit.maximum {
        return Ok(None);
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )?;
    Ok(limit.maximum)
}
