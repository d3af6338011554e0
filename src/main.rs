//! The `edgegate` command line: run the gateway, check a configuration,
//! mint a device token, talk to a gateway as a device. (The load and
//! measurement tools are the separate `edgegate-bench`, in `benches/`.)

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use edgegate::app;
use edgegate::config::{keys, Config, Flags};
use edgegate::ops::device_cli as device;
use edgegate::ops::logging;
use edgegate::security::auth;
use edgegate::wire::protocol;

/// Static (musl) builds: see the `static` feature in Cargo.toml.
#[cfg(feature = "static")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const COMMANDS: &str = "\
usage: edgegate [run] [OPTIONS]          run the gateway
       edgegate check-config [OPTIONS]   validate the configuration and print the effective settings
       edgegate outbox stat|dump|purge [OPTIONS] [--yes]
                                         a stopped gateway's outbox: count, export or delete what waits
       edgegate device [ADDR]            a device session: stdin lines are sent, replies printed
       edgegate token DEVICE_UID --key-file PATH
                                         print the auth token of a device (auth.mode = token)
       edgegate completions bash         the bash completion script
       edgegate --version | --help
";

const MORE: &str = "\
Every setting can also come from the environment (EDGEGATE_<SECTION>_<KEY>);
precedence: flag > environment > file > default. `edgegate check-config`
prints every setting and where its value came from. Logs go to stderr;
log.level filters them (EDGEGATE_LOG_LEVEL, else RUST_LOG: e.g. debug or
info,librdkafka=warn) and log.format sets text, json or journal lines.
";

/// The options come from the key table, so they cannot drift from it.
fn usage() -> String {
    format!("{COMMANDS}\noptions:\n{}\n{MORE}", keys::usage_options())
}

mod completions;
mod outbox_cli;

enum Command {
    Run,
    CheckConfig,
    Outbox {
        action: outbox_cli::Action,
        yes: bool,
    },
    Device(String),
    Token {
        device_uid: String,
        key_file: PathBuf,
    },
}

fn parse_args() -> Result<Option<(Command, Flags)>, lexopt::Error> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let mut command = None;
    let mut flags = Flags::default();
    while let Some(arg) = parser.next()? {
        match arg {
            Value(v) if command.is_none() => {
                command = Some(match v.to_str() {
                    Some("run") => Command::Run,
                    Some("check-config") => Command::CheckConfig,
                    Some("completions") => {
                        return match parser.next()? {
                            Some(Value(shell)) if shell == "bash" => {
                                out(&completions::bash());
                                Ok(None)
                            }
                            _ => Err(lexopt::Error::Custom(
                                "completions: the shell is missing (bash)".into(),
                            )),
                        };
                    }
                    Some("device") => {
                        let address = match parser.next()? {
                            Some(Long("help") | Short('h')) => {
                                out(&format!("{}\n", device::USAGE));
                                return Ok(None);
                            }
                            Some(Value(v)) => v.string()?,
                            Some(other) => return Err(other.unexpected()),
                            None => "127.0.0.1:3000".to_owned(),
                        };
                        return Ok(Some((Command::Device(address), flags)));
                    }
                    Some("token") => return parse_token(&mut parser),
                    Some("outbox") => {
                        let (word, action) = match parser.next()? {
                            Some(Value(w)) => {
                                let word = w.string()?;
                                let action = outbox_cli::Action::parse(&word);
                                (word, action)
                            }
                            Some(Long("help") | Short('h')) | None => {
                                out(outbox_cli::USAGE);
                                return Ok(None);
                            }
                            Some(other) => return Err(other.unexpected()),
                        };
                        let Some(action) = action else {
                            return Err(lexopt::Error::Custom(
                                format!("outbox: `{word}` is not stat, dump or purge").into(),
                            ));
                        };
                        Command::Outbox { action, yes: false }
                    }
                    _ => return Err(lexopt::Error::UnexpectedArgument(v)),
                });
            }
            Long("yes") if matches!(command, Some(Command::Outbox { .. })) => {
                if let Some(Command::Outbox { yes, .. }) = &mut command {
                    *yes = true;
                }
            }
            Long("help") | Short('h') => {
                match command {
                    Some(Command::CheckConfig) => out(&format!(
                        "{CHECK_CONFIG}\noptions:\n{}",
                        keys::usage_options()
                    )),
                    _ => out(&usage()),
                };
                return Ok(None);
            }
            Long("version") | Short('V') => {
                let b = edgegate::ops::build::build_info();
                out(&format!(
                    "edgegate {} (commit {}, {}, librdkafka {})\n",
                    b.version, b.commit, b.target, b.librdkafka
                ));
                return Ok(None);
            }
            Long("config") => flags.config = Some(parser.value()?.into()),
            Long(name) => {
                let Some(key) = keys::by_flag(&format!("--{name}")) else {
                    return Err(arg.unexpected());
                };
                let value = parser.value()?.string()?;
                flags.values.insert(key.name, value);
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Some((command.unwrap_or(Command::Run), flags)))
}

const TOKEN: &str = "\
usage: edgegate token DEVICE_UID --key-file PATH

Prints the auth token of a device for auth.mode = \"token\": the hex
HMAC-SHA256 of DEVICE_UID under the key in PATH (the gateway's
auth.token_key_file, mode 600). The device sends it in its auth frame.
";

const CHECK_CONFIG: &str = "\
usage: edgegate check-config [--config PATH] [OPTIONS]

Reads the configuration as `run` would (file, EDGEGATE_* environment,
flags), checks it, the files it names, the kafka.properties as librdkafka
reads them and that the data directory is writable, and prints every
effective setting with where it came from. Exit status 78 when refused.
";

fn parse_token(parser: &mut lexopt::Parser) -> Result<Option<(Command, Flags)>, lexopt::Error> {
    use lexopt::prelude::*;
    let mut device_uid = None;
    let mut key_file = None;
    while let Some(arg) = parser.next()? {
        match arg {
            Long("help") | Short('h') => {
                out(TOKEN);
                return Ok(None);
            }
            Long("key-file") => key_file = Some(PathBuf::from(parser.value()?)),
            Value(v) if device_uid.is_none() => device_uid = Some(v.string()?),
            _ => return Err(arg.unexpected()),
        }
    }
    let missing = |what: &str| lexopt::Error::Custom(format!("token: {what} is missing").into());
    let command = Command::Token {
        device_uid: device_uid.ok_or_else(|| missing("DEVICE_UID"))?,
        key_file: key_file.ok_or_else(|| missing("--key-file PATH"))?,
    };
    Ok(Some((command, Flags::default())))
}

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
    let (command, flags) = match parse_args() {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgegate: {e}\n\n{}", usage());
            return ExitCode::from(2);
        }
    };
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
                eprintln!("edgegate device: {e}\n{}", device::USAGE);
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
        Command::Device(_) | Command::Token { .. } => {
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
