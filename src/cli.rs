//! The command line, defined once (a module of the binary): parsing,
//! `--help`, the shell completions and the man page all come from
//! [`command`], and its options from `config::keys`, so none of them can
//! drift from the others. The .deb ships the completions and the man page
//! as made by `edgegate completions SHELL` and `edgegate manual`; a test
//! keeps the shipped copies equal to them.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches};
use clap_complete::Shell;
use edgegate::config::{keys, Flags};

use crate::outbox_cli::Action;

/// What the command line asks for.
pub enum Command {
    Run,
    CheckConfig,
    Outbox {
        action: Action,
        yes: bool,
    },
    Device(String),
    Token {
        device_uid: String,
        key_file: PathBuf,
    },
    Completions(Shell),
    Manual,
    Version,
}

const ABOUT: &str = "device-to-Kafka gateway for edge hubs";

const DESCRIPTION: &str = "\
edgegate accepts long-lived TCP connections from devices speaking
newline-delimited JSON, acknowledges a request once Kafka confirmed it or it
is on disk (fsynced) in the outbox, forwards it to a Kafka topic, and routes
the answers backend workers put on other Kafka topics back to the right
device, holding them on disk for devices that are not connected. Without a
command it runs the gateway.

The load and measurement tools are a separate program, edgegate-bench,
built from the source tree and not installed on hubs.";

const ENVIRONMENT: &str = "\
Every setting can also come from the environment (EDGEGATE_<SECTION>_<KEY>);
precedence: flag > environment > file > default. An EDGEGATE_ variable that
names no setting is refused. `edgegate check-config` prints every setting and
where its value came from. Logs go to stderr; log.level filters them
(EDGEGATE_LOG_LEVEL, else RUST_LOG: e.g. debug or info,librdkafka=warn) and
log.format sets text, json or journal lines.";

const CHECK_CONFIG: &str = "\
Reads the configuration as `run` would (file, EDGEGATE_* environment,
flags), checks it, the files it names, the kafka.properties as librdkafka
reads them and that the data directory is writable, and prints every
effective setting with where it came from. Exit status 78 when refused.";

const OUTBOX: &str = "\
The outbox of a stopped gateway (each command refuses while one runs on the
data directory, naming its process).";

const DUMP: &str = "\
Writes every record as a JSON line {\"seq\",\"kind\",\"key\",\"value\"}, value
being the envelope as it would go to Kafka, for a rescue or a replay
elsewhere: edgegate outbox dump > requests.jsonl";

const PURGE: &str = "\
Deletes every record. The requests in the outbox were acknowledged to
devices: they are then lost. Without --yes it only shows what it would
delete.";

const TOKEN: &str = "\
Prints the auth token of a device for auth.mode = \"token\": the hex
HMAC-SHA256 of DEVICE_UID under the key in PATH (the gateway's
auth.token_key_file, at least 32 bytes, mode 600). The device sends it in
its auth frame.";

const DEVICE: &str = "\
A device session: each line of stdin is sent as a frame, each reply printed.
Ends when stdin ends and the gateway has answered, or when it closes.";

/// `--config` and the flags of the key table.
fn settings(names: Option<&[&str]>) -> Vec<Arg> {
    let mut args = vec![Arg::new("config")
        .long("config")
        .value_name("PATH")
        .value_parser(clap::value_parser!(PathBuf))
        .help("TOML configuration file (default: none, built-in defaults)")];
    for key in keys::KEYS {
        let Some(flag) = key.flag else { continue };
        if names.is_some_and(|names| !names.contains(&key.name)) {
            continue;
        }
        let help = if key.default.is_empty() {
            key.help.to_owned()
        } else {
            format!("{} (default: {})", key.help, key.default)
        };
        args.push(
            Arg::new(key.name)
                .long(flag.name.trim_start_matches("--"))
                .value_name(flag.value)
                .help(help),
        );
    }
    args
}

fn outbox_action(name: &'static str, about: &'static str) -> clap::Command {
    clap::Command::new(name)
        .about(about)
        .args(settings(Some(&["data_dir"])))
}

/// The one definition of the command line.
pub fn command() -> clap::Command {
    clap::Command::new("edgegate")
        .about(ABOUT)
        .long_about(DESCRIPTION)
        .after_help(ENVIRONMENT)
        .disable_version_flag(true)
        .disable_help_subcommand(true)
        .args(settings(None))
        .arg(
            Arg::new("version")
                .short('V')
                .long("version")
                .action(ArgAction::SetTrue)
                .help("Print the version, commit, target and librdkafka version"),
        )
        .subcommand(
            clap::Command::new("run")
                .about("Run the gateway (the default)")
                .args(settings(None)),
        )
        .subcommand(
            clap::Command::new("check-config")
                .about("Validate the configuration and print the effective settings")
                .long_about(CHECK_CONFIG)
                .args(settings(None)),
        )
        .subcommand(
            clap::Command::new("outbox")
                .about("Count, export or delete what waits in a stopped gateway's outbox")
                .long_about(OUTBOX)
                .subcommand_required(true)
                .subcommand(outbox_action(
                    "stat",
                    "Count the requests waiting: records, bytes, oldest and newest, quarantine",
                ))
                .subcommand(
                    outbox_action("dump", "Write every record as a JSON line").long_about(DUMP),
                )
                .subcommand(
                    outbox_action("purge", "Delete every record (with --yes)")
                        .long_about(PURGE)
                        .arg(
                            Arg::new("yes")
                                .long("yes")
                                .action(ArgAction::SetTrue)
                                .help("Really delete"),
                        ),
                ),
        )
        .subcommand(
            clap::Command::new("device")
                .about("A device session: stdin lines are sent, replies printed")
                .long_about(DEVICE)
                .arg(
                    Arg::new("addr")
                        .value_name("ADDR")
                        .default_value("127.0.0.1:3000")
                        .help("The gateway's device listener"),
                ),
        )
        .subcommand(
            clap::Command::new("token")
                .about("Print the auth token of a device (auth.mode = \"token\")")
                .long_about(TOKEN)
                .arg(
                    Arg::new("device_uid")
                        .value_name("DEVICE_UID")
                        .required(true)
                        .help("The device's deviceUid"),
                )
                .arg(
                    Arg::new("key_file")
                        .long("key-file")
                        .value_name("PATH")
                        .required(true)
                        .value_parser(clap::value_parser!(PathBuf))
                        .help("The HMAC key file (auth.token_key_file)"),
                ),
        )
        .subcommand(
            clap::Command::new("completions")
                .about(
                    "Print the completion script of a shell: bash, zsh, fish, elvish or powershell",
                )
                .arg(
                    Arg::new("shell")
                        .value_name("SHELL")
                        .required(true)
                        .value_parser(clap::value_parser!(Shell)),
                ),
        )
        .subcommand(
            clap::Command::new("manual")
                .about("Print the man page (roff): edgegate manual | man -l -"),
        )
}

/// Parses a command line (without the program name's special meaning:
/// the first item is skipped as clap does).
pub fn parse<I, T>(args: I) -> Result<(Command, Flags), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    let mut flags = Flags::default();
    // Settings may stand before the command and after it; after wins.
    read_settings(&matches, &mut flags);
    if matches.get_flag("version") {
        return Ok((Command::Version, flags));
    }
    let command = match matches.subcommand() {
        None => Command::Run,
        Some(("run", m)) => {
            read_settings(m, &mut flags);
            Command::Run
        }
        Some(("check-config", m)) => {
            read_settings(m, &mut flags);
            Command::CheckConfig
        }
        Some(("outbox", m)) => {
            let (name, m) = m.subcommand().expect("outbox requires a subcommand");
            read_settings(m, &mut flags);
            let action = Action::parse(name).expect("outbox subcommands are actions");
            let yes = action == Action::Purge && m.get_flag("yes");
            Command::Outbox { action, yes }
        }
        Some(("device", m)) => Command::Device(text(m, "addr")),
        Some(("token", m)) => Command::Token {
            device_uid: text(m, "device_uid"),
            key_file: m
                .get_one::<PathBuf>("key_file")
                .cloned()
                .unwrap_or_default(),
        },
        Some(("completions", m)) => Command::Completions(
            *m.get_one::<Shell>("shell")
                .expect("completions requires a shell"),
        ),
        Some(("manual", _)) => Command::Manual,
        Some((other, _)) => unreachable!("subcommand {other} is not defined"),
    };
    Ok((command, flags))
}

fn text(matches: &ArgMatches, id: &str) -> String {
    matches.get_one::<String>(id).cloned().unwrap_or_default()
}

fn read_settings(matches: &ArgMatches, flags: &mut Flags) {
    if let Some(path) = matches.get_one::<PathBuf>("config") {
        flags.config = Some(path.clone());
    }
    for key in keys::KEYS.iter().filter(|k| k.flag.is_some()) {
        let given = matches.try_get_one::<String>(key.name).ok().flatten();
        if let Some(value) = given {
            flags.values.insert(key.name, value.clone());
        }
    }
}

/// The completion script of `shell`.
pub fn completions(shell: Shell) -> String {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command(), "edgegate", &mut script);
    String::from_utf8(script).expect("completion scripts are UTF-8")
}

/// The man page: what clap_mangen makes of the definition, then the
/// sections it cannot know (each subcommand's options, environment,
/// signals, exit status, files).
pub fn manual() -> String {
    let command = command();
    let man = clap_mangen::Man::new(command.clone())
        .title("EDGEGATE")
        .section("1")
        .source(format!("edgegate {}", env!("CARGO_PKG_VERSION")))
        .manual("User Commands");
    let mut page = Vec::new();
    render(&man, &mut page).expect("writing to memory cannot fail");
    let mut page = String::from_utf8(page).expect("roff is UTF-8");
    page.push_str(".SH COMMANDS\n");
    for sub in command.get_subcommands() {
        let leaves: Vec<(String, &clap::Command)> = if sub.has_subcommands() {
            sub.get_subcommands()
                .map(|leaf| (format!("{} {}", sub.get_name(), leaf.get_name()), leaf))
                .collect()
        } else {
            vec![(sub.get_name().to_owned(), sub)]
        };
        for (name, leaf) in leaves {
            page.push_str(&command_section(&name, leaf));
        }
    }
    page.push_str(MANUAL_TAIL);
    page
}

fn render(man: &clap_mangen::Man, page: &mut Vec<u8>) -> std::io::Result<()> {
    man.render_title(page)?;
    man.render_name_section(page)?;
    man.render_synopsis_section(page)?;
    man.render_description_section(page)?;
    man.render_options_section(page)
}

/// One command of the COMMANDS section: its synopsis, what it does and
/// its own options.
fn command_section(name: &str, command: &clap::Command) -> String {
    let mut text = format!(".SS \"edgegate {}\"\n", roff(name));
    let mut synopsis = format!(".B edgegate {}", roff(name));
    for arg in command.get_arguments() {
        let value = arg
            .get_value_names()
            .and_then(|names| names.first())
            .map(|v| v.to_string());
        let shown = match (arg.get_long(), value) {
            (Some(long), Some(value)) => format!("\\-\\-{} {value}", roff(long)),
            (Some(long), None) => format!("\\-\\-{}", roff(long)),
            (None, Some(value)) => value,
            (None, None) => continue,
        };
        if arg.is_required_set() {
            synopsis.push_str(&format!("\n{shown}"));
        } else {
            synopsis.push_str(&format!("\n[{shown}]"));
        }
    }
    text.push_str(&synopsis);
    text.push_str("\n.PP\n");
    let about = command
        .get_long_about()
        .or(command.get_about())
        .map(|s| s.to_string())
        .unwrap_or_default();
    text.push_str(&roff(&about));
    text.push('\n');
    text
}

/// Escapes what roff would read as its own: hyphens (so they stay minus
/// signs, searchable), backslashes and a leading dot or quote.
fn roff(text: &str) -> String {
    let lines = text.lines().map(|line| {
        let escaped = line.replace('\\', "\\e").replace('-', "\\-");
        match escaped.chars().next() {
            Some('.' | '\'') => format!("\\&{escaped}"),
            None => ".PP".to_owned(),
            _ => escaped,
        }
    });
    lines.collect::<Vec<_>>().join("\n")
}

const MANUAL_TAIL: &str = include_str!("cli/manual-tail.roff");
