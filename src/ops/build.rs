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
    // From /proc alone: rustix's page size and CPU clock read the vDSO's
    // ELF header through the auxiliary vector, which crashes the process
    // under valgrind (callgrind is how benches/profile.sh counts).
    let resident_bytes = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(|kib| kib * 1024);
    // One of the entries is this listing's own.
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|dir| dir.count().saturating_sub(1) as u64);
    let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let cpu_seconds = cpu_seconds().unwrap_or(0.0);
    ProcessStats {
        resident_bytes,
        open_fds,
        max_fds,
        cpu_seconds,
    }
}

/// User and system time of all threads, from /proc/self/stat (fields 14
/// and 15, in USER_HZ ticks: 100 a second on Linux's ARM and x86 ABIs).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // After the command name, which may hold spaces and parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}
