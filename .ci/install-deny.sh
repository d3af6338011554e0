#!/usr/bin/env bash
# Installs cargo-deny (dependency licenses, bans and sources) unless this
# version is already there; building it takes a few minutes on 2 cores.
set -euo pipefail
want="0.20.2"
bin="${CARGO_HOME:-$HOME/.cargo}/bin/cargo-deny"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$want"; then
  exit 0
fi
echo "installing cargo-deny $want..." >&2
cargo install cargo-deny --locked --version "$want"
