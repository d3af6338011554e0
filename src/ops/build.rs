//! What the binary and the process are: `--version`'s build info, and the
//! `process_*` metrics the Prometheus client libraries export (Linux).

use std::fmt::Write as _;
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

/// `edgegate_build_info` and the `process_*` metrics the Prometheus client
/// libraries export (Linux), for what a hub runs short of: memory, files.
pub(crate) fn build_and_process(out: &mut String) {
    let b = build_info();
    let _ = write!(
        out,
        "# HELP edgegate_build_info The running binary (always 1).\n# TYPE edgegate_build_info gauge\n\
         edgegate_build_info{{version=\"{}\",commit=\"{}\",target=\"{}\",librdkafka=\"{}\"}} 1\n",
        b.version, b.commit, b.target, b.librdkafka
    );
    let resident = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * rustix::param::page_size() as u64);
    if let Some(bytes) = resident {
        let _ = write!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {bytes}\n"
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // One of them is this listing's own.
        let open = dir.count().saturating_sub(1);
        let _ = write!(
            out,
            "# HELP process_open_fds Number of open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds {open}\n"
        );
    }
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(max) = limit.current {
        let _ = write!(
            out,
            "# HELP process_max_fds Maximum number of open file descriptors.\n# TYPE process_max_fds gauge\nprocess_max_fds {max}\n"
        );
    }
    let cpu = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    let _ = write!(
        out,
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {:.3}\n",
        cpu.tv_sec as f64 + cpu.tv_nsec as f64 / 1e9
    );
}
