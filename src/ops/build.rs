//! What the binary and the process are: `--version`'s build info, and what
//! the `process_*` metrics report (Linux).

use std::time::{SystemTime, UNIX_EPOCH};

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What this binary is: version, commit, target, librdkafka.
pub struct BuildInfo {
    pub version: &'static str,
    pub commit: &'static str,
    pub target: &'static str,
    pub librdkafka: String,
}

pub fn build_info() -> BuildInfo {
    BuildInfo {
        version: env!("CARGO_PKG_VERSION"),
        commit: env!("EDGEGATE_COMMIT"),
        target: env!("EDGEGATE_TARGET"),
        librdkafka: rdkafka::util::get_rdkafka_version().1,
    }
}

/// What the `process_*` metrics report (Linux; `None`: not readable).
pub(crate) struct ProcessStats {
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub cpu_seconds: f64,
}

pub(crate) fn process_stats() -> ProcessStats {
    let resident_bytes = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * rustix::param::page_size() as u64);
    // One of the entries is this listing's own.
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|dir| dir.count().saturating_sub(1) as u64);
    let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let cpu = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    ProcessStats {
        resident_bytes,
        open_fds,
        max_fds,
        cpu_seconds: cpu.tv_sec as f64 + cpu.tv_nsec as f64 / 1e9,
    }
}
