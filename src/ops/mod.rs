//! What an operator sees and drives: the admin HTTP endpoints, metrics,
//! signals, systemd notifications, and the `edgegate device` test client.

pub mod admin;
pub mod device_cli;
pub mod metrics;
pub mod signals;
pub mod systemd;
