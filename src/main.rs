//! The `edgegate` command line: run the gateway, check a configuration,
//! mint a device token, talk to a gateway as a device. (The load and
//! measurement tools are the separate `edgegate-bench`, in `benches/`.)

// Denied, not forbidden: one FFI call tunes the static build's allocator
// (`tune_allocator`); the library forbids unsafe code outright.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use edgegate::app;
use edgegate::config::Config;
use edgegate::ops::device_cli as device;
use edgegate::ops::logging;
use edgegate::security::auth;
use edgegate::wire::protocol;

/// Static (musl) builds: see the `static` feature in Cargo.toml.
#[cfg(feature = "static")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Two of mimalloc's defaults cost a hub memory; each is set here unless
/// the operator set it (`MIMALLOC_PURGE_DELAY`, `MIMALLOC_ARENA_EAGER_COMMIT`).
/// - `purge_delay`: mimalloc 3 keeps freed pages for a second before giving
///   them back (mimalloc 2: 10 ms). Draining a backlog frees librdkafka's
///   messages on other threads at 400,000 a second, so the static build's
///   RSS grew by 45 to 76 MiB (median 64) over a drain of 1,000,000
///   (`benches/replay.sh`), against 9 to 23 for glibc; 35 to 46 with 10 ms.
/// - `arena_eager_commit`: on a system that overcommits, mimalloc commits
///   its whole arena at once, and every thread's first pages then sit in
///   transparent huge pages: an idle gateway held 52.5 MiB (glibc: 9.3).
///   Committed as used: 7.2 MiB idle, a drain's peak 34-39 MiB instead of
///   89-113, and uplink no slower (`benches/compare.sh`, 320,255 against
///   300,726 msgs/s, idle connections 1,933 bytes each against 2,699).
#[cfg(feature = "static")]
#[allow(unsafe_code)]
fn tune_allocator() {
    // mimalloc.h's `mi_option_t`: the enum's values are kept across
    // releases (retired options keep their slots); 2 and 3 agree on these.
    const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;
    const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
    extern "C" {
        fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    }
    let defaults = [
        ("MIMALLOC_PURGE_DELAY", MI_OPTION_PURGE_DELAY, 10),
        (
            "MIMALLOC_ARENA_EAGER_COMMIT",
            MI_OPTION_ARENA_EAGER_COMMIT,
            0,
        ),
    ];
    for (variable, option, value) in defaults {
        if std::env::var_os(variable).is_none() {
            // SAFETY: a plain setter of mimalloc's (linked in by the
            // `mimalloc` crate), safe to call at any time from any thread.
            unsafe { mi_option_set(option, value) };
        }
    }
}

mod cli;
mod outbox_cli;

use cli::Command;

/// `edgegate token`: provisioning, with the same key checks as the service.
fn print_token(device_uid: &str, key_file: &std::path::Path) -> ExitCode {
    if !protocol::valid_device_uid(device_uid) {
        eprintln!("edgegate token: {}", protocol::DEVICE_UID_RULE);
        return ExitCode::from(2);
    }
    match auth::TokenKey::load(key_file) {
        Ok(key) => out(&format!("{}\n", key.token_for(device_uid))),
        Err(e) => {
            eprintln!("edgegate token: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes to stdout. A reader that went away (`edgegate token ... | head
/// -c 10`) is not an error of ours: no panic, status 0; any other write
/// error is reported, status 74 (EX_IOERR).
fn out(text: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgegate: cannot write to standard output: {e}");
            ExitCode::from(74)
        }
    }
}

/// Logging before the configuration is read (so that its refusal is
/// logged): the environment's level and format if they are valid, else
/// info and auto. The configuration's own are applied once it is read.
fn init_logging() {
    use edgegate::config::LogFormat;
    let spec = std::env::var("EDGEGATE_LOG_LEVEL")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let format = match std::env::var("EDGEGATE_LOG_FORMAT").as_deref() {
        Ok("text") => LogFormat::Text,
        Ok("json") => LogFormat::Json,
        Ok("journal") => LogFormat::Journal,
        _ => LogFormat::Auto,
    };
    logging::init(&spec, logging::Format::resolve(format));
}

/// The environment variables the configuration reads.
fn gateway_env() -> HashMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("EDGEGATE_") || k == "RUST_LOG")
        .collect()
}

/// A refused configuration is always reported, whatever the log filter.
fn refused(e: impl std::fmt::Display) -> ExitCode {
    if log::log_enabled!(log::Level::Error) {
        log::error!("configuration refused: {e}");
    } else {
        eprintln!("edgegate: configuration refused: {e}");
    }
    ExitCode::from(78) // EX_CONFIG
}

/// Many devices means many sockets: take the hard limit the service was given.
fn raise_open_file_limit() {
    match edgegate::ops::raise_open_file_limit() {
        Ok(Some(limit)) => log::info!("open-file limit raised to {limit}"),
        Ok(None) => {}
        Err(e) => log::warn!("cannot raise the open-file limit: {e}"),
    }
}

fn main() -> ExitCode {
    #[cfg(feature = "static")]
    tune_allocator();
    let (command, flags) = match cli::parse(std::env::args_os()) {
        Ok(parsed) => parsed,
        // --help, or a usage error (status 2).
        Err(e) if e.use_stderr() => {
            eprint!("{}", e.render());
            return ExitCode::from(2);
        }
        Err(e) => return out(&e.render().to_string()),
    };
    match &command {
        Command::Version => {
            let b = edgegate::ops::build::build_info();
            return out(&format!(
                "edgegate {} (commit {}, {}, librdkafka {})\n",
                b.version, b.commit, b.target, b.librdkafka
            ));
        }
        Command::Completions(shell) => return out(&cli::completions(*shell)),
        Command::Manual => return out(&cli::manual()),
        _ => {}
    }
    if let Command::Token {
        device_uid,
        key_file,
    } = &command
    {
        return print_token(device_uid, key_file);
    }
    init_logging();
    if let Command::Device(address) = &command {
        return match device::run(address) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("edgegate device: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(&flags, &gateway_env()) {
        Ok(c) => c,
        Err(e) => return refused(e),
    };
    if let Err(e) = logging::configure(
        &config.log.level,
        logging::Format::resolve(config.log.format),
    ) {
        return refused(e);
    }
    match command {
        Command::CheckConfig => match app::check_data_dir_writable(&config.data_dir)
            .and_then(|()| app::Checked::new(config))
        {
            // The files the settings name are read and checked too, as at start.
            Ok(checked) => out(&checked.config().describe()),
            Err(e) => refused(e),
        },
        Command::Outbox { action, yes } => outbox_cli::run(action, yes, &config.data_dir),
        Command::Device(_)
        | Command::Token { .. }
        | Command::Version
        | Command::Completions(_)
        | Command::Manual => {
            unreachable!("handled before loading the configuration")
        }
        Command::Run => {
            let checked = match app::Checked::new(config) {
                Ok(checked) => checked,
                Err(e) => return refused(e),
            };
            raise_open_file_limit();
            // A reload (SIGHUP) reads the configuration again the same way.
            let load = Box::new(move || Config::load(&flags, &gateway_env()));
            match app::run(checked, load) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
