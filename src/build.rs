//! Build script (Cargo.toml `build = "src/build.rs"`): the commit and target
//! for `edgegate --version` and `edgegate_build_info`.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=EDGEGATE_COMMIT={commit}");
    println!(
        "cargo:rustc-env=EDGEGATE_TARGET={}",
        std::env::var("TARGET").unwrap_or_default()
    );
    // Run again when the commit moves; only files that exist, or cargo
    // would run it (and rebuild the crate) every time.
    println!("cargo:rerun-if-changed=src/build.rs");
    let mut watched = vec![".git/HEAD".to_owned(), ".git/packed-refs".to_owned()];
    if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(format!(".git/{head}"));
    }
    for path in watched.iter().filter(|p| Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
}
