//! `edgegate-bench`: the load and measurement tools (`benches/run.sh` drives
//! them). A crate of its own so that none of it ships in the hub binary.

#![forbid(unsafe_code)]

mod bench;
mod plot;
mod report;

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut parser = lexopt::Parser::from_env();
    let options = parser
        .value()
        .map_err(|_| bench::BenchError::Usage(bench::USAGE.to_owned()))
        .and_then(|mode| {
            let mode = mode
                .into_string()
                .map_err(|_| bench::BenchError::Usage(bench::USAGE.to_owned()))?;
            bench::Options::parse(mode, &mut parser)
        });
    let options = match options {
        Ok(o) => o,
        Err(e) => {
            eprintln!("edgegate-bench: {e}");
            return ExitCode::from(2);
        }
    };
    raise_open_file_limit();
    match bench::run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgegate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Thousands of connections from one process (the idle mode).
fn raise_open_file_limit() {
    if let Err(e) = edgegate::ops::raise_open_file_limit() {
        eprintln!("edgegate-bench: cannot raise the open-file limit: {e}");
    }
}
