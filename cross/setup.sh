#!/usr/bin/env bash
# Installs what cross/build.sh needs, each only when missing:
# the Rust target (or rust-src for nightly build-std), cmake, zig (PyPI's
# ziglang package) and cargo-zigbuild.
set -euo pipefail
target="$1"
toolchain="${2:-stable}"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

if [ "$toolchain" = nightly ]; then
  rustup component list --toolchain nightly --installed | grep -q '^rust-src' \
    || rustup component add rust-src --toolchain nightly
else
  rustup target list --installed | grep -qx "$target" || rustup target add "$target"
fi
if ! command -v cmake >/dev/null; then
  { apt-get update -qq && apt-get install -y -qq cmake; } >/dev/null
fi
# Pinned: cargo-zigbuild follows zig's command line, which changes between
# zig releases.
if ! python3 -m ziglang version >/dev/null 2>&1; then
  python3 -m pip install --quiet "ziglang==0.14.1"
fi
command -v cargo-zigbuild >/dev/null || cargo install cargo-zigbuild --locked
