//! `edgegate outbox stat|dump|purge` (a module of the binary, not of the
//! library): the outbox of a stopped gateway, as an operator reads it.

use std::path::Path;
use std::process::ExitCode;

use edgegate::outbox::inspect;
use edgegate::outbox::OutboxError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Stat,
    Dump,
    Purge,
}

impl Action {
    pub fn parse(word: &str) -> Option<Action> {
        match word {
            "stat" => Some(Action::Stat),
            "dump" => Some(Action::Dump),
            "purge" => Some(Action::Purge),
            _ => None,
        }
    }
}

pub fn run(action: Action, yes: bool, data_dir: &Path) -> ExitCode {
    let result = match action {
        Action::Stat => stat(data_dir),
        Action::Dump => dump(data_dir),
        Action::Purge if !yes => match stat(data_dir) {
            Ok(()) => {
                eprintln!("edgegate outbox purge: nothing deleted; run it again with --yes to delete the above");
                return ExitCode::from(2);
            }
            Err(e) => Err(e),
        },
        Action::Purge => purge(data_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ OutboxError::InUse { .. }) => {
            eprintln!("edgegate outbox: {e}: stop it first (systemctl stop edgegate)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("edgegate outbox: {e}");
            ExitCode::FAILURE
        }
    }
}

fn stat(data_dir: &Path) -> Result<(), OutboxError> {
    let s = inspect::stat(data_dir)?;
    let now = edgegate::ops::build::unix_ms() as i64;
    let age = |at: &Option<String>| match at {
        Some(ts) => match inspect::unix_millis(ts) {
            Some(ms) => format!("{ts} ({} s ago)", (now - ms).max(0) / 1000),
            None => ts.clone(),
        },
        None => "-".to_owned(),
    };
    let names: Vec<String> = s
        .generations
        .iter()
        .map(|(dir, _)| {
            dir.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let mut text = format!(
        "outbox of {}\n\
         requests:        {} in {} batches, {} bytes of envelopes\n\
         presence events: {}\n\
         on disk:         {} bytes in {} generation(s) {}\n\
         oldest request:  {}\n\
         newest request:  {}\n\
         quarantined:     {} request(s), {} bytes (quarantine/requests.jsonl)\n",
        data_dir.display(),
        s.records,
        s.batches,
        s.stored_bytes,
        s.presence_events,
        s.disk_bytes,
        names.len(),
        names.join(", "),
        age(&s.oldest),
        age(&s.newest),
        s.quarantined.0,
        s.quarantined.1,
    );
    for bad in &s.unreadable {
        text.push_str(&format!("unreadable:      {bad}\n"));
    }
    for aside in &s.broken {
        text.push_str(&format!("moved aside:     {}\n", aside.display()));
    }
    print!("{text}");
    Ok(())
}

fn dump(data_dir: &Path) -> Result<(), OutboxError> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match inspect::dump(data_dir, &mut out) {
        Ok((written, unreadable)) => {
            for bad in &unreadable {
                eprintln!("edgegate outbox dump: unreadable: {bad}");
            }
            eprintln!("edgegate outbox dump: {written} record(s)");
            Ok(())
        }
        // A reader that went away (`| head`) is not a failure.
        Err(OutboxError::CreateDir { source, .. })
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn purge(data_dir: &Path) -> Result<(), OutboxError> {
    let before = inspect::stat(data_dir)?;
    let deleted = inspect::purge(data_dir)?;
    println!(
        "purged {} request(s) and {} presence event(s) in {deleted} generation(s) from {}",
        before.records,
        before.presence_events,
        data_dir.display()
    );
    Ok(())
}
